"""The one step kernel: an exponential-integrator step of any order in lambda = log(alpha/sigma).

    noise: x_t = (alpha_t/alpha_s) x_s - sigma_t sum_k h^(k+1) phi_(k+1)(h)  eps^(k)(lambda_s)
    data:  x_t = (sigma_t/sigma_s) x_s + alpha_t sum_k h^(k+1) phi_(k+1)(-h) x0^(k)(lambda_s)

Derivatives come from finite differences over chosen history points. All coefficients are
float64 scalars; the only tensor work is one weighted sum per step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from .phi import phi_terms
from .relaxation import relaxation_factor

Tensor = torch.Tensor


class Node(NamedTuple):
    """A time on the noise schedule's axis: t, lambda = log(alpha/sigma), alpha and sigma."""

    t: float
    lam: float
    alpha: float
    sigma: float


@dataclass(frozen=True)
class StepRule:
    """What one kernel step does. ``start`` and ``points`` index the history (-1: the newest point): the
    step starts at ``start`` and estimates derivatives over ``points`` (used when ``order`` > 1);
    ``first_points`` uses only the first m of them for the first derivative; ``relaxation`` (a kind
    of the relaxation registry, with ``relaxation_coef``) scales the first-derivative term and
    ``second_scale`` the second; ``basis="t"`` interpolates in t instead (DEIS's tAB)."""

    prediction: str
    order: int
    start: int = -1
    points: tuple[int, ...] = ()
    first_points: int | None = None
    relaxation: str = "none"
    relaxation_coef: float = 0.0
    second_scale: float = 1.0
    basis: str = "lambda"


@dataclass
class Point:
    """A visited point: state x and the model's outputs there (both parameterisations)."""

    t: float
    lam: float
    alpha: float
    sigma: float
    x: Tensor
    eps: Tensor
    x0: Tensor

    def output(self, prediction: str) -> Tensor:
        return self.eps if prediction == "noise" else self.x0


def _difference_weights(r: list[float], m: int) -> list[list[float]]:
    """Rows q = 1..m: weights w with G_q = sum_j w[q-1][j] (F_j - F_s), G_q = h^q F^(q) / q!.

    r[j] = (lambda_j - lambda_s) / h; solves sum_q r_j^q G_q = F_j - F_s over the first m points,
    i.e. returns the inverse of V[j][q] = r_j^(q+1) (Gauss-Jordan with partial pivoting; m <= 4).
    """
    a = [[r[j] ** (q + 1) for q in range(m)] + [1.0 if k == j else 0.0 for k in range(m)] for j in range(m)]
    for col in range(m):
        piv = max(range(col, m), key=lambda i: abs(a[i][col]))
        if a[piv][col] == 0.0:
            raise ValueError("derivative points coincide in lambda; the finite differences are undefined")
        a[col], a[piv] = a[piv], a[col]
        p = a[col][col]
        a[col] = [v / p for v in a[col]]
        for i in range(m):
            if i != col and a[i][col] != 0.0:
                f = a[i][col]
                a[i] = [vi - f * vc for vi, vc in zip(a[i], a[col])]
    # a[:, m:] is V^-1 with V[j][q]; G = V^-1 (F - F_s), so row q of V^-1 gives G_q
    return [row[m:] for row in a]


def step_weights(start: Point, others: list[Point], to: Node, rule: StepRule,
                 t_of_lambda: Callable | None = None) -> tuple[float, float, list[float]]:
    """Coefficients (a, b, w) of x_t = a x_s + b F_s + sum_j w_j F_j over the derivative points, for the
    step ``rule`` from ``start`` to ``to``.

    ``basis="t"`` interpolates F with a Lagrange polynomial in t (not lambda) through the start and
    the points, as DEIS's tAB does, and integrates it against the exact kernel by Gauss-Legendre
    quadrature in lambda (``t_of_lambda`` maps the nodes to t).
    """
    order, alpha_t, sigma_t = rule.order, to.alpha, to.sigma
    h = to.lam - start.lam
    hh = h if rule.prediction == "noise" else -h
    c = phi_terms(hh, order)
    if rule.prediction == "noise":
        if start.alpha == 0:
            raise ValueError("noise prediction cannot start from alpha = 0 (pure noise); use data prediction there")
        a = alpha_t / start.alpha
        b = -(alpha_t * start.sigma / start.alpha) if sigma_t == 0 else -sigma_t * c[0]
        wk = [-sigma_t * c[k] for k in range(order)]
    else:
        a = sigma_t / start.sigma
        b = -alpha_t * c[0]
        wk = [alpha_t * (-1) ** (k + 1) * c[k] for k in range(order)]
    w = [0.0] * len(others)
    if order > 1 and rule.basis == "t":
        return a, *_t_basis_weights(start, others, h, alpha_t, sigma_t, rule.prediction, t_of_lambda)
    if order > 1:
        r = [(p.lam - start.lam) / h for p in others]
        inv = _difference_weights(r, len(others))
        rows = {q: inv[q - 1] for q in range(1, order)}
        first_points = rule.first_points
        if first_points is not None and first_points < len(others):
            sub = _difference_weights(r[:first_points], first_points)[0]
            rows[1] = list(sub) + [0.0] * (len(others) - first_points)
        for q in range(1, order):
            scale = wk[q] * math.factorial(q) / h**q
            if q == 1:
                scale *= relaxation_factor(rule.relaxation, hh, h, rule.relaxation_coef)
            elif q == 2:
                scale *= rule.second_scale
            for j in range(len(others)):
                w[j] += scale * rows[q][j]
        b -= sum(w)
    return a, b, w


_GL_NODES, _GL_WEIGHTS = (v.tolist() for v in np.polynomial.legendre.leggauss(24))


def _t_basis_weights(start: Point, others: list[Point], h: float, alpha_t: float, sigma_t: float, prediction: str,
                     t_of_lambda: Callable) -> tuple[float, list[float]]:
    if any(isinstance(v, Tensor) for v in (h, start.t, alpha_t, sigma_t, *(p.t for p in others))):
        return _t_basis_weights_tensor(start, others, h, alpha_t, sigma_t, prediction, t_of_lambda)
    us = [0.5 * h * (x + 1.0) for x in _GL_NODES]
    gs = [0.5 * h * g for g in _GL_WEIGHTS]
    ts = t_of_lambda(torch.tensor([start.lam + u for u in us], dtype=torch.float64)).tolist()
    if prediction == "noise":
        kern = [-sigma_t * math.exp(h - u) for u in us]
    else:
        kern = [alpha_t * math.exp(u - h) for u in us]
    nodes = [start.t] + [p.t for p in others]
    coefs = [0.0] * len(nodes)
    for g, k, tk in zip(gs, kern, ts):
        for j, lj in enumerate(lagrange_weights(nodes, tk)):
            coefs[j] += g * k * lj
    return coefs[0], coefs[1:]


def _t_basis_weights_tensor(start: Point, others: list[Point], h, alpha_t, sigma_t, prediction: str,
                            t_of_lambda: Callable) -> tuple[Tensor, list[Tensor]]:
    """:func:`_t_basis_weights` where times are fitted by autograd: the same quadrature on float64 tensors, so the
    weights stay in the graph (through the nodes' lambdas and times and the Lagrange polynomial's times)."""
    f64 = dict(dtype=torch.float64)
    h = torch.as_tensor(h, **f64)
    us = 0.5 * h * (torch.tensor(_GL_NODES, **f64) + 1.0)
    gs = 0.5 * h * torch.tensor(_GL_WEIGHTS, **f64)
    ts = t_of_lambda(torch.as_tensor(start.lam, **f64) + us)
    kern = -sigma_t * torch.exp(h - us) if prediction == "noise" else alpha_t * torch.exp(us - h)
    nodes = [torch.as_tensor(t, **f64) for t in (start.t, *(p.t for p in others))]
    coefs = [(gs * kern * lj).sum() for lj in lagrange_weights(nodes, ts)]
    return coefs[0], coefs[1:]


def solve_step(hist: list[Point], rule: StepRule, to: Node, *, out: Tensor | None = None,
               t_of_lambda: Callable | None = None) -> Tensor:
    """One generic step ``rule`` over the history ``hist`` to the time ``to``; ``out`` may be a buffer for
    the result that aliases none of the inputs."""
    s = hist[rule.start]
    others = [hist[p] for p in rule.points] if rule.order > 1 else []
    a, b, w = step_weights(s, others, to, rule, t_of_lambda)
    out = torch.mul(s.x, a, out=out)
    _add(out, s.output(rule.prediction), b)
    for wj, p in zip(w, others):
        if isinstance(wj, Tensor) or wj != 0.0:
            _add(out, p.output(rule.prediction), wj)
    return out


def _add(out: Tensor, y: Tensor, w: float | Tensor) -> None:
    """out += w y; ``w`` is a tensor where the step's times or coefficients are being fitted by autograd."""
    if isinstance(w, Tensor):
        out.add_(w.to(y.dtype) * y)
    else:
        out.add_(y, alpha=w)


def lagrange_weights(times: list[float], tau: float) -> list[float]:
    """Weights l_k(tau) of the Lagrange polynomial through ``times`` (``tau`` may be a tensor of many)."""
    out = []
    for k, tk in enumerate(times):
        w = 1.0
        for j, tj in enumerate(times):
            if j != k:
                w *= (tau - tj) / (tk - tj)
        out.append(w)
    return out
