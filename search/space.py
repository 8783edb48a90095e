"""The decision space searchers move in: random schedules, mutations and crossovers at exact NFE.

Timesteps are handled in lambda = log(alpha/sigma): the first time is the problem's ``t_start``,
the last is its ``t_end`` (so every candidate is scored against the reference the problem defines), and
the interior lambdas are kept increasing with at least ``min_gap`` between neighbours. On a discrete VP
schedule (a network that takes training timesteps, as diffusers runs them) a schedule may also

* start later than ``t_start`` (down to ``min_start``; diffusers' ``leading`` timesteps do): the bank's noise
  is fed unchanged to the first time and the result is still scored against the reference from ``t_start``;
* end at t = 0 (a final order-1 step to sigma = 0 that predicts x0 directly, diffusers'
  ``final_sigmas_type="zero"``): the time before it is anywhere at or above ``t_end``. On the lambda axis the
  space places t = 0 at ``lam1 + min_gap`` (``lams``), so the last interval is at least ``min_gap`` like every
  other and every gap, logit and feature stays finite.

Every operator ends in :meth:`DecisionSpace.repair` (clips per-step decisions to what the history
allows) and :meth:`DecisionSpace.finish` (validates and checks the NFE); an operator that cannot
produce a valid candidate returns ``None`` and the caller tries another one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from steptune.space import Corrector, Schedule, ScheduleError, Step
from steptune.space.noise import NoiseSchedule, VPDiscrete
from steptune.space.relaxation import STEP_RELAXATIONS
from steptune.space.schedule import MAX_ORDER, evolve

from . import draws

PREDICTIONS = ("noise", "data")
ORDER_P = {1: 0.2, 2: 0.4, 3: 0.3, 4: 0.1}
# how often random steps take each relaxation kind a predictor step may use
RELAX_P = {"none": 0.35, "dpmsolver-2": 0.15, "unipc-bh2": 0.15, "unipc-bh1": 0.1, "0.5exp": 0.05, "-0.5exp": 0.05,
           "linear": 0.15}
_RELAX_CDF = draws.cdf([RELAX_P[k] for k in STEP_RELAXATIONS])


LATE_P = 0.5  # how often a random schedule starts late, where the space allows it
ZERO_P = 0.25  # how often a random schedule ends at t = 0, where the space allows it
KEPT_LAMS = 200_000  # the lambdas of times a space keeps; it forgets them all beyond that


def steps_for(nfe: int, afs: str = "none", implicit: int = 0) -> int:
    """Number of steps a schedule with this NFE, AFS choice and implicit-corrector count has."""
    return nfe - (afs == "none") + 1 - implicit


class DecisionSpace:
    """Sampling and variation operators over schedules on one noise schedule and time interval.

    ``afs_kinds`` are the analytical-first-step choices allowed (``("none", "zero")`` by default);
    ``max_order`` caps the Taylor order; ``min_gap`` is the smallest lambda distance between
    consecutive times. ``min_start``: the latest start allowed (a time at most ``t_start``; ``t_start``
    itself allows none); by default ``t_start / 2`` on a discrete VP schedule (every diffusers ``leading``
    start from NFE 2 on), ``t_start`` elsewhere. ``zero_end``: whether a schedule may end at t = 0 as well
    as at ``t_end``; by default on a discrete VP schedule only.
    """

    def __init__(self, noise: NoiseSchedule, t_start: float, t_end: float, min_gap: float = 0.05,
                 afs_kinds: Sequence[str] = ("none", "zero"), max_order: int = MAX_ORDER,
                 relax_coef_sigma: float = 0.05, dc_sigma: float = 0.03, min_start: float | None = None,
                 zero_end: bool | None = None):
        self.noise = noise
        self.noise_dict = noise.to_dict()
        self.t_start, self.t_end = float(t_start), float(t_end)
        self._lam_cache: dict[float, float] = {}
        self._repairs: dict[tuple, Step | None] = {}  # what repair makes of a step's decisions at a place
        self._schedule_repairs: dict[tuple, tuple | None] = {}  # ... of a sequence of steps' decisions
        self.lam0, self.lam1 = self.lam(self.t_start), self.lam(self.t_end)
        self.min_gap = float(min_gap)
        discrete = isinstance(noise, VPDiscrete)
        if min_start is None:  # half the bank's start, where that is still above the end
            min_start = self.t_start / 2 if discrete and self.t_start / 2 > self.t_end else self.t_start
        self.min_start = float(min_start)
        if not self.t_end < self.min_start <= self.t_start:
            raise ScheduleError(f"min_start = {self.min_start:g} is outside ({self.t_end:g}, {self.t_start:g}]; give "
                                "a time after the problem's t_end, at most its t_start")
        self.lam_late = self.lam(self.min_start)  # the largest lambda a start may have
        self.zero_end = bool(discrete if zero_end is None else zero_end)
        self.afs_kinds = tuple(afs_kinds)
        self.max_order = int(max_order)
        self._order_cdf: tuple[list[int], list[float]] | None = None  # the orders sample_order draws, and their cdf
        self.relax_coef_sigma = relax_coef_sigma
        self.dc_sigma = dc_sigma

    # ---- time axis ------------------------------------------------------------------------------

    @property
    def span(self) -> float:
        return self.lam1 - self.lam0

    @property
    def late_start(self) -> bool:
        """Whether a schedule may start later than ``t_start``."""
        return self.min_start < self.t_start

    @property
    def lam_zero(self) -> float:
        """Where the space places t = 0 (sigma = 0, lambda = inf) on its lambda axis."""
        return self.lam1 + self.min_gap

    def frame(self, s: Schedule) -> tuple[float, bool]:
        """A schedule's start time and whether it ends at t = 0."""
        return s.t_start, s.steps[-1].t == 0.0

    @property
    def max_nfe(self) -> int:
        """The largest NFE whose schedules (one step per model call) fit the span at ``min_gap``."""
        return max(0, math.ceil(self.span / self.min_gap) - 1)

    def lam(self, t: float) -> float:
        v = self._lam_cache.get(t)
        if v is None:
            if len(self._lam_cache) > KEPT_LAMS:
                self._lam_cache.clear()
            v = self._lam_cache[t] = float(self.noise.lam_array(np.array([t]))[0])
        return v

    def learn_lams(self, times: Sequence[float]) -> None:
        """Work out (and keep) the lambda of each of ``times`` not known yet, in one conversion: all of them are
        known afterwards (the cache is cleared, when full, before what is missing is worked out)."""
        if len(self._lam_cache) > KEPT_LAMS:
            self._lam_cache.clear()
        missing = [t for t in dict.fromkeys(times) if t not in self._lam_cache]
        if missing:
            self._lam_cache.update(zip(missing, self.noise.lam_array(np.array(missing)).tolist()))

    def lams(self, s: Schedule) -> np.ndarray:
        """The lambda of each of the schedule's times, a final t = 0 at :attr:`lam_zero` (finite)."""
        return self._lams(s).copy()

    def _kept(self, s: Schedule, name: str, work_out: Callable[[Schedule], np.ndarray]) -> np.ndarray:
        """``work_out(s)``, read-only, kept on the schedule as ``name`` for this space (parents are varied many times
        over; :func:`evolve` drops it when it re-times a schedule, a copy or pickle leaves it behind)."""
        kept = s.__dict__.get(name)
        if kept is not None and kept[0] is self:
            return kept[1]
        out = work_out(s)
        out.flags.writeable = False
        s.__dict__[name] = (self, out)
        return out

    def _lams(self, s: Schedule) -> np.ndarray:
        """:meth:`lams`, read-only and kept on the schedule."""
        return self._kept(s, "_lams", self._work_out_lams)

    def _work_out_lams(self, s: Schedule) -> np.ndarray:
        times = s.times
        self.learn_lams(times)
        out = np.array([self._lam_cache[t] for t in times])
        if times[-1] == 0.0:
            out[-1] = self.lam_zero
        return out

    def t_of(self, lam: float) -> float:
        return self.ts_of([lam])[0]

    def ts_of(self, lams: Sequence[float]) -> list[float]:
        """The times of several lambdas (each as it would be alone: the conversion is element by element)."""
        return self.noise.t_of_lambda_array(np.asarray(lams, dtype=np.float64)).tolist()

    def _ends(self, t_start: float | None, zero: bool) -> tuple[float, float, float]:
        """(start time, its lambda, the lambda of the end) of a frame; ``t_start`` None is the problem's."""
        t0 = self.t_start if t_start is None else float(t_start)
        return t0, self.lam0 if t0 == self.t_start else self.lam(t0), self.lam_zero if zero else self.lam1

    def times_from_lams(self, lams: Sequence[float], t_start: float | None = None,
                        zero: bool = False) -> list[float] | None:
        """Interior lambdas -> times, between the start (the problem's unless given) and ``t_end`` (or t = 0 with
        ``zero``); None when the gap rule is broken."""
        t0, a, b = self._ends(t_start, zero)
        lams = lams.tolist() if isinstance(lams, np.ndarray) else list(lams)  # floats: cheaper to compare one by one
        full = [a, *lams, b]
        if any(q - p < self.min_gap * 0.999 for p, q in zip(full[:-1], full[1:])):
            return None
        inner = self.ts_of(lams)
        if zero and inner:  # the time before the final step to t = 0 is t_end at the latest (rounding aside)
            inner[-1] = max(inner[-1], self.t_end)
        ts = [t0, *inner, 0.0 if zero else self.t_end]
        if any(not q < p for p, q in zip(ts[:-1], ts[1:])):
            return None
        return ts

    def increments_to_lams(self, weights: Sequence[float], t_start: float | None = None,
                           zero: bool = False) -> list[float]:
        """Positive weights (one per step) -> interior lambdas: each increment is min_gap plus its
        share of the remaining span (the softmax parameterization searchers use), from the start (the
        problem's unless given) to ``t_end`` (or to t = 0 with ``zero``)."""
        _, a, b = self._ends(t_start, zero)
        w = np.asarray(weights, dtype=float)
        w = w / w.sum()
        n = len(w)
        free = b - a - n * self.min_gap
        if free <= 0:
            raise ScheduleError(f"{n} steps do not fit in the lambda span {b - a:.3g} with gap {self.min_gap}")
        inc = self.min_gap + free * w
        return list(a + np.cumsum(inc)[:-1])

    def lams_to_logits(self, s: Schedule) -> np.ndarray:
        """Inverse of :meth:`increments_to_lams` (in the schedule's own frame): logits (mean zero) whose softmax
        gives the schedule's times. Read-only, kept on the schedule as its lambdas are."""
        return self._kept(s, "_logits", self._work_out_logits)

    def _work_out_logits(self, s: Schedule) -> np.ndarray:
        lam = self._lams(s)
        inc = np.diff(lam)
        free = lam[-1] - lam[0] - len(inc) * self.min_gap
        w = np.clip((inc - self.min_gap) / max(free, 1e-12), 1e-6, None)
        z = np.log(w)
        return z - z.mean()

    def _times_of_logits(self, s: Schedule, z: np.ndarray, t_start: float | None = None) -> list[float] | None:
        """The times the logits ``z`` describe in ``s``'s frame (its start unless ``t_start`` is given)."""
        t0, zero = self.frame(s)
        t0 = t0 if t_start is None else t_start
        try:
            lams = self.increments_to_lams(np.exp(z - z.max()), t0, zero)
        except ScheduleError:
            return None
        return self.times_from_lams(lams, t0, zero)

    def with_logits(self, s: Schedule, z: Sequence[float], name: str = "local") -> Schedule | None:
        """``s`` with its timesteps replaced by those the logits ``z`` (one per step) describe, between its own
        start and end; every other decision is kept. None when the result is not feasible."""
        z = np.asarray(z, dtype=float)
        if len(z) != len(s.steps) or not np.all(np.isfinite(z)):
            return None
        times = self._times_of_logits(s, z)
        return None if times is None else self.finish(self.make(times, s.steps, s.afs, name), s.nfe)

    # ---- building blocks ------------------------------------------------------------------------

    def sample_order(self, rng: np.random.Generator) -> int:
        orders = [o for o in ORDER_P if o <= self.max_order]
        if self._order_cdf is None or self._order_cdf[0] != orders:
            p = np.array([ORDER_P[o] for o in orders])
            self._order_cdf = (orders, draws.cdf(p / p.sum()))
        return draws.choice(rng, orders, self._order_cdf[1])

    @staticmethod
    def sample_relaxation(rng: np.random.Generator) -> str:
        return draws.choice(rng, STEP_RELAXATIONS, _RELAX_CDF)

    def sample_step(self, rng: np.random.Generator, t: float, corrector_ok: bool = True) -> Step:
        order = self.sample_order(rng)
        relax = self.sample_relaxation(rng)
        coef = float(rng.normal(0, self.relax_coef_sigma)) if relax == "linear" else 0.0
        corr = Corrector("pseudo") if corrector_ok and rng.random() < 0.5 else None
        first = 1 if order > 2 and rng.random() < 0.3 else None
        dc = float(1 + rng.normal(0, self.dc_sigma)) if rng.random() < 0.15 else 1.0
        return Step(t=t, prediction=draws.choice(rng, PREDICTIONS), order=order, relaxation=relax,
                    relaxation_coef=coef, corrector=corr, first_points=first, dc_ratio=dc)

    def make(self, times: Sequence[float], steps: Sequence[Step], afs: str, name: str = "searched") -> Schedule:
        steps = [st.at(t) for st, t in zip(steps, times[1:])]
        return Schedule(t_start=float(times[0]), steps=tuple(steps), noise=self.noise_dict, afs=afs, name=name)

    def repair(self, s: Schedule) -> Schedule:
        """Clip every per-step decision to what the step's history allows (order, points, start,
        relaxation, second-derivative scale, compensation, corrector; no corrector on the last step, and
        order 1 on a step to t = 0). What a sequence of step decisions needs is worked out once (children repeat
        their parents' steps at other times): for each step the repaired decisions, or None where they fit."""
        steps = s.steps
        where = (tuple([st.decisions_text for st in steps]), tuple([st.t == 0 for st in steps]))
        fixes = self._schedule_repairs.get(where, _UNSEEN)
        if fixes is _UNSEEN:
            if len(self._schedule_repairs) > 200_000:
                self._schedule_repairs.clear()
            n = len(steps)
            fixes = tuple([self._repaired(st, i, n) for i, st in enumerate(steps)])
            fixes = self._schedule_repairs[where] = None if all(f is None for f in fixes) else fixes
        if fixes is None:
            return s
        return evolve(s, steps=tuple([st if f is None else f.at(st.t) for st, f in zip(steps, fixes)]))

    def _repaired(self, st: Step, i: int, n: int) -> Step | None:
        """Step ``i`` of ``n`` with its decisions repaired (at its own time), or None where they fit: worked out once
        for each text of its decisions at each place (whether it is the last, whether it ends at t = 0)."""
        where = (st.decisions_text, i, i == n - 1, st.t == 0, self.max_order)
        fixed = self._repairs.get(where, _UNSEEN)
        if fixed is _UNSEEN:
            if len(self._repairs) > 200_000:
                self._repairs.clear()
            fixed = self._repairs[where] = _repair_step(st, i, n, self.max_order)
            if fixed is not None:  # made once here, so every copy ``at`` makes of it carries its texts
                fixed.decisions_text  # noqa: B018
        return fixed

    def finish(self, s: Schedule | None, nfe: int) -> Schedule | None:
        """Repair, validate and check the NFE; None when the candidate is not feasible."""
        if s is None:
            return None
        s = self.repair(s)
        if s.nfe != nfe or not self.fits(s):
            return None
        try:
            s.validate(nfe=nfe)
        except ScheduleError:
            return None
        return s

    def fits(self, s: Schedule) -> bool:
        """Whether the schedule's start and end are ones this space takes (the problem's, or a later start and a
        t = 0 end where allowed)."""
        t0, zero = self.frame(s)
        if t0 != self.t_start and not (self.late_start and self.min_start * (1 - 1e-12) <= t0 < self.t_start):
            return False
        if zero:
            return self.zero_end and (len(s.steps) < 2 or s.steps[-2].t >= self.t_end * (1 - 1e-12))
        return math.isclose(s.steps[-1].t, self.t_end, rel_tol=1e-9, abs_tol=1e-12)

    def _late_time(self, rng: np.random.Generator) -> float:
        """A start drawn uniformly in lambda between ``t_start`` and ``min_start``."""
        return float(np.clip(self.t_of(rng.uniform(self.lam0, self.lam_late)), self.min_start, self.t_start))

    # ---- random sampling ------------------------------------------------------------------------

    def random(self, nfe: int, rng: np.random.Generator) -> Schedule | None:
        afs = str(draws.choice(rng, self.afs_kinds)) if nfe >= 2 else "none"
        n = steps_for(nfe, afs)
        t0 = self._late_time(rng) if self.late_start and rng.random() < LATE_P else None
        zero = self.zero_end and rng.random() < ZERO_P
        _, a, b = self._ends(t0, zero)
        if n < 1 or n * self.min_gap >= b - a:
            return None
        w = rng.dirichlet(np.full(n, 2.0))
        times = self.times_from_lams(self.increments_to_lams(w, t0, zero), t0, zero)
        if times is None:
            return None
        steps = [self.sample_step(rng, times[i + 1], corrector_ok=i < n - 1) for i in range(n)]
        return self.finish(self.make(times, steps, afs, name="random"), nfe)

    # ---- mutation -------------------------------------------------------------------------------

    def mutate(self, s: Schedule, rng: np.random.Generator, n_ops: int | None = None) -> Schedule | None:
        """One to three NFE-preserving changes, chosen at random."""
        nfe = s.nfe
        ops = (self._move_t, self._move_t, self._jitter_all, self._decision, self._decision, self._decision,
               self._relocate_step, self._toggle_afs, self._implicit_swap)
        ops += (self._move_start,) * (2 * self.late_start) + (self._toggle_end,) * self.zero_end
        k = n_ops if n_ops is not None else int(rng.integers(1, 4))
        out = s
        for _ in range(k):
            op = ops[int(rng.integers(len(ops)))]
            nxt = op(out, rng)
            if nxt is not None:
                nxt = self.finish(nxt, nfe)
            if nxt is not None:
                out = nxt
        return None if out is s else evolve(out, name="mutant")  # ``out`` is finished: repair is idempotent

    def mutate_times(self, s: Schedule, rng: np.random.Generator, scale: float | None = None) -> Schedule | None:
        """Only the timesteps move (every interior lambda, a log-normal step on the softmax logits)."""
        n = len(s.steps)
        if n < 2:
            return None
        scale = draws.choice(rng, (0.05, 0.1, 0.2, 0.4)) if scale is None else scale
        z = self.lams_to_logits(s) + rng.normal(0, scale, n)
        times = self._times_of_logits(s, z)
        out = None if times is None else self.finish(self.make(times, s.steps, s.afs, "times"), s.nfe)
        return out

    def _move_t(self, s: Schedule, rng) -> Schedule | None:
        n = len(s.steps)
        if n < 2:
            return None
        lam = self.lams(s)
        i = int(rng.integers(1, n))  # an interior time (index into times)
        lo, hi = lam[i - 1] + self.min_gap, lam[i + 1] - self.min_gap
        if hi <= lo:
            return None
        width = lam[i + 1] - lam[i - 1]
        new = float(min(max(lam[i] + rng.normal(0, 0.15 * width), lo), hi))  # np.clip, without its overhead
        lam[i] = new
        times = self.times_from_lams(lam[1:-1], *self.frame(s))
        return None if times is None else self.make(times, s.steps, s.afs, s.name)

    def _jitter_all(self, s: Schedule, rng) -> Schedule | None:
        n = len(s.steps)
        if n < 2:
            return None
        z = self.lams_to_logits(s) + rng.normal(0, 0.2, n)
        times = self._times_of_logits(s, z)
        return None if times is None else self.make(times, s.steps, s.afs, s.name)

    def _move_start(self, s: Schedule, rng) -> Schedule | None:
        """Another start (a later one, or back to ``t_start``); the steps keep their shares of the lambda span."""
        t0, _ = self.frame(s)
        if t0 != self.t_start and rng.random() < 0.2:
            new = self.t_start
        else:
            lam = self.lam0 if t0 == self.t_start else self.lam(t0)
            moved = float(np.clip(lam + rng.normal(0, 0.15 * (self.lam_late - self.lam0)), self.lam0, self.lam_late))
            new = float(np.clip(self.t_of(moved), self.min_start, self.t_start))
        if new == t0:
            return None
        times = self._times_of_logits(s, self.lams_to_logits(s), new)
        return None if times is None else self.make(times, s.steps, s.afs, s.name)

    def _toggle_end(self, s: Schedule, rng) -> Schedule | None:
        """End at t = 0 instead of ``t_end`` or the other way round, at the same NFE: the last time changes where
        the gap rule allows it, else a final step to t = 0 is appended (or removed) and an interior one removed (or
        added)."""
        t0, zero = self.frame(s)
        lam = self.lams(s)
        steps = list(s.steps)
        if zero:
            if lam[-2] <= self.lam1 - self.min_gap * 0.999:  # the last step ends at t_end instead
                return self.make([*s.times[:-1], self.t_end], steps, s.afs, s.name)
            if len(steps) < 2:
                return None
            shorter = self.make([*s.times[:-2], self.t_end], steps[:-1], s.afs, s.name)  # t_end ends it
            return self._insert(shorter, rng)
        if rng.random() < 0.5:  # the last step goes to t = 0
            return self.make([*s.times[:-1], 0.0], steps, s.afs, s.name)
        d = self._delete(s, rng)
        if d is None:
            return None
        final = evolve(self.sample_step(rng, 0.0, corrector_ok=False), order=1, first_points=None)
        return self.make([*d.times, 0.0], [*d.steps, final], s.afs, s.name)

    def _decision(self, s: Schedule, rng) -> Schedule:
        steps = list(s.steps)
        i = int(rng.integers(len(steps)))
        st = steps[i]
        last = i == len(steps) - 1
        what = int(rng.integers(7))
        if what == 0:
            st = evolve(st, order=self.sample_order(rng), start=-1, points=None)
        elif what == 1:
            st = evolve(st, prediction="noise" if st.prediction == "data" else "data")
        elif what == 2:
            st = evolve(st, first_points=None if st.first_points else 1)
        elif what == 3:
            relax = self.sample_relaxation(rng)
            st = evolve(st, relaxation=relax, relaxation_coef=0.0 if relax != "linear" else st.relaxation_coef)
        elif what == 4:
            if st.relaxation != "linear":
                st = evolve(st, relaxation="linear", relaxation_coef=0.0)
            st = evolve(st, relaxation_coef=float(st.relaxation_coef + rng.normal(0, self.relax_coef_sigma)))
        elif what == 5:
            if st.corrector is not None and st.corrector.kind == "implicit":
                return s
            if not last:
                st = evolve(st, corrector=None if st.corrector is not None else Corrector("pseudo"))
        else:
            dc = 1.0 if st.dc_ratio != 1.0 and rng.random() < 0.3 else st.dc_ratio + rng.normal(0, self.dc_sigma)
            st = evolve(st, dc_ratio=float(max(dc, 0.5)))
        steps[i] = st
        return s.with_steps(steps)

    def _insert(self, s: Schedule, rng) -> Schedule | None:
        """One more step (NFE + 1): split an interval in lambda; decisions sampled."""
        lam = self.lams(s)
        gaps = np.diff(lam)
        ok = np.flatnonzero(gaps >= 2 * self.min_gap)
        if len(ok) == 0:
            return None
        j = int(draws.choice(rng, ok, draws.cdf(gaps[ok] / gaps[ok].sum())))
        frac = rng.uniform(0.25, 0.75)
        new = float(min(max(lam[j] + frac * gaps[j], lam[j] + self.min_gap), lam[j + 1] - self.min_gap))
        lam = np.concatenate((lam[:j + 1], [new], lam[j + 1:]))
        times = self.times_from_lams(lam[1:-1], *self.frame(s))
        if times is None:
            return None
        steps = list(s.steps)
        # the inserted step ends at the new time; the split step keeps its decisions on the second half
        steps.insert(j, self.sample_step(rng, new))
        return self.make(times, steps, s.afs, s.name)

    def _delete(self, s: Schedule, rng) -> Schedule | None:
        """One step fewer (NFE - 1): drop an interior time."""
        n = len(s.steps)
        if n < 2:
            return None
        i = int(rng.integers(0, n - 1))  # step i ends at an interior time
        steps = list(s.steps)
        del steps[i]
        times = [s.t_start, *(st.t for st in steps)]
        return self.make(times, steps, s.afs, s.name)

    def _relocate_step(self, s: Schedule, rng) -> Schedule | None:
        d = self._delete(s, rng)
        return None if d is None else self._insert(d, rng)

    def _toggle_afs(self, s: Schedule, rng) -> Schedule | None:
        if "zero" not in self.afs_kinds:
            return None
        if s.afs == "none":
            out = self._insert(s, rng)
            return None if out is None else evolve(out, afs="zero")
        out = self._delete(s, rng)
        return None if out is None else evolve(out, afs="none")

    def _implicit_swap(self, s: Schedule, rng) -> Schedule | None:
        """Trade an implicit corrector for an extra step, or an interior step for an implicit corrector."""
        steps = list(s.steps)
        imp = [i for i, st in enumerate(steps) if st.corrector is not None and st.corrector.kind == "implicit"]
        if imp and rng.random() < 0.7:
            i = draws.choice(rng, imp)
            steps[i] = evolve(steps[i], corrector=None)
            return self._insert(s.with_steps(steps), rng)
        d = self._delete(s, rng)
        if d is None or len(d.steps) < 2:
            return None
        steps = list(d.steps)
        free = [i for i, st in enumerate(steps[:-1]) if st.corrector is None or st.corrector.kind == "pseudo"]
        if not free:
            return None
        i = draws.choice(rng, free)
        steps[i] = evolve(steps[i], corrector=Corrector("implicit", order=2, relaxation="heun"))
        return d.with_steps(steps)

    # ---- NFE change (warm start) ----------------------------------------------------------------

    def grow(self, s: Schedule, nfe: int, rng: np.random.Generator, tries: int = 8) -> Schedule | None:
        """A schedule at a higher NFE made from ``s`` by inserting steps (warm start n -> n+k)."""
        for _ in range(tries):
            out = s
            while out is not None and out.nfe < nfe:
                out = self._insert(out, rng)
                out = None if out is None else self.repair(out)
            out = self.finish(out, nfe)
            if out is not None:
                return evolve(out, name="grown")
        return None

    # ---- crossover ------------------------------------------------------------------------------

    def crossover(self, a: Schedule, b: Schedule, rng: np.random.Generator) -> Schedule | None:
        """A child at ``a``'s NFE: ``a``'s step structure (count, AFS, implicit correctors); times from
        ``a``, ``b`` (when it has as many steps) or their lambda average; every other per-step decision
        from either parent, aligned by relative position."""
        nfe = a.nfe
        na, nb = len(a.steps), len(b.steps)
        times = list(a.times)
        if nb == na and b.afs == a.afs:
            mode = int(rng.integers(3))
            if mode == 1:
                times = list(b.times)
            elif mode == 2 and self.frame(a) == self.frame(b):
                lam = 0.5 * (self.lams(a) + self.lams(b))
                times = self.times_from_lams(lam[1:-1], *self.frame(a)) or times
        steps = []
        for i, st in enumerate(a.steps):
            if rng.random() < 0.5:
                j = i if nb == na else min(nb - 1, int(round(i * (nb - 1) / max(na - 1, 1))))
                o = b.steps[j]
                implicit_a = st.corrector is not None and st.corrector.kind == "implicit"
                implicit_b = o.corrector is not None and o.corrector.kind == "implicit"
                corr = st.corrector if implicit_a or implicit_b else o.corrector
                st = o.at(st.t) if corr is o.corrector else evolve(o, t=st.t, corrector=corr)
            steps.append(st)
        child = self.finish(self.make(times, steps, a.afs, "child"), nfe)
        return child


_UNSEEN = object()


def _repair_step(st: Step, i: int, n: int, max_order: int) -> Step | None:
    """Step ``i`` of ``n`` with its decisions clipped to what its history allows; None when they already fit."""
    hist = i + 1
    start = st.start if -hist <= st.start <= -1 else -1
    order = 1 if st.t == 0 else max(1, min(st.order, max_order))
    points = st.points
    if points is not None:
        points = tuple(p for p in dict.fromkeys(points) if -hist <= p <= -1 and p != start)
        order = min(order, len(points) + 1)
        if order == 1:
            points = None
    else:
        order = min(order, hist + start + 1)
    npts = len(points) if points is not None else order - 1
    first = st.first_points if st.first_points is not None and 1 <= st.first_points <= npts else None
    relax, coef = (st.relaxation, st.relaxation_coef) if order >= 2 else ("none", 0.0)
    second = st.second_scale if order >= 3 else 1.0
    dc = st.dc_ratio if hist >= 3 else 1.0
    corr = st.corrector
    if corr is not None and (i == n - 1 or st.t == 0):
        corr = None
    if corr is not None:
        cap = min(MAX_ORDER, npts + 2)
        corder = corr.order if corr.order is not None else order + 1
        if corder > cap or corder < 2:
            corr = evolve(corr, order=cap if corr.order is not None or order + 1 > cap else None)
        if corr.order is not None and corr.order == order + 1:
            corr = evolve(corr, order=None)
    if (start, order, points, first, relax, coef, second, dc, corr) == (
            st.start, st.order, st.points, st.first_points, st.relaxation, st.relaxation_coef, st.second_scale,
            st.dc_ratio, st.corrector):
        return None
    return evolve(st, start=start, order=order, points=points, first_points=first, relaxation=relax,
                  relaxation_coef=coef, second_scale=second, dc_ratio=dc, corrector=corr)
