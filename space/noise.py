"""Noise schedules: alpha(t), sigma(t), lambda(t) = log(alpha/sigma) and the inverse t(lambda).

Every schedule works in float64 on a continuous time t that runs from the clean end (t = 0,
sigma = 0 wherever the schedule defines it) to the noisy end ``T``. Discrete VP schedules use the
conventions of DPM-Solver's ``NoiseScheduleVP``: training step n sits at t = (n + 1) / N and
log alpha is interpolated piecewise-linearly in t.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import numpy as np
import torch

from .errors import ScheduleError

Tensor = torch.Tensor
_F64 = torch.float64


def _as_tensor(t) -> Tensor:
    return torch.as_tensor(t, dtype=_F64)


def _interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Piecewise-linear interpolation with linear extrapolation at both ends (xp increasing)."""
    idx = torch.searchsorted(xp, x.clamp(min=xp[0], max=xp[-1])).clamp(1, len(xp) - 1)
    x0, x1, f0, f1 = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
    return f0 + (x - x0) * (f1 - f0) / (x1 - x0)


def _interp_array(x: np.ndarray, xp: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """:func:`_interp` on float64 arrays."""
    idx = np.clip(np.searchsorted(xp, np.clip(x, xp[0], xp[-1])), 1, len(xp) - 1)
    x0, x1, f0, f1 = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
    return f0 + (x - x0) * (f1 - f0) / (x1 - x0)


def _vp_lam_array(la: np.ndarray) -> np.ndarray:
    """lambda from log alpha on a VP schedule (log sigma = log(1 - alpha^2) / 2), float64 arrays."""
    with np.errstate(divide="ignore"):
        return la - 0.5 * np.log(-np.expm1(2.0 * la))


def _vp_log_alpha_array(lam: np.ndarray) -> np.ndarray:
    """:func:`log_alpha_from_lambda` on float64 arrays."""
    return -0.5 * np.logaddexp(0.0, -2.0 * np.asarray(lam, dtype=np.float64))


def _through_torch(fn, x: np.ndarray, chunk: int = 8) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    flat = x.reshape(-1)
    out = [fn(torch.from_numpy(flat[i:i + chunk].copy())).numpy() for i in range(0, len(flat), chunk)]
    return (np.concatenate(out) if out else flat.copy()).reshape(x.shape)


def log_alpha_from_lambda(lam: Tensor) -> Tensor:
    """For VP schedules (alpha^2 + sigma^2 = 1)."""
    return -0.5 * torch.logaddexp(torch.zeros_like(lam), -2.0 * lam)


class NoiseSchedule:
    """Base class. Subclasses implement ``log_alpha`` and ``log_sigma`` (or override the others)."""

    kind: str = ""
    T: float = 1.0
    t_min: float = 1e-3

    def log_alpha(self, t) -> Tensor:
        raise NotImplementedError

    def log_sigma(self, t) -> Tensor:
        la = self.log_alpha(t)
        return 0.5 * torch.log(-torch.expm1(2.0 * la))

    def alpha(self, t) -> Tensor:
        return torch.exp(self.log_alpha(t))

    def sigma(self, t) -> Tensor:
        return torch.exp(self.log_sigma(t))

    def lam(self, t) -> Tensor:
        return self.log_alpha(t) - self.log_sigma(t)

    def t_of_lambda(self, lam) -> Tensor:
        raise NotImplementedError

    # ``lam`` and ``t_of_lambda`` on float64 numpy arrays, without autograd or torch's cost per call, for code that
    # converts thousands of small sets of times (a searcher making candidates); equal to them to round-off, and
    # element by element, so an array gives what its values give one at a time. A schedule without its own numpy
    # form goes through its torch functions, a few values per call (short enough that torch takes its element by
    # element path)
    def lam_array(self, t: np.ndarray) -> np.ndarray:
        return _through_torch(self.lam, t)

    def t_of_lambda_array(self, lam: np.ndarray) -> np.ndarray:
        return _through_torch(self.t_of_lambda, lam)

    def edm_sigma(self, t) -> Tensor:
        """sigma / alpha, the noise level k-diffusion and EDM use."""
        return torch.exp(-self.lam(t))

    def t_of_edm_sigma(self, s) -> Tensor:
        return self.t_of_lambda(-torch.log(_as_tensor(s)))

    def to_dict(self) -> dict:
        raise NotImplementedError

    def __eq__(self, other) -> bool:
        return isinstance(other, NoiseSchedule) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(repr(self.to_dict()))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items() if k not in ("kind", "alphas_cumprod"))
        return f"{type(self).__name__}({args})"


def betas_for(kind: str, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """The beta tables diffusers builds for ``beta_schedule`` = linear / scaled_linear / squaredcos_cap_v2."""
    n = num_train_timesteps
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float32)
    if kind == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float32) ** 2
    if kind == "squaredcos_cap_v2":

        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)]
        return torch.tensor(betas, dtype=torch.float32)
    raise ValueError(f"unknown beta schedule {kind!r}; use linear, scaled_linear or squaredcos_cap_v2")


@dataclass(frozen=True, eq=False, repr=False)
class VPDiscrete(NoiseSchedule):
    """A discrete-time VP schedule given by its alphas_cumprod table (N entries).

    ``name`` records how the table was made (e.g. ``ddpm-linear``) so the JSON form stays short;
    a table that came from elsewhere is stored in full.
    """

    alphas_cumprod: tuple[float, ...]
    name: str = "custom"
    kind: str = field(default="vp-discrete", init=False)

    def __post_init__(self):
        ac = torch.tensor(self.alphas_cumprod, dtype=_F64)
        if ac.ndim != 1 or len(ac) < 2 or not bool(((ac > 0) & (ac <= 1)).all()):
            raise ValueError("alphas_cumprod must be a 1-D table of at least 2 values in (0, 1]")
        n = len(ac)
        object.__setattr__(self, "_t", torch.linspace(0.0, 1.0, n + 1, dtype=_F64)[1:])
        object.__setattr__(self, "_la", 0.5 * torch.log(ac))
        object.__setattr__(self, "_t_np", self._t.numpy())
        object.__setattr__(self, "_la_np", self._la.numpy())

    @property
    def N(self) -> int:
        return len(self.alphas_cumprod)

    @property
    def T(self) -> float:  # type: ignore[override]
        return 1.0

    @property
    def t_min(self) -> float:  # type: ignore[override]
        return 1.0 / self.N

    @classmethod
    def from_betas(cls, betas, name: str = "custom") -> VPDiscrete:
        betas = torch.as_tensor(betas)
        ac = torch.cumprod(1.0 - betas, dim=0)  # in the betas' dtype, as diffusers does
        return cls(tuple(ac.double().tolist()), name=name)

    @classmethod
    def named(cls, name: str) -> VPDiscrete:
        kinds = {
            "ddpm-linear": ("linear", 1e-4, 0.02),
            "sd-scaled-linear": ("scaled_linear", 0.00085, 0.012),
            "cosine": ("squaredcos_cap_v2", 0.0, 0.0),
        }
        if name not in kinds:
            raise ValueError(f"unknown discrete schedule {name!r}; choose from {', '.join(kinds)}")
        kind, b0, b1 = kinds[name]
        return cls.from_betas(betas_for(kind, 1000, b0, b1), name=name)

    def log_alpha(self, t) -> Tensor:
        t = _as_tensor(t)
        la = _interp(t.reshape(-1), self._t, self._la).reshape(t.shape)
        return torch.where(t <= 0, torch.zeros_like(la), la)

    def t_of_lambda(self, lam) -> Tensor:
        lam = _as_tensor(lam)
        la = log_alpha_from_lambda(lam)
        t = _interp(la.reshape(-1), self._la.flip(0), self._t.flip(0)).reshape(la.shape)
        return torch.where(torch.isinf(lam) & (lam > 0), torch.zeros_like(t), t)

    def lam_array(self, t: np.ndarray) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64)
        return _vp_lam_array(np.where(t <= 0, 0.0, _interp_array(t, self._t_np, self._la_np)))

    def t_of_lambda_array(self, lam: np.ndarray) -> np.ndarray:
        lam = np.asarray(lam, dtype=np.float64)
        t = _interp_array(_vp_log_alpha_array(lam), self._la_np[::-1], self._t_np[::-1])
        return np.where(np.isposinf(lam), 0.0, t)

    def timestep(self, t) -> Tensor:
        """The (fractional) training timestep a diffusers UNet takes: N t - 1."""
        return self.N * _as_tensor(t) - 1.0

    def t_of_timestep(self, k) -> Tensor:
        return (_as_tensor(k) + 1.0) / self.N

    def to_dict(self) -> dict:
        if self.name != "custom":
            return {"kind": self.kind, "name": self.name}
        return {"kind": self.kind, "name": self.name, "alphas_cumprod": list(self.alphas_cumprod)}


@dataclass(frozen=True, eq=False, repr=False)
class VPLinear(NoiseSchedule):
    """Continuous VP-SDE with linear beta(t) (ScoreSDE): log alpha = -t^2 (b1-b0)/4 - t b0/2."""

    beta_0: float = 0.1
    beta_1: float = 20.0
    T: float = 1.0
    t_min: float = 1e-3
    kind: str = field(default="vp-linear", init=False)

    def log_alpha(self, t) -> Tensor:
        t = _as_tensor(t)
        return -0.25 * t**2 * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0

    def t_of_lambda(self, lam) -> Tensor:
        lam = _as_tensor(lam)
        tmp = 2.0 * (self.beta_1 - self.beta_0) * torch.logaddexp(-2.0 * lam, torch.zeros_like(lam))
        delta = self.beta_0**2 + tmp
        return tmp / (torch.sqrt(delta) + self.beta_0) / (self.beta_1 - self.beta_0)

    def lam_array(self, t: np.ndarray) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64)
        return _vp_lam_array(-0.25 * t**2 * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0)

    def t_of_lambda_array(self, lam: np.ndarray) -> np.ndarray:
        tmp = 2.0 * (self.beta_1 - self.beta_0) * np.logaddexp(-2.0 * np.asarray(lam, dtype=np.float64), 0.0)
        return tmp / (np.sqrt(self.beta_0**2 + tmp) + self.beta_0) / (self.beta_1 - self.beta_0)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "beta_0": self.beta_0, "beta_1": self.beta_1, "T": self.T, "t_min": self.t_min}


@dataclass(frozen=True, eq=False, repr=False)
class VPCosine(NoiseSchedule):
    """Continuous cosine VP schedule (iDDPM): alpha_bar(t) = f(t)/f(0), f = cos((t+s)/(1+s) pi/2)."""

    s: float = 0.008
    T: float = 0.9946
    t_min: float = 1e-3
    kind: str = field(default="vp-cosine", init=False)

    def _la0(self) -> float:
        return math.log(math.cos(self.s / (1.0 + self.s) * math.pi / 2.0))

    def log_alpha(self, t) -> Tensor:
        t = _as_tensor(t)
        return torch.log(torch.cos((t + self.s) / (1.0 + self.s) * math.pi / 2.0)) - self._la0()

    def t_of_lambda(self, lam) -> Tensor:
        la = log_alpha_from_lambda(_as_tensor(lam))
        return torch.arccos(torch.exp(la + self._la0())) * 2.0 * (1.0 + self.s) / math.pi - self.s

    def lam_array(self, t: np.ndarray) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64)
        return _vp_lam_array(np.log(np.cos((t + self.s) / (1.0 + self.s) * math.pi / 2.0)) - self._la0())

    def t_of_lambda_array(self, lam: np.ndarray) -> np.ndarray:
        return np.arccos(np.exp(_vp_log_alpha_array(lam) + self._la0())) * 2.0 * (1.0 + self.s) / math.pi - self.s

    def to_dict(self) -> dict:
        return {"kind": self.kind, "s": self.s, "T": self.T, "t_min": self.t_min}


@dataclass(frozen=True, eq=False, repr=False)
class EDM(NoiseSchedule):
    """Variance-exploding EDM schedule: alpha = 1, sigma = t."""

    T: float = 80.0
    t_min: float = 0.002
    kind: str = field(default="edm", init=False)

    def log_alpha(self, t) -> Tensor:
        return torch.zeros_like(_as_tensor(t))

    def log_sigma(self, t) -> Tensor:
        return torch.log(_as_tensor(t))

    def t_of_lambda(self, lam) -> Tensor:
        return torch.exp(-_as_tensor(lam))

    def lam_array(self, t: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore"):
            return -np.log(np.asarray(t, dtype=np.float64))

    def t_of_lambda_array(self, lam: np.ndarray) -> np.ndarray:
        return np.exp(-np.asarray(lam, dtype=np.float64))

    def to_dict(self) -> dict:
        return {"kind": self.kind, "T": self.T, "t_min": self.t_min}


@dataclass(frozen=True, eq=False, repr=False)
class RectifiedFlow(NoiseSchedule):
    """Rectified flow / flow matching: alpha = 1 - t, sigma = t."""

    T: float = 1.0
    t_min: float = 1e-3
    kind: str = field(default="flow", init=False)

    def log_alpha(self, t) -> Tensor:
        return torch.log1p(-_as_tensor(t))

    def log_sigma(self, t) -> Tensor:
        return torch.log(_as_tensor(t))

    def t_of_lambda(self, lam) -> Tensor:
        return torch.sigmoid(-_as_tensor(lam))

    def lam_array(self, t: np.ndarray) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64)
        with np.errstate(divide="ignore"):
            return np.log1p(-t) - np.log(t)

    def t_of_lambda_array(self, lam: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(np.asarray(lam, dtype=np.float64)))

    def to_dict(self) -> dict:
        return {"kind": self.kind, "T": self.T, "t_min": self.t_min}


NAMED = {
    "ddpm-linear": lambda: VPDiscrete.named("ddpm-linear"),
    "sd-scaled-linear": lambda: VPDiscrete.named("sd-scaled-linear"),
    "cosine-discrete": lambda: VPDiscrete.named("cosine"),
    "vp-linear": VPLinear,
    "vp-cosine": VPCosine,
    "edm": EDM,
    "flow": RectifiedFlow,
}


def get(name: str) -> NoiseSchedule:
    """A noise schedule by its short name (see ``NAMED``)."""
    if name not in NAMED:
        raise ScheduleError(f"unknown noise schedule {name!r}; choose from {', '.join(NAMED)}")
    return NAMED[name]()


_CONTINUOUS = {"vp-linear": VPLinear, "vp-cosine": VPCosine, "edm": EDM, "flow": RectifiedFlow}


def name_of(ns: NoiseSchedule) -> str | None:
    """The short name (see ``NAMED``) of a noise schedule equal to ``ns``, or None."""
    return next((name for name, make in NAMED.items() if make() == ns), None)


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def from_dict(d: dict) -> NoiseSchedule:
    """The noise schedule of its ``to_dict()`` form; a malformed one raises ScheduleError naming the key."""
    if not isinstance(d, dict):
        raise ScheduleError(f"must be an object with a 'kind', not {type(d).__name__}")
    d = dict(d)
    kind = d.pop("kind", None)
    if kind == "vp-discrete":
        name = d.get("name", "custom")
        if name != "custom":
            try:
                return VPDiscrete.named(name)
            except ValueError as e:
                raise ScheduleError(f"'name': {e}") from None
        table = d.get("alphas_cumprod")
        if not isinstance(table, list) or not all(_number(a) for a in table):
            raise ScheduleError("a custom vp-discrete schedule needs 'alphas_cumprod', a list of numbers")
        try:
            return VPDiscrete(tuple(table), name="custom")
        except ValueError as e:
            raise ScheduleError(f"'alphas_cumprod': {e}") from None
    if kind not in _CONTINUOUS:
        raise ScheduleError(f"'kind' is {kind!r}, not a known noise schedule; use one of vp-discrete, "
                            f"{', '.join(_CONTINUOUS)}")
    cls = _CONTINUOUS[kind]
    keys = [f.name for f in fields(cls) if f.init]
    for k, v in d.items():
        if k not in keys:
            raise ScheduleError(f"{kind} has no key {k!r}; its keys are kind, {', '.join(keys)}")
        if not _number(v):
            raise ScheduleError(f"{k!r} of {kind} must be a finite number, not {v!r}")
    return cls(**d)
