"""Export tuned schedules (and import them back).

* JSON: the Schedule's own versioned dict plus a ``provenance`` block (study, trial, problem and
  model identity, metrics, steptune version). ``parse_export`` validates a file with one-sentence
  errors; ``import_schedule`` adds it to a study, all or nothing.
* diffusers, full schedule: ``SteptuneScheduler`` (see ``diffusers_scheduler.py``), via
  ``scheduler_for``.
* diffusers, stock schedulers, only where exact: ``DPMSolverMultistepScheduler`` with integer
  ``timesteps=`` and pinned final-step options, ``EulerDiscreteScheduler`` with ``sigmas=``
  (``stock_diffusers_export``); anything else is refused with the reason.
* k-diffusion / ComfyUI: the descending list of the model's own sigmas ending in 0 (sigma/alpha, or t
  for a flow model; ``k_diffusion_sigmas``) and its comma-separated form for ComfyUI's manual-sigma
  nodes (``comfyui_sigmas``); ``sigma_list_calls`` says what a sampler pays on such a list.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from steptune.space import Schedule, ScheduleError
from steptune.space import noise as noise_mod
from steptune.space.noise import VPDiscrete
from steptune.space.schedule import SCHEMA_VERSION

if TYPE_CHECKING:
    from .db import Storage, StudyRecord, TrialRecord

PROVENANCE_VERSION = 1
SCHEDULE_FIELDS = ("schema", "version", "nfe", "t_start", "steps", "noise", "afs", "name", "conventions", "meta")
PROVENANCE_FIELDS = ("version", "steptune", "exported", "study", "method", "trial", "trial_number", "status",
                     "problem", "metric", "score", "metrics", "fidelity", "bank", "n_samples")
_STOCK_BETAS = {"ddpm-linear": ("linear", 1e-4, 0.02), "sd-scaled-linear": ("scaled_linear", 0.00085, 0.012),
                "cosine": ("squaredcos_cap_v2", 1e-4, 0.02)}
_DIFFUSERS_PREDICTION = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


class ExportError(ValueError):
    """An export that cannot be made exactly; the message says why in one sentence."""


def steptune_version() -> str:
    try:
        from importlib.metadata import version

        return version("steptune")
    except Exception:  # not installed as a distribution (e.g. run from a source tree)
        return "unknown"


# ---- JSON ----------------------------------------------------------------------------------------


def export_dict(trial: TrialRecord, study: StudyRecord | None = None) -> dict:
    """The exported JSON form of a stored trial: its schedule dict plus ``provenance``."""
    d = trial.to_schedule().to_dict()
    prov = {"version": PROVENANCE_VERSION, "steptune": steptune_version(),
            "exported": datetime.now(UTC).isoformat(timespec="seconds"), "study": trial.study,
            "method": study.method if study else None, "trial": trial.id, "trial_number": trial.number,
            "status": trial.status, "problem": study.problem if study else None,
            "metric": study.metric if study else None, "score": trial.score, "metrics": trial.metrics,
            "fidelity": trial.fidelity, "bank": trial.bank, "n_samples": trial.n_samples}
    d["provenance"] = prov
    return d


def parse_export(text: str, where: str = "schedule") -> tuple[Schedule, dict | None]:
    """A validated Schedule and its provenance (None for a plain schedule file) from JSON text.

    Refuses malformed JSON, another schema or schema version, unknown fields (top level, steps,
    provenance) and an ``nfe`` field that disagrees with the steps, each with one sentence.
    """
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ScheduleError(f"{where}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
                            "fix the file") from None
    if not isinstance(d, dict) or d.get("schema") != "steptune.schedule":
        raise ScheduleError(f"{where}: not a steptune schedule (missing \"schema\": \"steptune.schedule\")")
    version = d.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ScheduleError(f"{where}: field 'version' must be an integer (this steptune reads version "
                            f"{SCHEMA_VERSION})")
    if version != SCHEMA_VERSION:
        hint = "upgrade steptune to read it" if version > SCHEMA_VERSION else "re-export it with this steptune"
        raise ScheduleError(f"{where}: schedule schema version {version} is not supported (this steptune reads "
                            f"version {SCHEMA_VERSION}); {hint}")
    unknown = [k for k in d if k not in (*SCHEDULE_FIELDS, "provenance")]
    if unknown:
        raise ScheduleError(f"{where}: unknown field {unknown[0]!r} at the top level; remove it or check its "
                            "spelling")
    prov = d.get("provenance")
    if prov is not None:
        if not isinstance(prov, dict):
            raise ScheduleError(f"{where}: field 'provenance' must be an object")
        bad = [k for k in prov if k not in PROVENANCE_FIELDS]
        if bad:
            raise ScheduleError(f"{where}: unknown provenance field {bad[0]!r}; remove it or check its spelling")
        pv = prov.get("version", PROVENANCE_VERSION)
        if not isinstance(pv, int) or pv > PROVENANCE_VERSION:
            raise ScheduleError(f"{where}: provenance version {pv!r} is not supported (this steptune reads "
                                f"version {PROVENANCE_VERSION}); upgrade steptune")
        if prov.get("metrics") is not None and not isinstance(prov["metrics"], dict):
            raise ScheduleError(f"{where}: provenance field 'metrics' must be an object")
    sched = Schedule.from_dict({k: v for k, v in d.items() if k != "provenance"}, where=where)
    try:
        sched.validate()
    except ScheduleError as e:
        raise ScheduleError(f"{where}: {e}") from None
    return sched, prov


def read_export(path: str | Path) -> tuple[Schedule, dict | None]:
    path = Path(path)
    if not path.is_file():
        raise ScheduleError(f"{path}: no such schedule file")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise ScheduleError(f"{path}: not a text file; a schedule file is JSON") from None
    return parse_export(text, where=str(path))


def import_schedule(db: Storage, source: str | Path, study: str, *, queue: bool = False) -> TrialRecord:
    """Add a schedule JSON file (or JSON text starting with ``{``) to ``study`` (created if missing).

    The file is validated completely before anything is written. A steptune export whose metrics
    belong to the same problem as the study keeps them as a ``complete`` trial; anything else (a
    hand-written schedule, another problem, ``queue=True``) becomes a ``queued`` trial to evaluate.
    """
    from .db import StorageError

    if isinstance(source, str) and source.lstrip().startswith("{"):
        sched, prov = parse_export(source, where="schedule JSON")
    else:
        sched, prov = read_export(source)
    prov = prov or {}
    problem = prov.get("problem") if isinstance(prov.get("problem"), dict) else None
    identity = problem.get("identity") if problem else None
    try:
        existing = db.get_study(study)
    except StorageError:
        existing = None
    if existing is not None and existing.kind in ("relaxation", "dc-fit"):
        raise ScheduleError(f"{source}: study {study!r} is a {existing.kind} study; import the schedule into another "
                            "study")
    if existing is not None and existing.problem and sched.noise:
        study_noise = existing.problem["identity"].get("noise")
        if study_noise and noise_mod.from_dict(study_noise) != noise_mod.from_dict(sched.noise):
            raise ScheduleError(f"{source}: the schedule is for noise schedule "
                                f"{noise_mod.from_dict(sched.noise)!r} but study {study!r} uses "
                                f"{noise_mod.from_dict(study_noise)!r}; import it into another study")
    same_problem = existing is None or existing.problem is None or (
        identity is not None and existing.problem["identity"] == identity)
    fields: dict[str, Any] = {"schedule": sched}
    if not queue and prov.get("metrics") and same_problem:
        fields.update(status="complete", metrics=prov["metrics"], score=prov.get("score"),
                      fidelity=prov.get("fidelity") or "", bank=prov.get("bank") or "",
                      n_samples=prov.get("n_samples"))
    else:  # to evaluate on the held-out bank, as a job's next run does with its own held-out sample count
        job = ((existing.config or {}).get("job") or {}) if existing is not None else {}
        fields.update(fidelity="heldout", bank="heldout",
                      n_samples=(job.get("evaluation") or {}).get("heldout_samples"))
    create = {"method": "import", "problem": identity, "conventions": problem.get("conventions") if problem else None,
              "metric": prov.get("metric") or "rmse"}
    tid = db.add_trials(study, [fields], create=create)[0]
    return db.trial(tid)


# ---- conventions ---------------------------------------------------------------------------------


def conventions_for(schedule: Schedule, study: StudyRecord | None = None, **overrides) -> dict:
    """The model conventions to export with: explicit ``overrides`` (prediction, time_input,
    time_scale), then the study's problem, then the schedule's own ``conventions``."""
    conv: dict = {}
    conv.update({k: v for k, v in (schedule.conventions or {}).items() if v is not None})
    if study is not None and study.problem:
        conv.update({k: v for k, v in (study.problem.get("conventions") or {}).items() if v is not None})
    conv.update({k: v for k, v in overrides.items() if v is not None})
    if "prediction" not in conv or "time_input" not in conv:
        raise ExportError("the model's conventions are unknown (no problem stored with the study); pass the "
                          "prediction type and time input (--prediction eps --time-input discrete)")
    return conv


def _noise(schedule: Schedule):
    if not schedule.noise:
        raise ExportError("the schedule names no noise schedule, so its times cannot be turned into sigmas; "
                          "rebuild it with its noise schedule")
    return noise_mod.from_dict(schedule.noise)


# ---- diffusers -----------------------------------------------------------------------------------


def scheduler_for(schedule: Schedule, conventions: dict):
    """A ``SteptuneScheduler`` running ``schedule`` for a model with these conventions (needs diffusers)."""
    from steptune.exports.diffusers_scheduler import SteptuneScheduler

    if schedule.nfe < 1:
        raise ExportError("the schedule makes no model call (one step with an analytical first step); "
                          "a diffusers pipeline needs at least one")
    return SteptuneScheduler(schedule=schedule.to_dict(), prediction_type=conventions["prediction"],
                             time_input=conventions["time_input"],
                             time_scale=float(conventions.get("time_scale") or 1.0))


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
        if self.class_name == "DPMSolverMultistepScheduler":
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
    ns = _noise(schedule)
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


def _euler_export(schedule: Schedule, conventions: dict) -> StockExport:
    ns, betas, prediction_type = _stock_inputs(schedule, conventions, "EulerDiscreteScheduler")
    for i, st in enumerate(schedule.steps):
        if (st.order != 1 or st.corrector is not None or st.start != -1 or st.dc_ratio != 1.0):
            raise ExportError(f"step {i} is not a plain first-order step (order {st.order}"
                              f"{', corrector' if st.corrector else ''}), and EulerDiscreteScheduler only takes "
                              "first-order schedules")
    if schedule.times[-1] != 0.0:
        raise ExportError(f"the schedule ends at t = {schedule.times[-1]:.6g} > 0, where EulerDiscreteScheduler "
                          "would return x/alpha instead of the sample; end the schedule at t = 0")
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


def stock_diffusers_export(schedule: Schedule, conventions: dict, kind: str = "auto") -> StockExport:
    """The stock diffusers scheduler that runs ``schedule`` exactly, or ExportError saying why none does.

    ``kind``: ``dpmsolver`` (DPMSolverMultistepScheduler, integer ``timesteps=``), ``euler``
    (EulerDiscreteScheduler, ``sigmas=``) or ``auto`` (the first of the two that is exact).
    """
    makers = {"dpmsolver": _dpm_export, "euler": _euler_export}
    if kind != "auto":
        if kind not in makers:
            raise ExportError(f"unknown stock scheduler {kind!r}; use dpmsolver, euler or auto")
        return makers[kind](schedule, conventions)
    reasons = []
    for name, make in makers.items():
        try:
            return make(schedule, conventions)
        except ExportError as e:
            reasons.append(f"{name}: {e}")
    raise ExportError("no stock diffusers scheduler runs this schedule exactly (" + "; ".join(reasons) + ")")


# ---- k-diffusion / ComfyUI -----------------------------------------------------------------------


def k_diffusion_sigmas(schedule: Schedule) -> list[float]:
    """The model's own sigma at every time of the schedule, descending, ending in 0 (k-diffusion's
    ``sigmas``): sigma/alpha for VP and EDM models, as k-diffusion and ComfyUI take them, and t for a
    rectified-flow model (x_t = (1 - t) x0 + t eps), as ComfyUI's flow models (SD3, Flux) take them.

    A schedule that stops at a positive sigma gets a trailing 0 appended, as k-diffusion's schedule
    helpers do. The list carries the times only; the per-step solver decisions are in the JSON export.
    """
    ns = _noise(schedule)
    times = torch.tensor(schedule.times, dtype=torch.float64)
    sig = (times if ns.kind == "flow" else ns.edm_sigma(times)).tolist()
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
        why.append(f"the list ends with a step from the schedule's last time (sigma {sig[-2]:.4g}) to 0, "
                   "one more call")
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
