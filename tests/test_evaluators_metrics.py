"""Metrics against known values and closed forms."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from steptune.evaluators import GaussianMixture, median_error, nll, rmse, sliced_wasserstein
from steptune.evaluators.metrics import projections, sorted_projections


def test_rmse_known_values():
    assert rmse(torch.zeros(4, 3), 2 * torch.ones(4, 3)) == pytest.approx(2.0)
    ref = torch.zeros(2, 2)
    ref[1, 0] = 4.0
    assert rmse(torch.zeros(2, 2), ref) == pytest.approx(2.0)  # sqrt(16 / 4)
    assert rmse(torch.ones(3, 2, 2), torch.ones(3, 2, 2)) == 0.0
    with pytest.raises(ValueError):
        rmse(torch.zeros(2, 3), torch.zeros(3, 2))


def test_median_error_ignores_a_few_outliers():
    ref = torch.zeros(5, 2)
    x = torch.full((5, 2), 0.1)
    x[0] = 100.0
    assert median_error(x, ref) == pytest.approx(0.1)
    assert rmse(x, ref) > 40


@pytest.mark.usefixtures("float64")  # compared with a reference to round-off
def test_sliced_wasserstein_of_a_shift_is_the_closed_form():
    """For y = x + d, W2 of each projection is |theta . d|, so SW2^2 = mean (theta . d)^2 -> |d|^2 / D."""
    g = torch.Generator().manual_seed(31)
    D = 4
    x = torch.randn(500, D, generator=g)
    d = torch.tensor([0.3, -0.2, 0.5, 0.1])
    sw = sliced_wasserstein(x, x + d, n_projections=256, seed=3)
    theta = projections(D, 256, seed=3)
    assert sw == pytest.approx(float(torch.sqrt(((theta @ d) ** 2).mean())), rel=1e-10)
    many = sliced_wasserstein(x, x + d, n_projections=20000, seed=4)
    assert many == pytest.approx(float(d.norm()) / math.sqrt(D), rel=0.02)


def test_sliced_wasserstein_small_for_the_same_distribution():
    g = torch.Generator().manual_seed(32)
    x, y = torch.randn(4000, 3, generator=g), torch.randn(4000, 3, generator=g)
    same = sliced_wasserstein(x, y)
    shifted = sliced_wasserstein(x, y + 0.5)
    assert same < 0.05
    assert shifted == pytest.approx(0.5, rel=0.15)  # |d| / sqrt(D) with d = (0.5, 0.5, 0.5)
    assert sliced_wasserstein(x, y, seed=1) == sliced_wasserstein(x, y, seed=1)


def test_sliced_wasserstein_unequal_counts_is_exact():
    x = torch.tensor([[0.0], [1.0]])
    y = torch.tensor([[0.0], [0.0], [1.0]])
    # quantile functions differ (0 vs 1) on u in (1/2, 2/3): W2^2 = 1/6 in 1-D, for either direction sign
    assert sliced_wasserstein(x, y) == pytest.approx(math.sqrt(1 / 6), rel=1e-12)
    z = torch.randn(7, 3, generator=torch.Generator().manual_seed(33))
    assert sliced_wasserstein(z, torch.cat([z, z])) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.usefixtures("float64")
def test_sliced_wasserstein_with_the_data_side_sorted_once_is_the_same_number():
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(64, 6, generator=g), torch.randn(100, 6, generator=g) + 0.3
    theta = projections(6, 64, seed=2)
    xs, ys = (x @ theta.T).sort(dim=0).values, (y @ theta.T).sort(dim=0).values
    # merged quantile breakpoints, written out: the integral of (F_x^-1 - F_y^-1)^2 over u
    u = torch.cat([torch.arange(1, 65) / 64, torch.arange(1, 101) / 100]).double().unique()
    lo = torch.cat([torch.zeros(1, dtype=u.dtype), u[:-1]])
    mid = 0.5 * (u + lo)
    w2 = ((u - lo)[:, None] * (xs[(mid * 64).long()] - ys[(mid * 100).long()]) ** 2).sum(dim=0)
    direct = math.sqrt(float(w2.mean()))
    kept = sorted_projections(y, 64, seed=2)
    assert sliced_wasserstein(x, y, 64, seed=2) == pytest.approx(direct, rel=1e-12)
    assert sliced_wasserstein(x, y, 64, seed=2, y_sorted=kept) == sliced_wasserstein(x, y, 64, seed=2)
    theta.zero_()  # a caller's copy of the directions: the metric keeps its own
    assert sliced_wasserstein(x, y, 64, seed=2, y_sorted=kept) == pytest.approx(direct, rel=1e-12)


def test_nll_matches_scipy_for_one_gaussian():
    mu = np.array([0.5, -1.0, 0.2])
    cov = np.array([[1.0, 0.3, 0.0], [0.3, 0.5, 0.1], [0.0, 0.1, 0.8]])
    mix = GaussianMixture([1.0], mu[None], cov[None])
    x = torch.randn(100, 3, generator=torch.Generator().manual_seed(34))
    expected = -multivariate_normal(mu, cov).logpdf(x.numpy()).mean() / 3
    assert nll(x, mix) == pytest.approx(expected, rel=1e-10)
    # of the noisy marginal alpha x0 + sigma eps: N(alpha mu, alpha^2 cov + sigma^2 I)
    expected = -multivariate_normal(0.8 * mu, 0.64 * cov + 0.09 * np.eye(3)).logpdf(x.numpy()).mean() / 3
    assert nll(x, mix, alpha=0.8, sigma=0.3) == pytest.approx(expected, rel=1e-10)
