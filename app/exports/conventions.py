"""What an export needs besides the schedule: the model's conventions (prediction type, time input), the
noise schedule its times live on, and the diffusers ``SteptuneScheduler`` built from both (the σ convention
and what a schedule was tuned for are in ``tuning``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from steptune.space import Schedule
from steptune.space import noise as noise_mod

from .tuning import tuning_record

if TYPE_CHECKING:
    from steptune.storage import StudyRecord

class ExportError(ValueError):
    """An export that cannot be made exactly; the message says why in one sentence."""


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


def schedule_noise(schedule: Schedule):
    """The noise schedule the schedule's times live on (to turn them into sigmas or timesteps)."""
    if not schedule.noise:
        raise ExportError("the schedule names no noise schedule, so its times cannot be turned into sigmas; "
                          "rebuild it with its noise schedule")
    return noise_mod.from_dict(schedule.noise)


def scheduler_for(schedule: Schedule, conventions: dict, tuned: dict | None = None):
    """A ``SteptuneScheduler`` running ``schedule`` for a model with these conventions (needs diffusers);
    ``tuned`` (default: ``tuning_record(schedule, conventions)``) is recorded in its config as ``tuned_for``."""
    from .diffusers_scheduler import SteptuneScheduler

    if schedule.nfe < 1:
        raise ExportError("the schedule makes no model call (one step with an analytical first step); "
                          "a diffusers pipeline needs at least one")
    return SteptuneScheduler(schedule=schedule.to_dict(), prediction_type=conventions["prediction"],
                             time_input=conventions["time_input"],
                             time_scale=float(conventions.get("time_scale") or 1.0),
                             tuned_for=tuned if tuned is not None else tuning_record(schedule, conventions,
                                                                                        schedule_noise(schedule)))
