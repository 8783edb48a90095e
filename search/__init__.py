"""steptune.search: which schedule to try next (ask/tell searchers, multi-fidelity driver)."""

from .base import (
    Candidate,
    NfeResult,
    Searcher,
    SearchResult,
    TrialLog,
    TrialRecord,
    pareto_front,
    run_search,
)
from .random_search import RandomSearcher
from .s3 import Predictor, S3Searcher, encode, kendall_by_nfe, select_predictor
from .space import DecisionSpace, schedule_key

METHODS = ("s3", "tpe", "cmaes", "random", "mo-tpe")


def make_searcher(method: str, noise, t_start: float, t_end: float, nfes, seed: int = 0, **opts) -> Searcher:
    """A searcher by name: s3, tpe, cmaes, random or mo-tpe (multi-objective TPE over NFE and quality)."""
    if method == "s3":
        return S3Searcher(noise, t_start, t_end, nfes, seed=seed, **opts)
    if method == "random":
        return RandomSearcher(noise, t_start, t_end, nfes, seed=seed, **opts)
    if method in ("tpe", "cmaes", "mo-tpe"):
        from .optuna_search import CmaEsSearcher, MultiObjectiveSearcher, TPESearcher

        cls = {"tpe": TPESearcher, "cmaes": CmaEsSearcher, "mo-tpe": MultiObjectiveSearcher}[method]
        return cls(noise, t_start, t_end, nfes, seed=seed, **opts)
    raise ValueError(f"unknown search method {method!r}; use one of {', '.join(METHODS)}")


__all__ = ["METHODS", "Candidate", "DecisionSpace", "NfeResult", "Predictor", "RandomSearcher", "S3Searcher",
           "SearchResult", "Searcher", "TrialLog", "TrialRecord", "encode", "kendall_by_nfe", "make_searcher",
           "pareto_front", "run_search", "schedule_key", "select_predictor"]
