"""Reference ODE solutions: the closed form for Gaussian data, an independent integrator for a
mixture (scipy in t, velocity alpha' x0_hat + sigma' eps_hat), determinism and the disk cache."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from scipy.integrate import solve_ivp

import steptune.evaluators.reference as reference
from steptune.evaluators import GaussianMixture, cached_reference, get_problem, mixture_problem, reference_solution


def gaussian():
    g = torch.Generator().manual_seed(21)
    A = torch.randn(3, 3, generator=g)
    cov = A @ A.T / 3 + 0.02 * torch.eye(3)
    mu = torch.tensor([0.5, -1.0, 2.0])
    return mu, cov


def closed_form(noise, mu, cov, x, t0, t1):
    """x_t - a_t mu = M_t M_s^-1 (x_s - a_s mu), M = (a^2 Sigma + s^2 I)^(1/2), via scipy's sqrtm."""
    def m(t):
        a, s = float(noise.alpha(t)), float(noise.sigma(t))
        return np.real(scipy.linalg.sqrtm(a * a * cov.numpy() + s * s * np.eye(3))), a
    m0, a0 = m(t0)
    m1, a1 = m(t1)
    lin = m1 @ np.linalg.inv(m0)
    return a1 * mu + torch.from_numpy((x - a0 * mu).numpy() @ lin.T)


CASES = [("vp-linear", None, None), ("edm", None, None), ("ddpm-linear", None, None), ("flow", None, None),
         ("flow", 1.0, None), ("vp-linear", None, 0.0), ("edm", None, 0.0), ("flow", 1.0, 0.0),
         ("vp-linear", 0.5, 0.2), ("vp-linear", 0.2, 0.05), ("vp-linear", 1.0, 0.6), ("cosine-discrete", None, None)]


@pytest.mark.parametrize("noise,t_start,t_end", CASES)
@pytest.mark.usefixtures("float64")  # compared with a reference to round-off
def test_reference_matches_gaussian_closed_form(noise, t_start, t_end):
    mu, cov = gaussian()
    problem = mixture_problem(GaussianMixture([1.0], mu[None], cov[None]), noise, t_start=t_start, t_end=t_end)
    x_T = problem.sample_prior(32, torch.Generator().manual_seed(22))
    ref = reference_solution(problem, x_T)
    exact = closed_form(problem.noise, mu, cov, x_T, problem.t_start, problem.t_end)
    torch.testing.assert_close(ref, exact, rtol=0, atol=1e-8)


def _velocity_solution(mix, x_T, t0, t1, alpha, dalpha, sigma, dsigma):
    """Integrate dx/dt = alpha'(t) x0_hat + sigma'(t) eps_hat sample by sample with scipy (t, not lambda)."""
    out = []
    for x in x_T:
        def f(t, y):
            eps, x0 = mix.posterior(torch.from_numpy(y)[None], alpha(t), sigma(t))
            return (dalpha(t) * x0 + dsigma(t) * eps)[0].numpy()
        sol = solve_ivp(f, (t0, t1), x.numpy(), method="DOP853", rtol=1e-12, atol=1e-12)
        assert sol.success
        out.append(sol.y[:, -1])
    return torch.from_numpy(np.stack(out))


def test_reference_matches_independent_integrator_flow_from_pure_noise():
    """Rectified flow from t = 1 (alpha = 0, lambda = -inf) on the 2-D ring mixture."""
    problem = get_problem("gmm-2d", "flow", t_start=1.0, t_end=0.01)
    x_T = problem.sample_prior(12, torch.Generator().manual_seed(23))
    ref = reference_solution(problem, x_T)
    other = _velocity_solution(problem.mixture, x_T, 1.0, 0.01, lambda t: 1 - t, lambda t: -1.0, lambda t: t,
                               lambda t: 1.0)
    torch.testing.assert_close(ref, other, rtol=0, atol=1e-7)


def test_reference_matches_independent_integrator_vp_linear():
    problem = get_problem("gmm-2d", "vp-linear")
    b0, b1 = problem.noise.beta_0, problem.noise.beta_1

    def alpha(t):
        return float(np.exp(-0.25 * t * t * (b1 - b0) - 0.5 * t * b0))

    def dalpha(t):
        return alpha(t) * (-0.5 * t * (b1 - b0) - 0.5 * b0)

    def sigma(t):
        return float(np.sqrt(1 - alpha(t) ** 2))

    def dsigma(t):
        return -alpha(t) * dalpha(t) / sigma(t)

    x_T = problem.sample_prior(12, torch.Generator().manual_seed(24))
    ref = reference_solution(problem, x_T)
    other = _velocity_solution(problem.mixture, x_T, problem.t_start, problem.t_end, alpha, dalpha, sigma, dsigma)
    torch.testing.assert_close(ref, other, rtol=0, atol=1e-7)


@pytest.mark.usefixtures("float64")  # compared with a reference to round-off
def test_dop853_controls_the_error_of_every_sample():
    """y' = k y, y(0) = 1, with very different k per sample: each sample must meet the tolerance."""
    k = torch.tensor([[-1.0], [0.5], [4.0], [-8.0]])
    y, stats = reference.dop853(lambda t, y: k * y, 0.0, 2.0, torch.ones(4, 1), rtol=1e-10, atol=1e-12)
    exact = torch.exp(2 * k)
    assert bool(((y - exact).abs() <= 1e-8 * exact + 1e-11).all())
    assert stats.steps > 5 and stats.evals == 1 + 12 * (stats.steps + stats.rejected)
    # one hard sample among many trivial ones is as accurate as alone (a norm over the whole batch would
    # let the trivial samples dilute its error)
    many = torch.zeros(1000, 1)
    many[0] = 4.0
    crowd, _ = reference.dop853(lambda t, y: many * y, 0.0, 2.0, torch.ones(1000, 1), rtol=1e-8, atol=1e-8)
    alone, _ = reference.dop853(lambda t, y: 4.0 * y, 0.0, 2.0, torch.ones(1, 1), rtol=1e-8, atol=1e-8)
    err_crowd, err_alone = abs(float(crowd[0, 0]) - math.exp(8)), abs(float(alone[0, 0]) - math.exp(8))
    assert err_crowd <= 2 * err_alone + 1e-12
    back, _ = reference.dop853(lambda t, y: k * y, 2.0, 0.0, y, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(back, torch.ones(4, 1), rtol=1e-8, atol=0)


def test_reference_is_deterministic_and_cached(tmp_path, monkeypatch):
    problem = get_problem("gmm-2d", "vp-linear")
    x_T = problem.sample_prior(16, torch.Generator().manual_seed(25))
    bank = {"name": "test", "seed": 25, "size": 16}
    first, loaded = cached_reference(problem, x_T, bank=bank, cache_dir=tmp_path)
    assert not loaded
    files = list((tmp_path / "reference").glob("*.pt"))
    assert len(files) == 1
    assert torch.equal(first, reference_solution(problem, x_T))  # recomputation is bit-identical

    def fail(*args, **kwargs):
        raise AssertionError("the cached reference should have been loaded, not recomputed")

    monkeypatch.setattr(reference, "solve_pf_ode", fail)
    again, loaded = cached_reference(problem, x_T, bank=bank, cache_dir=tmp_path)
    assert loaded and torch.equal(again, first)
    # a different key (tolerance, end time, noise bank, problem) is a different file
    with pytest.raises(AssertionError, match="cached reference"):
        cached_reference(problem, x_T, bank=bank, cache_dir=tmp_path, rtol=1e-9)
    with pytest.raises(AssertionError, match="cached reference"):
        cached_reference(problem, x_T, t_end=0.0, bank=bank, cache_dir=tmp_path)
    with pytest.raises(AssertionError, match="cached reference"):
        cached_reference(problem, x_T + 1e-12, bank=bank, cache_dir=tmp_path)
    with pytest.raises(AssertionError, match="cached reference"):
        cached_reference(get_problem("gmm-2d", "vp-cosine"), x_T, bank=bank, cache_dir=tmp_path)


def test_reference_rejects_wrong_direction():
    problem = get_problem("gmm-2d", "vp-linear")
    x_T = problem.sample_prior(4, torch.Generator().manual_seed(26))
    with pytest.raises(ValueError, match="less noisy"):
        reference_solution(problem, x_T, t_start=0.2, t_end=0.5)
