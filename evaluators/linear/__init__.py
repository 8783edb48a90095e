"""steptune.evaluators.linear: sequences of SPD linear systems, SOR / SSOR / SSOR-PCG solvers with
compiled kernels, and cost tables for tuning the relaxation parameter ω."""

from .families import FAMILIES, OperatorFamily
from .matrices import LinearInputError, MatrixFolder, check_spd
from .problems import (
    Heat2D,
    LinearSystem,
    RepeatedPoisson,
    ShiftedLaplacian,
    heat_kappa,
    jacobi_radius_poisson,
    optimal_omega,
    poisson_2d,
)
from .solvers import DEFAULT_MAXITER, DEFAULT_TOL, SOLVERS, SolveResult, adaptive_sor, as_csr, solve
from .table import DEFAULT_GRID, CostTable, build_cost_table

PROBLEMS = ("shifted-laplacian", "heat2d", "poisson", *FAMILIES)


def make_sequence(problem: str, *, steps: int | None = None, nx: int = 100, m: int | None = 10,
                  variance: str = "high", seed: int = 0, matrices=None):
    """A sequence by name (or from a folder of matrices when ``matrices`` is given); ``steps`` None: 5000 systems,
    a family's own 300 for the short sweeps; ``m`` None takes a family's own grid side."""
    if matrices is not None:
        return MatrixFolder(matrices)
    if steps is None:
        steps = 300 if problem in FAMILIES else 5000
    if problem == "shifted-laplacian":
        return ShiftedLaplacian(steps, m=m or 10, variance=variance, seed=seed)
    if problem == "heat2d":
        return Heat2D(nx=nx, steps=steps)
    if problem == "poisson":
        return RepeatedPoisson(m=m or 10, steps=steps, seed=seed)
    if problem in FAMILIES:
        return OperatorFamily(problem, steps=steps, m=m, seed=seed)
    raise ValueError(f"unknown problem {problem!r}; use one of {', '.join(PROBLEMS)}")


__all__ = ["DEFAULT_GRID", "DEFAULT_MAXITER", "DEFAULT_TOL", "FAMILIES", "PROBLEMS", "SOLVERS", "CostTable", "Heat2D",
           "LinearInputError", "LinearSystem", "MatrixFolder", "OperatorFamily", "RepeatedPoisson", "ShiftedLaplacian",
           "SolveResult", "adaptive_sor", "as_csr", "build_cost_table", "check_spd", "heat_kappa",
           "jacobi_radius_poisson", "make_sequence", "optimal_omega", "poisson_2d", "solve"]
