"""The front's data endpoint at 50,000 trials (server-side aggregation over an index), and the same
answers from SQLite and from a live PostgreSQL server (STEPTUNE_TEST_PG_URL, set by scripts/test.sh)."""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from test_storage_db import fresh_pg_schema

from steptune.dashboard import create_app, open_read_only, queries
from steptune.storage import connect

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from dashboard import PROBLEM, build_database  # noqa: E402

TARGET_MS = 300.0
N_TRIALS = 50_000
COPIES = 4  # the database is built at a quarter of the size, then copied in SQL (seconds instead of tens)
COLUMNS = ("study_id", "number", "schedule", "key", "nfe", "fidelity", "bank", "n_samples", "metrics", "score",
           "status", "error", "created", "started", "finished", "seconds", "worker", "attempts", "max_attempts",
           "heartbeat", "info")


def _copy_trials(url: str, copies: int) -> None:
    """Append ``copies - 1`` copies of every trial, each with new numbers and scores scaled by 1 + k/100."""
    with connect(url, create=False) as store, store.engine.begin() as conn:
        span = conn.execute(text("SELECT max(number) + 1 FROM trials")).scalar()
        cols = ", ".join(COLUMNS)
        for k in range(1, copies):
            picked = ", ".join({"number": f"number + {k * span}", "score": f"score * {1 + k / 100}"}.get(c, c)
                               for c in COLUMNS)
            conn.execute(text(f"INSERT INTO trials ({cols}) SELECT {picked} FROM trials WHERE number < :span"),
                         {"span": span})
        conn.execute(text("UPDATE studies SET n_trials = (SELECT count(*) FROM trials "
                          "WHERE trials.study_id = studies.id)"))


@pytest.fixture(scope="module")
def big_db(tmp_path_factory):
    url = f"sqlite:///{tmp_path_factory.mktemp('scale') / 'steptune.db'}"
    build_database(url, N_TRIALS // COPIES)
    _copy_trials(url, COPIES)
    with connect(url, create=False) as store:
        assert store.count_trials() == N_TRIALS
    return url


def test_front_endpoint_answers_under_300_ms_at_50000_trials(big_db):
    store = open_read_only(big_db)
    try:
        with TestClient(create_app(store)) as c:
            pid = next(p["id"] for p in c.get("/api/problems").json() if p["name"] == PROBLEM["name"])
            path = f"/api/front?problem={pid}"
            first = c.get(path)
            assert first.status_code == 200
            times = []
            for _ in range(9):
                t = time.perf_counter()
                r = c.get(path)
                times.append((time.perf_counter() - t) * 1000)
                assert r.status_code == 200
    finally:
        store.close()
    data = first.json()
    assert len(data["series"]) == 4 * 2 + 6 + 1  # four searches at two fidelities, six presets, one import
    median = statistics.median(times)
    assert median < TARGET_MS, f"front endpoint: median {median:.0f} ms over 9 calls at {N_TRIALS:,} trials"


def test_index_path_and_row_path_agree_at_scale(big_db, monkeypatch):
    """The large train-bank groups go through the index alone; reading them row by row gives the same front."""
    with connect(big_db, create=False) as store:
        pid = next(p["id"] for p in queries.problems(store) if p["name"] == PROBLEM["name"])
        fast = queries.front(store, pid)
        monkeypatch.setattr(queries, "DETAIL_LIMIT", 10**9)
        rows = queries.front(store, pid)
    assert fast == rows


@pytest.fixture
def pg_url():
    with fresh_pg_schema() as url:
        yield url


def _answers(url: str) -> dict:
    store = open_read_only(url)
    try:
        with TestClient(create_app(store)) as c:
            pid = next(p["id"] for p in c.get("/api/problems").json() if p["name"] == PROBLEM["name"])
            paths = [f"/api/front?problem={pid}", f"/api/front?problem={pid}&fidelity=heldout",
                     "/api/history?study=search-s3", f"/api/trials?problem={pid}&sort=score&limit=40",
                     "/api/trials?study=search-tpe&status=complete&nfe=8&sort=seconds&order=desc",
                     "/api/problems"]
            out = {}
            for p in paths:
                r = c.get(p)
                assert r.status_code == 200, (p, r.text[:200])
                out[p.replace(str(pid), "PID")] = r.json()
    finally:
        store.close()
    for p in out["/api/problems"]:  # creation times differ between the two databases
        for s in p["studies"]:
            s.pop("created")
    for page in (v for k, v in out.items() if k.startswith("/api/trials")):
        for item in page["items"]:
            item.pop("created"), item.pop("finished")
    return out


def test_postgresql_gives_the_same_answers_as_sqlite(pg_url, tmp_path):
    sqlite_url = f"sqlite:///{tmp_path / 'steptune.db'}"
    for url in (sqlite_url, pg_url):
        build_database(url, 3_000)
    assert _answers(pg_url) == _answers(sqlite_url)


def test_postgresql_connections_are_read_only(pg_url):
    connect(pg_url).close()
    store = open_read_only(pg_url)
    try:
        with pytest.raises(Exception, match="read-only transaction"):
            store.create_study("should-not-exist")
        assert store.studies() == []
    finally:
        store.close()
