"""diffusers' stock schedulers, only where they run a schedule exactly: ``DPMSolverMultistepScheduler``
with integer ``timesteps=`` and pinned final-step options, ``EulerDiscreteScheduler`` with ``sigmas=``, and for
rectified-flow models ``FlowMatchEulerDiscreteScheduler`` with ``sigmas=`` at ``shift=1`` (the tuned times are
the model's own t: no shift on top) (``stock_diffusers_export``); anything else is refused with the reason."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from steptune.space import Schedule
from steptune.space.noise import VPDiscrete

from .conventions import ExportError, schedule_noise

_STOCK_BETAS = {"ddpm-linear": ("linear", 1e-4, 0.02), "sd-scaled-linear": ("scaled_linear", 0.00085, 0.012),
                "cosine": ("squaredcos_cap_v2", 1e-4, 0.02)}
_DIFFUSERS_PREDICTION = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


@dataclass
class StockExport:
    """A stock diffusers scheduler config plus the ``set_timesteps`` keywords that make it run the
    schedule exactly (diffusers keeps custom timesteps out of its config, so pass them at call time:
    ``pipe(..., **kwargs)``)."""

    class_name: str
    config: dict
    kwargs: dict
    notes: list[str] = field(default_factory=list)

    def build(self, device=None):
        """The stock scheduler with ``set_timesteps(**kwargs)`` applied and checked against the intent."""
        import diffusers

        cls = getattr(diffusers, self.class_name)
        with warnings.catch_warnings():  # numpy-2 deprecation noise from inside diffusers
            warnings.simplefilter("ignore", DeprecationWarning)
            s = cls(**self.config)
            s.set_timesteps(device=device, **self.kwargs)
        if self.class_name == "FlowMatchEulerDiscreteScheduler":
            want = torch.tensor([*self.kwargs["sigmas"], 0.0], dtype=torch.float32)
            if not torch.allclose(s.sigmas.cpu(), want, rtol=1e-6, atol=0):
                raise ExportError(f"{self.class_name}.set_timesteps changed the sigmas; this diffusers version does "
                                  "not take them verbatim")
        elif self.class_name == "DPMSolverMultistepScheduler":
            if s.timesteps.tolist() != list(self.kwargs["timesteps"]):
                raise ExportError(f"{self.class_name}.set_timesteps changed the timesteps; this diffusers version "
                                  "does not take them verbatim")
        else:
            want = torch.tensor(self.kwargs["sigmas"], dtype=torch.float32)
            if not torch.equal(s.sigmas.cpu(), want):
                raise ExportError(f"{self.class_name}.set_timesteps changed the sigmas; this diffusers version does "
                                  "not take them verbatim")
        return s

    def save(self, directory: str | Path) -> Path:
        """``save_pretrained`` of the stock scheduler plus ``steptune_set_timesteps.json`` (the keywords)."""
        directory = Path(directory)
        self.build().save_pretrained(str(directory))
        (directory / "steptune_set_timesteps.json").write_text(
            json.dumps({"class_name": self.class_name, **self.kwargs, "notes": self.notes}, indent=2) + "\n")
        return directory


def _stock_noise(schedule: Schedule) -> tuple[VPDiscrete, dict]:
    ns = schedule_noise(schedule)
    if not isinstance(ns, VPDiscrete):
        raise ExportError(f"the schedule is for a {ns.kind} noise schedule; stock diffusers exports need a discrete "
                          "VP beta table")
    name = ns.name if ns.name in _STOCK_BETAS else None
    if name is None:
        for cand in _STOCK_BETAS:
            if VPDiscrete.named(cand).alphas_cumprod == ns.alphas_cumprod:
                name = cand
                break
    if name is None:
        raise ExportError("the schedule's noise schedule is a custom alphas_cumprod table, not one of diffusers' "
                          "beta schedules (linear, scaled_linear, squaredcos_cap_v2)")
    kind, b0, b1 = _STOCK_BETAS[name]
    return ns, {"num_train_timesteps": ns.N, "beta_schedule": kind, "beta_start": b0, "beta_end": b1}


def _stock_prediction(conventions: dict) -> str:
    pred, ti = conventions.get("prediction"), conventions.get("time_input")
    if ti != "discrete":
        raise ExportError(f"the model takes time input {ti!r}; stock diffusers VP schedulers feed discrete training "
                          "timesteps")
    if pred not in _DIFFUSERS_PREDICTION:
        raise ExportError(f"the model predicts {pred!r}; stock VP schedulers take epsilon, sample or v_prediction")
    return _DIFFUSERS_PREDICTION[pred]


def _dpm_orders(n: int, solver_order: int, lower_order_final: bool, euler_at_final: bool, final_zero: bool):
    """The step orders DPMSolverMultistepScheduler.step() uses over n timesteps with this config."""
    out, lower_order_nums = [], 0
    for i in range(n):
        lof = i == n - 1 and (euler_at_final or (lower_order_final and n < 15) or final_zero)
        los = i == n - 2 and lower_order_final and n < 15
        if solver_order == 1 or lower_order_nums < 1 or lof:
            out.append(1)
        elif solver_order == 2 or lower_order_nums < 2 or los:
            out.append(2)
        else:
            out.append(3)
        lower_order_nums = min(lower_order_nums + 1, solver_order)
    return out


def _stock_inputs(schedule: Schedule, conventions: dict, scheduler: str):
    """The noise tables and prediction type a stock scheduler needs; refuses what none of them can start."""
    ns, betas = _stock_noise(schedule)
    prediction_type = _stock_prediction(conventions)
    if schedule.afs != "none":
        raise ExportError(f"the schedule starts with an analytical first step, which {scheduler} does not take")
    return ns, betas, prediction_type


def _dpm_export(schedule: Schedule, conventions: dict) -> StockExport:
    ns, betas, prediction_type = _stock_inputs(schedule, conventions, "DPMSolverMultistepScheduler")
    for i, st in enumerate(schedule.steps):
        why = None
        if st.corrector is not None:
            why = "has a corrector"
        elif st.prediction != "data":
            why = "uses noise prediction (the export uses algorithm_type dpmsolver++, data prediction)"
        elif st.start != -1 or st.points is not None or st.first_points is not None:
            why = "estimates derivatives from other history points than the last ones"
        elif st.dc_ratio != 1.0:
            why = "has a DC compensation ratio"
        elif st.relaxation != ("dpmsolver-2" if st.order == 2 else "none") or st.relaxation_coef != 0.0:
            why = f"has relaxation {st.relaxation!r} (DPM-Solver++ midpoint needs dpmsolver-2 on order-2 steps)"
        elif st.second_scale != (0.5 if st.order == 3 else 1.0):
            why = f"has second_scale {st.second_scale:g} (DPM-Solver++(3M) uses 0.5)"
        if why:
            raise ExportError(f"step {i} {why}, which DPMSolverMultistepScheduler does not do")
    times = schedule.times
    ks = [float(ns.timestep(t)) for t in times[:-1]]
    off = [i for i, k in enumerate(ks) if abs(k - round(k)) > 1e-6 or not 0 <= round(k) < ns.N]
    if off:
        raise ExportError(f"time {off[0]} of the schedule (timestep {ks[off[0]]:.4g}) is not an integer training "
                          "timestep, and DPMSolverMultistepScheduler casts timesteps to integers")
    if times[-1] == 0.0:
        final = "zero"
    elif abs(float(ns.timestep(times[-1]))) < 1e-9:
        final = "sigma_min"
    else:
        raise ExportError(f"the schedule ends at t = {times[-1]:.6g}, neither at sigma = 0 nor at the smallest "
                          "training sigma, the two ends DPMSolverMultistepScheduler can take")
    orders = [st.order for st in schedule.steps]
    n = len(orders)
    for solver_order in sorted({max(orders), 1, 2, 3}, key=lambda o: (o != max(orders), o)):
        for lower_order_final, euler_at_final in ((True, False), (False, False), (True, True), (False, True)):
            if _dpm_orders(n, solver_order, lower_order_final, euler_at_final, final == "zero") == orders:
                config = {**betas, "prediction_type": prediction_type, "algorithm_type": "dpmsolver++",
                          "solver_type": "midpoint", "solver_order": solver_order,
                          "lower_order_final": lower_order_final, "euler_at_final": euler_at_final,
                          "final_sigmas_type": final, "use_karras_sigmas": False, "use_lu_lambdas": False,
                          "use_exponential_sigmas": False, "use_beta_sigmas": False, "thresholding": False,
                          "steps_offset": 0}
                notes = ["DPMSolverMultistepScheduler computes each update in float32"]
                return StockExport("DPMSolverMultistepScheduler", config, {"timesteps": [round(k) for k in ks]}, notes)
    raise ExportError(f"the step orders {orders} are not a sequence DPMSolverMultistepScheduler produces for "
                      f"{n} timesteps (warm-up from order 1, lower orders only on the last steps)")


def _sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """diffusers' EulerDiscreteScheduler._sigma_to_t: linear interpolation in log sigma between
    training steps (float math as diffusers does it)."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return (1 - w) * low + w * (low + 1)


def _first_order_to_zero(schedule: Schedule, scheduler: str, why_zero: str) -> None:
    """ExportError unless every step is a plain first-order step and the last one ends at t = 0 (Euler's form)."""
    for i, st in enumerate(schedule.steps):
        if st.order != 1 or st.corrector is not None or st.start != -1 or st.dc_ratio != 1.0:
            raise ExportError(f"step {i} is not a plain first-order step (order {st.order}"
                              f"{', corrector' if st.corrector else ''}), and {scheduler} only takes "
                              "first-order schedules")
    if schedule.times[-1] != 0.0:
        raise ExportError(f"the schedule ends at t = {schedule.times[-1]:.6g} > 0, {why_zero}; end the schedule "
                          "at t = 0")


def _euler_export(schedule: Schedule, conventions: dict) -> StockExport:
    ns, betas, prediction_type = _stock_inputs(schedule, conventions, "EulerDiscreteScheduler")
    _first_order_to_zero(schedule, "EulerDiscreteScheduler", "where EulerDiscreteScheduler would return x/alpha "
                         "instead of the sample")
    sigmas = ns.edm_sigma(torch.tensor(schedule.times, dtype=torch.float64)).tolist()
    sigmas[-1] = 0.0
    ac = np.array(VPDiscrete.named(ns.name).alphas_cumprod if ns.name in _STOCK_BETAS else ns.alphas_cumprod,
                  dtype=np.float32)
    log_sigmas = np.log(((1 - ac) / ac) ** 0.5)
    theirs = _sigma_to_t(np.array(sigmas[:-1], dtype=np.float32), log_sigmas)
    ours = np.array([float(ns.timestep(t)) for t in schedule.times[:-1]])
    gap = float(np.abs(theirs - ours).max())
    if gap > 1e-3:
        raise ExportError(f"EulerDiscreteScheduler would call the model up to {gap:.2g} training timesteps away "
                          "from the schedule's times (it interpolates log sigma between training steps); put the "
                          "schedule's times on integer timesteps")
    config = {**betas, "prediction_type": prediction_type, "interpolation_type": "linear",
              "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
              "timestep_type": "discrete", "final_sigmas_type": "zero", "steps_offset": 0,
              # with custom sigmas the spacing only decides init_noise_sigma: "leading" gives
              # sqrt(sigma_max^2 + 1) = 1/alpha(t_start), the exact scale of the x/alpha latents
              "timestep_spacing": "leading"}
    notes = ["EulerDiscreteScheduler works on x/alpha and in float32; the sigmas are sigma/alpha"]
    return StockExport("EulerDiscreteScheduler", config, {"sigmas": sigmas}, notes)


def _flowmatch_export(schedule: Schedule, conventions: dict) -> StockExport:
    ns = schedule_noise(schedule)
    if ns.kind != "flow":
        raise ExportError(f"the schedule is for a {ns.kind} noise schedule; FlowMatchEulerDiscreteScheduler "
                          "needs a rectified-flow model")
    pred, ti = conventions.get("prediction"), conventions.get("time_input")
    scale = float(conventions.get("time_scale") or 1.0)
    if pred != "flow" or ti != "continuous":
        raise ExportError(f"the model predicts {pred!r} from time input {ti!r}; FlowMatchEulerDiscreteScheduler "
                          "feeds a velocity (flow) model the continuous time")
    if scale != round(scale) or scale < 1:
        raise ExportError(f"the model takes t times {scale:g}; FlowMatchEulerDiscreteScheduler feeds t times an "
                          "integer num_train_timesteps")
    if schedule.afs != "none":
        raise ExportError("the schedule starts with an analytical first step, which FlowMatchEulerDiscreteScheduler "
                          "does not take")
    _first_order_to_zero(schedule, "FlowMatchEulerDiscreteScheduler", "but FlowMatchEulerDiscreteScheduler "
                         "always takes a last step to sigma 0")
    config = {"num_train_timesteps": round(scale), "shift": 1.0, "use_dynamic_shifting": False,
              "invert_sigmas": False, "shift_terminal": None, "use_karras_sigmas": False,
              "use_exponential_sigmas": False, "use_beta_sigmas": False, "stochastic_sampling": False}
    notes = ["a first-order step on a rectified flow is Euler in t; FlowMatchEulerDiscreteScheduler steps in float32",
             "shift is 1: the tuned sigmas are the model's own t and must not be shifted again; a pipeline whose "
             "scheduler config has use_dynamic_shifting would pass mu, which this config turns off"]
    return StockExport("FlowMatchEulerDiscreteScheduler", config, {"sigmas": schedule.times[:-1]}, notes)


def stock_diffusers_export(schedule: Schedule, conventions: dict, kind: str = "auto") -> StockExport:
    """The stock diffusers scheduler that runs ``schedule`` exactly, or ExportError saying why none does.

    ``kind``: ``dpmsolver`` (DPMSolverMultistepScheduler, integer ``timesteps=``), ``euler``
    (EulerDiscreteScheduler, ``sigmas=``), ``flowmatch`` (FlowMatchEulerDiscreteScheduler, ``sigmas=`` = the
    model's own t, shift 1) or ``auto`` (the first of them that is exact).
    """
    makers = {"dpmsolver": _dpm_export, "euler": _euler_export, "flowmatch": _flowmatch_export}
    if kind != "auto":
        if kind not in makers:
            raise ExportError(f"unknown stock scheduler {kind!r}; use dpmsolver, euler, flowmatch or auto")
        return makers[kind](schedule, conventions)
    reasons: dict[str, list[str]] = {}  # why, and the schedulers it rules out
    for name, make in makers.items():
        try:
            return make(schedule, conventions)
        except ExportError as e:
            reasons.setdefault(str(e), []).append(name)
    why = "; ".join(f"{' and '.join(names)}: {reason}" for reason, names in reasons.items())
    raise ExportError(f"no stock diffusers scheduler runs this schedule exactly ({why}); --format diffusers exports "
                      "steptune's scheduler, which runs any schedule")
