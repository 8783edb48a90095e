"""S^3's compiled tree ensembles against scikit-learn's GradientBoostingRegressor and ExtraTreesRegressor, which
they reimplement for speed."""

import numpy as np
import pytest
from sklearn.ensemble import ExtraTreesRegressor, GradientBoostingRegressor

from steptune.search.trees import BoostedTrees, RandomizedTrees


def mixed_table(seed, n=290):
    """Continuous, rounded, one-hot and constant columns, as S^3's encoding of schedules has."""
    rng = np.random.default_rng(seed)
    cont = rng.normal(size=(n, 4))
    rounded = np.round(rng.normal(size=(n, 2)))
    onehot = np.eye(3)[rng.integers(0, 3, size=n)]
    X = np.concatenate([cont, rounded, onehot, np.ones((n, 1))], axis=1)
    y = np.sin(cont[:, 0]) + cont[:, 1] * rounded[:, 0] + onehot[:, 2] + 0.1 * rng.normal(size=n)
    return X, y, rng


def sklearn_gbr(X, y, depth, subsample, seed):
    return GradientBoostingRegressor(n_estimators=60, max_depth=depth, subsample=subsample, learning_rate=0.1,
                                     random_state=seed).fit(X, y)


def ours(X, y, depth, subsample, seed):
    return BoostedTrees(n_estimators=60, max_depth=depth, subsample=subsample, learning_rate=0.1,
                        random_state=seed).fit(X, y)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_feature_grows_sklearns_trees(seed):
    """With one feature no two splits of a node gain alike, so every tree is scikit-learn's: the same row
    subsamples, split points (repeated values included), leaf values and stopping rules."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(300, 1))
    X[::7] = np.round(X[::7])
    y = np.sin(3 * X[:, 0]) + 0.1 * rng.normal(size=300)
    X_new = np.concatenate([rng.normal(size=(200, 1)), X[:20] + 1e-9])
    a, b = sklearn_gbr(X, y, 3, 0.8, seed), ours(X, y, 3, 0.8, seed)
    np.testing.assert_allclose(b.predict(X), a.predict(X), rtol=0, atol=1e-12)
    np.testing.assert_allclose(b.predict(X_new), a.predict(X_new), rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_stumps_on_several_features_are_sklearns(seed):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(400, 5))
    y = np.sin(X[:, 0]) + X[:, 1] * X[:, 2] + 0.1 * rng.normal(size=400)
    X_new = rng.normal(size=(200, 5))
    a, b = sklearn_gbr(X, y, 1, 0.8, seed), ours(X, y, 1, 0.8, seed)
    np.testing.assert_allclose(b.predict(X_new), a.predict(X_new), rtol=0, atol=1e-12)


@pytest.mark.parametrize("table", ["continuous", "mixed"])
def test_deep_trees_part_the_training_rows_as_sklearn_does(table):
    """At depth 3 a small node can be split alike by several features (and one-hot columns split alike
    everywhere); whichever is taken, the training rows fall in the same leaves, so without subsampling the fitted
    values are scikit-learn's."""
    rng = np.random.default_rng(3)
    X = rng.normal(size=(290, 12))
    y = np.sin(X[:, 0]) + X[:, 1] * X[:, 2] + 0.1 * rng.normal(size=290)
    if table == "mixed":
        X, y, _ = mixed_table(3)
    a, b = sklearn_gbr(X, y, 3, 1.0, 3), ours(X, y, 3, 1.0, 3)
    np.testing.assert_allclose(b.predict(X), a.predict(X), rtol=0, atol=1e-12)


def test_ties_between_features_are_broken_at_random():
    """Two copies of one column gain exactly alike at every node: both are used, as scikit-learn, which tries
    the features in a random order at each node, would."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=200)
    X = np.stack([x, x], axis=1)
    model = ours(X, np.sin(2 * x), 3, 0.8, 0)
    used = model.features_[model.features_ >= 0]
    assert {0, 1} <= set(used.tolist())
    np.testing.assert_allclose(model.predict(X), ours(X[:, :1], np.sin(2 * x), 3, 0.8, 0).predict(X[:, :1]),
                               rtol=0, atol=1e-12)


def test_the_same_seed_fits_the_same_model_and_another_seed_another():
    rng = np.random.default_rng(1)
    X = rng.integers(0, 3, size=(150, 20)).astype(float)
    y = X @ rng.normal(size=20)
    p = ours(X, y, 3, 0.8, 5).predict(X)
    np.testing.assert_array_equal(ours(X, y, 3, 0.8, 5).predict(X), p)
    assert not np.array_equal(ours(X, y, 3, 0.8, 6).predict(X), p)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("min_samples_leaf", [1, 2])
def test_randomized_trees_are_sklearns_extra_trees(seed, min_samples_leaf):
    """The same random draws in the same order: every tree is scikit-learn's, node for node, so the forest
    predicts what scikit-learn's does anywhere, not only on the rows it was fitted on."""
    X, y, rng = mixed_table(seed)
    X_new = np.concatenate([rng.normal(size=(300, X.shape[1])), X[:30] + 1e-3])
    a = ExtraTreesRegressor(n_estimators=12, min_samples_leaf=min_samples_leaf, max_features=1.0,
                            random_state=seed, n_jobs=1).fit(X, y)
    b = RandomizedTrees(n_estimators=12, min_samples_leaf=min_samples_leaf, random_state=seed).fit(X, y)
    for sk, t in zip(a.estimators_, range(b.n_estimators)):
        tree = sk.tree_
        inner = tree.feature >= 0
        np.testing.assert_array_equal(b.features_[t][:tree.node_count][inner], tree.feature[inner])
        np.testing.assert_array_equal(b.thresholds_[t][:tree.node_count][inner], tree.threshold[inner])
        assert (b.features_[t][:tree.node_count][~inner] == -1).all() and (b.features_[t][tree.node_count:] == -1).all()
    np.testing.assert_allclose(b.predict(X_new), a.predict(X_new), rtol=0, atol=1e-12)
    each = np.stack([est.predict(np.asarray(X_new, dtype=np.float32)) for est in a.estimators_])
    np.testing.assert_allclose(b.predict_each(X_new), each, rtol=0, atol=1e-12)
