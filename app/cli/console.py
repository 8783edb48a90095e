"""Where the command line writes: results on stdout (whole tables, also when piped), messages and progress on
stderr (one line each, also in logs), numbers formatted one way."""

from __future__ import annotations

import math
import os
import re
import sys
from datetime import timedelta

from rich.console import Console
from rich.table import Table
from rich.text import Text


def is_tty(stream) -> bool:
    """Whether ``stream`` is a terminal (False for a closed or missing stream); FORCE_COLOR, which makes rich colour
    a file, does not make one."""
    try:
        return stream is not None and stream.isatty()
    except (ValueError, OSError):
        return False


_NUMBER = re.compile(r"[-+]?[\d.,:/]*\d[\d.,:/eE+-]*( ?(%|×|x|s|ms|min|h|/min|/s))?\*?|—|")


def _fit(table: Table, width: int, console: Console) -> int:
    """Lay ``table`` out for a terminal ``width`` columns wide, where it does not fit as it is, losing nothing (rich
    would cut every column short, numbers included): each column of numbers as wide as its widest number, every
    header and text folded into more lines where it must, the text columns at least 4 wide, the cells' padding
    dropped where even that does not fit. Returns the width it takes: ``width``, or more where it cannot fit."""
    cols = table.columns
    wide = console.options.update_width(1_000_000)
    if console.measure(table, options=wide).maximum <= width:
        return width
    least, natural, numeric, word = [], [], [], []
    for col in cols:
        col.overflow = "fold"
        cells = [c if isinstance(c, str) else c.plain if isinstance(c, Text) else None for c in col._cells]
        header = str(col.header)
        numbers = bool(cells) and all(c is not None and _NUMBER.fullmatch(c.strip()) for c in cells)
        numeric.append(numbers)
        least.append(max(len(c) for c in cells) if numbers else 4)
        natural.append(max([console.measure(c, options=wide).maximum for c in col._cells] + [len(header), least[-1]]))
        word.append(max([least[-1], *map(len, header.split())]) if numbers else least[-1])
    pad = 1 if 3 * len(cols) + 1 + sum(word) <= width else 0  # the padding goes before a header word is split
    table.padding = (0, pad)
    frame = len(cols) + 1 + 2 * pad * len(cols)  # the borders, and the padding either side of each cell
    widths = list(least)
    # what is left goes to the numbers' headers up to their longest word, then to the text, then to those headers
    for target in ([w if n else 0 for w, n in zip(word, numeric)], [0 if n else w for w, n in zip(natural, numeric)],
                   natural):
        grow = [i for i in range(len(cols)) if target[i] > widths[i]]
        want, left = sum(target[i] - widths[i] for i in grow), width - frame - sum(widths)
        if want > 0 and left > 0:
            give = min(left, want)
            short = {i: target[i] - widths[i] for i in grow}
            for i in grow:
                widths[i] += short[i] * give // want
            for i in sorted(grow, key=lambda i: widths[i] - target[i])[:width - frame - sum(widths)]:
                widths[i] += widths[i] < target[i]  # what the rounding down left, one column each
    for col, w in zip(cols, widths):
        col.width = w
    return max(width, frame + sum(widths))


class _Results(Console):
    """stdout: where it is not a terminal (a file, a pipe), a table as wide as it needs and a line of text written
    whole, never wrapped into two; in a terminal too narrow for a table, its numbers whole and its text folded."""

    def print(self, *objects, **kwargs):
        if not is_tty(self.file) and objects and all(isinstance(o, str) for o in objects):
            kwargs.setdefault("soft_wrap", True)
        if len(objects) == 1 and isinstance(objects[0], Table) and is_tty(self.file):
            least = _fit(objects[0], self.width, self)
            if least > self.width:  # not even folded does it fit: whole, as wide as it must be (the terminal wraps)
                width, self.width = self.width, least
                try:
                    return super().print(*objects, **kwargs)
                finally:
                    self.width = width
        super().print(*objects, **kwargs)


def text_column(template: str = "{task.description}", bold: bool = False):
    """A progress bar's column of text, shown as it is (a study's name may hold square brackets)."""
    from rich.progress import TextColumn

    return TextColumn(template, style="bold" if bold else "none", markup=False)


def live() -> bool:
    """Whether stderr is a terminal that shows a live bar (else progress goes as stamped lines, also under
    FORCE_COLOR)."""
    return is_tty(sys.stderr) and os.environ.get("TERM") != "dumb"


# names (studies, files, presets) are printed as they are: square brackets are not rich's markup here
out = _Results(width=None if is_tty(sys.stdout) else 100_000, markup=False)
err = Console(stderr=True, soft_wrap=True, markup=False)


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
