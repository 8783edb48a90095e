"""What diffusers does out of the box: a stock scheduler with its default config, sampling a problem's model with
the scheduler's own ``set_timesteps`` / ``scale_model_input`` / ``step`` loop, as a diffusers pipeline does.

Only the model's conventions are given to the scheduler (its beta table as ``trained_betas``, its prediction
type); every other setting is the class default (diffusers 0.3x-0.4x: UniPC bh2 order 2, DPM-Solver++(2M) and
DEIS order 2 on ``linspace`` timesteps; DDIM on ``leading`` timesteps with ``clip_sample=True``; Euler on
``linspace``). The noise is the bank's, scaled by ``init_noise_sigma`` as pipelines scale theirs. Each row is
stored with the steptune schedule that runs the same timesteps (``equivalent``), for display and export; its
metrics are those of diffusers' own loop.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import replace

import torch

from steptune.evaluators.evaluator import EvalResult
from steptune.space import Schedule, ScheduleError, presets
from steptune.space import spacing as spacing_mod
from steptune.space.noise import VPDiscrete

SCHEDULERS = ("UniPCMultistepScheduler", "DPMSolverMultistepScheduler", "DDIMScheduler", "DEISMultistepScheduler",
              "EulerDiscreteScheduler")
_PREDICTION = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


def origin(name: str, nfe: int) -> str:
    """How a diffusers-default trial is named: ``diffusers-default:UniPCMultistepScheduler@5``."""
    return f"diffusers-default:{name}@{nfe}"


def why_not(model) -> str | None:
    """Why stock diffusers schedulers cannot sample ``model`` (None when they can)."""
    if not isinstance(model.noise, VPDiscrete):
        return f"stock diffusers VP schedulers need a discrete beta table, not a {model.noise.kind} noise schedule"
    if model.time_input != "discrete":
        return f"stock diffusers VP schedulers feed training timesteps, not time input {model.time_input!r}"
    if model.prediction not in _PREDICTION:
        return f"stock diffusers VP schedulers take eps, x0 or v predictions, not {model.prediction!r}"
    return None


def scheduler(name: str, model, nfe: int):
    """diffusers' ``name`` with its default config on ``model``'s beta table and prediction, set to ``nfe`` steps."""
    import diffusers

    if name not in SCHEDULERS:
        raise ScheduleError(f"unknown diffusers scheduler {name!r}; choose from {', '.join(SCHEDULERS)}")
    why = why_not(model)
    if why:
        raise ScheduleError(why)
    ac = torch.tensor(model.noise.alphas_cumprod, dtype=torch.float64)
    betas = (1.0 - ac / torch.cat([ac.new_ones(1), ac[:-1]])).tolist()
    with warnings.catch_warnings():  # numpy-2 deprecation noise from inside diffusers
        warnings.simplefilter("ignore", DeprecationWarning)
        s = getattr(diffusers, name)(num_train_timesteps=len(betas), trained_betas=betas,
                                     prediction_type=_PREDICTION[model.prediction])
        s.set_timesteps(nfe)
    return s


def sample(name: str, model, x_T: torch.Tensor, nfe: int) -> torch.Tensor:
    """Samples of diffusers' ``name`` (default config) from the noises ``x_T``, in ``nfe`` model calls."""
    s = scheduler(name, model, nfe)
    x = (x_T * s.init_noise_sigma).float()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", DeprecationWarning)
        for t in s.timesteps:
            x_in = s.scale_model_input(x, t)
            out = model.call(x_in, torch.full((x.shape[0],), float(t), dtype=x_in.dtype))
            x = s.step(out.float(), t, x).prev_sample
    return x.to(x_T.dtype)


def equivalent(name: str, model, nfe: int) -> Schedule:
    """The steptune schedule on the same timesteps as diffusers' ``name`` (default config) at ``nfe``, named
    ``diffusers-default:NAME``."""
    s = scheduler(name, model, nfe)
    ns = model.noise
    if name == "UniPCMultistepScheduler":
        sched = presets.build("unipc-bh2", nfe, ns, spacing="diffusers-linspace")
    elif name == "DPMSolverMultistepScheduler":
        sched = presets.build("dpm-solver++-2m", nfe, ns, spacing="diffusers-linspace")
    elif name == "DEISMultistepScheduler":  # diffusers' DEIS ends at the smallest training sigma, not at 0
        times = spacing_mod.make(ns, nfe, "diffusers-linspace", final_zero=False).tolist() + [ns.t_min]
        sched = presets.build("deis", nfe, ns, spacing=times, order=2)
    elif name == "DDIMScheduler":
        sched = presets.ddim(nfe, ns, spacing=spacing_mod.diffusers_times(ns, nfe, "leading", scheduler="ddim"))
    else:  # Euler: its sigmas, mapped to times, and a last step to sigma = 0
        sigmas = s.sigmas[:-1].double()
        times = ns.t_of_edm_sigma(sigmas).clamp(max=ns.T).tolist() + [0.0]
        sched = presets.build("euler", nfe, ns, spacing=times)
    return replace(sched, name=f"diffusers-default:{name}")


def evaluate(evaluator, name: str, nfe: int, bank: str = "heldout", n: int | None = None):
    """(result, equivalent schedule) of diffusers' ``name`` (default config) at ``nfe`` on the first ``n`` states of
    ``bank`` of ``evaluator``'s problem, measured against its reference as every schedule is."""
    model = evaluator.problem.model
    sched = equivalent(name, model, nfe)
    x_T = evaluator.x_T(bank, n)
    start, calls = time.perf_counter(), model.calls
    x = sample(name, model, x_T, nfe)
    seconds = time.perf_counter() - start
    cost = {"model_calls": (model.calls - calls) * x.shape[0], "device": evaluator.device_name}
    if not torch.isfinite(x).all():
        inf = {k: math.inf for k in evaluator.metric_names()}
        return EvalResult(nfe, inf, "failed", f"{name} gave non-finite samples", seconds, bank, x.shape[0],
                          **cost), sched
    return replace(evaluator.score(sched, x, bank, seconds), **cost), sched
