"""The in-process backend asks its sink to write before an evaluation only after a slow one (or before the first)."""

from __future__ import annotations

import gc
import math

import pytest
from runner_jobs import job_text, run_job

from steptune.backends import LocalBackend, Task
from steptune.jobs import load_job
from steptune.space import presets


class Recorder:
    """A sink that notes, in order, each start, each finish and each write asked for."""

    def __init__(self):
        self.events = []

    def start(self, dispatched):
        self.events += [("start", t.trial_id) for t, _ in dispatched]

    def done(self, finished):
        self.events += [("done", t.trial_id) for t, _ in finished]

    def flush(self):
        self.events.append(("flush",))

    def lost(self, task, worker, reason, began=True):
        return True

    def stopping(self):
        return False


@pytest.mark.parametrize("slow", [0.0, math.inf])
def test_writes_before_an_evaluation_follow_how_long_the_one_before_took(tmp_path, slow):
    path = tmp_path / "job.toml"
    path.write_text(job_text("writes", tmp_path / "cache"))
    job = load_job(path)
    backend = LocalBackend(job.problem, job.evaluation, job.backend)
    backend.SLOW_SECONDS = slow  # 0: every evaluation counts as slow; inf: none does
    backend.start()
    problem = backend.worker.problem
    schedule = presets.ddim(4, problem.noise, t_start=problem.t_start, t_end=problem.t_end).to_dict()
    backend.submit([Task(i, schedule, "train", 8) for i in range(3)])
    sink = Recorder()
    backend.pump(sink)
    backend.close()
    if slow == 0.0:  # stored as running before each one runs
        expected = [("start", 0), ("flush",), ("done", 0), ("start", 1), ("flush",), ("done", 1), ("start", 2),
                    ("flush",), ("done", 2)]
    else:  # only before the first (nothing is known of its length); the rest is left to the sink's own timer
        expected = [("start", 0), ("flush",), ("done", 0), ("start", 1), ("done", 1), ("start", 2), ("done", 2)]
    assert sink.events == expected


def test_the_heap_a_search_starts_with_is_set_aside_from_the_collector_until_the_run_ends(tmp_path):
    """Through the confirmations too: a full pass of the collector over everything, right after the search, would
    fall in the time a time budget keeps for them."""
    path = tmp_path / "job.toml"
    path.write_text(job_text("heap", tmp_path / "cache", evaluations=4))
    before = gc.get_freeze_count()
    held = {}

    def progress(status):
        held.setdefault(status["phase"], []).append(gc.get_freeze_count())

    result, _ = run_job(load_job(path), f"sqlite:///{tmp_path / 'db.sqlite'}", progress=progress)
    assert result.evaluations > 0 and result.confirmations > 0
    assert min(held["search"] + held["confirm"]) > before  # set aside: the collector's full passes skip it
    assert gc.get_freeze_count() == before  # and handed back after
