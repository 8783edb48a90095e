"""Reference solutions for networks: a many-step high-order solve, refined until it has converged.

A network's probability-flow ODE has no closed form and float32 networks do not suit a 1e-10
adaptive integrator, so the reference is the project's own order-3 UniPC (predictor order 3 plus
the corrector) on a grid uniform in lambda inside every segment between the requested times. The
number of steps is doubled until halving the step changes every requested state by less than
``tol`` (RMS difference over the bank relative to the RMS of the state); the finer solution is
returned. States at several times come from one solve (DC-Solver's per-step targets), exactly at
those times, not at the nearest stored grid point.

A requested time where sigma = 0 (lambda = inf) is the data-space endpoint of the flow: the grid stops at
the last finite lambda (``finite_times``) and the state there is finished with the model's x0 prediction,
z(0) = x0_hat + O((sigma / alpha)^2) in z = x / alpha.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from steptune.space import NonFiniteError, presets, sample
from steptune.space.noise import VPDiscrete

from .cache import atomic_torch_save, content_digest, load_cached, tensor_sha256
from .reference import ZERO_FLOOR, ReferenceStates
from .user_code import raised_text

Tensor = torch.Tensor

NEURAL_REFERENCE_VERSION = 1
DEFAULT_TOL = 1e-4
DEFAULT_STEPS = 96
MAX_STEPS = 3072
SOLVER = "unipc-bh2"


class ReferenceNotConverged(RuntimeError):
    """The reference solve diverged, did not converge or the network raised in it: a property of the network, not of
    a schedule."""


@dataclass(frozen=True)
class ReferenceSettings:
    """``tol``: the largest relative change allowed when the step is halved; ``steps``: the first grid;
    ``max_steps``: give up beyond this many steps."""

    tol: float = DEFAULT_TOL
    steps: int = DEFAULT_STEPS
    max_steps: int = MAX_STEPS

    def to_dict(self) -> dict:
        return {"tol": self.tol, "steps": self.steps, "max_steps": self.max_steps, "solver": f"{SOLVER}:order=3",
                "version": NEURAL_REFERENCE_VERSION}


def finite_times(noise, times: list[float]) -> list[float]:
    """``times`` without a last time at sigma = 0, ending instead at the last finite lambda the model is
    followed to: sigma / alpha = ``ZERO_FLOOR`` as in the exact reference, or a discrete schedule's smallest
    training time (its network is not defined below it); nothing is added when the time before is already
    there."""
    if float(noise.sigma(times[-1])) > 0:
        return times
    if any(float(noise.sigma(t)) == 0 for t in times[:-1]):
        raise ValueError("reference: only the last requested time may be at sigma = 0")
    floor = noise.t_min if isinstance(noise, VPDiscrete) else float(noise.t_of_lambda(-math.log(ZERO_FLOOR)))
    return times[:-1] + ([floor] if times[-2] > floor else [])


def fine_grid(noise, times: list[float], steps: int) -> tuple[list[float], list[int]]:
    """About ``steps`` steps over ``times`` (decreasing, every lambda finite), uniform in lambda within each
    segment and at least one per segment; returns the grid and the grid index of every requested time."""
    lam = [float(noise.lam(t)) for t in times]
    span = lam[-1] - lam[0]
    grid, marks = [times[0]], [0]
    for a, b, tb in zip(lam, lam[1:], times[1:]):
        k = max(1, round(steps * (b - a) / span))
        inner = torch.linspace(a, b, k + 1, dtype=torch.float64)[1:-1]
        grid += [float(t) for t in noise.t_of_lambda(inner)] if k > 1 else []
        grid.append(tb)
        marks.append(len(grid) - 1)
    return grid, marks


def solve_states(model, x_T: Tensor, times: list[float], steps: int) -> list[Tensor]:
    """The states at ``times[1:]`` from one order-3 UniPC solve on ``fine_grid(times, steps)``; a last time at
    sigma = 0 is the x0 prediction at the last finite lambda (``finite_times``)."""
    finite = finite_times(model.noise, times)
    out = [x_T]
    if len(finite) > 1:
        out += fine_solve(model, x_T, finite, steps)
    if finite == times:
        return out[1:]
    t, ns = finite[-1], model.noise
    with torch.no_grad():
        x0 = model.predict(out[-1], t, float(ns.alpha(t)), float(ns.sigma(t)))[1]
    return out[1:len(times) - 1] + [x0]


def fine_solve(model, x_T: Tensor, times: list[float], steps: int) -> list[Tensor]:
    grid, marks = fine_grid(model.noise, times, steps)
    sched = presets.build(f"{SOLVER}:order=3", len(grid) - 1, model.noise, spacing=grid, lower_order_final=False)
    want = {m - 1: k for k, m in enumerate(marks[1:])}
    out: list[Tensor | None] = [None] * (len(times) - 1)

    done = [-1]

    def keep(i: int, x: Tensor) -> None:
        done[0] = i
        if i in want:
            out[want[i]] = x

    try:
        with torch.no_grad():
            sample(model, x_T, sched, callback=keep)
    except NonFiniteError as e:
        raise ReferenceNotConverged(f"reference: the model produced NaN or inf near t = {grid[e.step + 1]:g} on the "
                                    "reference solve; check the network there (its weights, the time input "
                                    "convention)") from None
    except Exception as e:  # the network itself raised: its message and the line of the user's code that raised it
        raise ReferenceNotConverged(
            f"reference: {raised_text(e)} near t = "
            f"{grid[done[0] + 1]:g} of the reference solve, which calls it at times from {grid[0]:g} to {grid[-1]:g} "
            f"on batches of {x_T.shape[0]}; fix the network there") from None
    return out


def relative_change(a: Tensor, b: Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30))


def converged_states(model, x_T: Tensor, times: list[float],
                     settings: ReferenceSettings = ReferenceSettings()) -> tuple[list[Tensor], dict]:
    """States at ``times[1:]`` from x_T at ``times[0]``, refined until converged; also the solve report
    (steps of the accepted solve and the relative change that accepted it)."""
    with model.uncounted():
        steps, change = settings.steps, math.inf
        coarse = solve_states(model, x_T, times, steps)
        while True:
            if 2 * steps > settings.max_steps:
                raise ReferenceNotConverged(
                    f"reference: no convergence to tol {settings.tol:g} within {settings.max_steps} steps "
                    f"(last change {change:.3g}); the model may not be smooth in time, or raise the tolerance")
            fine = solve_states(model, x_T, times, 2 * steps)
            change = max(relative_change(c, f) for c, f in zip(coarse, fine))
            if not math.isfinite(change):
                raise ReferenceNotConverged("reference: the model produced NaN or inf on the reference solve")
            steps *= 2
            if change < settings.tol:
                return fine, {"steps": steps, "change": change, "tol": settings.tol}
            coarse = fine


def cached_states(problem, x_T: Tensor, times: list[float], *, bank: dict | None = None,
                  cache_dir: str | Path | None = "runs/cache",
                  settings: ReferenceSettings = ReferenceSettings()) -> ReferenceStates:
    """``converged_states`` for a problem, cached under ``cache_dir/reference/`` keyed by the problem's
    identity (model, conventions, noise), the noise bank, the times, the settings and, where the problem knows them,
    the network's own source files (``code_sha256``: code edited since gives a new solve, not a stale one)."""
    key = {"kind": "neural", "problem": problem.identity(), "bank": dict(bank or {}),
           "x_T_sha256": tensor_sha256(x_T), "times": [float(t) for t in times], "settings": settings.to_dict()}
    if getattr(problem, "code_sha256", None):
        key["code_sha256"] = problem.code_sha256
    path = None if cache_dir is None else Path(cache_dir) / "reference" / f"{content_digest(key)}.pt"
    stored = load_cached(path, lambda s: s["states"] if json.loads(s["key"]) == key else None)
    if stored is not None:
        return ReferenceStates([x.to(x_T.device) for x in stored], True)
    states, report = converged_states(problem.model, x_T, times, settings)
    if path is not None:
        atomic_torch_save({"key": json.dumps(key, sort_keys=True), "report": json.dumps(report),
                           "states": [x.detach().cpu() for x in states]}, path)
    return ReferenceStates(states, False)
