"""Gaussian data N(mu, diag(var)): the exact denoiser and the exact probability-flow ODE solution."""

import torch

from steptune.space import Model


def eps_fn(noise, mu, var):
    """An eps-prediction model that takes continuous t."""
    def fn(x, t):
        t0 = float(t[0])
        a, s = float(noise.alpha(t0)), float(noise.sigma(t0))
        return s * (x - a * mu) / (a * a * var + s * s)
    return fn


def eps_tensor_fn(noise, mu, var):
    """The same predictor, differentiable in its time input (a tensor)."""
    def fn(x, t):
        a, s = noise.alpha(t[0]), noise.sigma(t[0])
        return s * (x - a * mu) / (a * a * var + s * s)
    return fn


def gaussian_model(noise, mu, var):
    return Model(eps_fn(noise, mu, var), noise, prediction="eps", time_input="continuous")


def exact_solution(noise, mu, var, x_T, t_start, t_end):
    """The PF-ODE maps x_s to x_t: x_t - alpha_t mu = sqrt(alpha_t^2 var + sigma_t^2) / sqrt(alpha_s^2 var + sigma_s^2)
    * (x_s - alpha_s mu)."""
    a_s, s_s = float(noise.alpha(t_start)), float(noise.sigma(t_start))
    a_t, s_t = float(noise.alpha(t_end)), float(noise.sigma(t_end))
    ratio = torch.sqrt(a_t**2 * var + s_t**2) / torch.sqrt(a_s**2 * var + s_s**2)
    return a_t * mu + ratio * (x_T - a_s * mu)
