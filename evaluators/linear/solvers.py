"""SOR, SSOR and SSOR-preconditioned CG on sparse SPD systems; cost = iterations to tolerance.

``kernel="pyamg"`` runs PyAMG's C++ sweeps (``pyamg.relaxation.relaxation.sor``) under a residual
check; ``kernel="numba"`` runs the whole loop compiled (:mod:`.kernels`). Both count the same
iterations (tests hold them to a plain dense reference). PyAMG's ``sweep="symmetric"`` ignores ω, so
SSOR here is always a forward sweep followed by a backward sweep, each with ω.

Tolerances: SOR stops when ‖r_k‖ ≤ tol·‖r_0‖; PCG stops when ‖r_k‖ ≤ tol·‖b‖ (as MATLAB's ``pcg``),
so a warm start that is already close counts few iterations.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from pyamg.relaxation import relaxation

from . import kernels

DEFAULT_TOL = 1e-8
DEFAULT_MAXITER = 10_000
SOLVERS = ("sor", "ssor", "ssor-pcg")
KERNELS = ("pyamg", "numba")


@dataclass(frozen=True)
class SolveResult:
    iterations: int
    converged: bool
    seconds: float
    x: np.ndarray
    omega: float  # the ω used (the final one for adaptive SOR)
    residuals: np.ndarray | None = None  # ‖r_k‖ for k = 0…iterations (SOR and SSOR, when asked with trace)


def as_csr(A) -> sp.csr_matrix:
    A = sp.csr_matrix(A, dtype=np.float64)
    A.sort_indices()
    return A


def solve(A: sp.csr_matrix, b: np.ndarray, omega: float, *, solver: str = "sor", x0: np.ndarray | None = None,
          tol: float = DEFAULT_TOL, maxiter: int = DEFAULT_MAXITER, kernel: str = "pyamg",
          trace: bool = False) -> SolveResult:
    """Solve A x = b with ``solver`` (sor, ssor or ssor-pcg) at relaxation ``omega``; ``trace`` keeps the
    residual norm of every SOR / SSOR iteration (``SolveResult.residuals``)."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; use one of {', '.join(SOLVERS)}")
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; use one of {', '.join(KERNELS)}")
    if not 0.0 < omega < 2.0:
        raise ValueError(f"omega {omega} is outside (0, 2), where SOR on an SPD matrix diverges")
    b = np.ascontiguousarray(b, dtype=np.float64)
    x = np.zeros_like(b) if x0 is None else np.array(x0, dtype=np.float64)
    trace = trace and solver != "ssor-pcg"
    history = np.empty(maxiter + 1 if trace and kernel == "numba" else 0)
    kept: list[float] | None = [] if trace and kernel == "pyamg" else None
    start = time.perf_counter()
    if kernel == "numba":
        if solver == "ssor-pcg":
            its, ok = kernels.ssor_pcg(A.indptr, A.indices, A.data, x, b, omega, 0.0, tol, maxiter)
        else:
            its, ok = kernels.sor_solve_traced(A.indptr, A.indices, A.data, x, b, omega, 0.0, tol, maxiter,
                                               solver == "ssor", history)
    elif solver == "ssor-pcg":
        its, ok = _pcg_pyamg(A, b, x, omega, tol, maxiter)
    else:
        its, ok = _sor_pyamg(A, b, x, omega, tol, maxiter, solver == "ssor", kept)
    seconds = time.perf_counter() - start
    residuals = None
    if trace:
        residuals = history[: int(its) + 1].copy() if kernel == "numba" else np.asarray(kept)
    return SolveResult(int(its), bool(ok), seconds, x, float(omega), residuals)


def _sor_pyamg(A, b, x, omega, tol, maxiter, symmetric, kept=None):
    r0 = np.linalg.norm(b - A @ x)
    if kept is not None:
        kept.append(float(r0))
    target = tol * r0
    if target == 0.0:
        return 0, True
    for k in range(1, maxiter + 1):
        relaxation.sor(A, x, b, omega, iterations=1, sweep="forward")
        if symmetric:
            relaxation.sor(A, x, b, omega, iterations=1, sweep="backward")
        rn = np.linalg.norm(b - A @ x)
        if kept is not None:
            kept.append(float(rn))
        if not np.isfinite(rn):
            return k, False
        if rn <= target:
            return k, True
    return maxiter, False


def ssor_preconditioner_pyamg(A, omega):
    """z = M⁻¹ r for the SSOR preconditioner: a forward then a backward PyAMG SOR sweep from zero."""

    def apply(r):
        z = np.zeros_like(r)
        relaxation.sor(A, z, r, omega, iterations=1, sweep="forward")
        relaxation.sor(A, z, r, omega, iterations=1, sweep="backward")
        return z

    return apply


def _pcg_pyamg(A, b, x, omega, tol, maxiter):
    precond = ssor_preconditioner_pyamg(A, omega)
    target = tol * np.linalg.norm(b)
    r = b - A @ x
    if np.linalg.norm(r) <= target:
        return 0, True
    z = precond(r)
    p = z.copy()
    rz = r @ z
    for k in range(1, maxiter + 1):
        q = A @ p
        pq = p @ q
        if not pq > 0.0:
            return k, False
        alpha = rz / pq
        x += alpha * p
        r -= alpha * q
        rn = np.linalg.norm(r)
        if not np.isfinite(rn):
            return k, False
        if rn <= target:
            return k, True
        z = precond(r)
        rz_new = r @ z
        p *= rz_new / rz
        p += z
        rz = rz_new
    return maxiter, False


def adaptive_sor(A, b, omega0: float = 1.0, *, x0=None, tol: float = DEFAULT_TOL, maxiter: int = DEFAULT_MAXITER,
                 omega_max: float = 1.99, window: int = 5, agree: float = 0.1) -> SolveResult:
    """Classical adaptive SOR (see :func:`.kernels.adaptive_sor`), starting at ``omega0``."""
    b = np.ascontiguousarray(b, dtype=np.float64)
    x = np.zeros_like(b) if x0 is None else np.array(x0, dtype=np.float64)
    start = time.perf_counter()
    its, ok, omega, _ = kernels.adaptive_sor(A.indptr, A.indices, A.data, x, b, omega0, omega_max, 0.0, tol,
                                             maxiter, window, agree)
    return SolveResult(int(its), bool(ok), time.perf_counter() - start, x, float(omega))
