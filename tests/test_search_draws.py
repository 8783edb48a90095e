"""search.draws gives what numpy's Generator.choice gives from the same generator state, draw for draw."""

import numpy as np
import pytest

from steptune.search import draws
from steptune.search.space import ORDER_P, RELAX_P
from steptune.space.relaxation import STEP_RELAXATIONS


@pytest.mark.parametrize("p", [[RELAX_P[k] for k in STEP_RELAXATIONS], [ORDER_P[o] for o in sorted(ORDER_P)],
                               [0.5, 0.5], [1.0], [0.0, 0.25, 0.0, 0.75], list(np.full(7, 1 / 7))])
def test_weighted_draws_are_numpys(p):
    items = list(range(10, 10 + len(p)))
    cdf = draws.cdf(p)
    for seed in range(50):
        a, b = np.random.default_rng(seed), np.random.default_rng(seed)
        for _ in range(40):
            assert draws.choice(a, items, cdf) == b.choice(items, p=p)
            assert a.random() == b.random()  # both consumed the same state


@pytest.mark.parametrize("items", [("noise", "data"), (0.05, 0.1, 0.2, 0.4), [3], list(range(17))])
def test_uniform_draws_are_numpys(items):
    for seed in range(50):
        a, b = np.random.default_rng(seed), np.random.default_rng(seed)
        for _ in range(40):
            x, y = draws.choice(a, items), b.choice(items)
            assert x == y and type(x) is type(items[0])
        assert a.random() == b.random()


def test_probabilities_computed_at_the_call_are_numpys():
    """As the insertion operator draws a gap in proportion to its width."""
    rng = np.random.default_rng(3)
    for seed in range(200):
        w = rng.uniform(0.01, 1.0, int(rng.integers(1, 12)))
        p = w / w.sum()
        a, b = np.random.default_rng(seed), np.random.default_rng(seed)
        assert draws.choice(a, np.arange(len(p)), draws.cdf(p)) == b.choice(np.arange(len(p)), p=p)
