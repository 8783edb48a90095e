"""The online loop: a policy picks ω for each system of a sequence, the system is solved, the cost
is told back and (optionally) recorded; plus the baselines read off a cost table."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from steptune.evaluators.linear import solvers

from .sor_learners import AdaptiveSOR, OmegaLearner, replay_table, warm_up


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


def run_sequence(seq, policy: OmegaLearner | AdaptiveSOR, *, solver: str = "sor", kernel: str = "pyamg",
                 tol: float = solvers.DEFAULT_TOL, maxiter: int = solvers.DEFAULT_MAXITER, start: int = 0,
                 stop: int | None = None, record: Callable[[RoundResult], None] | None = None,
                 progress: Callable[[RoundResult], None] | None = None) -> list[RoundResult]:
    """Solve systems ``start``…``stop − 1`` of ``seq`` with ω from ``policy``; each round is passed to
    ``record`` as soon as it is done (so an error later in the sequence leaves it recorded)."""
    stop = len(seq) if stop is None else min(int(stop), len(seq))
    adaptive = isinstance(policy, AdaptiveSOR)
    if adaptive and solver != "sor":
        raise ValueError("adaptive SOR adapts plain SOR; use --solver sor with it")
    key = getattr(policy, "context_key", None)
    warm_up()
    out = []
    state = seq.start(start)
    for t in range(start, stop):
        system = seq.system(t, state)
        tick = time.perf_counter()
        arm = policy.ask(system.context.get(key) if key else None)
        asked = time.perf_counter() - tick
        if adaptive:
            res = solvers.adaptive_sor(system.A, system.b, arm.omega, x0=system.x0, tol=tol, maxiter=maxiter,
                                       omega_max=policy.omega_max, window=policy.window, agree=policy.agree)
        else:
            res = solvers.solve(system.A, system.b, arm.omega, solver=solver, x0=system.x0, tol=tol, maxiter=maxiter,
                                kernel=kernel)
        tick = time.perf_counter()
        if adaptive:
            policy.tell(res.iterations, final_omega=res.omega)
        else:
            policy.tell(res.iterations)
        told = time.perf_counter() - tick
        r = RoundResult(t, arm.index, res.omega, dict(system.context), res.iterations, res.converged, res.seconds,
                        asked + told, arm.omega if adaptive else None, None if adaptive else arm.probability)
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
