"""What a study's results cost, per NFE, from its stored trials alone.

Every finished trial whose result was computed by steptune carries its ``seconds`` (the evaluation on its
evaluator's device) and, in its metrics, the ``model_calls`` it made (the sampler's model calls times the
samples) and the ``device`` it ran on. From these:

* **evaluations**: computed trials, each schedule counted once per bank and sample count (a second evaluation
  of the same is a *repeat*; a result carried in without being computed here, e.g. an imported export with its
  metrics, is *reused*: neither is an evaluation); a refinement by gradient (``info.refines``) is one evaluation,
  its seconds and model calls the whole fit's, even where it ends on its parent's schedule;
* **model calls**: the model calls of every computed trial (repeats included: they were paid for); a trial
  stored without the count (made by an older steptune) counts NFE × samples when complete, 0 when failed;
* **wall seconds**: the time during which at least one of the trials ran (the union of their dispatch-to-finish
  intervals), plus the own seconds of trials evaluated outside the evaluators (sweeps, diffusers' own loops);
* **device seconds**: the evaluations' own seconds summed, on the devices named.

A search's cost leaves out the preset baselines it stores for comparison (``info.baseline``); they are
totalled apart.

An NFE the study did not search but built from the searched ones (a job's ``[refine] interpolate``: a trial whose
``info.interpolated`` names the NFEs it was built between) is a row of its own, marked with those NFEs
(``interpolated_from``); its cost is its trials': scoring the interpolated schedule and refining it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import NamedTuple

from steptune.utilisation import _union_seconds as union_seconds

FINISHED = ("complete", "failed", "pruned")


@dataclass
class Cost:
    nfe: int | None  # None: all NFEs together
    evaluations: int = 0
    model_calls: int = 0
    wall_seconds: float = 0.0
    device_seconds: float = 0.0
    devices: list[str] = field(default_factory=list)  # "cpu", "cuda:0 (NVIDIA H200)"; "?" for trials without one
    repeats: int = 0
    reused: int = 0
    interpolated_from: list[int] | None = None  # an NFE not searched: the searched NFEs its schedule was built from

    @property
    def device(self) -> str:
        """The devices as one short text: "cpu", "cuda:0 (NVIDIA H200)", "cpu + cuda:0 (...)", or "—"."""
        return " + ".join(self.devices) or "—"

    def as_dict(self) -> dict:
        return {**asdict(self), "device": " + ".join(self.devices) or None}


@dataclass
class StudyCost:
    per_nfe: list[Cost]
    total: Cost  # the search (or sweep) over all its NFEs
    baselines: Cost  # the preset baselines a search stores beside its own trials

    def at(self, nfe: int) -> Cost | None:
        return next((c for c in self.per_nfe if c.nfe == nfe), None)

    def as_dict(self) -> dict:
        return {"per_nfe": [c.as_dict() for c in self.per_nfe], "total": self.total.as_dict(),
                "baselines": self.baselines.as_dict()}


class CostRow(NamedTuple):
    """What the cost reads of one trial (the dashboard selects exactly these columns)."""

    nfe: int
    status: str
    key: str
    bank: str
    n_samples: int | None
    seconds: float | None
    started: datetime | None
    finished: datetime | None
    baseline: bool
    model_calls: float | None  # as stored in the metrics (None: not stored)
    device: str | None
    interpolated: list | None = None  # an interpolated trial's ``info.interpolated.between`` (else None)
    refines: int | None = None  # a refinement's parent trial id (``info.refines``; else None)


def cost_row(t) -> CostRow:
    """The CostRow of a trial record (``TrialRecord``: ``metrics`` and ``info`` dicts)."""
    m, info = t.metrics or {}, t.info or {}
    calls = m.get("model_calls")
    return CostRow(t.nfe, t.status, t.key, t.bank, t.n_samples, t.seconds, t.started, t.finished,
                   bool(info.get("baseline")),
                   calls if isinstance(calls, (int, float)) and not isinstance(calls, bool) else None, m.get("device"),
                   (info.get("interpolated") or {}).get("between"), info.get("refines"))


def _interpolated_from(rows: list) -> list[int] | None:
    """The searched NFEs an interpolated NFE was built from (None for an NFE with no interpolated trial)."""
    between = next((t.interpolated for t in rows if t.interpolated), None)
    return None if between is None else sorted(int(n) for n in between)


def _cost(nfe: int | None, rows: list) -> Cost:
    """The cost of ``rows`` (CostRows of finished trials, in the order they were stored)."""
    c, seen, devices, spans = Cost(nfe), set(), set(), []
    for t in rows:
        if t.seconds is None:  # a result carried in (complete), or an evaluation lost with its worker
            c.reused += t.status == "complete"
            continue
        what = (t.key, t.bank, t.n_samples, t.refines)  # a refinement is a fit of its own, even back to its parent
        if what in seen:
            c.repeats += 1
        else:
            seen.add(what)
            c.evaluations += 1
        if t.model_calls is not None:
            c.model_calls += int(t.model_calls)
        elif t.status == "complete":  # stored without the count (an older steptune): the sampler's exact NFE
            c.model_calls += t.nfe * (t.n_samples or 0)
        c.device_seconds += t.seconds
        devices.add(t.device or "?")
        if t.started is not None and t.finished is not None:
            spans.append((t.started, t.finished))
        else:  # evaluated where no dispatch time is kept: its own time
            c.wall_seconds += t.seconds
    c.wall_seconds += union_seconds(spans)
    c.devices = sorted(devices - {"?"}) + (["?"] if "?" in devices else [])
    if nfe is not None:
        c.interpolated_from = _interpolated_from(rows)
    return c


def cost_of_rows(rows: Iterable) -> StudyCost:
    """The cost per NFE of a study's CostRows (or rows with the same fields), in the order they were stored."""
    own, baselines, by_nfe = [], [], {}
    for t in rows:
        if t.status not in FINISHED:
            continue
        if t.baseline:
            baselines.append(t)
        else:
            own.append(t)
            by_nfe.setdefault(t.nfe, []).append(t)
    return StudyCost([_cost(n, by_nfe[n]) for n in sorted(by_nfe)], _cost(None, own), _cost(None, baselines))


def study_cost(trials: Iterable) -> StudyCost:
    """The cost per NFE of a study's trial records, in the order they were stored."""
    return cost_of_rows(cost_row(t) for t in trials)


def seconds_text(seconds: float | None) -> str:
    """Seconds for a cost table: 0.42 s, 37 s, 12.5 min, 3.1 h."""
    if seconds is None:
        return "—"
    if seconds < 10:
        return f"{seconds:.2g} s"
    if seconds < 600:
        return f"{seconds:.0f} s"
    if seconds < 3 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def cost_at(store, trial, memo: dict | None = None) -> dict:
    """What ``trial``'s study in ``store`` spent at its NFE (``Cost.as_dict()`` and ``of``: the study's own trials,
    or its preset baselines when the trial is one), as an export's provenance carries it. An imported trial was not
    found by the study: its cost is the one its export named (``of``: ``source``), else its own evaluation here
    (``of``: ``trial``; nothing where it came with its scores). ``memo``: a dict kept across calls on an unchanging
    store (a report's exports), which then reads each study's NFE once."""
    imported = (trial.info or {}).get("imported")
    if imported is not None:
        if isinstance(imported.get("cost"), dict):
            return {**imported["cost"], "of": "source"}
        return {**_cost(trial.nfe, [cost_row(trial)]).as_dict(), "of": "trial"}
    baseline = bool((trial.info or {}).get("baseline"))
    memo = {} if memo is None else memo
    if (trial.study, trial.nfe) not in memo:
        memo[trial.study, trial.nfe] = [cost_row(t) for t in store.trials(trial.study, nfe=trial.nfe, schedules=False)]
    rows = memo[trial.study, trial.nfe]
    c = _cost(trial.nfe, [t for t in rows if t.baseline == baseline and t.status in FINISHED])
    return {**c.as_dict(), "of": "baselines" if baseline else "study"}
