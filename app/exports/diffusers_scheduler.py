"""``SteptuneScheduler``: a diffusers scheduler that runs a whole tuned steptune schedule.

It stores the schedule's JSON form and the model's conventions in its config, so
``save_pretrained`` / ``from_pretrained`` round-trip it exactly, and it drives steptune's own sampler
loop (``steptune.space.trajectory``) one model call per ``step()``, so a pipeline produces what
``steptune.sample`` produces:

    from steptune.exports import SteptuneScheduler
    pipe.scheduler = SteptuneScheduler.from_pretrained("runs/export/digits-nfe5-scheduler")
    image = pipe(num_inference_steps=pipe.scheduler.num_inference_steps).images[0]

``timesteps`` has one entry per model call (the schedule's NFE), the time input the network takes
(``N t - 1`` for discrete diffusers UNets, ``1000 t`` for flow transformers); steps with an implicit corrector
repeat a timestep, as diffusers' Heun does. ``sigmas`` are the model's own σ (σ/α, or t for a flow model, as
diffusers' FlowMatch schedulers have them) at every call plus the final one. The tuned times are used as
they are: a flow pipeline's ``shift`` / dynamic-shifting ``mu`` is never applied on top of them (the search
chose the times on the model's own t axis). Asked for another ``num_inference_steps`` than the schedule's NFE,
it re-times the schedule (``steptune.space.retime.interpolate``: for more steps, the tuned schedule's relative
log-SNR profile over the new step count; for fewer, its narrowest pairs of intervals merged; each new step with the
decisions of the tuned step nearest it) and says so once; ``retime=False`` refuses instead. Importing this module
needs diffusers; the rest of steptune does not.
"""

from __future__ import annotations

import math
import warnings

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput

from steptune.space import Schedule, ScheduleError, TrajectoryRun, trajectory
from steptune.space import noise as noise_mod
from steptune.space.model import PREDICTION_TYPES, TIME_INPUTS, convert
from steptune.space.noise import VPDiscrete, betas_for
from steptune.space.retime import interpolate

from .tuning import model_sigmas, tuning_record, warn_other_conventions

# steptune's prediction names and diffusers' ``prediction_type`` names
DIFFUSERS_PREDICTION = {"eps": "epsilon", "x0": "sample", "v": "v_prediction", "flow": "flow_prediction"}
STEPTUNE_PREDICTION = {v: k for k, v in DIFFUSERS_PREDICTION.items()}
_NAMED_BETAS = {("linear", 1e-4, 0.02): "ddpm-linear", ("scaled_linear", 0.00085, 0.012): "sd-scaled-linear"}


def model_call_indices(schedule: Schedule) -> list[int]:
    """For each model call of the sampler loop, in order, the index j of ``schedule.times[j]`` it is made
    at: the start (unless AFS), the end of every step but the last, and again after an implicit
    corrector. ``len(...) == schedule.nfe``."""
    calls = [] if schedule.afs != "none" else [0]
    for i, st in enumerate(schedule.steps[:-1]):
        calls.append(i + 1)
        if st.corrector is not None and st.corrector.kind == "implicit":
            calls.append(i + 1)
    return calls


def _same_noise(a, b) -> bool:
    """Equal noise schedules; discrete tables compare by value (a named table equals its values)."""
    if isinstance(a, VPDiscrete) and isinstance(b, VPDiscrete):
        return a.alphas_cumprod == b.alphas_cumprod
    return a == b


def noise_from_betas(num_train_timesteps: int | None = None, beta_start: float | None = None,
                     beta_end: float | None = None, beta_schedule: str | None = None,
                     trained_betas=None) -> VPDiscrete:
    """The discrete VP schedule a stock diffusers scheduler config describes."""
    n = int(num_train_timesteps or 1000)
    if trained_betas is not None:
        return VPDiscrete.from_betas(torch.tensor(trained_betas, dtype=torch.float32))
    kind = beta_schedule or "linear"
    b0 = 1e-4 if beta_start is None else float(beta_start)
    b1 = 0.02 if beta_end is None else float(beta_end)
    if n == 1000 and kind == "squaredcos_cap_v2":
        return VPDiscrete.named("cosine")
    if n == 1000 and (kind, b0, b1) in _NAMED_BETAS:
        return VPDiscrete.named(_NAMED_BETAS[(kind, b0, b1)])
    try:
        return VPDiscrete.from_betas(betas_for(kind, n, b0, b1))
    except ValueError as e:
        raise ScheduleError(f"SteptuneScheduler: {e}") from None


def _sigma_count_error(count: int, nfe: int) -> ValueError:
    return ValueError(f"SteptuneScheduler: got {count} sigmas but the tuned schedule makes {nfe} model calls; pass "
                      f"{nfe} (or {nfe + 1} with the final one) or none")


class SteptuneScheduler(SchedulerMixin, ConfigMixin):
    """Runs a tuned steptune ``Schedule`` inside a diffusers pipeline.

    Config: ``schedule`` (the schedule's JSON dict), ``noise`` (the noise schedule's identity; by default
    the schedule's own), ``prediction_type`` (``epsilon``, ``sample``, ``v_prediction`` or
    ``flow_prediction``; steptune's ``eps``/``x0``/``v``/``flow`` are accepted too), ``time_input``
    (``discrete``: diffusers' training timestep ``N t - 1``; ``continuous``: ``t * time_scale``;
    ``sigma``: ``sigma/alpha``), ``tuned_for`` (what the schedule was tuned for, as exports record it),
    ``retime`` (another ``num_inference_steps`` re-times the schedule; False: it is refused).
    Conventions not given are those the schedule was tuned for, else the usual ones of its noise schedule
    (a flow model: ``flow_prediction``, continuous time times ``num_train_timesteps`` or 1000, as diffusers'
    flow transformers take it); running under other conventions than it was tuned for warns once. The
    beta-table keys of stock schedulers are accepted, so ``SteptuneScheduler.from_config(pipe.scheduler.config,
    schedule=...)`` works; they must then describe the noise schedule the schedule was tuned for. A FlowMatch
    config's ``shift`` and dynamic-shifting keys stay in the config unused: the tuned times are not shifted again.
    """

    order = 1
    _compatibles: list[str] = []

    @register_to_config
    def __init__(self, schedule: dict | None = None, noise: dict | None = None, prediction_type: str | None = None,
                 time_input: str | None = None, time_scale: float | None = None, num_train_timesteps: int | None = None,
                 beta_start: float | None = None, beta_end: float | None = None, beta_schedule: str | None = None,
                 trained_betas: list[float] | None = None, rescale_betas_zero_snr: bool = False,
                 tuned_for: dict | None = None, retime: bool = True):
        if schedule is None:
            raise ScheduleError("SteptuneScheduler needs a schedule: pass schedule=<Schedule or its JSON dict>")
        sched = schedule if isinstance(schedule, Schedule) else Schedule.from_dict(schedule, where="SteptuneScheduler")
        sched.validate()
        if rescale_betas_zero_snr:
            raise ScheduleError("SteptuneScheduler: zero-terminal-SNR beta tables (rescale_betas_zero_snr) are not "
                                "supported; their last alpha is 0")
        betas_given = any(v is not None for v in (num_train_timesteps, beta_start, beta_end, beta_schedule,
                                                 trained_betas))
        if noise is not None:
            ns = noise_mod.from_dict(noise)
        elif sched.noise:
            ns = noise_mod.from_dict(sched.noise)
        elif betas_given:
            ns = noise_from_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        else:
            raise ScheduleError("SteptuneScheduler: the schedule names no noise schedule; pass noise= or the "
                                "pipeline scheduler's beta config")
        if betas_given and (beta_schedule is not None or trained_betas is not None):
            stock = noise_from_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
            if not _same_noise(stock, ns):
                raise ScheduleError(f"SteptuneScheduler: the schedule was tuned for noise schedule {ns!r} but the "
                                    f"scheduler config describes {stock!r}; use a schedule tuned for this model")
        tuned = dict((tuned_for or {}).get("model") or {}) or {
            k: v for k, v in (sched.conventions or {}).items() if v is not None}
        prediction_type = prediction_type or tuned.get("prediction")
        time_input = time_input or tuned.get("time_input")
        if prediction_type is None or time_input is None:  # the usual ones of the noise schedule
            from steptune.evaluators.problems import default_conventions

            p_default, ti_default = default_conventions(ns)
            prediction_type, time_input = prediction_type or p_default, time_input or ti_default
        if time_scale is None:
            time_scale = tuned.get("time_scale") or (float(num_train_timesteps or 1000) if ns.kind == "flow" else 1.0)
        prediction = STEPTUNE_PREDICTION.get(prediction_type, prediction_type)
        if prediction not in PREDICTION_TYPES:
            raise ScheduleError(f"SteptuneScheduler: prediction_type {prediction_type!r} is unknown; use one of "
                                f"{', '.join(DIFFUSERS_PREDICTION.values())}")
        if time_input not in TIME_INPUTS:
            raise ScheduleError(f"SteptuneScheduler: time_input {time_input!r} is unknown; use one of "
                                f"{', '.join(TIME_INPUTS)}")
        if time_input == "discrete" and not isinstance(ns, VPDiscrete):
            raise ScheduleError("SteptuneScheduler: time_input 'discrete' needs a discrete VP noise schedule")
        if sched.noise and not _same_noise(noise_mod.from_dict(sched.noise), ns):
            raise ScheduleError(f"SteptuneScheduler: the schedule was made for noise schedule "
                                f"{noise_mod.from_dict(sched.noise)!r} but noise= says {ns!r}")
        if sched.nfe < 1:
            raise ScheduleError("SteptuneScheduler: the schedule makes no model call (one step after an analytical "
                                "first step); a pipeline needs at least one")
        record = tuned_for or tuning_record(sched, tuned or None, ns)
        running = {"prediction": prediction, "time_input": time_input, "time_scale": float(time_scale)}
        warn_other_conventions(tuned or None, running, "SteptuneScheduler")
        # the config keeps what the scheduler runs, so a saved folder is self-contained (retime is kept as given)
        self.register_to_config(schedule=sched.to_dict(), noise=ns.to_dict(),
                                prediction_type=DIFFUSERS_PREDICTION[prediction], time_input=time_input,
                                time_scale=float(time_scale), tuned_for=record,
                                num_train_timesteps=ns.N if isinstance(ns, VPDiscrete) else num_train_timesteps)
        resolved = ("schedule", "noise", "prediction_type", "time_input", "time_scale", "tuned_for",
                    "num_train_timesteps")
        defaults = [k for k in self.config.get("_use_default_values", []) if k not in resolved]
        self.register_to_config(_use_default_values=defaults)
        self.tuned_schedule = sched
        self.noise_schedule = ns
        self.prediction = prediction
        self._retimed: dict[int, Schedule] = {}
        self._use(sched)
        self.timesteps = self._timesteps(None)
        self._step_index: int | None = None
        self._begin_index: int | None = None
        self._loop = None  # the running sampler loop (a TrajectoryRun) and the model call it waits for
        self._request = None
        self._afs_scaled = False
        self._told: set[str] = set()  # what this scheduler has warned about (each once)

    # -- what pipelines read --

    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def __len__(self) -> int:
        return int(self.config.num_train_timesteps or self.num_inference_steps)

    def _start(self, x_T: torch.Tensor):
        """A new run of the sampler loop from x_T, and its first model request (after the analytical
        first step, if the schedule has one)."""
        # with autograd on (a loop that differentiates through the steps) every state is a fresh tensor
        loop = TrajectoryRun(trajectory(self.schedule, self.noise_schedule, x_T,
                                        reuse_buffers=not torch.is_grad_enabled()))
        return loop, loop.request

    def time_value(self, t: float) -> float:
        """The time input the network takes at schedule time t."""
        ti = self.config.time_input
        if ti == "discrete":
            return float(self.noise_schedule.timestep(t))
        if ti == "sigma":
            return float(self.noise_schedule.edm_sigma(t))
        return float(t) * float(self.config.time_scale)

    def _timesteps(self, device) -> torch.Tensor:
        values = [self.time_value(t) for t in self.call_times]
        integral = self.config.time_input == "discrete" and all(abs(v - round(v)) < 1e-9 for v in values)
        if integral:
            ts = torch.tensor([round(v) for v in values], dtype=torch.int64)
        else:
            dtype = torch.float32 if device is not None and torch.device(device).type == "mps" else torch.float64
            ts = torch.tensor(values, dtype=dtype)
        return ts if device is None else ts.to(device)

    def _sigmas(self) -> torch.Tensor:
        """The model's own σ (σ/α, or t for a flow model) at every model call plus the final time."""
        return model_sigmas(self.noise_schedule, [*self.call_times, self.schedule.times[-1]]).to(torch.float32)

    def _tell(self, what: str, message: str) -> None:
        if what not in self._told:
            self._told.add(what)
            warnings.warn(message, UserWarning, stacklevel=3)

    def _use(self, sched: Schedule) -> None:
        """Make ``sched`` (the tuned schedule or a re-timing of it) the one the next run follows."""
        self.schedule = sched
        self.call_times = [sched.times[j] for j in model_call_indices(sched)]
        self.num_inference_steps = sched.nfe
        ns = self.noise_schedule
        t0 = torch.tensor(sched.t_start, dtype=torch.float64)
        self.init_noise_sigma = math.sqrt(float(ns.alpha(t0)) ** 2 + float(ns.sigma(t0)) ** 2)
        self.sigmas = self._sigmas()

    def _schedule_for(self, n: int | None) -> Schedule:
        """The schedule a run of ``n`` model calls follows: the tuned one, or its re-timing to n calls."""
        tuned = self.tuned_schedule
        if n is None or n == tuned.nfe:
            return tuned
        if not self.config.retime:
            raise ValueError(f"SteptuneScheduler runs its tuned schedule of {tuned.nfe} model calls, but "
                             f"num_inference_steps={n} was asked for; pass num_inference_steps={tuned.nfe} "
                             "(or build the scheduler with retime=True to re-time the schedule)")
        if n < 1:
            raise ValueError(f"SteptuneScheduler: num_inference_steps={n} makes no model call; pass "
                             f"num_inference_steps={tuned.nfe}, the tuned schedule's")
        if n not in self._retimed:
            try:
                self._retimed[n] = interpolate({tuned.nfe: tuned}, n)
            except ScheduleError as e:
                raise ValueError(f"SteptuneScheduler cannot re-time its tuned schedule of {tuned.nfe} model calls "
                                 f"to num_inference_steps={n} ({str(e).removeprefix('interpolate: ')}); pass "
                                 f"num_inference_steps={tuned.nfe}") from None
        self._tell(f"retime-{n}", f"SteptuneScheduler re-times its tuned schedule of {tuned.nfe} model calls to "
                                  f"num_inference_steps={n} (the same time profile, the decisions of the nearest tuned "
                                  f"step); a schedule searched at NFE {n} will do better")
        return self._retimed[n]

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      timesteps: list | None = None, sigmas: list | None = None, **kwargs) -> None:
        """Prepare a run. ``num_inference_steps`` other than the tuned schedule's NFE re-times it (warned once;
        refused with ``retime=False``). ``timesteps``, if given, must be the run's own; ``sigmas`` of the run's
        length are ignored with a warning when they differ (some pipelines always pass default sigmas), and of
        another length they ask for that many model calls. A flow pipeline's dynamic shift ``mu`` is not applied
        (the tuned times already are the model's own); it warns once."""
        if timesteps is not None and sigmas is not None:
            raise ValueError("Only one of `timesteps` or `sigmas` should be set.")
        tuned_nfe = self.tuned_schedule.nfe
        n = None if num_inference_steps is None else int(num_inference_steps)
        if n is None and sigmas is not None and len(sigmas) not in (tuned_nfe, tuned_nfe + 1):
            if not self.config.retime:
                raise _sigma_count_error(len(sigmas), tuned_nfe)
            n = len(sigmas)
        self._use(self._schedule_for(n))
        nfe = self.schedule.nfe
        ours = self._timesteps(None).double()
        if timesteps is not None:
            given = torch.as_tensor(timesteps, dtype=torch.float64).reshape(-1).cpu()
            if len(given) != nfe:
                raise ValueError(f"SteptuneScheduler: got {len(given)} timesteps but the tuned schedule makes {nfe} "
                                 "model calls; pass its own timesteps (scheduler.timesteps) or none")
            if not torch.allclose(given, ours, rtol=1e-6, atol=1e-4):
                raise ValueError("SteptuneScheduler: the given timesteps differ from the tuned schedule's; "
                                 "a tuned schedule cannot take other timesteps (pass none)")
        if sigmas is not None:
            given = torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1).cpu()
            if len(given) not in (nfe, nfe + 1):
                raise _sigma_count_error(len(given), nfe)
            mine = self.sigmas.double()[: len(given)]
            if not torch.allclose(given, mine, rtol=1e-5, atol=1e-6):
                self._tell("sigmas", "SteptuneScheduler runs its tuned schedule and ignores the sigmas it was given")
        if kwargs.get("mu") is not None:
            self._tell("mu", f"SteptuneScheduler runs its tuned times as they are (already the model's own t); "
                             f"the dynamic shift mu={float(kwargs['mu']):.4g} is not applied on top of them")
        self.timesteps = self._timesteps(device)
        self._step_index = None
        self._begin_index = None
        self._loop = self._request = None
        self._afs_scaled = False

    def set_begin_index(self, begin_index: int = 0) -> None:
        if begin_index != 0:
            raise ValueError("SteptuneScheduler runs the whole tuned schedule from its start; starting at call "
                             f"{begin_index} (img2img strength < 1) is not supported")
        self._begin_index = 0

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """The network input: the sample itself, except before the first call of a schedule with an
        analytical first step (AFS), where the first step is taken here, without a model call."""
        if self.schedule.afs == "none" or self._loop is not None or self._step_index not in (None, 0):
            return sample
        self._afs_scaled = True
        return self._start(sample)[1].x.clone()

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = alpha(t) x_0 + sigma(t) noise at the schedule times whose network time inputs are ``timesteps``."""
        values = self._timesteps(None).double()
        ts = torch.as_tensor(timesteps, dtype=torch.float64).reshape(-1).cpu()
        idx = [int(torch.argmin((values - v).abs())) for v in ts]
        t = torch.tensor([self.call_times[i] for i in idx], dtype=torch.float64)
        shape = (-1,) + (1,) * (original_samples.ndim - 1)
        a = self.noise_schedule.alpha(t).to(original_samples).reshape(shape)
        s = self.noise_schedule.sigma(t).to(original_samples).reshape(shape)
        return a * original_samples + s * noise

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True, **kwargs) -> SchedulerOutput | tuple:
        """Feed the network output at ``sample`` to the schedule; ``prev_sample`` is where the network
        is needed next (or the final samples after the last call)."""
        nfe = self.schedule.nfe
        if kwargs.get("eta"):
            raise ValueError(f"SteptuneScheduler runs a deterministic tuned schedule, but eta={kwargs['eta']} "
                             "(stochastic DDIM) was asked for; pass eta=0")
        if self._step_index is None:
            self._step_index = 0
        i = self._step_index
        if i >= nfe:
            raise ValueError(f"SteptuneScheduler: all {nfe} model calls of the schedule are done; call "
                             "set_timesteps() before the next run")
        expected = float(self.timesteps[i])
        got = float(timestep.reshape(-1)[0]) if torch.is_tensor(timestep) else float(timestep)
        if abs(got - expected) > 1e-3 * max(1.0, abs(expected)):
            raise ValueError(f"SteptuneScheduler: step() got timestep {got:g} but model call {i} of the schedule is "
                             f"at {expected:g}; loop over scheduler.timesteps in order")
        if i == 0:
            self._loop, self._request = self._start(sample)
            if self.schedule.afs != "none" and not self._afs_scaled:
                raise ValueError("SteptuneScheduler: this schedule takes an analytical first step inside "
                                 "scale_model_input(), which this pipeline did not call; use a schedule without "
                                 "one (afs none) in this pipeline")
        req = self._request
        recycle = req.buf is not None and not torch.is_grad_enabled()  # the loop's own tensors, written in place
        x = req.x
        if sample is not req.x and (i > 0 or self.schedule.afs == "none"):  # the state the pipeline evaluated
            if recycle:
                req.x.copy_(sample)
            else:  # autograd follows the pipeline's tensor: the loop takes it over
                x = sample.to(req.x)
        eps, x0 = convert(model_output.to(x.dtype), x, req.alpha, req.sigma, self.prediction,
                          req.buf if recycle else None)
        self._step_index = i + 1
        self._request = self._loop.send((eps, x0) if x is req.x else (eps, x0, x))
        if self._request is None:
            prev = self._loop.result
            self._loop = None
        else:  # a copy: the loop recycles its own tensors, and the pipeline may keep this one
            prev = self._request.x.clone()
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev_sample=prev)
