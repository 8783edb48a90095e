"""`steptune run JOB.toml` (an overnight search from a job file) and `steptune status --study NAME`."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from shlex import quote as shell_quote
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from steptune.cli import cost as cost_table
from steptune.cli.console import duration, err, fmt, live, out, per_minute
from steptune.cli.errors import CliError, Interrupted
from steptune.cli.options import DbOpt, JsonOpt, StudyOpt
from steptune.cli.progress import job_progress, stamped
from steptune.cli.sor import print_sor_study, sor_study_summary
from steptune.run_lease import PHASES
from steptune.suggested import command


def _open_storage(url: str | None, must_exist: bool = False, where: str = "storage.db"):
    """The database of a job (created if missing), or with ``must_exist`` one to read (nothing created);
    errors name ``where`` the URL came from."""
    from steptune.storage import StorageError, connect

    try:
        return connect(url, must_exist=must_exist)
    except StorageError as e:
        raise CliError(f"{where}: {e}") from None
    except Exception as e:  # a driver error while reaching the server (refused, unknown host, bad login)
        from steptune.storage.db import DEFAULT_URL

        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        shown = url or os.environ.get("STEPTUNE_DB") or DEFAULT_URL
        raise CliError(f"{where}: cannot open the database {shown!r} ({first})") from None


def print_imports(result) -> None:
    """A line for each imported schedule the run was to score: its held-out score against the best at its NFE."""
    for i in result.imports:
        what = f"the imported schedule, trial id {i['id']} (NFE {i['nfe']})"
        if i["status"] == "failed":
            err.print(f"{what} failed; {command('steptune', 'status', '--study', result.study)} says why",
                      highlight=False)
            continue
        if i["status"] != "complete":
            err.print(f"{what} is not scored yet; the study's next run scores it", highlight=False)
            continue
        best = (f"the best there is trial id {i['best_id']} at {fmt(i['best_score'])}" if i["best_id"] != i["id"]
                else f"the best of the {i['others'] + 1} held-out scores at NFE {i['nfe']}" if i.get("others")
                else f"the only held-out score at NFE {i['nfe']} (nothing searched or preset there to compare with)")
        err.print(f"scored {what}: {fmt(i['score'])} held-out; {best}", highlight=False)


OVERFIT = 2.0  # held-out over cheap score of a searched schedule that lost to the presets, above which it is named


def lost_to_presets(result, overfitted: bool) -> list:
    """The NFEs whose searched schedule lost to the best preset on the held-out bank, with no refinement that beat it:
    those whose held-out score is more than ``OVERFIT`` times their cheap one (``overfitted``), or the others."""
    return [r for r in result.per_nfe if r.searched_score and r.preset_score and r.searched_score > r.preset_score
            and (r.refined is None or r.refined > r.preset_score)
            and bool(r.searched_train and r.searched_score > OVERFIT * r.searched_train) == overfitted]


def print_overfit(result, cheap_samples: int, advice: str) -> None:
    """A line for each NFE whose searched schedule lost to the best preset on the held-out bank while scoring far
    better on the search's own states: the search fitted those few states, not the problem, and more of them (what
    ``advice`` says to set) is what helps."""
    worse = lost_to_presets(result, overfitted=True)
    for r in worse:
        err.print(f"NFE {r.nfe}: the searched schedule scores {fmt(r.searched_train)} on the search's {cheap_samples} "
                  f"train states but {fmt(r.searched_score)} held-out ({r.searched_score / r.searched_train:.1f}x), "
                  f"worse than the best preset ({fmt(r.preset_score)}): the search fits those states rather than "
                  f"the problem; give it more of them ({advice})", highlight=False)


def print_refine_hint(result, refined: bool) -> None:
    """After a complete run without refinement: where the best preset stayed the best, the command that refines the
    searched schedules there."""
    done = result.status == "complete" and not refined
    lost = [r.nfe for r in lost_to_presets(result, overfitted=False)] if done else []
    if lost:
        nfes = ", ".join(map(str, lost[:-1])) + (" and " if len(lost) > 1 else "") + str(lost[-1])
        err.print(f"NFE {nfes}: the best preset stays the best held-out (best and export give it); refining the "
                  f"searched schedules by gradient can beat it: steptune refine --study {shell_quote(result.study)} "
                  + " ".join(f"--nfe {n}" for n in lost), highlight=False)


def print_stopped(result, table: bool = True) -> None:
    """The line a run that stopped before its end leaves (nothing after a complete one); ``table``: after the table
    of its results (else its JSON)."""
    if result.status not in ("interrupted", "time-budget", "incomplete"):
        return
    queued, left = result.baselines_queued, result.baselines_left
    counts = ", ".join([*([f"{queued} stored and not scored yet"] if queued else []),
                        *([f"{left} preset{'s' * (left != 1)} and NFE{'s' * (left != 1)} not stored yet"] if left
                          else [])])
    shown = "the best preset above" if table else "its results' best preset"
    best = (f"{shown} is the best of those scored" if any(r.preset_score is not None for r in result.per_nfe)
            else "none is scored yet")
    unscored = (f" before its preset baselines were all chosen and scored ({counts}; {best})" if left else
                f" with {queued} preset baseline{'s' * (queued != 1)} not scored yet ({best})" if queued else "")
    err.print(f"stopped ({result.status}){unscored}; run the same command again to resume study {result.study!r}",
              highlight=False)


class _StartInterrupted(KeyboardInterrupt):
    """A signal while the evaluators start: a KeyboardInterrupt, so that no ``except Exception`` on the way (a model
    factory's loader, say) takes it for an error of its own."""


def execute_job(job, quiet: bool = False, source: str | None = None, db_from: str | None = None):
    """Run ``job`` with a progress bar on stderr (none when ``quiet``), Ctrl-C finishing the evaluations in
    flight; bad input raises CliError before any work, its message after ``source: `` where given (the job file),
    a database that cannot be opened named by where its URL came from (``db_from``; by default the job's key, or
    $STEPTUNE_DB where the job names none). Returns the RunResult."""
    from steptune.backends import BackendError, make_backend
    from steptune.evaluators.neural_reference import ReferenceNotConverged
    from steptune.jobs import JobError
    from steptune.runner import Runner
    from steptune.storage.db import DatabaseUnavailable, DriverLost, sqlite_file

    if job.evaluation.cache:  # the reference states are written there first thing: a folder that cannot be is named
        from steptune.cli.paths import output_folder

        try:
            output_folder(Path(job.evaluation.cache), "evaluation.cache")
        except CliError as e:
            raise CliError(f"{source}: {e.message}" if source else e.message) from None
    new_file = sqlite_file(job.storage.db)
    new_file = new_file if new_file is not None and not new_file.exists() else None
    if db_from is None:
        db_from = "storage.db" if job.storage.db else "$STEPTUNE_DB" if os.environ.get("STEPTUNE_DB") else "storage.db"
    storage = _open_storage(job.storage.db, where=db_from)
    shown_now = []  # the progress display, once there is one: its pending count goes out before a line said
    began = time.monotonic()  # a log's lines carry the time since

    def say(line: str) -> None:
        for shown_ in shown_now:
            shown_.flush()
        if live():
            err.print(line)
        else:
            err.print(stamped(line, began), highlight=False)

    backend_ = make_backend(job, on_event=lambda msg: say(f"{msg}; its candidates are re-queued"))

    runner = Runner(job, storage, backend_, say=say)
    try:
        runner.prepare()
    except (JobError, BackendError) as e:
        backend_.close()
        storage.close()
        if new_file is not None:  # a job refused before its study was made leaves no database behind
            for suffix in ("", "-wal", "-shm", "-journal"):
                Path(f"{new_file}{suffix}").unlink(missing_ok=True)
        raise CliError(f"{source}: {e}" if source else str(e)) from None
    with job_progress(quiet, started=began) as shown:
        runner.progress = shown.update
        shown_now.append(shown)
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

        def on_signal(signum, frame):
            # Ctrl-C, or SIGTERM as `kill` and batch schedulers send it before they kill: the evaluations in flight
            # are finished and stored, so the next run resumes from them; the same signal again stops at once
            if runner.interrupted.is_set():
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
                raise KeyboardInterrupt
            if runner.phase == "start":  # nothing is in flight while the evaluators start: stop at once
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
                at_start.append("Ctrl-C" if signum == signal.SIGINT else "SIGTERM")
                raise _StartInterrupted(at_start[0])
            runner.interrupt()
            again = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
            say(f"{'interrupted' if signum == signal.SIGINT else 'terminated (SIGTERM)'}: finishing the "
                f"evaluations in flight ({again} again to abort)")

        at_start: list[str] = []  # the signal that stopped the run while its evaluators started
        for sig in previous:
            signal.signal(sig, on_signal)
        try:
            result = runner.run()
        except (_StartInterrupted, KeyboardInterrupt):
            if not at_start:  # a second signal: abort
                raise
            # Ray turns what a signal handler raises inside its waits into a KeyboardInterrupt: either says this
            shown.clear()
            raise Interrupted(f"{at_start[0]} while the evaluators were starting, before any evaluation of this run; "
                              f"nothing was lost: run the same command again to go on with study {job.study!r}"
                              ) from None
        except (JobError, BackendError, ReferenceNotConverged, DriverLost) as e:
            shown.clear()
            raise CliError(str(e)) from None
        except DatabaseUnavailable as e:
            shown.clear()
            raise CliError(f"{e}; the study is kept: run the same command again to resume {job.study!r}") from None
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            backend_.close()
            storage.close()
    return result


ENDED = {"interrupted": "was interrupted", "time budget": "reached its time budget", "error": "stopped on an error"}


def _run_state(info: dict) -> str:
    """The end of status's first line: the ETA of the run on it, what a run still does after its search, that no
    run is on it, or that it is done."""
    d = info["driver"]
    if d and d["alive"]:
        doing = f"{d['doing']} (driver {d['id']}, heartbeat {d['heartbeat_age']:.0f} s ago)"
        return f"ETA {duration(info['eta_seconds'])}; {doing}" if not info["finished"] else \
            f"search finished; the run goes on, {doing}"
    if d:  # a run ending as it should lets go of the study
        return (f"no run is on it: the last one (driver {d['id']}, last heartbeat {duration(d['heartbeat_age'])} "
                "ago) ended without letting go; run its job or search again to resume")
    last = info["last_run"]
    how = ENDED.get(last["ended"]) if last else None
    where = f"the last run {how} while {PHASES.get(last['phase'], last['phase'])}" if how else ""
    if info["finished"]:
        if how:  # its confirmations or refinement are not done
            return f"search finished; {where}: run its job or search again to go on"
        return f"finished; {info['queued']} queued for its next run" if info["queued"] else "finished"
    if info["search_budget"] is None:
        return f"ETA {duration(info['eta_seconds'])}"
    return f"stopped: {where or 'no run is on it'}; run its job or search again to resume"


def study_status(storage, study: str) -> dict:
    """What `steptune status` shows, from the database alone."""
    from steptune.run_lease import lease
    from steptune.runner import CHEAP, CONFIRM, summarize
    from steptune.search_cost import study_cost
    from steptune.storage.schema import utcnow

    st = storage.get_study(study)
    trials = storage.trials(study, schedules=False)
    job = st.config.get("job") or {}
    driver = lease(st.config, utcnow())
    nfes = sorted({t.nfe for t in trials}) if not job else job["search"]["nfe"]
    budget = job["budget"]["evaluations"] * len(nfes) if job else None
    cheap = [t for t in trials if t.fidelity == CHEAP]
    final = [t for t in cheap if t.status in ("complete", "failed", "pruned")]
    # the search's own evaluations of the last ten minutes (not baselines, confirmations or imports)
    recent = [t for t in final if t.finished is not None and (utcnow() - t.finished).total_seconds() <= 600]
    per_minute = None
    if len(recent) >= 2 and driver and driver["alive"]:  # a rate is a running search's
        span = (max(t.finished for t in recent) - min(t.finished for t in recent)).total_seconds()
        per_minute = 60 * (len(recent) - 1) / span if span > 0 else None
    eta = None
    confirmed = sum(1 for t in trials if t.fidelity == CONFIRM and "confirms" in t.info
                    and t.status in ("complete", "failed", "pruned"))
    exhausted = st.config.get("search_exhausted")  # the method had nothing new to try after that many
    left = None
    if budget is not None:
        searching = 0 if exhausted is not None else max(0, budget - len(final))
        k = job["evaluation"]["confirm"]
        # once the search is done, each NFE confirms its k best distinct schedules, or all it has where fewer
        scored = [t for t in cheap if t.status == "complete" and t.score is not None]
        to_confirm = k * len(nfes) if searching else sum(min(k, len({t.key for t in scored if t.nfe == n}))
                                                         for n in nfes)
        left = searching + max(0, to_confirm - confirmed)
    if left and per_minute:
        eta = 60 * left / per_minute
    rows = []
    if job:
        for s in summarize(trials, nfes):  # the searched NFEs and the ones interpolated from them
            # the train score of the schedule whose held-out score the row shows; before any is confirmed, the best
            train = [t.score for t in cheap if t.nfe == s.nfe and t.status == "complete" and t.score is not None]
            train = s.searched_train if s.searched_score is not None else min(train, default=None)
            rows.append({"nfe": s.nfe, "heldout": s.searched_score, "train": train,
                         "refined": s.refined, "preset": s.preset, "preset_score": s.preset_score,
                         "interpolated_from": s.interpolated_from})
    else:  # a sweep's, an import's or the Python API's study: its best at each NFE, as 'steptune best' says
        for t in storage.best_per_nfe(study, fidelity=st.reporting_fidelity):
            rows.append({"nfe": t.nfe, "best": t.score, "trial_id": t.id, "schedule": t.schedule.get("name") or "",
                         "fidelity": t.fidelity, "interpolated_from": None})
    # schedules imported into a search's study (no origin of the run's own), scored on the held-out bank: the
    # best at each NFE, and whether it is the study's best there
    imported: dict[int, object] = {}
    for t in trials if job else ():
        if (t.fidelity == CONFIRM and t.status == "complete" and t.score is not None and "origin" not in t.info
                and (t.nfe not in imported or t.score < imported[t.nfe].score)):
            imported[t.nfe] = t
    best_at = {t.nfe: t.id for t in storage.best_per_nfe(study, fidelity=st.reporting_fidelity)} if imported else {}
    # a trial moved off a lost evaluator before it began spent no attempt: it was not retried
    retried = [t for t in trials if t.attempts > 1 or ((t.error or "").startswith("re-queued")
                                                    and not t.error.startswith("re-queued: not started"))]
    again = {t.id for t in retried}
    troubled = sorted((t for t in trials if t.status == "failed" or t.id in again), key=lambda t: t.number)
    queued = sum(t.status == "queued" for t in trials)
    return {"study": study, "method": st.method, "seed": st.seed, "made_by": st.made_by, "searched": bool(job),
            "trials": len(trials), "driver": driver, "last_run": st.config.get("last_run"),
            "search_done": len(final), "search_budget": budget, "search_exhausted": exhausted is not None,
            "running": sum(t.status == "running" for t in trials), "queued": queued,
            "failed": sum(t.status == "failed" for t in trials), "retried": len(retried),
            "per_minute": per_minute, "eta_seconds": eta, "finished": left == 0 if job else queued == 0,
            "per_nfe": rows,
            "imported": [{"nfe": n, "heldout": t.score, "trial_id": t.id, "best_at_nfe": best_at.get(n) == t.id}
                         for n, t in sorted(imported.items())],
            "confirmed": sum(1 for t in trials if t.fidelity == CONFIRM and "confirms" in t.info),
            "workers": sorted({t.worker for t in trials if t.status == "running" and t.worker}),
            # the live run's own count at its last heartbeat (in-process, a trial is stored running and finished
            # in one write), else the evaluators of the trials stored running
            "busy_evaluators": driver["busy"] if driver and driver["alive"] and driver.get("busy") is not None
            else len({t.worker for t in trials if t.status == "running" and t.worker}),
            "evaluators": (st.config.get("evaluators") or {}).get("count"),
            "utilisation": st.config.get("utilisation"), "cost": study_cost(trials).as_dict(),
            "recent_errors": [{"number": t.number, "status": t.status, "attempts": t.attempts, "error": t.error}
                              for t in troubled[-5:]]}


def run_cmd(
    job_file: Annotated[Path, typer.Argument(help="The job file (TOML); see examples/.")],
    db: Annotated[str | None, typer.Option("--db", help="Database URL; overrides \\[storage] db.")] = None,
    ray_address: Annotated[str | None, typer.Option(
        "--ray-address", help="Join this Ray cluster ('auto' or host:port); implies the Ray backend.")] = None,
    backend: Annotated[str | None, typer.Option("--backend", help="local or ray; overrides \\[backend] kind.")]
    = None,
    json_: JsonOpt = False,
):
    """Run (or resume) a search job: every evaluation is stored as it finishes; Ctrl-C stops cleanly."""
    from steptune.cli.cost import load_cost
    from steptune.jobs import JobError, load_job
    from steptune.study_problem import CONVENTIONS, conventions_note

    if ray_address is not None and backend is not None and backend != "ray":
        raise CliError(f"--backend {backend} and --ray-address {ray_address}: an address is for the Ray backend; give "
                       "one of them")
    try:
        job = load_job(job_file)
        job = job.with_overrides(**{"storage.db": db, "backend.address": ray_address,
                                    "backend.kind": "ray" if ray_address else backend})
    except JobError as e:  # the file, or an override that does not validate
        raise CliError(str(e)) from None
    note = conventions_note(job.problem.name, {f"problem.{k}": getattr(job.problem, k) for k in CONVENTIONS})
    if note:
        err.print(note, markup=False, highlight=False)
    result = execute_job(job, json_, source=None if ray_address else str(job_file),  # the address is not the file's
                         db_from="--db" if db else None)
    cost = load_cost(job.storage.db, result.study)
    payload = {"study": result.study, "status": result.status, "evaluations": result.evaluations,
               "confirmations": result.confirmations, "failed": result.failed, "retried": result.retried,
               "seconds": result.seconds,
               "per_nfe": [{**vars(r), "improvement": r.improvement} for r in result.per_nfe],
               "utilisation": result.utilisation, "cost": cost, "baselines_unscored": result.baselines_queued,
               "baselines_finished": result.baselines_finished, "baselines_left": result.baselines_left,
               "search_exhausted": result.search_exhausted,
               "imports": result.imports}
    if json_:
        print(json.dumps(payload, indent=2))
    else:
        table = Table(title=f"study {result.study}: {result.evaluations} search evaluations, "
                            f"{result.confirmations} held-out confirmations, {result.status} "
                            f"in {duration(result.seconds)} (held-out RMSE)")
        refined = job.refine is not None
        for col in ("NFE", "best preset", "preset", "searched", "improvement", "found at eval",
                    *(("refined",) if refined else ())):
            table.add_column(col, justify="left" if col == "best preset" else "right")
        cost_table.add_columns(table)
        for r in result.per_nfe:
            table.add_row(cost_table.nfe_cell(r.nfe, r.interpolated_from), r.preset or "—", fmt(r.preset_score),
                          fmt(r.searched_score), "—" if r.improvement is None else f"{r.improvement:.2f}x",
                          str(r.found_at or "—"), *((fmt(r.refined),) if refined else ()),
                          *cost_table.cells(cost, r.nfe))
        out.print(table)
        cost_table.print_interpolated_note([(r.nfe, r.interpolated_from) for r in result.per_nfe])
        out.print(cost_table.line(cost), highlight=False)
        if result.utilisation:
            out.print(utilisation_text(result.utilisation))
        ev = job.evaluation
        print_overfit(result, ev.cheap_samples, f"evaluation.cheap_samples = {4 * ev.cheap_samples} in the job file"
                      + (" and train_samples at least as many" if 4 * ev.cheap_samples > ev.train_samples else ""))
        print_refine_hint(result, job.refine is not None)
        print_imports(result)
        print_stopped(result)
    if result.status == "interrupted":
        raise typer.Exit(130)


def utilisation_text(u: dict) -> str:
    """One line: how busy a run's search kept its evaluators."""
    frac = "—" if u.get("fraction") is None else f"{100 * u['fraction']:.0f}%"
    return (f"evaluators: {u['evaluators']} ({u.get('backend', '?')}), busy {frac} of the search's "
            f"{duration(u['seconds'])}, {fmt(u.get('per_second'), 3)} evaluations/s, batch {u.get('batch', '?')}")


def status_cmd(study: StudyOpt, db: DbOpt = None, json_: JsonOpt = False):
    """Progress of a study: evaluations done of its budget, rate and ETA, best per NFE, failures."""
    from steptune.storage import StorageError

    storage = _open_storage(db, must_exist=True, where="--db")
    try:
        st = storage.get_study(study)
        if st.kind == "relaxation":
            return print_sor_study(sor_study_summary(storage, st), json_)
        info = study_status(storage, study)
    except StorageError as e:
        raise CliError(str(e)) from None
    finally:
        storage.close()
    if json_:
        print(json.dumps(info, indent=2, default=str))
        return
    if not info["searched"]:
        return _print_unsearched(info)
    done, total = info["search_done"], info["search_budget"]
    pct = f" ({100 * done / total:.0f}%)" if total else ""
    counted = (f"{done} (more than its budget of {total}, lowered since)" if total and done > total
               else f"{done}/{total or '?'}{pct}")
    out.print(f"[bold]{escape(study)}[/]: {info['method']} seed {info['seed']}, {info['trials']:,} trials; search "
              f"{counted}; running {info['running']}, queued {info['queued']}; "
              f"{'rate ' + per_minute(info['per_minute']) + ', ' if info['driver'] and info['driver']['alive'] else ''}"
              f"{escape(_run_state(info))}", markup=True)
    if info["search_exhausted"]:
        out.print(f"the search tried every schedule its method can make at these NFEs after {done} evaluations: the "
                  "rest of the budget is not spent, and a rerun searches nothing new")
    table = Table(title="best per NFE (held-out where confirmed)")
    refined = any(r["refined"] is not None for r in info["per_nfe"])
    for col in ("NFE", "searched (held-out)", "searched (train)", *(("refined (held-out)",) if refined else ()),
                "best preset", "preset (held-out)"):
        table.add_column(col, justify="left" if col == "best preset" else "right")
    cost_table.add_columns(table)
    cost = info["cost"]
    for r in info["per_nfe"]:
        table.add_row(cost_table.nfe_cell(r["nfe"], r["interpolated_from"]), fmt(r["heldout"]), fmt(r["train"]),
                      *((fmt(r["refined"]),) if refined else ()), r["preset"] or "—", fmt(r["preset_score"]),
                      *cost_table.cells(cost, r["nfe"]))
    out.print(table)
    cost_table.print_interpolated_note([(r["nfe"], r["interpolated_from"]) for r in info["per_nfe"]])
    if info["imported"]:
        out.print("imported schedules, scored on the held-out bank: " + ", ".join(
            f"NFE {o['nfe']} {fmt(o['heldout'])} (trial id {o['trial_id']}"
            f"{', the best at that NFE' if o['best_at_nfe'] else ''})" for o in info["imported"]), highlight=False)
    out.print(cost_table.line(cost), highlight=False)
    busy = info["busy_evaluators"]
    out.print(f"evaluators busy now: {busy}" + (f" of {info['evaluators']}" if info["evaluators"] else ""))
    if info["utilisation"]:
        out.print("last run: " + utilisation_text(info["utilisation"]))
    out.print(f"failures: {info['failed']} failed trials, {info['retried']} retried after a lost worker")
    for e in info["recent_errors"]:
        out.print(f"  trial {e['number']} ({e['status']}, attempt {e['attempts']}): {e['error']}")


def _print_unsearched(info: dict) -> None:
    """Status of a study no search made (a sweep, an import, the Python API): its trials and its best per NFE."""
    n, q = info["trials"], info["queued"]
    queued = (f", {q} of them queued, which no run of this study scores ('steptune eval -s FILE' scores a schedule "
              "file; a search's study scores what is imported into it)") if q else ""
    made_by = escape(f"made by {info['made_by']}")
    out.print(f"[bold]{escape(info['study'])}[/]: {made_by}, {n} trial{'s' if n != 1 else ''}{escape(queued)}; no "
              "search runs on it", markup=True)
    table = Table(title="best per NFE (as 'steptune best' chooses)")
    for col in ("NFE", "score", "trial id", "schedule", "fidelity"):
        table.add_column(col, justify="left" if col in ("schedule", "fidelity") else "right")
    for r in info["per_nfe"]:
        table.add_row(str(r["nfe"]), fmt(r["best"]), str(r["trial_id"]), r["schedule"] or "—", r["fidelity"] or "—")
    out.print(table)
    out.print(cost_table.line(info["cost"]), highlight=False)
    out.print(f"failures: {info['failed']} failed trials")


def register(app: typer.Typer) -> None:
    app.command("run")(run_cmd)
    app.command("status")(status_cmd)
