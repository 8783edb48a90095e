"""Compiled (numba) SOR kernels on CSR arrays.

PyAMG's C++ sweeps serve single solves (see :mod:`.solvers`); these kernels serve what PyAMG cannot:
a whole convergence loop in compiled code, a diagonal shift without building a new matrix, SSOR with
ω ≠ 1, adaptive SOR that changes ω inside a solve, and cost tables over many (instance, ω) pairs in
parallel. The sweep is the same row recurrence as PyAMG's ``sor_gauss_seidel``:
x_i ← (1 − ω) x_i + ω (b_i − Σ_{j≠i} a_ij x_j) / a_ii.
"""

from __future__ import annotations

import math

import numpy as np

from steptune.evaluators.compiled import numba

_JIT = {"cache": True, "nogil": True}


@numba.njit(**_JIT)
def sor_sweep(indptr, indices, data, x, b, omega, shift, forward):
    """One in-place SOR sweep on (A + shift·I) x = b, forward (rows 0..n-1) or backward."""
    n = x.shape[0]
    for k in range(n):
        i = k if forward else n - 1 - k
        diag = shift
        sigma = 0.0
        for p in range(indptr[i], indptr[i + 1]):
            j = indices[p]
            if j == i:
                diag += data[p]
            else:
                sigma += data[p] * x[j]
        x[i] = (1.0 - omega) * x[i] + omega * (b[i] - sigma) / diag


@numba.njit(**_JIT)
def residual(indptr, indices, data, x, b, shift, r):
    """r ← b − (A + shift·I) x; returns ‖r‖₂."""
    n = x.shape[0]
    s = 0.0
    for i in range(n):
        acc = b[i] - shift * x[i]
        for p in range(indptr[i], indptr[i + 1]):
            acc -= data[p] * x[indices[p]]
        r[i] = acc
        s += acc * acc
    return math.sqrt(s)


@numba.njit(**_JIT)
def sor_solve(indptr, indices, data, x, b, omega, shift, tol, maxiter, symmetric):
    """SOR (or SSOR: forward then backward sweep) from x in place until ‖r_k‖ ≤ tol·‖r_0‖.

    Returns (iterations, converged)."""
    return sor_solve_traced(indptr, indices, data, x, b, omega, shift, tol, maxiter, symmetric, np.empty(0))


@numba.njit(**_JIT)
def sor_solve_traced(indptr, indices, data, x, b, omega, shift, tol, maxiter, symmetric, history):
    """:func:`sor_solve` that also writes ‖r_k‖ into ``history[k]`` for k = 0…iterations (as far as
    ``history`` reaches). Returns (iterations, converged)."""
    r = np.empty_like(x)
    r0 = residual(indptr, indices, data, x, b, shift, r)
    keep = history.shape[0]
    if keep > 0:
        history[0] = r0
    target = tol * r0
    if target == 0.0:
        return 0, True
    for k in range(1, maxiter + 1):
        sor_sweep(indptr, indices, data, x, b, omega, shift, True)
        if symmetric:
            sor_sweep(indptr, indices, data, x, b, omega, shift, False)
        rn = residual(indptr, indices, data, x, b, shift, r)
        if k < keep:
            history[k] = rn
        if not math.isfinite(rn):
            return k, False
        if rn <= target:
            return k, True
    return maxiter, False


@numba.njit(**_JIT)
def ssor_apply(indptr, indices, data, r, omega, shift, z):
    """z ← M⁻¹ r for the SSOR preconditioner M = ω/(2−ω) · W D⁻¹ Wᵀ, W = D/ω + L: one forward and one
    backward SOR sweep from z = 0."""
    z[:] = 0.0
    sor_sweep(indptr, indices, data, z, r, omega, shift, True)
    sor_sweep(indptr, indices, data, z, r, omega, shift, False)


@numba.njit(**_JIT)
def ssor_pcg(indptr, indices, data, x, b, omega, shift, tol, maxiter):
    """SSOR-preconditioned CG from x in place until ‖r_k‖ ≤ tol·‖b‖. Returns (iterations, converged)."""
    n = x.shape[0]
    r = np.empty(n)
    z = np.empty(n)
    q = np.empty(n)
    bnorm = 0.0
    for i in range(n):
        bnorm += b[i] * b[i]
    target = tol * math.sqrt(bnorm)
    rn = residual(indptr, indices, data, x, b, shift, r)
    if rn <= target:
        return 0, True
    ssor_apply(indptr, indices, data, r, omega, shift, z)
    p = z.copy()
    rz = np.dot(r, z)
    for k in range(1, maxiter + 1):
        # q = (A + shift I) p
        for i in range(n):
            acc = shift * p[i]
            for t in range(indptr[i], indptr[i + 1]):
                acc += data[t] * p[indices[t]]
            q[i] = acc
        pq = np.dot(p, q)
        if not (pq > 0.0):
            return k, False  # not positive definite along p (or NaN)
        alpha = rz / pq
        x += alpha * p
        r -= alpha * q
        rn = math.sqrt(np.dot(r, r))
        if not math.isfinite(rn):
            return k, False
        if rn <= target:
            return k, True
        ssor_apply(indptr, indices, data, r, omega, shift, z)
        rz_new = np.dot(r, z)
        beta = rz_new / rz
        rz = rz_new
        p *= beta
        p += z
    return maxiter, False


@numba.njit(**_JIT)
def adaptive_sor(indptr, indices, data, x, b, omega0, omega_max, shift, tol, maxiter, window, agree):
    """Classical adaptive SOR (Hageman–Young): sweep with ω, measure the residual reduction factor λ
    per window of ``window`` sweeps, and once two consecutive windows agree (|Δλ| ≤ agree·(1 − λ))
    while ω is below the optimum, read the Jacobi radius from Young's relation
    β = (λ + ω − 1)/(ω √λ), move to ω*(β) = 2/(1 + √(1 − β²)) (at most ``omega_max``) and go on.

    Returns (iterations, converged, final ω, last β estimate or −1)."""
    r = np.empty_like(x)
    r0 = residual(indptr, indices, data, x, b, shift, r)
    target = tol * r0
    if target == 0.0:
        return 0, True, omega0, -1.0
    omega = omega0
    beta = -1.0
    since = 0  # sweeps since ω last changed
    anchor = r0
    lam_prev = -1.0
    for k in range(1, maxiter + 1):
        sor_sweep(indptr, indices, data, x, b, omega, shift, True)
        rn = residual(indptr, indices, data, x, b, shift, r)
        if not math.isfinite(rn):
            return k, False, omega, beta
        if rn <= target:
            return k, True, omega, beta
        since += 1
        if since == 1:
            anchor = rn  # the first sweep after a change is transient
            lam_prev = -1.0
        elif (since - 1) % window == 0:
            lam = (rn / anchor) ** (1.0 / window)
            anchor = rn
            if 0.0 < lam < 1.0 and lam_prev > 0.0 and abs(lam - lam_prev) <= agree * (1.0 - lam):
                b2 = (lam + omega - 1.0) ** 2 / (omega * omega * lam)
                if b2 < 1.0:
                    est = min(2.0 / (1.0 + math.sqrt(1.0 - b2)), omega_max)
                    if est > omega + 1e-3:
                        beta = math.sqrt(b2)
                        omega = est
                        since = 0
            lam_prev = lam
    return maxiter, False, omega, beta


@numba.njit(parallel=True, cache=True)
def sor_table_shifted(indptr, indices, data, shifts, rhs, omegas, tol, maxiter, symmetric):
    """Iterations of SOR from x = 0 for every instance (A + shifts[t] I, rhs[t]) and every ω.

    Returns (iterations[T, d], converged[T, d])."""
    T = shifts.shape[0]
    d = omegas.shape[0]
    n = rhs.shape[1]
    its = np.zeros((T, d), dtype=np.int64)
    ok = np.zeros((T, d), dtype=np.bool_)
    for job in numba.prange(T * d):
        t = job // d
        w = job % d
        x = np.zeros(n)
        k, c = sor_solve(indptr, indices, data, x, rhs[t], omegas[w], shifts[t], tol, maxiter, symmetric)
        its[t, w] = k
        ok[t, w] = c
    return its, ok


SOR, SSOR, SSOR_PCG = 0, 1, 2
METHOD_CODES = {"sor": SOR, "ssor": SSOR, "ssor-pcg": SSOR_PCG}


@numba.njit(parallel=True, cache=True)
def solve_each_omega(indptr, indices, data, shift, b, x0, omegas, tol, maxiter, method):
    """One system solved once per ω (in parallel), each from x0. Returns (iterations[d], converged[d],
    solutions[d, n])."""
    d = omegas.shape[0]
    n = b.shape[0]
    its = np.zeros(d, dtype=np.int64)
    ok = np.zeros(d, dtype=np.bool_)
    xs = np.empty((d, n))
    for w in numba.prange(d):
        x = x0.copy()
        if method == SSOR_PCG:
            k, c = ssor_pcg(indptr, indices, data, x, b, omegas[w], shift, tol, maxiter)
        else:
            k, c = sor_solve(indptr, indices, data, x, b, omegas[w], shift, tol, maxiter, method == SSOR)
        its[w] = k
        ok[w] = c
        xs[w] = x
    return its, ok, xs
