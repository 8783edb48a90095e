"""Re-timing: a schedule's per-step decisions carried onto another time grid, and schedules for NFEs no search ran.

The rule (``retime``): every step of the new grid takes the decisions (prediction type, order, start and derivative
points, relaxation, second-derivative scale, basis, corrector, DC ratio) of the schedule's step whose end lies
nearest in *relative lambda position*: r = (lambda - lambda_first) / (lambda_last - lambda_first) over each grid's
own nodes, so a grid over a shorter interval (an img2img start below sigma_max) still runs the schedule's early,
middle and late decisions in order. The decisions are then clipped so that every step stays valid: start and
points that reach before the history are dropped and the order lowered to what the remaining points support, the
relaxation and second-derivative scale go with the order they scale, a corrector is dropped on the last step and its
order clipped to its points, a DC ratio needs three outputs, a step to sigma = 0 is first order without corrector,
and a grid that starts where alpha = 0 keeps that point out of every derivative. The analytical first step is kept
only when the run starts from pure noise at the schedule's own t_start. The result is validated.

``interpolate`` builds a schedule for an NFE between searched ones: the times are interpolated in relative lambda
position between the neighbouring searched NFEs (each neighbour's positions as a function of the step fraction k/n,
weighted by the NFE's distance), and the decisions come from the nearest searched NFE by ``retime``. Its
``method="split"`` instead grows the searched schedule below by splitting its widest lambda intervals, which keeps
the tuned times and reaches every step count (bench/integrations.py compares the methods). ``method="pad"`` adds
short steps at the end of the searched schedule below (each ``PAD`` of the last lambda interval): it runs as that
schedule does, one model call more for each, so it scores about what the NFE below scores, where splitting or
blending a well-tuned multistep schedule can lose most of its tuning.

lambda = log(alpha/sigma) is infinite where sigma = 0 (t = 0) or alpha = 0 (rectified flow at t = 1); positions
are taken with lambda clipped one unit beyond the largest finite |lambda| of the grids, so such ends sit at 0 or 1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np
import torch

from . import noise as noise_mod
from .errors import ScheduleError
from .noise import NoiseSchedule
from .schedule import MAX_ORDER, Schedule, Step


def schedule_noise(schedule: Schedule) -> NoiseSchedule:
    if not schedule.noise:
        raise ScheduleError("schedule: it names no noise schedule, so its times have no lambda; rebuild it with its "
                            "noise schedule")
    return noise_mod.from_dict(schedule.noise)


def _lambdas(noise: NoiseSchedule, times: Sequence[float]) -> np.ndarray:
    return noise.lam(torch.tensor([float(t) for t in times], dtype=torch.float64)).numpy()


def _bound(*grids: np.ndarray) -> float:
    finite = np.concatenate([g[np.isfinite(g)] for g in grids])
    return float(np.abs(finite).max()) + 1.0 if finite.size else 1.0


def positions(noise: NoiseSchedule, times: Sequence[float], bound: float | None = None) -> list[float]:
    """The relative lambda position of every time of a descending grid: 0 at its first time, 1 at its last."""
    lam = _lambdas(noise, times)
    b = _bound(lam) if bound is None else bound
    lam = np.clip(lam, -b, b)
    span = lam[-1] - lam[0]
    if not span > 0:
        raise ScheduleError("times: the grid must decrease strictly (lambda increasing) from its first to its last "
                            "time")
    return ((lam - lam[0]) / span).tolist()


def _check_grid(times: Sequence[float]) -> list[float]:
    out = [float(t) for t in times]
    if len(out) < 2:
        raise ScheduleError(f"times: a grid needs at least 2 times (one step), got {len(out)}")
    for i, (a, b) in enumerate(zip(out, out[1:])):
        if not (math.isfinite(b) and b < a):
            raise ScheduleError(f"times: entry {i + 1} ({b:g}) is not below entry {i} ({a:g}); times must decrease "
                                "strictly")
    if out[-1] < 0:
        raise ScheduleError(f"times: the last time {out[-1]:g} is negative")
    return out


def _fit(step: Step, k: int, n: int, t_new: float, pure_noise_start: bool) -> Step:
    """``step`` as step ``k`` of ``n``: clipped to the history that exists there (see the module's rule)."""
    hist = k + 1
    lowest = -hist + 1 if pure_noise_start else -hist  # the grid's first point is no derivative point where alpha = 0
    start = max(step.start, -hist)
    if pure_noise_start and start == -hist:
        return Step(t=t_new, prediction="data", order=1, start=start, basis=step.basis)
    if step.points is None:  # the default points follow the start; a start clipped forward keeps a prefix of them
        wanted = [start - j for j in range(1, step.order)]
    else:
        wanted = list(step.points)
    pts = [p for p in wanted if lowest <= p <= -1 and p != start]
    order = 1 if t_new == 0.0 else min(step.order, len(pts) + 1)
    last = k == n - 1
    points = tuple(pts) if step.points is not None and order > 1 else None
    n_points = len(points) if points is not None else order - 1
    first_points = step.first_points if order > 1 and step.first_points is not None and \
        step.first_points <= n_points else None
    corrector = step.corrector
    if corrector is not None and (last or t_new == 0.0):
        corrector = None
    if corrector is not None:
        top = min(MAX_ORDER, n_points + 2)
        corder = order + 1 if corrector.order is None else min(corrector.order, top)
        if corder < 2 or corder > top:
            corrector = None
        elif corrector.order is not None:
            corrector = replace(corrector, order=corder)
    keep_relax = order > 1
    return replace(step, t=t_new, order=order, start=start, points=points if order > 1 else None,
                   first_points=first_points,
                   relaxation=step.relaxation if keep_relax else "none",
                   relaxation_coef=step.relaxation_coef if keep_relax else 0.0,
                   second_scale=step.second_scale if order >= 3 else 1.0,
                   corrector=corrector, dc_ratio=step.dc_ratio if hist >= 3 else 1.0)


ANCHORS = ("relative", "absolute")


def retime(schedule: Schedule, times: Sequence[float], *, from_noise: bool = True,
           anchor: str = "relative") -> Schedule:
    """``schedule``'s decisions on the grid ``times`` (descending; ``len(times) - 1`` steps) by the module's rule.

    ``from_noise``: the run starts from pure noise (not from a partly noised image); the analytical first step is
    kept only then, and only when ``times[0]`` is the schedule's own t_start. ``anchor="absolute"`` measures the new
    grid's positions on the schedule's own lambda interval instead of its own (a grid over the schedule's last half
    then takes the decisions of its last half); the rule is ``relative``, which measured better for img2img
    (bench/integrations.py)."""
    if anchor not in ANCHORS:
        raise ScheduleError(f"anchor {anchor!r} is unknown; use one of {', '.join(ANCHORS)}")
    schedule.validate()
    ns = schedule_noise(schedule)
    new = _check_grid(times)
    old_lam, new_lam = _lambdas(ns, schedule.times), _lambdas(ns, new)
    bound = _bound(old_lam, new_lam)
    old_r = positions(ns, schedule.times, bound)[1:]
    if anchor == "relative":
        new_r = positions(ns, new, bound)[1:]
    else:
        lo, hi = np.clip(old_lam[[0, -1]], -bound, bound)
        new_r = ((np.clip(new_lam, -bound, bound) - lo) / (hi - lo)).tolist()[1:]
    pure_noise_start = float(ns.alpha(new[0])) == 0.0
    n = len(new) - 1
    steps = []
    for k, r in enumerate(new_r):
        i = min(range(len(old_r)), key=lambda j: (abs(old_r[j] - r), j))
        steps.append(_fit(schedule.steps[i], k, n, new[k + 1], pure_noise_start))
    own_start = math.isclose(new[0], schedule.t_start, rel_tol=1e-9, abs_tol=1e-12)
    afs = schedule.afs if from_noise and own_start else "none"
    meta = {**schedule.meta, "retimed": {"from_key": schedule.key(), "from_nfe": schedule.nfe}}
    out = Schedule(t_start=new[0], steps=tuple(steps), noise=schedule.noise, afs=afs, name=schedule.name,
                   conventions=schedule.conventions, meta=meta)
    return out.validate()


def _profile(ns: NoiseSchedule, schedule: Schedule, u: np.ndarray, bound: float) -> np.ndarray:
    r = np.asarray(positions(ns, schedule.times, bound))
    return np.interp(u, np.linspace(0.0, 1.0, len(r)), r)


METHODS = ("split", "blend", "pad")
PAD = 0.05  # share of the last lambda interval a padded step takes (the smaller, the closer to the schedule below)


def interpolate(schedules_by_nfe: Mapping[int, Schedule], nfe: int, *, method: str = "auto",
                decisions_from: int | None = None) -> Schedule:
    """A schedule at ``nfe`` from searched schedules at other NFEs; a searched NFE is returned as it is. The result
    costs exactly ``nfe`` model calls, or ScheduleError says why it cannot.

    ``method="auto"`` (the default) is ``split`` up to the largest searched NFE and ``blend`` above it: splitting
    never shortens the schedule's last step, which then bounds its error however many steps are added, where the
    blend spreads every step over the schedule's own relative lambda profile (``bench/extrapolate.py``).
    ``method="split"`` keeps the nearest searched NFE below (above, when there is none) whole and
    splits its widest lambda interval in two (merges its narrowest pair of intervals) until the NFE is reached, the
    new step taking its neighbour's decisions by ``retime``; it reaches every step count. ``method="blend"`` blends
    the times between the neighbours in relative lambda position and takes the decisions from the nearest (or
    ``decisions_from``). ``method="pad"`` adds short steps at the end of the nearest searched NFE below (see the
    module's docstring)."""
    if not schedules_by_nfe:
        raise ScheduleError("interpolate: no searched schedules to build from")
    if method not in ("auto", *METHODS):
        raise ScheduleError(f"interpolate: method {method!r} is unknown; use one of auto, {', '.join(METHODS)}")
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
        raise ScheduleError(f"interpolate: NFE {nfe!r} is not a number of model calls; give a whole number, 1 or more")
    if nfe in schedules_by_nfe:
        return schedules_by_nfe[nfe]
    searched = sorted(schedules_by_nfe)
    if method == "auto":
        if nfe < searched[-1]:
            return interpolate(schedules_by_nfe, nfe, method="split")
        try:
            return interpolate(schedules_by_nfe, nfe, method="blend", decisions_from=decisions_from)
        except ScheduleError:  # no grid of the blend costs exactly nfe: the split reaches every step count
            return interpolate(schedules_by_nfe, nfe, method="split")
    noises = {repr(sorted(schedules_by_nfe[k].noise.items())) for k in searched}
    if len(noises) > 1:
        raise ScheduleError("interpolate: the searched schedules live on different noise schedules; interpolate "
                            "within one model's study")
    if method == "split":
        return _split(schedules_by_nfe, nfe, searched)
    if method == "pad":
        return _pad(schedules_by_nfe, nfe, searched)
    lo, hi = nearest(searched, nfe)
    near = min((k for k in (lo, hi) if k is not None), key=lambda k: (abs(k - nfe), -k)) \
        if decisions_from is None else decisions_from
    src = schedules_by_nfe[near]
    ns = schedule_noise(src)
    ends = [schedules_by_nfe[k] for k in (lo, hi) if k is not None]
    bound = _bound(*(_lambdas(ns, s.times) for s in ends))
    w = 1.0 if lo is None or hi is None else (nfe - lo) / (hi - lo)

    def grid(n: int) -> list[float]:
        u = np.linspace(0.0, 1.0, n + 1)
        profiles = [_profile(ns, s, u, bound) for s in ends]
        r = profiles[0] if len(profiles) == 1 else (1.0 - w) * profiles[0] + w * profiles[1]
        lam = np.clip(_lambdas(ns, [src.t_start, src.times[-1]]), -bound, bound)
        ts = ns.t_of_lambda(torch.tensor(lam[0] + r * (lam[1] - lam[0]), dtype=torch.float64)).tolist()
        ts[0], ts[-1] = src.t_start, src.times[-1]
        return ts

    first = len(src.steps) + (nfe - src.nfe)
    tried = []
    for n in sorted(range(max(1, first - 3), first + 4), key=lambda m: (abs(m - first), m)):
        sched = retime(src, grid(n), from_noise=True)
        tried.append(sched.nfe)
        if sched.nfe == nfe:
            return _labelled(sched, src, nfe, "blend", [k for k in (lo, hi) if k is not None], near, weight=w)
    raise ScheduleError(f"interpolate: no grid gives NFE {nfe} with the decisions of NFE {near} "
                        f"(step counts near {first} cost {sorted(set(tried))}); search that NFE")


def _labelled(sched: Schedule, src: Schedule, nfe: int, method: str, between: list[int], near: int,
              **extra) -> Schedule:
    meta = {**src.meta, "interpolated": {"nfe": nfe, "method": method, "between": between, "decisions_from": near,
                                         **extra}}
    meta.pop("retimed", None)
    return replace(sched, name=f"{src.name or 'schedule'}@{nfe}", meta=meta).validate(nfe)


def nearest(searched: Sequence[int], nfe: int) -> tuple[int | None, int | None]:
    """The searched NFEs nearest ``nfe`` below and above it (None where there is none)."""
    return (max((k for k in searched if k < nfe), default=None), min((k for k in searched if k > nfe), default=None))


def _split(schedules_by_nfe: Mapping[int, Schedule], nfe: int, searched: list[int]) -> Schedule:
    lo, hi = nearest(searched, nfe)
    base = lo if lo is not None else hi
    src = s = schedules_by_nfe[base]
    ns = schedule_noise(src)
    while s.nfe != nfe:
        s = _grow(s, ns) if s.nfe < nfe else _shrink(s, ns, nfe)
        if s is None:
            raise ScheduleError(f"interpolate: the NFE-{base} schedule cannot be split or merged to NFE {nfe}; "
                                "search that NFE")
    return _labelled(s, src, nfe, "split", [base], base)


def _pad(schedules_by_nfe: Mapping[int, Schedule], nfe: int, searched: list[int]) -> Schedule:
    base, _ = nearest(searched, nfe)
    if base is None:
        raise ScheduleError(f"interpolate: padding builds on a searched NFE below {nfe}, and there is none")
    src = s = schedules_by_nfe[base]
    ns = schedule_noise(src)
    while s is not None and s.nfe < nfe:
        s = _pad_end(s, ns)
    if s is None or s.nfe != nfe:
        raise ScheduleError(f"interpolate: the NFE-{base} schedule cannot be padded to NFE {nfe}; search that NFE")
    return _labelled(s, src, nfe, "pad", [base], base)


def _pad_end(s: Schedule, ns: NoiseSchedule) -> Schedule | None:
    """``s`` with its last lambda interval split ``PAD`` of its length before its end, both parts taking the last
    step's decisions by ``retime``."""
    times, lam = s.times, _clipped_lambdas(ns, s.times)
    t = float(ns.t_of_lambda(torch.tensor(lam[-1] - PAD * (lam[-1] - lam[-2]), dtype=torch.float64)))
    if not times[-1] < t < times[-2]:
        return None
    return retime(s, [*times[:-1], t, times[-1]])


def _clipped_lambdas(ns: NoiseSchedule, times: Sequence[float]) -> np.ndarray:
    lam = _lambdas(ns, times)
    b = _bound(lam)
    return np.clip(lam, -b, b)


def _grow(s: Schedule, ns: NoiseSchedule) -> Schedule | None:
    """``s`` with its widest lambda interval (the last one only when it is the only one) split at its midpoint."""
    times, lam = s.times, _clipped_lambdas(ns, s.times)
    gaps = np.diff(lam)[: max(len(times) - 2, 1)]
    i = int(np.argmax(gaps))
    t = float(ns.t_of_lambda(torch.tensor(0.5 * (lam[i] + lam[i + 1]), dtype=torch.float64)))
    if not times[i + 1] < t < times[i]:
        return None
    out = retime(s, [*times[: i + 1], t, *times[i + 1:]])
    st = out.steps[i]
    if out.nfe > s.nfe + 1 and st.corrector is not None:  # the new step took an implicit corrector: one call only
        out = out.with_steps([*out.steps[:i], replace(st, corrector=replace(st.corrector, kind="pseudo")),
                              *out.steps[i + 1:]]).validate()
    return out


def _shrink(s: Schedule, ns: NoiseSchedule, nfe: int) -> Schedule | None:
    """``s`` without the interior time whose two intervals together are narrowest in lambda (one that costs more
    calls than are left to shed is skipped); where each would, the implicit corrector of the step of the narrowest
    interval made a pseudo one (one call less)."""
    times, lam = s.times, _clipped_lambdas(ns, s.times)
    order = sorted(range(1, len(times) - 1), key=lambda k: lam[k + 1] - lam[k - 1])
    for k in order:
        out = retime(s, [*times[:k], *times[k + 1:]])
        if out.nfe >= nfe:
            return out
    implicit = [i for i, st in enumerate(s.steps) if st.corrector is not None and st.corrector.kind == "implicit"]
    if not implicit:
        return None
    i = min(implicit, key=lambda i: lam[i + 1] - lam[i])
    st = s.steps[i]
    return s.with_steps([*s.steps[:i], replace(st, corrector=replace(st.corrector, kind="pseudo")),
                         *s.steps[i + 1:]]).validate()


__all__ = ["interpolate", "positions", "retime"]
