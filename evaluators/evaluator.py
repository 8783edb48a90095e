"""The Evaluator: what a schedule is worth on a problem, measured on fixed noise banks.

Two banks of initial states (common random numbers: every schedule sees the same noise) are drawn
once: ``train`` (seed) for searching and ``heldout`` (seed + 1000, independent) for confirming. A
bank is drawn in blocks of 64 samples, each block from its own generator, so a bank of n states is the
first n states of every larger bank with the same seed: an evaluation of n samples means the same noise
whatever size the bank was given. For each bank the evaluator keeps

* the reference: the probability-flow ODE solved to high accuracy from the bank (cached on disk),
* a data set of the same size from the exact marginal at the end time (for the sliced Wasserstein
  distance), drawn with its own seed.

``evaluate`` runs a schedule on the first ``n`` states of a bank (cheap fidelity: small ``n``) and
reports the error against the reference (``rmse``; ``median_err``, the median over samples of each
sample's RMS error, is robust to the few samples that end in another mode than the reference), the
sliced Wasserstein distance of the samples to the data set (``sw``) and, where the problem has a
density, the mean negative log-likelihood per dimension under the marginal at the end time (``nll``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from steptune.space import NonFiniteError, Schedule, ScheduleError, sample
from steptune.space.batch import sample_batch
from steptune.space.noise import VPDiscrete
from steptune.space.sampler import check_compatible

from . import metrics
from .problems import Problem
from .reference import DEFAULT_ATOL, DEFAULT_RTOL

Tensor = torch.Tensor

BANK_VERSION = 2  # 2: drawn in blocks, so that banks of different sizes share their first states
BLOCK = 64
BANKS = ("train", "heldout")
HELDOUT_OFFSET = 1000
DATA_OFFSET = 7919  # seed offset of a bank's data set (sliced Wasserstein targets)


def draw_in_blocks(draw, n: int, seed: int) -> Tensor:
    """n samples of ``draw(m, generator)``, drawn BLOCK at a time, block k from a generator seeded by
    (seed, k): the first n samples are the same for every total drawn."""
    blocks = [draw(BLOCK, torch.Generator().manual_seed(int(np.random.SeedSequence([seed, k]).generate_state(1)[0])))
              for k in range(-(-n // BLOCK))]
    return torch.cat(blocks)[:n]


@dataclass
class EvalResult:
    """The outcome of one evaluation. A diverged run has status ``failed``, the error text, and
    every metric set to inf."""

    nfe: int
    metrics: dict[str, float]
    status: str
    error: str | None
    seconds: float
    bank: str
    n: int
    model_calls: int | None = None  # per sample: the sampler's model calls times the samples (None: not measured)
    device: str = ""  # where it ran: "cpu", "cuda:0 (NVIDIA H200)"

    @property
    def ok(self) -> bool:
        return self.status == "complete"

    def cost(self) -> dict:
        """What the evaluation cost, as it is stored beside the metrics (``model_calls``, ``device``)."""
        return {**({"model_calls": self.model_calls} if self.model_calls is not None else {}),
                **({"device": self.device} if self.device else {})}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def stored(cls, nfe: int, metrics: dict, status: str, error: str | None, seconds: float, bank: str,
               n: int) -> EvalResult:
        """The evaluation a trial stores as ``{**metrics, **cost()}``, back from those stored metrics."""
        own = {k: v for k, v in metrics.items() if k not in ("model_calls", "device")}
        return cls(nfe, own, status, error, seconds, bank, n, metrics.get("model_calls"), metrics.get("device", ""))


@dataclass
class Bank:
    """One fixed noise bank: the initial states and the data set, with references per end time."""

    name: str
    seed: int
    x_T: Tensor
    data_seed: int
    references: dict[float, Tensor] = field(default_factory=dict)
    data: dict[float, Tensor] = field(default_factory=dict)
    loaded: dict[float, bool] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return self.x_T.shape[0]

    def describe(self) -> dict:
        return {"name": self.name, "seed": self.seed, "size": self.size, "version": BANK_VERSION}


class Evaluator:
    """Evaluates schedules on ``problem`` with fixed noise banks (see the module docstring).

    ``cache_dir`` holds the reference solutions (``cache_dir/reference/``); None keeps them in memory
    only. ``rtol``/``atol`` are the reference ODE tolerances; ``sw_projections`` and ``sw_seed`` fix
    the sliced Wasserstein directions.
    """

    def __init__(self, problem: Problem, n_train: int = 256, n_heldout: int = 1024, seed: int = 0,
                 cache_dir: str | Path | None = "runs/cache", device: str | torch.device = "cpu",
                 rtol: float = DEFAULT_RTOL, atol: float = DEFAULT_ATOL, sw_projections: int = 256,
                 sw_seed: int = 0):
        if n_train < 1 or n_heldout < 1:
            raise ValueError("Evaluator: bank sizes must be at least 1")
        self.device = torch.device(device)
        self.device_name = device_name(self.device)
        self.problem = problem.to(self.device)
        self.seed = int(seed)
        self.sizes = {"train": int(n_train), "heldout": int(n_heldout)}
        self.seeds = {"train": self.seed, "heldout": self.seed + HELDOUT_OFFSET}
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.rtol, self.atol = float(rtol), float(atol)
        self.sw_projections, self.sw_seed = int(sw_projections), int(sw_seed)
        self._banks: dict[str, Bank] = {}
        self._reference_stats: dict[tuple, tuple] = {}
        self._data_projections: dict[tuple, torch.Tensor] = {}

    # ---- banks, references, data ------------------------------------------------------------------

    def bank(self, name: str = "train") -> Bank:
        if name not in BANKS:
            raise ValueError(f"unknown bank {name!r}; use 'train' or 'heldout'")
        if name not in self._banks:
            seed = self.seeds[name]
            x_T = draw_in_blocks(self.problem.sample_prior, self.sizes[name], seed)
            self._banks[name] = Bank(name, seed, x_T.to(self.device, torch.float64), seed + DATA_OFFSET)
        return self._banks[name]

    def x_T(self, bank: str = "train", n: int | None = None) -> Tensor:
        b = self.bank(bank)
        return b.x_T[: self._n(b, n)]

    def reference(self, bank: str = "train", t_end: float | None = None) -> Tensor:
        """The reference solution for the whole bank at ``t_end`` (the problem's by default)."""
        b = self.bank(bank)
        t_end = float(self.problem.t_end if t_end is None else t_end)
        if t_end not in b.references:
            (x,), loaded = self.problem.reference_states(b.x_T, [self.problem.t_start, t_end], bank=b.describe(),
                                                         cache_dir=self.cache_dir, rtol=self.rtol, atol=self.atol)
            b.references[t_end], b.loaded[t_end] = x.to(self.device), loaded
        return b.references[t_end]

    def data(self, bank: str = "train", t_end: float | None = None) -> Tensor:
        """Samples of the exact marginal at ``t_end``, as many as the bank holds, from the bank's data seed."""
        b = self.bank(bank)
        t_end = float(self.problem.t_end if t_end is None else t_end)
        if t_end not in b.data:
            data = draw_in_blocks(lambda m, g: self.problem.marginal_samples(m, t_end, g), b.size, b.data_seed)
            b.data[t_end] = data.to(self.device, torch.float64)
        return b.data[t_end]

    def _n(self, b: Bank, n: int | None) -> int:
        if n is None:
            return b.size
        if not 1 <= n <= b.size:
            raise ValueError(f"n = {n} is outside the {b.name} bank (1 .. {b.size})")
        return int(n)

    # ---- evaluation ----------------------------------------------------------------------------------

    def check(self, schedule: Schedule) -> None:
        """Raise ScheduleError when the schedule is invalid or does not fit this problem."""
        schedule.validate()
        check_compatible(self.problem.model, schedule)
        t0 = self.problem.t_start
        later_on_discrete = isinstance(self.problem.noise, VPDiscrete) and schedule.t_start < t0
        if not later_on_discrete and not math.isclose(schedule.t_start, t0, rel_tol=1e-9, abs_tol=1e-12):
            raise ScheduleError(f"schedule: starts at t = {schedule.t_start:g} but the problem's noise bank is at "
                                f"t_start = {t0:g}; build it with t_start={t0!r}")
        t_last, t1 = schedule.steps[-1].t, self.problem.t_end
        if t_last != 0.0 and not math.isclose(t_last, t1, rel_tol=1e-9, abs_tol=1e-12):
            raise ScheduleError(f"schedule: ends at t = {t_last:g} but the problem's samples are taken at t_end = "
                                f"{t1:g}; build it with t_end={t1!r} (or end with a final step to t = 0)")

    def evaluate(self, schedule: Schedule, bank: str = "train", n: int | None = None) -> EvalResult:
        """Run ``schedule`` on the first ``n`` states of ``bank`` and measure it.

        Raises ScheduleError for a schedule that cannot run on this problem (invalid, another noise
        schedule, another start or end time); a run that diverges is a ``failed`` result, not an
        exception. A schedule must end at the problem's ``t_end`` or at t = 0 (a final denoising step,
        as diffusers' ``final_sigmas_type="zero"``); the reference and the data are taken at its end. On a
        discrete VP schedule it may start below ``t_start`` (diffusers' ``leading`` timesteps): the bank's
        noise is then its first state unchanged, as diffusers feeds unit-variance noise to its first timestep
        (``init_noise_sigma = 1``), and it is still measured against the reference from ``t_start``.
        """
        self.check(schedule)
        b = self.bank(bank)
        n = self._n(b, n)
        model = self.problem.model
        start, calls = time.perf_counter(), model.calls
        try:
            with torch.no_grad():
                x = sample(model, b.x_T[:n], schedule)
        except NonFiniteError as e:
            res = self._failed(schedule, str(e), time.perf_counter() - start, bank, n)
            calls = model.calls - calls
        else:
            calls = model.calls - calls  # the sampler's own calls (the reference may be solved when measured)
            res = self._measure(schedule, x, time.perf_counter() - start, bank, n)
        return replace(res, model_calls=calls * n, device=self.device_name)

    def evaluate_many(self, schedules: Sequence[Schedule], bank: str = "train",
                      n: int | None = None) -> list[EvalResult]:
        """``evaluate`` for several schedules in one batched pass through the model (``sample_batch``: one
        model call per round for all of them). A schedule that does not fit the problem is a failed
        result here, with the reason; each result's ``seconds`` is its share of the pass."""
        b = self.bank(bank)
        n = self._n(b, n)
        out: list[EvalResult | None] = [None] * len(schedules)
        ok = []
        for i, s in enumerate(schedules):
            try:
                self.check(s)
                ok.append(i)
            except ScheduleError as e:
                out[i] = self._failed(s, str(e), 0.0, bank, n)
        if ok:
            model = self.problem.model
            start, calls = time.perf_counter(), model.calls
            with torch.no_grad():
                xs = sample_batch(model, b.x_T[:n], [schedules[i] for i in ok])
            share = (time.perf_counter() - start) / len(ok)
            rounds = model.calls - calls  # one batched call per round; a schedule takes part in nfe of them
            for i, x in zip(ok, xs):
                res = (self._failed(schedules[i], str(x), share, bank, n) if isinstance(x, NonFiniteError)
                       else self._measure(schedules[i], x, share, bank, n))
                # a schedule that diverged is counted for the rounds it could have taken part in (an upper bound)
                out[i] = replace(res, model_calls=min(schedules[i].nfe, rounds) * n, device=self.device_name)
        for i, res in enumerate(out):
            if res is not None and res.model_calls is None:  # refused before sampling: no model call made
                out[i] = replace(res, model_calls=0, device=self.device_name)
        return out

    def score(self, schedule: Schedule, x: Tensor, bank: str = "train", seconds: float = 0.0) -> EvalResult:
        """The metrics of samples ``x`` made from the first ``len(x)`` states of ``bank`` by another sampler that
        runs ``schedule`` (e.g. a diffusers scheduler's own loop); measured as ``evaluate`` measures."""
        self.check(schedule)
        return self._measure(schedule, x, seconds, bank, self._n(self.bank(bank), x.shape[0]))

    def _failed(self, schedule: Schedule, error: str, seconds: float, bank: str, n: int) -> EvalResult:
        inf = {k: math.inf for k in self.metric_names()}
        return EvalResult(schedule.nfe, inf, "failed", error, seconds, bank, n)

    def _measure(self, schedule: Schedule, x: Tensor, seconds: float, bank: str, n: int) -> EvalResult:
        """The metrics of samples ``x`` that ``schedule`` made from the first ``n`` states of ``bank``."""
        t_end = float(schedule.steps[-1].t)
        ref = self.reference(bank, t_end)[:n]
        data = self.data(bank, t_end)[:n] if self.problem.has_data else None
        x = x.to(torch.float64)
        out = {"rmse": metrics.rmse(x, ref), "median_err": metrics.median_error(x, ref)}
        if data is not None:
            key = (bank, t_end, n)
            if key not in self._data_projections:  # the data side is the same for every schedule: sorted once
                self._data_projections[key] = metrics.sorted_projections(data, self.sw_projections, self.sw_seed)
            out["sw"] = metrics.sliced_wasserstein(x, data, self.sw_projections, self.sw_seed,
                                                   y_sorted=self._data_projections[key])
        if self.problem.has_log_prob:
            out["nll"] = metrics.nll(x, lambda v: self.problem.log_prob(v, t_end))
        quality = self.problem.quality
        if quality is not None and bank == "heldout":  # the expensive fidelity (e.g. FD-digits)
            out.update(quality(x))
            if hasattr(quality, "features"):
                out["fd_reference"] = self._fd_to_reference(quality.features, x, ref, bank, t_end)
        return EvalResult(schedule.nfe, out, "complete", None, seconds, bank, n)

    def _fd_to_reference(self, features, x: Tensor, ref: Tensor, bank: str, t_end: float) -> float:
        """Fréchet distance between the features of the samples and of the reference solutions from the
        same noises: how far the sampler's distribution is from the exact one."""
        key = (bank, t_end, ref.shape[0])
        if key not in self._reference_stats:
            self._reference_stats[key] = metrics.gaussian_stats(features(ref))
        return metrics.frechet_distance(*metrics.gaussian_stats(features(x)), *self._reference_stats[key])

    def metric_names(self) -> list[str]:
        """The metrics ``evaluate`` reports for this problem (on the held-out bank: all of them)."""
        return metric_names(self.problem)


def metric_names(problem: Problem, bank: str = "heldout") -> list[str]:
    """The metrics an evaluation of ``problem`` on ``bank`` reports: the quality metrics (e.g. FD-digits) on the
    held-out bank only."""
    return ["rmse", "median_err", *(["sw"] if problem.has_data else []), *(["nll"] if problem.has_log_prob else []),
            *(problem.quality_metrics if bank == "heldout" else []),
            *(["fd_reference"] if bank == "heldout" and hasattr(problem.quality, "features") else [])]


def device_name(device: torch.device) -> str:
    """The device as the cost of an evaluation names it: ``cpu``, or ``cuda:0 (NVIDIA H200)``."""
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


def evaluator_options(problem: Problem) -> dict:
    """Bank sizes that suit the problem (smaller for networks): keyword arguments for ``Evaluator``."""
    sizes = problem.bank_sizes
    return {} if sizes is None else {"n_train": sizes[0], "n_heldout": sizes[1]}
