"""Random search over the full decision space, at exact NFE."""

from __future__ import annotations

import numpy as np

from .searcher import Candidate, Searcher


class RandomSearcher(Searcher):
    """Samples schedules uniformly from the decision space's generator, cycling over the NFEs."""

    name = "random"

    def _ask(self, n: int, rng: np.random.Generator) -> list[Candidate]:
        out: list[Candidate] = []
        tries = 0
        while len(out) < n and tries < 200 * n:
            nfe = self.nfes[(len(self.trials) + len(out)) % len(self.nfes)]
            tries += 1
            s = self.space.random(nfe, rng)
            if s is None:
                continue
            c = Candidate(s, nfe, "random")
            if c.key in self.seen or any(c.key == o.key for o in out):
                continue
            out.append(c)
        return out
