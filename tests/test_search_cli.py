"""`steptune search` on gmm-2d with a tiny budget: table, JSON file, trials in the database, resume."""

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from steptune.cli import app as _steptune_app
from steptune.cli import main
from steptune.storage import connect


def _app():
    return _steptune_app


def test_search_command_writes_results_and_resumes(tmp_path):
    app, runner = _app(), CliRunner()
    args = ["search", "--problem", "gmm-2d", "--nfe", "3", "--method", "random", "--budget", "8", "--study", "t",
            "--out", str(tmp_path), "--cache", str(tmp_path / "cache"), "--cheap-samples", "16", "--confirm", "1",
            "--heldout-samples", "64", "--db", f"sqlite:///{tmp_path / 'x.db'}"]
    first = [*args[:10], "first", *args[11:]]  # another study first: its trials take the first ids
    assert runner.invoke(app, first).exit_code == 0
    r = runner.invoke(app, args + ["--json"])
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "t.json").read_text())
    assert data["n_evals"] == 8 and data["results"][0]["nfe"] == 3
    row = data["results"][0]
    assert row["schedule"]["schema"] == "steptune.schedule" and row["schedule"]["nfe"] == 3
    assert row["best_preset"] and row["searched_rmse"] > 0
    with connect(f"sqlite:///{tmp_path / 'x.db'}") as db:
        trials = db.trials("t")
        best = db.best("t", 3, fidelity="heldout")
    assert sum(t.fidelity == "train" for t in trials) == 8
    assert sum("confirms" in t.info for t in trials) == 1
    assert {t.nfe for t in trials if t.info.get("baseline")} >= {3, 4, 5, 6}  # presets up to 2 x NFE
    if row["searched_rmse"] <= row["preset_rmse"]:
        assert best.score == row["searched_rmse"]
    with connect(f"sqlite:///{tmp_path / 'x.db'}") as db:  # the id 'export --trial' takes, as everywhere
        shown = db.trial(row["trial"])
    assert (shown.study, shown.score, shown.schedule["steps"]) == ("t", row["searched_rmse"], row["schedule"]["steps"])
    r = runner.invoke(app, [*args[:8], "12", *args[9:]])  # larger budget: resumes, 4 more evaluations
    assert r.exit_code == 0, r.output
    assert "resuming" in r.output and "search" in r.output
    data = json.loads((tmp_path / "t.json").read_text())
    assert data["n_evals"] == 12


def test_unknown_method_is_a_one_line_error(tmp_path, capsys):
    assert main(["search", "--method", "bogus", "--out", str(tmp_path)]) == 2
    msg = capsys.readouterr().err.strip()
    assert msg == "error: --method 'bogus' is unknown; use one of s3, tpe, cmaes, random, mo-tpe"
    url = f"sqlite:///{tmp_path / 'x.db'}"
    assert main(["search", "--study", " ", "--out", str(tmp_path), "--db", url]) == 2
    assert capsys.readouterr().err.strip() == ("error: --study is empty; give the study a name (or leave --study out "
                                               "for one made of the problem, method and seed)")
    assert not (tmp_path / "x.db").exists()


@pytest.mark.skipif(not (Path("/proc").is_dir() and os.access("/proc", os.W_OK)),
                    reason="needs a folder that passes the write check and refuses a new folder (/proc as root)")
def test_a_summary_the_file_system_refuses_after_the_search_loses_neither_the_table_nor_the_study(tmp_path, capsys):
    out = Path("/proc/steptune-summary")  # passes the check before the search (root may write in /proc), then refused
    url = f"sqlite:///{tmp_path / 'x.db'}"
    args = ["search", "--problem", "gmm-2d", "--nfe", "3", "--method", "random", "--budget", "4", "--study", "t",
            "--out", str(out), "--cache", str(tmp_path / "cache"), "--cheap-samples", "16", "--confirm", "1",
            "--heldout-samples", "64", "--db", url]
    code = main(args)
    printed, err = capsys.readouterr()
    assert code == 1, err
    assert "searched RMSE" in printed  # the table came first
    assert err.strip().splitlines()[-1] == (
        f"error: --out {out}: could not save the summary (No such file or directory); study 't' is in the database: "
        "'steptune status --study t' shows it, and the same search with another --out writes the summary without "
        "evaluating again")
    again = [*args[:12], str(tmp_path / "out"), *args[13:]]
    assert main(again) == 0
    assert json.loads((tmp_path / "out" / "t.json").read_text())["n_evals"] == 4
    with connect(url) as db:
        assert sum(t.fidelity == "train" for t in db.trials("t")) == 4


def test_cheap_samples_beyond_the_train_bank_are_said_to_grow_it(tmp_path, capsys):
    """The train bank grows to hold --cheap-samples (its reference computed for every state): said, not silent."""
    from steptune.cli import main
    from steptune.storage import connect

    url = f"sqlite:///{tmp_path / 'x.db'}"
    assert main(["search", "--problem", "gmm-2d", "--nfe", "3", "--method", "random", "--budget", "1",
                 "--cheap-samples", "300", "--heldout-samples", "64", "--study", "big", "--db", url,
                 "--cache", str(tmp_path / "cache"), "--out", str(tmp_path)]) == 0
    assert ("note: --cheap-samples 300 is more than the 256 states of gmm-2d's train bank: the bank grows to 300"
            in capsys.readouterr().err)
    with connect(url) as db:
        assert db.get_study("big").config["job"]["evaluation"]["train_samples"] == 300


def test_a_resume_that_names_a_default_convention_is_the_same_job(tmp_path, capsys):
    """--noise vp-linear (gmm-2d's default) or --prediction eps given on a resume of a study made without them
    resumes it (it was refused as another job); another noise is still refused, named as the noise."""
    from steptune.cli import main
    from steptune.storage import connect

    url = f"sqlite:///{tmp_path / 'x.db'}"
    base = ["search", "--problem", "gmm-2d", "--nfe", "4", "--method", "random", "--budget", "2", "--cheap-samples",
            "16", "--heldout-samples", "64", "--study", "nz", "--db", url, "--cache", str(tmp_path / "cache"),
            "--out", str(tmp_path)]
    assert main(base) == 0
    with connect(url) as db:
        n = db.count_trials("nz")
    for extra in (["--noise", "vp-linear"], ["--noise", "vp-linear", "--prediction", "eps", "--time-input",
                                               "continuous"]):
        capsys.readouterr()
        assert main([*base, *extra]) == 0, capsys.readouterr().err
    with connect(url) as db:
        assert db.count_trials("nz") == n  # resumed, budget spent: nothing new
    assert main([*base, "--noise", "vp-cosine"]) == 2
    assert "(noise.kind: 'vp-linear' then, 'vp-cosine' now)" in capsys.readouterr().err
