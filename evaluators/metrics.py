"""Quality metrics: error against a reference, sliced Wasserstein distance, negative log-likelihood, Fréchet
distance between Gaussians fitted to features."""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from scipy import linalg

Tensor = torch.Tensor
_F64 = torch.float64


def _flat(x: Tensor) -> Tensor:
    x = torch.as_tensor(x)
    return x.reshape(x.shape[0], -1).to(_F64)


def rmse(x: Tensor, ref: Tensor) -> float:
    """sqrt of the mean, over samples and dimensions, of the squared error."""
    x, ref = _flat(x), _flat(ref).to(x.device)
    if x.shape != ref.shape:
        raise ValueError(f"rmse: shapes differ ({tuple(x.shape)} vs {tuple(ref.shape)})")
    return float(torch.sqrt(((x - ref) ** 2).mean()))


def median_error(x: Tensor, ref: Tensor) -> float:
    """Median over samples of each sample's RMS error (over its dimensions): a robust companion to
    ``rmse``, which a few samples that end in another mode than the reference can dominate."""
    x, ref = _flat(x), _flat(ref).to(x.device)
    if x.shape != ref.shape:
        raise ValueError(f"median_error: shapes differ ({tuple(x.shape)} vs {tuple(ref.shape)})")
    return float(torch.sqrt(((x - ref) ** 2).mean(dim=1)).median())


def projections(dim: int, n_projections: int = 256, seed: int = 0) -> Tensor:
    """Fixed random unit directions (n_projections, dim), uniform on the sphere."""
    return _projections(dim, n_projections, seed).clone()


@functools.lru_cache(maxsize=8)
def _projections(dim: int, n_projections: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(n_projections, dim, generator=g, dtype=_F64)
    return theta / theta.norm(dim=1, keepdim=True)


def _w2_sq_1d(a: Tensor, b: Tensor, b_sorted: bool = False) -> Tensor:
    """Squared W2 between the empirical distributions of the columns of a (n, P) and b (m, P), per column.

    Exact: the quantile functions are piecewise constant, so the integral over u in (0, 1) is a sum
    over the merged breakpoints i/n and j/m (with n = m this is the mean squared difference of the
    sorted values).
    """
    a, b = a.sort(dim=0).values, b if b_sorted else b.sort(dim=0).values
    n, m = a.shape[0], b.shape[0]
    if n == m:
        return ((a - b) ** 2).mean(dim=0)
    u = torch.cat([torch.arange(1, n + 1, dtype=_F64) / n, torch.arange(1, m + 1, dtype=_F64) / m]).unique()
    u = torch.cat([torch.zeros(1, dtype=_F64), u]).to(a.device)
    mid, width = 0.5 * (u[1:] + u[:-1]), u[1:] - u[:-1]
    ia = (mid * n).floor().long().clamp(max=n - 1)
    ib = (mid * m).floor().long().clamp(max=m - 1)
    return (width[:, None] * (a[ia] - b[ib]) ** 2).sum(dim=0)


def sliced_wasserstein(x: Tensor, y: Tensor, n_projections: int = 256, seed: int = 0,
                       y_sorted: Tensor | None = None) -> float:
    """Sliced 2-Wasserstein distance: sqrt of the mean over fixed random directions theta of
    W2^2(theta . x, theta . y). Sample counts may differ. ``y_sorted``: ``sorted_projections(y, ...)`` kept from
    an earlier call on the same ``y`` (the same result, one projection and sort less)."""
    x, y = _flat(x), _flat(y)
    y = y.to(x.device)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"sliced_wasserstein: dimensions differ ({x.shape[1]} vs {y.shape[1]})")
    theta = _projections(x.shape[1], n_projections, seed).to(x.device)
    if y_sorted is None:
        y_sorted = (y @ theta.T).sort(dim=0).values
    return float(torch.sqrt(_w2_sq_1d(x @ theta.T, y_sorted.to(x.device), b_sorted=True).mean()))


def sorted_projections(y: Tensor, n_projections: int = 256, seed: int = 0) -> Tensor:
    """The projections of ``y`` on ``sliced_wasserstein``'s directions, sorted per direction (its ``y_sorted``)."""
    y = _flat(y)
    return (y @ _projections(y.shape[1], n_projections, seed).to(y.device).T).sort(dim=0).values


def nll(x: Tensor, density, alpha: float = 1.0, sigma: float = 0.0) -> float:
    """Mean negative log-likelihood per dimension (nats) of the samples x.

    ``density`` is a ``GaussianMixture`` (evaluated for x_t = alpha x0 + sigma eps; the data density
    by default) or any callable returning per-sample log densities.
    """
    x = torch.as_tensor(x)
    dim = math.prod(x.shape[1:])
    if hasattr(density, "log_prob"):
        lp = density.log_prob(x, alpha, sigma)
    else:
        lp = density(x)
    return float(-lp.mean() / dim)


def gaussian_stats(features: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of features (n, d), float64."""
    f = features.detach().to("cpu", torch.float64).numpy()
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(C1 + C2 - 2 (C1 C2)^(1/2))."""
    covmean = linalg.sqrtm(cov1 @ cov2)
    if not np.isfinite(covmean).all():  # singular product: regularise, as the FID reference code does
        eps = 1e-6 * np.eye(len(mu1))
        covmean = linalg.sqrtm((cov1 + eps) @ (cov2 + eps))
    covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * np.trace(covmean))
