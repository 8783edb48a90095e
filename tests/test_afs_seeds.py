"""S^3's second seeds: each preset again with an analytical first step (``afs_presets``). Built at NFE + 1 with the
first step's data prediction taken as zero, such a schedule makes, counted by the model itself, the model calls of
the preset at NFE: a multistep preset gets one step more for them."""

import pytest

from steptune.evaluators import Evaluator, get_problem
from steptune.search import DEFAULT_PRESETS, DecisionSpace, make_searcher, preset_candidates
from steptune.search.baselines import afs_variant
from steptune.space import presets

NFES = [4, 5, 8]
MULTISTEP = ("ddim", "dpm-solver++-2m", "dpm-solver++-3m", "unipc-bh1", "unipc-bh2", "unipc-bh2:order=3", "deis",
             "deis-tab")


@pytest.fixture(scope="module")
def problem():
    return get_problem("gmm-2d", noise="vp-linear")


@pytest.fixture(scope="module")
def space(problem):
    return DecisionSpace(problem.noise, problem.t_start, problem.t_end)


def test_afs_seeds_follow_the_presets_and_each_is_its_preset_with_an_analytical_first_step(space):
    plain = preset_candidates(space, NFES)
    both = preset_candidates(space, NFES, afs=True)
    assert [c.key for c in both[:len(plain)]] == [c.key for c in plain]  # the presets first, as before
    added = both[len(plain):]
    assert added and all(c.origin.startswith("preset-afs:") for c in added)
    assert len({c.key for c in both}) == len(both)
    for c in added:
        spec = c.origin.removeprefix("preset-afs:")
        preset = presets.build(spec, c.nfe, space.noise, t_start=space.t_start, t_end=space.t_end)
        longer = presets.build(spec, c.nfe + 1, space.noise, t_start=space.t_start, t_end=space.t_end)
        s = c.schedule
        assert s.afs == "zero" and s.nfe == c.nfe and space.finish(s, c.nfe) == s
        assert s.times == longer.times
        if spec in MULTISTEP:
            assert len(s.steps) == len(preset.steps) + 1
    # every default preset has one at every NFE here but where the space's repair makes it a copy of another
    assert len(added) >= len(DEFAULT_PRESETS) * len(NFES) - 6


def test_an_afs_seed_makes_the_model_calls_of_its_nfe(problem, space):
    ev = Evaluator(problem, n_train=8, n_heldout=8, cache_dir=None)
    for spec in ("unipc-bh2", "dpm-solver++-3m", "deis"):
        for nfe in NFES:
            s = afs_variant(spec, nfe, space.noise, space.t_start, space.t_end)
            with_afs = ev.evaluate(s, "train")
            without = ev.evaluate(presets.build(spec, nfe + 1, space.noise, t_start=space.t_start,
                                                t_end=space.t_end), "train")
            assert with_afs.status == "complete"
            assert with_afs.model_calls == nfe * 8 and without.model_calls == (nfe + 1) * 8


def test_a_space_without_an_analytical_first_step_gets_no_afs_seeds(problem):
    space = DecisionSpace(problem.noise, problem.t_start, problem.t_end, afs_kinds=("none",))
    assert preset_candidates(space, NFES, afs=True) == preset_candidates(space, NFES)


@pytest.mark.parametrize("afs_presets", [True, False])
def test_s3_asks_the_presets_then_their_afs_variants_before_anything_else(problem, afs_presets):
    se = make_searcher("s3", problem.noise, problem.t_start, problem.t_end, NFES, seed=0, afs_presets=afs_presets)
    seeds = preset_candidates(se.space, NFES, afs=afs_presets)
    asked = []
    while len(asked) < len(seeds) + 4:
        for c in se.ask(8):
            asked.append(c)
            se.tell(c, 1.0)
    assert [c.key for c in asked[:len(seeds)]] == [c.key for c in seeds]
    assert not any(c.origin.startswith("preset") for c in asked[len(seeds):])
    assert any(c.origin.startswith("preset-afs:") for c in asked) == afs_presets
