"""A stored schedule step by step: its times on the lambda (log-SNR) axis, each step's decisions, and
the preset it most resembles."""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from steptune.grids import is_image_identity
from steptune.space import Schedule, ScheduleError, presets
from steptune.space import noise as noise_mod
from steptune.storage import Storage, StorageError

from .grid_view import grid_url
from .queries import NotFound

# presets compared against (specs; options make variants of one preset family)
COMPARED_PRESETS = ("ddim", "dpm-solver-2", "dpm-solver-3", "dpm-solver++-2s", "dpm-solver++-2m",
                    "dpm-solver++-3m", "unipc-bh1", "unipc-bh2", "unipc-bh2:order=3", "deis", "deis-tab", "heun",
                    "euler")


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _lambdas(ns, times: list[float]) -> list[float | None]:
    lam = ns.lam(torch.tensor(times, dtype=torch.float64)).tolist()
    return [_finite(v) for v in lam]


def _log_sigmas(ns, times: list[float]) -> list[float | None]:
    sig = ns.edm_sigma(torch.tensor(times, dtype=torch.float64)).tolist()
    return [_finite(math.log(v)) if v > 0 else None for v in sig]


def _relaxation(kind: str, coef: float) -> str:
    """A relaxation as its factor reads: the kind, and the coefficient of its 1 + coef h where there is one."""
    return kind if coef == 0 else f"{kind}, coef {coef:.4g}"


def _corrector(step) -> str:
    if step.corrector is None:
        return "none"
    c = step.corrector
    relax = _relaxation(c.relaxation, c.relaxation_coef)
    return f"{c.kind}" + (f" (order {c.order})" if c.order else "") + ("" if relax == "none" else f", {relax}")


def step_rows(schedule: Schedule, lambdas: list[float | None] | None) -> list[dict]:
    times = schedule.times
    rows = []
    for i, st in enumerate(schedule.steps):
        rows.append({"step": i, "t_from": times[i], "t_to": st.t,
                     "lambda_from": lambdas[i] if lambdas else None, "lambda_to": lambdas[i + 1] if lambdas else None,
                     "order": st.order, "prediction": st.prediction, "corrector": _corrector(st),
                     "dc_ratio": st.dc_ratio, "relaxation": _relaxation(st.relaxation, st.relaxation_coef),
                     "basis": st.basis,
                     "points": list(st.derivative_points())})
    return rows


def _decision(step) -> tuple:
    return (step.order, step.prediction, None if step.corrector is None else step.corrector.kind)


def resemblance(schedule: Schedule, other: Schedule, ns) -> float:
    """0 for the same schedule; grows with the share of steps whose (order, prediction, corrector) differ
    and with the mean distance of the times in lambda (relative to the lambda span). A different number
    of steps counts as every step differing."""
    if len(other.steps) != len(schedule.steps) or other.afs != schedule.afs:
        return 2.0 + abs(len(other.steps) - len(schedule.steps))
    differ = sum(_decision(a) != _decision(b) for a, b in zip(schedule.steps, other.steps)) / len(schedule.steps)
    la, lb = _lambdas(ns, schedule.times), _lambdas(ns, other.times)
    pairs = [(a, b) for a, b in zip(la, lb) if a is not None and b is not None]
    finite = [v for v in la if v is not None]
    span = (max(finite) - min(finite)) if len(finite) > 1 else 1.0
    gap = sum(abs(a - b) for a, b in pairs) / max(len(pairs), 1) / max(span, 1e-9)
    return differ + gap


@lru_cache(maxsize=1024)
def _preset(spec: str, nfe: int, ns, t_start: float, t_end: float) -> Schedule | None:
    """The preset's schedule (None where it has none there), built once for the many schedules a report shows."""
    try:
        return presets.build(spec, nfe, ns, t_start=t_start, t_end=t_end)
    except (ScheduleError, ValueError, TypeError):
        return None


def nearest_presets(schedule: Schedule, ns, t_end: float, k: int = 3) -> list[dict]:
    """The ``k`` presets at the same NFE on the same noise schedule that ``schedule`` resembles most."""
    scored = []
    for spec in COMPARED_PRESETS:
        other = _preset(spec, schedule.nfe, ns, schedule.t_start, t_end)
        if other is None or other.nfe != schedule.nfe:
            continue
        scored.append((resemblance(schedule, other, ns), spec, other))
    scored.sort(key=lambda x: x[0])
    return [{"preset": spec, "distance": d, "times": other.times, "lambdas": _lambdas(ns, other.times),
             "steps": step_rows(other, None)} for d, spec, other in scored[:k]]


def schedule_view(store: Storage, trial_id: int) -> dict:
    try:
        t = store.trial(trial_id)
    except StorageError:
        raise NotFound(f"no trial with id {trial_id}") from None
    study = store.get_study(t.study)
    sched = t.to_schedule()
    ns = noise_mod.from_dict(sched.noise) if sched.noise else None
    identity = (study.problem or {}).get("identity") or {}
    t_end = identity.get("t_end")
    if t_end is None:
        nonzero = [x for x in sched.times if x > 0]
        t_end = min(nonzero) if nonzero else 0.0
    lambdas = _lambdas(ns, sched.times) if ns else None
    return {"trial": t.id, "study": t.study, "method": study.method, "number": t.number, "nfe": t.nfe,
            "score": t.score, "metric": study.metric, "metrics": t.metrics, "status": t.status,
            "fidelity": t.fidelity, "bank": t.bank, "n_samples": t.n_samples, "name": sched.name,
            "problem": (study.problem or {}).get("name"), "noise": (sched.noise or {}).get("kind"),
            "afs": sched.afs, "times": sched.times, "lambdas": lambdas,
            "log_sigmas": _log_sigmas(ns, sched.times) if ns else None, "steps": step_rows(sched, lambdas),
            "nearest": nearest_presets(sched, ns, float(t_end)) if ns else [], "schedule": t.schedule,
            "grid": grid_url(t.id) if is_image_identity(identity) else None}
