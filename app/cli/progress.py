"""Progress of a job on stderr: a live bar in a terminal; in a log (output redirected, nohup, a batch
scheduler) a plain line at most every ``STEPTUNE_LOG_INTERVAL`` seconds (default 30), at every change of
phase and at the end."""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import time

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

from steptune.cli.console import duration, err, live, text_column
from steptune.cli.errors import CliError


def best_text(best: dict) -> str:
    return " ".join(f"{k}:{v:.3g}" for k, v in sorted(best.items()))


def busy_text(st: dict) -> str:
    """Evaluators with work in flight, of the run's evaluators ("" before any is known)."""
    return f"busy {st['busy']}/{st['evaluators']}" if st.get("evaluators") else ""


def _failures(st: dict) -> str:
    return (f" failed {st['failed']}" if st["failed"] else "") + (f" retried {st['retried']}" if st["retried"] else "")


class BarProgress:
    """A rich progress bar (terminals)."""

    def __init__(self):
        self.bar = Progress(text_column(bold=True), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), text_column("{task.fields[info]}"), console=err)
        self.task = None

    def __enter__(self):
        self.bar.__enter__()
        self.task = self.bar.add_task("starting", total=None, info="")
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)

    def update(self, st: dict) -> None:
        eta = f" eta {duration(st['eta'])}" if st.get("eta") is not None else ""
        if st["phase"] == "search":
            self.bar.update(self.task, description="search", total=st["total"], completed=st["done"],
                            info=f"best {best_text(st['best'])} {busy_text(st)}{_failures(st)}{eta}")
        else:  # baseline presets or held-out confirmations: their own count, not the search's
            self.bar.update(self.task, description=st["phase"], total=st["phase_total"] or None,
                            completed=st["phase_done"], info=" ".join(filter(None, [st.get("detail"), _failures(st)])))

    def clear(self) -> None:
        """Take the bar away, so an error is the last line rather than a stale frame."""
        self.bar.remove_task(self.task)

    def flush(self) -> None:  # a terminal's bar stays below what is said
        pass


def stamped(line: str, since: float) -> str:
    """A line for a log, with the time since ``since`` (``time.monotonic()``) as the progress lines carry it."""
    return f"[{duration(time.monotonic() - since)}] {line}"


def log_interval() -> float:
    """Seconds between progress lines in a log: ``$STEPTUNE_LOG_INTERVAL`` (30 where it is unset or empty)."""
    text = os.environ.get("STEPTUNE_LOG_INTERVAL", "").strip()
    try:
        seconds = float(text) if text else 30.0
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds >= 0):
        raise CliError(f"STEPTUNE_LOG_INTERVAL={text!r}: give the seconds between progress lines as a number, 0 or "
                       "more (0 writes a line for every result), or unset it for the default 30")
    return seconds


class LineProgress:
    """Plain progress lines (logs): evaluations done of the budget, best per NFE, rate, ETA, failures; their times
    since ``started`` (default: now)."""

    def __init__(self, interval: float | None = None, started: float | None = None):
        self.interval = log_interval() if interval is None else interval
        self.last_line = -float("inf")
        self.last: dict | None = None
        self.last_text: tuple | None = None  # what the last line written counted: never written twice running
        self.started = time.monotonic() if started is None else started
        self.search_start: tuple[float, int] | None = None  # (when, evaluations done) as the search phase began

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.last is not None and exc[0] is None:
            self._print(self.last)
        return False

    def update(self, st: dict) -> None:
        if st["phase"] == "search" and self.search_start is None:
            self.search_start = (time.monotonic(), st["done"])
        changed = self.last is not None and st["phase"] != self.last["phase"]
        if changed:
            self._print(self.last)  # the phase's last count, then the new phase
        self.last = st
        ended = st["phase"] != "search" and 0 < (st["phase_total"] or 0) <= st["phase_done"]  # a part's last count
        if changed or ended or time.monotonic() - self.last_line >= self.interval:
            self._print(st)

    def flush(self) -> None:
        """Write the last count not written yet, before a line said by the run: a count written after it would be
        older than what it says."""
        if self.last is not None:
            self._print(self.last)

    def _print(self, st: dict) -> None:
        if st["phase"] == "search":
            total = st["total"] or 0
            pct = f" ({100 * st['done'] / total:.0f}%)" if total else ""
            t0, done0 = self.search_start or (self.started, 0)
            spent = time.monotonic() - t0
            rate = (st["done"] - done0) / spent if spent > 0 and st["done"] > done0 else None
            line = (f"search {st['done']}/{total or '?'}{pct} | best {best_text(st['best']) or '—'} | "
                    f"{'—' if not rate else f'{rate:.3g}'} evals/s | {busy_text(st) or 'busy —'} | "
                    f"eta {duration(st.get('eta'))}")
        else:
            line = f"{st['phase']} {st['phase_done']}/{st['phase_total'] or '?'}" + (
                f" | {st['detail']}" if st.get("detail") else "")
        text = f"{line}{_failures(st)}"
        # what the line counts: the same count again (a new rate or ETA aside) is not written twice running
        counted = (st["phase"], st["done"], st["phase_done"], best_text(st["best"]), st.get("detail"), _failures(st))
        if counted == self.last_text:
            return
        self.last_line, self.last_text = time.monotonic(), counted
        err.print(stamped(text, self.started), highlight=False, markup=False)

    def clear(self) -> None:
        pass


class NoProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, st: dict) -> None:
        pass

    def flush(self) -> None:
        pass

    def clear(self) -> None:
        pass


class LogBar:
    """rich's ``Progress`` as the commands use it (``add_task``, ``update``, ``advance``, ``reset``,
    ``remove_task``), for a log: each task's description, count and text fields as a plain line at most every
    ``STEPTUNE_LOG_INTERVAL`` seconds, and once more as it ends (removed, or the block left without an error). A
    command that fails at once writes nothing but its error."""

    def __init__(self, interval: float | None = None, disable: bool = False):
        self.interval = log_interval() if interval is None else interval
        self.disable = disable
        self.started = time.monotonic()
        self.tasks: dict[int, dict] = {}
        self.ids = itertools.count()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            for task in list(self.tasks):
                self.remove_task(task)
        return False

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **fields) -> int:
        task = next(self.ids)
        self.tasks[task] = {"description": description, "total": total, "completed": completed, "fields": fields,
                            "printed": time.monotonic(), "text": None, "idle": False}
        return task

    def update(self, task: int, *, description: str | None = None, total: float | None = None,
               completed: float | None = None, advance: float | None = None, **fields) -> None:
        t = self.tasks[task]
        for name, value in (("description", description), ("total", total), ("completed", completed)):
            if value is not None:
                t[name] = value
        if advance is not None:
            t["completed"] += advance
        t["fields"].update(fields)
        t["idle"] = False
        if time.monotonic() - t["printed"] >= self.interval:
            self._print(t)

    def advance(self, task: int, advance: float = 1) -> None:
        self.update(task, advance=advance)

    def reset(self, task: int) -> None:
        """The count starts over; until it moves again there is nothing to say of it (not even as it ends)."""
        self.tasks[task].update(completed=0, idle=True)

    def remove_task(self, task: int) -> None:
        t = self.tasks.pop(task)
        if not t["idle"]:
            self._print(t)

    def _print(self, t: dict) -> None:
        count = f" {t['completed']:g}/{t['total']:g}" if t["total"] else ""
        extra = " ".join(str(v) for v in t["fields"].values() if v not in (None, ""))
        text = f"{t['description']}{count}" + (f" | {extra}" if extra else "")
        t["printed"] = time.monotonic()
        if text != t["text"] and not self.disable:
            t["text"] = text
            err.print(stamped(text, self.started), highlight=False, markup=False)


def said_in_log(doing: str, done: str, quiet: bool = False, since: float | None = None, after: float = 3.0):
    """A slow step said in a log while it runs and with its time at its end (``slow_steps.said_if_slow``), each line
    stamped as a log bar stamps its lines, with the time since ``since`` (``time.monotonic()``; default: now), once
    it has taken ``after`` seconds; nothing in a terminal, whose spinner or bar shows it, or when ``quiet``."""
    from steptune.slow_steps import said_if_slow

    if quiet or live():
        return contextlib.nullcontext()
    started = time.monotonic() if since is None else since

    def say(text: str) -> None:
        err.print(stamped(text, started), markup=False, highlight=False)

    return said_if_slow(say, doing, done, after=after)


def task_bar(*columns, disable: bool = False, transient: bool = True):
    """The progress of a command's counted work on stderr: rich's bar with ``columns`` (its default ones when none)
    in a terminal, plain lines in a log (:class:`LogBar`)."""
    if live():
        return Progress(*columns, console=err, disable=disable, transient=transient)
    return LogBar(disable=disable)


def job_progress(quiet: bool = False, started: float | None = None):
    """The progress display for where stderr goes: none when ``quiet``, a bar in a terminal, lines elsewhere (their
    times since ``started``)."""
    if quiet:
        return NoProgress()
    return BarProgress() if live() else LineProgress(started=started)
