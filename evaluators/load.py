"""One entry point for every problem: a named one (``gmm-2d``, ``gmm-digits``, ``digits-cond``) or a network
given as ``module:factory``, with the conventions given on the command line or in a job file."""

from __future__ import annotations

import math
from collections.abc import Callable

from steptune.space.noise import NoiseSchedule

from .digits_cond import digits_problem
from .plugins import plugin_problem
from .problems import PROBLEMS, Problem, get_problem

NETWORK_PROBLEMS: dict[str, Callable[..., Problem]] = {"digits-cond": digits_problem}


def load_problem(spec: str, *, noise: str | NoiseSchedule | None = None, prediction: str | None = None,
                 time_input: str | None = None, time_scale: float | None = None,
                 guidance_scale: float | None = None, shape: tuple[int, ...] | None = None,
                 **options) -> Problem:
    """A problem by name (``gmm-2d``, ``gmm-digits``, ``digits-cond``) or a network as ``module:factory``.

    Conventions that do not apply to a problem are refused with a ValueError naming them. ``options``
    go to the problem (e.g. ``cache_dir`` for ``gmm-digits``, ``t_start``/``t_end``, ``reference_tol``
    for networks)."""
    if time_scale is not None and not (math.isfinite(time_scale) and time_scale > 0):
        raise ValueError(f"--time-scale {time_scale:g}: must be a positive number (e.g. 1000 for a network that "
                         "takes t in [0, 1000])")
    conv = {"prediction": prediction, "time_input": time_input, "time_scale": time_scale}
    if spec in PROBLEMS:
        if guidance_scale is not None:
            raise ValueError(f"problem {spec!r} is not guided; drop --guidance (digits-cond and networks whose "
                             "factory gives cond and uncond arguments take it)")
        if shape is not None:
            raise ValueError(f"problem {spec!r} fixes its own sample shape; drop --shape")
        return get_problem(spec, **({"noise": noise} if noise is not None else {}),
                           **{k: v for k, v in conv.items() if v is not None}, **options)
    if spec in NETWORK_PROBLEMS:
        given = [k for k, v in {**conv, "noise": noise, "shape": shape}.items() if v is not None]
        if given:
            raise ValueError(f"problem {spec!r} fixes its own conventions; drop --{given[0].replace('_', '-')}")
        return NETWORK_PROBLEMS[spec](**({"guidance_scale": guidance_scale} if guidance_scale is not None else {}),
                                      **options)
    if ":" in spec:
        return plugin_problem(spec, noise=noise, guidance_scale=guidance_scale, shape=shape, **conv, **options)
    names = ", ".join([*PROBLEMS, *NETWORK_PROBLEMS])
    raise ValueError(f"unknown problem {spec!r}; choose from {names}, or give a network as module:factory")


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if not shape or any(v < 1 for v in shape) or math.prod(shape) < 1:
        raise ValueError(f"--shape {text!r}: give positive integers like 3,32,32")
    return shape


def load_error_text(e: BaseException) -> str:
    """The first line of what building a problem raised (its type where it says nothing), without the quotes a
    KeyError puts around its message."""
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    return text.splitlines()[0] if text.strip() else type(e).__name__
