"""The online loop: a policy picks ω for each system of a sequence, the system is solved, the cost
is told back and (optionally) recorded; plus the baselines read off a cost table."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from steptune.evaluators.linear import solvers
from steptune.evaluators.linear.spectra import jacobi_radius_lanczos

from .sor_learners import AdaptiveSOR, OmegaLearner, YoungSOR, replay_table, warm_up


@dataclass(frozen=True)
class RoundResult:
    round: int
    arm: int | None
    omega: float  # the ω solved with (the final one for adaptive SOR)
    context: dict  # the instance's context
    iterations: int
    converged: bool
    seconds: float  # solve wall time
    learner_seconds: float  # ask + tell wall time
    omega_start: float | None = None  # adaptive SOR only
    probability: float | None = None
    extra: dict = field(default_factory=dict)  # what the learner needs to replay the round (young: factor, prior)
    probe_seconds: float = 0.0  # Lanczos prior, when one was taken before this solve
    probe_matvecs: int = 0


def run_sequence(seq, policy: OmegaLearner | AdaptiveSOR | YoungSOR, *, solver: str = "sor", kernel: str = "pyamg",
                 tol: float = solvers.DEFAULT_TOL, maxiter: int = solvers.DEFAULT_MAXITER, start: int = 0,
                 stop: int | None = None, record: Callable[[RoundResult], None] | None = None,
                 progress: Callable[[RoundResult], None] | None = None) -> list[RoundResult]:
    """Solve systems ``start``…``stop − 1`` of ``seq`` with ω from ``policy``; each round is passed to
    ``record`` as soon as it is done (so an error later in the sequence leaves it recorded)."""
    stop = len(seq) if stop is None else min(int(stop), len(seq))
    adaptive = isinstance(policy, AdaptiveSOR)
    young = isinstance(policy, YoungSOR)
    if adaptive and solver != "sor":
        raise ValueError("adaptive SOR adapts plain SOR; use --solver sor with it")
    if young and solver != "sor":
        raise ValueError("the young learner reads Young's relation off plain SOR solves; use --solver sor with it")
    key = getattr(policy, "context_key", None)
    warm_up()
    out = []
    state = seq.start(start)
    for t in range(start, stop):
        system = seq.system(t, state)
        extra, probe_seconds, probe_matvecs = {}, 0.0, 0
        if young and policy.wants_prior:
            tick = time.perf_counter()
            mu, probe_matvecs = jacobi_radius_lanczos(system.A, policy.prior_steps, policy.seed)
            policy.tell_prior(mu)
            probe_seconds = time.perf_counter() - tick
            extra = {"prior_mu": mu, "probe_matvecs": probe_matvecs}
        tick = time.perf_counter()
        arm = policy.ask(system.context.get(key) if key else None)
        asked = time.perf_counter() - tick
        if adaptive:
            res = solvers.adaptive_sor(system.A, system.b, arm.omega, x0=system.x0, tol=tol, maxiter=maxiter,
                                       omega_max=policy.omega_max, window=policy.window, agree=policy.agree)
        else:
            res = solvers.solve(system.A, system.b, arm.omega, solver=solver, x0=system.x0, tol=tol, maxiter=maxiter,
                                kernel=kernel, trace=young)
        tick = time.perf_counter()
        if adaptive:
            policy.tell(res.iterations, final_omega=res.omega)
        elif young:
            policy.tell(res.iterations, residuals=res.residuals)
            extra.update(policy.last)
        else:
            policy.tell(res.iterations)
        told = time.perf_counter() - tick
        r = RoundResult(t, arm.index, res.omega, dict(system.context), res.iterations, res.converged, res.seconds,
                        asked + told, arm.omega if adaptive else None, None if adaptive else arm.probability,
                        extra, probe_seconds, probe_matvecs)
        if record is not None:
            record(r)
        out.append(r)
        if progress is not None:
            progress(r)
        state = seq.advance(t, state, res.x)
    return out


def adaptive_costs(seq, policy: AdaptiveSOR, tol: float = solvers.DEFAULT_TOL,
                   maxiter: int = solvers.DEFAULT_MAXITER) -> np.ndarray:
    """Iterations of adaptive SOR on every instance of a sequence (compiled kernel, no recording)."""
    return np.array([r.iterations for r in run_sequence(seq, policy, solver="sor", kernel="numba", tol=tol,
                                                        maxiter=maxiter)])


def table_baselines(table) -> dict[str, np.ndarray]:
    """Per-instance iterations of the table's baselines: Gauss–Seidel (ω = 1, when on the grid), every
    fixed grid ω, the best fixed ω in hindsight, and the instance-optimal grid ω."""
    out = {}
    its = table.iterations
    ones = np.flatnonzero(np.isclose(table.omegas, 1.0))
    if ones.size:
        out["gauss-seidel"] = its[:, ones[0]]
    arm, _ = table.best_fixed()
    out[f"best fixed ω = {table.omegas[arm]:.3f}"] = its[:, arm]
    out["instance-optimal (grid)"] = its.min(axis=1)
    return out


def replay_costs(learner: OmegaLearner, table) -> np.ndarray:
    """Per-instance iterations of ``learner`` replayed on a cost table."""
    arms = replay_table(learner, table.iterations, None if np.all(np.isnan(table.contexts)) else table.contexts)
    return table.iterations[np.arange(len(arms)), arms]
