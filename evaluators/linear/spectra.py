"""What a solve and a few products tell about SOR's spectrum: the asymptotic convergence factor read off
a residual history, the Jacobi radius it implies by Young's relation, and a Lanczos estimate of the
Jacobi radius before any solve.

Young's relation, exact for consistently ordered matrices: an eigenvalue λ of the SOR iteration matrix
at ω and an eigenvalue μ of the Jacobi matrix satisfy (λ + ω − 1)² = λ ω² μ². Below the optimum ω*(μ) =
2/(1 + √(1 − μ²)) the spectral radius is the larger real root, ρ(ω) = ((ωμ + √(ω²μ² − 4(ω − 1)))/2)²;
at and above it every eigenvalue has modulus ω − 1, so a solve there shows only that μ ≤ 2√(ω − 1)/ω.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp

MIN_TAIL = 4  # iterations a factor is measured over, at least


def convergence_factor(residuals) -> float | None:
    """The mean reduction factor per iteration over the second half of a residual history (the first
    half holds the transient), or None for a history too short to tell."""
    k = len(residuals) - 1
    j = max(2, k // 2)
    if k - j < MIN_TAIL:
        return None
    first, last = float(residuals[j]), float(residuals[k])
    if not (first > 0.0 and 0.0 < last < math.inf):
        return None
    lam = (last / first) ** (1.0 / (k - j))
    return lam if 0.0 < lam < 1.0 else None


def jacobi_radius_from_factor(lam: float, omega: float) -> float:
    """μ from an SOR factor λ at ω by Young's relation (clipped to [0, 1))."""
    mu = (lam + omega - 1.0) / (omega * math.sqrt(lam))
    return min(max(mu, 0.0), 1.0 - 1e-12)


def optimal_omega(mu: float) -> float:
    """Young's optimum 2/(1 + √(1 − μ²))."""
    return 2.0 / (1.0 + math.sqrt(max(0.0, 1.0 - mu * mu)))


def sor_factor(omega: float, mu: float) -> float:
    """Young's spectral radius of SOR at ω for Jacobi radius μ."""
    if omega >= optimal_omega(mu):
        return omega - 1.0
    s = 0.5 * (omega * mu + math.sqrt(max(omega * omega * mu * mu - 4.0 * (omega - 1.0), 0.0)))
    return s * s


def jacobi_radius_lanczos(A: sp.csr_matrix, steps: int = 30, seed: int = 0) -> tuple[float, int]:
    """Lanczos (full reorthogonalisation) on D^{-1/2} A D^{-1/2}; returns (μ estimate, matrix-vector
    products used). μ = max(1 − θ_min, θ_max − 1) over the extreme Ritz values θ, which lie inside the
    spectrum, so the estimate is at most the true Jacobi radius."""
    n = A.shape[0]
    d = 1.0 / np.sqrt(A.diagonal())
    S = sp.csr_matrix(A.multiply(d[:, None]).multiply(d[None, :]))
    steps = max(1, min(int(steps), n))
    Q = np.zeros((steps + 1, n))
    alpha, beta = np.zeros(steps), np.zeros(steps)
    q = np.random.default_rng(seed).standard_normal(n)
    Q[0] = q / np.linalg.norm(q)
    used = 0
    for j in range(steps):
        w = S @ Q[j]
        used += 1
        alpha[j] = Q[j] @ w
        w -= Q[: j + 1].T @ (Q[: j + 1] @ w)
        w -= Q[: j + 1].T @ (Q[: j + 1] @ w)
        beta[j] = np.linalg.norm(w)
        if beta[j] < 1e-12 * max(1.0, abs(alpha[j])):
            used = j + 1
            break
        Q[j + 1] = w / beta[j]
    k = used
    T = np.diag(alpha[:k]) + np.diag(beta[: k - 1], 1) + np.diag(beta[: k - 1], -1)
    theta = np.linalg.eigvalsh(T)
    return float(min(max(1.0 - theta[0], theta[-1] - 1.0, 0.0), 1.0 - 1e-12)), used
