"""GaussianMixture: the exact denoiser against closed forms, the score identity (autograd of the
marginal density), importance sampling; densities against scipy; sampling moments; fitting."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from steptune.evaluators import GaussianMixture, ring_mixture


def random_mixture(K=3, D=3, seed=0, spread=2.0):
    g = torch.Generator().manual_seed(seed)
    means = spread * torch.randn(K, D, generator=g)
    A = torch.randn(K, D, D, generator=g)
    covs = A @ A.transpose(1, 2) / D + 0.05 * torch.eye(D)
    weights = torch.rand(K, generator=g) + 0.2
    return GaussianMixture(weights, means, covs)


PAIRS = [(1.0, 1e-3), (0.9, 0.3), (0.6, 0.8), (0.05, 1.0), (1.0, 5.0), (0.3, 0.3)]


@pytest.mark.parametrize("alpha,sigma", PAIRS + [(0.0, 1.0), (1.0, 0.0)])
@pytest.mark.usefixtures("float64")  # compared with a reference to round-off
def test_single_gaussian_matches_closed_form(alpha, sigma):
    mix = random_mixture(K=1, D=4, seed=1)
    mu, cov = mix.means[0], mix.covs[0]
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(2))
    M = alpha**2 * cov + sigma**2 * torch.eye(4)
    sol = torch.linalg.solve(M, (x - alpha * mu).T).T
    eps, x0 = mix.posterior(x, alpha, sigma)
    torch.testing.assert_close(x0, mu + alpha * sol @ cov, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(eps, sigma * sol, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(mix.denoise(x, alpha, sigma), x0)


def marginal_log_prob(mix, x, alpha, sigma):
    """log p_t written independently of GaussianMixture's eigendecomposition: torch.distributions."""
    logs = []
    for k in range(mix.n_components):
        cov = alpha**2 * mix.covs[k] + sigma**2 * torch.eye(mix.dim)
        dist = torch.distributions.MultivariateNormal(alpha * mix.means[k], covariance_matrix=cov)
        logs.append(dist.log_prob(x) + math.log(float(mix.weights[k])))
    return torch.logsumexp(torch.stack(logs, dim=1), dim=1)


@pytest.mark.parametrize("alpha,sigma", PAIRS)
@pytest.mark.usefixtures("float64")  # compared with a reference to round-off
def test_denoiser_satisfies_score_identity(alpha, sigma):
    """Tweedie: x0_hat = (x + sigma^2 grad log p_t(x)) / alpha and eps_hat = -sigma grad log p_t(x)."""
    mix = random_mixture(K=3, D=3, seed=3)
    g = torch.Generator().manual_seed(4)
    x0 = mix.sample(64, g)
    x = (alpha * x0 + sigma * torch.randn(64, 3, generator=g)).requires_grad_(True)
    score = torch.autograd.grad(marginal_log_prob(mix, x, alpha, sigma).sum(), x)[0]
    x = x.detach()
    eps, x0_hat = mix.posterior(x, alpha, sigma)
    torch.testing.assert_close(x0_hat, (x + sigma**2 * score) / alpha, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(eps, -sigma * score, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(mix.log_prob(x, alpha, sigma), marginal_log_prob(mix, x, alpha, sigma))


def test_denoiser_matches_importance_sampling():
    """E[x0 | x_t] by self-normalised importance sampling with the prior as proposal."""
    mix = ring_mixture()
    alpha, sigma = 0.8, 0.6
    g = torch.Generator().manual_seed(5)
    prior = mix.sample(400_000, g)
    x = torch.tensor([[0.7, 0.4], [-1.2, 0.1], [0.0, -0.9]])
    logw = -0.5 * ((x[:, None, :] - alpha * prior[None]) ** 2).sum(-1) / sigma**2
    w = torch.softmax(logw, dim=1)
    est = w @ prior
    ess = 1.0 / (w**2).sum(dim=1)
    spread = torch.sqrt(w @ (prior**2) - est**2)
    exact = mix.denoise(x, alpha, sigma)
    assert bool((ess > 1000).all())
    assert bool(((est - exact).abs() < 5 * spread / ess.sqrt()[:, None] + 1e-3).all())


@pytest.mark.usefixtures("float64")  # compared with a reference to round-off
def test_limits_alpha_zero_and_sigma_zero():
    mix = random_mixture(K=4, D=3, seed=6)
    x = 3.0 * torch.randn(8, 3, generator=torch.Generator().manual_seed(7))
    eps, x0 = mix.posterior(x, 0.0, 2.0)
    torch.testing.assert_close(x0, mix.mean.expand(8, 3), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(eps, x / 2.0, rtol=1e-12, atol=1e-12)
    eps, x0 = mix.posterior(x, 0.7, 0.0)
    torch.testing.assert_close(x0, x / 0.7, rtol=1e-12, atol=1e-12)
    assert float(eps.abs().max()) == 0.0
    eps, x0 = mix.posterior(x, 0.7, 1e-9)
    torch.testing.assert_close(x0, x / 0.7, rtol=1e-7, atol=1e-7)
    # far from every component the responsibilities stay finite (log-sum-exp)
    eps, x0 = mix.posterior(1e4 * x, 0.5, 0.5)
    assert bool(torch.isfinite(x0).all() & torch.isfinite(eps).all())
    with pytest.raises(ValueError):
        mix.posterior(x, 0.0, 0.0)


def test_log_prob_matches_scipy():
    mix = random_mixture(K=3, D=3, seed=8)
    x = mix.sample(50, torch.Generator().manual_seed(9))
    pdf = sum(float(mix.weights[k]) * multivariate_normal(mix.means[k].numpy(), mix.covs[k].numpy()).pdf(x.numpy())
              for k in range(3))
    np.testing.assert_allclose(mix.log_prob(x).numpy(), np.log(pdf), rtol=1e-10)


@pytest.mark.usefixtures("float64")  # compared with a reference to round-off
def test_sampling_moments_and_determinism():
    mix = ring_mixture()
    x = mix.sample(200_000, torch.Generator().manual_seed(10))
    assert x.shape == (200_000, 2)
    torch.testing.assert_close(x.mean(0), mix.mean, rtol=0, atol=0.01)
    torch.testing.assert_close(torch.cov(x.T), mix.covariance, rtol=0, atol=0.02)
    # the same covariance by hand: 8 means on a circle of radius 1.5 (weight 0.8) spread r^2/2 per axis,
    # their radial/tangential variances average to (0.08^2 + 0.25^2)/2, plus the centre's diag(0.2^2, 0.1^2)
    by_hand = 0.8 * (1.5**2 / 2 + (0.08**2 + 0.25**2) / 2) * torch.eye(2) + 0.2 * torch.diag(torch.tensor([0.04, 0.01]))
    torch.testing.assert_close(mix.covariance, by_hand, rtol=1e-12, atol=1e-12)
    a = mix.sample(10, torch.Generator().manual_seed(11))
    b = mix.sample(10, torch.Generator().manual_seed(11))
    assert torch.equal(a, b)
    one = random_mixture(K=1, D=3, seed=12)
    y = one.sample(200_000, torch.Generator().manual_seed(13))
    torch.testing.assert_close(torch.cov(y.T), one.covs[0], rtol=0, atol=0.03)


def test_fit_recovers_parameters_and_is_deterministic():
    truth = GaussianMixture([0.3, 0.7], [[-3.0, 0.0], [3.0, 1.0]],
                            [[[0.5, 0.2], [0.2, 0.4]], [[0.3, 0.0], [0.0, 0.6]]])
    data = truth.sample(8000, torch.Generator().manual_seed(14))
    fit = GaussianMixture.fit(data, 2, reg_covar=1e-6, seed=0)
    order = torch.argsort(fit.means[:, 0])
    torch.testing.assert_close(fit.weights[order], truth.weights, rtol=0, atol=0.02)
    torch.testing.assert_close(fit.means[order], truth.means, rtol=0, atol=0.05)
    torch.testing.assert_close(fit.covs[order], truth.covs, rtol=0, atol=0.05)
    assert GaussianMixture.fit(data, 2, reg_covar=1e-6, seed=0).fingerprint() == fit.fingerprint()


def test_rejects_bad_parameters():
    with pytest.raises(ValueError, match="positive definite"):
        GaussianMixture([1.0], [[0.0, 0.0]], [[[1.0, 0.0], [0.0, -1.0]]])
    with pytest.raises(ValueError, match="shapes"):
        GaussianMixture([0.5, 0.5], [[0.0, 0.0]], [[[1.0, 0.0], [0.0, 1.0]]])
