"""The storage commands: studies, best, export, import, db upgrade (on SQLite and PostgreSQL)."""

import json
import re

import pytest
from runner_jobs import run_cli
from test_storage_db import _rows, db_url  # noqa: F401  (db_url is a fixture)

from steptune.space import noise, presets
from steptune.storage import connect

NS = noise.VPDiscrete.named("ddpm-linear")
PROBLEM = {"name": "toy", "noise": NS.to_dict(), "model": {"prediction": "eps", "time_input": "discrete"}}


@pytest.fixture
def filled(db_url):  # noqa: F811 (the fixture imported above)
    """A study with complete trials of four solvers at NFE 4, 5, 6, 8 (scores: heun best at 8)."""
    db = connect(db_url)
    db.create_study("demo", method="sweep", problem=PROBLEM)
    items = []
    for k, name in enumerate(("ddim", "dpm-solver++-2m", "unipc-bh2", "heun")):
        for nfe in (4, 5, 6, 8):
            sched = presets.build(name, nfe, NS, **({} if name == "heun" else {"spacing": "diffusers-linspace"}))
            items.append({"schedule": sched, "status": "complete", "metrics": {"rmse": (k + 1) / nfe ** 2},
                          "fidelity": "cheap", "bank": "heldout", "n_samples": 64})
    db.add_trials("demo", items)
    yield db_url, db
    db.close()


def test_studies_and_best(filled, capsys):
    url, db = filled
    code, out, _ = run_cli(["studies", "--db", url, "--json"], capsys)
    assert code == 0
    (row,) = json.loads(out)
    assert (row["study"], row["method"], row["problem"], row["trials"]) == ("demo", "sweep", "toy", {"complete": 16})
    assert row["noise"] == "ddpm-linear"
    assert [(b["nfe"], b["score"]) for b in row["best"]] == [(n, 1 / n ** 2) for n in (4, 5, 6, 8)]
    code, out, _ = run_cli(["best", "--study", "demo", "--nfe", "5", "--db", url, "--json"], capsys)
    assert code == 0
    d = json.loads(out)
    assert d["name"] == "ddim" and d["nfe"] == 5 and d["provenance"]["score"] == 1 / 25
    code, out, _ = run_cli(["best", "--study", "demo", "--db", url], capsys)
    assert code == 0 and "Pareto" in out and "ddim" in out
    code, out, err = run_cli(["best", "--study", "demo", "--nfe", "7", "--db", url], capsys)
    assert code == 2 and err.strip() == ("error: study 'demo' has no complete trial at NFE 7 "
                                         "(NFEs with results: 4, 5, 6, 8)")


def test_export_formats(filled, capsys, tmp_path):
    url, db = filled
    best = db.best("demo", 6)
    code, out, _ = run_cli(["export", "--study", "demo", "--nfe", "6", "--db", url], capsys)
    assert code == 0
    d = json.loads(out)
    assert {k: v for k, v in d.items() if k != "provenance"} == best.schedule
    assert d["provenance"]["trial"] == best.id
    code, out, err = run_cli(["export", "--study", "demo", "--nfe", "6", "--format", "sigmas", "--db", url], capsys)
    sig = json.loads(out)
    assert code == 0 and sig[-1] == 0.0 and len(sig) == len(best.schedule["steps"]) + 1
    assert "the list is in sigma/alpha; a sampler making one model call per interval (Euler, DPM++ 2M) makes 6 " \
           "calls on it, the tuned schedule 6\n" in err  # this one ends at t = 0: nothing is appended
    code, out, _ = run_cli(["export", "--study", "demo", "--nfe", "6", "--format", "comfyui", "--db", url], capsys)
    assert code == 0 and [float(x) for x in out.strip().split(",")] == sig
    folder = tmp_path / "sched"
    code, _, err = run_cli(["export", "--study", "demo", "--nfe", "6", "--format", "diffusers", "-o", str(folder),
                         "--db", url], capsys)
    assert code == 0, err
    cfg = json.loads((folder / "scheduler_config.json").read_text())
    assert cfg["_class_name"] == "SteptuneScheduler" and cfg["schedule"] == best.schedule
    assert (cfg["prediction_type"], cfg["time_input"]) == ("epsilon", "discrete")
    stock = tmp_path / "stock"
    code, _, err = run_cli(["export", "--study", "demo", "--nfe", "6", "--format", "diffusers-stock", "-o", str(stock),
                         "--db", url], capsys)  # the best at NFE 6 is ddim on diffusers' timesteps: exact
    assert code == 0, err
    assert json.loads((stock / "scheduler_config.json").read_text())["_class_name"] == "DPMSolverMultistepScheduler"
    kwargs = json.loads((stock / "steptune_set_timesteps.json").read_text())
    assert kwargs["timesteps"] == [round(float(NS.timestep(t))) for t in best.to_schedule().times[:-1]]
    unipc = next(t for t in db.trials("demo") if t.schedule["name"] == "unipc-bh2")
    code, _, err = run_cli(["export", "--study", "demo", "--trial", str(unipc.id), "--format", "diffusers-stock",
                         "-o", str(tmp_path / "no"), "--db", url], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("error: no stock diffusers scheduler runs this schedule exactly") and "corrector" in err
    assert not (tmp_path / "no").exists()


def test_import_good_file(filled, capsys, tmp_path):
    url, db = filled
    path = tmp_path / "best.json"
    assert run_cli(["export", "--study", "demo", "--nfe", "8", "-o", str(path), "--db", url], capsys)[0] == 0
    code, out, err = run_cli(["import", str(path), "--study", "imported", "--db", url, "--json"], capsys)
    assert code == 0, err
    t = json.loads(out)
    assert (t["study"], t["nfe"], t["status"], t["score"]) == ("imported", 8, "complete", 1 / 64)
    assert db.best("imported", 8).schedule == db.best("demo", 8).schedule


def test_a_diffusers_export_imports_back_as_its_schedule_and_a_sigma_list_is_refused(filled, capsys, tmp_path):
    """The folder 'export --format diffusers' writes holds the whole schedule: imported into another study it is
    the same schedule (same key), queued to be scored; a sigma list holds only the times and is refused."""
    url, db = filled
    folder, sigmas = tmp_path / "sched", tmp_path / "sigmas.json"
    assert run_cli(["export", "--study", "demo", "--nfe", "6", "--format", "diffusers", "-o", str(folder),
                    "--db", url], capsys)[0] == 0
    code, out, err = run_cli(["import", str(folder), "--study", "from-diffusers", "--db", url, "--json"], capsys)
    assert code == 0, err
    t = json.loads(out)
    assert (t["nfe"], t["status"]) == (6, "queued")
    assert db.trials("from-diffusers")[0].key == db.best("demo", 6).key
    assert run_cli(["export", "--study", "demo", "--nfe", "6", "--format", "sigmas", "-o", str(sigmas),
                    "--db", url], capsys)[0] == 0
    before = _rows(db)
    code, _, err = run_cli(["import", str(sigmas), "--study", "from-sigmas", "--db", url], capsys)
    assert code == 2 and err.strip() == (f"error: {sigmas}: a sigma list carries only the times, not the per-step "
                                         "decisions; use the JSON export (steptune export --format json) or the "
                                         "diffusers one"), err
    code, _, err = run_cli(["import", str(tmp_path), "--study", "from-folder", "--db", url], capsys)
    assert code == 2 and "a folder without a scheduler_config.json" in err, err
    assert _rows(db) == before


def test_a_stock_diffusers_scheduler_config_is_named_for_what_it_is(filled, capsys, tmp_path):
    """A diffusers scheduler's own config holds its settings, not a schedule: import and eval say what it is and
    what measures diffusers' schedulers instead, and nothing is written."""
    diffusers = pytest.importorskip("diffusers")
    url, db = filled
    folder = tmp_path / "stock"
    diffusers.DPMSolverMultistepScheduler().save_config(folder)
    said = (f"error: {folder / 'scheduler_config.json'}: a diffusers DPMSolverMultistepScheduler config, not a "
            "steptune schedule: it holds the scheduler's settings, not its timesteps or per-step decisions; "
            "'steptune sweep' measures diffusers' default schedulers beside the presets, and 'steptune schedule "
            "preset:NAME' writes a preset as a schedule file")
    before = _rows(db)
    for argv in (["import", str(folder), "--study", "stock", "--db", url],
                 ["eval", "--problem", "gmm-2d", "--schedule", str(folder / "scheduler_config.json"), "--nfe", "5"]):
        code, _, err = run_cli(argv, capsys)
        assert code == 2 and err.strip() == said, err
    assert _rows(db) == before


def test_an_output_path_the_system_refuses_is_one_line(filled, capsys, tmp_path):
    """A path the file system cannot even look up (a name longer than it allows, whoever runs it) is refused by the
    checks made before any work: one line naming the option, the path and the system's reason, exit status 2."""
    url, _ = filled
    path = tmp_path / ("x" * 300 + ".json")
    code, out, err = run_cli(["export", "--study", "demo", "--nfe", "6", "-o", str(path), "--db", url], capsys)
    assert code == 2 and err.strip() == f"error: -o {path}: File name too long; choose another path", err
    assert "Traceback" not in out + err


def test_output_dash_prints_a_file_export_and_refuses_a_folder_one(filled, capsys, tmp_path, monkeypatch):
    """-o - is the standard output, as without -o, for the exports that are one file; a folder export refuses it
    before anything is written; no file named '-' is left anywhere."""
    url, _ = filled
    monkeypatch.chdir(tmp_path)
    for fmt in ("json", "sigmas", "comfyui"):
        args = ["export", "--study", "demo", "--nfe", "6", "--format", fmt, "--db", url]
        code, printed, _ = run_cli(args, capsys)
        code_dash, out, err = run_cli([*args, "-o", "-"], capsys)
        assert code == code_dash == 0 and out == printed and "wrote" not in err
    code, out, err = run_cli(["export", "--study", "demo", "--nfe", "6", "--format", "diffusers", "-o", "-",
                              "--db", url], capsys)
    assert code == 2 and err.strip() == ("error: -o -: this export is a folder of files and cannot go to the standard "
                                         "output; give a folder")
    code, printed, _ = run_cli(["schedule", "ddim", "--nfe", "5"], capsys)
    code_dash, out, _ = run_cli(["schedule", "ddim", "--nfe", "5", "-o", "-"], capsys)
    assert code == code_dash == 0 and out == printed and json.loads(out)["nfe"] == 5
    assert not (tmp_path / "-").exists() and not list(tmp_path.rglob("runs"))


def test_an_export_option_its_form_or_nfe_does_not_use_is_said_to_be_unused(filled, capsys):
    """--stock, --prediction, --time-input and --interpolation where they change nothing were dropped without a word;
    each is now named in a note, and the export is the one made without them."""
    url, _ = filled
    base = ["export", "--study", "demo", "--nfe", "6", "--format", "sigmas", "--db", url]
    code, plain, _ = run_cli(base, capsys)
    code_u, out, err = run_cli([*base, "--stock", "euler", "--prediction", "v", "--time-input", "discrete",
                                "--interpolation", "blend"], capsys)
    assert code == code_u == 0 and out == plain
    assert [ln for ln in err.splitlines() if "is not used" in ln] == [
        "note: --stock euler is not used: it is for --format diffusers-stock",
        "note: --prediction v is not used: it is for the diffusers formats",
        "note: --time-input discrete is not used: it is for the diffusers formats",
        "note: --interpolation blend is not used: it is for an NFE the study did not search"]
    code, _, err = run_cli(["export", "--study", "demo", "--nfe", "7", "--interpolation", "blend", "--db", url], capsys)
    assert code == 0 and "is not used" not in err and "interpolated" in err


def _bad_files(good: dict) -> dict:
    cases = {"malformed_json": (json.dumps(good)[:-2], "not valid JSON")}
    cases["wrong_schema_version"] = (json.dumps({**good, "version": 7}), "schema version 7")
    cases["unknown_field"] = (json.dumps({**good, "extra": 1}), "unknown field 'extra'")
    bad = json.loads(json.dumps(good))
    bad["steps"][0]["relax"] = "none"
    cases["unknown_step_field"] = (json.dumps(bad), "unknown field 'relax'")
    cases["nfe_mismatch"] = (json.dumps({**good, "nfe": 9}), "'nfe' says 9")
    return cases


@pytest.mark.parametrize("case", ["malformed_json", "wrong_schema_version", "unknown_field", "unknown_step_field",
                                  "nfe_mismatch"])
def test_import_bad_file_is_one_line_and_writes_nothing(case, filled, capsys, tmp_path):
    url, db = filled
    path = tmp_path / "good.json"
    assert run_cli(["export", "--study", "demo", "--nfe", "5", "-o", str(path), "--db", url], capsys)[0] == 0
    text, words = _bad_files(json.loads(path.read_text()))[case]
    bad = tmp_path / f"{case}.json"
    bad.write_text(text)
    before = _rows(db)
    for study in ("demo", "new-study"):
        code, out, err = run_cli(["import", str(bad), "--study", study, "--db", url], capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, err
        assert lines[0].startswith(f"error: {bad}: ") and words in lines[0], lines[0]
        assert "Traceback" not in out + err
    assert _rows(db) == before
    assert [s.name for s in db.studies()] == ["demo"]


def test_db_upgrade_and_missing_database(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'new' / 'x.db'}"
    code, _, err = run_cli(["studies", "--db", url], capsys)
    assert code == 2
    assert err.strip() == (f"error: no database at {tmp_path / 'new' / 'x.db'}; run a search first, or name the "
                           "database that holds your studies (--db URL on the command line, db= in Python, or "
                           "$STEPTUNE_DB)")
    with connect(f"sqlite:///{tmp_path / 'head.db'}") as other:
        head = other.head
    code, _, err = run_cli(["db", "upgrade", "--db", url], capsys)
    assert code == 0 and f"none -> {head}" in err.replace("\n", "")
    code, _, err = run_cli(["db", "upgrade", "--db", url], capsys)
    assert code == 0 and "up to date" in err
    code, out, _ = run_cli(["db", "current", "--db", url, "--json"], capsys)
    assert json.loads(out) == {"database": url, "revision": head, "head": head}
    code, out, _ = run_cli(["db", "current", "--db", url], capsys)
    assert out.strip() == f"database {url} is at schema revision {head}, the one this steptune needs"
    code, out, _ = run_cli(["studies", "--db", url, "--json"], capsys)
    assert code == 0 and json.loads(out) == []
    code, _, err = run_cli(["studies", "--db", "nonsense://"], capsys)
    assert code == 2 and err.startswith("error: database URL")


def test_the_trial_best_names_is_the_one_export_trial_exports(filled, capsys):
    url, db = filled
    code, out, _ = run_cli(["best", "--study", "demo", "--db", url], capsys)
    assert code == 0
    rows = [[c.strip() for c in re.split("[│┃]", line)[1:-1]] for line in out.splitlines()
            if len(re.findall("[│┃]", line)) > 2]
    header, *body = rows
    row = next(r for r in body if r[0] == "5")
    trial = row[header.index("trial id")]
    assert int(trial) == db.best("demo", 5).id != db.best("demo", 5).number
    code, out, _ = run_cli(["export", "--study", "demo", "--trial", trial, "--db", url], capsys)
    assert code == 0 and json.loads(out)["nfe"] == 5


def test_studies_reports_the_study_fidelity_as_best_does(filled, capsys):
    url, db = filled
    db.create_study("searched", method="s3", problem=PROBLEM, config={"fidelity": "heldout"})
    sched = presets.build("ddim", 5, NS)
    db.add_trials("searched", [{"schedule": sched, "status": "complete", "metrics": {"rmse": score},
                                "fidelity": fidelity, "bank": bank, "n_samples": 64}
                               for score, fidelity, bank in ((0.01, "cheap", "train"), (0.08, "heldout", "heldout"))])
    code, out, _ = run_cli(["studies", "--db", url, "--json"], capsys)
    row = next(r for r in json.loads(out) if r["study"] == "searched")
    assert code == 0 and row["fidelity"] == "heldout"
    assert [(b["nfe"], b["score"]) for b in row["best"]] == [(5, 0.08)]
    code, out, _ = run_cli(["best", "--study", "searched", "--nfe", "5", "--db", url, "--json"], capsys)
    assert json.loads(out)["provenance"]["score"] == 0.08


def test_a_fidelity_the_study_lacks_is_named(filled, capsys):
    url, _ = filled
    for argv in (["best", "--study", "demo"], ["export", "--study", "demo", "--nfe", "4"]):
        code, _, err = run_cli([*argv, "--fidelity", "heldout", "--db", url], capsys)
        assert code == 2
        assert err == "error: --fidelity 'heldout': study 'demo' has no trials of that fidelity (it has cheap)\n"


def test_a_queued_trial_exports_with_a_note(filled, capsys):
    url, db = filled
    (tid,) = db.add_trials("demo", [{"schedule": presets.build("ddim", 7, NS)}])
    code, out, err = run_cli(["export", "--study", "demo", "--trial", str(tid), "--db", url], capsys)
    assert code == 0 and json.loads(out)["nfe"] == 7
    assert f"note: trial id {tid} is queued, not evaluated: the export carries no scores" in err


def test_export_of_a_flow_study_keeps_the_models_own_sigma(tmp_path, capsys):
    """A flow model's study: the diffusers folder runs it with its conventions and records what it was tuned
    for (sigma = t), the stock export is FlowMatch at shift 1, and the sigma list is t and says where it ends."""
    url = f"sqlite:///{tmp_path / 'flow.db'}"
    fl = noise.RectifiedFlow()
    conv = {"prediction": "flow", "time_input": "continuous", "time_scale": 1000.0}
    db = connect(url)
    db.create_study("flow", method="sweep", problem={"name": "toy-flow", "noise": fl.to_dict(), "model": conv})
    euler = presets.ddim(5, fl, t_start=0.999, final_zero=True)
    to_min = presets.dpmpp_2m(6, fl, t_start=0.999)
    db.add_trials("flow", [{"schedule": s, "status": "complete", "metrics": {"rmse": 0.1}, "fidelity": "cheap"}
                           for s in (euler, to_min)])
    db.close()
    folder = tmp_path / "sched"
    code, _, err = run_cli(["export", "--study", "flow", "--nfe", "5", "--format", "diffusers", "-o", str(folder),
                         "--db", url], capsys)
    assert code == 0, err
    cfg = json.loads((folder / "scheduler_config.json").read_text())
    assert (cfg["prediction_type"], cfg["time_input"], cfg["time_scale"]) == ("flow_prediction", "continuous", 1000.0)
    assert cfg["tuned_for"]["sigma"] == "t" and cfg["tuned_for"]["final"] == "zero"
    assert cfg["tuned_for"]["model"] == conv
    stock = tmp_path / "stock"
    code, _, err = run_cli(["export", "--study", "flow", "--nfe", "5", "--format", "diffusers-stock", "-o", str(stock),
                         "--db", url], capsys)
    assert code == 0, err
    stock_cfg = json.loads((stock / "scheduler_config.json").read_text())
    assert stock_cfg["_class_name"] == "FlowMatchEulerDiscreteScheduler" and stock_cfg["shift"] == 1.0
    assert json.loads((stock / "steptune_set_timesteps.json").read_text())["sigmas"] == euler.times[:-1]
    code, out, err = run_cli(["export", "--study", "flow", "--nfe", "6", "--format", "sigmas", "--db", url], capsys)
    assert code == 0 and json.loads(out) == [*to_min.times, 0.0]
    assert "the list is in t (a flow model's sigma)" in err
    assert "the schedule ends at the smallest training sigma 0.001 and the list adds a step from there to 0" in err


def test_eval_of_a_schedule_tuned_on_another_problem_says_what_differs(tmp_path, capsys):
    """An exported schedule evaluated on the problem it was tuned on says nothing more; on the same problem with
    another setting or other fitted data, one note names the first key that differs, both values shown. Imported
    into a study of another problem, it is queued, and the line says which key kept its scores out."""
    from steptune.evaluators import load_problem

    p = load_problem("gmm-2d")
    same = json.loads(json.dumps(p.identity()))
    other_data = json.loads(json.dumps(same))
    other_data["data"]["data"] = "ring-8"
    other_fit = json.loads(json.dumps(same))
    other_fit["data"]["mixture_sha256"] = "0" * 64
    url = f"sqlite:///{tmp_path / 'e.db'}"
    s = presets.build("unipc-bh2", 3, p.noise, t_start=p.t_start, t_end=p.t_end)
    with connect(url, create=True) as db:
        for name, ident in (("same", same), ("data", other_data), ("fit", other_fit)):
            db.create_study(name, method="sweep", problem=ident)
            db.add_trials(name, [{"schedule": s, "status": "complete", "metrics": {"rmse": 0.1}, "fidelity": "cheap"}])
    notes = {}
    for name in ("same", "data", "fit"):
        path = tmp_path / f"{name}.json"
        code, _, err = run_cli(["export", "--study", name, "--nfe", "3", "-o", str(path), "--db", url], capsys)
        assert code == 0, err
        code, out, err = run_cli(["eval", "--problem", "gmm-2d", "--schedule", str(path), "--bank", "train",
                                  "--samples", "8", "--cache", str(tmp_path / "cache")], capsys)
        assert code == 0 and "complete" in out, err
        notes[name] = [ln for ln in err.splitlines() if ln.startswith("note:")]
    assert notes["same"] == []
    assert notes["data"] == [f"note: {tmp_path / 'data.json'} was tuned on gmm-2d with data.data 'ring-8', not "
                             "'ring-8+centre' as here"]
    assert notes["fit"] == [f"note: {tmp_path / 'fit.json'} was tuned on gmm-2d with other fitted mixture than here "
                            f"(data.mixture_sha256 000000000000... there, {same['data']['mixture_sha256'][:12]}... "
                            "here)"]
    code, _, err = run_cli(["import", str(tmp_path / "data.json"), "--study", "same", "--db", url,
                            "--allow-duplicates"], capsys)
    assert code == 0 and "queued (the file's scores are of another problem: data.data ring-8 there, ring-8+centre in " \
        "the study): the study's next run scores it" in " ".join(err.split()), err
    code, _, err = run_cli(["import", str(tmp_path / "same.json"), "--study", "fit", "--db", url,
                            "--allow-duplicates"], capsys)
    assert code == 0 and "the file's scores are of another problem: data.mixture_sha256 494405bef511" in err, err


def test_best_with_json_refuses_a_study_without_a_score_as_the_table_does(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'q.db'}"
    with connect(url) as db:
        db.add_trials("q", [{"schedule": presets.build("ddim", 4, noise.VPLinear())}], create={"method": "import"})
    for json_ in ([], ["--json"]):
        code, out, err = run_cli(["best", "--study", "q", "--db", url, *json_], capsys)
        assert (code, out, err.strip()) == (2, "", "error: study 'q' has no complete trial with a score yet")


def test_the_export_of_a_pruned_refinement_says_what_it_is(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'p.db'}"
    with connect(url) as db:
        (tid,) = db.add_trials("p", [{"schedule": presets.build("ddim", 4, noise.VPLinear()), "status": "pruned",
                                      "metrics": {"rmse": 0.2}, "fidelity": "heldout"}], create={"method": "s3"})
    code, out, err = run_cli(["export", "--study", "p", "--trial", str(tid), "--db", url], capsys)
    assert code == 0 and json.loads(out)["provenance"]["score"] == 0.2
    assert err.strip() == (f"note: trial id {tid} is pruned: a refinement that did not beat its parent on the held-out "
                           "bank (its scores are in the export; the parent is the better schedule)")


def test_the_studies_table_counts_pruned_trials_so_its_counts_add_up(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'p.db'}"
    sched = presets.build("ddim", 4, noise.VPLinear())
    with connect(url) as db:
        statuses = ("complete", "pruned", "pruned", "failed", "queued")
        db.add_trials("p", [{"schedule": sched, "status": st, "metrics": {} if st == "queued" else {"rmse": 0.2}}
                            for st in statuses], create={"method": "s3"})
    code, out, _ = run_cli(["studies", "--db", url], capsys)
    row = next(line for line in out.splitlines() if line.startswith("│ p "))
    cells = [c.strip() for c in row.strip("│").split("│")]
    assert code == 0 and cells[3:7] == ["5", "1", "2", "1"] and cells[7] == "0/1"
    assert "pruned" in out
