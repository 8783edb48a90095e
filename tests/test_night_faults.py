"""Faults of the night, on a real PostgreSQL server (STEPTUNE_TEST_PG_URL; skipped without it): the server
restarted or stopped under a running job, and the same job started twice."""

import glob
import os
import shlex
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from runner_jobs import job_text, outcome, run_job
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool
from test_storage_db import _pg_base_url, fresh_pg_schema

from steptune.jobs import JobError, job_from_dict, load_job
from steptune.storage import connect
from steptune.storage.db import Retrying

STEPTUNE = Path(sys.executable).parent / "steptune"
EVALUATIONS, NFE = 40, "[3, 4]"  # a search of 80 evaluations: long enough to pull the server away under it


class Server:
    """The test server, stopped and started with its own pg_ctl (as the postgres user when run as root)."""

    def __init__(self, base: str):
        self.base = base
        engine = create_engine(base, poolclass=NullPool)
        with engine.connect() as conn:
            self.data = conn.execute(text("SHOW data_directory")).scalar()
        self.pg_ctl = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))[-1]
        opts = shlex.split(Path(self.data, "postmaster.opts").read_text())[1:]  # the options it was started with
        i = opts.index("-D")
        self.options = shlex.join(opts[:i] + opts[i + 2:])

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [self.pg_ctl, "-D", self.data, "-l", str(Path(self.data, "server.log")), "-w", "-s", *args]
        if os.getuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, cwd="/", capture_output=True, text=True, check=check, timeout=60)

    def running(self) -> bool:
        return self.ctl("status", check=False).returncode == 0

    def start(self) -> None:
        self.ctl("-o", self.options, "start")


@pytest.fixture
def server():
    srv = Server(_pg_base_url())
    try:
        yield srv
    finally:
        if not srv.running():
            srv.start()


@pytest.fixture
def pg_url(server):
    """A URL to an empty schema on the server (dropped afterwards, over a fresh connection)."""
    schema = f"t_{uuid.uuid4().hex[:16]}"
    admin = create_engine(server.base, poolclass=NullPool)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    try:
        yield make_url(server.base).update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(
            hide_password=False)
    finally:
        if not server.running():
            server.start()
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))


def write_job(path: Path, study: str, cache: Path, retry: str = "5m") -> Path:
    path.write_text(job_text(study, cache, evaluations=EVALUATIONS, nfe=NFE) + f'\n[storage]\nretry = "{retry}"\n')
    return path


def start(job: Path, url: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "STEPTUNE_LOG_INTERVAL": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([str(STEPTUNE), "run", str(job), "--db", url], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)


def wait_for_search_rows(url: str, study: str, n: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    """Until ``n`` search evaluations of the study are stored (the job must still be running)."""
    engine = create_engine(url, poolclass=NullPool)
    q = text("SELECT count(*) FROM trials JOIN studies ON studies.id = trials.study_id WHERE studies.name = :s "
             "AND trials.fidelity = 'train' AND trials.status = 'complete'")
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, proc.communicate()
        try:
            with engine.connect() as conn:
                if conn.execute(q, {"s": study}).scalar() >= n:
                    return
        except Exception:  # the study's tables are not made yet
            pass
        time.sleep(0.05)
    raise AssertionError(f"fewer than {n} search evaluations stored after {timeout} s")


def run_and_pull_the_server(server, action: str, job: Path, url: str, study: str, cwd: Path) -> tuple[int, str]:
    """Run the job and, once it has stored some search evaluations, ``action`` (stop, restart) the server;
    the job's exit status and stderr."""
    proc = start(job, url, cwd)
    try:
        wait_for_search_rows(url, study, 10, proc)
        server.ctl("-m", "fast", action)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return proc.returncode, err


def run_through_a_restart(server, job: Path, url: str, study: str, cwd: Path) -> tuple[int, str]:
    """Run the job; once it has stored some search evaluations, stop the server, and start it again as soon as
    the job says it met the outage (so it does, however fast it runs); the job's exit status and stderr."""
    proc = start(job, url, cwd)
    seen = []
    try:
        wait_for_search_rows(url, study, 10, proc)
        server.ctl("-m", "fast", "stop")
        for line in proc.stderr:
            seen.append(line)
            if "unreachable" in line:
                break
        server.start()
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return proc.returncode, "".join(seen) + err


def reference(tmp_path: Path, study: str) -> list[tuple]:
    """The same job run uninterrupted, into SQLite."""
    url = f"sqlite:///{tmp_path / 'reference.db'}"
    run_job(load_job(write_job(tmp_path / "ref.toml", study, tmp_path / "cache")), url)
    with connect(url) as db:
        return outcome(db, study)


def search_trials(url: str, study: str):
    with connect(url) as db:
        return [t for t in db.trials(study) if t.fidelity == "train"]


def test_a_server_restart_mid_job_is_ridden_out_and_every_trial_is_stored_once(server, pg_url, tmp_path):
    job = write_job(tmp_path / "job.toml", "restart", tmp_path / "cache")
    code, err = run_through_a_restart(server, job, pg_url, "restart", tmp_path)
    assert code == 0, err
    assert "unreachable" in err and "retrying" in err, err  # it did meet the restart
    rows = search_trials(pg_url, "restart")
    assert len(rows) == EVALUATIONS * 2 and all(t.status == "complete" and t.attempts == 1 for t in rows)
    assert len({(t.info["batch"], t.key) for t in rows}) == len(rows)
    with connect(pg_url) as db:
        assert outcome(db, "restart") == reference(tmp_path, "restart")


def test_a_database_away_longer_than_the_retry_time_stops_the_job_in_one_line_and_it_resumes(
        server, pg_url, tmp_path):
    job = write_job(tmp_path / "job.toml", "outage", tmp_path / "cache", retry="2s")
    code, err = run_and_pull_the_server(server, "stop", job, pg_url, "outage", tmp_path)
    assert code == 2, err
    last = err.strip().splitlines()[-1]
    host = make_url(pg_url).host
    assert last.startswith("error: database ") and host in last and "did not answer for 2 s" in last, err
    assert "run the same command again" in last
    assert not any("Traceback" in ln for ln in err.splitlines()), err
    server.start()
    again = subprocess.run([str(STEPTUNE), "run", str(job), "--db", pg_url], capture_output=True, text=True,
                           cwd=tmp_path, timeout=120)
    assert again.returncode == 0, again.stderr
    assert "resuming study 'outage'" in again.stderr
    with connect(pg_url) as db:
        assert outcome(db, "outage") == reference(tmp_path, "outage")


def test_the_same_job_started_twice_runs_once(pg_url, tmp_path):
    job = write_job(tmp_path / "job.toml", "twice", tmp_path / "cache")
    procs = [start(job, pg_url, tmp_path) for _ in range(2)]
    try:
        results = [(p, *p.communicate(timeout=120)) for p in procs]
    finally:
        for p in procs:
            p.kill()
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], [r[2] for r in results]
    refused, ran = sorted(procs, key=lambda p: -p.returncode)
    err = next(e for p, _, e in results if p is refused).strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {job}: study 'twice' is being run by another driver"), err
    assert f"process {ran.pid}," in err[0] and "heartbeat" in err[0], err
    rows = search_trials(pg_url, "twice")
    assert len(rows) == EVALUATIONS * 2 and all(t.status == "complete" and t.attempts == 1 for t in rows)


def test_the_retry_time_is_a_duration_checked_like_the_other_keys(tmp_path):
    base = {"study": "s", "problem": {"name": "gmm-2d"}, "search": {"method": "s3", "nfe": [3]}}
    assert job_from_dict({**base, "storage": {"retry": "5m"}}).storage.retry == 300.0
    assert job_from_dict(base).storage.retry == 300.0
    for bad in (True, "soon", 0):
        with pytest.raises(JobError, match="storage.retry"):
            job_from_dict({**base, "storage": {"retry": bad}})


def test_a_driver_with_a_stale_heartbeat_or_a_dead_process_is_taken_over(tmp_path):
    from datetime import timedelta

    from steptune.storage.db import DriverBusy
    from steptune.storage.schema import utcnow

    with connect(f"sqlite:///{tmp_path / 'd.db'}") as db:
        db.create_study("s")
        db.claim_driver("s", "elsewhere:11", 120, now=utcnow() - timedelta(seconds=121))
        db.claim_driver("s", "here:22", 120)  # the other's heartbeat is stale
        with pytest.raises(DriverBusy, match=r"host here, process 22, heartbeat \d+ s ago"):
            db.claim_driver("s", "elsewhere:33", 120)
        assert not db.beat_driver("s", "elsewhere:33")
        db.claim_driver("s", "elsewhere:33", 120, gone=lambda driver: driver == "here:22")  # its process is gone
        assert not db.beat_driver("s", "here:22") and db.beat_driver("s", "elsewhere:33")
        db.release_driver("s", "elsewhere:33")
        db.claim_driver("s", "here:44", 120)


class AnswerLost:
    """A real storage whose next write commits and then loses its answer with the connection, as when the
    server restarts between its commit and its reply."""

    def __init__(self, storage):
        self.storage, self.lose = storage, set()

    def __getattr__(self, name):
        attr = getattr(self.storage, name)

        def call(*args, **kwargs):
            out = attr(*args, **kwargs)
            if name in self.lose:
                self.lose.discard(name)
                raise OperationalError("COMMIT", {}, Exception("server closed the connection unexpectedly"))
            return out
        return call if callable(attr) else attr


@pytest.fixture(params=["sqlite", "postgresql"])
def any_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'lost.db'}"
    else:
        _pg_base_url()
        with fresh_pg_schema() as url:
            yield url


def test_a_write_whose_answer_was_lost_is_done_once_when_sent_again(any_url):
    from steptune.space import presets
    from steptune.space.noise import VPLinear

    sched = presets.build("ddim", 4, VPLinear())
    heard = []
    with connect(any_url) as db:
        db.create_study("s")
        flaky = AnswerLost(db)
        store = Retrying(flaky, 30, heard.append)
        flaky.lose.add("add_trials")
        ids = store.add_trials("s", [{"schedule": sched, "n_samples": 8}] * 3)
        assert len(ids) == 3 and [t.id for t in db.trials("s")] == ids
        flaky.lose.add("start")
        assert store.start(ids[0], "w").status == "running"
        flaky.lose.add("requeue")
        assert store.requeue(ids[0], "its worker was lost").status == "queued"
        store.start(ids[0], "w")
        flaky.lose.add("finish")
        row = store.finish(ids[0], metrics={"rmse": 0.5}, worker="w")
        assert (row.status, row.attempts, row.score) == ("complete", 2, 0.5)
        assert [t.status for t in db.trials("s")] == ["complete", "queued", "queued"]
        assert len(heard) == 4 and all("unreachable" in h for h in heard)
        assert db.forget_requests(timedelta(0)) == 5 and db.forget_requests(timedelta(0)) == 0
