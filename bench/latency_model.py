"""A plug-in model that waits a fixed latency per call and uses no CPU meanwhile, as a network on a remote
GPU does: gmm-2d's exact denoiser behind ``time.sleep``. Its references stay the exact ones (they do not
call the model), so only the evaluations pay the latency. ``STEPTUNE_BENCH_LATENCY`` (seconds, default
0.04) sets the wait; the factory for a job file is ``latency_model:slow_gmm`` (with bench/ on the path)."""

from __future__ import annotations

import os
import time
from dataclasses import replace


def slow_gmm():
    from steptune.evaluators import load_problem

    latency = float(os.environ.get("STEPTUNE_BENCH_LATENCY", "0.04"))
    problem = load_problem("gmm-2d")
    inner = problem.model.fn

    def fn(x, t, **kwargs):
        time.sleep(latency)
        return inner(x, t, **kwargs)

    return replace(problem, name="slow-gmm-2d", model=replace(problem.model, fn=fn),
                   source={**problem.source, "latency": latency})
