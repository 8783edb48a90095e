"""The errors steptune.space raises: a schedule, noise schedule or spacing that cannot run, a network's output that
cannot be a prediction."""


class ScheduleError(ValueError):
    """A schedule that cannot run; the message names the step and the field."""


class NetworkOutputError(ValueError):
    """The network returned what cannot be a prediction for the states it was given; the message says what."""


def unknown_field(name: str, known, what: str = "field", at: str = "") -> str:
    """``unknown field 'oder'; did you mean 'order'?``: the name (and where it is, ``at``) and the nearest known one,
    or what to do where none is near."""
    import difflib

    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    return f"unknown {what} {name!r}{at}; " + (f"did you mean {close[0]!r}?" if close else
                                                "remove it or check its spelling")
