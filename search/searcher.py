"""The ask/tell Searcher interface and the Candidate it proposes.

A searcher proposes candidates (a Schedule plus the NFE it was made for) with ``ask(n)`` and learns
from ``tell(candidate, result)``. Its state is a function of its constructor arguments and the
sequence of results it was told, so the runner rebuilds it on resume by re-asking each stored batch
and telling the stored results. Searchers are driven, they never drive: the runner
(``steptune.runner``) is the one loop that asks, evaluates and tells.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from steptune.space import Schedule
from steptune.space.noise import NoiseSchedule

from .space import DecisionSpace

FAIL_SCORE = 1e3  # what a diverged or invalid run scores (rmse); finite so every model can learn from it


@dataclass
class Candidate:
    """A schedule a searcher wants evaluated, at the NFE it was made for. ``params`` holds the
    searcher's own parameterization (e.g. Optuna parameters) so a stored trial can re-feed it."""

    schedule: Schedule
    nfe: int
    origin: str = ""
    params: dict = field(default_factory=dict)

    @cached_property
    def key(self) -> str:
        return self.schedule.key()


class Searcher:
    """Base class of every search method (ask/tell).

    ``noise``, ``t_start`` and ``t_end``: the problem's noise schedule and time interval;
    ``nfes``: the NFE budgets to search; ``seed``; ``metric``: what to minimise (train-bank
    ``rmse`` by default); further options go to :class:`DecisionSpace` via ``space_opts``.
    Subclasses implement ``_ask(n, rng)`` and may extend ``_observe``.
    """

    name = "base"
    batch_per_nfe = 2  # the runner asks this many candidates per NFE at a time unless the job says otherwise

    def __init__(self, noise: NoiseSchedule, t_start: float, t_end: float, nfes: Sequence[int], seed: int = 0,
                 metric: str = "rmse", space_opts: dict | None = None):
        self.noise = noise
        self.t_start, self.t_end = float(t_start), float(t_end)
        self.nfes = sorted({int(n) for n in nfes})
        self.seed = int(seed)
        self.metric = metric
        self.space = DecisionSpace(noise, t_start, t_end, **(space_opts or {}))
        self.trials: list[tuple[Candidate, float]] = []  # every told (candidate, score), in order
        self.seen: set[str] = set()
        self.n_asked = 0
        self.budget: int | None = None  # the evaluations the whole search asks, where its driver knows it

    # ---- interface ------------------------------------------------------------------------------

    def ask(self, n: int = 1) -> list[Candidate]:
        """``n`` new candidates (each validated, at its exact NFE). The random stream is derived from
        the seed and the number of results told so far, so the same history gives the same answer."""
        rng = np.random.default_rng([self.seed, len(self.trials), self.n_asked])
        self.n_asked += 1
        out = self._ask(n, rng)
        for c in out:
            c.schedule.validate(nfe=c.nfe)
            self.seen.add(c.key)
        return out

    def tell(self, candidate: Candidate, result) -> float:
        """Record the result of a candidate: a plain score, or anything with ``status`` and ``metrics`` (an
        EvalResult, a stored trial)."""
        score = _score(result, self.metric)
        self.trials.append((candidate, score))
        self.seen.add(candidate.key)
        self._observe(candidate, score)
        return score

    # ---- helpers for subclasses -----------------------------------------------------------------

    def _ask(self, n: int, rng: np.random.Generator) -> list[Candidate]:
        raise NotImplementedError

    def _observe(self, candidate: Candidate, score: float) -> None:
        pass

    def best(self, nfe: int, k: int = 1) -> list[tuple[Candidate, float]]:
        rows = [(c, s) for c, s in self.trials if c.nfe == nfe]
        rows.sort(key=lambda cs: cs[1])
        return rows[:k]

    def state(self) -> dict:
        return {"method": self.name, "seed": self.seed, "told": len(self.trials)}


def _score(result, metric: str) -> float:
    if isinstance(result, (int, float)):
        return min(float(result), FAIL_SCORE) if math.isfinite(result) else FAIL_SCORE
    v = result.metrics.get(metric)
    if result.status != "complete" or v is None or not math.isfinite(v):
        return FAIL_SCORE
    return min(float(v), FAIL_SCORE)

