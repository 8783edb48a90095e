"""Models as plug-ins: a callable plus its conventions (prediction type, time input, guidance)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .errors import NetworkOutputError
from .noise import NoiseSchedule, VPDiscrete

Tensor = torch.Tensor

PREDICTION_TYPES = ("eps", "x0", "v", "flow")
TIME_INPUTS = ("discrete", "continuous", "sigma")


@dataclass
class CallCount:
    n: int = 0


@dataclass
class Model:
    """A denoising network and how to talk to it.

    ``fn(x, time, **kwargs)`` returns the raw network output. ``prediction`` says what it
    predicts: ``eps`` (noise), ``x0`` (data), ``v`` (alpha eps - sigma x0, as diffusers'
    v-prediction) or ``flow`` (velocity eps - x0 of rectified flow). ``time_input`` says what it
    takes as time: ``discrete`` (diffusers' training timestep N t - 1, fractional between
    entries), ``continuous`` (t times ``time_scale``) or ``sigma`` (sigma/alpha, as k-diffusion
    and EDM models). With ``guidance_scale`` set, the output is
    uncond + scale (cond - uncond) with ``cond_kwargs`` and ``uncond_kwargs`` passed to ``fn``.
    ``data_mean`` is used by the ``mean`` analytical first step. ``time_differentiable`` says that ``fn`` is
    differentiable in its time input (a tensor), so refinement differentiates through it (``predict_at``) instead of
    taking a forward difference in time.
    """

    fn: Callable[..., Tensor]
    noise: NoiseSchedule
    prediction: str = "eps"
    time_input: str = "continuous"
    time_scale: float = 1.0
    guidance_scale: float | None = None
    cond_kwargs: dict = field(default_factory=dict)
    uncond_kwargs: dict = field(default_factory=dict)
    data_mean: Tensor | None = None
    time_differentiable: bool = False
    calls: int = 0

    def __post_init__(self):
        if self.prediction not in PREDICTION_TYPES:
            raise ValueError(
                f"model prediction {self.prediction!r} is unknown; use one of {', '.join(PREDICTION_TYPES)}")
        if self.time_input not in TIME_INPUTS:
            raise ValueError(f"model time_input {self.time_input!r} is unknown; use one of {', '.join(TIME_INPUTS)}")
        if self.time_input == "discrete" and not isinstance(self.noise, VPDiscrete):
            raise ValueError("model time_input 'discrete' needs a discrete VP noise schedule")

    @contextmanager
    def uncounted(self) -> Iterator[CallCount]:
        """Model calls made inside the block are left out of ``calls`` (reference solves, checks, fits); the
        yielded count holds how many there were once the block ends."""
        before = self.calls
        used = CallCount()
        try:
            yield used
        finally:
            used.n = self.calls - before
            self.calls = before

    def conventions(self) -> dict:
        return {"prediction": self.prediction, "time_input": self.time_input, "time_scale": self.time_scale,
                "guidance_scale": self.guidance_scale}

    def time_value(self, t: float) -> float:
        return float(self.time_tensor(t))

    def time_tensor(self, t: float | Tensor) -> float | Tensor:
        """The time input at ``t`` in this model's convention, differentiable in a tensor ``t``."""
        if self.time_input == "discrete":
            return self.noise.timestep(t)
        if self.time_input == "sigma":
            return self.noise.edm_sigma(t)
        return t * self.time_scale

    def raw(self, x: Tensor, t: float) -> Tensor:
        return self.call(x, torch.full((x.shape[0],), self.time_value(t), dtype=time_dtype(x), device=x.device))

    def call(self, x: Tensor, time_values: Tensor) -> Tensor:
        """The raw output for a batch whose samples may sit at different times (``time_values``: one time
        input per sample, in this model's convention), with guidance applied."""
        self.calls += 1
        cond_kwargs = self._with_sample_kwargs(x)
        if self.guidance_scale is None:
            return _same_shape(network_output(self.fn(x, time_values, **cond_kwargs)), x)
        cond = _same_shape(network_output(self.fn(x, time_values, **cond_kwargs)), x)
        uncond = _same_shape(network_output(self.fn(x, time_values, **self.uncond_kwargs)), x)
        return uncond + self.guidance_scale * (cond - uncond)

    def _with_sample_kwargs(self, x: Tensor) -> dict:
        """``cond_kwargs`` and, where ``fn`` defines ``sample_kwargs(n)``, the per-sample arguments for the batch's n
        samples (the first n of a bank) that ``cond_kwargs`` does not set already (``sample_batch`` sets them, tiled
        for its stacked runs), on x's device."""
        per_sample = getattr(self.fn, "sample_kwargs", None)
        if per_sample is None:
            return self.cond_kwargs
        extra = {k: v.to(x.device) if isinstance(v, Tensor) else v
                 for k, v in per_sample(x.shape[0]).items() if k not in self.cond_kwargs}
        return {**self.cond_kwargs, **extra} if extra else self.cond_kwargs

    def predict(self, x: Tensor, t: float, alpha: float, sigma: float,
                buf: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(eps, x0) at state x and time t; ``buf`` may receive the converted one of the two."""
        out = self.raw(x, t).to(x.dtype)
        return convert(out, x, alpha, sigma, self.prediction, buf)

    def predict_at(self, x: Tensor, t: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """``predict`` at a time given as a 0-d tensor with its alpha and sigma, differentiable in all three where
        the model is ``time_differentiable``."""
        time_values = self.time_tensor(t).to(time_dtype(x)).expand(x.shape[0])
        return convert(self.call(x, time_values).to(x.dtype), x, alpha.to(x.dtype), sigma.to(x.dtype),
                       self.prediction)


def _same_shape(out: Tensor, x: Tensor) -> Tensor:
    if out.shape != x.shape:
        raise NetworkOutputError(f"the network returned shape {tuple(out.shape)} for states of shape "
                                 f"{tuple(x.shape)}; it must return one prediction of the state's shape per state")
    return out


def time_dtype(x: Tensor) -> torch.dtype:
    """The dtype a model's time input takes beside a state ``x``: x's, but at least float32 (in half precision a
    timestep near 1000 is off by up to 1)."""
    return torch.promote_types(x.dtype, torch.float32)


def network_output(out) -> Tensor:
    """A network's prediction from what it returned: a diffusers-style output object gives its ``.sample`` (a dict
    its ``"sample"``), a tuple or list its first entry."""
    if isinstance(out, Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, dict) and "sample" in out:
        return out["sample"]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    what = (f"a dict with keys {', '.join(map(repr, out))} and no 'sample'" if isinstance(out, dict) else
            f"a {type(out).__name__}" + (" whose first entry is no tensor" if isinstance(out, (tuple, list)) else ""))
    raise NetworkOutputError(f"the network returned {what}; return the prediction as a tensor (or a tuple, a dict "
                             "or an output object holding it as its first entry or 'sample')")


def convert(out: Tensor, x: Tensor, alpha: float | Tensor, sigma: float | Tensor, prediction: str,
            buf: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Turn a raw model output into (eps, x0), using x = alpha x0 + sigma eps (alpha and sigma as numbers or 0-d
    tensors)."""
    tensors = isinstance(alpha, Tensor)
    if prediction == "eps":
        return out, (x - sigma * out) / alpha if tensors else torch.add(x, out, alpha=-sigma, out=buf).div_(alpha)
    if prediction == "x0":
        return (x - alpha * out) / sigma if tensors else torch.add(x, out, alpha=-alpha, out=buf).div_(sigma), out
    if prediction == "v":
        n2 = alpha * alpha + sigma * sigma
        return (sigma * x + alpha * out) / n2, (alpha * x - sigma * out) / n2
    # flow: u = eps - x0
    s = alpha + sigma
    if tensors:
        return (x + alpha * out) / s, (x - sigma * out) / s
    return torch.add(x, out, alpha=alpha).div_(s), torch.add(x, out, alpha=-sigma).div_(s)
