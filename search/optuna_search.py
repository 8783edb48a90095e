"""Optuna-backed searchers: TPE over the full decision space, CMA-ES over the timesteps of a fixed
structure, and multi-objective TPE over (NFE, quality).

Timesteps are parameterized as logits ``z0..z{n-1}``: the softmax of the logits shares the lambda
span (less ``n * min_gap``) between the ``n`` steps, so times stay strictly decreasing with the
minimum gap for every parameter value. Each NFE has its own in-memory study (the NFE fixes the
step count per AFS choice); a study is re-fed with ``add_trial`` when a stored trial did not come from
this searcher's own asks.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import replace

import numpy as np
import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState

from steptune.space import Corrector, Schedule, Step
from steptune.space.relaxation import STEP_RELAXATIONS

from .baselines import DEFAULT_PRESETS, preset_candidates
from .pareto import pareto_front
from .searcher import FAIL_SCORE, Candidate, Searcher
from .space import steps_for

optuna.logging.set_verbosity(optuna.logging.WARNING)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

Z_RANGE = 3.0


def distribution(name: str):
    """The distribution of a parameter of the TPE parameterization, from its name."""
    if name == "afs":
        return CategoricalDistribution(("none", "zero"))
    if name == "nfe":
        raise KeyError(name)
    kind = name[0]
    if kind == "z":
        return FloatDistribution(-Z_RANGE, Z_RANGE)
    if kind == "o":
        return CategoricalDistribution((1, 2, 3, 4))
    if kind == "p":
        return CategoricalDistribution(("noise", "data"))
    if kind == "r":
        return CategoricalDistribution(STEP_RELAXATIONS)
    if kind == "c":
        return FloatDistribution(-0.3, 0.3)
    if kind in ("k", "f"):
        return CategoricalDistribution((0, 1))
    if kind == "d":
        return FloatDistribution(0.9, 1.1)
    raise KeyError(name)


def tpe_sampler(seed: int, n_startup: int = 10) -> optuna.samplers.TPESampler:
    """Multivariate TPE, grouped (the space is conditional), constant liar (batches of pending trials)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup, multivariate=True, group=True,
                                          constant_liar=True)


def _objective(score: float) -> float:
    return math.log(max(min(score, FAIL_SCORE), 1e-12))


class _OptunaBase(Searcher):
    """Shared bookkeeping: one study per key (an NFE, or 'all'), pending trials by candidate key."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.studies: dict = {}
        self._pending: dict[str, tuple[object, optuna.trial.Trial]] = {}

    def _study(self, key) -> optuna.Study:
        if key not in self.studies:
            self.studies[key] = self._new_study(key)
        return self.studies[key]

    def _new_study(self, key) -> optuna.Study:
        raise NotImplementedError

    def _values(self, cand: Candidate, score: float):
        return _objective(score)

    def _observe(self, candidate: Candidate, score: float) -> None:
        key = candidate.key
        if key in self._pending:
            skey, trial = self._pending.pop(key)
            self._study(skey).tell(trial, self._values(candidate, score))
            return
        self._add_foreign(candidate, score)

    def _add_foreign(self, candidate: Candidate, score: float) -> None:
        """A result this searcher did not ask for (another method or seed stored it): added if it has our parameters."""
        params = candidate.params
        if not params:
            return
        try:
            dists = {k: distribution(k) for k in params if k != "nfe"}
        except KeyError:
            return
        if "nfe" in params:
            dists["nfe"] = CategoricalDistribution(tuple(self.nfes))
        skey = self._study_key(candidate)
        trial = optuna.trial.create_trial(params=params, distributions=dists,
                                          values=_as_list(self._values(candidate, score)))
        self._study(skey).add_trial(trial)

    def _study_key(self, candidate: Candidate):
        return candidate.nfe


def _as_list(v):
    return list(v) if isinstance(v, (tuple, list)) else [v]


def build_from_trial(space, trial, nfe: int, structure: Schedule | None = None) -> Schedule | None:
    """The schedule a trial's parameters describe (suggesting them as it goes).

    Without ``structure``: the full decision space (AFS, per-step order, prediction, relaxation kind
    and coefficient, corrector, first-derivative points, compensation ratio, timesteps). With it:
    only the timesteps of ``structure`` are parameters (every other decision is kept)."""
    if structure is not None:
        n = len(structure.steps)
        z = np.array([trial.suggest_float(f"z{i}", -Z_RANGE, Z_RANGE) for i in range(n)])
        times = space.times_from_lams(space.increments_to_lams(np.exp(z - z.max())))
        if times is None:
            return None
        return space.finish(space.make(times, structure.steps, structure.afs, "cmaes"), nfe)
    afs = trial.suggest_categorical("afs", ["none", "zero"]) if nfe >= 2 else "none"
    n = steps_for(nfe, afs)
    z = np.array([trial.suggest_float(f"z{i}", -Z_RANGE, Z_RANGE) for i in range(n)])
    times = space.times_from_lams(space.increments_to_lams(np.exp(z - z.max())))
    if times is None:
        return None
    steps = []
    for i in range(n):
        order = trial.suggest_categorical(f"o{i}", [1, 2, 3, 4])
        pred = trial.suggest_categorical(f"p{i}", ["noise", "data"])
        relax = trial.suggest_categorical(f"r{i}", list(STEP_RELAXATIONS))
        coef = trial.suggest_float(f"c{i}", -0.3, 0.3) if relax == "linear" else 0.0
        corr = Corrector("pseudo") if i < n - 1 and trial.suggest_categorical(f"k{i}", [0, 1]) else None
        first = 1 if trial.suggest_categorical(f"f{i}", [0, 1]) else None
        dc = trial.suggest_float(f"d{i}", 0.9, 1.1) if i >= 2 else 1.0
        steps.append(Step(t=times[i + 1], prediction=pred, order=order, relaxation=relax, relaxation_coef=coef,
                          corrector=corr, first_points=first, dc_ratio=dc))
    return space.finish(space.make(times, steps, afs, "tpe"), nfe)


class TPESearcher(_OptunaBase):
    """TPE (multivariate, grouped for the conditional parameters, constant liar for batches: the candidates of a
    batch still in flight count as bad results, so one batch spreads out) over the full decision space, one study
    per NFE; ``n_startup`` random trials first. No more random ones are asked while those are in flight: a batch
    wider than the random start leaves the rest of its places at that NFE empty until their results are told,
    so a batch of 64 does not spend 64 evaluations on noise."""

    name = "tpe"

    OPTION_RULES = {"n_startup": (1, None)}

    def __init__(self, *args, n_startup: int = 10, **kw):
        super().__init__(*args, **kw)
        self.n_startup = n_startup

    def _sampler(self, rng: np.random.Generator):
        return tpe_sampler(int(rng.integers(2**31)), self.n_startup)

    def _starting(self, study: optuna.Study) -> bool:
        """The random start is all asked but not all told (the model takes over once it is)."""
        told = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
        return told < self.n_startup <= told + len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))

    def _new_study(self, key) -> optuna.Study:
        return optuna.create_study(direction="minimize")

    def _ask(self, n: int, rng: np.random.Generator) -> list[Candidate]:
        out = []
        for j in range(n):
            nfe = self.nfes[(len(self.trials) + j) % len(self.nfes)]
            study = self._study(nfe)
            if self._starting(study):
                continue
            for _ in range(20):
                study.sampler = self._sampler(rng)  # re-seeded per ask: the state is the trial list
                trial = study.ask()
                s = build_from_trial(self.space, trial, nfe)
                c = None if s is None else Candidate(s, nfe, "tpe", dict(trial.params))
                if c is None or c.key in self.seen or c.key in self._pending:
                    study.tell(trial, state=TrialState.PRUNED)
                    continue
                self._pending[c.key] = (nfe, trial)
                out.append(c)
                break
        return out


class CmaEsSearcher(_OptunaBase):
    """CMA-ES over the timestep logits of a fixed structure per NFE: the best preset at that NFE
    (every preset is evaluated first), started from that preset's own timesteps.

    A generation (``popsize``) is by default the larger of CMA-ES's own population (4 + 3 ln d for d timesteps) and
    the NFE's share of the batch asked when its search starts, so a wide batch is one generation whose every member
    updates the distribution (Optuna updates a generation from its first ``popsize`` results and drops the rest)."""

    name = "cmaes"

    OPTION_RULES = {"sigma0": (1e-6, None)}  # popsize: the class says why 2 at least

    def __init__(self, *args, sigma0: float = 0.5, presets=DEFAULT_PRESETS, popsize: int | None = None, **kw):
        super().__init__(*args, **kw)
        if popsize is not None and int(popsize) < 2:
            raise ValueError(f"popsize {popsize}: a CMA-ES generation needs at least 2 members")
        self.sigma0, self.fixed_popsize = sigma0, popsize
        self._seeds = preset_candidates(self.space, self.nfes, presets)
        self.structure: dict[int, Schedule] = {}
        self.popsize: dict[int, int] = {}
        self._share = 1  # the NFE's share of the batch being asked

    def _new_study(self, key) -> optuna.Study:
        s = self.structure[key]
        x0 = {f"z{i}": float(np.clip(v, -Z_RANGE, Z_RANGE)) for i, v in enumerate(self.space.lams_to_logits(s))}
        self.popsize[key] = int(self.fixed_popsize or max(4 + int(3 * math.log(max(len(x0), 1))), self._share))
        with warnings.catch_warnings():  # x0/sigma0 are deprecated in recent Optuna but still honoured
            warnings.simplefilter("ignore", FutureWarning)
            sampler = optuna.samplers.CmaEsSampler(x0=x0, sigma0=self.sigma0, seed=self.seed + 7 * key,
                                                   n_startup_trials=0, warn_independent_sampling=False,
                                                   popsize=self.popsize[key])
        study = optuna.create_study(direction="minimize", sampler=sampler)
        # the preset's own timesteps, with the score it got: the search space is known from the first ask, so the
        # whole first batch is sampled around them (not drawn at random while the first trial is in flight)
        study.add_trial(optuna.trial.create_trial(params=x0, distributions={k: distribution(k) for k in x0},
                                                  value=_objective(self.best(key)[0][1])))
        return study

    def _ask(self, n: int, rng: np.random.Generator) -> list[Candidate]:
        out = [c for c in self._seeds if c.key not in self.seen][:n]
        if len(out) >= n:
            return out
        self._share = -(-n // len(self.nfes))
        for nfe in self.nfes:
            if nfe not in self.structure:
                best = self.best(nfe)
                if not best:
                    continue
                self.structure[nfe] = replace(best[0][0].schedule, name="cmaes")
        nfes = [m for m in self.nfes if m in self.structure]
        j, idle = 0, 0  # idle: NFEs in a row that gave nothing new; a round of them ends the ask
        while len(out) < n and nfes and idle < len(nfes):
            nfe = nfes[(len(self.trials) + j) % len(nfes)]
            j += 1
            study = self._study(nfe)
            for _ in range(20):
                trial = study.ask()
                s = build_from_trial(self.space, trial, nfe, self.structure[nfe])
                c = None if s is None else Candidate(s, nfe, "cmaes", dict(trial.params))
                if c is None or c.key in self.seen or c.key in self._pending:
                    study.tell(trial, FAIL_SCORE if c is None else _objective(self._known(c)))
                    continue
                self._pending[c.key] = (nfe, trial)
                out.append(c)
                idle = 0
                break
            else:
                idle += 1
        return out

    def _known(self, c: Candidate) -> float:
        for cand, s in self.trials:
            if cand.key == c.key:
                return s
        return FAIL_SCORE

    def _observe(self, candidate: Candidate, score: float) -> None:
        if candidate.origin.startswith("preset:"):
            return
        super()._observe(candidate, score)


class MultiObjectiveSearcher(_OptunaBase):
    """Multi-objective TPE over (NFE, log score): the NFE is itself a parameter, chosen among the
    requested budgets; :meth:`pareto` returns the non-dominated trials."""

    name = "mo-tpe"

    def _new_study(self, key) -> optuna.Study:
        return optuna.create_study(directions=["minimize", "minimize"])

    def _study_key(self, candidate: Candidate):
        return "all"

    def _values(self, cand: Candidate, score: float):
        return (float(cand.nfe), _objective(score))

    def _ask(self, n: int, rng: np.random.Generator) -> list[Candidate]:
        out = []
        study = self._study("all")
        for _ in range(n):
            for _ in range(20):
                study.sampler = tpe_sampler(int(rng.integers(2**31)))
                trial = study.ask()
                nfe = trial.suggest_categorical("nfe", list(self.nfes))
                s = build_from_trial(self.space, trial, nfe)
                c = None if s is None else Candidate(s, nfe, "mo-tpe", dict(trial.params))
                if c is None or c.key in self.seen or c.key in self._pending:
                    study.tell(trial, state=TrialState.PRUNED)
                    continue
                self._pending[c.key] = ("all", trial)
                out.append(c)
                break
        return out

    def pareto(self) -> list[tuple[Candidate, float]]:
        """The told (candidate, score) pairs on the (NFE, score) Pareto front."""
        pts = [(c.nfe, s) for c, s in self.trials]
        return [self.trials[i] for i in pareto_front(pts)]
