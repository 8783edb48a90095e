"""An evaluator lost mid-evaluation on Ray. backend.trial_timeout: an evaluation that never returns is cut off, its
evaluator replaced, its trial re-queued and finished by another evaluator, and the rest of the job runs to the end;
with no attempts left the trial fails with an error naming the timeout. A crash (the evaluator's process ends): the
trial it was running spends an attempt, the calls queued behind it move without spending one."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from runner_jobs import run_job

from steptune.backends import LocalBackend, RayBackend
from steptune.cli.run import study_status
from steptune.jobs import JobError, job_from_dict
from steptune.runner import Runner
from steptune.storage import connect

TESTS = str(Path(__file__).resolve().parent)


def _fault(monkeypatch, variable: str, marker):
    """The marker file whose creation makes one model call go wrong; the actors get it (and this folder, for the
    model's module) from the environment of the local Ray instance the backend starts."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        ray.shutdown()
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv(variable, str(marker))
    return marker


@pytest.fixture
def hang(tmp_path, monkeypatch):
    return _fault(monkeypatch, "STEPTUNE_TEST_HANG", tmp_path / "hung")


@pytest.fixture
def crash(tmp_path, monkeypatch):
    return _fault(monkeypatch, "STEPTUNE_TEST_CRASH", tmp_path / "crashed")


def _job(study: str, cache, evaluations: int = 8, max_attempts: int = 3, model: str = "hanging_gmm",
         trial_timeout: str | None = "5s", in_flight: int = 1):
    return job_from_dict({
        "study": study, "seed": 1,
        "problem": {"model": f"faulty_model:{model}"},
        "search": {"method": "s3", "nfe": [3]},
        "evaluation": {"cheap_samples": 16, "train_samples": 16, "heldout_samples": 16, "confirm": 0,
                       "baseline": False, "cache": str(cache)},
        "budget": {"evaluations": evaluations},
        "backend": {"kind": "ray", "workers": 2, "num_cpus": 0.5, "in_flight": in_flight,
                    "trial_timeout": trial_timeout, "max_attempts": max_attempts},
    })


def _first_workers(backend) -> list[str]:
    """The names the backend's evaluators had when it started (a replaced or restarted one is renamed)."""
    first, backend_start = [], backend.start

    def start():
        backend_start()
        first.extend(backend.workers)

    backend.start = start
    return first


def test_a_hung_evaluation_is_cut_off_and_its_trial_finished_by_another_evaluator(hang, tmp_path):
    job = _job("hung", tmp_path / "cache")
    events = []
    backend = RayBackend(job.problem, job.evaluation, job.backend, on_event=events.append)
    first = _first_workers(backend)
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    res, _ = run_job(job, url, backend)
    assert hang.exists()  # one evaluation did hang
    with connect(url) as db:
        trials, config = db.trials("hung"), db.get_study("hung").config
    assert res.status == "complete" and len(trials) == 8  # the whole budget, each candidate stored once
    assert all(t.status == "complete" and t.metrics.get("rmse") is not None for t in trials)
    timed_out = [t for t in trials if t.error and "timed out after 5 s" in t.error]
    assert len(timed_out) == 1
    t = timed_out[0]
    assert t.attempts == 2 and "backend.trial_timeout" in t.error
    hung_on = next(w for w in first if w in t.error)  # the evaluator it hung on, named in the note
    assert not t.worker.endswith("/" + hung_on)  # finished by another evaluator process
    # nothing else was evaluated twice; one that sat queued behind the hung one was moved without losing an attempt
    assert all(other.attempts == 1 for other in trials if other is not t)
    moved = [o for o in trials if o.error and f"not started: queued on evaluator {hung_on}" in o.error]
    assert len(moved) == 1 and moved[0].status == "complete"  # the call queued behind it (two per evaluator)
    assert events == [f"evaluator {hung_on} ran past backend.trial_timeout (5 s); replacing it"]
    assert config["evaluators"]["trial_timeout"] == 5.0


def test_a_call_of_several_that_times_out_charges_none_of_them_and_sends_each_alone(hang, tmp_path):
    """Which candidate of a call hung is unknown (a call's results come back together): every one of them gets its
    attempt back and goes again in a call of its own, so one that hangs again is cut off by itself."""
    job = _job("hung-call", tmp_path / "cache", in_flight=2)
    events = []
    backend = RayBackend(job.problem, job.evaluation, job.backend, on_event=events.append)
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    res, _ = run_job(job, url, backend)
    assert hang.exists()  # one evaluation did hang
    with connect(url) as db:
        trials = db.trials("hung-call")
    assert res.status == "complete" and len(trials) == 8
    assert all(t.status == "complete" and t.attempts == 1 for t in trials)  # no attempt spent on the timeout
    calls = [re.search(r"in a call of (\d+) that timed out after (\d+) s", t.error or "") for t in trials]
    sizes = {int(m[1]) for m in calls if m}
    assert len(sizes) == 1 and sum(m is not None for m in calls) == sizes.pop() >= 2
    (size, limit) = next((int(m[1]), int(m[2])) for m in calls if m)
    assert limit == 5 * size and events[0].endswith(f"ran past backend.trial_timeout ({limit} s); replacing it")


def _run_with_one_attempt(study: str, tmp_path, **kw):
    """A 4-evaluation job with ``max_attempts = 1`` on the Ray backend: its result, trials and failed trials."""
    job = _job(study, tmp_path / "cache", evaluations=4, max_attempts=1, **kw)
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    res, _ = run_job(job, url, RayBackend(job.problem, job.evaluation, job.backend))
    with connect(url) as db:
        trials = db.trials(study)
    return res, trials, [t for t in trials if t.status == "failed"]


def test_a_trial_that_times_out_on_its_last_attempt_fails_naming_the_timeout(hang, tmp_path):
    res, trials, failed = _run_with_one_attempt("hung-once", tmp_path)
    assert res.status == "complete" and len(trials) == 4
    assert len(failed) == 1 and failed[0].error.startswith("failed: attempt 1 of 1: timed out after 5 s")
    assert "no attempts left" in failed[0].error
    assert all(t.status == "complete" and t.attempts == 1 for t in trials if t not in failed)


def test_a_crashed_evaluator_costs_an_attempt_only_to_the_trial_it_was_running(crash, tmp_path):
    """The model ends its evaluator's process in the middle of one evaluation (no timeout set): that trial is
    re-queued having spent an attempt and finished elsewhere; the call queued behind it on the same evaluator moves
    to the queue without spending one, and nothing is evaluated twice."""
    job = _job("crashed", tmp_path / "cache", model="crashing_gmm", trial_timeout=None)
    events = []
    backend = RayBackend(job.problem, job.evaluation, job.backend, on_event=events.append)
    first = _first_workers(backend)
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    res, _ = run_job(job, url, backend)
    assert crash.exists()  # one evaluation did end its process
    with connect(url) as db:
        trials, status = db.trials("crashed"), study_status(db, "crashed")
    assert res.status == "complete" and len(trials) == 8
    assert all(t.status == "complete" and t.metrics.get("rmse") is not None for t in trials)
    crashed = [t for t in trials if t.attempts > 1]
    assert len(crashed) == 1 and all(t.attempts == 1 for t in trials if t not in crashed)
    t = crashed[0]
    died_on = next(w for w in first if w in t.error)
    on, died = re.escape(died_on), r"died \(Actor(Died|Unavailable)Error\)"  # Ray's word for it depends on timing
    assert re.fullmatch(f"re-queued: attempt 1 of 3: evaluator {on} {died}", t.error)
    assert not t.worker.endswith("/" + died_on)  # finished by another evaluator process
    moved = [o for o in trials if o.error and o.error.startswith("re-queued: not started: ")]
    assert len(moved) == 1 and re.fullmatch(f"re-queued: not started: queued on evaluator {on}, which {died}",
                                            moved[0].error)
    assert moved[0].attempts == 1 and not moved[0].worker.endswith("/" + died_on)
    assert len(events) == 1 and re.fullmatch(f"evaluator {on} {died}", events[0])
    assert res.retried == 1 and status["retried"] == 1  # the moved one was not retried: it never began


def test_with_one_attempt_only_the_trial_that_crashed_its_evaluator_fails(crash, tmp_path):
    """max_attempts = 1: the crashed trial fails naming the death; the one queued behind it still completes."""
    res, trials, failed = _run_with_one_attempt("crashed-once", tmp_path, model="crashing_gmm", trial_timeout=None)
    assert crash.exists() and res.status == "complete" and len(trials) == 4
    assert len(failed) == 1 and failed[0].error.startswith("failed: attempt 1 of 1: evaluator ray-")
    assert re.search(r"died \(Actor(Died|Unavailable)Error\); no attempts left$", failed[0].error)
    others = [t for t in trials if t not in failed]
    assert all(t.status == "complete" and t.attempts == 1 for t in others)
    assert sum(1 for t in others if t.error and "not started: queued on evaluator" in t.error) == 1


def test_trial_timeout_is_a_duration_checked_like_the_other_keys():
    base = {"study": "s", "problem": {"name": "gmm-2d"}, "search": {"method": "s3", "nfe": [3]}}
    assert job_from_dict({**base, "backend": {"trial_timeout": "10m"}}).backend.trial_timeout == 600.0
    assert job_from_dict({**base, "backend": {"trial_timeout": 90}}).backend.trial_timeout == 90.0
    assert job_from_dict(base).backend.trial_timeout is None
    for bad in (True, "soon", 0, -5):
        with pytest.raises(JobError, match="backend.trial_timeout"):
            job_from_dict({**base, "backend": {"trial_timeout": bad}})


def test_in_process_the_run_says_once_that_the_timeout_is_not_applied(tmp_path):
    job = job_from_dict({**_job("local", tmp_path / "cache", evaluations=4).model_dump(),
                         "problem": {"name": "gmm-2d"}, "backend": {"kind": "local", "trial_timeout": 5}})
    said, backend = [], LocalBackend(job.problem, job.evaluation, job.backend)
    with connect(f"sqlite:///{tmp_path / 'db.sqlite'}") as db:
        try:
            res = Runner(job, db, backend, say=said.append).run()
        finally:
            backend.close()
    assert res.status == "complete" and res.evaluations == 4
    assert [m for m in said if "trial_timeout" in m] == [
        'backend.trial_timeout is not applied in-process (an evaluation cannot be cut off in the driver itself); '
        'use kind = "ray" to have a hung evaluation\'s evaluator replaced']
