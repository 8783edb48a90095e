"""DC-Solver compensation ratios: the greedy per-step fit of DC-Solver's code, a joint fit of all
ratios by backpropagation through the whole sampler, and cascade polynomial regression (CPR) to
predict ratios for unseen (NFE, guidance) configurations.

Both fits run the project's sampler loop (``steptune.space.trajectory``) with the ratios passed as
tensors, so the compensation is exactly the one every schedule runs with (Lagrange re-timing of
the newest buffered output; see ``space/sampler.py``). Targets are reference states at the
schedule's own times (not the nearest point of a stored grid).

* ``fit_greedy``: step by step, once three outputs are buffered, one ratio initialised at 1 is
  optimised with AdamW (lr 0.1, no weight decay) on MSE(state after the step, reference there);
  then it is fixed and the trajectory advances. Each iteration costs one network forward and
  backward (the corrector's evaluation at the predicted point); the steps before are replayed from
  cached outputs. The best iterate (by the step's loss, 1 included) is kept.
* ``fit_joint``: all ratios at once with Adam on MSE(final state, reference), every iteration a
  full differentiable run; the best iterate is kept. Starts from given ratios (e.g. greedy's).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from steptune.space import Schedule, TrajectoryRun, trajectory

Tensor = torch.Tensor
BOUNDS = (0.3, 1.7)  # DC-Solver's box; None fits log(ratio) unbounded (see ``_to_param``)


@dataclass
class FitResult:
    method: str
    ratios: list[float]
    loss_start: float
    loss: float
    seconds: float
    model_calls: int
    history: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"method": self.method, "ratios": self.ratios, "loss_start": self.loss_start, "loss": self.loss,
                "seconds": self.seconds, "model_calls": self.model_calls}


def eligible_steps(schedule: Schedule) -> list[int]:
    """Steps that can be compensated: three outputs buffered before them (every step from the third)."""
    return list(range(2, len(schedule.steps)))


def with_ratios(schedule: Schedule, ratios: Sequence[float]) -> Schedule:
    """The schedule with these compensation ratios (steps that cannot be compensated keep 1)."""
    ok = set(eligible_steps(schedule))
    steps = [replace(st, dc_ratio=float(r) if i in ok else 1.0) for i, (st, r) in enumerate(zip(schedule.steps,
                                                                                                 ratios))]
    return schedule.with_steps(steps).validate()


def ratios_of(schedule: Schedule) -> list[float]:
    return [float(st.dc_ratio) for st in schedule.steps]


def run(model, schedule: Schedule, x_T: Tensor, ratios: Sequence[float | Tensor], *,
        replay: Sequence[tuple] = (), stop_after: int | None = None) -> tuple[Tensor, list[tuple]]:
    """Run the sampler with ``ratios``; the first ``len(replay)`` model outputs are taken from ``replay``
    instead of calling the model. Returns the state after step ``stop_after`` (the final state when
    None) and every model output used, in order."""
    states: dict[int, Tensor] = {}
    loop = TrajectoryRun(trajectory(schedule, model.noise, x_T, model.data_mean, callback=states.__setitem__,
                                    dc_ratios=list(ratios), reuse_buffers=False))
    outputs: list[tuple] = []
    while not loop.done:
        if stop_after is not None and stop_after in states:
            loop.close()
            return states[stop_after], outputs
        req, k = loop.request, len(outputs)
        outputs.append(replay[k] if k < len(replay) else model.predict(req.x, req.t, req.alpha, req.sigma))
        loop.send(outputs[-1])
    return (loop.result if stop_after is None else states[stop_after]), outputs


def _mse(x: Tensor, ref: Tensor) -> Tensor:
    return (x - ref.to(x)).pow(2).mean()


def _clamp(v: float, bounds: tuple[float, float] | None) -> float:
    return v if bounds is None else min(max(v, bounds[0]), bounds[1])


def _to_param(rho: float, bounds: tuple[float, float] | None) -> float:
    """The fitted parameter of a ratio: the ratio itself in a box, its logarithm without one (``bounds=None``:
    every real parameter is a positive ratio, so nothing clamps and the fit cannot pin on a bound)."""
    return rho if bounds is not None else math.log(rho)


def _from_param(theta: Tensor, bounds: tuple[float, float] | None) -> Tensor:
    return theta if bounds is not None else theta.exp()


def on_bound(ratios: Sequence[float], bounds: tuple[float, float] | None, rel: float = 1e-6) -> dict[int, str]:
    """The steps whose fitted ratio ended on a bound of the box: step -> "lower" or "upper" (none without a box)."""
    if bounds is None:
        return {}
    out = {}
    for i, r in enumerate(ratios):
        for side, b in zip(("lower", "upper"), bounds):
            if math.isclose(r, b, rel_tol=rel):
                out[i] = side
    return out


def fit_greedy(model, schedule: Schedule, x_T: Tensor, targets: Sequence[Tensor], *, iters: int = 20,
               lr: float = 0.1, weight_decay: float = 0.0, bounds: tuple[float, float] | None = BOUNDS,
               progress: Callable[[int, int], None] | None = None) -> FitResult:
    """DC-Solver's greedy fit. ``targets[i]`` is the reference state at ``schedule.times[i + 1]``."""
    start = time.perf_counter()
    with model.uncounted() as used:
        n = len(schedule.steps)
        ratios: list[float] = [1.0] * n
        steps = eligible_steps(schedule)
        history = []
        with torch.no_grad():
            x0, cache = run(model, schedule, x_T, ratios, stop_after=steps[0] - 1 if steps else None)
            loss_start = float(_mse(run(model, schedule, x_T, ratios, replay=cache)[0], targets[-1]))
        for k, i in enumerate(steps):
            theta = torch.tensor(_to_param(1.0, bounds), dtype=torch.float64, requires_grad=True)
            opt = torch.optim.AdamW([theta], lr=lr, weight_decay=weight_decay)
            best = (math.inf, 1.0)
            for _ in range(iters):
                rho = _from_param(theta, bounds)
                rs = [*ratios[:i], rho, *ratios[i + 1:]]
                x, _ = run(model, schedule, x_T, rs, replay=cache, stop_after=i)
                loss = _mse(x, targets[i])
                if float(loss.detach()) < best[0]:
                    best = (float(loss.detach()), float(rho.detach()))
                opt.zero_grad()
                loss.backward()
                opt.step()
                if bounds is not None:
                    with torch.no_grad():
                        theta.clamp_(*bounds)
            ratios[i] = _clamp(best[1], bounds)
            history.append({"step": i, "ratio": ratios[i], "loss": best[0]})
            with torch.no_grad():
                _, cache = run(model, schedule, x_T, ratios, replay=cache, stop_after=i)
            if progress is not None:
                progress(k + 1, len(steps))
        with torch.no_grad():
            loss = float(_mse(run(model, schedule, x_T, ratios, replay=cache)[0], targets[-1]))
    return FitResult("greedy", ratios, loss_start, loss, time.perf_counter() - start, used.n, history)


def joint_loss(model, schedule: Schedule, x_T: Tensor, target: Tensor, ratios: Tensor) -> Tensor:
    """MSE of the final state against ``target`` as a differentiable function of ``ratios`` (one per
    eligible step, in order)."""
    steps = eligible_steps(schedule)
    rs: list[float | Tensor] = [1.0] * len(schedule.steps)
    for j, i in enumerate(steps):
        rs[i] = ratios[j]
    return _mse(run(model, schedule, x_T, rs)[0], target)


def fit_joint(model, schedule: Schedule, x_T: Tensor, target: Tensor, *, init: Sequence[float] | None = None,
              iters: int = 30, lr: float = 0.02, bounds: tuple[float, float] | None = BOUNDS,
              progress: Callable[[int, int], None] | None = None) -> FitResult:
    """All ratios at once on the final-state error (``target``: the reference at the schedule's end)."""
    start = time.perf_counter()
    with model.uncounted() as used:
        steps = eligible_steps(schedule)
        init = list(init) if init is not None else ratios_of(schedule)
        theta = torch.tensor([_to_param(_clamp(init[i], bounds), bounds) for i in steps], dtype=torch.float64,
                             requires_grad=True)
        with torch.no_grad():
            loss_start = float(joint_loss(model, schedule, x_T, target, _from_param(theta, bounds)))
        best = (loss_start, _from_param(theta, bounds).detach().clone())
        history = []
        if steps:
            opt = torch.optim.Adam([theta], lr=lr)
            for it in range(iters):
                rho = _from_param(theta, bounds)
                loss = joint_loss(model, schedule, x_T, target, rho)
                if float(loss.detach()) < best[0]:
                    best = (float(loss.detach()), rho.detach().clone())
                history.append({"iter": it, "loss": float(loss.detach())})
                opt.zero_grad()
                loss.backward()
                opt.step()
                if bounds is not None:
                    with torch.no_grad():
                        theta.clamp_(*bounds)
                if progress is not None:
                    progress(it + 1, iters)
            with torch.no_grad():
                rho = _from_param(theta, bounds)
                final = float(joint_loss(model, schedule, x_T, target, rho))
            if final < best[0]:
                best = (final, rho.detach().clone())
    ratios = [1.0] * len(schedule.steps)
    for j, i in enumerate(steps):
        ratios[i] = float(best[1][j])
    return FitResult("joint", ratios, loss_start, best[0], time.perf_counter() - start, used.n, history)


# ---- cascade polynomial regression ----------------------------------------------------------------

@dataclass
class CPR:
    """rho(i; NFE, CFG) = sum_k c_k x^k, c_k = sum_r a_kr g^r, a_kr = sum_s M[k, r, s] nu^s: cubic in the
    relative step position x = (i + 1) / steps, quadratic in the guidance and in the NFE (DC-Solver's
    cascade), with g and nu scaled to [-1, 1] over the fitted box. Fitted by ridge least squares (it is
    linear in M); predictions are clamped to ``bounds`` and steps 1-2 are 1. Outside the fitted box the
    polynomial is evaluated at the box's nearest NFE and CFG (``inside`` tells): extrapolated, its
    ratios soon leave any useful range."""

    coef: np.ndarray
    nfe_range: tuple[float, float]
    cfg_range: tuple[float, float]
    ridge: float = 1e-3
    bounds: tuple[float, float] = BOUNDS

    @staticmethod
    def _scale(v: float, lo: float, hi: float) -> float:
        return 0.0 if hi == lo else 2.0 * (v - lo) / (hi - lo) - 1.0

    def inside(self, nfe: float, cfg: float | None) -> bool:
        cfg = 1.0 if cfg is None else cfg
        return self.nfe_range[0] <= nfe <= self.nfe_range[1] and self.cfg_range[0] <= cfg <= self.cfg_range[1]

    def features(self, x: float, nfe: float, cfg: float) -> np.ndarray:
        nu = min(max(self._scale(nfe, *self.nfe_range), -1.0), 1.0)
        g = min(max(self._scale(cfg, *self.cfg_range), -1.0), 1.0)
        return np.array([x**k * g**r * nu**s for k in range(4) for r in range(3) for s in range(3)])

    def predict(self, nfe: int, cfg: float | None, n_steps: int | None = None) -> list[float]:
        n_steps = nfe if n_steps is None else n_steps
        cfg = 1.0 if cfg is None else cfg
        out = [1.0] * n_steps
        for i in range(2, n_steps):
            v = float(self.features((i + 1) / n_steps, nfe, cfg) @ self.coef.ravel())
            out[i] = _clamp(v, self.bounds)
        return out

    def to_dict(self) -> dict:
        return {"coef": self.coef.tolist(), "nfe_range": list(self.nfe_range), "cfg_range": list(self.cfg_range),
                "ridge": self.ridge, "bounds": list(self.bounds)}

    @classmethod
    def from_dict(cls, d: dict) -> CPR:
        """The inverse of ``to_dict`` (extra keys are ignored)."""
        return cls(np.asarray(d["coef"], dtype=np.float64).reshape(4, 3, 3), tuple(d["nfe_range"]),
                   tuple(d["cfg_range"]), float(d.get("ridge", 1e-3)), tuple(d.get("bounds", BOUNDS)))

    @classmethod
    def fit(cls, rows: Sequence[tuple[int, float | None, Sequence[float]]], ridge: float = 1e-3) -> CPR:
        """``rows``: (NFE, CFG, ratios per step) of directly fitted configurations."""
        if not rows:
            raise ValueError("CPR: no fitted configurations to regress on")
        if not (math.isfinite(ridge) and ridge >= 0):
            raise ValueError(f"CPR: the ridge penalty must be a finite number, 0 or more, not {ridge!r}")
        cfgs = [1.0 if c is None else float(c) for _, c, _ in rows]
        nfes = [float(n) for n, _, _ in rows]
        cpr = cls(np.zeros((4, 3, 3)), (min(nfes), max(nfes)), (min(cfgs), max(cfgs)), ridge)
        X, y = [], []
        for (nfe, _, ratios), cfg in zip(rows, cfgs):
            n = len(ratios)
            for i in range(2, n):
                X.append(cpr.features((i + 1) / n, nfe, cfg))
                y.append(ratios[i] - 1.0)
        X, y = np.array(X), np.array(y)
        A = np.vstack([X, math.sqrt(ridge) * np.eye(X.shape[1])])
        b = np.concatenate([y, np.zeros(X.shape[1])])
        sol, *_ = np.linalg.lstsq(A, b, rcond=None)
        sol[0] += 1.0  # the constant term carries the identity ratio (ridge pulls toward rho = 1)
        cpr.coef = sol.reshape(4, 3, 3)
        return cpr


def interpolate_ratios(rows: Sequence[tuple[int, float | None, Sequence[float]]], nfe: int,
                       cfg: float | None) -> tuple[list[float], tuple[float, float]] | None:
    """Ratios at (``nfe``, ``cfg``) interpolated linearly in the guidance, step by step, between the two
    fitted configurations of the same NFE that bracket ``cfg``; with them, the bracketing guidance
    scales. None when no fitted pair at that NFE brackets ``cfg``. At a fitted NFE the per-step pattern
    of the optimal ratios often persists across guidance scales, which a polynomial in the relative
    step position cannot follow."""
    cfg = 1.0 if cfg is None else float(cfg)
    fitted = sorted({(1.0 if c is None else float(c)): list(r) for n, c, r in rows if n == nfe}.items())
    below = [(c, r) for c, r in fitted if c <= cfg]
    above = [(c, r) for c, r in fitted if c >= cfg]
    if not below or not above:
        return None
    (lo, r_lo), (hi, r_hi) = below[-1], above[0]
    if len(r_lo) != len(r_hi):
        return None
    w = 0.0 if hi == lo else (cfg - lo) / (hi - lo)
    return [(1 - w) * a + w * b for a, b in zip(r_lo, r_hi)], (lo, hi)


# ---- one configuration, end to end ----------------------------------------------------------------

@dataclass
class ConfigFit:
    """The fits of one (schedule, problem) configuration on ``fit_samples`` train-bank noises."""

    schedule: Schedule
    fits: dict[str, FitResult]
    reference_seconds: float
    model: object = None
    x_T: Tensor | None = None
    target: Tensor | None = None  # the reference at the schedule's end, from ``x_T``

    def fitted(self, method: str) -> Schedule:
        return with_ratios(self.schedule, self.fits[method].ratios)

    def refit_joint(self, init: Sequence[float], *, iters: int = 30, bounds: tuple[float, float] | None = BOUNDS,
                    note: dict | None = None) -> bool:
        """Fit the joint ratios again from ``init``; keep the result if its fit loss is lower. The kept
        result's seconds and model calls include every attempt."""
        old = self.fits["joint"]
        new = fit_joint(self.model, self.schedule, self.x_T, self.target, init=init, iters=iters, bounds=bounds)
        better = new.loss < old.loss
        kept = new if better else old
        self.fits["joint"] = replace(kept, loss_start=old.loss_start, seconds=old.seconds + new.seconds,
                                     model_calls=old.model_calls + new.model_calls,
                                     history=[*old.history, {"restart": note or {}, "loss": new.loss,
                                                             "kept": better}])
        return better


def continue_across_guidance(fits: Sequence[tuple[float, ConfigFit]], *, iters: int = 30,
                             bounds: tuple[float, float] | None = BOUNDS,
                             progress: Callable[[int, int], None] | None = None) -> int:
    """Joint fits of one NFE at several guidance scales, continued along the scales: up, then down, each
    fit is restarted from its neighbour's ratios and the better fit kept. The joint fit is not convex;
    a start from a neighbouring optimum often reaches a better one than the greedy start, and neighbours
    then share one pattern of ratios, so that interpolating between them works. Returns the number of
    fits improved."""
    ordered = sorted(fits, key=lambda gc: gc[0])
    up = [(k, k + 1) for k in range(len(ordered) - 1)]
    sweep = up + [(b, a) for a, b in reversed(up)]
    improved = 0
    for k, (src, dst) in enumerate(sweep):
        (g_src, cf_src), (_, cf_dst) = ordered[src], ordered[dst]
        improved += cf_dst.refit_joint(cf_src.fits["joint"].ratios, iters=iters, bounds=bounds,
                                       note={"from_cfg": g_src})
        if progress is not None:
            progress(k + 1, len(sweep))
    return improved


def fit_targets(evaluator, schedule: Schedule, fit_samples: int) -> tuple[Tensor, list[Tensor]]:
    """The fit noises (the first ``fit_samples`` of the evaluator's train bank) and the converged
    reference states from them at ``schedule.times[1:]`` (cached on disk). The reference starts at the problem's
    t_start, where the noises are, also for a schedule that starts later (diffusers' leading timesteps)."""
    x = evaluator.x_T("train", fit_samples)
    bank = {**evaluator.bank("train").describe(), "n": fit_samples}
    t0 = evaluator.problem.t_start
    later = schedule.t_start < t0
    times = [t0, *schedule.times] if later else schedule.times
    states = evaluator.problem.reference_states(x, times, bank=bank, cache_dir=evaluator.cache_dir).states
    return x, states[1:] if later else states


def fit_config(evaluator, schedule: Schedule, *, methods: Sequence[str] = ("greedy", "joint"), fit_samples: int = 10,
               greedy_iters: int = 20, joint_iters: int = 30, bounds: tuple[float, float] | None = BOUNDS,
               progress: Callable[[str, int, int], None] | None = None) -> ConfigFit:
    """Fit the ratios of ``schedule`` on the first ``fit_samples`` noises of the evaluator's train bank
    against converged reference states at the schedule's times. ``joint`` starts from ``greedy``'s
    ratios when both are asked for (a refinement), else from the schedule's own ratios."""
    bad = sorted(set(methods) - {"greedy", "joint"})
    if bad:
        raise ValueError(f"unknown DC fit method {bad[0]!r}; use greedy and/or joint")
    for name, iters in (("greedy_iters", greedy_iters), ("joint_iters", joint_iters)):
        if name.removesuffix("_iters") in methods and iters < 1:
            raise ValueError(f"{name} must be at least 1, not {iters}")
    evaluator.check(schedule)
    problem = evaluator.problem
    t0 = time.perf_counter()
    x_fit, targets = fit_targets(evaluator, schedule, fit_samples)
    ref_seconds = time.perf_counter() - t0
    base = with_ratios(schedule, [1.0] * len(schedule.steps)) if "greedy" in methods else schedule
    fits: dict[str, FitResult] = {}

    def report(name):
        return None if progress is None else (lambda k, n: progress(name, k, n))

    if "greedy" in methods:
        fits["greedy"] = fit_greedy(problem.model, base, x_fit, targets, iters=greedy_iters, bounds=bounds,
                                    progress=report("greedy"))
    if "joint" in methods:
        init = fits["greedy"].ratios if "greedy" in fits else ratios_of(schedule)
        fits["joint"] = fit_joint(problem.model, schedule, x_fit, targets[-1], init=init, iters=joint_iters,
                                  bounds=bounds, progress=report("joint"))
    return ConfigFit(schedule, fits, ref_seconds, problem.model, x_fit, targets[-1])


@dataclass
class CPRCase:
    """One fitted configuration for ``refine_cpr``: its model, schedule, fit noises and final reference."""

    model: object
    schedule: Schedule
    x_T: Tensor
    target: Tensor
    nfe: int
    cfg: float | None


def refine_cpr(cpr: CPR, cases: Sequence[CPRCase], *, iters: int = 40, lr: float = 0.003,
               progress: Callable[[int, int], None] | None = None) -> tuple[CPR, list[float]]:
    """Fit CPR's coefficients end to end: minimise the mean over ``cases`` of (final-state MSE with the
    predicted ratios) / (MSE without DC), by backpropagation through every case's sampler. Regressing
    per-configuration optima fits noise where the loss is flat in the ratios; this fits what the ratios
    are for. Starts from ``cpr`` (e.g. the regression); keeps the best iterate. Returns it and the loss
    history."""
    coef = torch.tensor(cpr.coef.ravel(), dtype=torch.float64, requires_grad=True)
    feats, scales = [], []
    for c in cases:
        n = len(c.schedule.steps)
        feats.append(torch.tensor(np.array([cpr.features((i + 1) / n, c.nfe, 1.0 if c.cfg is None else c.cfg)
                                            for i in range(2, n)])))
        with torch.no_grad():
            scales.append(float(_mse(run(c.model, c.schedule, c.x_T, [1.0] * n)[0], c.target)))

    def loss_fn() -> Tensor:
        total = torch.zeros((), dtype=torch.float64)
        for c, f, s in zip(cases, feats, scales):
            ratios = (f @ coef).clamp(*cpr.bounds)
            total = total + joint_loss(c.model, c.schedule, c.x_T, c.target, ratios) / s
        return total / len(cases)

    opt = torch.optim.Adam([coef], lr=lr)
    best = (math.inf, coef.detach().clone())
    history = []
    for it in range(iters + 1):
        loss = loss_fn()
        history.append(float(loss.detach()))
        if history[-1] < best[0]:
            best = (history[-1], coef.detach().clone())
        if it == iters:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
        if progress is not None:
            progress(it + 1, iters)
    out = replace(cpr, coef=best[1].numpy().reshape(cpr.coef.shape).copy())
    return out, history
