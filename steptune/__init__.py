"""steptune: search and tune diffusion solver schedules."""

from steptune.space import (
           Corrector,
           Model,
           NonFiniteError,
           Schedule,
           ScheduleError,
           Step,
           load_schedule,
           noise,
           presets,
           sample,
           spacing,
)

__version__ = "0.1.0"

__all__ = ["Corrector", "Model", "NonFiniteError", "Schedule", "ScheduleError", "Step", "__version__",
           "load_schedule", "noise", "presets", "sample", "spacing"]
