"""A plug-in model for timeout tests: gmm-2d's exact denoiser, except that the first evaluation call (more than
the two states the plug-in check calls it on) made in any process after ``STEPTUNE_TEST_HANG`` names a fresh
marker file never returns (it waits on an Event nothing sets), as a
model stuck on a dead network connection does. The marker is claimed atomically, so exactly one evaluation hangs
whichever evaluator runs it; every later call answers at once. gmm-2d's references do not call the model."""

from __future__ import annotations

import os
import threading
from dataclasses import replace


def hanging_gmm():
    from steptune.evaluators import load_problem

    problem = load_problem("gmm-2d")
    inner, marker = problem.model.fn, os.environ.get("STEPTUNE_TEST_HANG", "")

    def fn(x, t, **kwargs):
        if marker and x.shape[0] > 2:
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                pass
            else:
                threading.Event().wait()
        return inner(x, t, **kwargs)

    return replace(problem, name="hanging-gmm-2d", model=replace(problem.model, fn=fn))
