"""SOR / SSOR / SSOR-PCG kernels against a plain dense reference, the direct solve and Young's theory."""

import math
import os

import numpy as np
import pytest
import scipy.linalg as la
import scipy.sparse as sp
import scipy.sparse.linalg as spla
from pyamg.relaxation import relaxation

from steptune.evaluators.linear import (
    Heat2D,
    RepeatedPoisson,
    ShiftedLaplacian,
    adaptive_sor,
    as_csr,
    build_cost_table,
    jacobi_radius_poisson,
    optimal_omega,
    poisson_2d,
    solve,
)


def reference_sor_iterations(A, b, omega, tol, maxiter=20_000, symmetric=False):
    """Textbook SOR with dense triangular solves: x ← x + (D/ω + L)⁻¹ r (then the backward half)."""
    A = A.toarray()
    D = np.diag(np.diag(A))
    lower = D / omega + np.tril(A, -1)
    upper = D / omega + np.triu(A, 1)
    x = np.zeros_like(b)
    target = tol * np.linalg.norm(b)
    for k in range(1, maxiter + 1):
        x = x + la.solve_triangular(lower, b - A @ x, lower=True)
        if symmetric:
            x = x + la.solve_triangular(upper, b - A @ x, lower=False)
        if np.linalg.norm(b - A @ x) <= target:
            return k
    return maxiter


def random_spd(n, seed):
    rng = np.random.default_rng(seed)
    M = sp.random(n, n, density=0.08, random_state=seed)
    A = (M + M.T) * 0.5
    A = A + sp.diags(np.abs(A).sum(axis=1).A1 + rng.uniform(0.05, 0.5, n))  # diagonally dominant
    return as_csr(A)


@pytest.mark.parametrize("matrix", ["poisson", "shifted", "random"])
@pytest.mark.parametrize("omega", [1.0, 1.3, 1.7, 1.9])
def test_sor_iterations_match_reference(matrix, omega):
    A = {"poisson": lambda: poisson_2d(7), "shifted": lambda: as_csr(poisson_2d(6) - 0.1 * sp.identity(36)),
         "random": lambda: random_spd(40, 3)}[matrix]()
    b = np.random.default_rng(1).standard_normal(A.shape[0])
    ref = reference_sor_iterations(A, b, omega, 1e-8)
    assert solve(A, b, omega, kernel="pyamg").iterations == ref
    assert solve(A, b, omega, kernel="numba").iterations == ref


@pytest.mark.parametrize("omega", [1.0, 1.5, 1.8])
def test_ssor_iterations_match_reference(omega):
    A = poisson_2d(6)
    b = np.random.default_rng(2).standard_normal(36)
    ref = reference_sor_iterations(A, b, omega, 1e-8, symmetric=True)
    assert solve(A, b, omega, solver="ssor", kernel="pyamg").iterations == ref
    assert solve(A, b, omega, solver="ssor", kernel="numba").iterations == ref


def test_pyamg_symmetric_sweep_ignores_omega_but_ours_does_not():
    A = poisson_2d(5)
    b = np.ones(25)
    x_sym = np.zeros(25)
    relaxation.sor(A, x_sym, b, 1.5, iterations=1, sweep="symmetric")
    x_gs = np.zeros(25)
    relaxation.gauss_seidel(A, x_gs, b, iterations=1, sweep="symmetric")
    assert np.allclose(x_sym, x_gs)  # the pitfall: ω was dropped
    ours = solve(A, b, 1.5, solver="ssor", maxiter=1, kernel="pyamg").x
    upper = np.diag(A.diagonal()) / 1.5 + np.triu(A.toarray(), 1)
    lower = np.diag(A.diagonal()) / 1.5 + np.tril(A.toarray(), -1)
    x = la.solve_triangular(lower, b, lower=True)
    x = x + la.solve_triangular(upper, b - A @ x, lower=False)
    assert np.allclose(ours, x) and not np.allclose(ours, x_gs)


@pytest.mark.parametrize("kernel", ["pyamg", "numba"])
@pytest.mark.parametrize("omega", [1.0, 1.4, 1.9])
def test_ssor_pcg_converges_to_direct_solution(kernel, omega):
    A = random_spd(150, 7) if omega != 1.4 else poisson_2d(12)
    b = np.random.default_rng(4).standard_normal(A.shape[0])
    exact = spla.spsolve(A.tocsc(), b)
    res = solve(A, b, omega, solver="ssor-pcg", tol=1e-10, kernel=kernel)
    assert res.converged and res.iterations < A.shape[0]
    assert np.linalg.norm(res.x - exact) <= 1e-8 * np.linalg.norm(exact) * np.linalg.cond(A.toarray())
    assert np.linalg.norm(b - A @ res.x) <= 1e-10 * np.linalg.norm(b)


def test_pcg_kernels_agree_and_warm_start_counts_from_b():
    A = poisson_2d(10)
    b = np.random.default_rng(5).standard_normal(100)
    a = solve(A, b, 1.5, solver="ssor-pcg", kernel="pyamg")
    c = solve(A, b, 1.5, solver="ssor-pcg", kernel="numba")
    assert a.iterations == c.iterations and np.allclose(a.x, c.x, rtol=1e-9, atol=1e-12)
    assert solve(A, b, 1.5, solver="ssor-pcg", x0=a.x).iterations == 0  # already within tol·‖b‖


def test_classical_optimum_of_the_model_problem():
    m = 15
    A = poisson_2d(m)
    b = np.random.default_rng(6).standard_normal(m * m)
    omegas = np.round(np.arange(1.60, 1.96, 0.01), 2)
    its = [solve(A, b, w, kernel="numba").iterations for w in omegas]
    w_star = 2.0 / (1.0 + math.sin(math.pi / (m + 1)))
    assert optimal_omega(jacobi_radius_poisson(m)) == pytest.approx(w_star)
    assert abs(omegas[int(np.argmin(its))] - w_star) <= 0.03
    # Gauss–Seidel's asymptotic residual reduction per sweep is μ² = cos²(πh); SOR's at ω* is ω* − 1
    def late_rate(omega, k0, k1):
        r = [np.linalg.norm(b - A @ solve(A, b, omega, tol=1e-30, maxiter=k, kernel="pyamg").x) for k in (k0, k1)]
        return (r[1] / r[0]) ** (1.0 / (k1 - k0))

    assert late_rate(1.0, 200, 300) == pytest.approx(math.cos(math.pi / (m + 1)) ** 2, rel=2e-3)
    assert late_rate(w_star, 40, 80) == pytest.approx(w_star - 1.0, rel=0.05)


def test_adaptive_sor_finds_the_optimum_from_gauss_seidel():
    m = 31
    A = poisson_2d(m)
    b = np.random.default_rng(7).standard_normal(m * m)
    w_star = 2.0 / (1.0 + math.sin(math.pi / (m + 1)))
    res = adaptive_sor(A, b, 1.0)
    best = solve(A, b, w_star, kernel="numba").iterations
    assert res.converged and abs(res.omega - w_star) < 0.05
    assert res.iterations < 1.6 * best < 0.2 * solve(A, b, 1.0, kernel="numba").iterations


def test_shifted_table_equals_single_solves():
    seq = ShiftedLaplacian(steps=12, m=6, variance="high", seed=3)
    omegas = [1.0, 1.4, 1.8]
    table = build_cost_table(seq, omegas)
    for t in (0, 5, 11):
        s = seq.system(t)
        assert s.context["c"] == pytest.approx(seq.shifts[t])
        for j, w in enumerate(omegas):
            assert table.iterations[t, j] == solve(s.A, s.b, w, kernel="pyamg").iterations


def test_heat_table_rows_equal_warm_started_solves():
    seq = Heat2D(nx=12, steps=8, dt=0.02)
    omegas = [1.0, 1.5]
    table = build_cost_table(seq, omegas, solver="ssor-pcg")
    state = seq.start(0)
    for t in range(8):
        s = seq.system(t, state)
        res = [solve(s.A, s.b, w, solver="ssor-pcg", x0=s.x0, kernel="pyamg") for w in omegas]
        assert list(table.iterations[t]) == [r.iterations for r in res]
        state = seq.advance(t, state, min(res, key=lambda r: r.iterations).x)
    assert np.all(table.contexts >= 0)
    np.testing.assert_allclose(seq.start(8), state, rtol=1e-6, atol=1e-9)  # resuming marches to the same state


@pytest.mark.skipif(not os.environ.get("STEPTUNE_TEST_RAY"), reason="starts Ray (about 40 s here); "
                    "set STEPTUNE_TEST_RAY=1")
def test_cost_table_on_ray_equals_the_local_one():
    ray = pytest.importorskip("ray")
    seq = ShiftedLaplacian(steps=9, m=5, variance="low", seed=1)
    poisson = RepeatedPoisson(m=6, steps=3)
    local = [build_cost_table(seq), build_cost_table(poisson, solver="ssor-pcg")]
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        remote = [build_cost_table(seq, ray=True, chunks=3), build_cost_table(poisson, solver="ssor-pcg", ray=True)]
    finally:
        ray.shutdown()
    for a, b in zip(local, remote):
        assert np.array_equal(a.iterations, b.iterations) and np.array_equal(a.converged, b.converged)
