"""The one sampler loop: runs any valid Schedule on a Model, batched over samples."""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import noise as noise_mod
from .kernel import Point, lagrange_weights, solve_step
from .model import Model
from .schedule import Schedule, ScheduleError

Tensor = torch.Tensor


class NonFiniteError(RuntimeError):
    """The sampler produced NaN or inf; ``step`` is the index of the step where it happened."""

    def __init__(self, step: int, where: str):
        super().__init__(f"step {step}: non-finite values in the {where}; the schedule diverged here")
        self.step = step
        self.where = where


def _check(x: Tensor, step: int, where: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise NonFiniteError(step, where)


def _point(model: Model, x: Tensor, t: float, step: int) -> Point:
    ns = model.noise
    alpha, sigma, lam = float(ns.alpha(t)), float(ns.sigma(t)), float(ns.lam(t))
    eps, x0 = model.predict(x, t, alpha, sigma)
    _check(eps, step, "model output")
    return Point(t, lam, alpha, sigma, x, eps, x0)


def _afs_point(model: Model, x: Tensor, t: float, afs: str) -> Point:
    ns = model.noise
    alpha, sigma, lam = float(ns.alpha(t)), float(ns.sigma(t)), float(ns.lam(t))
    if afs == "zero":
        x0 = torch.zeros_like(x)
    else:
        if model.data_mean is None:
            raise ScheduleError("schedule: field 'afs' is 'mean' but the model has no data_mean; use 'zero' or set it")
        x0 = model.data_mean.to(x).expand_as(x)
    return Point(t, lam, alpha, sigma, x, (x - alpha * x0) / sigma, x0)


def _compensate(hist: list[Point], ratio: float) -> None:
    """DC-Solver: replace the newest outputs by their Lagrange interpolation (in t) over the last
    three points at tau = t_-2 + ratio (t_-1 - t_-2)."""
    pts = hist[-3:]
    tau = pts[-2].t + ratio * (pts[-1].t - pts[-2].t)
    lw = lagrange_weights([p.t for p in pts], tau)
    newest = pts[-1]
    newest.eps = sum(w * p.eps for w, p in zip(lw, pts))
    newest.x0 = sum(w * p.x0 for w, p in zip(lw, pts))


def check_compatible(model: Model, schedule: Schedule) -> None:
    if schedule.noise and noise_mod.from_dict(schedule.noise) != model.noise:
        raise ScheduleError(
            f"schedule: it was made for noise schedule {schedule.noise.get('kind')!r} "
            f"({noise_mod.from_dict(schedule.noise)!r}) but the model uses {model.noise!r}; rebuild it for this model")


def sample(model: Model, x_T: Tensor, schedule: Schedule, *,
           callback: Callable[[int, Tensor], None] | None = None) -> Tensor:
    """Run ``schedule`` on ``model`` from the initial noise ``x_T``; returns the final samples.

    The schedule is validated first and nothing runs if it is invalid. A NaN or inf stops the
    run with ``NonFiniteError``. ``callback(i, x)`` sees the state after every step.
    """
    schedule.validate()
    check_compatible(model, schedule)
    ns = model.noise
    x = x_T
    t0 = schedule.t_start
    hist = [_afs_point(model, x, t0, schedule.afs) if schedule.afs != "none" else _point(model, x, t0, -1)]
    n = len(schedule.steps)
    for i, st in enumerate(schedule.steps):
        if st.dc_ratio != 1.0:
            _compensate(hist, st.dc_ratio)
        lam_t, alpha_t, sigma_t = float(ns.lam(st.t)), float(ns.alpha(st.t)), float(ns.sigma(st.t))
        pts = st.derivative_points()
        x = solve_step(hist, st.start, lam_t, alpha_t, sigma_t, st.prediction, st.order, pts,
                       st.first_points, st.relaxation, st.relaxation_coef, st.second_scale)
        _check(x, i, "state")
        if i < n - 1:
            pt = _point(model, x, st.t, i)
            c = st.corrector
            if c is not None:
                hist.append(pt)
                corder = st.order + 1 if c.order is None else c.order
                cpts = (-1, *(p - 1 for p in pts[: corder - 2]))
                x = solve_step(hist, st.start - 1, lam_t, alpha_t, sigma_t, st.prediction, corder, cpts,
                               None, c.relaxation, c.relaxation_coef)
                _check(x, i, "corrected state")
                hist.pop()
                pt = _point(model, x, st.t, i) if c.kind == "implicit" else Point(
                    pt.t, pt.lam, pt.alpha, pt.sigma, x, pt.eps, pt.x0)
            hist.append(pt)
        if callback is not None:
            callback(i, x)
    return x
