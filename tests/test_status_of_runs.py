"""`steptune status` says whether a run is on a study and what it is doing, from the database alone: searching
with an ETA, still confirming or refining after its search, stopped, or killed without letting go."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

from runner_jobs import job_text, run_job, write_job

from steptune.backends import LocalBackend
from steptune.cli.run import _run_state, study_status
from steptune.jobs import load_job
from steptune.runner import Runner
from steptune.storage import connect

STEPTUNE = Path(sys.executable).parent / "steptune"


def _state(url: str, study: str) -> str:
    with connect(url) as db:  # a connection of its own, as a status command in another shell has
        return _run_state(study_status(db, study))


def _run_refining(tmp_path, study: str, url: str, as_it_refines, progress=None):
    """A tiny job with a ``[refine]`` stage run in this process into ``url``; ``as_it_refines(runner)`` is called as
    its first refinement starts. Returns the job."""
    path = tmp_path / f"{study}.toml"
    path.write_text(job_text(study, tmp_path / "cache", evaluations=6, nfe="[3]")
                    + "\n[refine]\niters = 10\nsamples = 32\nneighbours = false\n")
    job = load_job(path)
    backend = LocalBackend(job.problem, job.evaluation, job.backend)
    with connect(url) as db:
        runner = Runner(job, db, backend, progress=progress)
        said, first = runner.say, [True]

        def say(msg: str) -> None:
            if msg.startswith("refining NFE") and first:
                first.clear()
                as_it_refines(runner)
            said(msg)

        runner.say = say
        try:
            runner.run()
        finally:
            backend.close()
    return job


def test_status_names_the_phase_of_the_run_on_the_study_and_that_it_goes_on_after_its_search(tmp_path):
    driver = f"driver {socket.gethostname()}:{os.getpid()}"
    seen: dict[str, str] = {}
    url = f"sqlite:///{tmp_path / 'p.db'}"
    _run_refining(tmp_path, "phases", url, lambda runner: seen.setdefault("refine", _state(url, "phases")),
                  progress=lambda s: s["phase"] == "search" and s["done"] >= 2
                  and seen.setdefault("search", _state(url, "phases")))
    beat = r", heartbeat \d+ s ago\)"  # seconds that a loaded machine may make more than none
    assert re.fullmatch(r"ETA .*; searching \(" + re.escape(driver) + beat, seen["search"]), seen
    assert re.fullmatch(re.escape(f"search finished; the run goes on, refining ({driver}") + beat, seen["refine"]), seen
    assert _state(url, "phases") == "finished"  # the run let go of the study as it ended


def test_a_stopped_run_and_a_killed_run_leave_no_run_on_the_study(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    stopped = write_job(tmp_path / "stopped.toml", "stopped", tmp_path / "cache", evaluations=40, nfe="[3]")
    run_job(load_job(stopped), url, stop_after=4)  # Ctrl-C: the run lets go of the study
    assert _state(url, "stopped") == ("stopped: the last run was interrupted while searching; run its job or search "
                                      "again to resume")

    killed = write_job(tmp_path / "killed.toml", "killed", tmp_path / "cache", evaluations=100000, nfe="[3]")
    env = {**os.environ, "STEPTUNE_LOG_INTERVAL": "0"}
    proc = subprocess.Popen([str(STEPTUNE), "run", str(killed), "--db", url], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    try:
        for line in proc.stdout:  # its search has begun
            if "] search " in line:
                break
        live = _state(url, "killed")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert re.search(re.escape(f"; searching (driver {socket.gethostname()}:{proc.pid}") + r", heartbeat \d+ s ago\)$",
                     live), live
    state = _state(url, "killed")
    assert state.startswith(f"no run is on it: the last one (driver {socket.gethostname()}:{proc.pid}, last "
                            "heartbeat "), state
    assert state.endswith("ago) ended without letting go; run its job or search again to resume"), state


def test_a_run_stopped_while_it_refines_is_not_called_finished(tmp_path):
    """Its search is done, but not its refinement: status says where the last run stopped until a run ends it."""
    url = f"sqlite:///{tmp_path / 'h.db'}"
    job = _run_refining(tmp_path, "halfway", url, lambda runner: runner.interrupt())  # Ctrl-C as it refines
    assert _state(url, "halfway") == ("search finished; the last run was interrupted while refining: run its job "
                                      "or search again to go on")
    run_job(job, url)
    assert _state(url, "halfway") == "finished"


def test_status_counts_the_evaluators_busy_in_a_live_in_process_run(tmp_path):
    """In-process a trial is stored running and finished in one write, so the run's heartbeat says how many of its
    evaluators are busy, and status and the dashboard read that while the run is alive."""
    from steptune.dashboard.queries import history

    url = f"sqlite:///{tmp_path / 'b.db'}"
    job = load_job(write_job(tmp_path / "busy.toml", "busy", tmp_path / "cache", evaluations=6, nfe="[3]"))
    backend = LocalBackend(job.problem, job.evaluation, job.backend)
    seen = {}
    with connect(url) as db:
        runner = Runner(job, db, backend)

        def progress(s):
            if s["phase"] == "search" and s["done"] >= 2 and not seen:
                runner._heartbeat()  # as the lease thread beats: the evaluation just reported is still in flight
                with connect(url) as other:
                    info = study_status(other, "busy")
                    page = history(other, "busy")  # the dashboard's history view says the same
                seen.update(busy=info["busy_evaluators"], running=info["running"], page=page["evaluators"]["busy"])

        runner.progress = progress
        try:
            runner.run()
        finally:
            backend.close()
        after = study_status(db, "busy")
    assert seen == {"busy": 1, "running": 0, "page": 1}
    assert after["busy_evaluators"] == 0 and after["driver"] is None  # the run let go as it ended
    assert after["per_minute"] is None and after["eta_seconds"] is None  # a rate is a running search's


def test_a_search_with_nothing_new_to_try_ends_finished_not_stopped(tmp_path, capsys):
    """At NFE 1 a method soon runs out of schedules it has not tried: the run says so and ends; status calls the
    study finished (it said 'stopped ... run the job again to resume', which searched nothing new), and its
    confirmations are of the schedules there are, fewer than asked."""
    from runner_jobs import run_cli

    url = f"sqlite:///{tmp_path / 'x.db'}"
    args = ["search", "--problem", "gmm-2d", "--nfe", "1", "--budget", "5", "--method", "tpe", "--cheap-samples", "32",
            "--heldout-samples", "64", "--confirm", "3", "--study", "one", "--db", url, "--cache",
            str(tmp_path / "cache"), "--out", str(tmp_path)]
    code, _, err = run_cli(args, capsys)
    with connect(url) as db:
        info = study_status(db, "one")
        done = info["search_done"]
        assert db.get_study("one").config["search_exhausted"] == done
    assert code == 0 and 0 < done < 5, err
    assert (f"the tpe search has no new schedule to try at NFE 1 after {done} evaluations: it has tried every one it "
            f"can make there, so the budget's other {5 - done} are not spent") in err, err
    assert info["search_exhausted"] and info["finished"] and info["confirmed"] == min(done, 3)
    summary = json.loads((tmp_path / "one.json").read_text())
    assert summary["search_exhausted"] is True and summary["n_evals"] == done
    assert _state(url, "one") == "finished"
    code, out, _ = run_cli(["status", "--study", "one", "--db", url], capsys)
    assert code == 0 and "the search tried every schedule its method can make at these NFEs" in out, out
    assert "rate" not in out.splitlines()[0] and out.splitlines()[0].endswith("finished"), out  # no run is on it
