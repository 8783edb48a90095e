"""S^3: predictor-based multi-stage evolutionary search over schedules, for several NFEs at once.

* The population is seeded with every preset at every requested NFE, then (``afs_presets``) with every preset
  again with an analytical first step (built at NFE + 1, its first model call saved): on gmm-digits those are better
  than the presets themselves at most NFEs, and a search that does not start from them may never find that
  kind of schedule (an NFE-4 search did, the same NFE in a job over five did not, and ended 1.4x worse).
* Each stage, for every NFE, children are generated from the best schedules at that NFE (mutation,
  crossover), from the best schedules at lower NFEs (warm start: steps inserted) and at random, into a
  pool of ``pool`` children per NFE that lives across stages (each stage adds ``refresh`` x ``pool`` new
  ones, at most ``CHILDREN_PER_PICK`` per pick, and drops the oldest); the NFE's predictor ranks the pool and the
  top ``k`` are truly evaluated; the predictor is retrained as the trial set grows. The parents are the best
  schedule of each step structure (schedules that differ only in their times count once), so the
  population does not collapse onto copies of one schedule; a wide stage takes at most max(2, k/3) of one
  step structure.
* Alternating with that evolutionary stage, a local stage (a share ``local`` of each stage's
  evaluations) refines the timesteps of the best few structures per NFE with an evolution strategy
  over the softmax logits of the lambda increments: weighted recombination of the best trials of
  the structure and a rank-mu covariance, both recomputed from the told results, so the searcher
  stays a function of its seed and history. On gmm-digits this continuous refinement is what
  closes most of the gap to a timestep-only CMA-ES at the higher NFEs. In a wide stage (8 or more local
  samples at one NFE) ``screen`` times as many are drawn and the predictor keeps the best.
* A wide ask (more than ``WIDE`` picks at one NFE) chooses its picks as a batch (``s3_batch.pick``): the
  predictor's ranking with a penalty (``batch_penalty``) for each candidate already chosen, in this ask or
  in flight (asked, not told), close to it in encoded-feature space, so the batch is not spent on near copies.
* The predictor is one model per NFE, fitted on that NFE's trials (``shared``: one model for all NFEs,
  the NFE a feature), so a job over several NFEs ranks each as a search of that NFE alone does. Its
  target is the rank of a trial's score among the trials at the same NFE, so it learns orderings, not
  scales; features that are constant over the trials (padding) are left out. Kinds: ``extra-trees``
  and ``gbr`` (tree ensembles regressing the within-NFE rank, compiled in :mod:`.trees`) and ``pairwise``
  (logistic regression on feature differences of same-NFE pairs); ``auto`` picks the one of ``auto_kinds``
  with the best Kendall tau on a held-out split of the trials (at ``min_train`` trials per model, at three
  times that, then only after tenfold growth) and records the measurement in ``tau_report``.
* Each candidate is encoded once and predicted once per fit.
"""

from __future__ import annotations

import bisect
import math
import os
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from steptune.space.relaxation import STEP_RELAXATIONS
from steptune.space.schedule import Schedule

from .baselines import DEFAULT_PRESETS, preset_candidates
from .s3_batch import pick, tree_spread
from .searcher import Candidate, Searcher
from .trees import BoostedTrees, RandomizedTrees

PREDICTOR_KINDS = ("extra-trees", "gbr", "pairwise")
# the tree kinds' settings (scikit-learn's parameter names; extra-trees try every feature at each node)
TREE_SETTINGS = {"extra-trees": {"n_estimators": 20, "min_samples_leaf": 2},
                 "gbr": {"n_estimators": 80, "max_depth": 3, "subsample": 0.8, "learning_rate": 0.1}}
WIDE = 4  # picks per NFE in one ask above which they are chosen as a batch (s3_batch.pick), not as a ranking
N_STEP_FEATURES = 13
CHILDREN_PER_PICK = 5  # new pool children per pick an ask makes, once the pool is full (3 searched worse)
N_GLOBAL_FEATURES = 10


# ---- features -------------------------------------------------------------------------------------

def encode(s: Schedule, space, max_steps: int) -> np.ndarray:
    """A schedule's features: each step's relative lambda position, gap and decisions, padded to ``max_steps``, then
    global ones (NFE, AFS, step count, mean order, corrector and data-prediction shares, the gaps' min, max and
    standard deviation, the first position)."""
    return encode_many([s], space, max_steps)[0]


def encode_many(schedules: Sequence[Schedule], space, max_steps: int) -> np.ndarray:
    """:func:`encode` of each schedule, one row each, those of the same step count worked out together (an ask
    encodes its new children at once): each row the same numbers as the schedule's alone."""
    out = np.zeros((len(schedules), max_steps * N_STEP_FEATURES + N_GLOBAL_FEATURES))
    space.learn_lams([t for s in schedules for t in s.times])
    groups: dict[int, list[int]] = {}
    for i, s in enumerate(schedules):
        groups.setdefault(len(s.steps), []).append(i)
    head = max_steps * N_STEP_FEATURES
    for m, idx in groups.items():
        group = [schedules[i] for i in idx]
        pos = (np.array([space.lams(s) for s in group]) - space.lam0) / space.span
        gaps = pos[:, 1:] - pos[:, :-1]
        n = min(m, max_steps)
        rows = np.zeros((len(group), max_steps, N_STEP_FEATURES))
        rows[:, :n, 0] = pos[:, 1:n + 1]
        rows[:, :n, 1] = gaps[:, :n]
        rows[:, :n, 2:] = [[_step_code(st) for st in s.steps[:n]] for s in group]
        deviation = gaps - (np.add.reduce(gaps, axis=1) / m)[:, None]
        tail = np.array([(s.nfe, s.afs != "none", m, sum(st.order for st in s.steps) / m,
                          sum(st.corrector is not None for st in s.steps) / m,
                          sum(st.prediction == "data" for st in s.steps) / m) for s in group], dtype=float)
        out[idx, :head] = rows.reshape(len(group), head)
        out[idx, head:head + tail.shape[1]] = tail
        out[idx, head + tail.shape[1]:] = np.stack([
            np.minimum.reduce(gaps, axis=1), np.maximum.reduce(gaps, axis=1),
            np.sqrt(np.add.reduce(deviation * deviation, axis=1) / m), pos[:, 1]], axis=1)
    return out


_STEP_CODES: dict[str, tuple] = {}


def _step_code(st) -> tuple:
    """A step's decisions as numbers (every encoded feature but its position and gap), kept by the text of its
    decisions: children share most of theirs with their parents, whatever their times."""
    code = _STEP_CODES.get(st.decisions_text)
    if code is None:
        if len(_STEP_CODES) > 65536:
            _STEP_CODES.clear()
        code = _STEP_CODES[st.decisions_text] = _code(st)
    return code


def _code(st) -> tuple:
    c = st.corrector
    relax = STEP_RELAXATIONS.index(st.relaxation) / 6 if st.relaxation in STEP_RELAXATIONS else 1.0
    return (st.order / 4, st.prediction == "data", c is not None and c.kind == "pseudo",
            c is not None and c.kind == "implicit", relax, st.relaxation_coef, st.first_points is not None,
            st.start == -1, st.dc_ratio - 1, st.second_scale != 1.0, len(st.derivative_points()) / 4)


def rank_targets(nfes: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Rank of each score among those at the same NFE, scaled to [0, 1] (0 = best)."""
    y = np.zeros(len(scores))
    for n in np.unique(nfes):
        idx = np.flatnonzero(nfes == n)
        r = np.argsort(np.argsort(scores[idx], kind="stable"), kind="stable")
        y[idx] = r / max(len(idx) - 1, 1)
    return y


def kendall_by_nfe(nfes: np.ndarray, scores: np.ndarray, pred: np.ndarray) -> float:
    """Mean Kendall tau between predicted and true order within each NFE (weighted by group size)."""
    from scipy.stats import kendalltau

    taus, weights = [], []
    for n in np.unique(nfes):
        idx = np.flatnonzero(nfes == n)
        if len(idx) < 4:
            continue
        t = kendalltau(pred[idx], scores[idx]).statistic
        if np.isfinite(t):
            taus.append(t)
            weights.append(len(idx))
    return float(np.average(taus, weights=weights)) if taus else float("nan")


REFIT_GROWTH, REFIT_MIN = 0.3, 20
# with the search's budget known, a model is fitted again only while it has at least this many picks per trial it is
# fitted on left to rank: a search's last refit would otherwise cost a fifth of its fits for its last few picks
REFIT_WORTH = 0.1
# ``auto`` chooses the predictor kind when each model has min_train trials, again when they have grown
# SELECT_GROWTH[0]-fold, then only after each SELECT_GROWTH[1]-fold growth: the later choices, on the most trials,
# cost the most fits and decide the fewest picks
SELECT_GROWTH = (3, 10)


def refit_due(m: int, last: int | None, min_train: int) -> bool:
    """Whether a model last fitted on ``last`` trials (None: never fitted) is fitted again now that it has ``m``:
    first at ``min_train`` trials, then each time they have grown by ``REFIT_GROWTH`` (at least ``REFIT_MIN``)."""
    if m < min_train:
        return False
    return last is None or m >= max(last * (1 + REFIT_GROWTH), last + REFIT_MIN)


class Predictor:
    """A ranking model over encoded schedules: lower prediction = better expected score."""

    def __init__(self, kind: str = "extra-trees", seed: int = 0):
        if kind not in PREDICTOR_KINDS:
            raise ValueError(f"unknown predictor {kind!r}; use one of {', '.join(PREDICTOR_KINDS)}")
        self.kind, self.seed = kind, seed
        self.model = None

    def fit(self, X: np.ndarray, nfes: np.ndarray, scores: np.ndarray) -> Predictor:
        self.columns = np.flatnonzero(X.min(axis=0) < X.max(axis=0))  # constant features (padding) say nothing
        if not len(self.columns):
            self.columns = np.arange(X.shape[1])
        X = X[:, self.columns]
        y = rank_targets(nfes, np.log(scores))
        if self.kind == "extra-trees":
            self.model = RandomizedTrees(**TREE_SETTINGS["extra-trees"], random_state=self.seed).fit(X, y)
        elif self.kind == "gbr":
            self.model = BoostedTrees(**TREE_SETTINGS["gbr"], random_state=self.seed).fit(X, y)
        else:
            import sklearn

            # the inputs are finite by construction and the parameters fixed here: sklearn's checks are skipped
            with sklearn.config_context(skip_parameter_validation=True, assume_finite=True):
                self._fit_pairwise(X, nfes, np.log(scores))
        return self

    def _fit_pairwise(self, X, nfes, logs):
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        rng = np.random.default_rng(self.seed)
        self.scaler = StandardScaler().fit(X)
        Z = self.scaler.transform(X)
        diffs, labels = [], []
        for n in np.unique(nfes):
            idx = np.flatnonzero(nfes == n)
            if len(idx) < 2:
                continue
            m = min(10 * len(idx), 1500)
            a, b = rng.choice(idx, m), rng.choice(idx, m)
            keep = np.abs(logs[a] - logs[b]) > 1e-3
            a, b = a[keep], b[keep]
            diffs.append(Z[a] - Z[b])
            labels.append((logs[a] < logs[b]).astype(int))
        D, L = np.concatenate(diffs), np.concatenate(labels)
        D, L = np.concatenate([D, -D]), np.concatenate([L, 1 - L])  # symmetric: no intercept needed
        self.model = LogisticRegression(C=0.1, fit_intercept=False, max_iter=500).fit(D, L)

    def predict(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X)[:, self.columns]
        if self.kind == "pairwise":
            return -(self.scaler.transform(X) @ self.model.coef_[0])
        return self.model.predict(X)


def select_predictor(X, nfes, scores, seed: int = 0, kinds: Sequence[str] = PREDICTOR_KINDS,
                     test_frac: float = 0.3, per_nfe: bool = False) -> tuple[str, dict[str, float]]:
    """Fit each kind on a random (1 - test_frac) of the trials; Kendall tau on the rest; best kind wins.
    ``per_nfe``: one model per NFE (fitted on that NFE's trials), as the searcher uses them."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(scores))
    n_test = max(int(test_frac * len(scores)), 1)
    te, tr = perm[:n_test], perm[n_test:]
    groups = [(tr, te)]
    if per_nfe:
        groups = [(tr[nfes[tr] == n], te[nfes[te] == n]) for n in np.unique(nfes)]
        groups = [(a, b) for a, b in groups if len(a) >= 2 and len(b)]
    taus = {}
    for kind in kinds:
        idx = np.concatenate([b for _, b in groups]) if groups else te[:0]
        pred = np.concatenate([Predictor(kind, seed).fit(X[a], nfes[a], scores[a]).predict(X[b]) for a, b in groups]
                              ) if groups else np.zeros(0)
        taus[kind] = kendall_by_nfe(nfes[idx], scores[idx], pred)
    best = max(taus, key=lambda k: -math.inf if not np.isfinite(taus[k]) else taus[k])
    return best, taus


def fit_models(plan: dict) -> dict:
    """The fits an S^3 searcher found due (its ``_fit_plan``): the kind chosen first where ``auto`` chooses now,
    then each model whose trials :func:`refit_due` says, all of them when the kind changed. A pure function of the
    plan, so it may run in another thread while the searcher's batch is evaluated."""
    c0 = time.thread_time()
    X, nfes, scores = plan["X"], plan["nfes"], plan["scores"]
    kind, select = plan["kind"], None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if plan["select"]:
            select = select_predictor(X, nfes, scores, seed=plan["seed"], kinds=plan["kinds"],
                                      per_nfe=not plan["shared"])
        changed = select is not None and select[0] != kind
        kind = select[0] if select is not None else kind
        models = {}
        for g, (rows, last) in plan["groups"].items():
            if refit_due(len(rows), None if changed else last, plan["min_train"]):
                models[g] = (Predictor(kind or "extra-trees", plan["seed"]).fit(X[rows], nfes[rows], scores[rows]),
                             len(rows))
    return {"select": select, "changed": changed, "models": models, "trials": len(scores),
            "per_model": plan["per_model"], "cpu_seconds": time.thread_time() - c0}


_FIT_THREAD: ThreadPoolExecutor | None = None


def _fit_thread() -> ThreadPoolExecutor:
    """The one background thread S^3's fits run in (the compiled tree builders release the GIL)."""
    global _FIT_THREAD
    if _FIT_THREAD is None:
        _FIT_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="s3-fit")
    return _FIT_THREAD


def _settle_fits() -> None:  # before a fork: the fits under way end, so the child has their results
    if _FIT_THREAD is not None:
        _FIT_THREAD.submit(int).result()


def _forget_fit_thread() -> None:  # a forked process has no copy of the thread: it starts its own
    global _FIT_THREAD
    _FIT_THREAD = None


os.register_at_fork(before=_settle_fits, after_in_child=_forget_fit_thread)


# ---- the searcher ---------------------------------------------------------------------------------

class S3Searcher(Searcher):
    """S^3-style search. Options: ``predictor`` (``auto`` or a kind), ``pool`` (children kept per NFE, ranked
    by the predictor at every ask), ``refresh`` (share of the pool generated anew at every ask; the rest are
    the children not picked before; 1 regenerates it whole), ``population`` (parents kept per NFE),
    ``presets`` (seed specs), ``afs_presets`` (also seed each preset with an analytical first step),
    ``explore`` (share of each stage's picks taken at random from the pool, not by
    the predictor), ``min_train`` (trials before the predictor is used), ``local`` (share of each stage's
    evaluations given to the local timestep stage; 0 turns it off), ``local_structures`` (how many of the
    best structures per NFE it refines), ``niche`` (parents: the best of each step structure rather than the
    best trials), ``shared`` (one predictor for all NFEs, the NFE a feature, instead of one per NFE),
    ``auto_kinds`` (the predictor kinds ``auto`` chooses between), ``screen`` (in a wide batch, 8 or more
    local samples at one NFE, ``screen`` times as many are drawn and the predictor keeps the best),
    ``batch_penalty`` (in an ask of more than ``WIDE`` picks at one NFE, what a candidate loses, in predicted rank,
    for each already chosen or in-flight candidate close to it; 0 picks the ranking as it is), ``batch_explore``
    (in such an ask, how much of the extra-trees spread of a candidate's prediction is taken off it),
    ``fit_ahead`` (refit the predictors in a background thread while the asked batch is evaluated, used from the next
    ask on; an NFE's first model is fitted in the ask that finds it due either way, of the first of ``auto_kinds``
    when ``auto`` chooses then; False fits every model in the ask, choosing the kind first, and uses it at once)."""

    name = "s3"
    batch_per_nfe = 4
    OPTION_RULES = {"predictor": ["auto", *PREDICTOR_KINDS], "auto_kinds": list(PREDICTOR_KINDS), "pool": (1, None),
                    "population": (1, None), "explore": (0, 1), "min_train": (2, None), "local": (0, 1),
                    "local_structures": (1, None), "refresh": (0, 1), "screen": (1, None), "batch_penalty": (0, None),
                    "batch_explore": (0, None)}

    def __init__(self, *args, predictor: str = "auto", pool: int = 120, population: int = 12,
                 presets: Sequence[str] = DEFAULT_PRESETS, afs_presets: bool = True, explore: float = 0.15,
                 min_train: int = 30, local: float = 0.6, local_structures: int = 3, niche: bool = True,
                 refresh: float = 0.25, shared: bool = False, auto_kinds: Sequence[str] = ("extra-trees", "gbr"),
                 screen: int = 3, batch_penalty: float = 0.3, batch_explore: float = 0.0, fit_ahead: bool = True, **kw):
        super().__init__(*args, **kw)
        if predictor == "auto" and len(set(auto_kinds)) == 1:  # nothing to choose between
            predictor = auto_kinds[0]
        self.predictor_kind = predictor
        self.pool, self.population, self.explore, self.min_train = pool, population, explore, min_train
        self.local, self.local_structures, self.niche = float(local), int(local_structures), bool(niche)
        self.refresh, self.shared, self.screen = float(refresh), bool(shared), int(screen)
        self.auto_kinds = tuple(auto_kinds)
        for kind in self.auto_kinds:
            Predictor(kind)  # an unknown kind is refused here, not at the first fit
        self._struct: list[str] = []
        self._logits: list[np.ndarray | None] = []  # each trial's timestep logits, once the local stage asks
        self.preset_specs = tuple(presets)
        self.max_steps = max(self.nfes) + 2
        self.afs_presets = bool(afs_presets)
        self._seeds = preset_candidates(self.space, self.nfes, self.preset_specs, afs=self.afs_presets)
        self._X: list[np.ndarray | None] = []  # each trial's encoding (None until the next fit needs it)
        self._models: dict[int | None, Predictor] = {}  # by NFE; key None: the one shared model
        self._fit_size: dict[int | None, int] = {}
        self._pred: dict[int | None, dict[str, float]] = {}  # each model's predictions, by schedule key
        self._feat: dict[str, np.ndarray] = {}  # encodings of the pooled and asked candidates, by key
        self._pools: dict[int, list[Candidate]] = {}
        self._chosen: str | None = None if predictor == "auto" else predictor
        self._next_select = min_train
        self.tau_report: list[dict] = []
        self.batch_penalty, self.batch_explore = float(batch_penalty), float(batch_explore)
        if not (self.batch_penalty >= 0 and self.batch_explore >= 0):
            raise ValueError(f"batch_penalty {batch_penalty} and batch_explore {batch_explore}: give each as a number "
                             "0 or above (0 turns it off)")
        self._pending: dict[str, Candidate] = {}  # asked, not told yet: they count as picked in a wide ask
        self.fit_ahead = bool(fit_ahead)
        self._fitting: Future | dict | None = None  # fits started at the last ask (a dict once copied)
        self.fit_cpu_seconds = 0.0  # CPU time of the predictor fits, in whichever thread they ran
        self.background_fit_cpu_seconds = 0.0  # of which in the background thread (put in place so far)
        self._parents: dict[tuple, tuple] = {}  # (nfe, trials told) -> the best, and whether they are all
        self._by_nfe: dict[int, list[int]] = {}  # trial indices at each NFE
        self._ranked: dict[int, list[tuple[float, int]]] = {}  # (score, trial index) at each NFE, in order
        self._by_structure: dict[tuple[int, str], list[tuple[float, int]]] = {}  # ... of each step structure

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if isinstance(self._fitting, Future):  # a copy carries the fits' result, not the thread computing it
            state["_fitting"] = self._fitting.result()
        return state

    def ask(self, n: int = 1) -> list[Candidate]:
        out = super().ask(n)
        self._pending.update((c.key, c) for c in out)
        return out

    def _observe(self, candidate: Candidate, score: float) -> None:
        self._pending.pop(candidate.key, None)
        x = self._feat.pop(candidate.key, None)
        self._X.append(x)  # None: encoded with the others not encoded yet when the trials are next fitted on
        self._struct.append(candidate.schedule.structure_key())
        i = len(self.trials) - 1
        self._by_nfe.setdefault(candidate.nfe, []).append(i)
        bisect.insort(self._ranked.setdefault(candidate.nfe, []), (score, i))
        bisect.insort(self._by_structure.setdefault((candidate.nfe, self._struct[i]), []), (score, i))
        self._logits.append(None)

    def _trial_logits(self, i: int) -> np.ndarray:
        """Trial ``i``'s timestep logits (worked out when the local stage first needs them)."""
        z = self._logits[i]
        if z is None:
            z = self._logits[i] = self.space.lams_to_logits(self.trials[i][0].schedule)
        return z

    def _encode_all(self, cands: Sequence[Candidate]) -> np.ndarray:
        """Each candidate's :func:`encode` (kept by its key), those not encoded yet together."""
        todo = {c.key: c for c in cands if c.key not in self._feat}
        if todo:
            self._feat.update(zip(todo, encode_many([c.schedule for c in todo.values()], self.space, self.max_steps)))
        return np.array([self._feat[c.key] for c in cands])

    def parents(self, nfe: int, k: int) -> list[tuple[Candidate, float, int]]:
        """The ``k`` best trials at ``nfe`` (candidate, score, trial index); with ``niche``, the best of
        each step structure only (schedules that differ only in their times count once)."""
        memo = (nfe, len(self.trials))
        ranked = self._parents.get(memo)
        if ranked is None or (len(ranked[0]) < k and not ranked[1]):
            if len(self._parents) > 32:
                self._parents.clear()
            ranked = self._parents[memo] = self._rank_parents(nfe, max(k, self.population))
        return ranked[0][:k]

    def best(self, nfe: int, k: int = 1) -> list[tuple[Candidate, float]]:
        """As :meth:`Searcher.best`, from the NFE's trial index instead of every trial."""
        trials = self.trials
        return [trials[i] for _, i in self._ranked.get(nfe, ())[:k]]

    def _rank_parents(self, nfe: int, k: int) -> tuple[list[tuple[Candidate, float, int]], bool]:
        """The ``k`` best, and whether they are all there are."""
        out, keys = [], set()
        for _, i in self._ranked.get(nfe, ()):
            if self.niche:
                if self._struct[i] in keys:
                    continue
                keys.add(self._struct[i])
            out.append((self.trials[i][0], self.trials[i][1], i))
            if len(out) >= k:
                return out, False
        return out, True

    def _data(self):
        todo = [i for i, x in enumerate(self._X) if x is None]
        if todo:
            for i, x in zip(todo, encode_many([self.trials[i][0].schedule for i in todo], self.space, self.max_steps)):
                self._X[i] = x
        X = np.array(self._X)
        nfes = np.array([c.nfe for c, _ in self.trials])
        scores = np.array([max(s, 1e-12) for _, s in self.trials])
        return X, nfes, scores

    def _group(self, nfe: int) -> int | None:
        return None if self.shared else nfe

    def _refit(self, n: int) -> None:
        """Bring each NFE's model (or the shared one) up to date: first the fits started at the previous ask are
        put in place, then what :func:`refit_due` says is due on the trials told so far is fitted, and ``auto``
        chooses the kind when the trials per model reach ``min_train``, again when they have tripled, then after
        each tenfold growth (``SELECT_GROWTH``; so a job over several NFEs chooses when each NFE has as many trials
        as a search of one NFE alone does). With ``fit_ahead`` those fits run in a background thread while the
        asked batch is evaluated and are used from the next ask on (the models an ask uses are then those fitted on
        the trials told before the ask before it, a function of the history whatever the timing), except the fits
        that give an NFE its first model, which rank at once: of the first of ``auto_kinds`` where ``auto`` is to
        choose the kind then, the choice (a fit of each kind) following in the background."""
        if self._fitting is not None:
            fitted = self._fitting.result() if isinstance(self._fitting, Future) else self._fitting
            self.background_fit_cpu_seconds += fitted["cpu_seconds"]
            self._install(fitted)
            self._fitting = None
        plan = self._fit_plan(n)
        if plan is None:
            return
        first = any(last is None and refit_due(len(rows), None, self.min_train)  # nothing ranks that NFE before it
                    for rows, last in plan["groups"].values())
        if not self.fit_ahead or (first and not plan["select"]):
            self._install(fit_models(plan))
            return
        if first:  # the first models rank at once; choosing the kind, a fit of each on a split, waits an ask
            kind = self._chosen or self.auto_kinds[0]
            fitted = fit_models({**plan, "select": False, "kind": kind})
            self._install(fitted)
            # ... and fits them again only if it chooses another kind (the same fit would give the same models)
            made = {g: m for g, (_, m) in fitted["models"].items()}
            plan = {**plan, "kind": kind, "groups": {g: (rows, made.get(g, last))
                                                     for g, (rows, last) in plan["groups"].items()}}
        self._fitting = _fit_thread().submit(fit_models, plan)

    def _fit_plan(self, asking: int) -> dict | None:
        """What is due now, at an ask of ``asking``: the data, whether ``auto`` chooses the kind, and each model's
        trials (None: nothing). With the search's ``budget`` known, a model that has one is not fitted again, nor the
        kind chosen again, once fewer than ``REFIT_WORTH`` picks per trial are left for it to rank."""
        n = len(self.trials)
        if n < self.min_train:
            return None
        per_model = n if self.shared else n / len(self.nfes)
        worth = self._picks_left(asking) >= REFIT_WORTH * per_model
        select = self.predictor_kind == "auto" and per_model >= self._next_select and worth
        groups = {g: (np.arange(n) if g is None else np.array(self._by_nfe.get(g, ()), dtype=np.int64),
                      self._fit_size.get(g, 0) if g in self._models else None)
                  for g in ([None] if self.shared else self.nfes)}
        if not worth:  # the models there are kept; an NFE without one still gets its first
            groups = {g: (rows, last) for g, (rows, last) in groups.items() if last is None}
        if not select and not any(refit_due(len(rows), last, self.min_train) for rows, last in groups.values()):
            return None
        X, nfes, scores = self._data()
        return {"X": X, "nfes": nfes, "scores": scores, "select": select, "kind": self._chosen,
                "kinds": self.auto_kinds, "shared": self.shared, "seed": self.seed, "min_train": self.min_train,
                "groups": groups, "per_model": per_model}

    def _picks_left(self, asking: int) -> float:
        """The picks per model that a model fitted now would rank (inf without a ``budget``): from the next ask on
        with ``fit_ahead``, from this one without."""
        if self.budget is None:
            return math.inf
        left = self.budget - len(self.trials) - len(self._pending) - (asking if self.fit_ahead else 0)
        return left if self.shared else left / len(self.nfes)

    def _install(self, fitted: dict) -> None:
        self.fit_cpu_seconds += fitted["cpu_seconds"]
        if fitted["select"] is not None:
            best, taus = fitted["select"]
            if fitted["changed"]:  # another kind than the models were fitted as
                self._models.clear()
            self._chosen = best
            self.tau_report.append({"trials": fitted["trials"], "chosen": best, **taus})
            self._next_select = SELECT_GROWTH[min(len(self.tau_report), 2) - 1] * fitted["per_model"]
        for g, (model, m) in fitted["models"].items():
            self._models[g], self._fit_size[g], self._pred[g] = model, m, {}

    def _predict(self, nfe: int, cands: Sequence[Candidate]) -> np.ndarray | None:
        """The NFE's model's predictions for ``cands`` (None before it exists); each candidate is predicted
        once per fit."""
        g = self._group(nfe)
        model = self._models.get(g)
        if model is None:
            return None
        known = self._pred[g]
        new = [c for c in cands if c.key not in known]
        if new:
            known.update(zip((c.key for c in new), model.predict(self._encode_all(new))))
        return np.array([known[c.key] for c in cands])

    def _ask(self, n: int, rng: np.random.Generator) -> list[Candidate]:
        out: list[Candidate] = []
        for c in self._seeds:  # first every preset at every NFE
            if c.key not in self.seen and len(out) < n:
                out.append(c)
        if len(out) >= n:
            return out
        self._refit(n)
        remaining = n - len(out)
        start = self.n_asked % len(self.nfes)
        per = {nfe: remaining // len(self.nfes) for nfe in self.nfes}
        for j in range(remaining % len(self.nfes)):
            per[self.nfes[(start + j) % len(self.nfes)]] += 1
        taken = {c.key for c in out}
        for nfe in self.nfes:
            k = per[nfe]
            if k == 0:
                continue
            n_local = int(rng.binomial(k, self.local)) if self.local > 0 else 0
            for c in self._local_children(nfe, n_local, rng, taken):
                out.append(c)
                taken.add(c.key)
                k -= 1
            if k == 0:
                continue
            pool = self._refill(nfe, k, rng, taken)
            if not pool:
                continue
            pred = self._predict(nfe, pool)
            n_explore = int(rng.binomial(k, self.explore)) if pred is not None else k
            order = list(np.argsort(pred, kind="stable")) if pred is not None else list(rng.permutation(len(pool)))
            if pred is not None and k > WIDE:
                order = self._wide_pick(nfe, pool, pred, len(pool), out)
            picks = _spread(order, lambda i, pool=pool: pool[i].schedule.structure_key(), k - n_explore)
            rest = [i for i in range(len(pool)) if i not in set(picks)]
            if n_explore and rest:
                picks += list(rng.choice(rest, min(n_explore, len(rest)), replace=False))
            for i in picks:
                out.append(pool[int(i)])
                taken.add(pool[int(i)].key)
        return out

    def _wide_pick(self, nfe: int, cands: Sequence[Candidate], pred: np.ndarray, k: int,
                   chosen: Sequence[Candidate]) -> list[int]:
        """``k`` of ``cands`` chosen as one batch (:func:`s3_batch.pick`): near copies of one another, of ``chosen``
        or of candidates pending at ``nfe`` are penalised by ``batch_penalty``; ``batch_explore`` x the extra-trees
        spread is taken off the predictions."""
        before = [c for c in [*chosen, *self._pending.values()] if c.nfe == nfe]
        X = self._encode_all(cands)
        P = self._encode_all(before) if before else None
        model = self._models[self._group(nfe)]
        spread = tree_spread(model, X) if self.batch_explore else None
        return pick(pred, k, X, P, spread, penalty=self.batch_penalty, explore=self.batch_explore)

    def _refill(self, nfe: int, k: int, rng: np.random.Generator, taken: set[str]) -> list[Candidate]:
        """The NFE's pool for an ask of ``k`` picks: the children not asked yet, topped up with new ones (as many
        as it lacks, else ``refresh`` x ``pool`` but at most ``CHILDREN_PER_PICK`` per pick), the oldest dropped
        beyond ``pool``. Before the NFE has a model the picks are random, so only as many children as picks are made."""
        keep = [] if self.refresh >= 1 else [c for c in self._pools.get(nfe, [])
                                             if c.key not in self.seen and c.key not in taken]
        if self._models.get(self._group(nfe)) is None:  # nothing ranks a pool yet: the picks are random
            fresh = max(k - len(keep), 0)
        else:
            fresh = max(self.pool - len(keep), min(math.ceil(self.refresh * self.pool), CHILDREN_PER_PICK * k))
        pool = keep + self._children(nfe, rng, taken | {c.key for c in keep}, fresh)
        for c in pool[:-self.pool]:
            self._feat.pop(c.key, None)
        self._pools[nfe] = pool = pool[-self.pool:]
        return pool

    def _local_distribution(self, nfe: int, best: int) -> tuple[np.ndarray, np.ndarray]:
        """Mean and covariance of the local search distribution for the structure of trial ``best``."""
        same = self._by_structure[nfe, self._struct[best]]  # (score, trial index), best first
        mu = min(max(len(same) // 3, 1), 8)
        Z = np.array([self._trial_logits(i) for _, i in same[:mu]])  # only the best mu are recombined
        Z = np.maximum(Z, Z.max(axis=1, keepdims=True) - 8.0)  # a vanishing increment stays reachable
        Z -= Z.mean(axis=1, keepdims=True)
        n = Z.shape[1]
        w = np.log(mu + 0.5) - np.log(np.arange(1, mu + 1))
        w /= w.sum()
        mean = w @ Z
        if mu < 3:  # too few trials of this structure for a covariance: an isotropic start
            return mean, np.eye(n) * 0.25 ** 2
        D = Z - mean
        C = (D.T * w) @ D * 2.0 + np.eye(n) * 0.03 ** 2
        if len(same) < 12:  # keep the first generations from collapsing
            C += np.eye(n) * max(0.0, 0.1 ** 2 - np.trace(C) / n)
        return mean, C

    def _local_children(self, nfe: int, k: int, rng: np.random.Generator, taken: set[str]) -> list[Candidate]:
        """The local stage: ``k`` samples of an evolution strategy over the timestep logits of one of the
        best step structures at ``nfe``. Its mean and covariance come from the best trials of that
        structure (weighted recombination, rank-mu covariance widened by a floor), so the stage is a
        function of the told results alone."""
        if k <= 0:
            return []
        tops = self.parents(nfe, self.local_structures) if self.niche else self.parents(nfe, 1)
        if not tops:
            return []
        out: list[Candidate] = []
        dists: dict[int, tuple] = {}
        tries = 0
        wide = k >= 8 and self.screen > 1 and self._models.get(self._group(nfe)) is not None
        m = k * self.screen if wide else k
        while len(out) < m and tries < 20 * m:
            tries += 1
            j = 0 if len(tops) == 1 or rng.random() < 0.6 else int(rng.integers(1, len(tops)))
            if j not in dists:
                mean, C = self._local_distribution(nfe, tops[j][2])
                dists[j] = mean, np.linalg.cholesky(C).T
            base, mean, root = tops[j][0], *dists[j]
            z = mean + rng.standard_normal(len(mean)) @ root  # rng.multivariate_normal(mean, C, method="cholesky")
            s = self.space.with_logits(base.schedule, z)
            if s is None:
                continue
            c = Candidate(s, nfe, "local")
            if c.key in self.seen or c.key in taken:
                continue
            taken.add(c.key)
            out.append(c)
        if len(out) > k:  # a wide batch: the predictor keeps the k most promising samples
            keep = set(self._wide_pick(nfe, out, self._predict(nfe, out), k, []))
            taken.difference_update(c.key for i, c in enumerate(out) if i not in keep)
            out = [c for i, c in enumerate(out) if i in keep]
        return out

    def _children(self, nfe: int, rng: np.random.Generator, taken: set[str], n: int) -> list[Candidate]:
        """``n`` new children at ``nfe`` (fewer when the operators keep failing or repeating)."""
        parents = [c for c, _, _ in self.parents(nfe, self.population)]
        lower = [m for m in self.nfes if m < nfe]
        donors = [c for m in lower[-1:] for c, _ in self.best(m, 4)]
        pool: list[Candidate] = []
        keys = set()
        tries = 0
        while len(pool) < n and tries < 4 * n:
            tries += 1
            u = rng.random()
            s, origin = None, ""
            if parents and u < 0.2:  # timestep refinement of the very best (a local search in lambda)
                p = parents[int(rng.integers(min(3, len(parents))))]
                s, origin = self.space.mutate_times(p.schedule, rng), "times"
            elif parents and u < 0.6:
                p = parents[min(int(rng.integers(len(parents))), int(rng.integers(len(parents))))]  # tournament
                s, origin = self.space.mutate(p.schedule, rng), "mutation"
            elif len(parents) >= 2 and u < 0.85:
                i, j = rng.choice(len(parents), 2, replace=False)
                s = self.space.crossover(parents[i].schedule, parents[j].schedule, rng)
                if s is not None and rng.random() < 0.5:
                    s = self.space.mutate(s, rng, n_ops=1) or s
                origin = "crossover"
            elif donors and u < 0.95:
                d = donors[int(rng.integers(len(donors)))]
                s, origin = self.space.grow(d.schedule, nfe, rng), "warm-start"
            else:
                s, origin = self.space.random(nfe, rng), "random"
            if s is None:
                continue
            c = Candidate(s, nfe, origin)
            if c.key in self.seen or c.key in taken or c.key in keys:
                continue
            keys.add(c.key)
            pool.append(c)
        return pool

    def state(self) -> dict:
        return {**super().state(), "predictor": self._chosen, "tau_report": self.tau_report}


def _spread(order: Sequence[int], structure, k: int) -> list[int]:
    """The first ``k`` of ``order`` with at most max(2, k/3) of one step structure (``structure(i)``), so a wide
    batch does not spend itself on timestep variants of one schedule (filled from the rest of ``order`` if it
    must)."""
    cap = max(2, -(-k // 3))
    if k <= cap:
        return list(order[:k])
    picks, count = [], {}
    for i in order:
        if len(picks) >= k:
            break
        sk = structure(i)
        if count.get(sk, 0) < cap:
            picks.append(i)
            count[sk] = count.get(sk, 0) + 1
    if len(picks) < k:
        chosen = set(picks)
        picks += [i for i in order if i not in chosen][:k - len(picks)]
    return picks
