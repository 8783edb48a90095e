"""`dc cpr` (the end-to-end cascade polynomial regression stored with a study) and what `dc predict` does
with it: the stored coefficients, their training loss, predictions, held-out scores, refusals."""

import json
import shlex
import shutil

import numpy as np
import pytest

from steptune.cli import main
from steptune.evaluators import Evaluator, evaluator_options, load_problem
from steptune.search import dc
from steptune.space import load_schedule, presets
from steptune.storage import connect

# a plug-in without conventions of its own: `dc cpr` can rebuild it only from what `dc fit` recorded
PLUGIN = "test_plugins:bare_network_factory"
CONVENTIONS = {"noise": "vp-linear", "prediction": "eps", "time_input": "continuous", "time_scale": None,
               "shape": "4"}
FIT_SAMPLES = 8


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A SQLite file holding study 'g' (joint fits at NFE 5, 6, 8) and the reference cache."""
    root = tmp_path_factory.mktemp("dc-fitted")
    db = root / "dc.db"
    assert main(["dc", "fit", "--problem", PLUGIN, "--noise", "vp-linear", "--prediction", "eps", "--time-input",
                 "continuous", "--shape", "4", "--nfe", "5,6,8", "--method", "joint", "--joint-iters", "5",
                 "--fit-samples", str(FIT_SAMPLES), "--study", "g", "--db", f"sqlite:///{db}", "--cache",
                 str(root / "cache"), "--json"]) == 0
    return root


@pytest.fixture
def db(fitted, tmp_path):
    """A private copy of the fitted database; the cache stays shared."""
    shutil.copy(fitted / "dc.db", tmp_path / "dc.db")
    return f"sqlite:///{tmp_path / 'dc.db'}"


def _cli(capsys, *args):
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _config(db, study="g"):
    with connect(db) as store:
        return store.get_study(study).config


def _rows(db):
    with connect(db) as store:
        trials = store.trials("g")
    return [(t.nfe, t.info["cfg"], [s.get("dc_ratio", 1.0) for s in t.schedule["steps"]]) for t in trials
            if "dc_fit" in t.info]  # the study also holds the solver's baselines


def _problem():
    return load_problem(PLUGIN, noise="vp-linear", prediction="eps", time_input="continuous", shape=(4,))


def _evaluator(fitted):
    prob = _problem()
    return Evaluator(prob, cache_dir=fitted / "cache", **evaluator_options(prob))


def _schedule(prob, nfe):
    return presets.build("unipc-bh2", nfe, prob.noise, t_start=prob.t_start, t_end=prob.t_end)


def _cases(fitted):
    ev = _evaluator(fitted)
    x = ev.x_T("train", FIT_SAMPLES)
    bank = {**ev.bank("train").describe(), "n": FIT_SAMPLES}
    cases = []
    for nfe in (5, 6, 8):
        s = _schedule(ev.problem, nfe)
        target = ev.problem.reference_states(x, s.times, bank=bank, cache_dir=ev.cache_dir).states[-1]
        cases.append(dc.CPRCase(ev.problem.model, s, x, target, nfe, None))
    return cases


def _loss(cpr, cases):
    return dc.refine_cpr(cpr, cases, iters=0)[1][0]


def _cpr(capsys, db, fitted, *extra):
    code, out, _ = _cli(capsys, "dc", "cpr", "--study", "g", "--iters", "8", "--db", db, "--cache",
                        str(fitted / "cache"), "--json", *extra)
    assert code == 0
    return json.loads(out)


def test_dc_fit_records_its_problem_conventions(db):
    config = _config(db)
    assert config["conventions"] == CONVENTIONS and config["fit_samples"] == FIT_SAMPLES
    assert config["problem"] == PLUGIN


def test_dc_cpr_stores_coefficients_whose_training_loss_beats_the_regression(capsys, db, fitted):
    shown = _cpr(capsys, db, fitted)
    stored = _config(db)["cpr"]
    assert shown == {"study": "g", **stored}
    assert (stored["fit"], stored["start"], stored["iters"], stored["lr"]) == ("joint", "regression", 8, 0.003)
    assert stored["configurations"] == [[5, None], [6, None], [8, None]]
    assert len(stored["history"]) == 9 and stored["loss_start"] == stored["history"][0]
    assert stored["loss"] == min(stored["history"]) < stored["loss_start"]
    cases = _cases(fitted)
    regression = dc.CPR.fit(_rows(db), ridge=1e-3)
    end_to_end = dc.CPR.from_dict(stored)
    assert _loss(regression, cases) == pytest.approx(stored["loss_start"], rel=1e-9)
    assert _loss(end_to_end, cases) == pytest.approx(stored["loss"], rel=1e-9)
    assert _loss(end_to_end, cases) < _loss(regression, cases)


def test_dc_predict_uses_the_stored_cpr_unless_told_to_regress(capsys, db, fitted):
    predict = ["dc", "predict", "--study", "g", "--nfe", "7", "--db", db, "--json"]
    code, out, _ = _cli(capsys, *predict)
    assert code == 0 and json.loads(out)["cpr"] == "regression"
    stored = _cpr(capsys, db, fitted)
    reloaded = dc.CPR(np.array(stored["coef"]).reshape(4, 3, 3), tuple(stored["nfe_range"]),
                      tuple(stored["cfg_range"]), bounds=tuple(stored["bounds"]))
    code, out, _ = _cli(capsys, *predict)
    pred = json.loads(out)
    assert code == 0 and (pred["cpr"], pred["fit"]) == ("end-to-end", "joint")
    assert pred["ratios"] == reloaded.predict(7, None, 7)
    code, out, _ = _cli(capsys, *predict, "--regression")
    pred = json.loads(out)
    assert code == 0 and pred["cpr"] == "regression"
    assert pred["ratios"] == dc.CPR.fit(_rows(db), ridge=1e-3).predict(7, None, 7)
    assert pred["ratios"] != reloaded.predict(7, None, 7)
    code, out, err = _cli(capsys, *predict[:-1])
    assert code == 0 and "end-to-end" in out
    assert "has no 'joint' fit at NFE 7" in err
    code, out, err = _cli(capsys, "dc", "predict", "--study", "g", "--nfe", "6", "--cpr", "--db", db, "--json")
    assert code == 0 and json.loads(out)["nfe_fitted"] and "has no" not in err


def test_dc_predict_warns_when_fits_were_added_after_the_stored_cpr(capsys, db, fitted):
    _cpr(capsys, db, fitted)
    predict = ["dc", "predict", "--study", "g", "--nfe", "7", "--cpr", "--db", db]
    code, _, err = _cli(capsys, *predict)
    assert code == 0 and "predates" not in err
    assert main(["dc", "fit", "--problem", PLUGIN, "--noise", "vp-linear", "--prediction", "eps", "--time-input",
                 "continuous", "--shape", "4", "--nfe", "7", "--method", "joint", "--joint-iters", "2",
                 "--fit-samples", str(FIT_SAMPLES), "--study", "g", "--db", db, "--cache", str(fitted / "cache"),
                 "--json"]) == 0
    capsys.readouterr()
    code, _, err = _cli(capsys, *predict)
    assert code == 0 and "predates 1 'joint' fit(s) of 'g' (e.g. NFE 7); rerun" in err


def test_dc_predict_evaluate_scores_like_the_evaluator(capsys, db, fitted, tmp_path):
    path = tmp_path / "pred.json"
    code, out, _ = _cli(capsys, "dc", "predict", "--study", "g", "--nfe", "7", "--evaluate", "--cache",
                        str(fitted / "cache"), "--db", db, "-o", str(path), "--json")
    pred = json.loads(out)
    ev = _evaluator(fitted)
    assert code == 0
    assert pred["mse_predicted"] == pytest.approx(ev.evaluate(load_schedule(path), "heldout").metrics["rmse"] ** 2,
                                                  rel=1e-12)
    base = ev.evaluate(_schedule(ev.problem, 7), "heldout").metrics["rmse"] ** 2
    assert pred["mse_base"] == pytest.approx(base, rel=1e-12)
    assert pred["mse_predicted"] < pred["mse_base"]
    code, out, _ = _cli(capsys, "dc", "predict", "--study", "g", "--nfe", "7", "--evaluate", "--cache",
                        str(fitted / "cache"), "--db", db)
    assert code == 0 and "held-out MSE: without DC" in out


def _add_studies(db):
    """'other' (a search study), 'empty' (dc fit's config, no trials) and 'lost' (fits, no conventions)."""
    with connect(db) as store:
        config = store.get_study("g").config
        trials = store.trials("g")
        store.create_study("other", method="s3", config={"kind": "search"})
        store.create_study("empty", kind="dc-fit", method="dc", config=config)
        items = [{"schedule": t.schedule, "status": "complete", "metrics": t.metrics, "info": t.info}
                 for t in trials]
        lost = {k: v for k, v in config.items() if k != "conventions"}
        store.add_trials("lost", items, create={"method": "dc", "kind": "dc-fit", "config": lost})


@pytest.mark.parametrize("args, message", [
    (["--study", "nope"], "no study named 'nope'"),
    (["--study", "other"], "was not written by 'steptune dc fit'"),
    (["--study", "empty"], "has no 'joint' fits; run 'steptune dc fit --study empty' first"),
    (["--study", "g", "--fit", "greedy"], "has no 'greedy' fits; use --fit joint"),
    (["--study", "g", "--iters", "0"], "--iters must be at least 1"),
    (["--study", "lost"], "bare_network_factory"),
])
def test_dc_cpr_refuses_bad_input_in_one_line_and_changes_nothing(capsys, db, fitted, args, message):
    _add_studies(db)
    with connect(db) as store:
        before = [(s.name, s.config) for s in store.studies()]
    code, out, err = _cli(capsys, "dc", "cpr", *args, "--db", db, "--cache", str(fitted / "cache"))
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
    with connect(db) as store:
        assert [(s.name, s.config) for s in store.studies()] == before


def test_dc_predict_outside_the_fitted_ranges_needs_extrapolate(capsys, db):
    predict = ["dc", "predict", "--study", "g", "--nfe", "12", "--db", db, "--json"]
    with connect(db) as store:
        before = store.get_study("g").config
    code, out, err = _cli(capsys, *predict)
    assert code == 2 and out == "" and err.count("\n") == 1
    # the study is unguided: its box has no CFG range
    assert "NFE 12 lies outside the configurations study 'g' was fitted on (NFE 5-8); fit it" in err
    assert "--extrapolate" in err
    code, out, err = _cli(capsys, *predict, "--extrapolate")
    assert code == 0 and "lies outside" in err
    cpr = dc.CPR.fit(_rows(db), ridge=1e-3)
    at_edge = [1.0, 1.0] + [min(max(float(cpr.features((i + 1) / 12, 8, 1.0) @ cpr.coef.ravel()), 0.3), 1.7)
                            for i in range(2, 12)]
    assert json.loads(out)["ratios"] == pytest.approx(at_edge, abs=1e-12)
    with connect(db) as store:
        assert store.get_study("g").config == before


def test_dc_predict_interpolates_between_fits_at_the_same_nfe(capsys, db):
    with connect(db) as store:
        t = next(t for t in store.trials("g") if t.nfe == 5)
        items = []
        for g, r in ((1.0, [1.0, 1.0, 0.8, 1.2, 0.6]), (3.0, [1.0, 1.0, 1.2, 1.0, 1.4])):
            steps = [{**st, "dc_ratio": v} for st, v in zip(t.schedule["steps"], r)]
            items.append({"schedule": {**t.schedule, "steps": steps}, "status": "complete", "metrics": t.metrics,
                          "info": {**t.info, "cfg": g}})
        store.add_trials("g", items)
    code, out, _ = _cli(capsys, "dc", "predict", "--study", "g", "--nfe", "5", "--cfg", "1.5", "--db", db, "--json")
    pred = json.loads(out)
    assert code == 0 and (pred["method"], pred["between_cfg"]) == ("interpolation", [1.0, 3.0])
    assert pred["ratios"] == pytest.approx([1.0, 1.0, 0.9, 1.15, 0.8], abs=1e-12)
    code, out, _ = _cli(capsys, "dc", "predict", "--study", "g", "--nfe", "5", "--cfg", "1.5", "--cpr", "--db", db,
                        "--json")
    assert code == 0 and json.loads(out)["method"] == "cpr"


def test_the_suggested_fit_command_adds_the_configuration_to_the_study(capsys, db, fitted):
    code, _, err = _cli(capsys, "dc", "predict", "--study", "g", "--nfe", "7", "--db", db)
    command = err.split("'steptune ", 1)[1].split("'", 1)[0]
    assert command.startswith("dc fit --problem test_plugins:bare_network_factory --solver unipc-bh2 --noise "
                              "vp-linear") and command.endswith("--nfe 7 --study g")
    code, _, _ = _cli(capsys, *shlex.split(command), "--joint-iters", "2", "--db", db, "--cache",
                      str(fitted / "cache"), "--json")
    assert code == 0
    assert sorted({n for n, _, _ in _rows(db)}) == [5, 6, 7, 8]
    code, out, err = _cli(capsys, "dc", "predict", "--study", "g", "--nfe", "7", "--db", db, "--json")
    assert code == 0 and "has no" not in err


@pytest.mark.parametrize("args, message", [
    (["--problem", "gmm-2d"], "was fitted with problem 'test_plugins:bare_network_factory', not 'gmm-2d'"),
    (["--problem", PLUGIN, "--noise", "vp-linear", "--prediction", "eps", "--time-input", "continuous", "--shape",
      "4", "--fit-samples", "3"], "was fitted with fit_samples 8, not 3"),
])
def test_dc_fit_refuses_to_mix_other_fits_into_a_study(capsys, db, fitted, args, message):
    before = _rows(db)
    code, out, err = _cli(capsys, "dc", "fit", *args, "--nfe", "7", "--method", "joint", "--joint-iters", "1",
                          "--study", "g", "--db", db, "--cache", str(fitted / "cache"))
    assert code == 2 and out == "" and err.count("\n") == 1 and message in err
    assert _rows(db) == before


def test_dc_fit_refuses_fits_of_other_weights_into_a_study(capsys, db, fitted, monkeypatch):
    import test_plugins

    monkeypatch.setattr(test_plugins, "MU", test_plugins.MU + 0.1)  # the factory's network, with other weights
    before = _rows(db)
    code, out, err = _cli(capsys, "dc", "fit", "--problem", PLUGIN, "--noise", "vp-linear", "--prediction", "eps",
                          "--time-input", "continuous", "--shape", "4", "--fit-samples", str(FIT_SAMPLES), "--nfe", "7",
                          "--method", "joint", "--joint-iters", "1", "--study", "g", "--db", db, "--cache",
                          str(fitted / "cache"))
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert err.startswith(f"error: study 'g' was scored with other network weights than the {PLUGIN} built here "
                          "(data.network_sha256 "), err
    assert _rows(db) == before


def test_ctrl_c_during_dc_fit_says_what_was_kept_and_stores_nothing(tmp_path):
    import signal
    import subprocess
    import sys

    url = f"sqlite:///{tmp_path / 'x.db'}"
    proc = subprocess.Popen([sys.executable, "-m", "steptune", "dc", "fit", "--problem", "digits-cond", "--solver",
                             "unipc-bh2", "--nfe", "5,6,8,10", "--cfg", "1.5,3,5", "--study", "s", "--db", url,
                             "--cache", str(tmp_path / "cache"), "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:  # the fits have begun: well before the twelve are done
        seen.append(line)
        if line.startswith("fitting 12 configurations"):
            break
    else:
        raise AssertionError(f"dc fit ended before fitting: {''.join(seen)}")
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=120)
    err = "".join(seen) + rest
    last = err.strip().splitlines()[-1]
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert last.startswith("interrupted: ") and last.endswith("configurations were fitted; nothing was stored (a "
                                                              "study gets its fits all at once); run the command "
                                                              "again to fit them")
    with connect(url) as db:
        assert not db.studies()


def test_a_study_fitted_on_earlier_banks_takes_no_new_fits_nor_cpr(capsys, db, fitted):
    with connect(db) as store:
        assert store.get_study("g").config["bank_version"] == 2
        store.update_study_config("g", {"bank_version": None})  # as stored before the banks were drawn in blocks
    n = len(_rows(db))
    code, _, err = _cli(capsys, "dc", "cpr", "--study", "g", "--db", db, "--cache", str(fitted / "cache"))
    assert code == 2 and err.startswith("error: study 'g' was fitted on noise banks drawn by an earlier steptune "
                                        "(bank version 1, now 2)")
    code, _, err = _cli(capsys, "dc", "fit", "--problem", PLUGIN, "--noise", "vp-linear", "--prediction", "eps",
                        "--time-input", "continuous", "--shape", "4", "--nfe", "10", "--method", "joint",
                        "--joint-iters", "5", "--fit-samples", str(FIT_SAMPLES), "--study", "g", "--db", db,
                        "--cache", str(fitted / "cache"))
    assert code == 2 and "bank version 1, now 2" in err
    assert len(_rows(db)) == n and "cpr" not in _config(db)


def test_a_guidance_scale_given_twice_is_refused_before_any_fit(tmp_path, capsys):
    db = tmp_path / "dc.db"
    rc = main(["dc", "fit", "--problem", "digits-cond", "--guidance", "1.5,3,1.5", "--nfe", "5", "--study", "twice",
               "--db", f"sqlite:///{db}", "--cache", str(tmp_path)])
    assert rc == 2 and capsys.readouterr().err.strip() == (
        "error: --guidance '1.5,3,1.5': 1.5 is given twice; give each value once")
    assert not db.exists()


def test_dc_predict_says_when_the_stored_cpr_is_of_other_fits_than_fit_names(capsys, db, fitted):
    """The stored CPR starts from the fits it was made from, whatever --fit says: a --fit it does not use is noted."""
    _cpr(capsys, db, fitted)  # from the 'joint' fits
    code, out, err = _cli(capsys, "dc", "predict", "--study", "g", "--nfe", "7", "--cpr", "--fit", "greedy", "--db",
                          db, "--json")
    assert code == 0 and json.loads(out)["cpr"] == "end-to-end"
    assert ("note: the stored CPR of 'g' was fitted from its 'joint' fits, so --fit greedy is not used (--regression "
            "regresses on the 'greedy' fits instead)") in err, err
    code, _, err = _cli(capsys, "dc", "predict", "--study", "g", "--nfe", "7", "--cpr", "--db", db, "--json")
    assert code == 0 and "is not used" not in err
