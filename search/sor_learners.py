"""Online choice of the SOR relaxation parameter ω across a sequence of linear systems.

Every learner has the ask/tell shape of the schedule searchers: ``ask(context)`` returns the arm
(grid index and ω) to solve the next system with, ``tell(cost)`` reports what that solve cost
(iterations). A learner's state is a function of its constructor arguments and the sequence of
(context, arm, cost) rounds it was told, so :meth:`OmegaLearner.replay` rebuilds it from stored
rounds. Random draws come from one generator seeded at construction, one draw per ``ask``.

* :class:`TsallisINF`: 1/2-Tsallis-INF over the ω grid (Learning to Relax, Alg. 2): anytime
  η_t = η₀/√t, costs shifted by 1 and scaled by the running mean, importance-weighted losses measured
  against a running baseline (which leaves their expectation's differences unchanged and cuts the
  variance of the estimate), neighbouring grid ω sharing observations with a weight that fades.
* :class:`TsallisINFBins`: one Tsallis-INF per context bin (Alg. 5).
* :class:`ChebCB`: per-arm Chebyshev regression of the cost on the context, with inverse-gap-weighted
  exploration (SquareCB; Alg. 3). The regression is on log cost, which keeps the steep side of the
  cost curve (Gauss–Seidel end, hard instances) from dominating the fit, and each arm's fit is pulled
  toward its grid neighbours', so arms with few rounds borrow their shape.
* :class:`YoungSOR`: reads each solve's residual history (the asymptotic convergence factor at the ω it
  used), turns it into the Jacobi radius μ by Young's relation, regresses log(1 − μ) on the context
  across solves and plays Young's optimum of the prediction, lowered by its uncertainty; where the
  predicted iterations miss, a bandit over offsets from that optimum takes over the last step.
* :class:`AdaptiveSOR`: classical adaptive SOR (Hageman–Young) as a policy over the sequence.
* :class:`FixedOmega`: one ω always (Gauss–Seidel is ω = 1).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from steptune.evaluators.compiled import njit
from steptune.evaluators.linear.spectra import (
    convergence_factor,
    jacobi_radius_from_factor,
    optimal_omega,
    sor_factor,
)

DEFAULT_GRID = tuple(float(w) for w in np.linspace(1.0, 1.95, 20))
LEARNERS = ("young", "tsallis-inf", "tsallis-inf-cb", "chebcb", "fixed", "adaptive")


@dataclass(frozen=True)
class Arm:
    index: int | None
    omega: float
    probability: float = 1.0


class OmegaLearner:
    """Base class: ``ask(context) -> Arm``, ``tell(cost)``; ``replay(rounds)`` to resume."""

    name = "base"
    contextual = False
    context_key: str | None = None  # which entry of a stored context dict the learner reads

    def __init__(self, omegas: Sequence[float] = DEFAULT_GRID, seed: int = 0):
        self.omegas = np.asarray(omegas, dtype=np.float64)
        if self.omegas.ndim != 1 or len(self.omegas) == 0 or np.any(self.omegas <= 0) or np.any(self.omegas >= 2):
            raise ValueError("the ω grid must be a non-empty list of values in (0, 2)")
        self.seed = int(seed)
        self.rng = np.random.default_rng(self.seed)
        self.t = 0  # rounds told
        self._pending: tuple[Arm, float | None, np.ndarray] | None = None
        self.replay_mismatches = 0

    @property
    def d(self) -> int:
        return len(self.omegas)

    def config(self) -> dict:
        return {"learner": self.name, "seed": self.seed, "omegas": [float(w) for w in self.omegas]}

    def ask(self, context: float | None = None) -> Arm:
        u = self.rng.random()
        p = np.array(self._probabilities(context), dtype=np.float64)
        i = _draw(p, u)  # normalises p in place
        arm = Arm(i, float(self.omegas[i]), float(p[i]))
        self._pending = (arm, context, p)
        return arm

    def tell(self, cost: float, arm: int | None = None, context: float | None = None) -> None:
        """Report the cost of the last asked arm (or of ``arm`` at ``context``, e.g. from a log)."""
        cost = float(cost)
        if not math.isfinite(cost):
            raise ValueError(f"cost {cost} is not finite")
        if self._pending is not None and (arm is None or arm == self._pending[0].index):
            chosen, ctx, probs = self._pending[0].index, self._pending[1], self._pending[2]
        elif arm is not None:
            chosen, ctx = int(arm), context
            probs = self._probabilities(ctx)
            probs = probs / probs.sum()
        else:
            raise RuntimeError("tell() without a pending ask() needs the arm")
        self.t += 1
        self._update(chosen, max(cost, 1.0), ctx, probs)
        self._pending = None

    def replay(self, rounds: Iterable) -> int:
        """Re-ask and re-tell stored rounds (objects with ``arm``, ``cost`` and a ``context`` dict, or
        (arm, cost, context) tuples); returns how many rounds played another arm than this learner
        would have (they are told as they were)."""
        mismatches = 0
        for r in rounds:
            arm, cost, ctx = (r.arm, r.cost, r.context) if hasattr(r, "arm") else r
            c = self.context_of(ctx)
            asked = self.ask(c)
            if arm != asked.index:
                mismatches += 1
            self.tell(cost, arm=arm, context=c)
        self.replay_mismatches += mismatches
        return mismatches

    def context_of(self, ctx) -> float | None:
        if isinstance(ctx, dict):
            return None if self.context_key is None else ctx.get(self.context_key)
        return ctx

    # subclasses
    def _probabilities(self, context: float | None) -> np.ndarray:
        raise NotImplementedError

    def _update(self, arm: int, cost: float, context: float | None, probabilities: np.ndarray) -> None:
        """Learn from ``cost`` of ``arm`` played with ``probabilities`` (the distribution it was drawn from)."""
        raise NotImplementedError


class FixedOmega(OmegaLearner):
    """Always the same ω (a one-arm grid)."""

    name = "fixed"

    def __init__(self, omega: float = 1.0, seed: int = 0):
        super().__init__([omega], seed)

    def _probabilities(self, context):
        return np.ones(1)

    def _update(self, arm, cost, context, probabilities):
        pass


@njit(cache=True)
def _draw(p, u):
    """Normalise p in place and return the index that u ∈ [0, 1) selects from its cumulative sum."""
    total = 0.0
    for i in range(p.shape[0]):
        total += p[i]
    chosen = -1
    acc = 0.0
    for i in range(p.shape[0]):
        p[i] /= total
        acc += p[i]
        if chosen < 0 and u < acc:
            chosen = i
    return chosen if chosen >= 0 else p.shape[0] - 1


def tsallis_probabilities(losses: np.ndarray, eta: float, newton_steps: int = 30) -> np.ndarray:
    """argmin_p ⟨L, p⟩ − (4/η) Σ √p_i over the simplex: p_i = 4/(η (L_i − x))², x by Newton's method."""
    return _tsallis_newton(np.asarray(losses, dtype=np.float64), float(eta), int(newton_steps))


@njit(cache=True)
def _tsallis_newton(losses, eta, steps):
    L = losses - losses.min()
    x = -2.0 / eta  # here the best arm alone has p = 1, so Σ p ≥ 1; Newton then walks left monotonically
    p = np.empty_like(L)
    for _ in range(steps):
        f = -1.0
        df = 0.0
        for i in range(L.shape[0]):
            g = L[i] - x
            p[i] = 4.0 / (eta * g) ** 2
            f += p[i]
            df += 2.0 * p[i] / g
        if abs(f) < 1e-13:
            break
        x -= f / df
    total = 0.0
    for i in range(L.shape[0]):
        p[i] = 4.0 / (eta * (L[i] - x)) ** 2
        total += p[i]
    return p / total


class TsallisINF(OmegaLearner):
    """1/2-Tsallis-INF over the ω grid (see the module docstring).

    ``smoothing`` w > 0 lets a round on arm i also inform its grid neighbours i ± 1 with weight w: the
    estimate of arm j gains K_ij (ℓ − baseline)/P_j with P_j = Σ_i K_ij p_i, the probability that j is
    informed (neighbouring ω cost nearly the same; this trades a little bias for much less variance).
    The weight decays as w/(1 + n/``smoothing_rounds``), so the bias fades once the estimates settle."""

    name = "tsallis-inf"

    def __init__(self, omegas: Sequence[float] = DEFAULT_GRID, seed: int = 0, eta0: float = 2.0,
                 baseline: bool = True, smoothing: float = 0.25, smoothing_rounds: float = 1000.0):
        super().__init__(omegas, seed)
        self.eta0 = float(eta0)
        self.baseline = bool(baseline)
        self.smoothing, self.smoothing_rounds = float(smoothing), float(smoothing_rounds)
        self.losses = np.zeros(self.d)  # cumulative importance-weighted loss estimates, in cost units − 1
        self.cost_sum = 0.0
        self.n = 0

    def config(self) -> dict:
        return {**super().config(), "eta0": self.eta0, "baseline": self.baseline, "smoothing": self.smoothing,
                "smoothing_rounds": self.smoothing_rounds}

    def scale(self) -> float:
        return max(self.cost_sum / self.n - 1.0, 1e-9) if self.n else 1.0

    def _probabilities(self, context=None):
        if self.n == 0:
            return np.full(self.d, 1.0 / self.d)
        return tsallis_probabilities(self.losses / self.scale(), self.eta0 / math.sqrt(self.n + 1))

    def _update(self, arm, cost, context, probabilities):
        base = self.scale() if (self.baseline and self.n) else 0.0
        weight = self.smoothing / (1.0 + self.n / self.smoothing_rounds)
        _smoothed_importance_update(self.losses, arm, cost - 1.0 - base, probabilities, weight)
        self.cost_sum += cost
        self.n += 1


@njit(cache=True)
def _smoothed_importance_update(losses, arm, loss, p, w):
    """losses_j += K_arm,j · loss / Σ_i K_ij p_i for K = I + w·(grid neighbours)."""
    d = losses.shape[0]
    for j in range(max(arm - 1, 0), min(arm + 2, d)):
        informed = p[j]
        if j > 0:
            informed += w * p[j - 1]
        if j < d - 1:
            informed += w * p[j + 1]
        losses[j] += (1.0 if j == arm else w) * loss / max(informed, 1e-12)


class TsallisINFBins(OmegaLearner):
    """An independent Tsallis-INF in each of ``bins`` equal context bins over ``context_range``."""

    name = "tsallis-inf-cb"
    contextual = True

    def __init__(self, omegas: Sequence[float] = DEFAULT_GRID, seed: int = 0, context_range=(0.0, 1.0),
                 bins: int = 5, eta0: float = 2.0, baseline: bool = True, smoothing: float = 0.25,
                 context_key: str | None = None):
        super().__init__(omegas, seed)
        self.lo, self.hi = (float(v) for v in context_range)
        self.bins = int(bins)
        self.context_key = context_key
        self.eta0, self.baseline, self.smoothing = float(eta0), bool(baseline), float(smoothing)
        self.inner = [TsallisINF(omegas, seed, eta0, baseline, smoothing) for _ in range(self.bins)]

    def config(self) -> dict:
        return {**super().config(), "context_range": [self.lo, self.hi], "bins": self.bins, "eta0": self.eta0,
                "baseline": self.baseline, "smoothing": self.smoothing, "context_key": self.context_key}

    def _bin(self, context) -> int:
        if context is None:
            raise ValueError(f"{self.name} needs a context value for every instance")
        z = (float(context) - self.lo) / (self.hi - self.lo)
        return min(max(int(z * self.bins), 0), self.bins - 1)

    def _probabilities(self, context):
        return self.inner[self._bin(context)]._probabilities()

    def _update(self, arm, cost, context, probabilities):
        self.inner[self._bin(context)]._update(arm, cost, None, probabilities)


@njit(cache=True)
def chebyshev_features(z: float, degree: int) -> np.ndarray:
    """[T_0(z), …, T_degree(z)] for z in [−1, 1] (clipped), by the three-term recurrence."""
    z = min(max(z, -1.0), 1.0)
    out = np.empty(degree + 1)
    out[0] = 1.0
    if degree >= 1:
        out[1] = z
    for j in range(2, degree + 1):
        out[j] = 2.0 * z * out[j - 1] - out[j - 2]
    return out


@njit(cache=True)
def _inverse_gap_weights(theta, phi, gamma):
    d = theta.shape[0]
    y = theta @ phi
    g = np.argmin(y)
    p = np.empty(d)
    rest = 0.0
    for i in range(d):
        if i != g:
            p[i] = 1.0 / (d + gamma * math.expm1(min(y[i] - y[g], 50.0)))
            rest += p[i]
    p[g] = 1.0 - rest
    return p


@njit(cache=True)
def _observe_and_refit(gram, moment, theta, arm, phi, y, smooth, global_mean, use_global):
    k = phi.shape[0]
    for r in range(k):
        moment[arm, r] += y * phi[r]
        for c in range(k):
            gram[arm, r, c] += phi[r] * phi[c]
    return _refit_toward_neighbours(gram, moment, theta, smooth, global_mean, use_global)


@njit(cache=True)
def _refit_toward_neighbours(gram, moment, theta, smooth, global_mean, use_global):
    """θ_i = argmin ‖X_i θ − y_i‖² + smooth ‖θ − prior_i‖², prior_i the mean of the neighbours' θ
    (or the global mean log cost as a constant, early on)."""
    d, k = theta.shape
    prior = np.zeros((d, k))
    if use_global or d == 1:
        prior[:, 0] = global_mean
    else:
        for i in range(d):
            if i == 0:
                prior[i] = theta[1]
            elif i == d - 1:
                prior[i] = theta[d - 2]
            else:
                prior[i] = 0.5 * (theta[i - 1] + theta[i + 1])
    out = np.empty_like(theta)
    chol = np.empty((k, k))
    for i in range(d):
        # Cholesky of gram_i + smooth·I (SPD), then two triangular solves
        for r in range(k):
            for c in range(r + 1):
                acc = gram[i, r, c] + (smooth if r == c else 0.0)
                for q in range(c):
                    acc -= chol[r, q] * chol[c, q]
                chol[r, c] = math.sqrt(acc) if r == c else acc / chol[c, c]
        v = moment[i] + smooth * prior[i]
        for r in range(k):
            acc = v[r]
            for q in range(r):
                acc -= chol[r, q] * out[i, q]
            out[i, r] = acc / chol[r, r]
        for r in range(k - 1, -1, -1):
            acc = out[i, r]
            for q in range(r + 1, k):
                acc -= chol[q, r] * out[i, q]
            out[i, r] = acc / chol[r, r]
    return out


class ChebCB(OmegaLearner):
    """SquareCB with a per-arm Chebyshev regression of log cost on the context.

    Arm i predicts ŷ_i(c) = θ_iᵀ T(c) (T = Chebyshev features of the context scaled to [−1, 1]) by
    least squares on its own rounds, regularised (strength ``smooth``) toward the mean of its grid
    neighbours' coefficients, so an arm with few rounds borrows the shape of the arms beside it.
    Exploration is inverse-gap weighted on relative predicted cost:
    p_i = 1/(d + γ_t (e^{ŷ_i − ŷ_min} − 1)) for every arm but the greedy one, which takes the rest;
    γ_t = γ₀ √(d t)."""

    name = "chebcb"
    contextual = True

    def __init__(self, omegas: Sequence[float] = DEFAULT_GRID, seed: int = 0, context_range=(0.0, 1.0),
                 degree: int = 7, gamma0: float = 10.0, smooth: float = 0.3, context_key: str | None = None):
        super().__init__(omegas, seed)
        self.lo, self.hi = (float(v) for v in context_range)
        if not self.hi > self.lo:
            raise ValueError("the context range must have lo < hi")
        self.degree, self.gamma0, self.smooth = int(degree), float(gamma0), float(smooth)
        self.context_key = context_key
        k = self.degree + 1
        self.gram = np.zeros((self.d, k, k))
        self.moment = np.zeros((self.d, k))
        self.log_sum = 0.0
        self.theta = np.zeros((self.d, k))
        self._cached: tuple[float, np.ndarray] | None = None  # the last context's features

    def config(self) -> dict:
        return {**super().config(), "context_range": [self.lo, self.hi], "degree": self.degree,
                "gamma0": self.gamma0, "smooth": self.smooth, "context_key": self.context_key}

    def _features(self, context) -> np.ndarray:
        if context is None:
            raise ValueError(f"{self.name} needs a context value for every instance")
        if self._cached is not None and self._cached[0] == context:
            return self._cached[1]
        phi = chebyshev_features(2.0 * (float(context) - self.lo) / (self.hi - self.lo) - 1.0, self.degree)
        self._cached = (context, phi)
        return phi

    def predict(self, context) -> np.ndarray:
        """Predicted log cost of every arm at ``context``."""
        return self.theta @ self._features(context)

    def _probabilities(self, context):
        if self.t == 0:
            return np.full(self.d, 1.0 / self.d)
        return _inverse_gap_weights(self.theta, self._features(context), self.gamma0 * math.sqrt(self.d * self.t))

    def _update(self, arm, cost, context, probabilities):
        phi = self._features(context)
        y = math.log(cost)
        self.log_sum += y
        self.theta = _observe_and_refit(self.gram, self.moment, self.theta, arm, phi, y, self.smooth,
                                        self.log_sum / self.t, self.t < 3)


def warm_up() -> None:
    """Load the compiled learner kernels now, so a loop's first round does not pay for it."""
    _tsallis_newton(np.zeros(2), 1.0, 1)
    _observe_and_refit(np.eye(2)[None].repeat(2, 0), np.zeros((2, 2)), np.zeros((2, 2)), 0, np.ones(2), 0.0, 1.0,
                       0.0, False)
    _inverse_gap_weights(np.zeros((2, 2)), chebyshev_features(0.0, 1), 1.0)
    _draw(np.ones(2), 0.5)
    _smoothed_importance_update(np.zeros(2), 0, 1.0, np.full(2, 0.5), 0.1)
    _fit_transforms(np.zeros(2), np.full(2, 0.5), 1)
    convergence_factor(np.geomspace(1.0, 1e-3, 12))


def make_learner(name: str, omegas: Sequence[float] = DEFAULT_GRID, seed: int = 0, context_range=(0.0, 1.0),
                 context_key: str | None = None, omega: float = 1.0, **opts) -> OmegaLearner:
    """A learner by name: tsallis-inf, tsallis-inf-cb, chebcb or fixed (with ``omega``)."""
    if name == "tsallis-inf":
        return TsallisINF(omegas, seed, **opts)
    if name == "tsallis-inf-cb":
        return TsallisINFBins(omegas, seed, context_range, context_key=context_key, **opts)
    if name == "chebcb":
        return ChebCB(omegas, seed, context_range, context_key=context_key, **opts)
    if name == "fixed":
        return FixedOmega(omega, seed)
    if name == "young":
        return YoungSOR(seed=seed, context_range=context_range, context_key=context_key, **opts)
    raise ValueError(f"unknown learner {name!r}; use one of {', '.join(LEARNERS)}")


def replay_table(learner: OmegaLearner, iterations: np.ndarray, contexts: np.ndarray | None = None) -> np.ndarray:
    """Run ``learner`` over a cost table (instances × its grid); returns the arm played per instance."""
    T = iterations.shape[0]
    arms = np.empty(T, dtype=np.int64)
    for t in range(T):
        c = None if contexts is None else float(contexts[t])
        a = learner.ask(c)
        arms[t] = a.index
        learner.tell(float(iterations[t, a.index]))
    return arms


class AdaptiveSOR:
    """Classical adaptive SOR as a policy over a sequence (not a grid learner): each solve starts at
    ω₀ = 1 + ``restart``·(ω_prev − 1), halfway back from where the previous solve ended (the residual
    estimate only ever raises ω, and Young's relation needs ω below the optimum), and adapts ω inside
    the solve (:func:`steptune.evaluators.linear.solvers.adaptive_sor`)."""

    name = "adaptive"
    contextual = False
    context_key = None

    def __init__(self, omega0: float = 1.0, restart: float = 0.5, window: int = 5, agree: float = 0.1,
                 omega_max: float = 1.99, seed: int = 0):
        self.omega0, self.restart, self.window, self.agree = float(omega0), float(restart), int(window), float(agree)
        self.omega_max, self.seed = float(omega_max), int(seed)
        self.last = self.omega0
        self.t = 0
        self.replay_mismatches = 0

    def config(self) -> dict:
        return {"learner": self.name, "seed": self.seed, "omega0": self.omega0, "restart": self.restart,
                "window": self.window, "agree": self.agree, "omega_max": self.omega_max}

    def context_of(self, ctx):
        return None

    def ask(self, context=None) -> Arm:
        start = self.omega0 if self.t == 0 else 1.0 + self.restart * (self.last - 1.0)
        return Arm(None, float(start))

    def tell(self, cost: float, final_omega: float | None = None, **_) -> None:
        if final_omega is not None:
            self.last = float(final_omega)
        self.t += 1

    def replay(self, rounds: Iterable) -> int:
        for r in rounds:
            self.ask()
            self.tell(r.cost, final_omega=r.omega)
        return 0


TRANSFORMS = ("log(1 - mu)", "1/mu - 1", "log(1/mu - 1)")  # what is regressed on the context (see _refit)


def _to_log1m_scalar(value: float, kind: int) -> float:
    if kind == 0:
        return min(value, 0.0)
    v = max(value, 1e-12) if kind == 1 else math.exp(min(value, 700.0))
    return math.log(v / (1.0 + v))


@njit(cache=True)
def _fit_transforms(z, mu, top):
    """(transform, θ, residual variance in log(1 − μ), (XᵀX)⁻¹) of the best of every transform × degree."""
    n = z.shape[0]
    X = np.empty((n, top + 1))
    for i in range(n):
        X[i] = chebyshev_features(z[i], top)
    y = np.log1p(-mu)
    best_var, best_kind = np.inf, 0
    best_theta = np.zeros(1)
    best_ginv = np.eye(1)
    for kind in range(3):
        if kind == 0:
            target = y.copy()
        else:
            target = 1.0 / np.maximum(mu, 1e-12) - 1.0
            if kind == 2:
                target = np.log(np.maximum(target, 1e-300))
        for k in range(1, top + 2):
            Xk = np.ascontiguousarray(X[:, :k])
            Ginv = np.linalg.inv(Xk.T @ Xk + 1e-9 * np.eye(k))
            theta = Ginv @ (Xk.T @ target)
            value = Xk @ theta
            rss = 0.0
            for i in range(n):
                if kind == 0:
                    fitted = min(value[i], 0.0)
                else:
                    v = max(value[i], 1e-12) if kind == 1 else math.exp(min(value[i], 700.0))
                    fitted = math.log(v / (1.0 + v))
                rss += (fitted - y[i]) ** 2
            var = rss / (n - k) if n - k >= 1 else 1.0
            if var < best_var * 0.95:
                best_var, best_kind, best_theta, best_ginv = var, kind, theta, Ginv
    return best_kind, best_theta, best_var, best_ginv


OFFSETS = (-0.3, -0.15, 0.0, 0.15, 0.3)  # log(2 − ω) − log(2 − ω_model): negative is a larger ω


class YoungSOR:
    """ω from Young's theory, with μ learned across solves from their residual histories.

    Each solve at ω gives an asymptotic factor λ (:func:`convergence_factor`) and through Young's relation
    a μ̂. Below the optimum that μ̂ is μ itself (for a consistently ordered matrix); at and above it every
    eigenvalue has modulus ω − 1 and μ̂ only bounds μ. A solve counts as an observation y = log(1 − μ̂) of
    the context's μ when it ran clearly below the optimum it implies, ω ≤ ω*(μ̂) − ``margin``·(2 − ω) (short
    solves read λ a little high, which makes a solve near the optimum look like one below it). One of
    :data:`TRANSFORMS` of μ (log(1 − μ); 1/μ − 1, linear in a diagonal shift; its log) is fitted on
    Chebyshev features of the scaled context (degree growing with the observations up to ``degree``; a
    constant without a context) by least squares, the transform and degree that fit best.

    ω is Young's optimum of y_pred + ``explore``·se, se the fit's standard error at the context: an
    uncertain μ is taken low, so ω errs low, where a solve is informative. The context range is cut into
    ``bins``; in a bin without an observation yet, or where se exceeds ``se_max``, the solve explores:
    μ is taken no higher than the lowest μ̂ the bin's solves have shown (each is an upper bound) and
    lowered by 4·``margin`` in y, far enough below the optimum to observe μ. Before the first
    observation ω = ``omega0`` (Gauss–Seidel), or, with a prior μ (:meth:`tell_prior`, Lanczos on the
    first system), its optimum lowered the same way.

    Where Young's relation does not hold the observed iterations miss the ones it predicts at the ω
    played: once their mean absolute log ratio over the last ``window`` solves of at least 15 iterations
    that played the fitted model (not exploring) exceeds ``miss``, a Tsallis-INF over :data:`OFFSETS`
    from the model's ω plays the last step (costs relative to the model's predicted iterations), and
    ``mode`` says so in every round."""

    name = "young"
    contextual = True

    def __init__(self, seed: int = 0, context_range=(0.0, 1.0), context_key: str | None = None,
                 omega0: float = 1.0, omega_max: float = 1.99, degree: int = 3, explore: float = 1.0,
                 margin: float = 0.08, se_max: float = 0.2, miss: float = 0.5, window: int = 30,
                 tol: float = 1e-8, prior: str = "none", prior_steps: int = 30, bins: int = 16):
        if prior not in ("none", "lanczos"):
            raise ValueError(f"prior {prior!r}: use none or lanczos")
        if not 0 <= degree <= 3:
            raise ValueError(f"degree {degree}: use 0 to 3")
        self.seed = int(seed)
        self.lo, self.hi = (float(v) for v in context_range)
        if not self.hi > self.lo:
            raise ValueError("the context range must have lo < hi")
        self.context_key = context_key
        self.omega0, self.omega_max = float(omega0), float(omega_max)
        self.degree, self.explore, self.margin, self.se_max = int(degree), float(explore), float(margin), float(se_max)
        self.miss, self.window, self.tol = float(miss), int(window), float(tol)
        self.prior, self.prior_steps = prior, int(prior_steps)
        self.bins = int(bins) if context_key is not None else 1
        self.bin_exact = np.zeros(self.bins, dtype=np.int64)
        self.bin_upper = np.ones(self.bins)
        self.obs_z: list[float] = []  # scaled contexts and μ of the solves that observed μ
        self.obs_mu: list[float] = []
        self.exact = 0
        self.prior_mu: float | None = None
        self.misses: list[float] = []
        self._miss_sum = 0.0  # over the last ``window`` misses
        self.offsets = TsallisINF(np.ones(len(OFFSETS)), seed)  # arms are OFFSETS; their ω is set per round
        self.t = 0
        self.replay_mismatches = 0
        self._fit: tuple | None = None
        self._prediction: tuple = (None, None)  # (context, predict(context)) of the last ask
        self._exploiting = False  # whether the last ask played the fitted model (its misses count)
        self._pending: tuple | None = None
        self.last: dict = {}

    def config(self) -> dict:
        return {"learner": self.name, "seed": self.seed, "context_range": [self.lo, self.hi],
                "context_key": self.context_key, "omega0": self.omega0, "omega_max": self.omega_max,
                "degree": self.degree, "explore": self.explore, "margin": self.margin, "se_max": self.se_max,
                "miss": self.miss, "window": self.window, "tol": self.tol, "prior": self.prior,
                "prior_steps": self.prior_steps, "bins": self.bins}

    @property
    def wants_prior(self) -> bool:
        """True when the next system should be probed for a prior μ (Lanczos, before any observation)."""
        return self.prior == "lanczos" and self.prior_mu is None and self.exact == 0

    @property
    def fallback(self) -> bool:
        """True while Young's predictions miss the observed iterations (the offset bandit plays)."""
        return len(self.misses) >= self.window and self._miss_sum > self.miss * self.window

    def context_of(self, ctx):
        if isinstance(ctx, dict):
            return None if self.context_key is None else ctx.get(self.context_key)
        return ctx

    def _refit(self) -> None:
        """Least squares of each :data:`TRANSFORMS` of μ on Chebyshev features of degree 0…``degree`` (at most
        one per six observations); keep the one whose residuals in log(1 − μ) have the least variance per
        degree of freedom."""
        top = min(self.degree, self.exact // 6) if self.context_key is not None else 0
        kind, theta, var, Ginv = _fit_transforms(np.asarray(self.obs_z), np.asarray(self.obs_mu), top)
        self._fit = (theta.tolist(), max(var, 4e-4), Ginv.tolist(), kind)  # plain floats: cheaper to evaluate

    def predict(self, context) -> tuple[float, float] | None:
        """(predicted log(1 − μ), its standard error) at ``context``, or None before any observation."""
        if self._fit is None:
            return None
        theta, var, Ginv, kind = self._fit
        z = self._z(context)
        phi = [1.0, z, 2.0 * z * z - 1.0, 4.0 * z * z * z - 3.0 * z][: len(theta)]  # T_0…T_3(z)
        y = sum(t * p for t, p in zip(theta, phi))
        quad = sum(p * sum(g * q for g, q in zip(row, phi)) for p, row in zip(phi, Ginv))
        return _to_log1m_scalar(y, kind), math.sqrt(var * max(quad, 0.0))

    def _z(self, context) -> float:
        if self.context_key is None or context is None:
            return 0.0
        return min(max(2.0 * (float(context) - self.lo) / (self.hi - self.lo) - 1.0, -1.0), 1.0)

    def _bin(self, context) -> int:
        if self.bins == 1 or context is None:
            return 0
        b = int((context - self.lo) * self.bins / (self.hi - self.lo))
        return 0 if b < 0 else (b if b < self.bins else self.bins - 1)

    def model_omega(self, context) -> float:
        """The model's ω at ``context`` (before any offset)."""
        p = self._prediction[1] if self._prediction[0] == context else self.predict(context)
        b = self._bin(context)
        if p is None and self.prior_mu is None and self.bin_upper[b] >= 1.0:
            return self.omega0
        if p is None:
            y = math.log(1.0 - min(self.prior_mu or 1.0, self.bin_upper[b], 1.0 - 1e-12)) + 4.0 * self.margin
        elif self.bin_exact[b] == 0 or p[1] > self.se_max:
            y = max(p[0] + self.explore * p[1], math.log(1.0 - min(self.bin_upper[b], 1.0 - 1e-12))) \
                + 4.0 * self.margin
        else:
            y = p[0] + self.explore * p[1]
        return min(optimal_omega(max(1.0 - math.exp(y), 0.0)), self.omega_max)

    def ask(self, context: float | None = None) -> Arm:
        if self.context_key is not None and context is None:
            raise ValueError(f"{self.name} needs a context value for every instance")
        p = self.predict(context)
        self._prediction = (context, p)
        self._exploiting = p is not None and self.bin_exact[self._bin(context)] > 0 and p[1] <= self.se_max
        base = self.model_omega(context)
        arm, omega = None, base
        if self.fallback:
            arm = self.offsets.ask(None).index
            omega = min(max(2.0 - (2.0 - base) * math.exp(OFFSETS[arm]), 0.5), self.omega_max)
        self._pending = (context, base, omega, arm)
        return Arm(arm, float(omega))

    def tell_prior(self, mu: float) -> None:
        """A prior μ for the rounds before the first observation (e.g. Lanczos on the first system)."""
        self.prior_mu = float(mu)

    def _predicted_iterations(self, omega: float, context) -> float | None:
        p = self._prediction[1] if self._prediction[0] == context else self.predict(context)
        mu = (1.0 - math.exp(p[0])) if p is not None else self.prior_mu
        if mu is None:
            return None
        return math.log(self.tol) / math.log(min(max(sor_factor(omega, mu), 1e-12), 1.0 - 1e-12))

    def tell(self, cost: float, residuals=None, factor: float | None = None, omega: float | None = None,
             **_) -> None:
        """Learn from a solve: its iterations and residual history (or the factor read off it before)."""
        if self._pending is None:
            raise RuntimeError("tell() without a pending ask()")
        ctx, base, played, arm = self._pending
        omega = played if omega is None else float(omega)
        lam = factor if factor is not None else (None if residuals is None else convergence_factor(residuals))
        self.last = {"factor": lam, "mode": "bandit" if arm is not None else "model"}
        cost = max(float(cost), 1.0)
        if cost >= 15 and self._exploiting:
            predicted = self._predicted_iterations(omega, ctx)
            if predicted is not None:
                self.misses.append(abs(math.log(cost / max(predicted, 1.0))))
                self._miss_sum += self.misses[-1] - (self.misses[-self.window - 1] if len(self.misses) > self.window
                                                     else 0.0)
        if arm is not None:
            reference = self._predicted_iterations(base, ctx)
            self.offsets.tell(cost / max(reference or cost, 1.0))
        self._observe(ctx, omega, lam)
        self.t += 1
        self._pending = None

    def _observe(self, context, omega: float, lam: float | None) -> None:
        if lam is None or not 1.0 <= omega < 2.0:
            return
        mu = jacobi_radius_from_factor(lam, omega)
        b = self._bin(context)
        if omega > optimal_omega(mu) - self.margin * (2.0 - omega):
            self.bin_upper[b] = min(self.bin_upper[b], mu)
        else:
            self.bin_exact[b] += 1
            self.obs_z.append(self._z(context))
            self.obs_mu.append(mu)
            self.exact += 1
            self._refit()

    def warm_start(self, rounds: Iterable) -> int:
        """Take the observations of another sequence's stored rounds (their ω, context and ``factor``), as if
        solved here; returns how many rounds carried a factor. The offset bandit and the miss record start
        afresh: they belong to the sequence being solved."""
        used = 0
        for r in rounds:
            ctx = r.context or {}
            c = self.context_of(ctx)
            if self.context_key is not None and c is None:
                raise ValueError(f"a warm-start round has no {self.context_key!r} in its context")
            if ctx.get("factor") is not None:
                self._observe(c, float(r.omega), float(ctx["factor"]))
                used += 1
        return used

    def replay(self, rounds: Iterable) -> int:
        """Rebuild the state from stored rounds (their context holds ``factor`` and any ``prior_mu``)."""
        mismatches = 0
        for r in rounds:
            ctx = r.context or {}
            if ctx.get("prior_mu") is not None:
                self.tell_prior(ctx["prior_mu"])
            asked = self.ask(self.context_of(ctx))
            if not math.isclose(asked.omega, r.omega, rel_tol=1e-9, abs_tol=1e-12):
                mismatches += 1
            self.tell(r.cost, factor=ctx.get("factor"), omega=r.omega)
        self.replay_mismatches += mismatches
        return mismatches
