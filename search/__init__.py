"""steptune.search: which schedule to try next (ask/tell searchers, driven by the runner), DC-Solver fits,
and the SOR ω learners."""

from .baselines import DEFAULT_PRESETS, preset_candidates
from .fidelities import CHEAP, CONFIRM
from .options import check_options
from .pareto import pareto_front
from .random_search import RandomSearcher
from .s3 import Predictor, S3Searcher, encode, kendall_by_nfe, select_predictor
from .searcher import FAIL_SCORE, Candidate, Searcher
from .space import DecisionSpace

METHODS = ("s3", "tpe", "cmaes", "random", "mo-tpe")


def searcher_class(method: str) -> type[Searcher]:
    """The class of a search method by name: s3, tpe, cmaes, random or mo-tpe."""
    if method == "s3":
        return S3Searcher
    if method == "random":
        return RandomSearcher
    if method in ("tpe", "cmaes", "mo-tpe"):
        from .optuna_search import CmaEsSearcher, MultiObjectiveSearcher, TPESearcher

        return {"tpe": TPESearcher, "cmaes": CmaEsSearcher, "mo-tpe": MultiObjectiveSearcher}[method]
    raise ValueError(f"unknown search method {method!r}; use one of {', '.join(METHODS)}")


def make_searcher(method: str, noise, t_start: float, t_end: float, nfes, seed: int = 0, **opts) -> Searcher:
    """A searcher by name (see :func:`searcher_class`); its options are checked first (:func:`check_options`)."""
    cls = searcher_class(method)
    check_options(cls, opts, method)
    return cls(noise, t_start, t_end, nfes, seed=seed, **opts)


__all__ = ["CHEAP", "CONFIRM", "DEFAULT_PRESETS", "FAIL_SCORE", "METHODS", "Candidate", "DecisionSpace", "Predictor",
           "RandomSearcher", "S3Searcher", "Searcher", "check_options", "encode", "kendall_by_nfe", "make_searcher",
           "pareto_front", "preset_candidates", "searcher_class", "select_predictor"]
