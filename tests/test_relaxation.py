"""The one registry of relaxation kinds: what validation accepts, what the kernel scales by, what searchers draw."""

import math

import numpy as np
import pytest

from steptune.search import DecisionSpace
from steptune.space import Schedule, ScheduleError, Step, noise
from steptune.space.relaxation import RELAXATIONS, STEP_RELAXATIONS, relaxation_factor


def closed_form(kind: str, hh: float, h: float, coef: float) -> float:
    c1, c2 = math.exp(hh) - 1, math.exp(hh) - 1 - hh
    return (1 + coef * h) * {"none": 1.0, "dpmsolver-2": 0.5 * hh * c1 / c2, "unipc-bh2": 0.5 * hh * c1 / c2,
                             "unipc-bh1": 0.5 * hh * hh / c2, "0.5exp": 1 + 0.5 * c1, "-0.5exp": 1 - 0.5 * c1,
                             "linear": 1.0, "heun": h * (math.exp(h) - 1) / (2 * c2)}[kind]


@pytest.mark.parametrize("h", [0.9, -0.9, 0.3, -0.3])  # both sides of the series/recurrence switch at |h| = 0.5
def test_every_kind_scales_by_its_closed_form(h):
    assert set(RELAXATIONS) == {"none", "dpmsolver-2", "unipc-bh2", "unipc-bh1", "0.5exp", "-0.5exp", "linear",
                                "heun"}
    for kind in RELAXATIONS:
        for hh in (h, -h):
            for coef in (0.0, 0.2):  # every kind takes the coefficient as a factor 1 + coef h on its own
                assert relaxation_factor(kind, hh, h, coef) == pytest.approx(closed_form(kind, hh, h, coef), rel=1e-12)


def _two_steps(kind: str) -> Schedule:
    return Schedule(t_start=1.0, steps=(Step(t=0.5), Step(t=0.2, order=2, relaxation=kind), Step(t=0.1)))


def test_validation_accepts_exactly_the_registry():
    for kind in RELAXATIONS:
        _two_steps(kind).validate()
    with pytest.raises(ScheduleError, match=r"step 1: field 'relaxation' is 'bh3'; use one of none, dpmsolver-2"):
        _two_steps("bh3").validate()
    with pytest.raises(ValueError, match="unknown relaxation 'bh3'"):
        relaxation_factor("bh3", 0.3, 0.3)


def test_searchers_draw_every_predictor_kind_and_no_other():
    assert STEP_RELAXATIONS == tuple(k for k in RELAXATIONS if k != "heun")  # heun is the trapezoidal corrector's
    rng = np.random.default_rng(0)
    drawn = {DecisionSpace.sample_relaxation(rng) for _ in range(2000)}
    assert drawn == set(STEP_RELAXATIONS)
    space = DecisionSpace(noise.get("vp-linear"), 1.0, 1e-3)
    kinds = {st.relaxation for _ in range(300) if (s := space.random(6, rng)) is not None for st in s.steps}
    assert kinds <= set(STEP_RELAXATIONS)
