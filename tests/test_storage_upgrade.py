"""A database written before the study kind became a column (tests/data/pre-redesign.db) upgrades with
`steptune db upgrade` without losing a row, and keeps working: each study gets the kind steptune used to
infer, `steptune run` resumes its finished search without evaluating anything, the dashboard reads it,
and "best" is the same trial through the Python API and the command line."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from steptune.dashboard import create_app, open_read_only
from steptune.storage import best_frame, connect

ROOT = Path(__file__).resolve().parents[1]
PRE_REDESIGN = ROOT / "tests" / "data" / "pre-redesign.db"
STEPTUNE = Path(sys.executable).with_name("steptune")  # the command this environment installed
KINDS = {"gmm-2d-quick": "search", "tpe-small": "search", "sweep-small": "sweep", "relax-small": "relaxation",
         "dc-small": "dc-fit", "imported": "import"}
SEARCHES = ("gmm-2d-quick", "tpe-small")


def steptune(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(STEPTUNE), *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def snapshot(path: Path) -> dict:
    """Every steptune table's rows, read with sqlite3 (independently of steptune), keyed by table."""
    con = sqlite3.connect(path)
    try:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE "
                                            "'sqlite_%' AND name != 'steptune_schema_version' ORDER BY name")]
        return {t: con.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall() for t in tables}
    finally:
        con.close()


def sql(path: Path, query: str) -> list[tuple]:
    con = sqlite3.connect(path)
    try:
        return con.execute(query).fetchall()
    finally:
        con.close()


@pytest.fixture(scope="module")
def upgraded(tmp_path_factory) -> tuple[Path, dict, subprocess.CompletedProcess]:
    """A copy of the old database, upgraded by `steptune db upgrade`; with its rows from before."""
    folder = tmp_path_factory.mktemp("pre-redesign")
    db = folder / "pre.db"
    shutil.copy(PRE_REDESIGN, db)
    before = snapshot(db)
    return db, before, steptune("db", "upgrade", "--db", f"sqlite:///{db}", cwd=folder)


def test_upgrade_keeps_every_row_and_stores_each_studys_kind(upgraded):
    db, before, res = upgraded
    assert sql(PRE_REDESIGN, "SELECT version_num FROM steptune_schema_version") == [("0003",)]
    assert res.returncode == 0, res.stderr
    assert "schema revision 0003 -> 0005" in res.stderr
    after = snapshot(db)
    assert set(before) == {"problems", "studies", "trials", "relaxation_records"}
    assert set(after) == set(before) | {"requests"} and after["requests"] == []
    for table in ("problems", "trials", "relaxation_records"):  # untouched, scores included
        assert after[table] == before[table], table
    assert len(after["studies"]) == len(before["studies"]) == len(KINDS)
    columns = [r[1] for r in sql(db, "PRAGMA table_info(studies)")]
    kind_at = columns.index("kind")
    assert [row[:kind_at] + row[kind_at + 1:] for row in after["studies"]] == before["studies"]
    assert dict(sql(db, "SELECT name, kind FROM studies")) == KINDS
    with connect(f"sqlite:///{db}", must_exist=True) as store:
        assert {st.name: st.kind for st in store.studies()} == KINDS


def test_run_resumes_the_finished_search_without_evaluating(upgraded, tmp_path):
    db = tmp_path / "pre.db"
    shutil.copy(upgraded[0], db)
    before = snapshot(db)
    train = sql(db, "SELECT count(*) FROM trials t JOIN studies s ON s.id = t.study_id "
                    "WHERE s.name = 'gmm-2d-quick' AND t.fidelity = 'train' AND t.status = 'complete'")[0][0]
    res = steptune("run", str(ROOT / "examples" / "gmm-2d-quick.toml"), "--db", f"sqlite:///{db}", "--json",
                   cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert f"resuming study 'gmm-2d-quick': {train} search evaluations done" in res.stderr
    out = json.loads(res.stdout)
    assert (out["study"], out["status"], out["evaluations"], out["failed"]) == ("gmm-2d-quick", "complete", train, 0)
    after = snapshot(db)
    for table in ("problems", "relaxation_records"):
        assert after[table] == before[table], table
    # every stored trial as it was; what was added are the baselines the job asks for now (each preset at its
    # best spacing), not search or confirmation evaluations
    assert after["trials"][:len(before["trials"])] == before["trials"]
    last = max(r[0] for r in before["trials"])
    added = sql(db, f"SELECT json_extract(info, '$.baseline'), fidelity FROM trials WHERE id > {last}")
    assert all(row == (1, "heldout") for row in added), added


def test_the_dashboard_reads_the_upgraded_database(upgraded):
    db = upgraded[0]
    counts = dict(sql(db, "SELECT s.name, count(t.id) FROM studies s LEFT JOIN trials t ON t.study_id = s.id "
                          "GROUP BY s.name"))
    store = open_read_only(f"sqlite:///{db}")
    try:
        with TestClient(create_app(store)) as client:
            problems = client.get("/api/problems").json()
            listed = {st["name"]: sum(st["trials"].values()) for p in problems for st in p["studies"]}
            assert listed == counts
            gmm = next(p["id"] for p in problems if p["name"] == "gmm-2d")
            front = client.get("/api/front", params={"problem": gmm})
            assert front.status_code == 200
            series = {s["name"]: {pt["nfe"]: (pt["score"], pt["trial"]) for pt in s["points"]}
                      for s in front.json()["series"]}
            for study in SEARCHES:
                for fidelity in ("train", "heldout"):
                    want = {nfe: (score, tid) for nfe, score, tid in sql(
                        db, "SELECT t.nfe, t.score, t.id FROM trials t JOIN studies s ON s.id = t.study_id "
                            f"WHERE s.name = '{study}' AND t.fidelity = '{fidelity}' AND t.status = 'complete' "
                            "AND t.info NOT LIKE '%\"baseline\": true%' ORDER BY t.score DESC, t.id DESC")}
                    assert series[f"{study} ({fidelity})"] == want
            page = client.get("/api/trials", params={"study": "gmm-2d-quick"}).json()
            assert page["total"] == counts["gmm-2d-quick"]
            relax = client.get("/api/relaxation", params={"study": "relax-small"}).json()
            assert len(relax["rounds"]) == sql(db, "SELECT count(*) FROM relaxation_records")[0][0]
            assert client.get("/api/history", params={"study": "gmm-2d-quick"}).status_code == 200
    finally:
        store.close()


def test_best_is_the_same_trial_through_the_api_and_the_command_line(upgraded):
    """A search reports its held-out (confirmed) scores: Storage.best, best_per_nfe, pareto and best_frame
    name the trials `steptune best` names, though the train bank has lower scores at every NFE of this one."""
    db, study = upgraded[0], "gmm-2d-quick"
    url = f"sqlite:///{db}"
    res = steptune("best", "--study", study, "--db", url, "--json", cwd=db.parent)
    assert res.returncode == 0, res.stderr
    cli = json.loads(res.stdout)
    assert cli and {r["fidelity"] for r in cli} == {"heldout"}
    heldout = {nfe: tid for nfe, tid in sql(
        db, "SELECT t.nfe, t.id FROM trials t JOIN studies s ON s.id = t.study_id WHERE s.name = "
            f"'{study}' AND t.fidelity = 'heldout' AND t.status = 'complete' ORDER BY t.score DESC, t.id DESC")}
    assert {r["nfe"]: r["id"] for r in cli} == heldout
    with connect(url, must_exist=True) as store:
        assert [(t.nfe, t.id) for t in store.best_per_nfe(study)] == [(r["nfe"], r["id"]) for r in cli]
        assert [t.id for t in store.pareto(study)] == [r["id"] for r in cli if r["pareto"]]
        frame = best_frame(store, study)
        assert list(zip(frame["nfe"], frame["id"], frame["pareto"])) == [(r["nfe"], r["id"], r["pareto"])
                                                                        for r in cli]
        for r in cli:
            one = steptune("best", "--study", study, "--nfe", str(r["nfe"]), "--db", url, "--json", cwd=db.parent)
            assert one.returncode == 0, one.stderr
            assert json.loads(one.stdout)["provenance"]["trial"] == store.best(study, r["nfe"]).id == r["id"]
        # the train bank's lower scores count only when asked for by name
        train = {t.nfe: t.score for t in store.best_per_nfe(study, fidelity="train")}
        assert all(train[r["nfe"]] < r["score"] for r in cli)
