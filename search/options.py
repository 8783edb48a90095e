"""A search method's options checked before anything runs: each a parameter its class takes, of its default's
type and in the range the class declares (``OPTION_RULES``), so a job with a bad option is refused in one line
before its study is written, not after its first batches."""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

from steptune.space.errors import unknown_field

PASSED_BY_THE_RUNNER = ("noise", "t_start", "t_end", "nfes", "seed")


def option_defaults(cls) -> dict:
    """The options ``cls`` takes (its own and its base classes' keyword parameters) and their defaults."""
    out: dict = {}
    for klass in cls.__mro__:  # the class's own first
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        for p in inspect.signature(init).parameters.values():
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name == "self" or p.name in PASSED_BY_THE_RUNNER:
                continue
            out.setdefault(p.name, p.default)
    return out


def check_options(cls, options: dict, method: str, key: str | None = "options") -> None:
    """A ValueError, one sentence naming the option (as ``key.NAME``), for an option ``cls`` does not take, a value
    not of its default's type or outside the class's ``OPTION_RULES``: a tuple ``(low, high)`` of bounds (None:
    open), or a list of the allowed values (for a list option: of each entry's)."""
    defaults = option_defaults(cls)
    rules = getattr(cls, "OPTION_RULES", {})
    for name, value in options.items():
        if name not in defaults:
            said = unknown_field(name, defaults, "option", at=f" of method {method!r}")
            raise ValueError(f"{key + ': ' if key else ''}{said}; its options: {', '.join(defaults)}")
        if value is None and defaults[name] is None:  # an option whose default is None may be given as None
            continue
        problem = _type_problem(value, defaults[name]) or _rule_problem(value, rules.get(name))
        if problem:
            raise ValueError(f"{key + '.' if key else ''}{name} = {value!r}: {problem} (an option of method "
                             f"{method!r})")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _type_problem(value, default) -> str | None:
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "give true or false"
    if isinstance(default, int):
        return None if isinstance(value, int) and not isinstance(value, bool) else "give a whole number"
    if isinstance(default, float):
        return None if _number(value) else "give a number"
    if isinstance(default, str):
        return None if isinstance(value, str) else "give a name (a string)"
    if isinstance(default, Sequence):
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
        return None if ok else "give a list of names"
    return None


def _rule_problem(value, rule) -> str | None:
    if rule is None:
        return None
    if isinstance(rule, tuple):
        low, high = rule
        if (low is not None and value < low) or (high is not None and value > high):
            if high is None:
                return f"give {low} or more"
            return f"give a value from {low} to {high}" if low is not None else f"give {high} or less"
        return None
    values = value if isinstance(value, (list, tuple)) else [value]
    bad = [v for v in values if v not in rule]
    if bad or not values:
        return f"use {'some' if isinstance(value, (list, tuple)) else 'one'} of {', '.join(map(str, rule))}"
    return None
