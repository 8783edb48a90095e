"""S^3 spends its own time where it pays: each NFE's predictor is refitted exactly at the trial counts its rule
names, and before an NFE has a predictor no children are made beyond the ones picked (random picks need no pool)."""

import numpy as np
import pytest

from steptune.search import DecisionSpace, make_searcher
from steptune.search.s3 import refit_due
from steptune.space import noise


@pytest.fixture(scope="module")
def space():
    return DecisionSpace(noise.VPLinear(), 1.0, 1e-3)


def smooth_score(space, c) -> float:
    return float(np.std(np.diff(space.lams(c.schedule)))) + 0.01 * c.schedule.steps[0].order


def test_refit_rule_fits_at_min_train_then_every_30_percent_growth_of_at_least_20():
    fits, last = [], None
    for m in range(400):
        if refit_due(m, last, min_train=30):
            fits.append(m)
            last = m
    # 30; then max(1.3 x last, last + 20) rounded up: 50, 70, 91 (90 < 1.3 x 70 = 91), 119, 155, 202, 263, 342
    assert fits == [30, 50, 70, 91, 119, 155, 202, 263, 342]


def test_the_searcher_refits_each_nfe_exactly_when_the_rule_says(space):
    se = make_searcher("s3", space.noise, space.t_start, space.t_end, [4, 6], seed=0, predictor="extra-trees",
                       min_train=10, pool=20, presets=("ddim",))
    fitted = {4: [], 6: []}
    while len(se.trials) < 110:
        for c in se.ask(2):  # one per NFE: each NFE's fit is due at the first ask after its count is reached
            se.tell(c, smooth_score(space, c))
        for nfe in fitted:
            m = se._fit_size.get(nfe)
            if m is not None and (not fitted[nfe] or fitted[nfe][-1] != m):
                fitted[nfe].append(m)
    for nfe, sizes in fitted.items():
        expected, last = [], None
        for m in range(sizes[-1] + 1):
            if refit_due(m, last, 10):
                expected.append(m)
                last = m
        assert sizes == expected, (nfe, sizes)
        assert len(sizes) >= 3


def test_no_pool_is_made_before_an_nfe_has_a_predictor(space):
    se = make_searcher("s3", space.noise, space.t_start, space.t_end, [5], seed=1, min_train=1000, pool=50,
                       local=0.0, presets=("ddim",))
    for _ in range(4):
        batch = se.ask(6)
        children = [c for c in batch if c.key not in {s.key for s in se._seeds}]
        assert len(se._pools.get(5, [])) == len(children)
        for c in batch:
            se.tell(c, smooth_score(space, c))
    assert len(se.trials) == 24 and 5 not in se._models
