"""σ lists for k-diffusion and ComfyUI: the descending list of the model's own sigmas ending in 0 (sigma/alpha,
or t for a flow model; ``k_diffusion_sigmas``), its comma-separated form for ComfyUI's manual-sigma nodes
(``comfyui_sigmas``), and what a sampler pays on such a list (``sigma_list_calls``). The lists carry the
times only; the per-step decisions travel in the JSON and diffusers exports."""

from __future__ import annotations

import math

import numpy as np

from steptune.space import Schedule

from .conventions import ExportError, schedule_noise
from .tuning import final_sigma, model_sigmas


def k_diffusion_sigmas(schedule: Schedule) -> list[float]:
    """The model's own sigma at every time of the schedule, descending, ending in 0 (k-diffusion's
    ``sigmas``): sigma/alpha for VP and EDM models, as k-diffusion and ComfyUI take them, and t for a
    rectified-flow model (x_t = (1 - t) x0 + t eps), as ComfyUI's flow models (SD3, Flux) take them.

    A schedule that stops at a positive sigma gets a trailing 0 appended, as k-diffusion's schedule
    helpers do. The list carries the times only; the per-step solver decisions are in the JSON export.
    """
    sig = model_sigmas(schedule_noise(schedule), schedule.times).tolist()
    if schedule.times[-1] == 0.0:
        sig[-1] = 0.0
    else:
        sig.append(0.0)
    if not all(math.isfinite(s) for s in sig):
        raise ExportError("the schedule starts where sigma/alpha is infinite (alpha = 0); start it at t < T")
    return sig


def sigma_list_calls(schedule: Schedule) -> tuple[int, list[str]]:
    """How many model calls a sampler with one call per interval (Euler, DPM++ 2M) makes on the sigma
    list, and why that differs from the schedule's NFE."""
    sig = k_diffusion_sigmas(schedule)
    why = []
    if schedule.times[-1] != 0.0:
        value, kind = final_sigma(schedule, schedule_noise(schedule))
        end = "the smallest training sigma" if kind == "smallest training sigma" else "sigma"
        why.append(f"the schedule ends at {end} {value:.4g} and the list adds a step from there to 0, one more call")
    if schedule.afs != "none":
        why.append("the schedule's first step is analytical (no model call), a sigma-list sampler calls the model "
                   "there")
    if any(st.corrector is not None and st.corrector.kind == "implicit" for st in schedule.steps):
        why.append("the schedule's implicit correctors call the model again (a Heun-type sampler does that)")
    return len(sig) - 1, why


def comfyui_sigmas(schedule: Schedule) -> str:
    """The k-diffusion sigma list as comma-separated numbers, for ComfyUI's manual-sigma nodes; written
    without exponents, since those nodes read plain decimals."""
    return ", ".join(np.format_float_positional(s, trim="-") for s in k_diffusion_sigmas(schedule))
