"""DC-Solver compensation: identity at ratio 1, error reduction on the Gaussian closed form, the joint
fit's gradient, the greedy fit's optimum, cascade polynomial regression, dc fit / dc predict."""

import json

import numpy as np
import pytest
import torch
from gaussian import exact_solution, gaussian_model

from steptune.cli import main
from steptune.search import dc
from steptune.space import noise as noise_mod
from steptune.space import presets, sample

NS = noise_mod.VPLinear()
MU = torch.tensor([0.5, -1.0, 0.25, 1.5, 0.0, -0.3])
VAR = torch.tensor([0.04, 0.25, 1.0, 0.09, 0.01, 0.5])
T_END = 1e-3


def _noise(n, seed):
    return torch.randn(n, 6, generator=torch.Generator().manual_seed(seed))


def _targets(sched, x_T):
    return [exact_solution(NS, MU, VAR, x_T, sched.t_start, t) for t in sched.times[1:]]


def _mse(model, sched, x_T):
    exact = exact_solution(NS, MU, VAR, x_T, sched.t_start, sched.times[-1])
    return float((sample(model, x_T, sched) - exact).pow(2).mean())


@pytest.mark.parametrize("spec", ["unipc-bh2", "unipc-bh1", "dpm-solver++-2m", "dpm-solver++-3m"])
@pytest.mark.usefixtures("float64")  # compared with a reference to round-off
def test_ratio_one_reproduces_the_uncompensated_solver_exactly(spec):
    model = gaussian_model(NS, MU, VAR)
    sched = presets.build(spec, 6, NS, t_end=T_END)
    x_T = _noise(16, 0)
    plain = sample(model, x_T, sched)
    assert torch.equal(sample(model, x_T, dc.with_ratios(sched, [1.0] * 6)), plain)
    ones = [torch.tensor(1.0, requires_grad=True) for _ in range(6)]  # the differentiable path, compensating
    assert torch.equal(dc.run(model, sched, x_T, ones)[0].detach(), plain)
    assert not torch.equal(sample(model, x_T, dc.with_ratios(sched, [1.0, 1.0, 1.1, 1.0, 1.0, 1.0])), plain)


def test_dc_reduces_the_error_at_nfe_5_on_unseen_noise():
    model = gaussian_model(NS, MU, VAR)
    sched = presets.build("unipc-bh2", 5, NS, t_end=T_END)
    x_fit, x_test = _noise(10, 0), _noise(512, 1)
    greedy = dc.fit_greedy(model, sched, x_fit, _targets(sched, x_fit))
    joint = dc.fit_joint(model, sched, x_fit, _targets(sched, x_fit)[-1], init=greedy.ratios)
    base = _mse(model, sched, x_test)
    assert greedy.ratios[:2] == [1.0, 1.0] and greedy.ratios[2:] != [1.0] * 3
    assert _mse(model, dc.with_ratios(sched, greedy.ratios), x_test) < 0.9 * base
    assert _mse(model, dc.with_ratios(sched, joint.ratios), x_test) < 0.9 * base
    assert joint.loss <= greedy.loss


def test_continuing_a_joint_fit_from_a_neighbour_reaches_the_neighbours_optimum_on_the_same_objective():
    model = gaussian_model(NS, MU, VAR)
    sched = presets.build("unipc-bh2", 6, NS, t_end=T_END)
    x_fit = _noise(10, 0)
    target = _targets(sched, x_fit)[-1]

    def config(init, iters):
        fit = dc.fit_joint(model, sched, x_fit, target, init=init, iters=iters)
        return dc.ConfigFit(sched, {"joint": fit}, 0.0, model, x_fit, target)

    good = config(dc.fit_greedy(model, sched, x_fit, _targets(sched, x_fit)).ratios, 30)
    stuck = config([1.0, 1.0, 1.6, 0.4, 1.6, 0.4], 1)  # a poor start, hardly optimised
    assert stuck.fits["joint"].loss > 2 * good.fits["joint"].loss
    before = {id(cf): cf.fits["joint"].loss for cf in (good, stuck)}
    # two guidance scales of the same objective: the poor fit, restarted from the good one's ratios, is
    # at least as good as it (the start counts); no fit ever gets worse
    assert dc.continue_across_guidance([(3.0, stuck), (1.5, good)], iters=5) >= 1
    assert stuck.fits["joint"].loss <= before[id(good)]
    assert good.fits["joint"].loss <= before[id(good)]
    assert stuck.fits["joint"].model_calls > 0 and stuck.fits["joint"].history[-1]["restart"] == {"from_cfg": 1.5}


@pytest.mark.usefixtures("float64")  # compared with a reference to round-off
def test_joint_fit_gradient_matches_finite_differences():
    model = gaussian_model(NS, MU, VAR)
    sched = presets.build("unipc-bh2", 4, NS, t_end=T_END)  # two compensable steps
    x_T = _noise(8, 2)
    target = exact_solution(NS, MU, VAR, x_T, sched.t_start, T_END)
    theta = torch.tensor([0.9, 1.2], requires_grad=True)
    dc.joint_loss(model, sched, x_T, target, theta).backward()
    h = 1e-6
    for j in range(2):
        e = torch.zeros(2)
        e[j] = h
        with torch.no_grad():
            fd = (dc.joint_loss(model, sched, x_T, target, theta + e)
                  - dc.joint_loss(model, sched, x_T, target, theta - e)) / (2 * h)
        assert float(theta.grad[j]) == pytest.approx(float(fd), rel=1e-6, abs=1e-12)


def test_greedy_step_finds_the_minimum_of_its_step_loss():
    model = gaussian_model(NS, MU, VAR)
    sched = presets.build("dpm-solver++-2m", 4, NS, t_end=T_END)
    x_T = _noise(10, 3)
    targets = _targets(sched, x_T)
    fit = dc.fit_greedy(model, sched, x_T, targets, iters=60)
    grid = np.linspace(0.5, 1.5, 401)
    losses = [float((dc.run(model, sched, x_T, [1, 1, r, 1], stop_after=2)[0] - targets[2]).pow(2).mean())
              for r in grid]
    assert fit.ratios[2] == pytest.approx(grid[int(np.argmin(losses))], abs=0.01)


def test_cpr_recovers_a_cascade_polynomial():
    rng = np.random.default_rng(0)
    truth = dc.CPR(rng.normal(0, 0.05, (4, 3, 3)), (5, 10), (1.5, 5), bounds=(-10, 10))
    truth.coef[0, 0, 0] += 1.0
    rows = [(n, g, truth.predict(n, g)) for n in (5, 6, 8, 10) for g in (1.5, 3, 5)]
    fitted = dc.CPR.fit(rows, ridge=1e-12)
    fitted.bounds = truth.bounds
    for n, g in ((7, 2.0), (9, 4.0)):
        assert fitted.predict(n, g) == pytest.approx(truth.predict(n, g), abs=1e-6)
    assert fitted.predict(7, 2.0)[:2] == [1.0, 1.0]


def test_dc_fit_stores_trials_and_dc_predict_uses_them(tmp_path, capsys):
    db = f"sqlite:///{tmp_path / 'dc.db'}"
    args = ["dc", "fit", "--problem", "test_plugins:gaussian_factory", "--solver", "unipc-bh2", "--nfe", "5,7",
            "--study", "g-dc", "--db", db, "--cache", str(tmp_path), "--greedy-iters", "5", "--joint-iters", "5",
            "--json"]
    assert main(args) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["nfe"] for r in rows] == [5, 7]
    assert rows[0]["mse_joint"] < rows[0]["mse_base"]
    from steptune.storage import connect

    with connect(db) as store:
        stored = store.trials("g-dc")
    trials = [t for t in stored if "dc_fit" in t.info]
    assert len(trials) == 4 and {t.info["dc_fit"] for t in trials} == {"greedy", "joint"}
    # beside the fits, the solver at its best spacing per NFE (the baselines the table compares with)
    base = [t for t in stored if t.info.get("baseline")]
    assert sorted(t.nfe for t in base) == [5, 7] and all(t.info["origin"].startswith("preset:unipc-bh2@") for t in base)
    assert any(st.get("dc_ratio", 1.0) != 1.0 for t in trials for st in t.schedule["steps"])
    out = tmp_path / "pred.json"
    assert main(["dc", "predict", "--study", "g-dc", "--nfe", "6", "--db", db, "-o", str(out), "--json"]) == 0
    pred = json.loads(capsys.readouterr().out)
    assert len(pred["ratios"]) == 6 and pred["ratios"][:2] == [1.0, 1.0]
    saved = json.loads(out.read_text())
    assert [s.get("dc_ratio", 1.0) for s in saved["steps"]] == pytest.approx(pred["ratios"])


def test_dc_commands_refuse_bad_input(tmp_path, capsys):
    assert main(["dc", "fit", "--problem", "gmm-2d", "--method", "newton", "--cache", str(tmp_path)]) == 2
    assert "--method" in capsys.readouterr().err
    assert main(["dc", "predict", "--study", "nope", "--nfe", "5", "--db",
                 f"sqlite:///{tmp_path / 'none.db'}"]) == 2
    assert capsys.readouterr().err.startswith("error:")
    assert main(["dc", "fit", "--problem", "gmm-2d", "--threads", "0", "--cache", str(tmp_path)]) == 2
    assert "--threads must be at least 1" in capsys.readouterr().err
    assert main(["dc", "fit", "--problem", "gmm-2d", "--device", "gpu0", "--cache", str(tmp_path)]) == 2
    assert "--device 'gpu0' is not a device torch knows" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["dc", "fit", "--problem", "gmm-2d", "--device", "cuda", "--cache", str(tmp_path)]) == 2
        assert "torch sees no CUDA device here; use --device cpu" in capsys.readouterr().err


def test_dc_fit_refines_a_schedule_file_with_the_joint_fit(tmp_path, capsys):
    from steptune.evaluators import load_problem

    prob = load_problem("test_plugins:gaussian_factory")
    found = presets.build("dpm-solver++-3m", 5, prob.noise, t_start=prob.t_start, t_end=prob.t_end)
    found = dc.with_ratios(found, [1.0, 1.0, 1.05, 0.95, 1.0])  # as a search may leave it
    path = tmp_path / "found.json"
    found.save(path)
    assert main(["dc", "fit", "--problem", "test_plugins:gaussian_factory", "--solver", str(path), "--method",
                 "joint", "--joint-iters", "10", "--cache", str(tmp_path), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["rows"][0]
    assert row["nfe"] == 5 and row["mse_joint"] < row["mse_base"]


def test_cpr_outside_its_fitted_box_answers_for_the_nearest_fitted_configuration():
    rng = np.random.default_rng(1)
    cpr = dc.CPR(rng.normal(0, 0.3, (4, 3, 3)), (5, 10), (1.5, 5), bounds=(-100, 100))
    assert cpr.inside(7, 2.0) and not cpr.inside(12, 3.0) and not cpr.inside(8, 7.5)
    # the ratios of an NFE-12 schedule at its relative step positions, as the polynomial gives them at NFE 10
    at_edge = [1.0, 1.0] + [float(cpr.features((i + 1) / 12, 10, 3.0) @ cpr.coef.ravel()) for i in range(2, 12)]
    assert cpr.predict(12, 3.0, 12) == pytest.approx(at_edge, abs=1e-12)
    assert cpr.predict(8, 7.5) == cpr.predict(8, 5.0)
    assert cpr.predict(8, 0.5) == cpr.predict(8, 1.5)


def test_interpolated_ratios_are_linear_in_the_guidance_between_the_bracketing_fits():
    rows = [(5, 1.5, [1, 1, 0.8, 1.2, 0.5]), (5, 3.0, [1, 1, 1.1, 0.9, 1.4]), (5, 5.0, [1, 1, 1.3, 1.3, 1.3]),
            (6, 2.0, [1.0] * 6)]
    ratios, between = dc.interpolate_ratios(rows, 5, 2.0)
    assert between == (1.5, 3.0)
    assert ratios == pytest.approx([1, 1, 0.8 + 0.3 / 3, 1.2 - 0.3 / 3, 0.5 + 0.9 / 3], abs=1e-12)
    assert dc.interpolate_ratios(rows, 5, 4.0)[0] == pytest.approx([1, 1, 1.2, 1.1, 1.35], abs=1e-12)
    assert dc.interpolate_ratios(rows, 5, 3.0) == ([1, 1, 1.1, 0.9, 1.4], (3.0, 3.0))
    assert dc.interpolate_ratios(rows, 5, 6.0) is None  # outside the fitted guidance scales
    assert dc.interpolate_ratios(rows, 7, 2.0) is None  # no fit at this NFE
    assert dc.interpolate_ratios(rows, 6, 3.0) is None  # one fit at NFE 6 cannot bracket another scale


def test_cpr_refined_end_to_end_beats_no_compensation():
    model = gaussian_model(NS, MU, VAR)
    cases = []
    for nfe in (5, 6):
        sched = presets.build("unipc-bh2", nfe, NS, t_end=T_END)
        x = _noise(10, nfe)
        cases.append(dc.CPRCase(model, sched, x, _targets(sched, x)[-1], nfe, None))
    identity = dc.CPR.fit([(5, None, [1.0] * 5), (6, None, [1.0] * 6)], ridge=1e-12)
    refined, history = dc.refine_cpr(identity, cases, iters=15)
    assert history[0] == pytest.approx(1.0) and min(history) < 0.9
    x_test = _noise(256, 9)
    sched = presets.build("unipc-bh2", 5, NS, t_end=T_END)
    assert _mse(model, dc.with_ratios(sched, refined.predict(5, None)), x_test) < _mse(model, sched, x_test)
