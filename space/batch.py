"""Several schedules through one model call per round: the sampler loops of K schedules run in lockstep
from the same initial noise, and each round's states are stacked along the batch (every sample with
its own time input), so a GPU sees K x n samples per forward pass instead of n.

Each schedule's result equals ``sample(model, x_T, schedule)`` (up to the floating-point effect of the
batch size on the network's kernels); a schedule that diverges fails alone. Per-sample conditioning is
repeated for every schedule: the model's ``cond_kwargs`` and ``uncond_kwargs`` tensors whose first
dimension is the number of samples, and ``model.fn.sample_kwargs(n)`` where the network defines it (the
per-sample arguments of its call for n samples, which it would otherwise derive from the batch it is
given).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from .model import Model, convert, time_dtype
from .sampler import NonFiniteError, TrajectoryRun, check_compatible, trajectory
from .schedule import Schedule

Tensor = torch.Tensor


def _tiled(kwargs: dict, n: int, k: int) -> dict:
    """Per-sample conditioning (tensors whose first dimension is the bank size) repeated for k schedules."""
    return {key: v.repeat(k, *([1] * (v.ndim - 1))) if isinstance(v, Tensor) and v.ndim and v.shape[0] == n else v
            for key, v in kwargs.items()}


def sample_batch(model: Model, x_T: Tensor, schedules: Sequence[Schedule]) -> list[Tensor | NonFiniteError]:
    """Run every schedule from ``x_T``; returns, per schedule, its final samples or the NonFiniteError
    that stopped it. Nothing runs if a schedule is invalid or does not fit the model."""
    for s in schedules:
        s.validate()
        check_compatible(model, s)
    n = x_T.shape[0]
    per_sample = getattr(model.fn, "sample_kwargs", None)
    cond = {**model.cond_kwargs, **(per_sample(n) if per_sample is not None else {})}
    runs = [TrajectoryRun(trajectory(s, model.noise, x_T, model.data_mean)) for s in schedules]
    results: list[Tensor | NonFiniteError | None] = [r.result for r in runs]
    by_count: dict[int, Model] = {}
    while ks := [k for k, r in enumerate(runs) if not r.done]:
        reqs = [runs[k].request for k in ks]
        x = torch.cat([r.x for r in reqs]) if len(reqs) > 1 else reqs[0].x
        tv = torch.cat([torch.full((n,), model.time_value(r.t), dtype=time_dtype(x), device=x.device) for r in reqs])
        m = by_count.get(len(ks))
        if m is None:
            m = by_count[len(ks)] = replace(model, cond_kwargs=_tiled(cond, n, len(ks)),
                                            uncond_kwargs=_tiled(model.uncond_kwargs, n, len(ks)))
        out = m.call(x, tv).to(x.dtype)
        model.calls += 1
        for i, (k, r) in enumerate(zip(ks, reqs)):
            eps_x0 = convert(out[i * n:(i + 1) * n], r.x, r.alpha, r.sigma, model.prediction, r.buf)
            try:
                runs[k].send(eps_x0)
                results[k] = runs[k].result
            except NonFiniteError as e:
                results[k] = e
    return results
