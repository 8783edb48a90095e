"""The young SOR learner against closed forms: the 5-point Laplacian is consistently ordered with Jacobi
radius μ = cos(πh), so one solve's residual history gives μ by Young's relation, and the learner's ω goes
to Young's optimum 2/(1 + √(1 − μ²)); the operator families' Jacobi radii against dense eigenvalues."""

import math
from types import SimpleNamespace

import numpy as np
import pytest

from steptune.evaluators.linear import OperatorFamily, RepeatedPoisson, poisson_2d, solve
from steptune.evaluators.linear.spectra import (
    convergence_factor,
    jacobi_radius_from_factor,
    jacobi_radius_lanczos,
    sor_factor,
)
from steptune.search.sor_driver import run_sequence
from steptune.search.sor_learners import OFFSETS, YoungSOR, make_learner

M = 20
MU = math.cos(math.pi / (M + 1))
OMEGA_STAR = 2 / (1 + math.sqrt(1 - MU * MU))


@pytest.mark.parametrize("kernel", ["pyamg", "numba"])
@pytest.mark.parametrize("omega", [1.0, 1.3, 1.6])
def test_one_solve_below_the_optimum_gives_the_jacobi_radius(kernel, omega):
    A = poisson_2d(M)
    b = np.random.default_rng(0).standard_normal(M * M)
    res = solve(A, b, omega, kernel=kernel, trace=True)
    assert res.residuals.shape == (res.iterations + 1,)
    lam = convergence_factor(res.residuals)
    assert lam == pytest.approx(sor_factor(omega, MU), rel=2e-3)
    assert jacobi_radius_from_factor(lam, omega) == pytest.approx(MU, abs=1e-3)


def test_lanczos_prior_is_close_to_the_jacobi_radius_from_below():
    mu, used = jacobi_radius_lanczos(poisson_2d(M), steps=40)
    assert used == 40
    assert MU - 2e-3 < mu <= MU + 1e-12


def test_omega_converges_to_youngs_optimum_on_the_model_problem():
    seq = RepeatedPoisson(m=M, steps=40, seed=0)
    learner = YoungSOR(seed=0)
    rounds = run_sequence(seq, learner, kernel="numba")
    assert rounds[0].omega == 1.0  # Gauss–Seidel first: its history is the first observation
    assert 1.0 - math.exp(learner.predict(None)[0]) == pytest.approx(MU, abs=1e-3)
    tail = [r.omega for r in rounds[-10:]]
    assert all(abs(w - OMEGA_STAR) < 0.01 for w in tail)
    best = solve(seq.A, seq.b, OMEGA_STAR, kernel="numba").iterations
    assert max(r.iterations for r in rounds[-10:]) <= 1.1 * best


def test_replaying_stored_rounds_rebuilds_the_state():
    seq = OperatorFamily("reaction", steps=60, m=8, seed=3)
    make = lambda: make_learner("young", seed=3, context_range=seq.context_range,  # noqa: E731
                                context_key=seq.context_key, prior="lanczos")
    full = make()
    rounds = run_sequence(seq, full, kernel="numba")
    stored = [SimpleNamespace(omega=r.omega, cost=float(r.iterations), context={**r.context, **r.extra})
              for r in rounds[:45]]
    resumed = make()
    assert resumed.replay(stored) == 0
    first = make()
    run_sequence(seq, first, kernel="numba", stop=45)
    for t in range(45, 60):
        c = float(seq.values[t])
        assert resumed.ask(c).omega == first.ask(c).omega == rounds[t].omega
        resumed.tell(rounds[t].iterations, factor=rounds[t].extra["factor"])
        first.tell(rounds[t].iterations, factor=rounds[t].extra["factor"])


@pytest.mark.parametrize("family", ["laplace3d", "anisotropic"])
def test_family_jacobi_radius_matches_dense_eigenvalues(family):
    seq = OperatorFamily(family, steps=4, m=5, seed=1)
    for t in range(4):
        A = seq.matrix(t).toarray()
        J = np.eye(len(A)) - A / np.diag(A)[:, None]
        assert seq.jacobi_radius(t) == pytest.approx(np.abs(np.linalg.eigvals(J)).max(), rel=1e-10)


def test_young_learner_refuses_other_solvers():
    with pytest.raises(ValueError, match="use --solver sor"):
        run_sequence(RepeatedPoisson(m=4, steps=2), YoungSOR(), solver="ssor")


def _told_two_solves_below_the_optimum(mu):
    learner = YoungSOR(seed=0)
    for _ in range(2):  # Gauss–Seidel, then an exploring solve: their factors are Young's
        omega = learner.ask().omega
        assert omega < 2 / (1 + math.sqrt(1 - mu * mu)) - 0.1
        learner.tell(200, factor=sor_factor(omega, mu))
    return learner


@pytest.mark.parametrize("ratio, falls_back", [(1.0, False), (3.0, True)])
def test_offset_bandit_takes_over_only_where_youngs_predictions_miss(ratio, falls_back):
    mu = 0.95
    learner = _told_two_solves_below_the_optimum(mu)
    for _ in range(40):
        omega = learner.ask().omega
        learner.tell(ratio * math.log(1e-8) / math.log(sor_factor(omega, mu)))
    assert learner.fallback is falls_back
    arm = learner.ask()
    base = 2 / (1 + math.sqrt(1 - mu * mu))
    if falls_back:
        model = learner.model_omega(None)
        assert base - 0.01 < model <= base
        assert arm.omega == pytest.approx(2 - (2 - model) * math.exp(OFFSETS[arm.index]))
    else:  # Young's optimum, lowered a little by the fit's standard error
        assert arm.index is None and base - 0.01 < arm.omega <= base


def test_family_cost_table_replays_the_online_iterations_and_carries_the_context():
    from steptune.evaluators.linear import build_cost_table
    from steptune.search.sor_learners import FixedOmega

    seq = OperatorFamily("ninepoint", steps=6, m=6, seed=2)
    table = build_cost_table(seq, omegas=[1.0, 1.5])
    np.testing.assert_array_equal(table.contexts, seq.values)
    online = run_sequence(seq, FixedOmega(1.5), kernel="numba")
    assert [r.iterations for r in online] == table.iterations[:, 1].tolist()  # x0 = 0: the table is exact
