"""steptune.search: which schedule to try next (ask/tell searchers, driven by the runner), DC-Solver fits,
and the SOR ω learners."""

from .baselines import DEFAULT_PRESETS, preset_candidates
from .fidelities import CHEAP, CONFIRM
from .pareto import pareto_front
from .random_search import RandomSearcher
from .s3 import Predictor, S3Searcher, encode, kendall_by_nfe, select_predictor
from .searcher import FAIL_SCORE, Candidate, Searcher
from .space import DecisionSpace

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


__all__ = ["CHEAP", "CONFIRM", "DEFAULT_PRESETS", "FAIL_SCORE", "METHODS", "Candidate", "DecisionSpace", "Predictor",
           "RandomSearcher", "S3Searcher", "Searcher", "encode", "kendall_by_nfe", "make_searcher", "pareto_front",
           "preset_candidates", "select_predictor"]
