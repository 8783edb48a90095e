"""How busy a run kept its evaluators, from the stored trials alone: each trial is stored with the
evaluator that ran it and when it was dispatched and finished, so an evaluator's busy time is the union
of its trials' intervals, and the run's utilisation is the evaluators' busy time over what they had."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import datetime


@dataclass(frozen=True)
class Utilisation:
    evaluators: int  # the run's evaluators (those that never got work count as idle)
    evaluations: int  # finished evaluations in the window
    seconds: float  # the window: first dispatch to last finish
    busy_seconds: float  # summed over evaluators: time with at least one evaluation dispatched to it

    @property
    def fraction(self) -> float | None:
        """Busy time over the evaluators' time in the window (1.0: never idle)."""
        total = self.evaluators * self.seconds
        return self.busy_seconds / total if total > 0 else None

    @property
    def per_second(self) -> float | None:
        return self.evaluations / self.seconds if self.seconds > 0 else None

    def as_dict(self) -> dict:
        return {**asdict(self), "fraction": self.fraction, "per_second": self.per_second}


def _union_seconds(intervals: list[tuple[datetime, datetime]]) -> float:
    total, end = 0.0, None
    for a, b in sorted(intervals):
        if end is None or a > end:
            total += (b - a).total_seconds()
            end = b
        elif b > end:
            total += (b - end).total_seconds()
            end = b
    return total


def utilisation(trials: Iterable, evaluators: int | None = None) -> Utilisation | None:
    """The utilisation of the finished ``trials`` (records with ``worker``, ``started``, ``finished``), over
    ``evaluators`` evaluators (default: those named by the trials). None when no trial has both times."""
    by_worker: dict[str, list[tuple[datetime, datetime]]] = {}
    for t in trials:
        if t.started is not None and t.finished is not None and t.worker:
            by_worker.setdefault(t.worker, []).append((t.started, t.finished))
    spans = [iv for ivs in by_worker.values() for iv in ivs]
    if not spans:
        return None
    first, last = min(a for a, _ in spans), max(b for _, b in spans)
    n = max(evaluators or 0, len(by_worker))
    return Utilisation(n, len(spans), (last - first).total_seconds(),
                       sum(_union_seconds(ivs) for ivs in by_worker.values()))
