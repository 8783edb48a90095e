"""steptune.space: what a schedule is and how it runs."""

from . import noise, presets, spacing
from .errors import ScheduleError
from .model import Model
from .sampler import NonFiniteError, Request, TrajectoryRun, sample, trajectory
from .schedule import Corrector, Schedule, Step, load_schedule

__all__ = ["Corrector", "Model", "NonFiniteError", "Schedule", "ScheduleError", "Step", "load_schedule",
           "noise", "presets", "Request", "sample", "spacing", "trajectory", "TrajectoryRun"]
