"""A tuned schedule as a k-diffusion sampler: ``sampler(schedule)`` returns ``fn(model, x, sigmas, extra_args=None,
callback=None, disable=None)``, the signature of k-diffusion's ``sample_*`` functions, which AUTOMATIC1111/Forge and
ComfyUI call.

``model(x, sigma, **extra_args)`` is any k-diffusion denoiser: it returns x0-hat. Two state conventions:

* ``ve`` (k-diffusion's, and ComfyUI's for eps and v models): x = x0 + s eps with s = sigma/alpha, the model's
  ``sigmas`` in s;
* ``const`` (ComfyUI's ``model_sampling`` CONST, the SD3 / Flux / Wan flow convention): x = (1 - s) x0 + s eps with
  s = t of a rectified-flow schedule.

A schedule tuned on rectified flow runs in ``const``, any other in ``ve`` (the σ convention of every export,
``steptune.exports.tuning``); naming the other convention is refused. Every step runs through
steptune's own sampler loop and step kernel (``steptune.space.trajectory``): the denoiser is adapted to the loop's
model interface, so orders, prediction types, correctors, DC ratios and the analytical first step all act as in
``steptune.sample``.

What runs for the ``sigmas`` a caller passes (``plan``):

* the schedule's own list (``own_sigmas``; ``steptune export --format sigmas`` writes it): the schedule as tuned,
  exactly its NFE model calls; a trailing 0 after the schedule's last positive sigma ends the list, and the run
  stops at that last sigma, as the schedule was scored;
* any other list (another step count, a list truncated for img2img / denoise < 1, a rescaled list): the schedule is
  re-timed onto it by ``steptune.space.retime.retime`` (decisions by relative lambda position, clipped to stay valid;
  the analytical first step only from the schedule's own first sigma, i.e. pure noise). A list one longer than the
  schedule's times whose last value is 0, for a schedule that ends above 0, keeps the 0 as the terminator above;
  otherwise the last interval to 0 is a step. The re-timed schedule's NFE (``calls``) is what the run costs:
  one call per interval, minus one for an analytical first step, plus one per implicit corrector.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

from steptune.exports.tuning import model_sigmas, times_from_model_sigmas
from steptune.space import Model, Schedule, ScheduleError, TrajectoryRun, trajectory
from steptune.space.noise import NoiseSchedule
from steptune.space.retime import positions, retime, schedule_noise

from . import source

Tensor = torch.Tensor
CONVENTIONS = ("ve", "const")
_MATCH = 1e-5  # relative: a float32 copy of a list still matches it


class Plan(NamedTuple):
    """What runs on a sigma list: ``schedule`` (the tuned one, or it re-timed onto the list) and whether it was
    re-timed."""

    schedule: Schedule
    retimed: bool

    @property
    def calls(self) -> int:
        return self.schedule.nfe


class TunedSampler:
    """A schedule as a k-diffusion sampler function (see the module docstring). ``data_mean`` (in x0 units) is
    needed only by a schedule whose analytical first step is ``mean``."""

    def __init__(self, schedule: Schedule, convention: str | None = None, data_mean: Tensor | None = None):
        self.schedule = schedule.validate()
        self.noise: NoiseSchedule = schedule_noise(schedule)
        flow = self.noise.kind == "flow"
        self.convention = convention or ("const" if flow else "ve")
        if self.convention not in CONVENTIONS:
            raise ScheduleError(f"convention {self.convention!r} is unknown; use one of {', '.join(CONVENTIONS)}")
        if (self.convention == "const") != flow:
            want = "const" if flow else "ve"
            raise ScheduleError(f"convention {self.convention!r} does not fit this schedule, tuned on "
                                f"{self.noise.kind}: a rectified-flow schedule runs in 'const' (x = (1 - s) x0 + "
                                f"s eps), any other in 've' (x = x0 + s eps); use {want!r}")
        if self.schedule.afs == "mean" and data_mean is None:
            raise ScheduleError("the schedule's analytical first step is 'mean'; pass data_mean= (the data mean, in "
                                "the model's x0 units)")
        self.data_mean = data_mean

    # ---- sigmas ----------------------------------------------------------------------------------------------

    def sigma_of(self, times) -> list[float]:
        """The model's own sigma at each time: sigma/alpha (``ve``) or t (``const``), 0 at t = 0 (the σ convention
        of every export, ``steptune.exports.tuning``)."""
        return model_sigmas(self.noise, [float(t) for t in times]).tolist()

    def time_of(self, sigmas) -> list[float]:
        return times_from_model_sigmas(self.noise, [float(s) for s in sigmas]).tolist()

    def own_sigmas(self) -> list[float]:
        """The schedule's own sigma list, descending, ending in 0 (a 0 appended when it ends above sigma 0)."""
        sig = self.sigma_of(self.schedule.times)
        return sig if self.schedule.times[-1] == 0.0 else [*sig, 0.0]

    def sigmas(self, denoise: float = 1.0) -> list[float]:
        """The list to run with: the own list at ``denoise`` 1; below 1, the schedule's relative lambda positions
        placed on [t_d, t_end] with t_d = t_end + denoise (t_start - t_end) (linear in t, as front ends' denoise
        cuts a timestep-uniform schedule), ending in 0 like the own list. The sampler re-times the schedule onto it:
        the same decisions by position, no analytical first step (the start is not pure noise)."""
        if not 0.0 < denoise <= 1.0:
            raise ScheduleError(f"denoise {denoise:g}: give a value in (0, 1]")
        if denoise == 1.0:
            return self.own_sigmas()
        times = self.schedule.times
        pos = times[:-1] if times[-1] == 0.0 else times  # the positive times; a step to 0 stays the last step
        t_last = pos[-1]
        t_d = t_last + denoise * (self.schedule.t_start - t_last)
        r = torch.tensor(positions(self.noise, pos), dtype=torch.float64)
        ends = self.noise.lam(torch.tensor([t_d, t_last], dtype=torch.float64))
        new = self.noise.t_of_lambda(ends[0] + r * (ends[1] - ends[0])).tolist()
        new[0], new[-1] = t_d, t_last
        return [*self.sigma_of(new), 0.0]

    # ---- what runs -------------------------------------------------------------------------------------------

    def plan(self, sigmas) -> Plan:
        """The schedule that runs on ``sigmas`` (see the module docstring)."""
        sig = [float(v) for v in (sigmas.tolist() if isinstance(sigmas, Tensor) else sigmas)]
        times = self.schedule.times
        own = self.own_sigmas()
        n = len(sig) - 1 if times[-1] > 0 and len(sig) == len(times) + 1 and sig[-1] == 0.0 else len(sig)
        grid = sig[:n]
        tol = _MATCH  # a copy in half precision matches to its own rounding
        if isinstance(sigmas, Tensor) and sigmas.is_floating_point():
            tol = max(tol, torch.finfo(sigmas.dtype).eps)
        if len(grid) == len(times) and _close(grid, own[: len(times)], tol):
            return Plan(self.schedule, False)
        from_noise = _close(grid[:1], own[:1], tol)
        new = self.time_of(grid)
        if from_noise:
            new[0] = self.schedule.t_start
        return Plan(retime(self.schedule, new, from_noise=from_noise), True)

    def calls(self, sigmas) -> int:
        """Model calls a run on ``sigmas`` makes."""
        return self.plan(sigmas).calls

    def __call__(self, model: Callable[..., Tensor], x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
                 callback: Callable[[dict], None] | None = None, disable: bool | None = None) -> Tensor:
        if len(sigmas) < 2:
            return x
        plan = self.plan(sigmas)
        with torch.no_grad():
            return _run(self, plan, model, x, sigmas, {} if extra_args is None else extra_args, callback, disable)


def _close(a: list[float], b: list[float], tol: float = _MATCH) -> bool:
    return len(a) == len(b) and all(math.isclose(u, v, rel_tol=tol, abs_tol=0.0) for u, v in zip(a, b))


def _run(ts: TunedSampler, plan: Plan, model, x: Tensor, sigmas, extra_args: dict, callback, disable) -> Tensor:
    from tqdm.auto import tqdm

    sched = plan.schedule
    t = torch.tensor(sched.times, dtype=torch.float64)
    scale = ts.noise.alpha(t).tolist() if ts.convention == "ve" else [1.0] * len(sched.times)
    node_sigma = sigmas if isinstance(sigmas, Tensor) else torch.as_tensor(sigmas, dtype=x.dtype, device=x.device)
    s_in = x.new_ones([x.shape[0]])
    seen: dict[int, tuple[Tensor, Tensor]] = {}  # node -> (state in the caller's scaling, denoised), for callback
    if callback is not None and sched.afs != "none":
        x0 = torch.zeros_like(x) if sched.afs == "zero" else ts.data_mean.to(x).expand_as(x)
        seen[0] = (x, x0)
    bar = tqdm(total=len(sched.steps), disable=disable)

    def after_step(i: int, _x: Tensor) -> None:
        bar.update(1)
        if callback is not None:
            xi, den = seen.pop(i)
            callback({"x": xi, "i": i, "sigma": node_sigma[i], "sigma_hat": node_sigma[i], "denoised": den})
            for j in [j for j in seen if j < i]:
                del seen[j]

    def respond(req) -> tuple[Tensor, Tensor]:
        x_in = req.x / scale[req.j] if scale[req.j] != 1.0 else req.x
        den = model(x_in, node_sigma[req.j] * s_in, **extra_args)
        if callback is not None:
            seen[req.j] = (x_in.clone() if x_in is req.x else x_in, den)
        eps = (req.x - req.alpha * den) / req.sigma
        return eps, den

    try:
        loop = trajectory(sched, ts.noise, x * scale[0], ts.data_mean, after_step)
        out = TrajectoryRun(loop).finish(respond)
    finally:
        bar.close()
    return out / scale[-1] if scale[-1] != 1.0 else out


def sampler(schedule: Schedule | str | Path | None = None, *, db: str | None = None, study: str | None = None,
            nfe: int | None = None, trial: int | None = None, convention: str | None = None,
            data_mean: Tensor | None = None) -> TunedSampler:
    """A k-diffusion sampler function running a tuned schedule: a ``Schedule``, a schedule JSON path, or a study in
    the database at ``db`` (its best schedule at ``nfe``, interpolated if the study did not search that NFE, or
    trial id ``trial``). ``convention``: ``ve`` or ``const``, checked against the schedule (default: the one it
    fits)."""
    return TunedSampler(source.load(schedule, db=db, study=study, nfe=nfe, trial=trial), convention, data_mean)


def denoiser(model: Model, convention: str | None = None) -> Callable[[Tensor, Tensor], Tensor]:
    """A steptune ``Model`` as a k-diffusion denoiser ``fn(x, sigma) -> x0-hat`` in ``convention`` (default as in
    ``sampler``): to run k-diffusion's own samplers, or ``sampler``, on a steptune model."""
    ns = model.noise
    conv = convention or ("const" if ns.kind == "flow" else "ve")

    def fn(x: Tensor, sigma: Tensor) -> Tensor:
        s = float(sigma.reshape(-1)[0])
        if not bool((sigma == sigma.reshape(-1)[0]).all()):
            raise ValueError("denoiser: every sample of a batch must share one sigma")
        t = s if conv == "const" else float(ns.t_of_edm_sigma(torch.tensor(s, dtype=torch.float64)))
        alpha, sig = float(ns.alpha(t)), float(ns.sigma(t))
        scale = 1.0 if conv == "const" else alpha
        return model.predict(x * scale, t, alpha, sig)[1]

    return fn
