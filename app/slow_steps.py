"""A step that may take minutes on a first run (reference solutions, a model's first load): said while it runs, so a
log or a terminal does not sit silent, and said again with its time when it ends; nothing is said of a quick one."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

SLOW_SECONDS = 3.0


@contextmanager
def said_if_slow(say: Callable[[str], None], doing: str, done: str, after: float = SLOW_SECONDS) -> Iterator[None]:
    """Run the block; once it has taken ``after`` seconds, ``say(doing)``, and at its end ``say(f"{done} after N s")``
    (not when it raised)."""
    started, said = time.monotonic(), threading.Event()

    def tell():
        said.set()
        say(doing)

    timer = threading.Timer(after, tell)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
    if said.is_set():
        say(f"{done} after {time.monotonic() - started:.0f} s")
