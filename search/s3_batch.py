"""Wide-batch picks for S^3: many candidates chosen at once without spending the batch on near copies.

Between the picks of one batch no result arrives, so the best ``k`` of one prediction tend to be variations of
one schedule. :func:`pick` chooses greedily instead: each candidate's prediction (lower is better), less
``explore`` times its spread (how much the ensemble disagrees about it), plus a penalty that grows as it nears a
candidate already chosen, in this batch or asked before and not told yet, in encoded-feature space (local
penalisation), and with each further one chosen near it. With no penalty and no exploration it is the top ``k``
of the prediction.
"""

from __future__ import annotations

import numpy as np


def pick(pred: np.ndarray, k: int, feats: np.ndarray | None = None, picked: np.ndarray | None = None,
         spread: np.ndarray | None = None, penalty: float = 0.0, explore: float = 0.0,
         width: float | None = None) -> list[int]:
    """Indices of ``k`` of the candidates, in the order they were chosen.

    ``pred``: one prediction per candidate (lower is better); ``feats``: their encodings (one row each);
    ``picked``: encodings of candidates already chosen or pending, which count as chosen from the start;
    ``spread``: the predictions' uncertainty (lowers a candidate's value by ``explore`` x spread); ``penalty``:
    the value added to a candidate for each chosen one it duplicates, falling off as exp(-(d / width)^2) with
    their distance d (features scaled to unit spread over candidates and chosen), so a place crowded by several
    chosen ones costs more than one near a single one; ``width``:
    that distance scale (default: the median distance from a candidate to its nearest other candidate)."""
    pred = np.asarray(pred, dtype=float)
    k = min(int(k), len(pred))
    value = pred - explore * np.asarray(spread, dtype=float) if spread is not None and explore else pred.copy()
    if penalty <= 0 or feats is None or k <= 0:
        return [int(i) for i in np.argsort(value, kind="stable")[:k]]
    Z, P = _scaled(np.asarray(feats, dtype=float), None if picked is None else np.asarray(picked, dtype=float))
    if width is None:
        width = _default_width(Z)
    def kernel(d):
        return np.exp(-(d / width) ** 2)

    crowd = np.zeros(len(Z))  # how crowded each candidate's place is by the chosen ones
    if len(P):
        crowd = kernel(np.sqrt(((Z[:, None, :] - P[None, :, :]) ** 2).sum(-1))).sum(axis=1)
    chosen: list[int] = []
    free = np.ones(len(Z), dtype=bool)
    for _ in range(k):
        score = np.where(free, value + penalty * crowd, np.inf)
        i = int(np.argmin(score))  # ties: the lower index, as a stable sort gives
        chosen.append(i)
        free[i] = False
        crowd += kernel(np.sqrt(((Z - Z[i]) ** 2).sum(-1)))
    return chosen


def tree_spread(predictor, X: np.ndarray) -> np.ndarray:
    """The standard deviation of an extra-trees predictor's per-tree predictions for ``X`` (zeros for a kind
    without an ensemble of trees)."""
    X = np.asarray(X)
    if predictor.kind != "extra-trees" or getattr(predictor, "model", None) is None:
        return np.zeros(len(X))
    return predictor.model.predict_each(X[:, predictor.columns]).std(axis=0)


def _scaled(feats: np.ndarray, picked: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Candidates and chosen ones with each feature scaled to unit spread over both; constant features dropped."""
    P = np.zeros((0, feats.shape[1])) if picked is None or not len(picked) else picked.reshape(-1, feats.shape[1])
    both = np.concatenate([feats, P])
    sd = both.std(axis=0)
    keep = sd > 1e-12
    if not keep.any():
        return np.zeros((len(feats), 1)), np.zeros((len(P), 1))
    return feats[:, keep] / sd[keep], P[:, keep] / sd[keep]


def _default_width(Z: np.ndarray) -> float:
    """The median distance from a candidate to its nearest other candidate (1 when there is none)."""
    if len(Z) < 2:
        return 1.0
    d = np.sqrt(((Z[:, None, :] - Z[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    w = float(np.median(d.min(axis=1)))
    return w if w > 0 else 1.0
