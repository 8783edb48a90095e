"""Plug-in models for fault tests: gmm-2d's exact denoiser, except that the first evaluation call (more than the
two states the plug-in check calls it on) made in any process after an environment variable names a fresh marker
file goes wrong. The marker is claimed atomically, so exactly one evaluation goes wrong whichever evaluator runs
it; every later call answers at once. gmm-2d's references do not call the model.

``hanging_gmm`` (``STEPTUNE_TEST_HANG``): that call never returns (it waits on an Event nothing sets), as a model
stuck on a dead network connection does. ``crashing_gmm`` (``STEPTUNE_TEST_CRASH``): that call ends its own
process at once, as a segmentation fault or the kernel's out-of-memory killer does."""

from __future__ import annotations

import os
import threading
from dataclasses import replace


def _once(marker: str) -> bool:
    """True for the one caller that creates ``marker`` (none if ``marker`` is empty)."""
    if not marker:
        return False
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def _faulty(name: str, variable: str, fault):
    from steptune.evaluators import load_problem

    problem = load_problem("gmm-2d")
    inner, marker = problem.model.fn, os.environ.get(variable, "")

    def fn(x, t, **kwargs):
        if x.shape[0] > 2 and _once(marker):
            fault()
        return inner(x, t, **kwargs)

    return replace(problem, name=name, model=replace(problem.model, fn=fn))


def hanging_gmm():
    return _faulty("hanging-gmm-2d", "STEPTUNE_TEST_HANG", lambda: threading.Event().wait())


def crashing_gmm():
    return _faulty("crashing-gmm-2d", "STEPTUNE_TEST_CRASH", lambda: os._exit(1))
