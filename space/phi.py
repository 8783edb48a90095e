"""The phi functions of exponential integrators, in the form the step kernel uses."""

from __future__ import annotations

import math

import torch


def phi_terms(z: float, n: int) -> list[float]:
    """[c_1(z), ..., c_n(z)] with c_k(z) = z^k phi_k(z) = e^z - sum_{j<k} z^j / j!."""
    if abs(z) < 0.5:  # the recurrence below cancels for small z; sum the series instead
        out = []
        for k in range(1, n + 1):
            term = z**k / math.factorial(k)
            total = term
            for j in range(k + 1, k + 26):  # not in place: a tensor z (times being fitted) would alias term and total
                term = term * (z / j)
                total = total + term
            out.append(total)
        return out
    out = [expm1(z)]
    for k in range(1, n):
        out.append(out[-1] - z**k / math.factorial(k))
    return out


def expm1(z):
    """e^z - 1 of a float, or of a tensor (which keeps its autograd graph: times being fitted)."""
    return torch.expm1(z) if isinstance(z, torch.Tensor) else math.expm1(z)
