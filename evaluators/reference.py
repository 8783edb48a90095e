"""High-accuracy reference solutions of the probability-flow ODE, cached on disk.

The ODE is integrated in two halves that meet at lambda = log(alpha / sigma) = 0, each in the
variable that keeps both its range and its right-hand side bounded for every noise schedule:

* noisy half (lambda < 0), rho = e^lambda = alpha / sigma in [rho_start, 1], state y = x / sigma:
      dy / drho = x0_hat(x)                      (the data-prediction form)
  rho_start = 0 is allowed, so a rectified-flow start at t = 1 (alpha = 0, lambda = -inf) is an
  ordinary initial point: the integrand there is the prior mean, not a singularity.
* clean half (lambda >= 0), s = e^-lambda = sigma / alpha in [s_end, 1], state z = x / alpha:
      dz / ds = eps_hat(x)                       (the noise-prediction form, as EDM's ODE)
  s_end = 0 is allowed, so the ODE can be followed all the way to sigma = 0 (for a problem whose
  eps_hat is exact there; otherwise it stops at s = ZERO_FLOOR and takes the data prediction).

Both follow from x = alpha x0 + sigma eps: d(x/sigma)/dlambda = e^lambda x0_hat and
d(x/alpha)/dlambda = -e^-lambda eps_hat. At lambda = 0, y = z. The solution only depends on
lambda, so the halves are integrated on the scale-free pairs (alpha, sigma) = (rho, 1) and (1, s);
a problem's ``predict(x, alpha, sigma)`` must accept any pair (it rescales to its own time axis).

Each half is integrated with a vectorised Dormand-Prince 8(5,3) method (the coefficients and the
error estimate of scipy's DOP853) in torch, float64, with the error norm taken per sample and the
step controlled by the worst sample, so every sample meets the tolerance.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from scipy.integrate._ivp import dop853_coefficients as _dop

from .cache import atomic_torch_save, content_digest, load_cached, tensor_sha256

Tensor = torch.Tensor
Predict = Callable[[Tensor, float, float], tuple[Tensor, Tensor]]

REFERENCE_VERSION = 1
DEFAULT_RTOL = 1e-10
DEFAULT_ATOL = 1e-10
ZERO_FLOOR = 1e-6  # sigma/alpha where a reference to sigma = 0 switches to the final data prediction,
# unless the problem's ``exact_at_zero`` says its predict is exact there

_NS = _dop.N_STAGES
_A = [[float(a) for a in _dop.A[i, :i]] for i in range(_NS)]
_B = [float(b) for b in _dop.B]
_C = [float(c) for c in _dop.C[:_NS]]
_E3 = [float(e) for e in _dop.E3]
_E5 = [float(e) for e in _dop.E5]
_SAFETY, _MIN_FACTOR, _MAX_FACTOR, _EXPONENT = 0.9, 0.2, 10.0, -1.0 / 8.0


class ReferenceStates(NamedTuple):
    """Reference states at the requested times after the first, and whether they were read from the cache."""

    states: list[Tensor]
    loaded: bool


@dataclass
class ODEStats:
    steps: int = 0
    rejected: int = 0
    evals: int = 0

    def add(self, other: ODEStats) -> None:
        self.steps += other.steps
        self.rejected += other.rejected
        self.evals += other.evals


def _combine(coefs: list[float], ks: list[Tensor]) -> Tensor | None:
    out = None
    for c, k in zip(coefs, ks):
        if c != 0.0:
            out = c * k if out is None else out + c * k
    return out


def dop853(f: Callable[[float, Tensor], Tensor], t0: float, t1: float, y0: Tensor, rtol: float = DEFAULT_RTOL,
           atol: float = DEFAULT_ATOL, h0: float | None = None, max_steps: int = 100_000) -> tuple[Tensor, ODEStats]:
    """Integrate dy/dt = f(t, y) from t0 to t1 (either direction); y0 is (batch, ...).

    The local error estimate (scipy's DOP853 estimate) is normed per sample over its values and
    the largest sample norm must stay below one.
    """
    stats = ODEStats()
    y = y0
    if t1 == t0:
        return y, stats
    direction = 1.0 if t1 > t0 else -1.0
    span = abs(t1 - t0)
    n_per = max(1, y0[0].numel())
    dims = tuple(range(1, y0.ndim))
    t = t0
    fy = f(t, y)
    stats.evals += 1
    h_abs = min(span, h0 if h0 is not None else 0.01 * span)
    rejected_last = False
    while direction * (t1 - t) > 0:
        if stats.steps + stats.rejected >= max_steps:
            raise RuntimeError(f"reference ODE: no convergence after {max_steps} steps (t = {t:g}); loosen rtol/atol")
        min_step = 10 * abs(math.nextafter(t, direction * math.inf) - t)
        if h_abs < min_step:
            if abs(t1 - t) > min_step:
                raise RuntimeError(f"reference ODE: step size underflow at t = {t:g}; the model output is not smooth "
                                   "there")
            h_abs = abs(t1 - t)  # an interval of a few ulps (a time a rounding away from lambda = 0) in one step
        h = h_abs * direction
        t_new = t + h
        if direction * (t_new - t1) > 0:
            t_new = t1
        h = t_new - t
        ks = [fy]
        for s in range(1, _NS):
            dy = _combine(_A[s], ks)
            ks.append(f(t + _C[s] * h, y if dy is None else y + h * dy))
        y_new = y + h * _combine(_B, ks)
        f_new = f(t_new, y_new)
        ks.append(f_new)
        stats.evals += _NS
        scale = atol + torch.maximum(y.abs(), y_new.abs()) * rtol
        e5 = ((_combine(_E5, ks) / scale) ** 2).sum(dim=dims)
        e3 = ((_combine(_E3, ks) / scale) ** 2).sum(dim=dims)
        denom = e5 + 0.01 * e3
        norms = torch.where(denom > 0, abs(h) * e5 / torch.sqrt(denom * n_per), torch.zeros_like(denom))
        err = float(norms.max())
        if not math.isfinite(err) or not bool(torch.isfinite(y_new).all()):
            err = math.inf
        if err < 1.0:
            factor = _MAX_FACTOR if err == 0 else min(_MAX_FACTOR, _SAFETY * err**_EXPONENT)
            if rejected_last:
                factor = min(1.0, factor)
            h_abs = abs(h) * factor
            t, y, fy = t_new, y_new, f_new
            stats.steps += 1
            rejected_last = False
        else:
            h_abs = abs(h) * (_MIN_FACTOR if not math.isfinite(err) else max(_MIN_FACTOR, _SAFETY * err**_EXPONENT))
            stats.rejected += 1
            rejected_last = True
    return y, stats


def solve_pf_ode(predict: Predict, x: Tensor, start: tuple[float, float], end: tuple[float, float],
                 rtol: float = DEFAULT_RTOL, atol: float = DEFAULT_ATOL,
                 zero_floor: float = 0.0) -> tuple[Tensor, ODEStats]:
    """Follow the probability-flow ODE from x at (alpha, sigma) = ``start`` to ``end`` (less noisy).

    ``predict(x, alpha, sigma) -> (eps_hat, x0_hat)`` is the denoiser on any scale; it is only
    called with (alpha, sigma) = (rho, 1), rho in [0, 1], and (1, s), s in [0, 1].

    With ``end`` at sigma = 0 and ``zero_floor`` > 0, the ODE is integrated to s = zero_floor and
    finished with the data prediction there (z(0) = x0_hat(z(s), s) + O(s^2)), for denoisers whose
    eps is unusable at sigma -> 0 (an x0-predicting network: eps = (x - x0) / sigma).
    """
    a_s, s_s = (float(v) for v in start)
    a_e, s_e = (float(v) for v in end)
    for a, s in ((a_s, s_s), (a_e, s_e)):
        if a < 0 or s < 0 or a == s == 0 or not (math.isfinite(a) and math.isfinite(s)):
            raise ValueError(f"reference ODE: invalid (alpha, sigma) = ({a}, {s})")
    if s_s == 0:
        raise ValueError("reference ODE: cannot start from sigma = 0")
    rho_s = a_s / s_s
    rho_e = math.inf if s_e == 0 else a_e / s_e
    if not rho_e >= rho_s:
        raise ValueError("reference ODE: the end point must be less noisy than the start (alpha/sigma must grow)")
    stats = ODEStats()
    if rho_s < 1.0:

        def f_data(rho: float, y: Tensor) -> Tensor:
            return predict(y, rho, 1.0)[1]

        y, st = dop853(f_data, rho_s, min(rho_e, 1.0), x / s_s, rtol, atol)
        stats.add(st)
        if rho_e <= 1.0:
            return s_e * y, stats
        z, s_start = y, 1.0
    else:
        z, s_start = x / a_s, s_s / a_s

    def f_noise(s: float, z: Tensor) -> Tensor:
        return predict(z, 1.0, s)[0]

    floor = zero_floor if s_e == 0 and 0 < zero_floor < s_start else 0.0
    z, st = dop853(f_noise, s_start, floor if s_e == 0 else s_e / a_e, z, rtol, atol)
    stats.add(st)
    if floor > 0:
        z = predict(z, 1.0, floor)[1]
        stats.evals += 1
    return a_e * z, stats


def _times(problem, t_start: float | None, t_end: float | None) -> tuple[float, float]:
    return (float(problem.t_start if t_start is None else t_start), float(problem.t_end if t_end is None else t_end))


def reference_solution(problem, x_T: Tensor, t_start: float | None = None, t_end: float | None = None,
                       rtol: float = DEFAULT_RTOL, atol: float = DEFAULT_ATOL) -> Tensor:
    """The probability-flow ODE solution from ``x_T`` at ``t_start`` to ``t_end`` (problem defaults), float64."""
    t0, t1 = _times(problem, t_start, t_end)
    ns = problem.noise
    start = (float(ns.alpha(t0)), float(ns.sigma(t0)))
    end = (float(ns.alpha(t1)), float(ns.sigma(t1)))
    floor = 0.0 if getattr(problem, "exact_at_zero", False) else ZERO_FLOOR
    x, _ = solve_pf_ode(problem.predict, x_T.to(torch.float64), start, end, rtol, atol, floor)
    return x


def reference_key(problem, x_T: Tensor, t_start: float | None = None, t_end: float | None = None,
                  rtol: float = DEFAULT_RTOL, atol: float = DEFAULT_ATOL, bank: dict | None = None) -> dict:
    """Everything a cached reference depends on, as a JSON-able dict."""
    t0, t1 = _times(problem, t_start, t_end)
    return {"version": REFERENCE_VERSION, "problem": problem.identity(), "bank": dict(bank or {}),
            "x_T_sha256": tensor_sha256(x_T), "t_start": t0, "t_end": t1, "rtol": float(rtol), "atol": float(atol)}


def reference_path(key: dict, cache_dir: str | Path) -> Path:
    return Path(cache_dir) / "reference" / f"{content_digest(key)}.pt"


def cached_reference(problem, x_T: Tensor, t_start: float | None = None, t_end: float | None = None, *,
                     bank: dict | None = None, cache_dir: str | Path | None = "runs/cache",
                     rtol: float = DEFAULT_RTOL, atol: float = DEFAULT_ATOL) -> tuple[Tensor, bool]:
    """(reference, loaded): the problem's reference state at ``t_end`` from ``x_T`` at ``t_start`` (problem
    defaults), through ``problem.reference_states`` (cached under ``cache_dir``; None: not cached)."""
    states, loaded = problem.reference_states(x_T, list(_times(problem, t_start, t_end)), bank=bank,
                                              cache_dir=cache_dir, rtol=rtol, atol=atol)
    return states[0], loaded


def ode_reference_states(problem, x_T: Tensor, times: list[float], *, bank: dict | None = None,
                         cache_dir: str | Path | None = "runs/cache", rtol: float = DEFAULT_RTOL,
                         atol: float = DEFAULT_ATOL) -> ReferenceStates:
    """The high-accuracy ODE solution from x_T at ``times[0]`` through ``times[1:]``, segment by segment, each
    segment cached as ``cached_solution``; loaded when every segment was."""
    out, x, loaded = [], x_T, True
    for t0, t1 in zip(times, times[1:]):
        x, hit = cached_solution(problem, x, t0, t1, bank=bank, cache_dir=cache_dir, rtol=rtol, atol=atol)
        out.append(x)
        loaded = loaded and hit
    return ReferenceStates(out, loaded)


def cached_solution(problem, x_T: Tensor, t_start: float, t_end: float, *, bank: dict | None = None,
                    cache_dir: str | Path | None = "runs/cache", rtol: float = DEFAULT_RTOL,
                    atol: float = DEFAULT_ATOL) -> tuple[Tensor, bool]:
    """(solution, loaded): ``reference_solution`` from ``cache_dir/reference/<sha256 of key>.pt`` if there, else
    computed and written there (atomically). ``cache_dir=None`` computes without caching."""
    key = reference_key(problem, x_T, t_start, t_end, rtol, atol, bank)
    path = reference_path(key, cache_dir) if cache_dir is not None else None
    stored = load_cached(path, lambda s: s["x"] if json.loads(s["key"]) == key and s["x"].shape == x_T.shape else None)
    if stored is not None:
        return stored.to(x_T.device), True
    x = reference_solution(problem, x_T, t_start, t_end, rtol, atol)
    if path is not None:
        atomic_torch_save({"key": json.dumps(key, sort_keys=True), "x": x.detach().cpu()}, path)
    return x, False
