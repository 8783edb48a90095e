"""Bad option values and bad schedule files: one 'error: ...' line naming what is wrong, exit code 2, no
traceback, and nothing written."""

import json

import pytest

from steptune.cli import main
from steptune.space import Schedule, ScheduleError, load_schedule, noise, presets, spacing
from steptune.storage import connect

CHEAP = ["--cheap-samples", "16", "--heldout-samples", "64"]


def _refused(capsys, args, *words) -> str:
    """Run ``args``; assert exit 2 and one line 'error: ...' holding every one of ``words``."""
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


@pytest.fixture
def good(tmp_path):
    """A 5-NFE schedule file."""
    p = tmp_path / "good.json"
    p.write_text(presets.ddim(5, noise.VPLinear()).to_json())
    return p


@pytest.fixture
def badnoise(tmp_path):
    """A schedule file whose noise schedule has an unknown kind."""
    d = presets.ddim(5, noise.VPLinear()).to_dict()
    d["noise"] = {"kind": "bogus"}
    p = tmp_path / "badnoise.json"
    p.write_text(json.dumps(d))
    return p


@pytest.fixture
def binary(tmp_path):
    p = tmp_path / "bin.json"
    p.write_bytes(b"\xff\xfe\x00garbage")
    return p


# ---- unknown or unfitting spacing and noise names --------------------------------------------------


def test_eval_refuses_an_unknown_spacing(capsys, cache):
    _refused(capsys, ["eval", "--problem", "gmm-2d", "--schedule", "preset:ddim", "--nfe", "5", "--spacing", "bogus",
                      "--cache", cache], "--spacing", "'bogus'", "logsnr")
    assert not cache.exists()


def test_eval_refuses_a_diffusers_spacing_on_a_continuous_noise_schedule(capsys, cache):
    _refused(capsys, ["eval", "--problem", "gmm-2d", "--schedule", "preset:ddim", "--nfe", "5", "--spacing",
                      "diffusers-leading", "--cache", cache], "--spacing", "diffusers-leading", "vp-linear",
             "discrete")
    assert not cache.exists()


def test_schedule_refuses_an_unknown_noise_schedule(capsys, tmp_path):
    out = tmp_path / "s.json"
    _refused(capsys, ["schedule", "preset:ddim", "--nfe", "5", "--noise", "bogus", "-o", out], "noise schedule",
             "'bogus'", "vp-linear")
    assert not out.exists()


def test_spacing_and_noise_names_raise_schedule_errors_that_are_still_value_errors():
    with pytest.raises(ScheduleError, match="unknown spacing 'bogus'"):
        spacing.make(noise.VPLinear(), 4, "bogus")
    with pytest.raises(ScheduleError, match="discrete VP"):
        spacing.make(noise.EDM(), 4, "diffusers-trailing")
    with pytest.raises(ScheduleError, match="unknown noise schedule 'bogus'"):
        noise.get("bogus")
    assert issubclass(ScheduleError, ValueError)
    assert len(spacing.make(noise.VPDiscrete.named("ddpm-linear"), 4, "diffusers-trailing")) == 5


# ---- schedule files with an unknown noise kind or binary bytes --------------------------------------


def test_eval_refuses_a_schedule_file_with_an_unknown_noise_kind(capsys, badnoise, cache):
    _refused(capsys, ["eval", "--problem", "gmm-2d", "--schedule", badnoise, "--cache", cache], str(badnoise),
             "field 'noise'", "'bogus'", "vp-discrete")
    assert not cache.exists()


def test_import_refuses_a_schedule_file_with_an_unknown_noise_kind(capsys, badnoise, tmp_path):
    db = tmp_path / "s.db"
    _refused(capsys, ["import", badnoise, "--study", "imp", "--db", f"sqlite:///{db}"], str(badnoise),
             "field 'noise'", "'bogus'")
    assert not db.exists()


def test_dc_fit_refuses_a_solver_file_with_an_unknown_noise_kind(capsys, badnoise, tmp_path, cache):
    db = tmp_path / "dc.db"
    _refused(capsys, ["dc", "fit", "--problem", "gmm-2d", "--solver", badnoise, "--threads", "1", "--study", "x",
                      "--db", f"sqlite:///{db}", "--cache", cache], str(badnoise), "field 'noise'", "'bogus'")
    assert not db.exists() and not cache.exists()


def test_eval_refuses_a_schedule_file_that_is_not_text(capsys, binary, cache):
    _refused(capsys, ["eval", "--problem", "gmm-2d", "--schedule", binary, "--cache", cache], str(binary),
             "not a text file")
    assert not cache.exists()


@pytest.mark.parametrize("bad, words", [
    ({"kind": "edm", "sigma_max": 80}, ["field 'noise'", "'sigma_max'"]),
    ({"kind": "vp-linear", "beta_0": "x"}, ["field 'noise'", "'beta_0'"]),
    ({"kind": "vp-discrete", "name": "nope"}, ["field 'noise'", "'nope'"]),
    ({"kind": "vp-discrete", "name": "custom"}, ["field 'noise'", "alphas_cumprod"]),
    ("vp-linear", ["field 'noise'", "object"]),
])
def test_load_schedule_names_the_file_and_the_noise_field(tmp_path, bad, words):
    d = presets.ddim(5, noise.VPLinear()).to_dict()
    d["noise"] = bad
    p = tmp_path / "s.json"
    p.write_text(json.dumps(d))
    with pytest.raises(ScheduleError) as e:
        load_schedule(p)
    for w in [str(p), *words]:
        assert w in str(e.value)


def test_schedules_of_every_named_noise_schedule_still_load():
    for name in noise.NAMED:
        s = presets.ddim(5, noise.get(name), spacing="time-uniform")
        assert Schedule.from_json(s.to_json()) == s


# ---- dc fit / cpr / predict ------------------------------------------------------------------------


def test_dc_fit_refuses_more_fit_samples_than_the_train_bank(capsys, tmp_path, cache):
    db = tmp_path / "dc.db"
    _refused(capsys, ["dc", "fit", "--problem", "gmm-2d", "--solver", "unipc-bh2", "--nfe", "5", "--fit-samples",
                      "100000", "--method", "greedy", "--threads", "1", "--study", "x", "--db", f"sqlite:///{db}",
                      "--cache", cache], "--fit-samples 100000", "256")
    assert not db.exists() and not cache.exists()


@pytest.mark.parametrize("option", ["--greedy-iters", "--joint-iters"])
@pytest.mark.parametrize("value", ["-1", "0"])
def test_dc_fit_refuses_fits_without_iterations(capsys, tmp_path, cache, option, value):
    db = tmp_path / "dc.db"
    _refused(capsys, ["dc", "fit", "--problem", "gmm-2d", "--solver", "unipc-bh2", "--nfe", "5", option, value,
                      "--threads", "1", "--study", "x", "--db", f"sqlite:///{db}", "--cache", cache],
             f"{option} {value}", "at least 1")
    assert not db.exists() and not cache.exists()


def test_dc_fit_refuses_an_nfe_the_solver_file_does_not_cost(capsys, good, tmp_path, cache):
    db = tmp_path / "dc.db"
    _refused(capsys, ["dc", "fit", "--problem", "gmm-2d", "--solver", good, "--nfe", "6", "--threads", "1",
                      "--study", "x", "--db", f"sqlite:///{db}", "--cache", cache], str(good), "5 model calls",
             "--nfe asked for 6")
    assert not db.exists() and not cache.exists()


def test_dc_fit_refuses_a_missing_solver_file(capsys, tmp_path, cache):
    _refused(capsys, ["dc", "fit", "--problem", "gmm-2d", "--solver", tmp_path / "none.json", "--threads", "1",
                      "--cache", cache], "--solver", "none.json", "no such")


def test_dc_fit_refuses_a_negative_guidance_scale(capsys, tmp_path, cache):
    _refused(capsys, ["dc", "fit", "--problem", "gmm-2d", "--nfe", "5", "--cfg", "1,-2", "--threads", "1",
                      "--cache", cache], "--guidance -2", "0 or more")  # --cfg: the old name, still taken


@pytest.fixture(scope="module")
def dc_study(tmp_path_factory):
    """A SQLite file with study 'dc': greedy fits of unipc-bh2 at NFE 5 on gmm-2d (no guidance)."""
    root = tmp_path_factory.mktemp("dc-study")
    assert main(["dc", "fit", "--problem", "gmm-2d", "--solver", "unipc-bh2", "--nfe", "5", "--method", "greedy",
                 "--greedy-iters", "2", "--fit-samples", "4", "--study", "dc", "--threads", "1", "--db",
                 f"sqlite:///{root / 'dc.db'}", "--cache", str(root / "cache"), "--json"]) == 0
    return root


@pytest.mark.parametrize("ridge", ["-1", "nan"])
def test_dc_cpr_refuses_a_negative_ridge_and_stores_nothing(capsys, dc_study, ridge):
    db = f"sqlite:///{dc_study / 'dc.db'}"
    _refused(capsys, ["dc", "cpr", "--study", "dc", "--fit", "greedy", "--ridge", ridge, "--iters", "2", "--cache",
                      dc_study / "cache", "--db", db], f"--ridge {ridge}", "0 or more")
    with connect(db) as store:
        assert "cpr" not in (store.get_study("dc").config or {})


def test_dc_predict_refuses_guidance_for_a_study_fitted_without_it(capsys, dc_study, tmp_path):
    out = tmp_path / "p.json"
    line = _refused(capsys, ["dc", "predict", "--study", "dc", "--fit", "greedy", "--nfe", "5", "--guidance", "2",
                             "-o", out, "--db", f"sqlite:///{dc_study / 'dc.db'}"], "--guidance 2",
                    "without guidance", "drop --guidance")
    assert "dc fit" not in line and not out.exists()


def test_dc_predict_refuses_a_negative_guidance_scale(capsys, dc_study):
    line = _refused(capsys, ["dc", "predict", "--study", "dc", "--fit", "greedy", "--nfe", "5", "--guidance", "-2",
                             "--db", f"sqlite:///{dc_study / 'dc.db'}"], "--guidance -2", "0 or more")
    assert "dc fit" not in line


# ---- train-digits ----------------------------------------------------------------------------------


def test_train_digits_refuses_zero_threads_before_training(capsys, tmp_path):
    out = tmp_path / "models"
    _refused(capsys, ["train-digits", "--threads", "0", "--steps", "3", "--out", out], "--threads", "at least 1")
    assert not out.exists()


@pytest.mark.parametrize("steps", [1, 2])
def test_the_digits_unet_trains_for_one_or_two_steps(steps):
    from steptune.evaluators.digits_networks import TrainConfig, train_unet

    calls = []
    train_unet(TrainConfig(steps=steps, batch=4, channels=(8, 8)), lambda step, loss: calls.append(step))
    assert calls == list(range(steps))


# ---- eval: preset options and the time scale -------------------------------------------------------


def test_a_preset_option_of_the_wrong_type_is_named(capsys, cache):
    _refused(capsys, ["eval", "--problem", "gmm-2d", "--schedule", "preset:unipc-bh2:order=abc", "--nfe", "5",
                      "--cache", cache], "'order'", "integer", "'abc'")
    assert not cache.exists()


@pytest.mark.parametrize("spec, words", [
    ("preset:unipc-bh2:order=3,order=1", ["option 'order' is given twice; give it once"]),
    ("preset:unipc-bh2:t_start=0.5,t_end=0.9", ["t_end 0.9 is not below t_start 0.5"]),
    ("preset:ddim:t_start=0.0005", ["t_end 0.001 is not below t_start 0.0005"]),  # t_end the problem's own
])
def test_a_preset_spec_that_contradicts_itself_is_named(capsys, cache, spec, words):
    """An option given twice was taken at its last value; times in the wrong order failed at a step's time."""
    _refused(capsys, ["eval", "--problem", "gmm-2d", "--schedule", spec, "--nfe", "5", "--cache", cache], *words)
    assert not cache.exists()


def test_a_spec_time_against_the_noise_schedules_own_end_is_checked(capsys, tmp_path):
    """schedule (no problem) with t_end at the noise schedule's start failed at a step's time."""
    _refused(capsys, ["schedule", "preset:ddim:t_end=1", "--nfe", "4"], "t_end 1 is not below t_start 1")
    assert main(["schedule", "preset:ddim:t_end=0.01", "--nfe", "4", "-o", str(tmp_path / "s.json")]) == 0


def test_a_spec_option_overrides_the_problems_own_time():
    """t_start and t_end given by a caller (the problem's interval) yield to the spec's own, as before."""
    s = presets.build("ddim:t_end=0.01", 4, noise.VPLinear(), t_start=1.0, t_end=1e-3)
    assert s.steps[-1].t == pytest.approx(0.01)


@pytest.mark.parametrize("scale", ["-5", "0", "nan"])
def test_eval_refuses_a_time_scale_that_is_not_positive(capsys, cache, scale):
    _refused(capsys, ["eval", "--model", "test_plugins:bare_network_factory", "--noise", "vp-linear",
                      "--prediction", "eps", "--time-input", "continuous", "--time-scale", scale, "--shape", "4",
                      "--schedule", "preset:ddim", "--nfe", "4", "--cache", cache], "--time-scale", "positive")
    assert not cache.exists()


# ---- relax and relax-report ------------------------------------------------------------------------


@pytest.mark.parametrize("args, words", [
    (["--m", "0"], ["--m 0", "at least 1"]),
    (["--seed", "-1"], ["--seed -1", "0 or more"]),
    (["--steps", "0"], ["--steps 0", "at least 1"]),
    (["--maxiter", "0"], ["--maxiter 0", "at least 1"]),
    (["--tol", "2"], ["--tol 2", "(0, 1)"]),
    (["--learner", "tsallis-inf", "--arms", "0"], ["--arms 0", "200"]),
    (["--learner", "tsallis-inf", "--omega-max", "2.5"], ["--omega-max 2.5", "(1, 2)"]),
])
def test_relax_names_the_bad_value(capsys, tmp_path, args, words):
    db = tmp_path / "rx.db"
    line = _refused(capsys, ["relax", "--problem", "poisson", "--learner", "fixed", "--steps", "3", *args, "--db",
                             f"sqlite:///{db}"], *words)
    assert line.count("--") == 1  # only the bad option is named
    assert not db.exists()


@pytest.fixture(scope="module")
def relax_study(tmp_path_factory):
    root = tmp_path_factory.mktemp("relax-study")
    assert main(["relax", "--problem", "poisson", "--m", "4", "--learner", "fixed", "--omega", "1.5", "--steps",
                 "3", "--study", "rx", "--db", f"sqlite:///{root / 'rx.db'}", "--json"]) == 0
    return root


@pytest.mark.parametrize("name, words", [
    ("x.txt", ["x.txt", ".txt", ".png"]),
    ("noext", ["noext", "extension", ".png"]),
])
def test_relax_report_refuses_an_image_format_it_cannot_write(capsys, relax_study, tmp_path, name, words):
    out = tmp_path / name
    _refused(capsys, ["relax-report", "--study", "rx", "--no-baselines", "-o", out, "--db",
                      f"sqlite:///{relax_study / 'rx.db'}"], "-o", *words)
    assert list(tmp_path.iterdir()) == []


def test_relax_report_refuses_a_folder_instead_of_saying_it_saved_it(capsys, relax_study, tmp_path):
    folder = tmp_path / "adir"
    folder.mkdir()
    _refused(capsys, ["relax-report", "--study", "rx", "--no-baselines", "-o", folder, "--db",
                      f"sqlite:///{relax_study / 'rx.db'}"], "-o", str(folder), "folder")
    assert list(tmp_path.iterdir()) == [folder] and list(folder.iterdir()) == []


def test_relax_report_saves_the_image_it_names(capsys, relax_study, tmp_path):
    out = tmp_path / "sub" / "r.png"
    assert main(["relax-report", "--study", "rx", "--no-baselines", "-o", str(out), "--db",
                 f"sqlite:///{relax_study / 'rx.db'}"]) == 0
    assert f"saved {out}" in capsys.readouterr().out.replace("\n", "")
    assert out.is_file()


@pytest.mark.parametrize("option,message", [
    (["--spacing", "bogus"], "--spacing: unknown spacing 'bogus'; choose from time-uniform, logsnr, time-quadratic, "
                             "karras, diffusers-linspace, diffusers-leading, diffusers-trailing"),
    (["--presets", "ddim:order=3"], "preset 'ddim' has no option 'order'; its options are spacing, t_start, t_end, "
                                    "final_zero, prediction"),
    (["--presets", "unipc-bh2:order=9"], "--presets: preset 'unipc-bh2:order=9' cannot be built at any NFE of the "
                                         "sweep (at NFE 4: preset 'unipc-bh2': option 'order' is 9; use 1 to 3 (its "
                                         "corrector is one order higher, at most 4))"),
    (["--presets", "unipc-bh2:order=3,order=1"], "preset 'unipc-bh2:order=3,order=1': option 'order' is given twice; "
                                                 "give it once"),
    (["--presets", "preset:ddim"], "preset 'preset:ddim': name the preset without the 'preset:' prefix (ddim); the "
                                   "prefix is for --schedule, where a file may be named instead"),
    (["--presets", "ddim:spacing=karras", "--spacing", "best"], "--presets ddim:spacing=karras: it sets its own "
                                                                "spacing, and --spacing best chooses one; give one of "
                                                                "them")])
def test_sweep_refuses_an_unknown_spacing_or_preset_option_before_it_runs(option, message, tmp_path, capsys):
    out = tmp_path / "sw"
    assert main(["sweep", "--problem", "gmm-2d", "--nfe", "4", "--presets", "ddim", "--cache", str(tmp_path / "c"),
                 "--out", str(out), *option]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not out.exists()


# ---- job files and NFE lists -------------------------------------------------------------------------


def test_job_file_not_in_utf8_is_one_line(tmp_path, capsys):
    job = tmp_path / "latin1.toml"
    job.write_bytes('study = "caf\xe9"\n'.encode("latin-1"))
    _refused(capsys, ["run", job], "latin1.toml", "UTF-8")


def test_baseline_nfe_below_one_is_refused(tmp_path, capsys):
    job = tmp_path / "job.toml"
    job.write_text('study = "x"\n[problem]\nname = "gmm-2d"\n[search]\nnfe = [3]\n'
                   "[evaluation]\nbaseline_nfe = [0, -3]\n")
    _refused(capsys, ["run", job, "--db", f"sqlite:///{tmp_path / 'x.db'}"], "evaluation.baseline_nfe",
             "positive integer", "[0, -3]")
    assert not (tmp_path / "x.db").exists()


@pytest.mark.parametrize("nfe", ["-1", "0", "0-3"])
def test_nfe_below_one_names_the_rule(nfe, capsys):
    line = _refused(capsys, ["eval", "--schedule", "preset:ddim", "--nfe", nfe], "--nfe", "positive integer")
    assert "not a range" not in line


@pytest.mark.parametrize("option, value, words", [
    ("--confirm", "-1", ["--confirm -1: ", "greater than or equal to 0"]),
    ("--cheap-samples", "0", ["--cheap-samples 0: ", "greater than or equal to 1"]),
    ("--seed", "-3", ["--seed -3: ", "greater than or equal to 0"]),
    ("--time-budget", "soon", ["--time-budget soon: ", "'8h'"]),
    ("--nfe", "500", ["--nfe 500: ", "search at most NFE"]),
])
def test_search_names_the_option_a_refused_value_came_from(capsys, tmp_path, cache, option, value, words):
    """The search builds a job from its options; a value the job refuses is named as the option it came from."""
    db = tmp_path / "x.db"
    args = ["search", "--problem", "gmm-2d", "--nfe", "3", *CHEAP, "--budget", "5", "--study", "s", "--out",
            tmp_path, "--cache", cache, "--db", f"sqlite:///{db}", option, value]
    line = _refused(capsys, args, *words)
    assert "key '" not in line and "evaluation." not in line and "search." not in line, line
    assert not db.exists()


def test_eval_of_a_schedule_for_another_noise_schedule_names_the_file_and_the_fix(capsys, good, cache):
    """``good`` is written for vp-linear; the model runs on ddpm-linear. The line names the file, both noise
    schedules and the command that writes the schedule for the model."""
    line = _refused(capsys, ["eval", "--problem", "gmm-2d", "--noise", "ddpm-linear", "--schedule", good,
                             "--cache", cache], f"{good}: the schedule is for noise schedule VPLinear(",
                    "the model uses VPDiscrete(name='ddpm-linear')",
                    "steptune schedule preset:NAME --nfe 5 --noise ddpm-linear")
    assert "Traceback" not in line


@pytest.mark.parametrize("option, value, words", [
    ("--guidance", "3", ["problem 'gmm-2d' is not guided; drop --guidance"]),
    ("--shape", "3", ["problem 'gmm-2d' fixes its own sample shape; drop --shape"]),
])
def test_an_option_the_built_in_problem_does_not_take_is_named(capsys, cache, option, value, words):
    _refused(capsys, ["eval", "--problem", "gmm-2d", "--schedule", "preset:ddim", "--nfe", "5", option, value,
                      "--cache", cache], *words)
    assert not cache.exists()


@pytest.mark.parametrize("command", [["eval", "--schedule", "preset:ddim"], ["sweep"], ["search", "--budget", "2"]])
def test_problem_and_model_together_are_refused_before_anything_runs(capsys, tmp_path, cache, command):
    """--model replaces --problem: with both given one was ignored without a word (the model ran)."""
    db = tmp_path / "s.db"
    _refused(capsys, [*command, "--problem", "gmm-2d", "--model", "mymodels:net", "--nfe", "4", "--cache",
                      cache, *(["--db", f"sqlite:///{db}"] if command[0] == "search" else [])],
             "--problem gmm-2d and --model mymodels:net: give one")
    assert not cache.exists() and not db.exists()



@pytest.mark.parametrize("method, options, message", [
    ("tpe", '{metric = "bogus"}', "search.options metric 'bogus': the search is told what an evaluation of gmm-2d on "
                                  "the train bank reports (rmse, median_err, sw, nll); use one of them"),
    ("random", '{metric = "fd_digits"}', "search.options metric 'fd_digits': the search is told what an evaluation of "
                                         "gmm-2d on the train bank reports"),
    ("s3", '{presets = ["nonexistent"]}', "for method 's3': unknown preset 'nonexistent'"),
    ("cmaes", '{presets = ["ddim", "unipc-bh2:order=9"]}', "for method 'cmaes': preset 'unipc-bh2:order=9' cannot be "
                                                            "built at any NFE searched (at NFE 3: preset 'unipc-bh2': "
                                                            "option 'order' is 9; use 1 to 3"),
])
def test_a_search_option_that_would_quietly_spoil_the_search_is_refused(tmp_path, capsys, method, options, message):
    """A metric no evaluation reports was told as a failure for every trial (the search learnt nothing); a misspelled
    or impossible seed preset was dropped: both refused in one line naming the file, before anything is stored."""
    from runner_jobs import job_text

    text = job_text("spoil", tmp_path / "cache").replace('method = "s3"', f'method = "{method}"')
    job = tmp_path / "job.toml"
    job.write_text(text.replace("nfe = [3, 4]", f"nfe = [3, 4]\noptions = {options}"))
    db = tmp_path / "x.db"
    line = _refused(capsys, ["run", job, "--db", f"sqlite:///{db}"], f"error: {job}: ", message)
    assert "Traceback" not in line
    if db.exists():
        with connect(f"sqlite:///{db}") as store:
            assert store.studies() == []


def test_best_at_an_nfe_of_a_relaxation_study_is_refused(capsys, relax_study):
    """A relaxation study has no NFEs: --nfe was ignored and its summary printed."""
    _refused(capsys, ["best", "--study", "rx", "--nfe", "5", "--db", f"sqlite:///{relax_study / 'rx.db'}"],
             "study 'rx' is a relaxation study: it holds SOR rounds, not schedules at an NFE; leave out --nfe")


@pytest.mark.parametrize("option, value, words", [("--seed", "2", "(--seed (1 then, 2 now) differs)"),
                                                  ("--method", "tpe", "(--method ('random' then, 'tpe' now) differs)")])
def test_a_search_resumed_with_another_option_names_the_option(capsys, tmp_path, cache, option, value, words):
    """The search's resume refusal names its option as every other refusal of search does ('seed' was a job key)."""
    args = ["search", "--problem", "gmm-2d", "--nfe", "3", "--method", "random", "--budget", "2", "--seed", "1",
            *CHEAP, "--study", "r", "--cache", cache, "--out", tmp_path, "--db", f"sqlite:///{tmp_path / 'x.db'}"]
    assert main([str(a) for a in args]) == 0
    capsys.readouterr()
    _refused(capsys, [*args, option, value], f"error: study 'r' was run with a different job {words}; resume it")



def test_relax_refuses_a_heat_grid_of_zero_cells(capsys, tmp_path):
    """--nx 0 ran with the default 100 cells (0 was taken for 'not given')."""
    db = tmp_path / "rx.db"
    _refused(capsys, ["relax", "--problem", "heat2d", "--nx", "0", "--steps", "3", "--learner", "fixed", "--db",
                      f"sqlite:///{db}"], "nx 0: use a grid between 4 and 2000 cells across")
    assert not db.exists()
