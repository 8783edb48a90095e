"""S^3's fast paths give what the slow ones give: the extra-trees predictions equal sklearn's, the lambdas and
times converted a few at a time equal those converted one by one, repairing a repaired schedule changes nothing,
and a wide batch's picks are spread over step structures."""

import numpy as np
import pytest
import torch

from steptune.search import DecisionSpace
from steptune.search.s3 import Predictor, _spread, select_predictor
from steptune.space import noise


@pytest.fixture(scope="module")
def space():
    return DecisionSpace(noise.VPLinear(), 1.0, 1e-3)


def schedules(space, n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        s = space.random(int(rng.integers(3, 11)), rng)
        if s is not None:
            out.append(s)
    return out


def test_extra_trees_predictions_equal_sklearns():
    rng = np.random.default_rng(0)
    X = rng.random((120, 30))
    X[:, 5] = 0.0  # a constant feature, left out of the fit
    p = Predictor("extra-trees").fit(X, rng.choice([4, 5], 120), np.exp(rng.normal(size=120)))
    assert 5 not in p.columns
    Xt = rng.random((40, 30))
    np.testing.assert_array_equal(p.predict(Xt), p.model.predict(Xt[:, p.columns]))


def test_lambdas_and_times_converted_together_equal_one_by_one(space):
    ns = space.noise
    for s in schedules(space, 30):
        fresh = DecisionSpace(ns, space.t_start, space.t_end)
        one_by_one = [float(ns.lam(torch.tensor(t, dtype=torch.float64))) for t in s.times]
        np.testing.assert_array_equal(fresh.lams(s), one_by_one)
        lams = fresh.lams(s)[1:-1]
        assert fresh.ts_of(lams) == [fresh.t_of(x) for x in lams]


def test_repair_of_a_repaired_schedule_is_the_same_schedule(space):
    rng = np.random.default_rng(1)
    for s in schedules(space, 40, seed=2):
        m = space.mutate(s, rng)
        if m is None:
            continue
        assert space.repair(m) is m or space.repair(m) == m
        assert space.finish(m, m.nfe) == m


def test_spread_caps_each_structure_and_fills_when_it_must():
    order = list(range(12))
    structure = ["a"] * 8 + ["b", "c", "d", "e"]
    picks = _spread(order, structure.__getitem__, 9)  # cap: max(2, 9 / 3) = 3 per structure
    assert picks == [0, 1, 2, 8, 9, 10, 11, 3, 4]  # four others exist: three a's, then the best a's again
    assert _spread(order, structure.__getitem__, 2) == [0, 1]  # narrow batches take the ranking as it is


def test_per_nfe_selection_fits_one_model_per_nfe():
    """With one NFE, per-NFE selection is the shared one; with two whose scores depend on different features, the
    per-NFE models rank each NFE better than a shared model can."""
    rng = np.random.default_rng(3)
    n = 200
    X = rng.random((n, 6))
    nfes = np.repeat([4, 8], n // 2)
    X[:, 5] = nfes
    score = np.exp(np.where(nfes == 4, X[:, 0], -X[:, 0]) + 0.05 * rng.normal(size=n))
    one = nfes == 4
    assert (select_predictor(X[one], nfes[one], score[one], kinds=("gbr",))
            == select_predictor(X[one], nfes[one], score[one], kinds=("gbr",), per_nfe=True))
    shared = select_predictor(X, nfes, score, kinds=("extra-trees",))[1]["extra-trees"]
    per = select_predictor(X, nfes, score, kinds=("extra-trees",), per_nfe=True)[1]["extra-trees"]
    assert per > 0.8 and per > shared


def test_a_job_over_several_nfes_chooses_its_predictor_when_each_nfe_has_its_trials(space):
    """``auto`` first chooses the predictor kind once the trials per NFE reach ``min_train``, as a search of one NFE
    alone does, not once the trials of all NFEs together do; the kind it chose is the one ``select_predictor``
    picks on those trials; it chooses again when they have tripled, then only after tenfold growth."""
    from steptune.search import make_searcher
    from steptune.search.s3 import SELECT_GROWTH

    def smooth(c):
        return float(np.std(np.diff(space.lams(c.schedule)))) + 0.01 * c.schedule.steps[0].order

    def search(nfes, until):
        se = make_searcher("s3", space.noise, space.t_start, space.t_end, nfes, seed=0,
                           min_train=12, pool=20, presets=("ddim", "dpm-solver++-2m"))
        while not until(se):
            for c in se.ask(4 * len(nfes)):
                se.tell(c, smooth(c))
        return se

    for nfes in ([4, 6, 8], [4]):
        k, first = len(nfes), 12
        se = search(nfes, lambda se: se.tau_report)
        trials = se.tau_report[0]["trials"]
        assert first * k <= trials < first * k + 4 * k + 2 * k, (nfes, trials)
        X, nfe_of, scores = se._data()
        assert select_predictor(X[:trials], nfe_of[:trials], scores[:trials], seed=0, kinds=se.auto_kinds,
                                per_nfe=True)[0] == se.tau_report[0]["chosen"]
    assert SELECT_GROWTH == (3, 10)
    se = search([4], lambda se: len(se.trials) >= 30 * trials - 4)  # NFE 4 alone, just short of the third choice
    second = se.tau_report[1]["trials"]
    assert [r["trials"] for r in se.tau_report] == [trials, pytest.approx(3 * trials, abs=4)]
    se = search([4], lambda se: len(se.trials) >= 10 * second + 8)  # a choice is in place from the next ask on
    assert [r["trials"] for r in se.tau_report][2:] == [pytest.approx(10 * second, abs=4)]


def test_the_encoding_holds_each_schedules_positions_gaps_and_their_statistics():
    """The features the predictors rank on: each step's relative lambda position and gap, and the gaps' min, max and
    standard deviation, as numpy computes them, for schedules of every length the searchers make."""
    from steptune.search.s3 import N_GLOBAL_FEATURES, N_STEP_FEATURES, encode

    space = DecisionSpace(noise.get("ddpm-linear"), 0.999, 0.001)
    rng = np.random.default_rng(1)
    made = 0
    for nfe in range(2, 12):
        for _ in range(20):
            s = space.random(nfe, rng)
            if s is None:
                continue
            made += 1
            x = encode(s, space, 14)
            pos = (space.lams(s) - space.lam0) / space.span
            gaps = np.diff(pos)
            rows = x[:14 * N_STEP_FEATURES].reshape(14, N_STEP_FEATURES)
            n = len(s.steps)
            assert np.array_equal(rows[:n, 0], pos[1:]) and np.array_equal(rows[:n, 1], gaps)
            assert not rows[n:].any()
            glob = x[14 * N_STEP_FEATURES:]
            assert len(glob) == N_GLOBAL_FEATURES and glob[0] == s.nfe
            assert list(glob[6:9]) == [gaps.min(), gaps.max(), gaps.std()]
    assert made > 150


def test_schedules_encoded_together_get_the_rows_each_gets_alone():
    """An ask encodes its new children together (grouped by step count, their lambdas converted at once): each row
    is exactly the one :func:`encode` gives that schedule alone, each on a space that has converted nothing yet,
    for mixed lengths, late starts, t = 0 ends, analytical first steps and more steps than ``max_steps``."""
    from steptune.search.s3 import encode, encode_many

    def fresh():
        return DecisionSpace(noise.get("ddpm-linear"), 0.999, 0.001, min_start=0.5, zero_end=True)

    rng = np.random.default_rng(3)
    made = []
    while len(made) < 300:
        s = fresh().random(int(rng.integers(1, 13)), rng)
        if s is not None:
            made.append(s)
    assert {len(s.steps) for s in made} >= set(range(2, 13)) and {s.afs for s in made} == {"none", "zero"}
    assert any(s.steps[-1].t == 0 for s in made) and any(s.t_start < 0.999 for s in made)
    together = encode_many(made, fresh(), 10)
    alone = np.array([encode(s, fresh(), 10) for s in made])
    assert together.shape == alone.shape and np.array_equal(together, alone)


def test_the_best_trials_of_an_nfe_are_those_the_plain_searcher_ranks_first(space):
    """S^3 ranks an NFE's trials from its index of them: the same candidates, in the same order (ties by the order
    they were told), as the base searcher's scan of every trial."""
    from steptune.search import Searcher, make_searcher

    se = make_searcher("s3", space.noise, space.t_start, space.t_end, [4, 6], seed=0, min_train=12, pool=20,
                       presets=("ddim",))
    rng = np.random.default_rng(1)
    while len(se.trials) < 80:
        for c in se.ask(8):
            se.tell(c, float(rng.choice([0.1, 0.2, 0.3])))  # few distinct scores: many ties
    for nfe in (4, 6, 5):
        for k in (1, 4, 50):
            assert [(c.key, s) for c, s in se.best(nfe, k)] == [(c.key, s) for c, s in Searcher.best(se, nfe, k)]
    assert len(se.best(4, 50)) == sum(c.nfe == 4 for c, _ in se.trials)
