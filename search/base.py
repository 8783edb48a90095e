"""The ask/tell Searcher interface, the trial log, and the multi-fidelity search driver.

A searcher proposes candidates (a Schedule plus the NFE it was made for) with ``ask(n)`` and learns
from ``tell(candidate, result)``. Its state is a function of its constructor arguments and the
sequence of results it was told, so :meth:`Searcher.replay` rebuilds it from a :class:`TrialLog`
(the same rows a database stores). :func:`run_search` ranks candidates on the cheap fidelity (the
first ``cheap_n`` states of the train bank), then confirms the best few per NFE on the held-out
bank; the reported result per NFE is always the held-out score.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
from steptune.space import Schedule
from steptune.space.noise import NoiseSchedule

from .space import DecisionSpace, schedule_key

CHEAP = "train"
CONFIRM = "heldout"
FAIL_SCORE = 1e3  # what a diverged or invalid run scores (rmse); finite so every model can learn from it


@dataclass
class Candidate:
    """A schedule a searcher wants evaluated, at the NFE it was made for. ``params`` holds the
    searcher's own parameterization (e.g. Optuna parameters) so a log can re-feed it."""

    schedule: Schedule
    nfe: int
    origin: str = ""
    params: dict = field(default_factory=dict)

    @cached_property
    def key(self) -> str:
        return schedule_key(self.schedule)


@dataclass
class TrialRecord:
    """One evaluation, shaped like a database row."""

    number: int
    nfe: int
    schedule: dict
    bank: str
    n_samples: int
    metrics: dict
    status: str
    error: str | None = None
    seconds: float = 0.0
    origin: str = ""
    batch: int = -1
    params: dict = field(default_factory=dict)

    def score(self, metric: str = "rmse") -> float:
        v = self.metrics.get(metric)
        if self.status != "complete" or v is None or not math.isfinite(v):
            return FAIL_SCORE
        return min(float(v), FAIL_SCORE)

    @cached_property
    def key(self) -> str:
        return schedule_key(Schedule.from_dict(self.schedule))

    def to_dict(self) -> dict:
        return asdict(self)


class TrialLog:
    """An append-only list of trial records; optionally mirrored to a JSON-lines file."""

    def __init__(self, records: Sequence[TrialRecord] = (), path: str | Path | None = None):
        self.records: list[TrialRecord] = list(records)
        self.path = None if path is None else Path(path)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self):
        return iter(self.records)

    def append(self, rec: TrialRecord) -> TrialRecord:
        self.records.append(rec)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps(rec.to_dict(), default=_json_default) + "\n")
        return rec

    def next_number(self) -> int:
        return len(self.records)

    def bank(self, bank: str) -> list[TrialRecord]:
        return [r for r in self.records if r.bank == bank]

    @classmethod
    def load(cls, path: str | Path) -> TrialLog:
        path = Path(path)
        records = []
        if path.is_file():
            for line in path.read_text().splitlines():
                if line.strip():
                    records.append(TrialRecord(**json.loads(line)))
        return cls(records, path)


def _json_default(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return float(x)


class Searcher:
    """Base class of every search method (ask/tell).

    ``noise``, ``t_start`` and ``t_end``: the problem's noise schedule and time interval;
    ``nfes``: the NFE budgets to search; ``seed``; ``metric``: what to minimise (train-bank
    ``rmse`` by default); further options go to :class:`DecisionSpace` via ``space_opts``.
    Subclasses implement ``_ask(n, rng)`` and may extend ``_observe``.
    """

    name = "base"
    batch_per_nfe = 2  # run_search asks this many candidates per NFE at a time unless told otherwise

    def __init__(self, noise: NoiseSchedule, t_start: float, t_end: float, nfes: Sequence[int], seed: int = 0,
                 metric: str = "rmse", space_opts: dict | None = None):
        self.noise = noise
        self.t_start, self.t_end = float(t_start), float(t_end)
        self.nfes = sorted({int(n) for n in nfes})
        self.seed = int(seed)
        self.metric = metric
        self.space = DecisionSpace(noise, t_start, t_end, **(space_opts or {}))
        self.trials: list[tuple[Candidate, float]] = []  # every told (candidate, score), in order
        self.seen: set[str] = set()
        self.n_asked = 0
        self.replay_mismatches = 0

    # ---- interface ------------------------------------------------------------------------------

    def ask(self, n: int = 1) -> list[Candidate]:
        """``n`` new candidates (each validated, at its exact NFE). The random stream is derived from
        the seed and the number of results told so far, so the same history gives the same answer."""
        rng = np.random.default_rng([self.seed, len(self.trials), self.n_asked])
        self.n_asked += 1
        out = self._ask(n, rng)
        for c in out:
            c.schedule.validate(nfe=c.nfe)
            self.seen.add(c.key)
        return out

    def tell(self, candidate: Candidate, result) -> float:
        """Record the result (an EvalResult, a TrialRecord or a plain score) of a candidate."""
        score = _score(result, self.metric)
        self.trials.append((candidate, score))
        self.seen.add(candidate.key)
        self._observe(candidate, score)
        return score

    def replay(self, log: TrialLog) -> None:
        """Rebuild the state from a log's cheap-fidelity rows: re-ask each batch and tell the logged
        results. A row that differs from what this searcher would ask (another method or seed wrote
        it) is told as it is."""
        rows = log.bank(CHEAP)
        i = 0
        while i < len(rows):
            j = i
            while j < len(rows) and rows[j].batch == rows[i].batch:
                j += 1
            batch = rows[i:j]
            cands = self.ask(len(batch)) if batch[0].batch >= 0 else []
            by_key = {c.key: c for c in cands}
            for rec in batch:
                c = by_key.get(rec.key)
                if c is None:
                    self.replay_mismatches += 1
                    c = Candidate(Schedule.from_dict(rec.schedule), rec.nfe, rec.origin, dict(rec.params))
                self.tell(c, rec)
            i = j

    # ---- helpers for subclasses -----------------------------------------------------------------

    def _ask(self, n: int, rng: np.random.Generator) -> list[Candidate]:
        raise NotImplementedError

    def _observe(self, candidate: Candidate, score: float) -> None:
        pass

    def best(self, nfe: int, k: int = 1) -> list[tuple[Candidate, float]]:
        rows = [(c, s) for c, s in self.trials if c.nfe == nfe]
        rows.sort(key=lambda cs: cs[1])
        return rows[:k]

    def state(self) -> dict:
        return {"method": self.name, "seed": self.seed, "told": len(self.trials)}


def _score(result, metric: str) -> float:
    if isinstance(result, (int, float)):
        return min(float(result), FAIL_SCORE) if math.isfinite(result) else FAIL_SCORE
    if isinstance(result, TrialRecord):
        return result.score(metric)
    v = result.metrics.get(metric)
    if result.status != "complete" or v is None or not math.isfinite(v):
        return FAIL_SCORE
    return min(float(v), FAIL_SCORE)


# ---- the driver -----------------------------------------------------------------------------------

@dataclass
class NfeResult:
    nfe: int
    schedule: dict
    heldout: dict  # held-out metrics of the chosen schedule
    train_score: float  # its cheap-fidelity score
    trial: int  # number of its cheap-fidelity trial
    found_at: int  # cheap evaluations done when it was found


@dataclass
class SearchResult:
    method: str
    seed: int
    n_evals: int  # cheap-fidelity (train) evaluations
    n_confirm: int  # held-out confirmations
    seconds: float
    best: dict[int, NfeResult]
    log: TrialLog

    def to_dict(self) -> dict:
        return {"method": self.method, "seed": self.seed, "n_evals": self.n_evals, "n_confirm": self.n_confirm,
                "seconds": self.seconds, "best": {str(k): asdict(v) for k, v in sorted(self.best.items())}}


def evaluate_record(evaluator, cand: Candidate, bank: str, n: int | None, number: int, batch: int) -> TrialRecord:
    from steptune.space import ScheduleError

    try:
        res = evaluator.evaluate(cand.schedule, bank=bank, n=n)
        metrics, status, error, seconds, n_used = res.metrics, res.status, res.error, res.seconds, res.n
    except ScheduleError as e:  # does not fit the problem: a failed trial, not a crash
        metrics, status, error, seconds, n_used = {}, "failed", str(e), 0.0, n or 0
    return TrialRecord(number=number, nfe=cand.nfe, schedule=cand.schedule.to_dict(), bank=bank, n_samples=n_used,
                       metrics={k: float(v) for k, v in metrics.items()}, status=status, error=error,
                       seconds=float(seconds), origin=cand.origin, batch=batch, params=dict(cand.params))


def run_search(searcher: Searcher, evaluator, budget: int, time_budget: float | None = None,
               progress: Callable[[dict], None] | None = None, log: TrialLog | None = None, cheap_n: int = 64,
               confirm_k: int = 3, confirm_n: int | None = None, batch: int | None = None) -> SearchResult:
    """Search until ``budget`` cheap evaluations (in total, over all NFEs) or ``time_budget`` seconds.

    Candidates are scored on the first ``cheap_n`` states of the train bank; at the end, the
    ``confirm_k`` best per NFE are evaluated on the held-out bank (``confirm_n`` states; all by
    default) and the best of them by held-out score is the result for that NFE. Rows already in
    ``log`` are replayed into the searcher first (resume); held-out rows in the log are reused.
    ``progress`` gets a dict per evaluation (``done``, ``budget``, ``best`` per NFE, ``phase``).
    """
    log = log if log is not None else TrialLog()
    batch = batch or max(4, searcher.batch_per_nfe * len(searcher.nfes))
    start = time.perf_counter()
    if log.bank(CHEAP) and not searcher.trials:
        searcher.replay(log)
    cheap = log.bank(CHEAP)
    done = len(cheap)
    best: dict[int, float] = {}
    for r in cheap:
        best[r.nfe] = min(best.get(r.nfe, math.inf), r.score(searcher.metric))
    next_batch = max((r.batch for r in cheap), default=-1) + 1
    while done < budget:
        if time_budget is not None and time.perf_counter() - start > time_budget:
            break
        cands = searcher.ask(min(batch, budget - done))
        if not cands:
            break
        for c in cands:
            rec = log.append(evaluate_record(evaluator, c, CHEAP, cheap_n, log.next_number(), next_batch))
            s = searcher.tell(c, rec)
            best[c.nfe] = min(best.get(c.nfe, math.inf), s)
            done += 1
            if progress is not None:
                progress({"phase": "search", "done": done, "budget": budget, "best": dict(best)})
        next_batch += 1
    # confirmation on the held-out bank
    confirmed = {r.key: r for r in log.bank(CONFIRM) if r.n_samples == (confirm_n or evaluator.sizes[CONFIRM])}
    cheap = log.bank(CHEAP)
    results: dict[int, NfeResult] = {}
    n_confirm = 0
    for nfe in searcher.nfes:
        rows = sorted((r for r in cheap if r.nfe == nfe and r.status == "complete"),
                      key=lambda r: (r.score(searcher.metric), r.number))
        picked, keys = [], set()
        for r in rows:
            if r.key not in keys:
                picked.append(r)
                keys.add(r.key)
            if len(picked) >= confirm_k:
                break
        for r in picked:
            if r.key not in confirmed:
                cand = Candidate(Schedule.from_dict(r.schedule), nfe, r.origin)
                confirmed[r.key] = log.append(evaluate_record(evaluator, cand, CONFIRM, confirm_n,
                                                              log.next_number(), -1))
                n_confirm += 1
            h = confirmed[r.key]
            hs = h.score(searcher.metric)
            if nfe not in results or hs < results[nfe].heldout.get(searcher.metric, math.inf):
                pos = next(i for i, x in enumerate(cheap) if x.number == r.number)
                results[nfe] = NfeResult(nfe, r.schedule, dict(h.metrics) if h.status == "complete"
                                         else {searcher.metric: FAIL_SCORE}, r.score(searcher.metric),
                                         r.number, pos + 1)
            if progress is not None:
                progress({"phase": "confirm", "done": done, "budget": budget, "best": dict(best)})
    return SearchResult(searcher.name, searcher.seed, done, n_confirm, time.perf_counter() - start, results, log)


def pareto_front(points: Sequence[tuple[int, float]]) -> list[int]:
    """Indices of the (NFE, score) points no other point beats in both (lower is better)."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], math.inf
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front
