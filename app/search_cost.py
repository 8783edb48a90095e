"""What a study's results cost, per NFE, from its stored trials alone.

Every finished trial whose result was computed by steptune carries its ``seconds`` (the evaluation on its
evaluator's device) and, in its metrics, the ``model_calls`` it made (the sampler's model calls times the
samples) and the ``device`` it ran on. From these:

* **evaluations**: computed trials, each schedule counted once per bank and sample count (a second evaluation
  of the same is a *repeat*; a result carried in without being computed here, e.g. an imported export with its
  metrics, is *reused*: neither is an evaluation);
* **model calls**: the model calls of every computed trial (repeats included: they were paid for); a trial
  stored without the count (made by an older steptune) counts NFE × samples when complete, 0 when failed;
* **wall seconds**: the time during which at least one of the trials ran (the union of their dispatch-to-finish
  intervals), plus the own seconds of trials evaluated outside the evaluators (sweeps, diffusers' own loops);
* **device seconds**: the evaluations' own seconds summed, on the devices named.

A search's cost leaves out the preset baselines it stores for comparison (``info.baseline``); they are
totalled apart.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

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

    @property
    def device(self) -> str:
        """The devices as one short text: "cpu", "cuda:0 (NVIDIA H200)", "cpu + cuda:0 (...)", or "—"."""
        return " + ".join(self.devices) or "—"

    def as_dict(self) -> dict:
        return {**asdict(self), "device": self.device}


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


def _model_calls(t) -> int:
    calls = (t.metrics or {}).get("model_calls")
    if isinstance(calls, (int, float)) and not isinstance(calls, bool):
        return int(calls)
    return t.nfe * (t.n_samples or 0) if t.status == "complete" else 0


def _cost(nfe: int | None, trials: list) -> Cost:
    """The cost of ``trials`` (finished ones, in the order they were stored)."""
    c, seen, devices, spans = Cost(nfe), set(), set(), []
    for t in trials:
        if t.seconds is None:  # a result carried in (complete), or an evaluation lost with its worker
            c.reused += t.status == "complete"
            continue
        what = (t.key, t.bank, t.n_samples)
        if what in seen:
            c.repeats += 1
        else:
            seen.add(what)
            c.evaluations += 1
        c.model_calls += _model_calls(t)
        c.device_seconds += t.seconds
        devices.add((t.metrics or {}).get("device") or "?")
        if t.started is not None and t.finished is not None:
            spans.append((t.started, t.finished))
        else:  # evaluated where no dispatch time is kept: its own time
            c.wall_seconds += t.seconds
    c.wall_seconds += union_seconds(spans)
    c.devices = sorted(devices - {"?"}) + (["?"] if "?" in devices else [])
    return c


def study_cost(trials: Iterable) -> StudyCost:
    """The cost per NFE of a study's ``trials`` (records with ``nfe``, ``status``, ``key``, ``bank``, ``n_samples``,
    ``metrics``, ``seconds``, ``started``, ``finished`` and ``info``), in the order they were stored."""
    done = [t for t in trials if t.status in FINISHED]
    own = [t for t in done if not (t.info or {}).get("baseline")]
    nfes = sorted({t.nfe for t in own})
    return StudyCost([_cost(n, [t for t in own if t.nfe == n]) for n in nfes], _cost(None, own),
                     _cost(None, [t for t in done if (t.info or {}).get("baseline")]))


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


def cost_at(store, trial) -> dict:
    """What ``trial``'s study in ``store`` spent at its NFE (``Cost.as_dict()`` and ``of``: the study's own trials,
    or its preset baselines when the trial is one), as an export's provenance carries it."""
    baseline = bool((trial.info or {}).get("baseline"))
    rows = [t for t in store.trials(trial.study, nfe=trial.nfe) if bool((t.info or {}).get("baseline")) == baseline]
    c = _cost(trial.nfe, [t for t in rows if t.status in FINISHED])
    return {**c.as_dict(), "of": "baselines" if baseline else "study"}
