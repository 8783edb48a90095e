"""steptune.evaluators: what a schedule is worth on a problem."""

from .base import BANKS, Bank, EvalResult, Evaluator
from .gmm import GaussianMixture
from .metrics import median_error, nll, rmse, sliced_wasserstein
from .plugins import NeuralProblem, Plug, PluginError, evaluator_options, load_problem
from .problems import (
    PROBLEMS,
    MixtureDenoiser,
    Problem,
    default_conventions,
    default_t_start,
    digits_mixture,
    get_problem,
    mixture_problem,
    problem_names,
    ring_mixture,
)
from .reference import REFERENCE_VERSION, cached_reference, reference_solution, solve_pf_ode

__all__ = ["BANKS", "PROBLEMS", "REFERENCE_VERSION", "Bank", "EvalResult", "Evaluator", "GaussianMixture",
           "MixtureDenoiser", "Problem", "cached_reference", "default_conventions", "default_t_start",
           "digits_mixture", "evaluator_options", "get_problem", "load_problem", "NeuralProblem", "Plug",
           "PluginError", "median_error", "mixture_problem", "nll", "problem_names",
           "reference_solution", "ring_mixture", "rmse", "sliced_wasserstein", "solve_pf_ode"]
