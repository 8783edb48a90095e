"""The job runner with the in-process backend: job-file validation, resumption after SIGKILL and SIGINT,
the wall-clock budget, and `steptune status`."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from runner_jobs import job_text, outcome, run_cli, run_job, write_job

from steptune.cli import main
from steptune.cli.console import fmt
from steptune.cli.run import study_status
from steptune.space import noise, presets
from steptune.storage import connect

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def reference_study(tmp_path_factory, cache):
    """An uninterrupted run of the job the interruption tests repeat."""
    d = tmp_path_factory.mktemp("ref")
    url = f"sqlite:///{d / 'ref.db'}"
    job = write_job(d / "job.toml", "ref", cache, evaluations=30)
    assert main(["run", str(job), "--db", url, "--json"]) == 0
    with connect(url) as db:
        return outcome(db, "ref")


# ---- bad job files: one line, exit 2, nothing written ------------------------------------------------


BAD = [
    ("unknown-key", lambda t: t.replace("[search]\n", "[search]\nmethd = 's3'\n"),
     "unknown key 'search.methd' in [search]; did you mean 'method'?; known keys: method, nfe, batch, lookahead, "
     "options"),
    ("unknown-key-prefix", lambda t: t.replace("[problem]\n", "[problem]\nguidance = 3\n"),
     "unknown key 'problem.guidance' in [problem]; did you mean 'guidance_scale'?"),
    ("unknown-key-far", lambda t: t.replace("[budget]\n", "[budget]\nwallclock = 3\n"),
     "unknown key 'budget.wallclock' in [budget]; known keys: evaluations, time"),
    ("wrong-type", lambda t: t.replace("evaluations = 12", "evaluations = 'many'"),
     "key 'budget.evaluations': Input should be a valid integer"),
    ("bad-duration", lambda t: t.replace("evaluations = 12", "evaluations = 12\ntime = '8 hours'"),
     "key 'budget.time': '8 hours' is not a duration"),
    ("unknown-method", lambda t: t.replace('method = "s3"', 'method = "grid"'),
     "key 'search.method': unknown method 'grid'; use one of s3, tpe, cmaes, random, mo-tpe"),
    ("missing-nfe", lambda t: t.replace("nfe = [3, 4]\n", ""), "missing key 'search.nfe'"),
    ("two-sources", lambda t: t.replace('name = "gmm-2d"', 'name = "gmm-2d"\nmodel = "pkg.mod:make"'),
     "give exactly one of 'name' (a built-in problem) or 'model' (module:factory)"),
    ("missing-factory", lambda t: t.replace('name = "gmm-2d"', 'model = "steptune_no_such_module:make_model"'),
     "problem.model 'steptune_no_such_module:make_model'"),
    ("unknown-problem", lambda t: t.replace('name = "gmm-2d"', 'name = "gmm-3d"'),
     "key 'problem.name': unknown problem 'gmm-3d'; choose from gmm-2d, gmm-digits, digits-cond"),
    ("unknown-noise", lambda t: t.replace('name = "gmm-2d"', 'name = "gmm-2d"\nnoise = "vp-lin"'),
     "key 'problem.noise': unknown noise schedule 'vp-lin'; choose from ddpm-linear"),
    ("unknown-prediction", lambda t: t.replace('name = "gmm-2d"', 'name = "gmm-2d"\nprediction = "epsilon"'),
     "key 'problem.prediction': unknown prediction 'epsilon'; choose from eps, x0, v, flow"),
    ("unknown-time-input", lambda t: t.replace('name = "gmm-2d"', 'name = "gmm-2d"\ntime_input = "index"'),
     "key 'problem.time_input': unknown time input 'index'; choose from discrete, continuous, sigma"),
    ("not-toml", lambda t: t + "\n[search\n", "not valid TOML"),
    ("misspelled-study", lambda t: t.replace('study = "bad"', 'studdy = "bad"'),
     "unknown key 'studdy' at the top level; did you mean 'study'?"),
    ("refine-nfe-form", lambda t: t + '\n[refine]\nnfe = "some"\n',
     "key 'refine.nfe': give a list of whole numbers or 'all' (got 'some')"),
    ("refine-nfe-entry", lambda t: t + '\n[refine]\nnfe = [4, "x"]\n',
     "key 'refine.nfe.1': Input should be a valid integer"),
    ("option-unknown", lambda t: t.replace('method = "s3"', 'method = "s3"\noptions = {pol = 3}'),
     "key 'search.options': unknown option 'pol' of method 's3'; did you mean 'pool'?; its options: predictor, pool, "),
    ("option-value", lambda t: t.replace('method = "s3"', 'method = "s3"\noptions = {predictor = "bogus"}'),
     "key 'search.options': predictor = 'bogus': use one of auto, extra-trees, gbr, pairwise (an option of method "
     "'s3')"),
    ("option-range", lambda t: t.replace('method = "s3"', 'method = "s3"\noptions = {explore = 2.5}'),
     "key 'search.options': explore = 2.5: give a value from 0 to 1"),
    ("option-below", lambda t: t.replace('method = "s3"', 'method = "s3"\noptions = {pool = -5}'),
     "key 'search.options': pool = -5: give 1 or more"),
    ("option-type", lambda t: t.replace('method = "s3"', 'method = "s3"\noptions = {pool = "big"}'),
     "key 'search.options': pool = 'big': give a whole number"),
    ("option-bool", lambda t: t.replace('method = "s3"', 'method = "s3"\noptions = {niche = "maybe"}'),
     "key 'search.options': niche = 'maybe': give true or false"),
    ("option-kinds", lambda t: t.replace('method = "s3"', 'method = "s3"\noptions = {auto_kinds = ["gbr", "knn"]}'),
     "key 'search.options': auto_kinds = ['gbr', 'knn']: use some of extra-trees, gbr, pairwise"),
    ("option-tpe", lambda t: t.replace('method = "s3"', 'method = "tpe"\noptions = {n_startup = 0}'),
     "key 'search.options': n_startup = 0: give 1 or more (an option of method 'tpe')"),
]


@pytest.mark.parametrize("case,edit,words", BAD, ids=[b[0] for b in BAD])
def test_bad_job_files_fail_before_any_work(tmp_path, cache, capsys, case, edit, words):
    job = tmp_path / f"{case}.toml"
    job.write_text(edit(job_text("bad", cache)))
    db = tmp_path / "x.db"
    code, out, err = run_cli(["run", str(job), "--db", f"sqlite:///{db}"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"error: {job}: " if case != "missing-factory" else "error: ")
    assert words in lines[0], lines[0]
    assert "Traceback" not in out + err
    if db.exists():
        with connect(f"sqlite:///{db}") as store:
            assert store.studies() == []


def test_an_unreachable_database_fails_before_any_work(tmp_path, cache, capsys):
    job = write_job(tmp_path / "job.toml", "j", cache)
    code, _, err = run_cli(["run", str(job), "--db", "postgresql+psycopg://steptune@127.0.0.1:9/none"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: --db: "), err
    code, _, err = run_cli(["run", str(tmp_path / "missing.toml")], capsys)
    assert code == 2 and err.strip() == f"error: {tmp_path / 'missing.toml'}: no such job file"
    code, _, err = run_cli(["run", str(tmp_path)], capsys)
    assert code == 2 and err.strip() == (f"error: {tmp_path}: a folder, not a job file; give a TOML file such as "
                                         "examples/gmm-2d-quick.toml")


def test_a_study_resumed_with_another_job_is_refused(tmp_path, cache, capsys):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    job = write_job(tmp_path / "job.toml", "s", cache, evaluations=2)
    assert run_cli(["run", str(job), "--db", url, "--json"], capsys)[0] == 0
    job.write_text(job.read_text().replace("seed = 3", "seed = 4"))
    code, _, err = run_cli(["run", str(job), "--db", url], capsys)
    assert code == 2 and f"error: {job}: study 's' was run with a different job ('seed' (3 then, 4 now) differs)" in err


def test_a_study_scored_on_an_earlier_bank_version_is_refused(tmp_path, cache, capsys):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    job = write_job(tmp_path / "job.toml", "s", cache, evaluations=2)
    assert run_cli(["run", str(job), "--db", url, "--json"], capsys)[0] == 0
    with connect(url) as db:
        identity = {k: v for k, v in db.get_study("s").config["identity"].items() if k != "bank_version"}
        db.update_study_config("s", {"identity": identity})  # as a study stored before banks were drawn in blocks
        n = len(db.trials("s"))
    code, _, err = run_cli(["run", str(job), "--db", url], capsys)
    assert code == 2 and err.strip().startswith(f"error: {job}: study 's' was scored on noise banks drawn by an "
                                                "earlier steptune (bank version 1, now 2)"), err
    with connect(url) as db:
        assert len(db.trials("s")) == n


# ---- a complete run --------------------------------------------------------------------------------


def test_a_run_stores_every_trial_and_resuming_a_finished_study_adds_nothing(tmp_path, cache, capsys):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    job = write_job(tmp_path / "job.toml", "s", cache, evaluations=10)
    code, out, _ = run_cli(["run", str(job), "--db", url, "--json"], capsys)
    res = json.loads(out)
    assert code == 0 and res["status"] == "complete" and res["evaluations"] == 20
    with connect(url) as db:
        trials = db.trials("s")
        first = outcome(db, "s")
    cheap = [t for t in trials if t.fidelity == "train"]
    assert len(cheap) == 20 and all(t.status == "complete" and t.n_samples == 32 for t in cheap)
    # every preset at every NFE on the held-out bank, and the best two per NFE confirmed there
    base = [t for t in trials if t.info.get("baseline")]
    assert len(base) >= 2 * 10 and all(t.bank == "heldout" and t.n_samples == 128 for t in base)
    assert "unipc-bh2:order=3" in {t.schedule["name"] for t in base}
    for t in base:  # a preset is named by its spec, options and all, so preset:NAME rebuilds it
        again = presets.build(t.schedule["name"], t.nfe, noise.from_dict(t.schedule["noise"]),
                              t_start=t.schedule["t_start"], t_end=t.schedule["steps"][-1]["t"])
        assert again.key() == t.key
    confirms = [t for t in trials if "confirms" in t.info]
    assert sorted(t.nfe for t in confirms) == [3, 3, 4, 4]
    for row in res["per_nfe"]:  # the table's numbers are the stored held-out scores
        nfe_confirms = [t.score for t in confirms if t.nfe == row["nfe"]]
        assert row["searched_score"] == min(nfe_confirms)
        assert row["preset_score"] == min(t.score for t in base if t.nfe == row["nfe"])
        # the trial named is that confirmation (by id, as export --trial takes it), and the searched schedule's
        # own cheap score that of the trial it confirms
        shown = next(t for t in trials if t.id == row["trial"])
        assert (shown.fidelity, shown.score) == ("heldout", row["searched_score"])
        assert row["searched_train"] == next(t.score for t in cheap if t.number == shown.info["confirms"])
    code, out, _ = run_cli(["run", str(job), "--db", url, "--json"], capsys)
    assert code == 0 and json.loads(out)["per_nfe"] == res["per_nfe"]
    with connect(url) as db:
        assert outcome(db, "s") == first
    code, out, _ = run_cli(["status", "--study", "s", "--db", url, "--json"], capsys)
    st = json.loads(out)
    assert (st["search_done"], st["search_budget"], st["failed"], st["retried"], st["running"]) == (20, 20, 0, 0, 0)
    assert [r["heldout"] for r in st["per_nfe"]] == [r["searched_score"] for r in res["per_nfe"]]
    more = write_job(tmp_path / "more.toml", "s", cache, evaluations=12)  # a larger budget resumes the study
    code, out, _ = run_cli(["run", str(more), "--db", url, "--json"], capsys)
    assert code == 0 and json.loads(out)["evaluations"] == 24
    code, out, _ = run_cli(["status", "--study", "s", "--db", url, "--json"], capsys)
    assert (json.loads(out)["search_done"], json.loads(out)["search_budget"]) == (24, 24)


def test_eval_on_as_many_samples_reproduces_a_jobs_held_out_score(tmp_path, cache, capsys):
    """A job scores on a held-out bank of 128; `eval --samples 128` draws the default bank of 1024, whose
    first 128 states are the job's, and so gives the stored score of the exported schedule."""
    url = f"sqlite:///{tmp_path / 'x.db'}"
    job = write_job(tmp_path / "job.toml", "s", cache, evaluations=4)
    assert run_cli(["run", str(job), "--db", url, "--json"], capsys)[0] == 0
    path = tmp_path / "best.json"
    assert run_cli(["export", "--study", "s", "--nfe", "4", "--db", url, "-o", str(path)], capsys)[0] == 0
    stored = json.loads(path.read_text())["provenance"]
    assert stored["n_samples"] == 128
    code, out, err = run_cli(["eval", "--problem", "gmm-2d", "--schedule", str(path), "--samples", "128",
                           "--cache", str(cache), "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["results"][0]["rmse"] == pytest.approx(stored["score"], rel=1e-9)


def test_a_schedule_imported_into_a_new_study_is_told_that_no_run_will_score_it(tmp_path, cache, capsys):
    """A study made by import has no job or search to run again: the line says how to score the file instead of
    promising a next run, and a job given that study's name is refused for what made it, with nothing written."""
    url = f"sqlite:///{tmp_path / 'x.db'}"
    path = tmp_path / "ddim.json"
    assert run_cli(["schedule", "preset:ddim", "--nfe", "4", "-o", str(path)], capsys)[0] == 0
    code, _, said = run_cli(["import", str(path), "--study", "mine", "--db", url], capsys)
    said = " ".join(said.split())
    assert code == 0 and "the study's next run" not in said, said
    assert (f"queued; no run scores trials of a study made by import: score the file with 'steptune eval -s {path}', "
            "or import it into the study of a search or job, whose next run scores it") in said, said
    job = write_job(tmp_path / "job.toml", "mine", cache, evaluations=4)
    code, _, err = run_cli(["run", str(job), "--db", url], capsys)
    assert (code, err.strip()) == (2, f"error: {job}: study 'mine' was made by steptune import, not by a search; give "
                                      "a new study name")
    with connect(url) as db:
        assert [t.status for t in db.trials("mine")] == ["queued"] and db.get_study("mine").kind == "import"


def test_a_schedule_imported_into_a_jobs_study_is_scored_by_its_nextrun_cli(tmp_path, cache, capsys):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    job = write_job(tmp_path / "job.toml", "s", cache, evaluations=4)
    assert run_cli(["run", str(job), "--db", url, "--json"], capsys)[0] == 0
    path = tmp_path / "ddim.json"
    assert run_cli(["schedule", "preset:ddim", "--nfe", "4", "-o", str(path)], capsys)[0] == 0
    assert run_cli(["import", str(path), "--study", "s", "--queue", "--db", url], capsys)[0] == 2  # a baseline already
    code, _, said = run_cli(["import", str(path), "--study", "s", "--queue", "--allow-duplicates", "--db", url], capsys)
    assert code == 0 and "queued: the study's next run scores it, 'steptune run' of its job file" in said, said
    code, shown, _ = run_cli(["status", "--study", "s", "--db", url], capsys)
    assert code == 0 and "queued 1; " in shown and "finished; 1 queued for its next run" in shown, shown
    code, _, said = run_cli(["run", str(job), "--db", url], capsys)
    assert code == 0, said
    with connect(url) as db:
        trials = db.trials("s")
    imported = trials[-1]
    baseline = next(t for t in trials if t.info.get("baseline") and t.nfe == 4 and t.schedule["name"] == "ddim")
    assert (imported.status, imported.fidelity, imported.n_samples) == ("complete", "heldout", 128)
    assert imported.score == baseline.score  # the same schedule on the same held-out states
    best = min((t for t in trials if t.nfe == 4 and t.fidelity == "heldout" and t.status == "complete"),
               key=lambda t: (t.score, t.number))
    assert (f"scored the imported schedule, trial id {imported.id} (NFE 4): {fmt(imported.score)} held-out; the best "
            f"there is trial id {best.id} at {fmt(best.score)}") in said.replace("\n", " "), said
    # at an NFE the job neither searches nor has presets at, there is nothing to compare with, and the line says so
    assert run_cli(["schedule", "preset:ddim", "--nfe", "9", "-o", str(path)], capsys)[0] == 0
    assert run_cli(["import", str(path), "--study", "s", "--db", url], capsys)[0] == 0
    code, _, said = run_cli(["run", str(job), "--db", url], capsys)
    with connect(url) as db:
        trials = db.trials("s")
    alone = trials[-1]
    assert code == 0 and alone.nfe == 9 and [t.nfe for t in trials].count(9) == 1, said
    assert (f"scored the imported schedule, trial id {alone.id} (NFE 9): {fmt(alone.score)} held-out; the only "
            "held-out score at NFE 9 (nothing searched or preset there to compare with)") in said.replace("\n", " ")
    code, shown, _ = run_cli(["status", "--study", "s", "--db", url], capsys)
    assert code == 0 and (f"imported schedules, scored on the held-out bank: NFE 4 {fmt(imported.score)} (trial id "
                          f"{imported.id}{', the best at that NFE' if best.id == imported.id else ''}), NFE 9 "
                          f"{fmt(alone.score)} (trial id {alone.id}, the best at that NFE)") in shown, shown


def test_a_job_without_baselines_or_confirmations_scores_a_queued_import_in_a_phase_of_its_own(tmp_path, cache,
                                                                                                  capsys):
    """Imported schedules are scored first, counted as imports: not in the baselines' count, not in the
    confirmations', and by a job that has neither."""
    url = f"sqlite:///{tmp_path / 'x.db'}"
    text = job_text("s", cache, evaluations=4, nfe="[4]").replace("confirm = 2", "confirm = 0\nbaseline = false")
    job = tmp_path / "job.toml"
    job.write_text(text)
    assert run_cli(["run", str(job), "--db", url, "--json"], capsys)[0] == 0
    path = tmp_path / "ddim.json"
    assert run_cli(["schedule", "preset:ddim", "--nfe", "4", "-o", str(path)], capsys)[0] == 0
    written = json.loads(path.read_text())
    written["steps"][0]["t"] = 0.6  # a time the search's presets do not have
    path.write_text(json.dumps(written))
    assert run_cli(["import", str(path), "--study", "s", "--queue", "--db", url], capsys)[0] == 0
    code, _, said = run_cli(["run", str(job), "--db", url], capsys)
    with connect(url) as db:
        imported = db.trials("s")[-1]
    assert code == 0 and (imported.status, imported.fidelity) == ("complete", "heldout"), said
    lines = [line.split("] ", 1)[-1] for line in said.splitlines()]
    assert lines[:2] == ["scoring 1 imported schedule on the held-out bank", "import 1/1"], said
    assert f"scored the imported schedule, trial id {imported.id} (NFE 4): {fmt(imported.score)} held-out" in said


@pytest.mark.parametrize("held, train, preset, refined, said", [
    (0.068, 0.018, 0.050, None, True),  # lost to the preset, 3.8x its cheap score: named
    (0.060, 0.032, 0.050, None, False),  # lost, but within 2x of its cheap score (a bank of other states)
    (0.040, 0.010, 0.050, None, False),  # far above its cheap score, but better than the preset
    (0.068, 0.018, 0.050, 0.045, False),  # its refinement beat the preset
])
def test_a_search_that_fitted_its_few_states_says_so(capsys, held, train, preset, refined, said):
    from steptune.cli.run import print_overfit
    from steptune.runner import NfeSummary, RunResult

    row = NfeSummary(6, "ddim", preset, held, 7, 7, refined=refined, searched_train=train)
    print_overfit(RunResult("s", "complete", 10, 1, 0, 0, 1.0, [row]), 64, "--cheap-samples 256")
    err = capsys.readouterr().err.replace("\n", " ")
    line = (f"NFE 6: the searched schedule scores {fmt(train)} on the search's 64 train states but {fmt(held)} "
            f"held-out ({held / train:.1f}x), worse than the best preset ({fmt(preset)}): the search fits those "
            "states rather than the problem; give it more of them (--cheap-samples 256)")
    assert err.strip() == (line if said else ""), err


@pytest.mark.parametrize("rows, status, refined, said", [
    ([(5, 0.064, 0.053, 0.051, None), (6, 0.057, 0.030, 0.050, None)], "complete", False, "NFE 5 and 6"),
    ([(4, 0.062, 0.050, 0.079, None), (5, 0.064, 0.053, 0.051, None)], "complete", False, "NFE 5"),
    ([(5, 0.064, 0.053, 0.051, None)], "complete", True, None),  # the job refined: its table says how that went
    ([(5, 0.064, 0.053, 0.051, 0.045)], "complete", False, None),  # an earlier refinement beat the preset
    ([(5, 0.068, 0.018, 0.050, None)], "complete", False, None),  # fitted its few states: print_overfit names it
    ([(5, 0.064, 0.053, 0.051, None)], "time-budget", False, None),  # a stopped run resumes before anything else
])
def test_a_run_whose_search_lost_to_a_preset_names_the_refinement_that_can_beat_it(capsys, rows, status, refined,
                                                                                   said):
    from steptune.cli.run import print_refine_hint
    from steptune.runner import NfeSummary, RunResult

    summaries = [NfeSummary(n, "ddim", preset, held, 7, 7, refined=ref, searched_train=train)
                 for n, held, train, preset, ref in rows]
    print_refine_hint(RunResult("my study", status, 10, 1, 0, 0, 1.0, summaries), refined)
    err = capsys.readouterr().err.replace("\n", " ").strip()
    nfes = [] if said is None else [n for n, *_ in rows if str(n) in said.split()]
    assert err == ("" if said is None else
                   f"{said}: the best preset stays the best held-out (best and export give it); refining the searched "
                   "schedules by gradient can beat it: steptune refine --study 'my study' "
                   + " ".join(f"--nfe {n}" for n in nfes)), err


# ---- interruptions -----------------------------------------------------------------------------------


def _spawn(job: Path, url: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "steptune", "run", str(job), "--db", url, "--json"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_trials(path: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        if path.exists():
            try:
                with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as c:
                    done = c.execute("SELECT count(*) FROM trials WHERE fidelity = 'train' AND "
                                     "status = 'complete'").fetchone()[0]
                if done >= n:
                    return
            except sqlite3.OperationalError:  # the schema is not there yet
                pass
        time.sleep(0.05)
    raise AssertionError(f"fewer than {n} trials after {timeout} s")


def _wait_for_sigint_held(proc: subprocess.Popen, timeout: float = 60) -> None:
    """Until steptune holds Ctrl-C while its modules load (Linux: SIGINT's bit in SigBlk of /proc/PID/status);
    a signal before that meets the bare interpreter, which steptune cannot answer for."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines())
        if int(fields["SigBlk"], 16) & (1 << (signal.SIGINT - 1)):
            return
        time.sleep(0.01)
    raise AssertionError(f"the process did not hold SIGINT within {timeout} s")


def _run_until(tmp_path, cache, n: int):
    """The reference job started in a subprocess, once ``n`` search evaluations are stored."""
    path = tmp_path / "x.db"
    job = write_job(tmp_path / "job.toml", "ref", cache, evaluations=30)
    proc = _spawn(job, f"sqlite:///{path}")
    _wait_for_trials(path, n, proc)
    return proc, job, f"sqlite:///{path}"


def test_sigkill_then_rerun_resumes_to_the_same_trials(tmp_path, cache, capsys, reference_study):
    proc, job, url = _run_until(tmp_path, cache, 15)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with connect(url) as db:
        left = db.trials("ref")
    assert 15 <= sum(t.fidelity == "train" for t in left) < 60  # killed mid-search
    code, out, err = run_cli(["run", str(job), "--db", url, "--json"], capsys)
    assert code == 0 and json.loads(out)["status"] == "complete", err
    with connect(url) as db:
        got = outcome(db, "ref")
        trials = db.trials("ref")
    assert got == reference_study  # same trials, same results, nothing lost or duplicated
    assert all(t.status == "complete" for t in trials)
    lost = [t for t in trials if t.attempts > 1]  # what was in flight at the kill ran again
    assert all("re-queued" in t.error and "stopped" in t.error for t in lost)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_stop_signal_finishes_in_flight_work_and_a_rerun_completes(tmp_path, cache, capsys, reference_study, sig):
    """Ctrl-C, and SIGTERM as `kill` and batch schedulers send it before they kill a job."""
    proc, job, url = _run_until(tmp_path, cache, 10)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    said = "interrupted: " if sig == signal.SIGINT else "terminated (SIGTERM): "
    assert said + "finishing the evaluations in flight" in err and "Traceback" not in err, err
    assert json.loads(out)["status"] == "interrupted"
    with connect(url) as db:
        assert not db.trials("ref", status="running")
        done = [t for t in db.trials("ref") if t.fidelity == "train" and t.status in ("complete", "failed")]
    assert json.loads(out)["evaluations"] == len(done)  # queued candidates are not counted as evaluated
    assert run_cli(["run", str(job), "--db", url, "--json"], capsys)[0] == 0
    with connect(url) as db:
        assert outcome(db, "ref") == reference_study


def test_sigint_while_the_command_is_still_starting_is_one_line(tmp_path, cache):
    job = write_job(tmp_path / "job.toml", "early", cache, evaluations=30)
    proc = _spawn(job, f"sqlite:///{tmp_path / 'x.db'}")
    _wait_for_sigint_held(proc)  # the command's modules are still loading
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err


def test_the_time_budget_stops_the_job_on_time_with_a_consistent_database(tmp_path, cache, capsys):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    job = write_job(tmp_path / "job.toml", "t", cache, evaluations=100000, time="4s")
    start = time.monotonic()
    code, out, err = run_cli(["run", str(job), "--db", url, "--json"], capsys)
    took = time.monotonic() - start
    res = json.loads(out)
    assert code == 0 and res["status"] == "time-budget", err
    # the run's own clock, from the runner's start: at most one evaluation (and the writes after it) past the deadline
    assert res["seconds"] < 4 + 3.0, res["seconds"]
    assert took < res["seconds"] + 60  # start-up (problem, references from the cache), however loaded the machine
    with connect(url) as db:
        trials = db.trials("t")
    assert not [t for t in trials if t.status == "running"]
    assert 0 < res["evaluations"] < 200000


def test_a_job_runs_a_plugged_model(tmp_path, cache, capsys):
    """problem.model = module:factory (a network defined in a test module) through a whole job."""
    url = f"sqlite:///{tmp_path / 'x.db'}"
    text = job_text("plug", cache, evaluations=6).replace('name = "gmm-2d"', 'model = "test_plugins:gaussian_factory"')
    job = tmp_path / "job.toml"
    job.write_text(text)
    code, out, err = run_cli(["run", str(job), "--db", url, "--json"], capsys)
    res = json.loads(out)
    assert code == 0 and res["status"] == "complete" and res["evaluations"] == 12, err
    assert all(r["searched_score"] is not None and r["preset_score"] is not None for r in res["per_nfe"])
    with connect(url) as db:
        st = db.get_study("plug")
        assert st.problem["identity"]["name"].startswith("test_plugins:gaussian_factory")
        assert all(t.status == "complete" for t in db.trials("plug"))


def test_a_time_budget_leaves_time_to_confirm_every_nfe(tmp_path, cache, capsys):
    """The search stops early enough for the held-out confirmations of every NFE: their cost is measured on
    the baseline presets' held-out evaluations, and the searcher's own time per batch is counted."""
    url = f"sqlite:///{tmp_path / 'x.db'}"
    job = write_job(tmp_path / "job.toml", "tb", cache, evaluations=100000, time="8s")
    code, out, err = run_cli(["run", str(job), "--db", url, "--json"], capsys)
    res = json.loads(out)
    assert code == 0 and res["status"] == "time-budget", err
    assert res["evaluations"] > 0
    with connect(url) as db:
        trials = db.trials("tb")
    confirmed = {(t.nfe, t.info["confirms"]) for t in trials if "confirms" in t.info and t.status == "complete"}
    assert res["confirmations"] == 2 * 2 == len(confirmed)  # confirm = 2 at each of NFE 3 and 4
    assert all(r["searched_score"] is not None for r in res["per_nfe"])
    with connect(url) as db:  # the budget cut the search, not the confirmations, which were all made
        assert db.get_study("tb").config["last_run"]["phase"] == "search"
    code, out, _ = run_cli(["status", "--study", "tb", "--db", url], capsys)
    assert "the last run reached its time budget while searching" in out


def test_a_search_asking_a_batch_ahead_resumes_to_the_same_trials(tmp_path):
    """lookahead = 1: batch b + 1 is asked before batch b's results are told, in the same order on every run,
    so a run stopped mid-search and resumed stores what an uninterrupted one does."""
    from steptune.jobs import load_job

    def job(name: str, lookahead: int):
        path = write_job(tmp_path / f"{name}.toml", name, tmp_path / "cache", evaluations=40)
        path.write_text(path.read_text().replace('method = "s3"', f'method = "s3"\nlookahead = {lookahead}'))
        return load_job(path)

    whole, stopped = f"sqlite:///{tmp_path / 'whole.db'}", f"sqlite:///{tmp_path / 'stopped.db'}"
    run_job(job("s", 1), whole)
    result, _ = run_job(job("s", 1), stopped, stop_after=13)
    assert result.status == "interrupted"
    run_job(job("s", 1), stopped)
    run_job(job("s", 0), f"sqlite:///{tmp_path / 'now.db'}")
    with connect(whole) as a, connect(stopped) as b, connect(f"sqlite:///{tmp_path / 'now.db'}") as c:
        assert outcome(a, "s") == outcome(b, "s")
        assert outcome(a, "s") != outcome(c, "s")  # asking ahead does change what is asked
        assert b.get_study("s").config.get("search_lookahead") is None  # the job said it; nothing to record


def test_the_search_is_told_each_presets_best_spacing_and_a_study_begun_without_it_resumes_without_it(tmp_path):
    """Choosing the presets' spacings measured each one on the train bank at the search's sample count; the
    searcher is told those results before its first batch (so it starts from each preset at its best spacing)
    and does not evaluate them again. A study whose search began before this resumes as it began."""
    from steptune.evaluators import Evaluator, load_problem
    from steptune.jobs import load_job
    from steptune.search import CHEAP

    job = load_job(write_job(tmp_path / "j.toml", "s", tmp_path / "cache", evaluations=30))
    url = f"sqlite:///{tmp_path / 'a.db'}"
    _, runner = run_job(job, url)
    told = {c.key: (c, score) for c, score in runner.searcher.trials}
    ev = Evaluator(load_problem("gmm-2d"), n_train=64, n_heldout=128, cache_dir=tmp_path / "cache")
    with connect(url) as db:
        study = db.get_study("s")
        assert study.config["search_told_spacings"] is True
        chosen = [t for t in db.trials("s") if "best_of" in t.info and t.nfe in (3, 4)]
        searched = {t.key for t in db.trials("s") if t.fidelity == CHEAP and "batch" in t.info}
    assert any("spacing=" in t.info["origin"] for t in chosen)  # some preset is best at another spacing
    for t in chosen:
        c, score = told[t.key]
        assert score == t.info["spacing_scores"][t.info["spacing"]] and t.key not in searched
    t = min(chosen, key=lambda t: told[t.key][1])  # the told score is what the search would have measured
    assert ev.evaluate(t.to_schedule(), CHEAP, n=32).metrics["rmse"] == pytest.approx(told[t.key][1], rel=1e-9)

    begun = f"sqlite:///{tmp_path / 'b.db'}"
    result, _ = run_job(job, begun, stop_after=8)
    assert result.status == "interrupted"
    with connect(begun) as db:  # as a study whose search began before the searcher was told the spacings
        db.update_study_config("s", {"search_told_spacings": None})
    _, runner = run_job(job, begun)
    with connect(begun) as db:
        assert db.get_study("s").config["search_told_spacings"] is False
        searched = {t.key for t in db.trials("s") if t.fidelity == CHEAP and "batch" in t.info}
    assert {c.key for c, _ in runner.searcher.trials} == searched  # told its own evaluations only


def test_the_search_and_the_final_read_of_its_trials_run_with_the_heap_set_aside(tmp_path, monkeypatch):
    """What the process held when the search began stays out of the collector's passes until the run has read its
    trials back for the result (a full pass over it there costs more than the read), and is handed back after."""
    import gc

    from steptune.jobs import load_job
    from steptune.storage.db import Storage

    reads = []
    plain = Storage.trials

    def trials(self, study, **kw):
        reads.append(gc.get_freeze_count())
        return plain(self, study, **kw)

    monkeypatch.setattr(Storage, "trials", trials)
    job = load_job(write_job(tmp_path / "job.toml", "h", tmp_path / "cache", evaluations=12))
    before = gc.get_freeze_count()
    result, _ = run_job(job, f"sqlite:///{tmp_path / 'h.db'}")
    assert result.status == "complete"
    assert len(reads) >= 2 and all(n > before for n in reads[-2:]), (before, reads)  # a stage's last read, the result's
    assert gc.get_freeze_count() == before


def test_a_slow_start_says_what_it_waits_for_while_it_waits(tmp_path, cache):
    """A first run computes the references before anything else happens: the log says so as it starts, not after
    it, and how long it took; a quick start (references cached) says nothing."""
    import threading

    from steptune.backends import LocalBackend
    from steptune.jobs import load_job
    from steptune.runner import Runner

    job, quick = (load_job(write_job(tmp_path / f"{s}.toml", s, cache)) for s in ("s", "quick"))
    said, heard = [], threading.Event()

    class WaitsToBeExplained(LocalBackend):
        def start(self):
            assert heard.wait(60), said  # the start goes on only once the runner has said what it waits for
            super().start()

    def say(message):
        said.append(message)
        heard.set()

    with connect(f"sqlite:///{tmp_path / 'x.db'}") as db:
        backend = WaitsToBeExplained(job.problem, job.evaluation, job.backend)
        try:
            runner = Runner(job, db, backend, say=say)
            runner.prepare()  # the problem built, the study opened: what a run does before it starts its evaluators
            runner._start_backend(slow=0.01)
            assert said[0] == ("preparing the evaluators: the problem is built and its reference solutions on the "
                               "train and held-out banks computed (once; later runs read them from "
                               f"{job.evaluation.cache})")
            assert said[1].startswith("evaluators ready after ") and said[1].endswith(" s") and len(said) == 2
            said.clear()
            backend.close()
            backend = LocalBackend(quick.problem, quick.evaluation, quick.backend)
            runner = Runner(quick, db, backend, say=say)
            runner.prepare()
            runner._start_backend(slow=60)
            assert said == []
        finally:
            backend.close()


def test_a_run_stopped_while_choosing_spacings_resumes_to_the_same_trials(tmp_path, cache, reference_study):
    """The spacing choice runs in the driver before anything is dispatched: a stop there keeps the presets chosen so
    far (their baselines queued) and the resume chooses the rest, in the same order, ending with the trials of an
    uninterrupted run."""
    from steptune.jobs import load_job

    url = f"sqlite:///{tmp_path / 'x.db'}"
    job = load_job(write_job(tmp_path / "job.toml", "ref", cache, evaluations=30))
    seen = []
    res, _ = run_job(job, url, progress=lambda st: seen.append((st["phase"], st["phase_done"], st["phase_total"])),
                     stop_when=lambda st: st["phase"] == "spacing" and st["phase_done"] == 3)
    with connect(url) as db:
        stopped = db.trials("ref")
    assert res.status == "interrupted" and seen[-1][0] == "spacing" and seen[-1][1] == 3 < seen[-1][2]
    assert stopped and all(t.info.get("baseline") and t.status == "queued" for t in stopped)
    with connect(url) as db:  # status names the phase it was stopped in
        assert study_status(db, "ref")["last_run"]["phase"] == "spacing"
    run_job(job, url)
    with connect(url) as db:
        assert outcome(db, "ref") == reference_study


def test_a_stop_while_the_stored_baselines_are_scored_counts_them_as_unscored_not_unchosen(tmp_path, cache, capsys):
    """Every preset was chosen and stored and two are scored when the stop comes: nothing is left unstored, the rest
    are queued, and the stop line says how many are not scored yet (it said they were not all chosen)."""
    from steptune.cli.run import print_stopped
    from steptune.jobs import load_job

    url = f"sqlite:///{tmp_path / 'x.db'}"
    job = load_job(write_job(tmp_path / "job.toml", "ref", cache, evaluations=30))
    res, _ = run_job(job, url, stop_when=lambda st: st["phase"] == "baseline" and st["phase_done"] == 2)
    with connect(url) as db:
        baselines = [t for t in db.trials("ref") if t.info.get("baseline")]
    queued = sum(t.status == "queued" for t in baselines)
    assert res.status == "interrupted" and queued == len(baselines) - 2 > 0
    assert (res.baselines_left, res.baselines_queued, res.baselines_finished) == (0, queued, False)
    capsys.readouterr()
    print_stopped(res)
    assert capsys.readouterr().err.startswith(f"stopped (interrupted) with {queued} preset baselines not scored yet "
                                              "(the best preset above is the best of those scored); ")


def test_a_run_taken_over_while_paused_writes_nothing_more(tmp_path, cache, reference_study):
    """Another run claims the study as if this one had been paused past its lease (the claim made from this run's
    progress callback, a second later by the claimant's clock): this run's next write is refused, it stops with
    DriverLost and leaves the study as it was at the claim; once the other run lets go, the job resumes to the trials
    of an uninterrupted run."""
    from datetime import timedelta

    from steptune.backends import LocalBackend
    from steptune.jobs import load_job
    from steptune.runner import Runner
    from steptune.storage.db import DriverLost
    from steptune.storage.schema import utcnow

    url = f"sqlite:///{tmp_path / 'x.db'}"
    job = load_job(write_job(tmp_path / "job.toml", "ref", cache, evaluations=30))
    at_claim = []

    def claim_midway(status):
        if status["phase"] == "search" and status["done"] >= 6 and not at_claim:
            with connect(url) as other:
                other.claim_driver("ref", "elsewhere:1", 0, now=utcnow() + timedelta(seconds=1))
                at_claim.append((outcome(other, "ref"), other.get_study("ref").config))

    with connect(url) as db:
        backend = LocalBackend(job.problem, job.evaluation, job.backend)
        runner = Runner(job, db, backend, progress=claim_midway)
        try:
            with pytest.raises(DriverLost, match=r"was taken over by another run .*\(run elsewhere:1 holds it now\)"):
                runner.run()
        finally:
            backend.close()
        assert (outcome(db, "ref"), db.get_study("ref").config) == at_claim[0]
        db.release_driver("ref", "elsewhere:1")
    run_job(job, url)
    with connect(url) as db:
        assert outcome(db, "ref") == reference_study


def test_a_budget_lowered_below_what_was_done_scores_the_queued_and_searches_nothing_new(tmp_path, cache, capsys):
    from steptune.backends import LocalBackend
    from steptune.jobs import load_job
    from steptune.runner import Runner

    url = f"sqlite:///{tmp_path / 'x.db'}"
    job_file = write_job(tmp_path / "job.toml", "low", cache, evaluations=12)
    run_job(load_job(job_file), url, stop_after=9)
    with connect(url) as db:
        before = db.count_trials("low")
    job = load_job(write_job(job_file, "low", cache, evaluations=2))
    said, etas = [], []
    with connect(url) as db:
        backend = LocalBackend(job.problem, job.evaluation, job.backend)
        runner = Runner(job, db, backend, progress=lambda st: etas.append(st["eta"]), say=said.append)
        try:
            runner.run()
        finally:
            backend.close()
        cheap_added = [t for t in db.trials("low")[before:] if t.fidelity == "cheap"]
    resumed = next(m for m in said if m.startswith("resuming study 'low'"))
    assert "that is the whole budget (4) already: the queued ones are scored, and nothing new is searched" in resumed
    assert not cheap_added and all(e is None or e >= 0 for e in etas)
    with connect(url) as db:
        info = study_status(db, "low")
    assert info["search_done"] > info["search_budget"] == 4
    code, out, _ = run_cli(["status", "--study", "low", "--db", url], capsys)
    assert code == 0 and f"search {info['search_done']} (more than its budget of 4, lowered since)" in out, out


def test_a_resumed_run_says_so_and_scores_pending_confirmations_as_confirmations(tmp_path, cache, reference_study):
    """Stopped among its baselines, the resumed run says it resumes before anything else; stopped among its
    confirmations, the resumed run scores them in its confirmation phase, not as baselines; both end with the trials
    of an uninterrupted run."""
    from steptune.backends import LocalBackend
    from steptune.jobs import load_job
    from steptune.runner import Runner

    url = f"sqlite:///{tmp_path / 'x.db'}"
    job = load_job(write_job(tmp_path / "job.toml", "ref", cache, evaluations=30))

    def run(stop=None):
        said, seen = [], []
        with connect(url) as db:
            backend = LocalBackend(job.problem, job.evaluation, job.backend)

            def progress(status):
                seen.append((status["phase"], status["phase_done"], status["phase_total"]))
                if stop is not None and stop(status):
                    runner.interrupt()

            runner = Runner(job, db, backend, progress=progress, say=said.append)
            try:
                return runner.run(), said, seen
            finally:
                backend.close()

    res, _, _ = run(lambda st: st["phase"] == "baseline" and st["phase_done"] >= 2)
    assert res.status == "interrupted"
    with connect(url) as db:
        stored = db.trials("ref")
    _, said, _ = run(lambda st: st["phase"] == "confirm" and st["phase_done"] >= 1)
    queued = sum(t.status == "queued" for t in stored)
    assert said[0] == (f"resuming study 'ref': {len(stored)} trials stored, {queued} of them queued; nothing "
                       "searched yet")
    with connect(url) as db:
        pending = [t for t in db.trials("ref", status="queued") if "confirms" in t.info]
    assert pending
    _, _, seen = run()
    assert not [s for s in seen if s[0] == "baseline"] and ("confirm", len(pending), len(pending)) in seen
    with connect(url) as db:
        assert outcome(db, "ref") == reference_study


def test_keys_the_other_settings_leave_unused_are_said(tmp_path, cache, capsys):
    job = write_job(tmp_path / "job.toml", "u", cache, evaluations=2, extra_backend="workers = 2\nmax_restarts = 1")
    job.write_text(job.read_text().replace("confirm = 2", "confirm = 2\nbaseline = false\nbaseline_nfe = [8]"))
    code, _, err = run_cli(["run", str(job), "--db", f"sqlite:///{tmp_path / 'u.db'}", "--json"], capsys)
    assert code == 0, err
    assert 'backend.max_restarts, backend.workers are for kind = "ray" only: in-process this run is the one ' \
           "evaluator" in err
    assert "evaluation.baseline_nfe is not used: with baseline = false no presets are scored" in err


def test_the_eta_is_timed_from_the_runs_first_search_result_not_from_what_came_before_it(tmp_path, cache, monkeypatch):
    """A resumed run replays its stored trials into the searcher before it evaluates anything: that time is not the
    pace of the search. The rate (and the ETA from it) is timed from the run's first search result, none before a
    second one."""
    import types

    import steptune.runner as runner_module
    from steptune.backends import LocalBackend, Task
    from steptune.jobs import load_job
    from steptune.runner import Runner

    clock = [1000.0]
    monkeypatch.setattr(runner_module, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    job = load_job(write_job(tmp_path / "job.toml", "eta", cache, evaluations=50))
    etas = []
    with connect(f"sqlite:///{tmp_path / 'x.db'}") as db:
        runner = Runner(job, db, LocalBackend(job.problem, job.evaluation, job.backend),
                        progress=lambda st: etas.append(st["eta"]))
        runner.phase, runner.done = "search", 40  # resumed: 40 evaluations done before
        task = Task(trial_id=1, schedule={}, bank="cheap", n=16)
        clock[0] += 600  # a long replay of the stored trials
        runner._progress_event(task, {"status": "complete", "seconds": 0.5})
        for _ in range(3):  # then two results a second
            clock[0] += 0.5
            runner._progress_event(task, {"status": "complete", "seconds": 0.5})
    total = runner.total
    assert total > 44 and runner.done == 44
    assert etas[0] is None and etas[1:] == [pytest.approx((total - d) / 2) for d in (42, 43, 44)]


def test_the_best_a_run_shows_counts_every_search_result_back_so_far(tmp_path, cache):
    """The progress line's best per NFE is the best train score of the search results back so far, the last
    batch's included: at each search result (in-process they come back in the order they were stored), the best
    stored score of the trials that far, and at the last one the best of the whole search."""
    from steptune.jobs import load_job

    job = load_job(write_job(tmp_path / "job.toml", "bestline", cache, evaluations=14))
    shown = []
    url = f"sqlite:///{tmp_path / 'x.db'}"
    run_job(job, url, progress=lambda st: shown.append((st["done"], st["best"])) if st["phase"] == "search" else None)
    with connect(url) as db:
        searched = sorted((t for t in db.trials("bestline") if t.fidelity == "train" and "batch" in t.info),
                          key=lambda t: t.id)
    assert len(searched) == 28 and all(t.status == "complete" for t in searched)
    assert [done for done, _ in shown] == list(range(1, 29))
    for done, best in shown:
        so_far = {}
        for t in searched[:done]:
            so_far[t.nfe] = min(so_far.get(t.nfe, float("inf")), t.score)
        assert best == so_far, done


def test_status_pairs_each_held_out_score_with_the_train_score_of_the_same_schedule(tmp_path, cache):
    """`status`'s searched columns are one schedule's: the held-out best of the confirmations and the train score
    of the trial it confirms (which need not be the best train score there); before anything is confirmed, the
    best train score so far."""
    from steptune.jobs import load_job

    job = load_job(write_job(tmp_path / "job.toml", "pair", cache, evaluations=30))
    url = f"sqlite:///{tmp_path / 'x.db'}"
    run_job(job, url, stop_after=20)
    with connect(url) as db:
        rows = {r["nfe"]: r for r in study_status(db, "pair")["per_nfe"]}
        trials = db.trials("pair")
    for nfe in (3, 4):
        train = [t.score for t in trials if t.nfe == nfe and t.fidelity == "train" and t.score is not None]
        assert rows[nfe]["heldout"] is None and rows[nfe]["train"] == min(train)
    run_job(job, url)
    with connect(url) as db:
        rows = {r["nfe"]: r for r in study_status(db, "pair")["per_nfe"]}
        trials = db.trials("pair")
    by_number = {t.number: t for t in trials}
    differs = False
    for nfe in (3, 4):
        confirms = [t for t in trials if t.nfe == nfe and "confirms" in t.info and t.score is not None]
        best = min(confirms, key=lambda t: (t.score, t.number))
        assert rows[nfe]["heldout"] == best.score and rows[nfe]["train"] == by_number[best.info["confirms"]].score
        differs |= rows[nfe]["train"] != min(by_number[t.info["confirms"]].score for t in confirms)
    assert differs  # this job confirms best at some NFE a schedule that is not its best on the train bank
