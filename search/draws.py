"""Draws that give exactly what numpy's ``Generator.choice`` gives from the same generator state, without its
per-call cost (array conversion, checks of ``p``): the searchers draw thousands per evaluation, one at a time."""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np


def cdf(p: Sequence[float]) -> list[float]:
    """The cumulative distribution ``Generator.choice`` builds from the probabilities ``p``."""
    c = np.asarray(p, dtype=np.float64).cumsum()
    c /= c[-1]
    return c.tolist()


def choice(rng: np.random.Generator, items: Sequence, cdf: Sequence[float] | None = None):
    """One of ``items``: ``rng.choice(items)``, or ``rng.choice(items, p=p)`` when ``cdf`` is :func:`cdf` of ``p``
    (the item itself, not a numpy scalar)."""
    if cdf is None:
        return items[int(rng.integers(0, len(items)))]
    return items[bisect.bisect_right(cdf, rng.random())]
