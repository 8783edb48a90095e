"""The dtype users get: torch's default float32, as the command line and real networks run. A schedule's
score in float32 agrees with the float64 one to single precision, on the exact problems and a network."""

import pytest
import torch

from steptune.evaluators import Evaluator, load_problem
from steptune.space import noise, presets


def _scores(problem_name: str, tmp_path, dtype, **options):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        prob = load_problem(problem_name, **options)
        ev = Evaluator(prob, n_train=64, n_heldout=64, cache_dir=tmp_path / str(dtype))
        sched = presets.build("unipc-bh2", 6, prob.noise, t_start=prob.t_start, t_end=prob.t_end)
        return ev.evaluate(sched, "heldout").metrics
    finally:
        torch.set_default_dtype(previous)


@pytest.mark.parametrize("name,options", [("gmm-2d", {}), ("gmm-digits", {}), ("gmm-2d", {"noise": "edm"})])
def test_a_score_in_float32_is_the_float64_score_to_single_precision(name, options, tmp_path):
    assert torch.get_default_dtype() == torch.float32  # what every test not asking for float64 runs in
    single = _scores(name, tmp_path, torch.float32, **options)
    double = _scores(name, tmp_path, torch.float64, **options)
    assert single["rmse"] == pytest.approx(double["rmse"], rel=1e-4, abs=1e-6)
    assert single["rmse"] > 1e-3  # a 6-step solver is far from exact: the comparison is not of zeros


def test_the_digits_network_scores_alike_in_both_dtypes(tmp_path):
    single = _scores("digits-cond", tmp_path, torch.float32, guidance_scale=2.0)
    double = _scores("digits-cond", tmp_path, torch.float64, guidance_scale=2.0)
    assert single["rmse"] == pytest.approx(double["rmse"], rel=1e-3)


def test_noise_schedules_built_in_float32_default_are_float64_inside():
    """Times and log-SNRs are computed in float64 whatever the default dtype, so a schedule's times (and its
    key) do not depend on it."""
    a = presets.build("dpm-solver++-3m", 8, noise.VPLinear())
    torch.set_default_dtype(torch.float64)
    try:
        b = presets.build("dpm-solver++-3m", 8, noise.VPLinear())
    finally:
        torch.set_default_dtype(torch.float32)
    assert a.times == b.times and a.key() == b.key()
