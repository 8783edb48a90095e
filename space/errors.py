"""The error steptune.space raises for a schedule, noise schedule or spacing that cannot run."""


class ScheduleError(ValueError):
    """A schedule that cannot run; the message names the step and the field."""
