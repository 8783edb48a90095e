"""The relaxation kinds: scale factors on a step's first-derivative term.

Every kind's factor is multiplied by 1 + coef·h, where ``coef`` is the step's (or corrector's)
``relaxation_coef`` (0 by default: the kind's factor alone); ``linear`` is the kind whose own factor is 1.

One registry: Schedule validation accepts its names, the step kernel computes its factors, and
searchers draw from the kinds a predictor step may use (``STEP_RELAXATIONS``, in registry order).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .phi import expm1, phi_terms


@dataclass(frozen=True)
class Relaxation:
    """``factor(hh, h)``: the scale, where hh = h for noise prediction and -h for data prediction.
    ``predictor`` is False for a kind that only a corrector uses."""

    factor: Callable[[float, float], float]
    predictor: bool = True


def _half_c1_over_c2(hh: float, h: float) -> float:
    c1, c2 = phi_terms(hh, 2)
    return 0.5 * hh * c1 / c2


def _bh1(hh: float, h: float) -> float:
    return 0.5 * hh * hh / phi_terms(hh, 2)[1]


def _plus_half_exp(hh: float, h: float) -> float:
    return 1.0 + 0.5 * phi_terms(hh, 1)[0]


def _minus_half_exp(hh: float, h: float) -> float:
    return 1.0 - 0.5 * phi_terms(hh, 1)[0]


def _heun(hh: float, h: float) -> float:
    """The trapezoidal (Heun) corrector in the sigma/alpha coordinate."""
    return h * expm1(h) / (2.0 * phi_terms(hh, 2)[1])


RELAXATIONS: dict[str, Relaxation] = {
    "none": Relaxation(lambda hh, h: 1.0),
    "dpmsolver-2": Relaxation(_half_c1_over_c2),
    "unipc-bh2": Relaxation(_half_c1_over_c2),
    "unipc-bh1": Relaxation(_bh1),
    "0.5exp": Relaxation(_plus_half_exp),
    "-0.5exp": Relaxation(_minus_half_exp),
    "linear": Relaxation(lambda hh, h: 1.0),
    "heun": Relaxation(_heun, predictor=False),
}

STEP_RELAXATIONS: tuple[str, ...] = tuple(k for k, r in RELAXATIONS.items() if r.predictor)


def relaxation_factor(kind: str, hh: float, h: float, coef: float = 0.0) -> float:
    """Scale on the first-derivative term of a step of log-SNR length h: the kind's factor times 1 + coef·h
    (``coef`` may be a tensor in an autograd graph)."""
    try:
        relaxation = RELAXATIONS[kind]
    except KeyError:
        raise ValueError(f"unknown relaxation {kind!r}") from None
    factor = relaxation.factor(hh, h)
    if isinstance(coef, (int, float)) and coef == 0:
        return factor
    return factor * (1.0 + coef * h)
