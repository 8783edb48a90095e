"""One σ convention everywhere, and what a schedule was tuned for.

Every export and integration writes and reads σ in the model's own convention, the one its sampler stack
feeds the network with: σ/α for VP and EDM models (k-diffusion's and ComfyUI's σ, the ``sigmas`` of diffusers'
VP schedulers) and t for rectified-flow models (x = (1 - t) x0 + t ε: diffusers' FlowMatch ``sigmas``,
ComfyUI's flow models). Exports record in their provenance what the schedule was tuned for (``tuning_record``:
the sampler, the model's conventions, the σ convention and the final σ); running it under other conventions
warns once (``warn_other_conventions``).
"""

from __future__ import annotations

import json
import math
import warnings

import torch

from steptune.space import Schedule

SAMPLER = "steptune"  # the sampler every schedule is tuned with: steptune's loop with its per-step decisions
STATE = "x = alpha(t) x0 + sigma(t) eps"  # the state that sampler integrates
MODEL_KEYS = ("prediction", "time_input", "time_scale")


def sigma_convention(ns) -> str:
    """The name of the model's own σ on noise schedule ``ns``: ``t`` for rectified flow, else ``sigma/alpha``."""
    return "t" if ns.kind == "flow" else "sigma/alpha"


def model_sigmas(ns, times) -> torch.Tensor:
    """The model's own σ (float64) at schedule times: t on a rectified-flow schedule, σ/α otherwise."""
    t = torch.as_tensor(times, dtype=torch.float64)
    return t.clone() if ns.kind == "flow" else ns.edm_sigma(t)


def times_from_model_sigmas(ns, sigmas) -> torch.Tensor:
    """The schedule times (float64) of a list of the model's own σ, the inverse of ``model_sigmas``
    (σ = 0 is t = 0)."""
    sig = torch.as_tensor(sigmas, dtype=torch.float64)
    if ns.kind == "flow":
        return sig.clone()
    return torch.where(sig > 0, ns.t_of_edm_sigma(sig.clamp(min=1e-300)), torch.zeros_like(sig))


def final_sigma(schedule: Schedule, ns) -> tuple[float, str]:
    """Where the schedule ends, in the model's own σ, and what that end is: ``zero`` (σ = 0, a last step
    to the data), ``smallest training sigma`` (the noise schedule's t_min, diffusers' ``sigma_min``) or
    ``other`` (anywhere else, e.g. a problem's own end time); ``ns`` is the noise schedule its times live on."""
    t_end = schedule.times[-1]
    if t_end == 0.0:
        return 0.0, "zero"
    value = float(model_sigmas(ns, [t_end])[0])
    kind = "smallest training sigma" if math.isclose(t_end, float(ns.t_min), rel_tol=1e-9) else "other"
    return value, kind


def tuning_record(schedule: Schedule, conventions: dict | None, ns) -> dict:
    """The conventions a schedule was tuned for, as exports record them in their provenance: the sampler
    (steptune's loop on x = α x0 + σ ε), the model's conventions (``conventions``, else the schedule's own;
    None when unknown), its noise schedule ``ns``, the σ convention the exports use and the final σ."""
    model = {k: v for k, v in {**(schedule.conventions or {}), **(conventions or {})}.items()
             if k in (*MODEL_KEYS, "guidance_scale")}
    value, kind = final_sigma(schedule, ns)
    return {"sampler": SAMPLER, "state": STATE, "model": model if "prediction" in model else None,
            "noise": ns.to_dict(), "sigma": sigma_convention(ns), "final_sigma": value, "final": kind}


def tuned_model_conventions(schedule: Schedule, provenance: dict | None = None) -> dict | None:
    """The model conventions a schedule was tuned for: its own ``conventions``, else those an export's
    provenance records; None when neither says."""
    own = {k: v for k, v in (schedule.conventions or {}).items() if k in MODEL_KEYS and v is not None}
    if "prediction" in own:
        return own
    prov = provenance or {}
    recorded = (prov.get("tuned_for") or {}).get("model")
    if recorded is None:
        recorded = (prov.get("problem") or {}).get("conventions")
    return {k: v for k, v in recorded.items() if k in MODEL_KEYS} if recorded else None


_warned: set[str] = set()


def convention_mismatch(tuned: dict | None, running: dict) -> list[str]:
    """``name tuned -> running`` for each model convention (prediction, time input, time scale, sampler)
    the run differs in from what the schedule was tuned for; unknown ones are not compared."""
    if not tuned:
        return []
    out = []
    for k in (*MODEL_KEYS, "sampler"):
        a, b = tuned.get(k), running.get(k)
        if k == "time_scale":
            if "continuous" not in (tuned.get("time_input"), running.get("time_input")):
                continue
            a, b = float(a or 1.0), float(b or 1.0)
        if a is not None and b is not None and a != b:
            out.append(f"{k} {a!r} -> {b!r}")
    return out


def warn_other_conventions(tuned: dict | None, running: dict, where: str) -> bool:
    """Warn (once per place, tuned and running conventions) when a schedule runs under other conventions
    than it was tuned for; it still runs, but its tuning was measured on another kind of model or sampler.
    Returns whether there was a difference."""
    diff = convention_mismatch(tuned, running)
    if not diff:
        return False
    key = json.dumps([where, tuned, running], sort_keys=True, default=str)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"{where}: the schedule was tuned for other model conventions ({', '.join(diff)}); it runs, "
                      "but its tuning may not carry over: tune it for this model", UserWarning, stacklevel=3)
    return True
