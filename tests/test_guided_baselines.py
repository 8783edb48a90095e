"""Baselines users run: each preset at the best of its spacings (chosen on the train bank, reported on the held-out
bank), diffusers' stock schedulers with their default config, and schedules on diffusers' leading timesteps that
start below the bank's time. Checked against independent evaluations and a diffusers loop written out here."""

import json
import math
import warnings

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from runner_jobs import run_job

from steptune import diffusers_default
from steptune.evaluators import Evaluator, get_problem
from steptune.evaluators.digits_cond import digits_problem
from steptune.evaluators.evaluator import device_name
from steptune.jobs import load_job
from steptune.search import DEFAULT_PRESETS, baselines
from steptune.space import Schedule, presets, sample
from steptune.space import spacing as spacing_mod
from steptune.space.noise import VPDiscrete
from steptune.storage import connect

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning")]

CHEAP, HELDOUT, NFE = 16, 24, 4


def _job(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text(f"""
study = "g"
seed = 1
[problem]
name = "gmm-2d"
noise = "ddpm-linear"
[search]
method = "random"
nfe = [{NFE}]
[evaluation]
cheap_samples = {CHEAP}
train_samples = {CHEAP}
heldout_samples = {HELDOUT}
confirm = 1
cache = "{tmp_path / 'cache'}"
[budget]
evaluations = 2
""")
    return load_job(path)


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("guided")
    job = _job(tmp_path)
    url = f"sqlite:///{tmp_path / 'g.db'}"
    _, runner = run_job(job, url, progress=lambda s: s["phase"] == "baseline" and BASELINE_COUNTS.append(
        (s["phase_done"], s["phase_total"])))
    with connect(url) as db:
        trials = db.trials("g")
    return runner.problem, trials, tmp_path


BASELINE_COUNTS: list[tuple[int, int]] = []  # (done, total) of each progress report in the baseline phase


def test_the_baseline_count_holds_the_diffusers_defaults_from_its_first_report(stored):
    """diffusers' schedulers run after the presets; a count that grew when they started read 39/39, then 49/49."""
    trials = stored[1]
    baselines_run = [t for t in trials if t.info.get("baseline")]
    assert any(t.info.get("diffusers") for t in baselines_run)
    assert BASELINE_COUNTS and {total for _, total in BASELINE_COUNTS} == {len(baselines_run)}, BASELINE_COUNTS
    assert BASELINE_COUNTS[-1][0] == len(baselines_run)


def test_the_best_spacing_baseline_is_the_minimum_of_an_independent_eval_per_spacing(stored):
    problem, trials, tmp_path = stored
    assert isinstance(problem.noise, VPDiscrete)
    ev = Evaluator(problem, n_train=CHEAP, n_heldout=HELDOUT, seed=0, cache_dir=None)
    base = [t for t in trials if t.info.get("baseline") and t.status == "complete"]
    spacings = ["logsnr", "time-uniform", "time-quadratic", *spacing_mod.DIFFUSERS_SPACINGS]
    checked = 0
    for spec in DEFAULT_PRESETS:
        train, held = {}, {}
        for sp in spacings:
            try:
                s = presets.build(spec, NFE, problem.noise, spacing=sp, t_start=problem.t_start, t_end=problem.t_end)
            except Exception:
                continue
            train[sp] = ev.evaluate(s, "train").metrics["rmse"]
            held[sp] = ev.evaluate(s, "heldout").metrics["rmse"]
        if not train:
            continue
        best = min(train, key=train.__getitem__)
        rows = [t for t in base if t.info["origin"].startswith(f"preset:{spec}@{NFE}")]
        # one row records the choice: a row of its own, or the default row when the default spacing is the best
        (t,) = [t for t in rows if t.info.get("best_of") == f"{spec}@{NFE}"]
        assert t.info["spacing"] == best
        assert t.info["origin"] in (f"preset:{spec}@{NFE} spacing={best}", f"preset:{spec}@{NFE}")
        for sp, v in t.info["spacing_scores"].items():
            assert math.isclose(v, train[sp], rel_tol=1e-9), (spec, sp)
        assert math.isclose(t.score, held[best], rel_tol=1e-9), spec
        assert presets.build(t.schedule["name"], NFE, problem.noise, t_start=problem.t_start,
                             t_end=problem.t_end).key() == t.key  # preset:NAME rebuilds it
        checked += 1
    assert checked >= 10 and any(t.info["origin"].endswith(f"spacing={t.info.get('spacing')}") for t in base)


def _by_hand(cls, config: dict, model, x_T: torch.Tensor, nfe: int) -> torch.Tensor:
    """A diffusers pipeline's loop: set_timesteps, scale the noise, scale_model_input, the model, step."""
    s = cls(**config)
    s.set_timesteps(nfe)
    x = (x_T * s.init_noise_sigma).float()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in s.timesteps:
            inp = s.scale_model_input(x, t)
            eps = model.fn(inp, torch.full((x.shape[0],), float(t), dtype=inp.dtype))
            x = s.step(eps, t, x).prev_sample
    return x.double()


STOCK = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}


@pytest.mark.parametrize("cls", [UniPCMultistepScheduler, DPMSolverMultistepScheduler, DDIMScheduler,
                                 DEISMultistepScheduler, EulerDiscreteScheduler])
def test_the_diffusers_default_row_is_the_stock_scheduler_run_by_hand(stored, cls):
    problem, trials, _ = stored
    (row,) = [t for t in trials if t.info.get("origin") == f"diffusers-default:{cls.__name__}@{NFE}"]
    assert row.info["baseline"] and row.bank == "heldout" and row.status == "complete"
    ev = Evaluator(problem, n_train=CHEAP, n_heldout=HELDOUT, seed=0, cache_dir=None)
    # its cost as every evaluation's: one model call a step for each of these schedulers, on the driver's device
    assert row.metrics["model_calls"] == NFE * HELDOUT and row.metrics["device"] == device_name(ev.device)
    x = _by_hand(cls, STOCK, problem.model, ev.x_T("heldout"), NFE)
    # scored against the reference at its end (sigma = 0; for DEIS the smallest training sigma)
    got = ev.score(Schedule.from_dict(row.schedule), x, "heldout")
    # the stock config (beta_schedule="linear") and the module's (the model's own beta table) agree to float32
    assert math.isclose(got.metrics["rmse"], row.score, rel_tol=1e-4), (got.metrics["rmse"], row.score)
    # and the row is not a steptune run in disguise where diffusers differs (DDIM clips x0 by default)
    if cls is DDIMScheduler:
        plain = ev.evaluate(Schedule.from_dict(row.schedule), "heldout").metrics["rmse"]
        assert not math.isclose(plain, row.score, rel_tol=1e-3)


def test_a_schedule_on_leading_timesteps_runs_from_the_bank_noise_as_diffusers_does():
    """diffusers' leading timesteps start below T; diffusers feeds them unit-variance noise unchanged. The evaluator
    runs such a schedule from the bank's noise at its own first time and scores it against the reference from
    t_start: the same number as the stock scheduler's loop written out here."""
    problem = get_problem("gmm-2d", "ddpm-linear")
    ev = Evaluator(problem, n_train=16, n_heldout=16, cache_dir=None)
    s = presets.build("dpm-solver++-2m", NFE, problem.noise, spacing="diffusers-leading")
    assert s.t_start < problem.t_start
    res = ev.evaluate(s, "train")
    x = _by_hand(DPMSolverMultistepScheduler, {**STOCK, "timestep_spacing": "leading"}, problem.model,
                 ev.x_T("train"), NFE)
    assert torch.allclose(sample(problem.model, ev.x_T("train"), s), x, rtol=0, atol=1e-4)
    assert math.isclose(ev.score(s, x, "train").metrics["rmse"], res.metrics["rmse"], rel_tol=1e-4)


def test_the_default_spacing_rule():
    ddpm = VPDiscrete.named("ddpm-linear")
    assert spacing_mod.default_for(ddpm, 5.0) == "time-uniform"
    assert spacing_mod.default_for(ddpm, 1.0) is None and spacing_mod.default_for(ddpm, None) is None
    continuous = get_problem("gmm-2d", "vp-linear").noise
    assert spacing_mod.default_for(continuous, 5.0) is None
    assert spacing_mod.candidates(ddpm)[3:] == list(spacing_mod.DIFFUSERS_SPACINGS)
    assert spacing_mod.candidates(continuous) == ["logsnr", "time-uniform", "time-quadratic"]
    guided = digits_problem(guidance_scale=3.0, models_dir=None, bank_sizes=(2, 2), quality=False)
    assert baselines.default_spacing(guided) == "time-uniform"


def test_sweep_best_spacing_picks_on_the_train_bank_and_adds_diffusers_defaults(tmp_path, capsys):
    from steptune.cli import main
    from steptune.evaluators import evaluator_options

    url = f"sqlite:///{tmp_path / 's.db'}"
    argv = ["sweep", "--problem", "gmm-2d", "--noise", "ddpm-linear", "--nfe", "5", "--presets", "ddim,unipc-bh2",
            "--spacing", "best", "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "out"), "--study", "sw",
            "--db", url, "--json"]
    assert main(argv) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    problem = get_problem("gmm-2d", "ddpm-linear")
    ev = Evaluator(problem, cache_dir=None, **evaluator_options(problem))
    for spec in ("ddim", "unipc-bh2"):
        (row,) = [r for r in rows if r["preset"] == spec]
        train = {sp: ev.evaluate(presets.build(spec, 5, problem.noise, spacing=sp, t_start=problem.t_start,
                                               t_end=problem.t_end), "train").metrics["rmse"]
                 for sp in spacing_mod.candidates(problem.noise)}
        best = min(train, key=train.__getitem__)
        assert row["spacing"] == best and row["spacing_scores"] == pytest.approx(train, rel=1e-9)
        held = ev.evaluate(presets.build(spec, 5, problem.noise, spacing=best, t_start=problem.t_start,
                                         t_end=problem.t_end), "heldout").metrics["rmse"]
        assert row["rmse"] == pytest.approx(held, rel=1e-9)
    names = {r["preset"] for r in rows}
    assert {f"diffusers-default:{n}" for n in ("UniPCMultistepScheduler", "DDIMScheduler")} <= names
    with connect(url) as db:
        trials = db.trials("sw")
    assert len(trials) == len(rows)
    assert {t.info.get("origin") for t in trials} >= {f"preset:unipc-bh2@5 spacing={rows[1]['spacing']}",
                                                      "diffusers-default:UniPCMultistepScheduler@5"}


def test_dc_targets_of_a_later_starting_schedule_are_the_reference_from_t_start():
    from steptune.search import dc

    problem = get_problem("gmm-2d", "ddpm-linear")
    ev = Evaluator(problem, n_train=8, n_heldout=8, cache_dir=None)
    s = presets.build("unipc-bh2", 6, problem.noise, spacing="diffusers-leading")
    assert s.t_start < problem.t_start and s.times[-1] == 0.0
    x, targets = dc.fit_targets(ev, s, 8)
    assert len(targets) == len(s.steps)
    ref = ev.reference("train", t_end=0.0)
    assert torch.allclose(targets[-1], ref, rtol=1e-6, atol=1e-6)
    # not vacuous: the flow from the schedule's own start, on the same noise, ends measurably elsewhere
    assert (problem.reference_states(x, s.times).states[-1] - ref).abs().max() > 1e-5


def test_the_summary_names_the_best_baseline_so_that_it_can_be_run_again(stored):
    from steptune.runner import summarize

    problem, trials, _ = stored
    (row,) = summarize(trials, [NFE])
    ev = Evaluator(problem, n_train=CHEAP, n_heldout=HELDOUT, seed=0, cache_dir=None)
    if row.preset.startswith("diffusers-default:"):
        got = diffusers_default.evaluate(ev, row.preset.removeprefix("diffusers-default:"), NFE, "heldout")[0]
    else:  # what `--schedule preset:NAME` builds
        got = ev.evaluate(presets.build(row.preset, NFE, problem.noise, t_start=problem.t_start,
                                        t_end=problem.t_end), "heldout")
    assert math.isclose(got.metrics["rmse"], row.preset_score, rel_tol=1e-9)
    assert row.preset_score == min(t.score for t in trials if t.info.get("baseline") and t.nfe == NFE
                                   and t.score is not None)
