"""Problems: a model with its noise schedule and conventions, the data it should produce, and the
time interval a schedule must cover.

A ``Problem`` is what an evaluator needs from a model-and-data pair: the ``model`` the sampler runs,
``predict(x, alpha, sigma)`` for the reference ODE, ``sample_prior`` for the noise bank,
``data_samples`` for distribution metrics, optionally ``log_prob`` (NLL), ``identity()`` for
cache keys and ``reference_states`` for the states a schedule is measured against. The
Gaussian-mixture problems here answer all of it exactly; ``NeuralProblem``, a problem built on a
trained network, overrides what it cannot answer from a mixture.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from steptune.space import Model
from steptune.space import noise as noise_mod
from steptune.space.noise import EDM, NoiseSchedule, RectifiedFlow, VPDiscrete

from .cache import atomic_torch_save, content_digest, load_cached
from .gmm import GaussianMixture
from .neural_reference import ReferenceSettings, cached_states
from .reference import DEFAULT_ATOL, DEFAULT_RTOL, ReferenceStates, ode_reference_states

Tensor = torch.Tensor
_F64 = torch.float64


def default_conventions(noise: NoiseSchedule) -> tuple[str, str]:
    """(prediction, time_input) a model trained on ``noise`` usually has: eps + training timestep for discrete
    VP tables, eps + t for continuous VP, a denoiser taking sigma for EDM, a velocity for rectified flow."""
    if isinstance(noise, VPDiscrete):
        return "eps", "discrete"
    if isinstance(noise, EDM):
        return "x0", "sigma"
    if isinstance(noise, RectifiedFlow):
        return "flow", "continuous"
    return "eps", "continuous"


def default_t_start(noise: NoiseSchedule) -> float:
    """``noise.T``, unless lambda(T) is infinite (rectified flow: alpha(1) = 0); then the time whose
    lambda mirrors the clean end, -lambda(t_min) (t = 0.999 for flow), where every solver can start."""
    T = float(noise.T)
    if math.isfinite(float(noise.lam(T))):
        return T
    t = float(noise.t_of_lambda(-noise.lam(noise.t_min)))
    return float(f"{t:.12g}")


@dataclass
class Problem:
    """A model plus its data distribution and the interval [t_end, t_start] schedules integrate over.

    ``mixture`` (optional) is the data distribution when it is known exactly; with it, ``predict``,
    ``data_samples`` and ``log_prob`` are exact. ``source`` records how the data or model was made
    (JSON-able; part of ``identity()``). ``bank_sizes`` (train, held-out; None: the evaluator's) suit the
    model's cost; ``quality(x) -> dict`` (optional) adds expensive distribution metrics, named
    ``quality_metrics``, on held-out evaluations.
    """

    name: str
    noise: NoiseSchedule
    model: Model
    shape: tuple[int, ...]
    t_start: float | None = None
    t_end: float | None = None
    mixture: GaussianMixture | None = None
    source: dict = field(default_factory=dict)
    bank_sizes: tuple[int, int] | None = None
    quality: Callable[[Tensor], dict] | None = None
    quality_metrics: tuple[str, ...] = ()

    def __post_init__(self):
        self.shape = tuple(int(s) for s in self.shape)
        self.t_start = default_t_start(self.noise) if self.t_start is None else float(self.t_start)
        self.t_end = float(self.noise.t_min) if self.t_end is None else float(self.t_end)
        if not 0.0 <= self.t_end < self.t_start:
            raise ValueError(f"problem {self.name!r}: need 0 <= t_end < t_start (got t_end={self.t_end:g}, "
                             f"t_start={self.t_start:g})")
        if float(self.noise.sigma(self.t_start)) <= 0:
            raise ValueError(f"problem {self.name!r}: sigma(t_start) must be positive")
        if self.mixture is not None and self.mixture.dim != self.dim:
            raise ValueError(f"problem {self.name!r}: the mixture is {self.mixture.dim}-D but shape {self.shape} "
                             f"has {self.dim} values")

    @property
    def dim(self) -> int:
        return math.prod(self.shape)

    def to(self, device) -> Problem:
        """Place what the model runs on ``device`` (in place). The exact mixture moves with its inputs."""
        return self

    def identity(self) -> dict:
        """Everything this problem's results depend on, JSON-able (cache keys, database rows)."""
        data = dict(self.source)
        if self.mixture is not None:
            data["mixture_sha256"] = self.mixture.fingerprint()
        return {"name": self.name, "noise": self.noise.to_dict(), "model": self.model.conventions(),
                "shape": list(self.shape), "t_start": self.t_start, "t_end": self.t_end, "data": data}

    def alpha_sigma(self, t: float) -> tuple[float, float]:
        return float(self.noise.alpha(t)), float(self.noise.sigma(t))

    def reference_states(self, x_T: Tensor, times: list[float], *, bank: dict | None = None,
                         cache_dir: str | Path | None = None, rtol: float = DEFAULT_RTOL,
                         atol: float = DEFAULT_ATOL) -> ReferenceStates:
        """The states at ``times[1:]`` of the probability-flow ODE from ``x_T`` at ``times[0]`` (decreasing), what
        schedules are measured against: solved to ``rtol``/``atol`` with ``predict``, each segment cached under
        ``cache_dir/reference/`` (None: not cached) keyed by the problem, the noise bank ``bank`` and the times."""
        return ode_reference_states(self, x_T, times, bank=bank, cache_dir=cache_dir, rtol=rtol, atol=atol)

    # ---- what the reference ODE needs ----------------------------------------------------------

    def predict(self, x: Tensor, alpha: float, sigma: float) -> tuple[Tensor, Tensor]:
        """(eps_hat, x0_hat) at state x on the scale (alpha, sigma); any pair with the right ratio works.

        Exact for a mixture; otherwise the model is called at t = t(lambda) with x rescaled to that
        time's (alpha(t), sigma(t)).
        """
        if self.mixture is not None:
            return self.mixture.to(x.device).posterior(x, alpha, sigma)
        alpha, sigma = float(alpha), float(sigma)
        lam = math.inf if sigma == 0 else (-math.inf if alpha == 0 else math.log(alpha / sigma))
        t = float(self.noise.t_of_lambda(torch.tensor(lam, dtype=_F64)))
        a_t, s_t = self.alpha_sigma(t)
        c = s_t / sigma if sigma > 0 else a_t / alpha
        with self.model.uncounted():
            return self.model.predict(c * x, t, a_t, s_t)

    # ---- samples and densities -----------------------------------------------------------------

    @property
    def exact_at_zero(self) -> bool:
        """Whether ``predict`` is exact and well conditioned down to sigma = 0 (a known mixture)."""
        return self.mixture is not None

    @property
    def has_data(self) -> bool:
        """Whether ``data_samples`` works (a subclass with a data set overrides both)."""
        return self.mixture is not None

    def data_samples(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n samples of the data distribution, (n, *shape), float64."""
        if self.mixture is None:
            raise NotImplementedError(f"problem {self.name!r} has no data sampler")
        return self.mixture.sample(n, generator).reshape(n, *self.shape)

    def marginal_samples(self, n: int, t: float, generator: torch.Generator | None = None) -> Tensor:
        """n samples of x_t = alpha(t) x0 + sigma(t) eps: data first, then the noise, from ``generator``."""
        x0 = self.data_samples(n, generator)
        eps = torch.randn(n, *self.shape, generator=generator, dtype=_F64).to(x0.device)
        a, s = self.alpha_sigma(t)
        return a * x0 + s * eps

    def sample_prior(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Initial states at t_start: the exact marginal alpha_T x0 + sigma_T eps where data can be
        sampled, else alpha_T (model.data_mean or 0) + sigma_T eps."""
        if self.has_data:
            return self.marginal_samples(n, self.t_start, generator)
        eps = torch.randn(n, *self.shape, generator=generator, dtype=_F64)
        a, s = self.alpha_sigma(self.t_start)
        mean = self.model.data_mean
        return s * eps if mean is None or a == 0 else a * mean.to("cpu", _F64).expand_as(eps) + s * eps

    @property
    def has_log_prob(self) -> bool:
        return self.mixture is not None

    def log_prob(self, x: Tensor, t: float = 0.0) -> Tensor:
        """log density of the marginal at time t (the data density at t = 0), (n,)."""
        if self.mixture is None:
            raise NotImplementedError(f"problem {self.name!r} has no density")
        a, s = (1.0, 0.0) if t == 0 else self.alpha_sigma(t)
        return self.mixture.to(x.device).log_prob(x, a, s)


@dataclass
class NeuralProblem(Problem):
    """A problem whose model is a network: no exact data distribution, a converged many-step reference
    (``reference_settings``) and bank sizes that suit a network's cost.

    A ``quality`` object with a ``features(x)`` method also yields ``fd_reference``, the Fréchet distance
    of the samples' features to the reference solutions' features: unlike a distance to data, it does
    not grow when a more accurate sampler follows a strongly guided ODE away from the data.

    ``decode(x)`` (optional) turns final states (n, *shape) into images (n, 1 or 3, H, W) with values in [0, 1]:
    a problem that has it is an image problem, whose samples can be looked at (``steptune.grids``)."""

    bank_sizes: tuple[int, int] | None = (64, 256)
    reference_settings: ReferenceSettings = field(default_factory=ReferenceSettings)
    decode: Callable[[Tensor], Tensor] | None = None
    code_sha256: str | None = None  # of the network's own source files: their references are solved again on a change

    def identity(self) -> dict:
        return {**super().identity(), "reference": self.reference_settings.to_dict()}

    def to(self, device) -> NeuralProblem:
        """The network (and the quality scorer's) and the conditioning tensors on ``device``, in place, where
        they can move."""
        for part in (self.model.fn, self.quality):
            if callable(getattr(part, "to", None)):
                part.to(device)
        m = self.model
        m.cond_kwargs, m.uncond_kwargs = ({k: v.to(device) if isinstance(v, Tensor) else v for k, v in kw.items()}
                                          for kw in (m.cond_kwargs, m.uncond_kwargs))
        return self

    def reference_states(self, x_T: Tensor, times: list[float], *, bank: dict | None = None,
                         cache_dir: str | Path | None = None, rtol: float = DEFAULT_RTOL,
                         atol: float = DEFAULT_ATOL) -> ReferenceStates:
        """The converged many-step solve of ``neural_reference`` (``reference_settings``; the ODE tolerances
        ``rtol``/``atol`` do not apply), cached under ``cache_dir/reference/``."""
        return cached_states(self, x_T, times, bank=bank, cache_dir=cache_dir, settings=self.reference_settings)


class MixtureDenoiser:
    """The exact denoiser of a mixture, presented as a network: ``fn(x, time) -> raw output`` in the
    given prediction type, taking the given time input (see ``steptune.space.Model``)."""

    def __init__(self, mixture: GaussianMixture, noise: NoiseSchedule, prediction: str, time_input: str,
                 time_scale: float = 1.0):
        self.mixture, self.noise = mixture, noise
        self.prediction, self.time_input, self.time_scale = prediction, time_input, time_scale

    def t_of(self, tv: float) -> float:
        return float(self._t(tv))

    def _at(self, x: Tensor, tv: float) -> Tensor:
        t = self.t_of(tv)
        return self._output(x, float(self.noise.alpha(t)), float(self.noise.sigma(t)))

    def _t(self, tv: float | Tensor) -> float | Tensor:
        """The time of time input ``tv``, differentiable in a tensor ``tv``."""
        if self.time_input == "discrete":
            return self.noise.t_of_timestep(tv)
        if self.time_input == "sigma":
            return self.noise.t_of_edm_sigma(tv)
        return tv / self.time_scale

    def _output(self, x: Tensor, a: float | Tensor, s: float | Tensor) -> Tensor:
        eps, x0 = self.mixture.to(x.device).posterior(x, a, s)
        if self.prediction == "eps":
            return eps
        if self.prediction == "x0":
            return x0
        if self.prediction == "v":
            return a * eps - s * x0
        return eps - x0  # flow velocity

    def __call__(self, x: Tensor, time: Tensor) -> Tensor:
        tv = torch.as_tensor(time).reshape(-1)
        if tv.requires_grad and bool((tv == tv[0]).all()):  # a refinement differentiates through the time
            t = self._t(tv[0].to(_F64))
            out = self._output(x, self.noise.alpha(t), self.noise.sigma(t))
        elif tv.numel() == 1 or bool((tv == tv[0]).all()):
            out = self._at(x, float(tv[0]))
        else:
            out = torch.empty(x.shape, dtype=_F64, device=x.device)
            for v in torch.unique(tv).tolist():
                idx = tv == v
                out[idx] = self._at(x[idx], v)
        return out.to(x.dtype)


def mixture_problem(mixture: GaussianMixture, noise: NoiseSchedule | str = "vp-linear", name: str = "gmm",
                    shape: tuple[int, ...] | None = None, prediction: str | None = None,
                    time_input: str | None = None, time_scale: float = 1.0, t_start: float | None = None,
                    t_end: float | None = None, source: dict | None = None) -> Problem:
    """A problem whose data is ``mixture`` and whose model is its exact denoiser."""
    ns = noise_mod.get(noise) if isinstance(noise, str) else noise
    p_default, ti_default = default_conventions(ns)
    prediction = p_default if prediction is None else prediction
    time_input = ti_default if time_input is None else time_input
    shape = (mixture.dim,) if shape is None else tuple(shape)
    fn = MixtureDenoiser(mixture, ns, prediction, time_input, time_scale)
    model = Model(fn, ns, prediction=prediction, time_input=time_input, time_scale=time_scale,
                  data_mean=mixture.mean.reshape(shape), time_differentiable=True)
    return Problem(name=name, noise=ns, model=model, shape=shape, t_start=t_start, t_end=t_end, mixture=mixture,
                   source=dict(source or {}))


# ---- named problems -------------------------------------------------------------------------------


def ring_mixture(n_ring: int = 8, radius: float = 1.5, radial_std: float = 0.08, tangential_std: float = 0.25,
                 centre_std: tuple[float, float] = (0.2, 0.1), centre_weight: float = 0.2) -> GaussianMixture:
    """A 2-D toy: ``n_ring`` elongated Gaussians on a circle (long axis along the circle) plus a centre one."""
    means, covs = [], []
    for k in range(n_ring):
        th = 2 * math.pi * k / n_ring
        u = torch.tensor([math.cos(th), math.sin(th)], dtype=_F64)
        v = torch.tensor([-math.sin(th), math.cos(th)], dtype=_F64)
        means.append(radius * u)
        covs.append(radial_std**2 * torch.outer(u, u) + tangential_std**2 * torch.outer(v, v))
    means.append(torch.zeros(2, dtype=_F64))
    covs.append(torch.diag(torch.tensor(centre_std, dtype=_F64) ** 2))
    weights = [(1 - centre_weight) / n_ring] * n_ring + [centre_weight]
    return GaussianMixture(weights, torch.stack(means), torch.stack(covs))


def digits_data() -> Tensor:
    """scikit-learn's 8x8 digits (1797 x 64), pixels scaled from [0, 16] to [-1, 1], float64."""
    from sklearn.datasets import load_digits

    return torch.as_tensor(load_digits().data, dtype=_F64) / 8.0 - 1.0


def digits_mixture(n_components: int = 16, reg_covar: float = 1e-3, seed: int = 0,
                   cache_dir: str | Path | None = "runs/cache") -> GaussianMixture:
    """A full-covariance mixture fitted to the digits (deterministic, about a second); the fitted
    parameters are kept under ``cache_dir/gmm/`` keyed by the fit settings (None: always refit)."""
    import sklearn

    settings = {"data": "sklearn-digits", "scale": "[-1,1]", "n_components": n_components, "reg_covar": reg_covar,
                "seed": seed, "sklearn": sklearn.__version__}
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / "gmm" / f"digits-{content_digest(settings, compact=False)[:24]}.pt"
    stored = load_cached(path, GaussianMixture.from_state_dict)
    if stored is not None:
        return stored
    mixture = GaussianMixture.fit(digits_data(), n_components, reg_covar=reg_covar, seed=seed)
    if path is not None:
        atomic_torch_save(mixture.state_dict(), path)
    return mixture


def _gmm_2d(noise: NoiseSchedule, **opts) -> Problem:
    return mixture_problem(ring_mixture(), noise, name="gmm-2d", source={"kind": "gmm", "data": "ring-8+centre"},
                           **opts)


def _gmm_digits(noise: NoiseSchedule, n_components: int = 16, reg_covar: float = 1e-3, seed: int = 0,
                cache_dir: str | Path | None = "runs/cache", **opts) -> Problem:
    mixture = digits_mixture(n_components, reg_covar, seed, cache_dir)
    source = {"kind": "gmm", "data": "sklearn-digits", "n_components": n_components, "reg_covar": reg_covar,
              "seed": seed}
    return mixture_problem(mixture, noise, name="gmm-digits", source=source, **opts)


PROBLEMS: dict[str, Callable[..., Problem]] = {"gmm-2d": _gmm_2d, "gmm-digits": _gmm_digits}


def problem_names() -> list[str]:
    return list(PROBLEMS)


def get_problem(name: str, noise: NoiseSchedule | str = "vp-linear", **opts) -> Problem:
    """A named problem on a noise schedule (a name from ``steptune.space.noise.NAMED`` or an instance).

    Options for every problem: ``prediction``, ``time_input``, ``time_scale``, ``t_start``, ``t_end``.
    ``gmm-digits`` also takes ``n_components`` (16), ``reg_covar`` (1e-3), ``seed`` (0), ``cache_dir``.
    """
    if name not in PROBLEMS:
        raise ValueError(f"unknown problem {name!r}; choose from {', '.join(PROBLEMS)}")
    ns = noise_mod.get(noise) if isinstance(noise, str) else noise
    try:
        return PROBLEMS[name](ns, **opts)
    except TypeError as e:
        if "unexpected keyword argument" not in str(e):
            raise
        raise ValueError(f"problem {name!r}: {e}") from None
