"""steptune.evaluators: what a schedule is worth on a problem."""

from .evaluator import BANKS, Bank, EvalResult, Evaluator, evaluator_options
from .gmm import GaussianMixture
from .load import load_problem
from .metrics import median_error, nll, rmse, sliced_wasserstein
from .plugins import Plug, PluginError
from .problems import (
    PROBLEMS,
    MixtureDenoiser,
    NeuralProblem,
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
