"""The dashboard's JSON endpoints (FastAPI test client) on a database filled by a real short search, a
real preset sweep, an imported hand-made schedule and SOR relaxation rounds."""

from __future__ import annotations

import io
import json
import math
import zipfile
from collections import defaultdict
from dataclasses import replace

import pytest
import torch
from fastapi.testclient import TestClient
from test_dashboard_data import (
    BANDIT_STUDY,
    FIXED_STUDY,
    HAND_STUDY,
    OTHER_SEQUENCE_STUDY,
    PRESET_NFES,
    PRESET_STUDY,
    PRESETS,
    SEARCH_STUDY,
    dashboard_db,  # noqa: F401  (the session fixture)
)

from steptune.dashboard import create_app, open_read_only
from steptune.dashboard.schedule_view import step_rows
from steptune.exports import comfyui_sigmas, import_schedule, k_diffusion_sigmas, parse_export
from steptune.search import DEFAULT_PRESETS
from steptune.space import Corrector, presets
from steptune.space import noise as noise_mod
from steptune.storage import connect


@pytest.fixture(scope="module")
def client(dashboard_db):  # noqa: F811
    url, _ = dashboard_db
    store = open_read_only(url)
    with TestClient(create_app(store)) as c:
        yield c
    store.close()


def _problem_id(client) -> int:
    return next(p["id"] for p in client.get("/api/problems").json() if p["name"] == "gmm-2d")


def test_problems_list_every_study_with_counts(client, dashboard_db):  # noqa: F811
    url, _ = dashboard_db
    probs = client.get("/api/problems").json()
    gmm = next(p for p in probs if p["name"] == "gmm-2d")
    names = {s["name"]: s for s in gmm["studies"]}
    assert set(names) == {SEARCH_STUDY, PRESET_STUDY, HAND_STUDY}
    with connect(url, create=False) as store:
        assert sum(names[SEARCH_STUDY]["trials"].values()) == store.count_trials(SEARCH_STUDY)
    assert names[SEARCH_STUDY]["fidelities"] == ["heldout", "train"] and gmm["fidelities"] == ["heldout", "train"]
    orphans = next(p for p in probs if p["id"] == 0)
    assert {s["name"] for s in orphans["studies"]} == {BANDIT_STUDY, FIXED_STUDY, OTHER_SEQUENCE_STUDY}
    assert [s["relaxation_rounds"] for s in orphans["studies"]] == [12, 12, 1]


def expected_series(url: str) -> dict[str, dict[int, tuple[float, int]]]:
    """{series name: {nfe: (best score, trial id)}} computed from the stored trials, independently of the app."""
    out: dict[str, dict[int, tuple[float, int]]] = defaultdict(dict)
    with connect(url, create=False) as store:
        for study in (SEARCH_STUDY, PRESET_STUDY, HAND_STUDY):
            method = store.get_study(study).method
            for t in store.trials(study, status="complete"):
                if method == "preset":
                    name = f"{t.schedule['name']} ({t.fidelity})"
                elif t.info.get("baseline"):
                    name = f"{t.info['origin'].removeprefix('preset:').rpartition('@')[0]} ({t.fidelity})"
                else:
                    name = f"{study} ({t.fidelity})"
                if t.nfe not in out[name] or (t.score, t.id) < out[name][t.nfe]:
                    out[name][t.nfe] = (t.score, t.id)
    return out


def test_front_has_one_series_per_study_fidelity_and_preset(client, dashboard_db):  # noqa: F811
    url, info = dashboard_db
    data = client.get("/api/front", params={"problem": _problem_id(client)}).json()
    want = expected_series(url)
    got = {s["name"]: {p["nfe"]: (p["score"], p["trial"]) for p in s["points"]} for s in data["series"]}
    assert got == want
    # every preset of the sweep and of the search's baselines is a series of its own
    presets = {s["preset"] for s in data["series"] if s["kind"] == "preset"}
    assert presets == set(PRESETS) | set(DEFAULT_PRESETS)
    assert {s["name"] for s in data["series"] if s["kind"] == "study"} == {
        f"{SEARCH_STUDY} (train)", f"{SEARCH_STUDY} (heldout)", f"{HAND_STUDY} (heldout)"}
    for s in data["series"]:
        pts = s["points"]
        # Pareto flags: a point is on its curve's front iff no fewer-NFE point scores at least as well
        for p in pts:
            dominated = any(q["nfe"] < p["nfe"] and q["score"] <= p["score"] for q in pts)
            assert p["pareto"] == (not dominated)
        assert all(p["metrics"]["rmse"] == p["score"] for p in pts)
    # the overall front per fidelity is non-dominated and covers every series' points
    for f in data["fronts"]:
        scores = [p["score"] for p in f["points"]]
        assert scores == sorted(scores, reverse=True) and len(set(scores)) == len(scores)
        for s in (s for s in data["series"] if s["fidelity"] == f["fidelity"]):
            for p in s["points"]:
                assert any(q["nfe"] <= p["nfe"] and q["score"] <= p["score"] for q in f["points"])


def test_front_reads_large_groups_through_the_index_alike(client, dashboard_db, monkeypatch):  # noqa: F811
    from steptune.dashboard import queries

    pid = _problem_id(client)
    detailed = client.get("/api/front", params={"problem": pid, "fidelity": "train"}).json()
    monkeypatch.setattr(queries, "DETAIL_LIMIT", 0)
    bulk = client.get("/api/front", params={"problem": pid, "fidelity": "train"}).json()
    assert bulk == detailed and [s["name"] for s in bulk["series"]] == [f"{SEARCH_STUDY} (train)"]


def test_front_fidelity_filter(client):
    pid = _problem_id(client)
    cheap = client.get("/api/front", params={"problem": pid, "fidelity": "train"}).json()
    assert [s["name"] for s in cheap["series"]] == [f"{SEARCH_STUDY} (train)"]
    assert [f["fidelity"] for f in cheap["fronts"]] == ["train"]
    assert client.get("/api/front", params={"problem": pid, "fidelity": "nope"}).json()["series"] == []


def test_history_is_the_running_minimum_without_baselines(client, dashboard_db):  # noqa: F811
    url, _ = dashboard_db
    data = client.get("/api/history", params={"study": SEARCH_STUDY}).json()
    with connect(url, create=False) as store:
        own = [t for t in store.trials(SEARCH_STUDY) if not t.info.get("baseline") and t.status != "queued"]
    for fid in ("train", "heldout"):
        log = [t for t in own if t.fidelity == fid]
        assert data["evaluations"][fid] == len(log)
        for c in (c for c in data["curves"] if c["fidelity"] == fid):
            running, expect = math.inf, []
            for i, t in enumerate(log, start=1):
                if t.nfe == c["nfe"] and t.status == "complete" and t.score < running:
                    running = t.score
                    expect.append((i, running, t.id))  # each point names its trial by id, as /api/trials/ID takes
            got = list(zip(c["evaluations"], c["best"], c["trials"]))
            assert got[:len(expect)] == expect and got[-1][:2] == (len(log), running)


def test_trial_table_filters_sorts_and_pages(client, dashboard_db):  # noqa: F811
    url, _ = dashboard_db
    with connect(url, create=False) as store:
        nfe4 = store.trials(SEARCH_STUDY, nfe=4, status="complete")
    page = client.get("/api/trials", params={"study": SEARCH_STUDY, "nfe": 4, "status": "complete",
                                             "sort": "score", "order": "desc", "limit": 3}).json()
    assert page["total"] == len(nfe4)
    want = sorted(nfe4, key=lambda t: (-t.score, t.id))
    assert [r["id"] for r in page["items"]] == [t.id for t in want[:3]]
    nxt = client.get("/api/trials", params={"study": SEARCH_STUDY, "nfe": 4, "status": "complete",
                                            "sort": "score", "order": "desc", "limit": 3, "offset": 3}).json()
    assert [r["id"] for r in nxt["items"]] == [t.id for t in want[3:6]]
    everything = client.get("/api/trials", params={"problem": _problem_id(client), "limit": 500}).json()
    with connect(url, create=False) as store:
        assert everything["total"] == sum(store.count_trials(s) for s in (SEARCH_STUDY, PRESET_STUDY, HAND_STUDY))
    assert everything["nfes"] == sorted(set(PRESET_NFES) | {3, 4, 5})


def test_schedule_view_of_a_preset_is_most_like_itself(client, dashboard_db):  # noqa: F811
    url, info = dashboard_db
    with connect(url, create=False) as store:
        t = next(t for t in store.trials(PRESET_STUDY) if t.schedule["name"] == "dpm-solver++-2m" and t.nfe == 5)
    d = client.get(f"/api/trials/{t.id}/schedule").json()
    assert d["nearest"][0]["preset"] == "dpm-solver++-2m" and d["nearest"][0]["distance"] == 0.0
    sched = t.to_schedule()
    ns = noise_mod.from_dict(sched.noise)
    lam = ns.lam(torch.tensor(sched.times, dtype=torch.float64)).tolist()
    assert d["lambdas"] == pytest.approx([v if math.isfinite(v) else None for v in lam])
    assert [s["order"] for s in d["steps"]] == [s.order for s in sched.steps]
    assert len(d["steps"]) == len(presets.build("dpm-solver++-2m", 5, ns, t_start=1.0, t_end=1e-3).steps)


def test_a_steps_relaxation_coefficients_are_shown_with_their_kinds():
    """A refined schedule's coefficients scale its steps' and correctors' relaxations: the view names them."""
    s = presets.build("unipc-bh2", 5, noise_mod.VPLinear(), t_start=1.0, t_end=1e-3)
    steps = list(s.steps)
    steps[1] = replace(steps[1], relaxation_coef=0.25, corrector=replace(steps[1].corrector, relaxation_coef=-1.5))
    steps[2] = replace(steps[2], corrector=Corrector("pseudo", relaxation="linear", relaxation_coef=0.5))
    rows = step_rows(s.with_steps(steps).validate(), None)
    assert [r["relaxation"] for r in rows[:3]] == ["none", "unipc-bh2, coef 0.25", "unipc-bh2"]
    assert [r["corrector"] for r in rows[:4]] == ["pseudo, unipc-bh2", "pseudo, none, coef -1.5",
                                                  "pseudo, linear, coef 0.5", "pseudo"]


def test_exports_use_the_storage_code_and_import_back(client, dashboard_db, tmp_path):  # noqa: F811
    url, info = dashboard_db
    with connect(url, create=False) as store:
        t = min((t for t in store.trials(SEARCH_STUDY, status="complete", nfe=5)
                 if t.fidelity == "heldout" and not t.info.get("baseline")), key=lambda t: t.score)
    r = client.get(f"/api/trials/{t.id}/export/json")
    assert r.status_code == 200 and "attachment" in r.headers["content-disposition"]
    sched, prov = parse_export(r.text)
    assert sched.to_dict() == t.to_schedule().to_dict() and prov["trial"] == t.id
    with connect(f"sqlite:///{tmp_path / 'other.db'}") as other:
        back = import_schedule(other, r.text, "imported")
        assert back.status == "complete" and math.isclose(back.score, t.score)
    assert client.get(f"/api/trials/{t.id}/export/sigmas").json() == k_diffusion_sigmas(t.to_schedule())
    assert client.get(f"/api/trials/{t.id}/export/comfyui").text.strip() == comfyui_sigmas(t.to_schedule())
    z = client.get(f"/api/trials/{t.id}/export/diffusers")
    assert z.status_code == 200 and z.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(z.content)) as zf:
        config = next(n for n in zf.namelist() if n.endswith("scheduler_config.json"))
        cfg = json.loads(zf.read(config))
        zf.extractall(tmp_path / "unzipped")
    assert cfg["_class_name"] == "SteptuneScheduler" and cfg["schedule"]["steps"] == t.schedule["steps"]
    from steptune.exports import SteptuneScheduler

    loaded = SteptuneScheduler.from_pretrained(str((tmp_path / "unzipped" / config).parent))
    assert loaded.config.schedule == cfg["schedule"]


def test_relaxation_view(client, dashboard_db):  # noqa: F811
    url, _ = dashboard_db
    assert client.get("/api/relaxation/studies").json() == [BANDIT_STUDY, FIXED_STUDY, OTHER_SEQUENCE_STUDY]
    d = client.get("/api/relaxation", params={"study": BANDIT_STUDY}).json()
    with connect(url, create=False) as store:
        rounds = store.relaxation_rounds(BANDIT_STUDY)
        fixed = store.relaxation_rounds(FIXED_STUDY)
    assert d["omega"] == [r.omega for r in rounds]
    curves = {c["name"]: c for c in d["curves"]}
    assert curves[BANDIT_STUDY]["cumulative"][-1] == sum(r.iterations for r in rounds)
    assert curves[FIXED_STUDY]["cumulative"][-1] == sum(r.iterations for r in fixed)
    assert OTHER_SEQUENCE_STUDY not in curves  # another tolerance: another sequence of solves, not a baseline


HOSTILE = [
    "/api/history?study=nope",
    "/api/history?study=x'%20OR%20'1'='1",
    "/api/history?study=gmm2d-random%27;%20DROP%20TABLE%20trials;--",
    "/api/trials?study=../../etc/passwd",
    "/api/trials?sort=score;DROP%20TABLE%20trials",
    "/api/trials?status=complete'%20OR%201=1",
    "/api/trials?limit=100000",
    "/api/trials?offset=-1",
    "/api/front?problem=1%20OR%201=1",
    "/api/front?problem=999999",
    "/api/front?problem=-1",
    "/api/relaxation?study=/etc/passwd",
    "/api/trials/999999/schedule",
    "/api/trials/0/schedule",
    "/api/trials/1/export/..%2F..%2Fetc%2Fpasswd",
    "/api/trials/1/export/../../../etc/passwd",
    "/api/trials/1;DROP%20TABLE%20trials/export/json",
    "/static/../pyproject.toml",
    "/static/%2e%2e/%2e%2e/pyproject.toml",
    "/static/..%2F..%2Fpyproject.toml",
    "/api/history?study=" + "a" * 5000,
]


def _fingerprint(url: str) -> tuple:
    with connect(url, create=False) as store, store.engine.connect() as conn:
        tables = conn.exec_driver_sql("SELECT name, sql FROM sqlite_master ORDER BY name").all()
        return store.count_trials(), tuple(tables), len(store.studies())


@pytest.mark.parametrize("path", HOSTILE)
def test_hostile_input_is_refused(client, dashboard_db, path):  # noqa: F811
    url, _ = dashboard_db
    before = _fingerprint(url)
    r = client.get(path)
    assert 400 <= r.status_code < 500, (path, r.status_code, r.text[:200])
    assert "root:" not in r.text and "[project]" not in r.text
    assert _fingerprint(url) == before


def test_connections_are_read_only(dashboard_db):  # noqa: F811
    url, _ = dashboard_db
    store = open_read_only(url)
    try:
        with pytest.raises(Exception, match="readonly|read-only|query_only"):
            store.create_study("should-not-exist")
    finally:
        store.close()
    with connect(url, create=False) as store:
        assert "should-not-exist" not in {s.name for s in store.studies()}


def test_status_token_changes_when_a_trial_is_added(tmp_path):
    url = f"sqlite:///{tmp_path / 'live.db'}"
    connect(url).close()
    store = open_read_only(url)
    sched = presets.build("ddim", 7, noise_mod.get("vp-linear"), t_start=1.0, t_end=1e-3)
    try:
        with TestClient(create_app(store)) as c:
            before = c.get("/api/status").json()
            with connect(url, create=False) as writer:
                writer.create_study("late", method="manual")
                writer.add_trial("late", sched)
            after = c.get("/api/status").json()
    finally:
        store.close()
    assert after["token"] != before["token"] and after["trials"] == before["trials"] + 1 == 1


def test_reads_go_on_while_a_writer_holds_the_database(client, dashboard_db):  # noqa: F811
    """SQLite in WAL mode: the dashboard answers while a search is in the middle of a write transaction."""
    import sqlite3
    import time

    url, _ = dashboard_db
    writer = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
    try:
        assert writer.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("UPDATE studies SET n_trials = n_trials WHERE id = 1")
        start = time.perf_counter()
        for path in ("/api/problems", f"/api/front?problem={_problem_id(client)}", "/api/status"):
            assert client.get(path).status_code == 200
        assert time.perf_counter() - start < 10  # not waiting out the 60 s busy timeout
    finally:
        writer.execute("ROLLBACK")
        writer.close()


def test_a_problem_on_a_named_noise_schedule_shows_its_name(tmp_path):
    from steptune.dashboard.queries import problems

    ns = noise_mod.VPDiscrete.named("ddpm-linear")
    with connect(f"sqlite:///{tmp_path / 'x.db'}") as store:
        store.create_study("s", method="preset", problem={"name": "toy", "noise": ns.to_dict()})
        store.create_study("t", method="preset", problem={"name": "toy2", "noise": noise_mod.VPLinear().to_dict()})
        assert {p["name"]: p["noise"] for p in problems(store)} == {"toy": "ddpm-linear", "toy2": "vp-linear"}


@pytest.mark.parametrize("path", ["/", "/api/status", "/api/config", "/static/dashboard.js"])
def test_a_head_request_is_answered_as_a_get_without_the_body(client, path):
    """HEAD (curl -I, a load balancer's check) is answered as GET is, without the body (it was 405)."""
    get, head = client.get(path), client.head(path)
    assert get.status_code == head.status_code == 200
    assert head.headers["content-type"] == get.headers["content-type"] and head.content == b""
    assert int(head.headers["content-length"]) == len(get.content) > 0
