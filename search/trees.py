"""The tree ensembles of S^3's predictor, compiled: a search fits them on a few hundred rows many times over,
where scikit-learn's per-tree and per-node overhead costs more than the arithmetic.

* :class:`BoostedTrees`: scikit-learn's ``GradientBoostingRegressor`` (squared error, the best split of every
  feature at each node, rows subsampled without replacement), grown level by level from sums over each feature's
  distinct values rather than by sorting the rows at every node. Given the same ``random_state`` it draws the same
  row subsamples, and where no two splits of a node gain exactly alike it grows the same trees; of splits that tie,
  both it and scikit-learn take one at random.
* :class:`RandomizedTrees`: scikit-learn's ``ExtraTreesRegressor`` without bootstrap, every feature tried at each
  node: a port of its random splitter and depth-first builder, drawing from the same generators in the same order,
  so that given the same ``random_state`` it grows the same trees.

The tests check both against scikit-learn itself.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from steptune.evaluators.compiled import njit

_RAND_R_MAX = 0x7FFFFFFF  # the bound of the draw each of scikit-learn's trees takes to seed its splitter
_FEATURE_THRESHOLD = 1e-7  # values closer than this are not split between (as in scikit-learn)
_EPSILON = np.finfo(np.float64).eps  # a node whose variance is below this is a leaf
_INT32_MAX = np.iinfo(np.int32).max  # the bound of the draw that seeds each of scikit-learn's forest's trees


class BoostedTrees:
    """Least-squares gradient boosting of depth-limited trees. Parameters and attributes follow scikit-learn's
    ``GradientBoostingRegressor``: ``fit(X, y)`` returns the estimator, ``predict(X)`` the predictions."""

    def __init__(self, n_estimators: int = 80, max_depth: int = 3, learning_rate: float = 0.1,
                 subsample: float = 1.0, random_state: int = 0):
        self.n_estimators, self.max_depth = n_estimators, max_depth
        self.learning_rate, self.subsample, self.random_state = learning_rate, subsample, random_state

    def fit(self, X, y) -> BoostedTrees:
        X = np.asarray(X, dtype=np.float32)
        y = np.asarray(y, dtype=np.float64)
        n = len(y)
        bins, starts, bin_values = _bins(X)
        nodes = 2 ** (self.max_depth + 1) - 1
        self.features_ = np.full((self.n_estimators, nodes), -1, dtype=np.int64)
        self.thresholds_ = np.zeros((self.n_estimators, nodes))
        self.values_ = np.zeros((self.n_estimators, nodes))
        self.init_ = float(y.mean())
        rng = np.random.RandomState(self.random_state)
        in_bag = max(1, int(self.subsample * n))
        masks = np.ones((self.n_estimators, n), dtype=np.bool_)
        seeds = np.empty(self.n_estimators, dtype=np.int64)
        for t in range(self.n_estimators):
            if self.subsample < 1.0:
                masks[t] = _sample_mask(rng.uniform(size=n), in_bag)
            seeds[t] = rng.randint(0, _RAND_R_MAX)  # the draw each of scikit-learn's trees seeds its splitter with
        _boost(X, bins, starts, bin_values, y, masks, seeds, self.max_depth, self.learning_rate, self.init_,
               self.features_, self.thresholds_, self.values_)
        return self

    def predict(self, X) -> np.ndarray:
        out = np.full(len(X), self.init_)
        _add_trees(np.asarray(X, dtype=np.float32), self.features_, self.thresholds_, self.values_,
                   self.learning_rate, out)
        return out


class RandomizedTrees:
    """Extremely randomized trees (a random threshold per feature at each node, the best of them taken), grown
    until a node has fewer than ``2 * min_samples_leaf`` rows or no spread; the prediction is their mean.
    scikit-learn's ``ExtraTreesRegressor(max_features=1.0, bootstrap=False)`` conventions."""

    def __init__(self, n_estimators: int = 100, min_samples_leaf: int = 1, random_state: int = 0):
        self.n_estimators, self.min_samples_leaf, self.random_state = n_estimators, min_samples_leaf, random_state

    def fit(self, X, y) -> RandomizedTrees:
        X = np.asarray(X, dtype=np.float32)
        y = np.asarray(y, dtype=np.float64)
        seeds = np.array(_tree_seeds(self.random_state, self.n_estimators) if isinstance(self.random_state, int)
                         else _tree_seeds.__wrapped__(self.random_state, self.n_estimators), dtype=np.int64)
        size = max(2 * len(y) - 1, 1)
        self.children_ = np.full((self.n_estimators, size, 2), -1, dtype=np.int64)
        self.features_ = np.full((self.n_estimators, size), -1, dtype=np.int64)
        self.thresholds_ = np.zeros((self.n_estimators, size))
        self.values_ = np.zeros((self.n_estimators, size))
        _randomized_forest(X, y, seeds, self.min_samples_leaf, self.children_, self.features_, self.thresholds_,
                           self.values_)
        return self

    def predict_each(self, X) -> np.ndarray:
        """Each tree's predictions, one row per tree."""
        out = np.zeros((self.n_estimators, len(X)))
        _forest_predictions(np.asarray(X, dtype=np.float32), self.children_, self.features_, self.thresholds_,
                            self.values_, out)
        return out

    def predict(self, X) -> np.ndarray:
        each = self.predict_each(X)
        out = np.zeros(each.shape[1])
        for row in each:  # summed tree by tree, then divided, as scikit-learn averages a forest
            out += row
        return out / self.n_estimators


@lru_cache(maxsize=64)
def _tree_seeds(random_state, n_estimators: int) -> tuple[int, ...]:
    """The seed each tree's splitter starts from, drawn as scikit-learn's forest draws them (a generator made per
    tree, which costs more than a small fit's trees: kept per forest seed, as the same ones come back fit after
    fit)."""
    rng = np.random.RandomState(random_state)
    return tuple(int(np.random.RandomState(rng.randint(_INT32_MAX)).randint(0, _RAND_R_MAX))
                 for _ in range(n_estimators))


@njit(cache=True, nogil=True)
def _rand_r(state):
    """scikit-learn's ``our_rand_r``: a 32-bit xorshift step (state is a one-element uint32 array)."""
    if state[0] == 0:
        state[0] = 1
    s = np.uint64(state[0])
    s ^= (s << np.uint64(13)) & np.uint64(0xFFFFFFFF)
    s ^= s >> np.uint64(17)
    s ^= (s << np.uint64(5)) & np.uint64(0xFFFFFFFF)
    state[0] = np.uint32(s)
    return np.int64(s % np.uint64(_RAND_R_MAX + 1))


@njit(cache=True, nogil=True)
def _randomized_forest(X, y, seeds, min_samples_leaf, children, features, thresholds, values):
    columns = np.ascontiguousarray(X.T)
    for t in range(seeds.shape[0]):
        _randomized_tree(columns, y, seeds[t], min_samples_leaf, children[t], features[t], thresholds[t], values[t])


@njit(cache=True, nogil=True)
def _left_sum(y, samples, start, pos, end, total):
    """scikit-learn's criterion moved to ``pos``: the left rows' sum, counted from whichever end is nearer (from
    the far end, taken off the node's ``total``)."""
    if pos - start <= end - pos:
        left = 0.0
        for p in range(start, pos):
            left += y[samples[p]]
        return left
    left = total
    for p in range(end - 1, pos - 1, -1):
        left -= y[samples[p]]
    return left


@njit(cache=True, nogil=True)
def _randomized_tree(columns, y, seed, min_samples_leaf, children, feature, threshold, value):
    """One tree, as scikit-learn's depth-first builder grows it with its random splitter: nodes numbered in the
    order they are made (left subtrees first), each node's features drawn in random order with the features
    found constant above it set aside, one threshold drawn uniformly between each feature's extremes. ``columns``
    holds the features one row each."""
    n_features, n = columns.shape
    state = np.array([np.uint32(seed)], dtype=np.uint32)
    min_split = max(2, 2 * min_samples_leaf)
    samples = np.arange(n)
    order = np.arange(n_features)  # the splitter's feature array, permuted in place from node to node
    constant = np.zeros(n_features, dtype=np.int64)
    values_here = np.empty(n, dtype=np.float32)
    stack = np.empty((2 * n + 2, 5), dtype=np.int64)  # start, end, parent, is_left, known constants
    stack_impurity = np.empty(2 * n + 2)
    stack[0] = (0, n, -1, 0, 0)
    stack_impurity[0] = np.inf
    top = 1
    count = 0
    first = True
    while top > 0:
        top -= 1
        start, end, parent, is_left, known = stack[top]
        impurity = stack_impurity[top]
        total, squares = 0.0, 0.0
        for p in range(start, end):
            v = y[samples[p]]
            total += v
            squares += v * v
        weight = float(end - start)
        if first:
            impurity = squares / weight - (total / weight) ** 2
            first = False
        leaf = end - start < min_split or impurity <= _EPSILON
        best_pos, best_feature, best_threshold = end, -1, 0.0
        impurity_left, impurity_right = 0.0, 0.0
        n_total = known
        if not leaf:
            f_i, n_found, n_drawn, n_visited = n_features, 0, 0, 0
            best_proxy = -np.inf
            current = -1
            while f_i > n_total and (n_visited < n_features or n_visited <= n_found + n_drawn):
                n_visited += 1
                f_j = n_drawn + _rand_r(state) % (f_i - n_found - n_drawn)
                if f_j < known:
                    order[n_drawn], order[f_j] = order[f_j], order[n_drawn]
                    n_drawn += 1
                    continue
                f_j += n_found
                current = order[f_j]
                lo = hi = columns[current, samples[start]]
                for p in range(start, end):
                    v = columns[current, samples[p]]
                    values_here[p] = v
                    if v < lo:
                        lo = v
                    elif v > hi:
                        hi = v
                if np.float64(hi) <= np.float64(lo) + _FEATURE_THRESHOLD:
                    order[f_j], order[n_total] = order[n_total], current
                    n_found += 1
                    n_total += 1
                    continue
                f_i -= 1
                order[f_i], order[f_j] = order[f_j], order[f_i]
                cut = (np.float64(hi) - np.float64(lo)) * np.float64(_rand_r(state)) / _RAND_R_MAX + np.float64(lo)
                if cut == np.float64(hi):
                    cut = np.float64(lo)
                a, b = start, end
                while a < b:
                    if values_here[a] <= cut:
                        a += 1
                    else:
                        b -= 1
                        values_here[a], values_here[b] = values_here[b], values_here[a]
                        samples[a], samples[b] = samples[b], samples[a]
                pos = b
                if pos - start < min_samples_leaf or end - pos < min_samples_leaf:
                    continue
                left = _left_sum(y, samples, start, pos, end, total)
                right = total - left
                proxy = left * left / (pos - start) + right * right / (end - pos)
                if proxy > best_proxy:
                    best_proxy, best_pos, best_feature, best_threshold = proxy, pos, current, cut
            if best_pos < end:
                if current != best_feature:
                    a, b = start, end
                    while a < b:
                        if columns[best_feature, samples[a]] <= best_threshold:
                            a += 1
                        else:
                            b -= 1
                            samples[a], samples[b] = samples[b], samples[a]
                left = _left_sum(y, samples, start, best_pos, end, total)
                left_squares = 0.0
                for p in range(start, best_pos):
                    left_squares += y[samples[p]] * y[samples[p]]
                w_left, w_right = float(best_pos - start), float(end - best_pos)
                impurity_left = left_squares / w_left - (left / w_left) ** 2
                impurity_right = (squares - left_squares) / w_right - ((total - left) / w_right) ** 2
                improvement = (weight / n) * (impurity - w_right / weight * impurity_right
                                              - w_left / weight * impurity_left)
                leaf = improvement + _EPSILON < 0.0
            else:
                leaf = True
            for k in range(known):
                order[k] = constant[k]
            for k in range(known, known + n_found):
                constant[k] = order[k]
        node = count
        count += 1
        if parent >= 0:
            children[parent, 0 if is_left else 1] = node
        value[node] = total / weight
        if not leaf:
            feature[node] = best_feature
            threshold[node] = best_threshold
            stack[top] = (best_pos, end, node, 0, n_total)
            stack_impurity[top] = impurity_right
            stack[top + 1] = (start, best_pos, node, 1, n_total)
            stack_impurity[top + 1] = impurity_left
            top += 2
    return count


@njit(cache=True, nogil=True)
def _forest_predictions(X, children, features, thresholds, values, out):
    for t in range(features.shape[0]):
        for i in range(X.shape[0]):
            k = 0
            while features[t, k] >= 0:
                k = children[t, k, 0] if X[i, features[t, k]] <= thresholds[t, k] else children[t, k, 1]
            out[t, i] = values[t, k]


@njit(cache=True, nogil=True)
def _sample_mask(u, in_bag):
    """scikit-learn's ``_random_sample_mask``: row i is taken with the chance that the rows still to be taken
    have among the rows left, so exactly ``in_bag`` are."""
    n = u.shape[0]
    mask = np.zeros(n, dtype=np.bool_)
    taken = 0
    for i in range(n):
        if u[i] * (n - i) < in_bag - taken:
            mask[i] = True
            taken += 1
    return mask


def _bins(X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each feature's distinct values, all features' one after the other (``bin_values``, feature f's from
    ``starts[f]`` to ``starts[f + 1]``), and for each row and feature the index of its value among them."""
    bins = np.empty(X.shape, dtype=np.int64)
    values, starts = [], [0]
    for f in range(X.shape[1]):
        distinct, bins[:, f] = np.unique(X[:, f], return_inverse=True)
        bins[:, f] += starts[-1]
        values.append(distinct.astype(np.float64))
        starts.append(starts[-1] + len(distinct))
    return bins, np.array(starts), np.concatenate(values)


@njit(cache=True, nogil=True)
def _boost(X, bins, starts, bin_values, y, masks, seeds, max_depth, rate, init, features, thresholds, values):
    raw = np.full(y.shape[0], init)
    for t in range(masks.shape[0]):
        _grow(X, bins, starts, bin_values, y - raw, masks[t], seeds[t], max_depth, features[t], thresholds[t],
              values[t])
        _add_tree(X, features[t], thresholds[t], values[t], rate, raw)


@njit(cache=True, nogil=True)
def _grow(X, bins, starts, bin_values, residual, mask, seed, max_depth, feature, threshold, value):
    """One tree on the rows in ``mask``, in heap order (node k's children are 2k+1 and 2k+2; feature -1 is a
    leaf). At each level the rows' residuals are summed per node and distinct value of each feature, and each
    node's splits are read off those sums in the order of the values. The features are tried in an order drawn
    anew at each node, so of splits that gain exactly alike a random one is taken, as scikit-learn does."""
    n, n_features = X.shape
    n_bins = bin_values.shape[0]
    state = np.array([np.uint32(seed)], dtype=np.uint32)
    visit = np.arange(n_features)
    node = np.full(n, -1)
    for i in range(n):
        if mask[i]:
            node[i] = 0
    for depth in range(max_depth + 1):
        first, width = 2 ** depth - 1, 2 ** depth
        count = np.zeros(width)
        total = np.zeros(width)
        squares = np.zeros(width)
        for i in range(n):
            k = node[i] - first
            if k >= 0:
                count[k] += 1.0
                total[k] += residual[i]
                squares[k] += residual[i] * residual[i]
        splits = np.zeros(width, dtype=np.bool_)
        any_split = False
        for k in range(width):
            if count[k] > 0:
                mean = total[k] / count[k]
                value[first + k] = mean
                if depth < max_depth and count[k] >= 2 and squares[k] / count[k] - mean * mean > _EPSILON:
                    splits[k] = True
                    any_split = True
        if not any_split:
            break
        bin_count = np.zeros((width, n_bins))
        bin_total = np.zeros((width, n_bins))
        for i in range(n):
            k = node[i] - first
            if k >= 0 and splits[k]:
                for f in range(n_features):
                    b = bins[i, f]
                    bin_count[k, b] += 1.0
                    bin_total[k, b] += residual[i]
        for k in range(width):
            if not splits[k]:
                continue
            best, best_feature, best_threshold = -np.inf, -1, 0.0
            for j in range(n_features - 1, 0, -1):
                r = _rand_r(state) % (j + 1)
                visit[j], visit[r] = visit[r], visit[j]
            for f in visit:
                left_count, left_total, last = 0.0, 0.0, 0.0
                for b in range(starts[f], starts[f + 1]):
                    c = bin_count[k, b]
                    if c == 0.0:
                        continue
                    x = bin_values[b]
                    if left_count > 0 and x > last + _FEATURE_THRESHOLD:
                        right_total = total[k] - left_total
                        right_count = count[k] - left_count
                        gain = left_total * left_total / left_count + right_total * right_total / right_count
                        if gain > best:
                            best, best_feature, best_threshold = gain, f, last / 2.0 + x / 2.0
                    left_count += c
                    left_total += bin_total[k, b]
                    last = x
            if best_feature >= 0:
                feature[first + k] = best_feature
                threshold[first + k] = best_threshold
        for i in range(n):
            k = node[i]
            if k >= first and feature[k] >= 0:
                node[i] = 2 * k + 1 if X[i, feature[k]] <= threshold[k] else 2 * k + 2
            elif k >= first:
                node[i] = -1  # settled in a leaf


@njit(cache=True, nogil=True)
def _add_tree(X, feature, threshold, value, rate, out):
    for i in range(X.shape[0]):
        k = 0
        while feature[k] >= 0:
            k = 2 * k + 1 if X[i, feature[k]] <= threshold[k] else 2 * k + 2
        out[i] += rate * value[k]


@njit(cache=True, nogil=True)
def _add_trees(X, features, thresholds, values, rate, out):
    for t in range(features.shape[0]):
        _add_tree(X, features[t], thresholds[t], values[t], rate, out)
