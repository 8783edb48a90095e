"""Model.calls counts the sampler's model calls; work that is not sampling is left out with Model.uncounted()."""

import pytest
import torch

from steptune.space import Model, noise


def _model() -> Model:
    return Model(lambda x, t: 0.5 * x, noise.get("vp-linear"))


def test_calls_inside_the_block_are_left_out_and_counted_apart():
    model, x = _model(), torch.ones(2, 3)
    model.raw(x, 0.5)
    with model.uncounted() as used:
        model.raw(x, 0.5)
        model.predict(x, 0.4, 0.8, 0.6)
    model.raw(x, 0.3)
    assert model.calls == 2 and used.n == 2


def test_the_count_is_restored_when_the_block_fails():
    model, x = _model(), torch.ones(2, 3)
    with pytest.raises(RuntimeError, match="boom"):
        with model.uncounted() as used:
            model.raw(x, 0.5)
            raise RuntimeError("boom")
    assert model.calls == 0 and used.n == 1


def test_an_inner_blocks_calls_are_left_out_of_the_outer_count_too():
    model, x = _model(), torch.ones(2, 3)
    with model.uncounted() as outer:
        model.raw(x, 0.5)
        with model.uncounted() as inner:
            model.raw(x, 0.4)
    assert (model.calls, outer.n, inner.n) == (0, 1, 1)
