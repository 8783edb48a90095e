"""Where the command line writes: results on stdout (whole tables, also when piped), messages and progress on
stderr (one line each, also in logs), numbers formatted one way."""

from __future__ import annotations

import math
import sys
from datetime import timedelta

from rich.console import Console


class _Results(Console):
    """stdout: a table as wide as it needs up to 200 columns where stdout is not a terminal (a file, a pipe); a line
    of text written whole there, never wrapped into two."""

    def print(self, *objects, **kwargs):
        if not self.is_terminal and objects and all(isinstance(o, str) for o in objects):
            kwargs.setdefault("soft_wrap", True)
        super().print(*objects, **kwargs)


out = _Results(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, soft_wrap=True)


def fmt(v, digits: int = 4) -> str:
    """A score for a table: ``digits`` significant digits, ``—`` for a missing or non-finite value."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    return f"{v:.{digits}g}"


def per_minute(v: float | None) -> str:
    """A rate: ``1,840/min`` from a hundred a minute up, three significant digits below (``0.25/min``)."""
    if v is None or not math.isfinite(v):
        return "—"
    return f"{v:,.0f}/min" if v >= 100 else f"{v:.3g}/min"


def duration(secs: float | None) -> str:
    return "—" if secs is None else str(timedelta(seconds=round(secs)))
