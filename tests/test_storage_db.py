"""The storage API, run on SQLite and on a live PostgreSQL server (each test in a fresh database/schema).

PostgreSQL comes from STEPTUNE_TEST_PG_URL (scripts/test.sh starts a server and sets it). Without it
the PostgreSQL cases fail under CI=true and are skipped elsewhere.
"""

import dataclasses
import math
import os
import random
import threading
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timedelta

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from steptune.space import ScheduleError, noise, presets
from steptune.storage import LeaseLost, StorageError, best_frame, connect, studies_frame, trials_frame

NS = noise.VPLinear()
PROBLEM = {"name": "toy", "noise": NS.to_dict(), "model": {"prediction": "eps", "time_input": "continuous"}}


def _pg_base_url() -> str:
    url = os.environ.get("STEPTUNE_TEST_PG_URL")
    if not url:
        msg = "STEPTUNE_TEST_PG_URL is not set; scripts/test.sh starts a PostgreSQL server and sets it"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return url


@contextmanager
def fresh_pg_schema():
    """A URL to an empty schema on the PostgreSQL server (dropped afterwards)."""
    base = _pg_base_url()
    schema = f"t_{uuid.uuid4().hex[:16]}"
    admin = create_engine(base)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    try:
        yield make_url(base).update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(
            hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """A URL to an empty database: a SQLite file, or a fresh schema on the PostgreSQL server."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'steptune.db'}"
        return
    with fresh_pg_schema() as url:
        yield url


@pytest.fixture
def db(db_url):
    store = connect(db_url)
    yield store
    store.close()


def _rows(db) -> dict:
    with db.engine.connect() as conn:
        return {t: conn.execute(text(f"SELECT count(*) FROM {t}")).scalar()
                for t in ("problems", "studies", "trials", "relaxation_records")}


# ---- schema ----------------------------------------------------------------------------------------


def test_new_database_gets_the_schema_and_upgrade_is_idempotent(db, db_url):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from steptune.storage.schema import VERSION_TABLE, Base

    assert db.revision() == db.head
    assert db.upgrade() == db.head  # no-op at head
    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}), Base.metadata)
    assert diff == [], f"the migrations and the ORM schema disagree: {diff}"
    assert connect(db_url).revision() == db.head


def test_a_database_at_an_older_revision_upgrades_and_keeps_its_trials(db_url):
    import json

    from alembic import command

    from steptune.storage.db import Storage

    store = Storage(db_url)
    with store.engine.begin() as conn:
        command.upgrade(store._alembic_config(conn), "0001")
        conn.execute(text("INSERT INTO studies (name, method, config, metric, n_trials, created) "
                          "VALUES ('old', 's3', '{}', 'rmse', 1, CURRENT_TIMESTAMP)"))
        conn.execute(text("INSERT INTO trials (study_id, number, schedule, key, nfe, fidelity, bank, metrics, status, "
                          "created, attempts, max_attempts) SELECT id, 0, :s, 'k', 4, '', '', '{}', 'queued', "
                          "CURRENT_TIMESTAMP, 0, 3 FROM studies"), {"s": json.dumps(presets.ddim(4, NS).to_dict())})
    assert store.revision() == "0001"
    with pytest.raises(StorageError, match="steptune db upgrade"):
        connect(db_url, create=False)
    assert store.upgrade() == store.head
    db = connect(db_url, create=False)
    [old] = db.trials("old")
    assert old.info == {} and old.to_schedule().nfe == 4  # rows written before the column existed
    tid = db.add_trial("old", presets.ddim(4, NS), info={"batch": 3, "origin": "preset"}).id
    assert db.trial(tid).info == {"batch": 3, "origin": "preset"}
    db.close()
    store.close()


def test_unknown_revision_and_missing_schema_are_refused(db, db_url):
    with db.engine.begin() as conn:
        conn.execute(text("UPDATE steptune_schema_version SET version_num = 'ffff'"))
    with pytest.raises(StorageError, match="newer than this steptune"):
        connect(db_url)
    with db.engine.begin() as conn:
        for t in ("requests", "relaxation_records", "trials", "studies", "problems", "steptune_schema_version"):
            conn.execute(text(f"DROP TABLE {t}"))
    with pytest.raises(StorageError) as refused:
        connect(db_url, create=False)
    shown = make_url(db_url).render_as_string(hide_password=True)  # the URL, not the object's repr
    assert str(refused.value) == f"database {shown!r} has no steptune schema; run 'steptune db upgrade --db URL'"
    with db.engine.begin() as conn:  # e.g. an Optuna database, which has tables of the same names
        conn.execute(text("CREATE TABLE studies (study_id INTEGER PRIMARY KEY)"))
    with pytest.raises(StorageError, match="already has tables named studies"):
        connect(db_url)


# ---- studies ---------------------------------------------------------------------------------------


def test_studies_create_get_and_share_problems(db):
    a = db.create_study("a", method="s3", seed=7, config={"pop": 10}, problem=PROBLEM)
    b = db.create_study("b", method="random", problem=dict(PROBLEM))
    assert (a.name, a.method, a.seed, a.config, a.metric) == ("a", "s3", 7, {"pop": 10}, "rmse")
    assert a.problem == {"name": "toy", "identity": PROBLEM, "conventions": PROBLEM["model"]}
    assert db.get_study("b") == b
    assert _rows(db)["problems"] == 1  # one row per distinct problem identity
    with pytest.raises(StorageError, match="already exists"):
        db.create_study("a")
    assert db.create_study("a", exist_ok=True) == a
    with pytest.raises(StorageError, match=r"no study named 'c' \(2 studies: a, b; 'steptune studies'"):
        db.get_study("c")
    assert [s.name for s in db.studies()] == ["a", "b"]


def test_a_missing_study_in_a_database_of_one_names_that_one(db):
    db.create_study("gmm-2d-quick")
    with pytest.raises(StorageError, match=r"^no study named 'gmm-2d-quik' \(the only study is 'gmm-2d-quick'\)$"):
        db.get_study("gmm-2d-quik")


def test_a_study_keeps_the_kind_it_was_made_as(db):
    assert db.create_study("api").kind == ""
    assert db.create_study("swept", method="preset", kind="sweep").kind == "sweep"
    db.add_trials("fit", [{"schedule": presets.ddim(3, NS)}], create={"method": "dc", "kind": "dc-fit"})
    # the config's keys and the method no longer decide it
    assert db.create_study("cfg", method="preset", config={"kind": "relaxation", "identity": {}}).kind == ""
    for bad in (lambda: db.create_study("bad", kind="grid"),
                lambda: db.add_trials("bad", [{"schedule": presets.ddim(3, NS)}], create={"kind": "grid"})):
        with pytest.raises(StorageError, match="study kind 'grid' is unknown; use one of search, sweep, relaxation, "
                                               "dc-fit, import"):
            bad()
    assert {st.name: st.kind for st in db.studies()} == {"api": "", "swept": "sweep", "fit": "dc-fit", "cfg": ""}
    assert studies_frame(db).set_index("study")["kind"].to_dict() == {"api": "", "swept": "sweep", "fit": "dc-fit",
                                                                      "cfg": ""}


def test_update_study_config_merges_removes_and_refuses_bad_values(db):
    db.create_study("a", method="dc", config={"kind": "dc-fit", "old": 1}, problem=PROBLEM)
    rec = db.update_study_config("a", {"cpr": {"coef": [1.0, 0.5]}, "old": None})
    assert rec.config == {"kind": "dc-fit", "cpr": {"coef": [1.0, 0.5]}}
    assert db.get_study("a") == rec and rec.problem["identity"] == PROBLEM
    with pytest.raises(StorageError, match="finite JSON"):
        db.update_study_config("a", {"cpr": {"coef": [math.nan]}})
    with pytest.raises(StorageError, match="no study named 'b'"):
        db.update_study_config("b", {"x": 1})
    assert db.get_study("a").config == rec.config


def test_concurrent_config_updates_keep_every_key(db_url):
    with connect(db_url) as store:
        store.create_study("a")

    def writer(w):
        with connect(db_url) as store:
            for i in range(5):
                store.update_study_config("a", {f"w{w}-{i}": i})

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with connect(db_url) as store:
        assert store.get_study("a").config == {f"w{w}-{i}": i for w in range(2) for i in range(5)}


# ---- adding trials ---------------------------------------------------------------------------------


def test_trials_round_trip_their_schedule(db):
    db.create_study("s", problem=PROBLEM)
    s1 = presets.unipc_bh2(6, NS)
    t = db.add_trial("s", s1, status="complete", metrics={"rmse": 0.25, "sw": 0.5}, fidelity="cheap",
                     bank="heldout", n_samples=64, seconds=1.5)
    assert t.schedule == s1.to_dict()
    assert t.to_schedule() == s1
    assert (t.study, t.number, t.nfe, t.score, t.status, t.attempts) == ("s", 0, 6, 0.25, "complete", 1)
    assert (t.fidelity, t.bank, t.n_samples, t.seconds) == ("cheap", "heldout", 64, 1.5)
    renamed = dataclasses.replace(s1, name="other")
    t2 = db.add_trial("s", renamed.to_json())  # JSON text is accepted too
    assert (t2.number, t2.status, t2.score, t2.key) == (1, "queued", None, t.key)  # same schedule, same key
    t3 = db.add_trial("s", presets.ddim(6, NS), score=0.1, metrics={"rmse": 0.3})
    assert t3.score == 0.1  # an explicit score wins over the metric
    assert db.get_study("s").n_trials == 3


def test_trials_read_without_schedules_are_the_same_records_with_no_schedule(db):
    db.create_study("s", problem=PROBLEM)
    db.add_trials("s", [{"schedule": presets.unipc_bh2(n, NS), "status": "complete", "metrics": {"rmse": n / 10},
                         "info": {"origin": f"o{n}"}} for n in (4, 5, 6)] + [{"schedule": presets.ddim(5, NS)}])
    whole = db.trials("s")
    assert [dataclasses.replace(t, schedule=None) for t in whole] == db.trials("s", schedules=False)
    assert [t.schedule for t in db.trials("s", nfe=5, status="complete", schedules=False)] == [None]
    assert [t.key for t in db.trials("s", nfe=5, schedules=False)] == [t.key for t in whole if t.nfe == 5]


def test_added_trials_records_are_what_reading_them_back_gives(db):
    items = [{"schedule": presets.unipc_bh2(6, NS), "fidelity": "cheap", "bank": "cheap", "n_samples": 64,
              "info": {"batch": 0, "params": {"w": [0.1, 1 / 3]}, "origin": "mutation"}},
             {"schedule": presets.ddim(5, NS).to_dict(), "status": "complete",
              "metrics": {"rmse": 0.2, "nll": None, "curve": [0.5, 0.25]}, "seconds": 0.5},
             {"schedule": presets.dpmpp_2m(5, NS).to_json(), "max_attempts": 1}]
    made = db.add_trials("s", items, create={"method": "s3", "problem": PROBLEM}, request="r1", records=True)
    read = db.trials("s", ids=[t.id for t in made])
    assert made == read
    assert [t.number for t in made] == [0, 1, 2] and made[1].score == 0.2
    noise_before = dict(items[0]["schedule"].noise)
    made[0].schedule["noise"].clear()  # a record shares nothing with the schedule it was made from
    assert items[0]["schedule"].noise == noise_before
    made[0].info["params"]["w"].append(1.0)  # ... nor with the info and metrics given
    made[1].metrics["curve"].append(1.0)
    made[1].metrics["rmse"] = 1.0
    assert items[0]["info"]["params"]["w"] == [0.1, 1 / 3] and items[1]["metrics"] == {"rmse": 0.2, "nll": None,
                                                                                      "curve": [0.5, 0.25]}
    # a request sent again adds nothing and gives the first send's trials as they are now
    assert db.add_trials("s", items, request="r1", records=True) == read
    assert db.add_trials("s", items, request="r1") == [t.id for t in read]
    assert db.get_study("s").n_trials == 3


def test_invalid_schedule_writes_nothing(db):
    db.create_study("s")
    db.add_trial("s", presets.ddim(4, NS))
    before = _rows(db)
    bad = presets.ddim(4, NS).to_dict()
    bad["steps"][2]["t"] = bad["steps"][0]["t"] + 0.1
    with pytest.raises(ScheduleError, match="step 2"):
        db.add_trials("s", [{"schedule": presets.ddim(5, NS)}, {"schedule": bad}])
    with pytest.raises(ScheduleError, match="not valid JSON"):
        db.add_trial("s", "{not json")
    with pytest.raises(StorageError, match="unknown field 'colour'"):
        db.add_trial("s", presets.ddim(5, NS), colour="red")
    with pytest.raises(StorageError, match="no study named"):
        db.add_trial("nope", presets.ddim(5, NS))
    with pytest.raises(StorageError, match="metric 'x' is a object"):
        db.add_trials("s", [{"schedule": presets.ddim(5, NS)}, {"schedule": presets.ddim(6, NS),
                                                                "metrics": {"x": object()}}])
    assert _rows(db) == before
    # a failure inside the transaction, after the trial numbers were taken and the first row written
    # (a row that already holds number 2), rolls everything back
    with db.engine.begin() as conn:
        conn.execute(text("INSERT INTO trials (study_id, number, schedule, key, nfe, fidelity, bank, metrics, status, "
                          "created, attempts, max_attempts) SELECT study_id, 2, schedule, key, nfe, fidelity, bank, "
                          "metrics, status, created, attempts, max_attempts FROM trials WHERE number = 0"))
    before = _rows(db)
    with pytest.raises(StorageError, match="refused the change"):
        db.add_trials("s", [{"schedule": presets.ddim(5, NS)}, {"schedule": presets.ddim(6, NS)}])
    assert _rows(db) == before
    assert db.get_study("s").n_trials == 1


def test_non_finite_metrics_are_stored_as_null(db):
    db.create_study("s")
    t = db.add_trial("s", presets.ddim(4, NS), status="complete", metrics={"rmse": math.nan, "sw": math.inf})
    assert t.metrics == {"rmse": None, "sw": None} and t.score is None
    assert db.best("s", 4) is None


# ---- leases ----------------------------------------------------------------------------------------


def test_claim_heartbeat_finish(db):
    db.create_study("s")
    ids = db.add_trials("s", [{"schedule": presets.ddim(n, NS)} for n in (3, 4, 5)])
    t0 = datetime(2030, 1, 1)
    a = db.claim("s", "w1", now=t0)
    assert (a.id, a.status, a.worker, a.attempts, a.heartbeat, a.started) == (ids[0], "running", "w1", 1, t0, t0)
    assert db.heartbeat(a.id, "w1", now=t0 + timedelta(seconds=5))
    assert not db.heartbeat(a.id, "w2")
    with pytest.raises(LeaseLost, match="not running under worker 'w2'"):
        db.finish(a.id, metrics={"rmse": 1.0}, worker="w2")
    done = db.finish(a.id, metrics={"rmse": 0.5}, worker="w1", now=t0 + timedelta(seconds=12))
    assert (done.status, done.score, done.seconds, done.finished) == ("complete", 0.5, 12.0,
                                                                       t0 + timedelta(seconds=12))
    with pytest.raises(LeaseLost):
        db.finish(a.id, metrics={"rmse": 0.4}, worker="w1")
    b = db.claim("s", "w1")
    c = db.claim(None, "w2")
    assert [b.id, c.id] == ids[1:]
    assert db.claim("s", "w1") is None
    failed = db.finish(b.id, status="failed", error="NonFiniteError: step 3")
    pruned = db.finish(c.id, status="pruned")
    assert (failed.status, failed.error, pruned.status) == ("failed", "NonFiniteError: step 3", "pruned")


def test_reap_stale_requeues_then_fails(db):
    db.create_study("s")
    tid = db.add_trial("s", presets.ddim(4, NS), max_attempts=2).id
    live = db.add_trial("s", presets.ddim(5, NS)).id
    t0 = datetime(2030, 1, 1)
    assert db.claim("s", "dead-worker", now=t0).id == tid
    assert db.claim("s", "live-worker", now=t0).id == live
    assert db.reap_stale(60, now=t0 + timedelta(seconds=59)).requeued == []
    assert db.heartbeat(live, "live-worker", now=t0 + timedelta(seconds=50))
    r = db.reap_stale(60, now=t0 + timedelta(seconds=61))
    assert (r.requeued, r.failed) == ([tid], [])
    t = db.trial(tid)
    assert (t.status, t.attempts, t.worker, t.heartbeat) == ("queued", 1, None, None)
    assert "re-queued" in t.error and "dead-worker" in t.error and "attempt 1 of 2" in t.error
    assert db.trial(live).status == "running"  # its heartbeat is recent
    # the dead worker's late result is refused: the trial is no longer its
    with pytest.raises(LeaseLost):
        db.finish(tid, metrics={"rmse": 1.0}, worker="dead-worker")
    t1 = t0 + timedelta(seconds=100)
    again = db.claim("s", "second-worker", now=t1)
    assert (again.id, again.attempts) == (tid, 2)
    r = db.reap_stale(60, now=t1 + timedelta(seconds=61))
    assert (r.requeued, r.failed) == ([live], [tid])
    t = db.trial(tid)
    assert (t.status, t.attempts) == ("failed", 2)
    assert t.error.startswith("failed: worker 'second-worker' sent no heartbeat") and "no attempts left" in t.error
    assert db.trial(live).status == "queued"  # its first attempt; it had attempts left
    assert db.reap_stale(60, now=t1 + timedelta(days=1)) == r.__class__([], [])
    assert db.status_counts("s") == {"s": {"failed": 1, "queued": 1}}


def test_a_dispatching_driver_starts_given_trials_and_requeues_lost_ones(db):
    db.create_study("s")
    first, second = db.add_trials("s", [{"schedule": presets.ddim(4, NS), "max_attempts": 2},
                                        {"schedule": presets.ddim(5, NS)}])
    t = db.start(second, "actor-1")  # any queued trial, not only the oldest
    assert (t.status, t.worker, t.attempts) == ("running", "actor-1", 1)
    with pytest.raises(StorageError, match=f"trial {second} cannot start: it is running"):
        db.start(second, "actor-2")
    db.start(first, "actor-1")
    t = db.requeue(first, "actor-1 died")
    assert (t.status, t.worker, t.attempts) == ("queued", None, 1)
    assert t.error == "re-queued: attempt 1 of 2: actor-1 died"
    db.start(first, "actor-2")
    t = db.requeue(first, "actor-2 died")
    assert (t.status, t.attempts) == ("failed", 2)
    assert t.error == "failed: attempt 2 of 2: actor-2 died; no attempts left"
    with pytest.raises(LeaseLost):
        db.requeue(first, "again")
    assert db.finish(second, metrics={"rmse": 0.5}, worker="actor-1").score == 0.5


def test_a_drivers_starts_and_outcomes_are_recorded_together_or_not_at_all(db):
    db.create_study("s")
    a, b, c = db.add_trials("s", [{"schedule": presets.ddim(n, NS)} for n in (4, 5, 6)])
    db.start(a, "w")
    at = datetime(2026, 1, 2, 3, 4, 5)
    # b starts and finishes in the same write; a finishes
    db.record([(b, "w", at)], [{"trial_id": a, "metrics": {"rmse": 0.4}, "worker": "w"},
                               {"trial_id": b, "metrics": {"rmse": 0.3}, "finished": at + timedelta(seconds=2)}],
              request="r1")
    ta, tb = db.trial(a), db.trial(b)
    assert (ta.status, ta.score, tb.status, tb.score, tb.attempts) == ("complete", 0.4, "complete", 0.3, 1)
    assert tb.seconds == 2.0
    # the same request again does nothing
    db.record([(c, "w", at)], [], request="r1")
    assert db.trial(c).status == "queued"
    # an outcome for a trial that is not running: the start beside it is not written either
    with pytest.raises(LeaseLost):
        db.record([(c, "w", at)], [{"trial_id": a, "metrics": {"rmse": 0.1}}])
    assert (db.trial(c).status, db.trial(a).score) == ("queued", 0.4)
    with pytest.raises(StorageError, match="not final"):
        db.record([(c, "w", at)], [{"trial_id": c, "status": "running"}])
    assert db.trial(c).status == "queued"


def test_a_trial_started_and_finished_in_one_write_is_left_as_two_writes_leave_it(db):
    """record() writes a trial it starts and finishes at once in one update: the row is what the start and then the
    finish, written one after the other, leave."""
    at, now = datetime(2026, 1, 2, 3, 4, 5), datetime(2026, 1, 2, 3, 5, 0)
    outcomes = [{"metrics": {"rmse": 0.4, "nll": float("nan")}, "worker": "w"},
                {"status": "failed", "error": "NonFiniteError: step 2", "finished": at + timedelta(seconds=3)},
                {"metrics": {"rmse": 0.2}, "seconds": 1.5},
                {"metrics": {"rmse": 0.1}}]
    rows = {}
    for study, together in (("one", True), ("two", False)):
        ids = db.add_trials(study, [{"schedule": presets.ddim(n, NS)} for n in (4, 5, 6, 7, 8)],
                            create={"method": "s3"})
        db.record([(ids[3], "w", at - timedelta(seconds=10))])  # finished here, started before
        starts = [(tid, "w", at) for tid in ids[:3]] + [(ids[4], "w", at)]  # the last only starts
        finishes = [{**o, "trial_id": tid} for o, tid in zip(outcomes, ids)]
        if together:
            db.record(starts, finishes, now=now)
        else:
            db.record(starts, [], now=now)
            db.record([], finishes, now=now)
        rows[study] = [dataclasses.replace(t, id=0, study="", created=None, heartbeat=t.heartbeat if t.number == 4
                                           else None) for t in db.trials(study)]
    assert rows["one"] == rows["two"]
    assert [t.status for t in rows["one"]] == ["complete", "failed", "complete", "complete", "running"]
    assert [t.seconds for t in rows["one"][:4]] == [55.0, 3.0, 1.5, 65.0]
    # an outcome under another worker than the start beside it: the lease is lost, and nothing is written
    c = db.add_trials("one", [{"schedule": presets.ddim(9, NS)}])[0]
    with pytest.raises(LeaseLost, match="not running under worker 'v'"):
        db.record([(c, "w", at)], [{"trial_id": c, "metrics": {"rmse": 0.3}, "worker": "v"}])
    assert (db.trial(c).status, db.trial(c).attempts) == ("queued", 0)


def test_refreshed_records_are_what_reading_the_trials_again_gives(db):
    made = db.add_trials("s", [{"schedule": presets.ddim(n, NS), "info": {"batch": 0}, "max_attempts": 2}
                               for n in (4, 5, 6, 7, 8)], create={"method": "s3"}, records=True)
    a, b, c, d, e = (t.id for t in made)
    at = datetime(2026, 1, 2, 3, 4, 5)
    db.record([(a, "w", at), (b, "w", at), (c, "w", at), (d, "w", at)],
              [{"trial_id": a, "metrics": {"rmse": 0.4, "nll": float("nan")}, "worker": "w"},
               {"trial_id": b, "status": "failed", "error": "NonFiniteError: step 2",
                "finished": at + timedelta(seconds=3)}])
    db.requeue(c, "w died")
    db.heartbeat(d, "w", now=at + timedelta(seconds=1))
    fresh = db.refresh(made)
    assert fresh == db.trials("s", ids=[t.id for t in made])
    assert [t.status for t in fresh] == ["complete", "failed", "queued", "running", "queued"]
    assert fresh[4] == made[4]
    with pytest.raises(StorageError, match=f"no trial with id {e + 100}"):
        db.refresh([dataclasses.replace(made[0], id=e + 100)])


def test_keep_alive_heartbeats_until_the_lease_is_lost(db):
    db.create_study("s")
    tid = db.add_trial("s", presets.ddim(4, NS)).id
    db.claim("s", "w", now=datetime(2000, 1, 1))  # claimed long ago: stale unless heart-beaten
    with db.keep_alive(tid, "w", interval=0.02) as lost:
        deadline = time.time() + 10
        while db.trial(tid).heartbeat.year == 2000 and time.time() < deadline:
            time.sleep(0.01)
        assert db.trial(tid).heartbeat.year > 2000 and not lost.is_set()
        assert db.reap_stale(3600).requeued == []  # alive
        db.reap_stale(0, now=datetime(2100, 1, 1))  # the reaper takes it anyway
        assert lost.wait(10)
    assert db.trial(tid).status == "queued"


def test_concurrent_claims_hand_out_each_trial_once(db):
    db.create_study("s")
    ids = db.add_trials("s", [{"schedule": presets.ddim(4, NS)} for _ in range(30)])
    got: dict[str, list[int]] = {"a": [], "b": [], "c": []}

    def work(name):
        while (t := db.claim("s", name)) is not None:
            got[name].append(t.id)
            db.finish(t.id, metrics={"rmse": 1.0}, worker=name)

    threads = [threading.Thread(target=work, args=(n,)) for n in got]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    claimed = sorted(sum(got.values(), []))
    assert claimed == ids
    assert all(t.attempts == 1 and t.status == "complete" for t in db.trials("s"))


# ---- queries ---------------------------------------------------------------------------------------


def _brute_best(rows, nfe):
    ok = [r for r in rows if r["status"] == "complete" and r["score"] is not None and r["nfe"] == nfe]
    return min(ok, key=lambda r: (r["score"], r["id"]), default=None)


def test_best_per_nfe_and_pareto_match_brute_force(db):
    db.create_study("s")
    rng = random.Random(3)
    scheds = {n: presets.ddim(n, NS) for n in range(2, 9)}
    items = []
    for _ in range(300):
        nfe = rng.randint(2, 8)
        status = rng.choice(["complete"] * 6 + ["failed", "pruned", "queued"])
        score = round(rng.uniform(0, 1) / nfe, 2)  # rounding makes ties
        items.append({"schedule": scheds[nfe], "status": status, "metrics": {"rmse": score} if rng.random() > 0.05
                      else {}, "fidelity": rng.choice(["cheap", "full"])})
    ids = db.add_trials("s", items)
    rows = [{"id": i, "nfe": it["schedule"].nfe, "status": it["status"], "score": it["metrics"].get("rmse"),
             "fidelity": it["fidelity"]} for i, it in zip(ids, items)]
    for nfe in range(1, 10):
        want = _brute_best(rows, nfe)
        got = db.best("s", nfe)
        assert (got.id if got else None) == (want["id"] if want else None), nfe
        want_f = _brute_best([r for r in rows if r["fidelity"] == "full"], nfe)
        got_f = db.best("s", nfe, fidelity="full")
        assert (got_f.id if got_f else None) == (want_f["id"] if want_f else None), nfe
    per = db.best_per_nfe("s")
    assert [t.id for t in per] == [_brute_best(rows, n)["id"] for n in range(2, 9) if _brute_best(rows, n)]
    scored = [r for r in rows if r["status"] == "complete" and r["score"] is not None]
    dominated = {r["id"] for r in scored for o in scored if o["nfe"] <= r["nfe"] and o["score"] <= r["score"]
                 and (o["nfe"], o["score"]) != (r["nfe"], r["score"])}
    front_points = sorted({(r["nfe"], r["score"]) for r in scored if r["id"] not in dominated})
    assert [(t.nfe, t.score) for t in db.pareto("s")] == front_points
    assert all(t.id == _brute_best(rows, t.nfe)["id"] for t in db.pareto("s"))


def test_best_counts_the_studys_reporting_fidelity(db):
    """A search reports its held-out scores: every "best" picks the held-out trial though a train-bank trial
    scores lower at the same NFE; a named fidelity picks from that one; a study without one compares all."""
    rows = [(4, 0.10, "train"), (4, 0.12, "heldout"), (4, 0.15, "heldout"), (5, 0.08, "train"), (5, 0.13, "heldout")]
    for name, config in (("search", {"fidelity": "heldout"}), ("api", {})):
        db.create_study(name, config=config)
        db.add_trials(name, [{"schedule": presets.ddim(n, NS), "status": "complete", "metrics": {"rmse": r},
                              "fidelity": f} for n, r, f in rows])
    assert (db.get_study("search").reporting_fidelity, db.get_study("api").reporting_fidelity) == ("heldout", None)

    def scores(trials):
        return [(t.nfe, t.score) for t in trials]

    assert (db.best("search", 4).score, db.best("search", 5).score) == (0.12, 0.13)
    assert scores(db.best_per_nfe("search")) == [(4, 0.12), (5, 0.13)]
    assert scores(db.pareto("search")) == [(4, 0.12)]
    bf = best_frame(db, "search")
    assert (bf["score"].tolist(), bf["pareto"].tolist()) == ([0.12, 0.13], [True, False])
    assert scores(db.best_per_nfe("search", fidelity="train")) == [(4, 0.10), (5, 0.08)]
    assert db.best("search", 4, fidelity="train").score == 0.10
    assert best_frame(db, "search", fidelity="train")["score"].tolist() == [0.10, 0.08]
    assert scores(db.best_per_nfe("api")) == [(4, 0.10), (5, 0.08)] == scores(db.pareto("api"))
    sf = studies_frame(db).set_index("study")
    assert (sf.loc["search", "best_score"], sf.loc["api", "best_score"]) == (0.12, 0.08)


def test_trials_rebuild_a_search_state(db):
    db.create_study("s")
    db.add_trials("s", [{"schedule": presets.ddim(n, NS), "status": st, "metrics": {"rmse": 1 / n}}
                        for n, st in [(3, "complete"), (4, "failed"), (5, "complete"), (3, "queued")]])
    all_ = db.trials("s")
    assert [(t.number, t.nfe, t.status) for t in all_] == [(0, 3, "complete"), (1, 4, "failed"), (2, 5, "complete"),
                                                           (3, 3, "queued")]
    assert [t.number for t in db.trials("s", status="complete")] == [0, 2]
    assert [t.number for t in db.trials("s", status=["failed", "queued"], nfe=3)] == [3]
    assert [t.number for t in db.trials("s", key=all_[0].key)] == [0, 3]
    assert [t.number for t in db.trials("s", ids=[all_[3].id, all_[1].id])] == [1, 3]  # in number order
    assert [t.to_schedule() for t in all_[:1]] == [presets.ddim(3, NS)]
    assert db.count_trials("s") == 4 == db.count_trials()


def test_relaxation_rounds(db):
    db.create_study("sor", method="bandit")
    for r in range(3):
        db.add_relaxation("sor", r, 1.0 + 0.25 * r, arm=r, context={"n": 64, "rho": 0.9}, cost=10.0 - r,
                          iterations=100 - 10 * r, converged=True)
    rounds = db.relaxation_rounds("sor")
    assert [(x.round, x.arm, x.omega, x.cost, x.iterations) for x in rounds] == [
        (0, 0, 1.0, 10.0, 100), (1, 1, 1.25, 9.0, 90), (2, 2, 1.5, 8.0, 80)]
    assert rounds[0].context == {"n": 64, "rho": 0.9} and rounds[0].converged is True


def test_frames(db):
    db.create_study("s", method="sweep", problem=PROBLEM)
    db.create_study("empty")
    db.add_trials("s", [{"schedule": presets.ddim(n, NS), "status": "complete", "metrics": {"rmse": r, "sw": 2 * r},
                         "fidelity": "cheap"} for n, r in [(3, 0.5), (4, 0.6), (5, 0.2), (5, 0.1)]])
    db.add_trial("s", presets.ddim(6, NS))
    tf = trials_frame(db, study="s", schedules=True)
    assert list(tf["number"]) == [0, 1, 2, 3, 4]
    assert list(tf["status"]) == ["complete"] * 4 + ["queued"]
    assert tf["rmse"].tolist()[:4] == [0.5, 0.6, 0.2, 0.1] and tf["sw"].tolist()[3] == 0.2
    assert tf["name"].tolist()[0] == "ddim" and tf["schedule"][0]["nfe"] == 3
    sf = studies_frame(db).set_index("study")
    assert sf.loc["s", "trials"] == 5 and sf.loc["s", "complete"] == 4 and sf.loc["s", "queued"] == 1
    assert sf.loc["s", "best_score"] == 0.1 and sf.loc["s", "nfes"] == [3, 4, 5]
    assert sf.loc["s", "problem"] == "toy" and sf.loc["empty", "trials"] == 0
    bf = best_frame(db, "s")
    assert bf["nfe"].tolist() == [3, 4, 5]
    assert bf["score"].tolist() == [0.5, 0.6, 0.1]
    assert bf["pareto"].tolist() == [True, False, True]
    assert bf["number"].tolist() == [0, 1, 3]


def test_a_database_with_tables_of_another_tool_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 'other.db'}"
    with create_engine(url).begin() as conn:
        conn.execute(text("CREATE TABLE trials (id INTEGER PRIMARY KEY, name TEXT)"))
    with pytest.raises(StorageError, match="already has tables named trials that steptune's migrations did not make"):
        connect(url, create=True)


def test_a_schema_another_process_made_while_this_one_looked_is_used(tmp_path, monkeypatch):
    """Two runs starting on a new database at once: the second read no revision, then found the tables the
    first had just committed. It takes the schema instead of refusing it as another tool's."""
    from steptune.storage.db import Storage

    url = f"sqlite:///{tmp_path / 'new.db'}"
    connect(url, create=True).close()  # the first process, done between the second's two looks
    real, looks = Storage.revision, []

    def before_the_first_committed(self):
        looks.append(1)
        return None if len(looks) == 1 else real(self)

    monkeypatch.setattr(Storage, "revision", before_the_first_committed)
    db = connect(url, create=True)
    db.create_study("s")
    assert db.get_study("s").n_trials == 0 and len(looks) >= 2
    db.close()


def test_a_sqlite_file_that_cannot_be_written_is_refused_at_once_not_waited_for(tmp_path):
    from steptune.storage.db import Retrying

    path = tmp_path / "x.db"
    with connect(f"sqlite:///{path}") as db:
        db.create_study("s", method="s3")
    waited = []
    with connect(f"sqlite:///file:{path}?mode=ro&uri=true") as ro:
        with pytest.raises(StorageError, match="attempt to write a readonly database; the file, or the folder"):
            Retrying(ro, 300, say=waited.append).create_study("t", method="s3")
        assert [s.name for s in ro.studies()] == ["s"]
    assert not waited


def test_reading_an_empty_file_refuses_it_and_leaves_it_empty(tmp_path):
    path = tmp_path / "empty.db"
    path.write_bytes(b"")
    with pytest.raises(StorageError, match="empty.db is empty, not a steptune database"):
        connect(f"sqlite:///{path}", must_exist=True)
    assert path.stat().st_size == 0


def test_only_an_empty_study_its_driver_holds_is_dropped(db):
    """What a failed run made is dropped only while it holds nothing and that run holds it; otherwise it stays as
    it was."""
    sched = presets.ddim(4, noise.VPLinear())
    for name in ("empty", "other", "filled", "free"):
        db.create_study(name, kind="search", method="s3")
    for name in ("empty", "other", "filled"):
        db.claim_driver(name, "a" if name != "other" else "b", 120)
    db.add_trials("filled", [{"schedule": sched}])
    assert not db.drop_unused_study("other", "a")  # another run holds it
    assert not db.drop_unused_study("filled", "a")  # it has a trial
    assert not db.drop_unused_study("free", "a")  # nobody holds it
    assert db.drop_unused_study("empty", "a")
    assert [s.name for s in db.studies()] == ["other", "filled", "free"]
    assert len(db.trials("filled")) == 1 and db.get_study("other").config["driver"]["id"] == "b"


def test_a_study_is_deleted_whole_and_alone_and_not_while_a_run_holds_it(db):
    from steptune.storage.db import DriverBusy
    from steptune.storage.schema import utcnow

    for name in ("gone", "kept"):
        db.add_trials(name, [{"schedule": presets.ddim(n, NS), "status": "complete", "metrics": {"rmse": 0.1 * n}}
                             for n in (4, 5, 6)], create={"method": "s3", "problem": PROBLEM})
        db.add_relaxation(name, 0, 1.5)
    before = _rows(db)
    db.claim_driver("gone", "host:1", lease_seconds=120)
    with pytest.raises(DriverBusy):  # a live run holds it: nothing goes
        db.delete_study("gone", 120)
    assert _rows(db) == before
    later = utcnow() + timedelta(seconds=121)
    assert db.delete_study("gone", 120, now=later) == (3, 1)  # its driver's lease ran out
    assert [s.name for s in db.studies()] == ["kept"] and len(db.trials("kept")) == 3
    after = _rows(db)
    assert (after["trials"], after["relaxation_records"], after["studies"]) == \
        (before["trials"] - 3, before["relaxation_records"] - 1, before["studies"] - 1)
    with pytest.raises(StorageError, match="no study named 'gone'"):
        db.delete_study("gone", 120)
