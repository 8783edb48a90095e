"""Wide-batch picks (search/s3_batch.py): a near copy of a chosen or pending candidate gives way to a distinct one of
nearly equal prediction, no penalty is the top k of the prediction, the spread counts only when asked; and S^3 at
batch 64 on gmm-digits asks a batch of distinct schedules spread over step structures."""

import copy
from collections import Counter

import numpy as np
import pytest

from steptune.evaluators import Evaluator, get_problem
from steptune.search import S3Searcher, encode, make_searcher
from steptune.search.s3_batch import pick, tree_spread


def test_no_penalty_is_the_top_k_of_the_prediction():
    rng = np.random.default_rng(0)
    pred = rng.random(50)
    feats = rng.random((50, 4))
    top = list(np.argsort(pred, kind="stable")[:7])
    assert pick(pred, 7) == top
    assert pick(pred, 7, feats, feats[:3], penalty=0.0) == top
    assert pick([0.2, 0.1, 0.2, 0.1], 3) == [1, 3, 0]  # ties in the order of a stable sort


def test_a_duplicate_of_a_chosen_candidate_gives_way_to_a_distinct_one():
    # 0 and 1 are copies; 2 is elsewhere and predicted a little worse; 3 is far worse
    feats = np.array([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0], [2.0, 0.0]])
    pred = np.array([0.10, 0.10, 0.12, 0.50])
    assert pick(pred, 2, feats) == [0, 1]  # the ranking alone takes the copy
    assert pick(pred, 2, feats, penalty=0.1) == [0, 2]
    # a candidate whose prediction is better by more than the penalty still wins over a distinct one
    assert pick(np.array([0.10, 0.10, 0.30, 0.50]), 2, feats, penalty=0.1) == [0, 1]


def test_pending_candidates_count_as_picked():
    feats = np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 0.0]])
    pred = np.array([0.10, 0.12, 0.13])
    assert pick(pred, 1, feats, penalty=0.1) == [0]
    assert pick(pred, 1, feats, picked=np.array([[0.0, 0.0]]), penalty=0.1) == [1]  # 0 is pending already
    assert pick(pred, 2, feats, picked=np.array([[0.0, 0.0]]), penalty=0.1) == [1, 2]


def test_the_penalty_falls_off_with_distance():
    """Of two candidates equally predicted, the one farther from the chosen one is taken."""
    feats = np.array([[0.0], [0.3], [0.9], [5.0]])
    pred = np.array([0.0, 0.05, 0.05, 1.0])
    assert pick(pred, 2, feats, penalty=0.1, width=1.0) == [0, 2]
    assert pick(pred, 2, feats, penalty=0.1, width=1e-3) == [0, 1]  # both far beyond the width: a tie


def test_spread_lowers_a_value_only_when_exploring():
    pred = np.array([0.10, 0.12])
    spread = np.array([0.0, 0.2])
    assert pick(pred, 1, spread=spread) == [0]
    assert pick(pred, 1, spread=spread, explore=0.5) == [1]


def test_tree_spread_is_the_per_tree_standard_deviation():
    """Against scikit-learn's forest with the predictor's settings: the spread of its trees' predictions."""
    from sklearn.ensemble import ExtraTreesRegressor

    from steptune.search.s3 import TREE_SETTINGS, Predictor, rank_targets

    rng = np.random.default_rng(1)
    X = rng.random((80, 5))
    scores = np.exp(X[:, 0] + 0.1 * rng.normal(size=80))
    p = Predictor("extra-trees").fit(X, np.full(80, 5), scores)
    forest = ExtraTreesRegressor(**TREE_SETTINGS["extra-trees"], max_features=1.0, random_state=0).fit(
        X, rank_targets(np.full(80, 5), np.log(scores)))
    Xt = rng.random((10, 5))
    per_tree = np.stack([t.predict(Xt) for t in forest.estimators_])
    np.testing.assert_allclose(tree_spread(p, Xt), per_tree.std(axis=0), rtol=1e-5, atol=1e-6)
    assert not tree_spread(Predictor("gbr").fit(X, np.full(80, 5), np.exp(X[:, 0])), Xt).any()


def test_a_negative_penalty_is_refused_in_one_sentence():
    from steptune.space import noise

    with pytest.raises(ValueError, match=r"options.batch_penalty = -1.0: give 0 or more \(an option of method 's3'\)"):
        make_searcher("s3", noise.VPLinear(), 1.0, 1e-3, [5], batch_penalty=-1.0)
    with pytest.raises(ValueError, match="batch_penalty -1.0 and batch_explore 0.0: give each as a number 0 or above"):
        S3Searcher(noise.VPLinear(), 1.0, 1e-3, [5], batch_penalty=-1.0)


@pytest.fixture(scope="module")
def digits_searcher(tmp_path_factory):
    """S^3 over NFE 5 and 8 on gmm-digits told three batches of 64 real results (16 train states each; the first
    mostly its preset seeds), so both NFEs' predictors rank its next ask."""
    cache = tmp_path_factory.mktemp("cache")
    problem = get_problem("gmm-digits", cache_dir=cache)
    ev = Evaluator(problem, n_train=16, n_heldout=16, cache_dir=cache)
    se = make_searcher("s3", problem.noise, problem.t_start, problem.t_end, [5, 8], seed=0, fit_ahead=False)
    for _ in range(3):
        for c in se.ask(64):
            se.tell(c, ev.evaluate(c.schedule, bank="train"))
    return se


def near_pairs(se, cands, tol=0.05):
    """Pairs of candidates at one NFE whose encodings are within ``tol`` of each other (Euclidean)."""
    n = 0
    for nfe in se.nfes:
        X = np.array([encode(c.schedule, se.space, se.max_steps) for c in cands if c.nfe == nfe])
        d = np.sqrt(((X[:, None] - X[None]) ** 2).sum(-1))
        n += int((d[np.triu_indices(len(X), 1)] < tol).sum())
    return n


def structures(cands, nfe):
    return Counter(c.schedule.structure_key() for c in cands if c.nfe == nfe)


def test_a_wide_s3_ask_on_gmm_digits_is_spread_out(digits_searcher):
    """From the same state, the batch picks hold fewer near copies and more step structures than the ranking's."""
    se = digits_searcher
    assert all(se._models.get(n) is not None for n in se.nfes)
    plain = copy.deepcopy(se)
    plain.batch_penalty = 0.0  # the same state, picks by the ranking alone
    batch, ranked = se.ask(64), plain.ask(64)
    assert len({c.key for c in batch}) == 64
    assert not {c.key for c in batch} & {c.key for c, _ in se.trials}
    for nfe in se.nfes:
        assert len(structures(batch, nfe)) >= len(structures(ranked, nfe)), (structures(batch, nfe),
                                                                             structures(ranked, nfe))
        assert max(structures(batch, nfe).values()) < max(structures(ranked, nfe).values())
    assert near_pairs(se, batch) <= near_pairs(se, ranked) / 2, (near_pairs(se, batch), near_pairs(se, ranked))


def test_candidates_in_flight_count_as_picked(digits_searcher):
    """A second wide ask made before the first is told keeps away from the first's candidates; told, they no
    longer count."""
    se = copy.deepcopy(digits_searcher)
    first = se.ask(64)
    assert {c.key for c in first} <= set(se._pending)
    blind = copy.deepcopy(se)
    blind._pending.clear()
    second, unaware = se.ask(64), blind.ask(64)
    assert near_pairs(se, first + second) < near_pairs(se, first + unaware), (near_pairs(se, first + second),
                                                                             near_pairs(se, first + unaware))
    for c in first:
        se.tell(c, 1.0)
    assert not {c.key for c in first} & set(se._pending)
