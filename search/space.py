"""The decision space searchers move in: random schedules, mutations and crossovers at exact NFE.

Timesteps are handled in lambda = log(alpha/sigma): the first time is the problem's ``t_start``,
the last is its ``t_end`` (fixed, so every candidate is scored against the same reference), and
the interior lambdas are kept increasing with at least ``min_gap`` between neighbours. Every
operator ends in :meth:`DecisionSpace.repair` (clips per-step decisions to what the history
allows) and :meth:`DecisionSpace.finish` (validates and checks the NFE); an operator that cannot
produce a valid candidate returns ``None`` and the caller tries another one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch

from steptune.space import Corrector, Schedule, ScheduleError, Step
from steptune.space.noise import NoiseSchedule
from steptune.space.relaxation import STEP_RELAXATIONS
from steptune.space.schedule import MAX_ORDER

PREDICTIONS = ("noise", "data")
ORDER_P = {1: 0.2, 2: 0.4, 3: 0.3, 4: 0.1}
# how often random steps take each relaxation kind a predictor step may use
RELAX_P = {"none": 0.35, "dpmsolver-2": 0.15, "unipc-bh2": 0.15, "unipc-bh1": 0.1, "0.5exp": 0.05, "-0.5exp": 0.05,
           "linear": 0.15}


# lambdas converted per torch call: short enough that torch takes the same (element by element) path as for
# one value, so a batch of times equals the times converted one by one
_CHUNK = 8


def steps_for(nfe: int, afs: str = "none", implicit: int = 0) -> int:
    """Number of steps a schedule with this NFE, AFS choice and implicit-corrector count has."""
    return nfe - (afs == "none") + 1 - implicit


class DecisionSpace:
    """Sampling and variation operators over schedules on one noise schedule and time interval.

    ``afs_kinds`` are the analytical-first-step choices allowed (``("none", "zero")`` by default);
    ``max_order`` caps the Taylor order; ``min_gap`` is the smallest lambda distance between
    consecutive times.
    """

    def __init__(self, noise: NoiseSchedule, t_start: float, t_end: float, min_gap: float = 0.05,
                 afs_kinds: Sequence[str] = ("none", "zero"), max_order: int = MAX_ORDER,
                 relax_coef_sigma: float = 0.05, dc_sigma: float = 0.03):
        self.noise = noise
        self.noise_dict = noise.to_dict()
        self.t_start, self.t_end = float(t_start), float(t_end)
        self.lam0 = float(noise.lam(self.t_start))
        self.lam1 = float(noise.lam(self.t_end))
        self.min_gap = float(min_gap)
        self.afs_kinds = tuple(afs_kinds)
        self.max_order = int(max_order)
        self.relax_coef_sigma = relax_coef_sigma
        self.dc_sigma = dc_sigma
        self._lam_cache: dict[float, float] = {}

    # ---- time axis ------------------------------------------------------------------------------

    @property
    def span(self) -> float:
        return self.lam1 - self.lam0

    @property
    def max_nfe(self) -> int:
        """The largest NFE whose schedules (one step per model call) fit the span at ``min_gap``."""
        return max(0, math.ceil(self.span / self.min_gap) - 1)

    def lam(self, t: float) -> float:
        v = self._lam_cache.get(t)
        if v is None:
            if len(self._lam_cache) > 200_000:
                self._lam_cache.clear()
            v = self._lam_cache[t] = float(self.noise.lam(t))
        return v

    def lams(self, s: Schedule) -> np.ndarray:
        times = s.times
        missing = [t for t in dict.fromkeys(times) if t not in self._lam_cache]
        if missing:
            if len(self._lam_cache) > 200_000:
                self._lam_cache.clear()
            for i in range(0, len(missing), _CHUNK):
                part = missing[i:i + _CHUNK]
                vals = self.noise.lam(torch.tensor(part, dtype=torch.float64)).tolist()
                self._lam_cache.update(zip(part, vals))
        return np.array([self._lam_cache[t] for t in times])

    def t_of(self, lam: float) -> float:
        return float(self.noise.t_of_lambda(torch.tensor(float(lam), dtype=torch.float64)))

    def ts_of(self, lams: Sequence[float]) -> list[float]:
        """:meth:`t_of` of several lambdas, a few at a time in one call each."""
        out: list[float] = []
        lams = [float(x) for x in lams]
        for i in range(0, len(lams), _CHUNK):
            out += self.noise.t_of_lambda(torch.tensor(lams[i:i + _CHUNK], dtype=torch.float64)).tolist()
        return out

    def times_from_lams(self, lams: Sequence[float]) -> list[float] | None:
        """Interior lambdas -> times (first and last fixed); None when the gap rule is broken."""
        full = [self.lam0, *lams, self.lam1]
        if any(b - a < self.min_gap * 0.999 for a, b in zip(full[:-1], full[1:])):
            return None
        ts = [self.t_start, *self.ts_of(lams), self.t_end]
        if any(not b < a for a, b in zip(ts[:-1], ts[1:])):
            return None
        return ts

    def increments_to_lams(self, weights: Sequence[float]) -> list[float]:
        """Positive weights (one per step) -> interior lambdas: each increment is min_gap plus its
        share of the remaining span (the softmax parameterization searchers use)."""
        w = np.asarray(weights, dtype=float)
        w = w / w.sum()
        n = len(w)
        free = self.span - n * self.min_gap
        if free <= 0:
            raise ScheduleError(f"{n} steps do not fit in the lambda span {self.span:.3g} with gap {self.min_gap}")
        inc = self.min_gap + free * w
        return list(self.lam0 + np.cumsum(inc)[:-1])

    def lams_to_logits(self, s: Schedule) -> np.ndarray:
        """Inverse of :meth:`increments_to_lams`: logits (mean zero) whose softmax gives the schedule's times."""
        lam = self.lams(s)
        inc = np.diff(lam)
        free = self.span - len(inc) * self.min_gap
        w = np.clip((inc - self.min_gap) / max(free, 1e-12), 1e-6, None)
        z = np.log(w)
        return z - z.mean()

    def with_logits(self, s: Schedule, z: Sequence[float], name: str = "local") -> Schedule | None:
        """``s`` with its timesteps replaced by those the logits ``z`` (one per step) describe; every other
        decision is kept. None when the result is not feasible."""
        z = np.asarray(z, dtype=float)
        if len(z) != len(s.steps) or not np.all(np.isfinite(z)):
            return None
        times = self.times_from_lams(self.increments_to_lams(np.exp(z - z.max())))
        return None if times is None else self.finish(self.make(times, s.steps, s.afs, name), s.nfe)

    # ---- building blocks ------------------------------------------------------------------------

    def sample_order(self, rng: np.random.Generator) -> int:
        orders = [o for o in ORDER_P if o <= self.max_order]
        p = np.array([ORDER_P[o] for o in orders])
        return int(rng.choice(orders, p=p / p.sum()))

    @staticmethod
    def sample_relaxation(rng: np.random.Generator) -> str:
        return str(rng.choice(STEP_RELAXATIONS, p=[RELAX_P[k] for k in STEP_RELAXATIONS]))

    def sample_step(self, rng: np.random.Generator, t: float, corrector_ok: bool = True) -> Step:
        order = self.sample_order(rng)
        relax = self.sample_relaxation(rng)
        coef = float(rng.normal(0, self.relax_coef_sigma)) if relax == "linear" else 0.0
        corr = Corrector("pseudo") if corrector_ok and rng.random() < 0.5 else None
        first = 1 if order > 2 and rng.random() < 0.3 else None
        dc = float(1 + rng.normal(0, self.dc_sigma)) if rng.random() < 0.15 else 1.0
        return Step(t=t, prediction=str(rng.choice(PREDICTIONS)), order=order, relaxation=relax,
                    relaxation_coef=coef, corrector=corr, first_points=first, dc_ratio=dc)

    def make(self, times: Sequence[float], steps: Sequence[Step], afs: str, name: str = "searched") -> Schedule:
        steps = [replace(st, t=t) for st, t in zip(steps, times[1:])]
        return Schedule(t_start=self.t_start, steps=tuple(steps), noise=self.noise_dict, afs=afs, name=name)

    def repair(self, s: Schedule) -> Schedule:
        """Clip every per-step decision to what the step's history allows (order, points, start,
        relaxation, second-derivative scale, compensation, corrector; no corrector on the last step)."""
        steps = []
        n = len(s.steps)
        for i, st in enumerate(s.steps):
            hist = i + 1
            start = st.start if -hist <= st.start <= -1 else -1
            order = max(1, min(st.order, self.max_order))
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
                    corr = replace(corr, order=cap if corr.order is not None or order + 1 > cap else None)
                if corr.order is not None and corr.order == order + 1:
                    corr = replace(corr, order=None)
            if (start, order, points, first, relax, coef, second, dc, corr) != (
                    st.start, st.order, st.points, st.first_points, st.relaxation, st.relaxation_coef,
                    st.second_scale, st.dc_ratio, st.corrector):
                st = replace(st, start=start, order=order, points=points, first_points=first, relaxation=relax,
                             relaxation_coef=coef, second_scale=second, dc_ratio=dc, corrector=corr)
            steps.append(st)
        steps = tuple(steps)
        return s if steps == s.steps else replace(s, steps=steps)

    def finish(self, s: Schedule | None, nfe: int) -> Schedule | None:
        """Repair, validate and check the NFE; None when the candidate is not feasible."""
        if s is None:
            return None
        s = self.repair(s)
        if (s.nfe != nfe or not math.isclose(s.steps[-1].t, self.t_end, rel_tol=1e-9, abs_tol=1e-12)
                or s.t_start != self.t_start):
            return None
        try:
            s.validate(nfe=nfe)
        except ScheduleError:
            return None
        return s

    # ---- random sampling ------------------------------------------------------------------------

    def random(self, nfe: int, rng: np.random.Generator) -> Schedule | None:
        afs = str(rng.choice(self.afs_kinds)) if nfe >= 2 else "none"
        n = steps_for(nfe, afs)
        if n < 1 or n * self.min_gap >= self.span:
            return None
        w = rng.dirichlet(np.full(n, 2.0))
        times = self.times_from_lams(self.increments_to_lams(w))
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
        k = n_ops if n_ops is not None else int(rng.integers(1, 4))
        out = s
        for _ in range(k):
            op = ops[int(rng.integers(len(ops)))]
            nxt = op(out, rng)
            if nxt is not None:
                nxt = self.finish(nxt, nfe)
            if nxt is not None:
                out = nxt
        return None if out is s else replace(out, name="mutant")  # ``out`` is finished: repair is idempotent

    def mutate_times(self, s: Schedule, rng: np.random.Generator, scale: float | None = None) -> Schedule | None:
        """Only the timesteps move (every interior lambda, a log-normal step on the softmax logits)."""
        n = len(s.steps)
        if n < 2:
            return None
        scale = float(rng.choice([0.05, 0.1, 0.2, 0.4])) if scale is None else scale
        z = self.lams_to_logits(s) + rng.normal(0, scale, n)
        times = self.times_from_lams(self.increments_to_lams(np.exp(z - z.max())))
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
        new = float(np.clip(lam[i] + rng.normal(0, 0.15 * width), lo, hi))
        lam[i] = new
        times = self.times_from_lams(lam[1:-1])
        return None if times is None else self.make(times, s.steps, s.afs, s.name)

    def _jitter_all(self, s: Schedule, rng) -> Schedule | None:
        n = len(s.steps)
        if n < 2:
            return None
        z = self.lams_to_logits(s) + rng.normal(0, 0.2, n)
        w = np.exp(z - z.max())
        times = self.times_from_lams(self.increments_to_lams(w))
        return None if times is None else self.make(times, s.steps, s.afs, s.name)

    def _decision(self, s: Schedule, rng) -> Schedule:
        steps = list(s.steps)
        i = int(rng.integers(len(steps)))
        st = steps[i]
        last = i == len(steps) - 1
        what = int(rng.integers(7))
        if what == 0:
            st = replace(st, order=self.sample_order(rng), start=-1, points=None)
        elif what == 1:
            st = replace(st, prediction="noise" if st.prediction == "data" else "data")
        elif what == 2:
            st = replace(st, first_points=None if st.first_points else 1)
        elif what == 3:
            relax = self.sample_relaxation(rng)
            st = replace(st, relaxation=relax, relaxation_coef=0.0 if relax != "linear" else st.relaxation_coef)
        elif what == 4:
            if st.relaxation != "linear":
                st = replace(st, relaxation="linear", relaxation_coef=0.0)
            st = replace(st, relaxation_coef=float(st.relaxation_coef + rng.normal(0, self.relax_coef_sigma)))
        elif what == 5:
            if st.corrector is not None and st.corrector.kind == "implicit":
                return s
            if not last:
                st = replace(st, corrector=None if st.corrector is not None else Corrector("pseudo"))
        else:
            dc = 1.0 if st.dc_ratio != 1.0 and rng.random() < 0.3 else st.dc_ratio + rng.normal(0, self.dc_sigma)
            st = replace(st, dc_ratio=float(max(dc, 0.5)))
        steps[i] = st
        return s.with_steps(steps)

    def _insert(self, s: Schedule, rng) -> Schedule | None:
        """One more step (NFE + 1): split an interval in lambda; decisions sampled."""
        lam = self.lams(s)
        gaps = np.diff(lam)
        ok = np.flatnonzero(gaps >= 2 * self.min_gap)
        if len(ok) == 0:
            return None
        j = int(rng.choice(ok, p=gaps[ok] / gaps[ok].sum()))
        frac = rng.uniform(0.25, 0.75)
        new = float(np.clip(lam[j] + frac * gaps[j], lam[j] + self.min_gap, lam[j + 1] - self.min_gap))
        lam = np.insert(lam, j + 1, new)
        times = self.times_from_lams(lam[1:-1])
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
            return None if out is None else replace(out, afs="zero")
        out = self._delete(s, rng)
        return None if out is None else replace(out, afs="none")

    def _implicit_swap(self, s: Schedule, rng) -> Schedule | None:
        """Trade an implicit corrector for an extra step, or an interior step for an implicit corrector."""
        steps = list(s.steps)
        imp = [i for i, st in enumerate(steps) if st.corrector is not None and st.corrector.kind == "implicit"]
        if imp and rng.random() < 0.7:
            i = int(rng.choice(imp))
            steps[i] = replace(steps[i], corrector=None)
            return self._insert(s.with_steps(steps), rng)
        d = self._delete(s, rng)
        if d is None or len(d.steps) < 2:
            return None
        steps = list(d.steps)
        free = [i for i, st in enumerate(steps[:-1]) if st.corrector is None or st.corrector.kind == "pseudo"]
        if not free:
            return None
        i = int(rng.choice(free))
        steps[i] = replace(steps[i], corrector=Corrector("implicit", order=2, relaxation="heun"))
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
                return replace(out, name="grown")
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
            elif mode == 2:
                lam = 0.5 * (self.lams(a) + self.lams(b))
                times = self.times_from_lams(lam[1:-1]) or times
        steps = []
        for i, st in enumerate(a.steps):
            if rng.random() < 0.5:
                j = i if nb == na else min(nb - 1, int(round(i * (nb - 1) / max(na - 1, 1))))
                o = b.steps[j]
                implicit_a = st.corrector is not None and st.corrector.kind == "implicit"
                implicit_b = o.corrector is not None and o.corrector.kind == "implicit"
                corr = st.corrector if implicit_a or implicit_b else o.corrector
                st = replace(o, t=st.t, corrector=corr)
            steps.append(st)
        child = self.finish(self.make(times, steps, a.afs, "child"), nfe)
        return child
