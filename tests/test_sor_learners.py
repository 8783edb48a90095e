"""SOR ω learners: the Tsallis-INF distribution, the model Poisson problem, determinism, replay,
ChebCB tracking a context-dependent optimum given by Young's theory."""

import math

import numpy as np
import pytest
from scipy.optimize import minimize

from steptune.evaluators.linear import RepeatedPoisson, build_cost_table
from steptune.search.sor_learners import (
    DEFAULT_GRID,
    AdaptiveSOR,
    ChebCB,
    TsallisINF,
    TsallisINFBins,
    make_learner,
    replay_table,
    tsallis_probabilities,
)


def test_tsallis_probabilities_solve_the_regularised_problem():
    L = np.array([0.0, 0.3, 1.2, 2.5, 0.1])
    eta = 0.7
    p = tsallis_probabilities(L, eta)

    def objective(q):
        return L @ q - (4 / eta) * np.sqrt(np.clip(q, 0, None)).sum()

    ref = minimize(objective, np.full(5, 0.2), method="SLSQP", bounds=[(1e-12, 1)] * 5,
                   constraints=[{"type": "eq", "fun": lambda q: q.sum() - 1}], options={"ftol": 1e-14})
    assert p.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(p, ref.x, atol=1e-5)


def young_iterations(omega, mu, eps=1e-8):
    """Asymptotic SOR iterations for a consistently ordered matrix with Jacobi radius μ (Young's curve)."""
    w_star = 2 / (1 + math.sqrt(1 - mu * mu))
    if omega >= w_star:
        rho = omega - 1
    else:
        rho = ((omega * mu + math.sqrt(omega * omega * mu * mu - 4 * (omega - 1))) / 2) ** 2
    return math.ceil(math.log(eps) / math.log(rho))


def test_tsallis_inf_concentrates_near_the_classical_optimum_on_the_model_problem():
    seq = RepeatedPoisson(m=32, steps=1, seed=0)  # ω* = 1.826: arm 1.85 is nearest and cheapest
    table = build_cost_table(seq)  # one system; repeated below
    costs = np.repeat(table.iterations, 400, axis=0)
    learner = TsallisINF(seed=0)
    replay_table(learner, costs)
    p = learner._probabilities(None)
    nearest = int(np.argmin(np.abs(np.asarray(DEFAULT_GRID) - seq.optimal_omega())))
    assert int(np.argmax(p)) == nearest
    assert p[nearest] > 0.5


def test_learners_are_deterministic_given_a_seed():
    rng = np.random.default_rng(0)
    costs = rng.integers(20, 300, size=(150, 20)).astype(float)
    ctx = rng.uniform(0, 1, 150)
    for make in (lambda s: TsallisINF(seed=s), lambda s: ChebCB(seed=s), lambda s: TsallisINFBins(seed=s)):
        a, b, c = (replay_table(make(s), costs, ctx) for s in (3, 3, 4))
        assert np.array_equal(a, b) and not np.array_equal(a, c)


@pytest.mark.parametrize("name", ["tsallis-inf", "tsallis-inf-cb", "chebcb"])
def test_replaying_stored_rounds_rebuilds_the_state(name):
    rng = np.random.default_rng(1)
    costs = rng.integers(20, 300, size=(120, 20)).astype(float)
    ctx = rng.uniform(0, 1, 120)
    full = make_learner(name, seed=5)
    arms = replay_table(full, costs, ctx)
    first = make_learner(name, seed=5)
    rounds = [(int(arms[t]), costs[t, arms[t]], {"x": ctx[t]}) for t in range(80)]
    resumed = make_learner(name, seed=5, context_key="x")
    assert resumed.replay(rounds) == 0
    replay_table(first, costs[:80], ctx[:80])
    rest = replay_table(resumed, costs[80:], ctx[80:])
    assert np.array_equal(rest, arms[80:])
    for attr in ("losses", "theta"):
        if hasattr(full, attr):
            np.testing.assert_array_equal(getattr(full, attr), getattr(resumed, attr))


def test_replay_tells_foreign_arms_as_they_were():
    learner = TsallisINF(seed=0)
    assert learner.replay([(19, 500.0, {}), (19, 480.0, {})]) >= 1
    assert learner.n == 2 and learner.losses[19] > learner.losses[0]


def test_chebcb_tracks_the_context_dependent_optimum():
    """Costs from Young's curve for A + cI (μ = 4 cos πh/(4 + c)); the optimum moves with c."""
    m = 10
    rng = np.random.default_rng(2)
    T = 1500
    c = -0.15 + 0.6 * rng.beta(0.5, 1.5, T)
    mu = 4 * math.cos(math.pi / (m + 1)) / (4 + c)
    costs = np.array([[young_iterations(w, u) for w in DEFAULT_GRID] for u in mu], dtype=float)
    learner = ChebCB(seed=0, context_range=(-0.15, 0.45))
    arms = replay_table(learner, costs, c)
    late = slice(1000, T)
    played = costs[np.arange(T), arms][late].mean()
    assert played <= 1.1 * costs[late].min(axis=1).mean()
    assert played < 0.75 * costs[late].mean(axis=0).min()  # beats the best fixed ω by a margin


def test_adaptive_policy_restarts_below_the_last_omega_and_replays():
    a = AdaptiveSOR()
    assert a.ask().omega == 1.0
    a.tell(50, final_omega=1.8)
    assert a.ask().omega == pytest.approx(1.4)

    class Row:
        def __init__(self, omega):
            self.omega, self.cost, self.arm, self.context = omega, 10.0, None, {}

    b = AdaptiveSOR()
    b.replay([Row(1.6), Row(1.8)])
    assert b.t == 2 and b.ask().omega == pytest.approx(1.4)
