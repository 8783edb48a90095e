"""A run's utilisation, from stored trials alone: each evaluator's busy time is the union of its trials'
dispatch-to-finish intervals, over the evaluators' time from the first dispatch to the last finish."""

from __future__ import annotations

from datetime import datetime, timedelta
from types import SimpleNamespace

import pytest

from steptune.utilisation import utilisation

T0 = datetime(2026, 1, 1)


def trial(worker, start, end):
    return SimpleNamespace(worker=worker, started=T0 + timedelta(seconds=start), finished=T0 + timedelta(seconds=end))


def test_overlapping_work_on_one_evaluator_counts_once_and_gaps_are_idle():
    # a: busy 0-4 (two overlapping calls) and 6-10; b: busy 0-5. Window 10 s, 2 evaluators.
    rows = [trial("a", 0, 3), trial("a", 1, 4), trial("a", 6, 10), trial("b", 0, 5)]
    u = utilisation(rows)
    assert (u.evaluators, u.evaluations, u.seconds, u.busy_seconds) == (2, 4, 10.0, 13.0)
    assert u.fraction == pytest.approx(13 / 20) and u.per_second == pytest.approx(0.4)


def test_evaluators_that_never_got_work_count_as_idle_and_unfinished_trials_are_left_out():
    rows = [trial("a", 0, 10), SimpleNamespace(worker="b", started=T0, finished=None)]
    assert utilisation(rows, evaluators=4).fraction == pytest.approx(0.25)
    assert utilisation([SimpleNamespace(worker=None, started=None, finished=None)]) is None


def test_a_nested_interval_adds_nothing():
    u = utilisation([trial("a", 0, 10), trial("a", 2, 3), trial("a", 9, 12)])
    assert u.busy_seconds == 12.0 and u.fraction == 1.0
