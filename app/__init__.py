"""steptune: search and tune diffusion solver schedules."""

__version__ = "0.1.0"

__all__ = ["Corrector", "Model", "NonFiniteError", "Schedule", "ScheduleError", "Step", "__version__",
           "load_schedule", "noise", "presets", "sample", "spacing"]


def __getattr__(name: str):
    # The public API comes from steptune.space, imported on first use so that `steptune` starts (and
    # answers Ctrl-C) before torch is loaded.
    if name in __all__:
        from steptune import space

        return getattr(space, name)
    raise AttributeError(f"module 'steptune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
