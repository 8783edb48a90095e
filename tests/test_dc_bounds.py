"""DC fits and their bounds: why guidance pins the last ratio on DC-Solver's lower bound (the logSNR base
schedule, whose last step a guided model overshoots), the log form that has no bound to end on, and dc fit's
table marking a ratio that ended on one."""

import json
import math

import pytest
import torch

from steptune.cli import main
from steptune.evaluators import Evaluator
from steptune.evaluators.digits_cond import digits_problem
from steptune.search import dc
from steptune.space import presets

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning")]


@pytest.fixture(scope="module")
def guided(tmp_path_factory):
    torch.manual_seed(0)
    problem = digits_problem(guidance_scale=5.0, bank_sizes=(4, 4), quality=False)
    return Evaluator(problem, n_train=4, n_heldout=4, cache_dir=tmp_path_factory.mktemp("dc-bounds"))


def _fit(ev, spacing, bounds):
    p = ev.problem
    s = presets.build("unipc-bh2", 5, p.noise, spacing=spacing, t_start=p.t_start, t_end=p.t_end)
    return dc.fit_config(ev, s, methods=("greedy",), fit_samples=4, greedy_iters=15, bounds=bounds).fits["greedy"]


def test_guidance_pins_the_last_ratio_on_the_logsnr_base_not_on_time_uniform(guided):
    box = _fit(guided, "logsnr", dc.BOUNDS)
    assert dc.on_bound(box.ratios, dc.BOUNDS) == {4: "lower"}
    free = _fit(guided, "logsnr", None)  # the same fit without a bound goes on below it
    assert free.ratios[4] < dc.BOUNDS[0] and dc.BOUNDS[0] < min(free.ratios[:4])
    for bounds in (dc.BOUNDS, None):  # on the base the guided model's default spacing gives, no ratio nears a bound
        ratios = _fit(guided, "time-uniform", bounds).ratios
        assert dc.on_bound(ratios, dc.BOUNDS) == {} and all(0.5 < r < 1.5 for r in ratios), ratios


def test_the_log_form_keeps_every_ratio_positive_and_valid(guided):
    p = guided.problem
    s = presets.build("unipc-bh2", 5, p.noise, spacing="logsnr", t_start=p.t_start, t_end=p.t_end)
    x, targets = dc.fit_targets(guided, s, 4)
    fit = dc.fit_joint(p.model, s, x, targets[-1], init=[1.0, 1.0, 1.0, 1.0, 0.05], iters=5, bounds=None)
    assert all(r > 0 and math.isfinite(r) for r in fit.ratios)
    dc.with_ratios(s, fit.ratios)  # validates


def test_on_bound():
    assert dc.on_bound([1.0, 0.3, 1.7, 0.30001], (0.3, 1.7)) == {1: "lower", 2: "upper"}
    assert dc.on_bound([0.3, 1.7], None) == {}


def test_dc_fit_marks_a_ratio_that_ended_on_a_bound(tmp_path, capsys):
    args = ["dc", "fit", "--problem", "test_plugins:gaussian_factory", "--solver", "unipc-bh2", "--nfe", "6",
            "--method", "greedy", "--greedy-iters", "5", "--bounds", "0.99,1.01", "--cache", str(tmp_path)]
    assert main([*args, "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["rows"]
    ratios = row["ratios_greedy"]
    want = {str(i): ("lower" if r < 1 else "upper") for i, r in enumerate(ratios) if r in (0.99, 1.01)}
    assert want and row["on_bound_greedy"] == want
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "on bound" in captured.out and f"step {next(iter(want))}" in captured.out
    assert "ended on a bound" in captured.err
    assert main([*args[:-2], "--bounds", "2,3"]) == 2
    assert "0 < LO < 1 < HI" in capsys.readouterr().err
