"""A study belongs to the command that made it: runs, sweeps and imports refuse a study of another kind or
problem before any work, in one line, and leave it as it was; a sweep run again adds nothing."""

import pytest
from runner_jobs import run_cli, write_job

from steptune.storage import connect


@pytest.fixture(scope="module")
def cache(tmp_path_factory):  # reference solutions shared by this module's runs
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def relax_db(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    assert run_cli(["relax", "--problem", "shifted-laplacian", "--m", "6", "--steps", "5", "--learner", "chebcb",
                 "--study", "rx", "--db", url, "--json"], capsys)[0] == 0
    with connect(url) as db:
        config = db.get_study("rx").config
    return url, config


def _unchanged(url, config):
    with connect(url) as db:
        assert db.get_study("rx").config == config and not db.trials("rx")


def test_a_job_refuses_a_relaxation_study(relax_db, tmp_path, cache, capsys):
    url, config = relax_db
    job = write_job(tmp_path / "job.toml", "rx", cache, evaluations=2)
    code, _, err = run_cli(["run", str(job), "--db", url], capsys)
    assert (code, err.strip()) == (2, f"error: {job}: study 'rx' was made by steptune relax, not by a search; give "
                                      "a new study name")
    _unchanged(url, config)


def test_studies_lists_a_relaxation_study_by_its_rounds(relax_db, capsys):
    """An SOR study holds rounds, not trials: the list gives its problem, its rounds and their mean iterations (as
    the stored rounds give them), not zero trials and no problem."""
    import json

    url, _ = relax_db
    with connect(url) as db:
        its = [r.iterations for r in db.relaxation_rounds("rx")]
    code, out, _ = run_cli(["studies", "--db", url, "--json"], capsys)
    assert code == 0
    (row,) = json.loads(out)
    assert (row["problem"], row["rounds"]) == ("shifted-laplacian", 5)
    assert row["mean_iterations"] == pytest.approx(sum(its) / len(its))
    code, out, _ = run_cli(["studies", "--db", url], capsys)
    assert code == 0 and "shifted-laplacian (SOR)" in out and "5 rounds" in out
    assert f"mean {sum(its) / len(its):.1f} iterations per system" in out


def test_sweep_and_import_refuse_a_relaxation_study(relax_db, tmp_path, cache, capsys):
    url, config = relax_db
    code, _, err = run_cli(["sweep", "--problem", "gmm-2d", "--nfe", "4", "--presets", "ddim", "--cache", str(cache),
                         "--out", str(tmp_path / "sw"), "--study", "rx", "--db", url], capsys)
    assert (code, err.strip()) == (2, "error: study 'rx' was made by steptune relax, not by a sweep; give a new "
                                      "study name")
    assert not (tmp_path / "sw").exists()  # refused before the sweep ran
    path = tmp_path / "ddim.json"
    assert run_cli(["schedule", "preset:ddim", "--nfe", "4", "-o", str(path)], capsys)[0] == 0
    code, _, err = run_cli(["import", str(path), "--study", "rx", "--db", url], capsys)
    assert code == 2 and "study 'rx' is a relaxation study" in err and "\n" not in err.strip()
    code, _, err = run_cli(["export", "--study", "rx", "--nfe", "4", "--db", url], capsys)
    assert code == 2 and err.strip() == ("error: study 'rx' is a relaxation study: it holds SOR rounds, not schedules; "
                                         "'steptune relax-report --study rx' reports it"), err
    _unchanged(url, config)


def test_a_sweep_keeps_to_its_problem_and_adds_nothing_when_run_again(tmp_path, cache, capsys):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    argv = ["sweep", "--nfe", "4,5", "--presets", "ddim,dpm-solver++-2m", "--cache", str(cache), "--out",
            str(tmp_path / "sw"), "--study", "pre", "--db", url, "--json"]
    assert run_cli([*argv, "--problem", "gmm-2d"], capsys)[0] == 0
    with connect(url) as db:
        first = [(t.key, t.score) for t in db.trials("pre")]
    assert len(first) == 4
    code, _, err = run_cli([*argv, "--problem", "gmm-2d"], capsys)
    assert code == 0 and "stored 0 new trials" in err
    code, _, err = run_cli([*argv, "--problem", "gmm-2d", "--noise", "vp-cosine"], capsys)
    assert code == 2 and err.strip() == (
        "error: study 'pre' was scored on gmm-2d with other settings (noise.kind: 'vp-linear' then, 'vp-cosine' now); "
        "its scores cannot be mixed with new ones: run it with the settings it was made with, or give a new study name")
    # another noise schedule brings its own default prediction: it is the noise that is named, not the prediction
    code, _, err = run_cli([*argv, "--problem", "gmm-2d", "--noise", "flow"], capsys)
    assert code == 2 and "(noise.kind: 'vp-linear' then, 'flow' now)" in err, err
    with connect(url) as db:
        assert [(t.key, t.score) for t in db.trials("pre")] == first


def test_a_sweep_of_the_other_bank_is_not_mixed_into_a_study(tmp_path, cache, capsys):
    """Held-out and train-bank sweeps in one study: its best ranked the train scores with the held-out ones (and
    reported the train bank); the second is refused before it runs, the study as it was."""
    url = f"sqlite:///{tmp_path / 'x.db'}"
    argv = ["sweep", "--problem", "gmm-2d", "--nfe", "4", "--presets", "ddim", "--cache", str(cache), "--out",
            str(tmp_path / "sw"), "--study", "banks", "--db", url]
    assert run_cli([*argv, "--bank", "train"], capsys)[0] == 0
    with connect(url) as db:
        first = [(t.key, t.fidelity, t.score) for t in db.trials("banks")]
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and err == ("error: study 'banks' holds sweeps on the train bank, and its best would rank these "
                                 "heldout-bank scores with them; give the study of each bank its own name\n"), err
    with connect(url) as db:
        assert [(t.key, t.fidelity, t.score) for t in db.trials("banks")] == first and first[0][1] == "train"


def test_a_sweep_checks_its_database_before_it_runs(tmp_path, cache, capsys):
    path = tmp_path / "notes.db"
    path.write_text("not a database")
    code, _, err = run_cli(["sweep", "--problem", "gmm-2d", "--nfe", "4", "--presets", "ddim", "--cache", str(cache),
                         "--out", str(tmp_path / "sw"), "--study", "s", "--db", f"sqlite:///{path}"], capsys)
    assert code == 2 and err.startswith("error: --db: cannot open the database") and err.count("\n") == 1
    assert "check that the file is a steptune database" in err, err
    assert not (tmp_path / "sw").exists()


def test_search_options_and_seed_are_checked_before_the_study_is_made(tmp_path, cache, capsys):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    job = write_job(tmp_path / "job.toml", "o", cache, evaluations=2)
    job.write_text(job.read_text().replace('method = "s3"', 'method = "s3"\noptions = {bogus = 1}'))
    code, _, err = run_cli(["run", str(job), "--db", url], capsys)
    assert code == 2 and err.startswith(f"error: {job}: key 'search.options': unknown option 'bogus' of method 's3'")
    job.write_text(job.read_text().replace("options = {bogus = 1}", "").replace("seed = 3", "seed = -1"))
    code, _, err = run_cli(["run", str(job), "--db", url], capsys)
    assert code == 2 and "seed" in err and err.count("\n") == 1
    with connect(url) as db:
        assert not db.studies()


def test_what_the_search_cannot_do_is_refused_before_the_study_is_made(tmp_path, cache, capsys):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    job = write_job(tmp_path / "job.toml", "n", cache, evaluations=2, nfe="[4, 5000]")
    code, _, err = run_cli(["run", str(job), "--db", url], capsys)
    assert code == 2 and err.startswith(f"error: {job}: search.nfe 5000: at most ") and "search at most NFE" in err
    job = write_job(tmp_path / "job.toml", "n", cache, evaluations=2)
    job.write_text(job.read_text().replace("evaluations = 2", "evaluations = true"))
    code, _, err = run_cli(["run", str(job), "--db", url], capsys)
    assert code == 2 and "budget.evaluations" in err and err.count("\n") == 1
    code, _, err = run_cli(["search", "--problem", "gmm-2d", "--nfe", "4", "--method", "random", "--budget", "2",
                         "--heldout-samples", "0", "--cache", str(cache), "--db", url], capsys)
    assert code == 2 and err.startswith("error: --heldout-samples 0: ") and err.count("\n") == 1
    with connect(url) as db:
        assert not db.studies()


def test_a_ray_address_where_nothing_listens_is_refused_at_once(tmp_path, cache, capsys):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    job = write_job(tmp_path / "job.toml", "r", cache, evaluations=2)
    code, _, err = run_cli(["run", str(job), "--ray-address", "127.0.0.1:1", "--db", url], capsys)
    assert code == 2 and err.startswith("error: backend.address 127.0.0.1:1: nothing answers there")
    with connect(url) as db:
        assert not db.studies()


def test_a_local_backend_and_a_ray_address_together_are_refused(tmp_path, cache, capsys):
    """--ray-address implies Ray: beside --backend local one of them would be ignored (it was the local one)."""
    url = f"sqlite:///{tmp_path / 'x.db'}"
    job = write_job(tmp_path / "job.toml", "r", cache, evaluations=2)
    code, _, err = run_cli(["run", str(job), "--backend", "local", "--ray-address", "auto", "--db", url], capsys)
    assert code == 2 and err == ("error: --backend local and --ray-address auto: an address is for the Ray backend; "
                                 "give one of them\n")
    assert not (tmp_path / "x.db").exists()


def test_a_bad_command_line_override_names_its_key(tmp_path, cache, capsys):
    job = write_job(tmp_path / "job.toml", "b", cache, evaluations=2)
    code, _, err = run_cli(["run", str(job), "--backend", "bogus", "--db", f"sqlite:///{tmp_path / 'x.db'}"], capsys)
    assert code == 2 and err == ("error: the command-line options: key 'backend.kind': Input should be 'local' or "
                                 "'ray' (got 'bogus')\n")


def test_status_of_a_sweep_or_an_import_shows_its_best_per_nfe_as_best_does(tmp_path, cache, capsys):
    import json

    url = f"sqlite:///{tmp_path / 'x.db'}"
    assert run_cli(["sweep", "--problem", "gmm-2d", "--nfe", "4,5", "--presets", "ddim,unipc-bh2", "--study", "sw",
                    "--db", url, "--out", str(tmp_path / "sw"), "--cache", str(cache)], capsys)[0] == 0
    assert run_cli(["export", "--study", "sw", "--nfe", "5", "-o", str(tmp_path / "s5.json"), "--db", url],
                   capsys)[0] == 0
    assert run_cli(["import", str(tmp_path / "s5.json"), "--study", "imp", "--db", url], capsys)[0] == 0
    for study, made_by in (("sw", "steptune sweep"), ("imp", "steptune import")):
        code, out, _ = run_cli(["best", "--study", study, "--db", url, "--json"], capsys)
        best = {r["nfe"]: r for r in json.loads(out)}
        code, out, _ = run_cli(["status", "--study", study, "--db", url, "--json"], capsys)
        info = json.loads(out)
        assert code == 0 and info["made_by"] == made_by and info["finished"] and info["eta_seconds"] is None
        assert {r["nfe"]: (r["best"], r["trial_id"]) for r in info["per_nfe"]} == {
            n: (r["score"], r["id"]) for n, r in best.items()}
        code, text, _ = run_cli(["status", "--study", study, "--db", url], capsys)
        assert code == 0 and text.startswith(f"{study}: made by {made_by}, ") and "ETA" not in text and "/?" not in text
        assert all(f"{r['id']}" in text for r in best.values())
    assert run_cli(["import", str(tmp_path / "s5.json"), "--study", "mine", "--queue", "--db", url], capsys)[0] == 0
    code, text, _ = run_cli(["status", "--study", "mine", "--db", url], capsys)
    assert " ".join(text.split()).startswith(
        "mine: made by steptune import, 1 trial, 1 of them queued, which no run of this study scores ('steptune eval "
        "-s FILE' scores a schedule file; a search's study scores what is imported into it); no search runs on it")
