"""Sequences of SPD linear systems: the shifted Laplacian, the 2-D heat equation, and closed forms.

A sequence hands out systems one at a time. Stateless sequences (the shifted Laplacian, a folder of
matrices) ignore ``state``; the heat equation's state is the previous time step's solution, which
is both its right-hand side's source and the next solve's warm start::

    state = seq.start(t0)
    for t in range(t0, len(seq)):
        system = seq.system(t, state)
        x = ...solve system...
        state = seq.advance(t, state, x)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

VARIANCES = {"low": (2.0, 6.0), "high": (0.5, 1.5)}  # Beta(a, b) of the shift, as in Learning to Relax


@dataclass(frozen=True)
class LinearSystem:
    """A x = b with an optional warm start and the context a learner may see. ``base`` and ``shift``
    describe A = base + shift·I when the sequence is a diagonal shift of one matrix."""

    A: sp.csr_matrix
    b: np.ndarray
    context: dict = field(default_factory=dict)
    x0: np.ndarray | None = None
    name: str = ""
    base: sp.csr_matrix | None = None
    shift: float = 0.0


def poisson_2d(m: int) -> sp.csr_matrix:
    """The 5-point Laplacian on an m×m interior grid (Dirichlet), unscaled: diagonal 4, neighbours −1."""
    T = sp.diags([-np.ones(m - 1), 2 * np.ones(m), -np.ones(m - 1)], [-1, 0, 1])
    I = sp.identity(m)
    A = (sp.kron(I, T) + sp.kron(T, I)).tocsr()
    A.sort_indices()
    return A


def jacobi_radius_poisson(m: int, shift: float = 0.0) -> float:
    """ρ(I − D⁻¹A) for the m×m 5-point Laplacian shifted by ``shift``: 4 cos(πh)/(4 + shift), h = 1/(m+1)."""
    return 4.0 * math.cos(math.pi / (m + 1)) / (4.0 + shift)


def optimal_omega(beta: float) -> float:
    """Young's optimum for a consistently ordered matrix with Jacobi radius β: 2/(1 + √(1 − β²))."""
    return 2.0 / (1.0 + math.sqrt(max(0.0, 1.0 - beta * beta)))


def truncated_gaussian(rng: np.random.Generator, n: int) -> np.ndarray:
    """A standard Gaussian vector conditioned on ‖b‖ ≤ √n (radially truncated)."""
    while True:
        b = rng.standard_normal(n)
        if b @ b <= n:
            return b


class ShiftedLaplacian:
    """A_t = A + c_t I, A the m×m 5-point Laplacian, c_t = −0.15 + 0.6·Beta(a, b) (low variance:
    Beta(2, 6); high: Beta(1/2, 3/2)), b_t radially truncated Gaussian, x0 = 0; context ``c``."""

    context_key = "c"
    context_range = (-0.15, 0.45)
    warm_started = False

    def __init__(self, steps: int = 5000, m: int = 10, variance: str = "high", seed: int = 0):
        if variance not in VARIANCES:
            raise ValueError(f"variance {variance!r}: use low or high")
        self.steps, self.m, self.variance, self.seed = int(steps), int(m), variance, int(seed)
        self.base = poisson_2d(self.m)
        rng = np.random.default_rng([self.seed, 8])
        a, b = VARIANCES[variance]
        self.shifts = -0.15 + 0.6 * rng.beta(a, b, size=self.steps)
        n = self.m * self.m
        self.rhs = np.stack([truncated_gaussian(rng, n) for _ in range(self.steps)])

    def identity(self) -> dict:
        return {"problem": "shifted-laplacian", "m": self.m, "variance": self.variance, "steps": self.steps,
                "seed": self.seed}

    def __len__(self) -> int:
        return self.steps

    def start(self, t0: int = 0):
        return None

    def system(self, t: int, state=None) -> LinearSystem:
        c = float(self.shifts[t])
        A = (self.base + c * sp.identity(self.base.shape[0], format="csr")).tocsr()
        A.sort_indices()
        return LinearSystem(A, self.rhs[t], {"c": c}, None, f"instance {t}", self.base, c)

    def advance(self, t: int, state, x):
        return None

    def optimal_omega(self, t: int) -> float:
        return optimal_omega(jacobi_radius_poisson(self.m, float(self.shifts[t])))


def heat_kappa(t: float) -> float:
    """Time-varying diffusivity max(0.1 sin 2πt, −10 sin 2πt) (Learning to Relax, heat example)."""
    s = math.sin(2.0 * math.pi * t)
    return max(0.1 * s, -10.0 * s)


class Heat2D:
    """u_t = κ(t) Δu + f on [0, 1]², Dirichlet 0, 5-point differences with h = 1/n_x (n = (n_x − 1)²
    unknowns), Crank–Nicolson with step dt: A_t = I + (κ dt / 2h²) P, b_t = (I − (κ dt / 2h²) P) u + dt f,
    κ and f at the step's midpoint, P the unscaled 5-point Laplacian. Initial state: a Gaussian bump at
    the centre; forcing: a bump circling the centre once per unit time. Each solve is warm-started from
    the previous step's solution; context ``kappa``."""

    context_key = "kappa"
    context_range = (0.0, 10.0)
    warm_started = True

    def __init__(self, nx: int = 100, steps: int = 5000, dt: float = 1e-3):
        if not 4 <= nx <= 2000:
            raise ValueError(f"nx {nx}: use a grid between 4 and 2000 cells across")
        self.nx, self.steps, self.dt = int(nx), int(steps), float(dt)
        self.m = self.nx - 1
        self.h = 1.0 / self.nx
        self.P = poisson_2d(self.m)
        self.I = sp.identity(self.m * self.m, format="csr")
        g = np.arange(1, self.nx) * self.h
        self.X, self.Y = (a.ravel() for a in np.meshgrid(g, g, indexing="ij"))

    def identity(self) -> dict:
        return {"problem": "heat2d", "nx": self.nx, "steps": self.steps, "dt": self.dt}

    def __len__(self) -> int:
        return self.steps

    def _bump(self, cx: float, cy: float, width: float) -> np.ndarray:
        return np.exp(-((self.X - cx) ** 2 + (self.Y - cy) ** 2) / (2.0 * width * width))

    def forcing(self, t: float) -> np.ndarray:
        a = 2.0 * math.pi * t
        return 10.0 * self._bump(0.5 + 0.25 * math.cos(a), 0.5 + 0.25 * math.sin(a), 0.05)

    def start(self, t0: int = 0) -> np.ndarray:
        """The state before step ``t0`` (marched with an accurate solve when resuming mid-sequence)."""
        from .kernels import ssor_pcg

        u = self._bump(0.5, 0.5, 0.1)
        for t in range(t0):
            s = self.system(t, u)
            x = u.copy()
            ssor_pcg(s.A.indptr, s.A.indices, s.A.data, x, s.b, 1.5, 0.0, 1e-10, 10_000)
            u = x
        return u

    def system(self, t: int, state: np.ndarray) -> LinearSystem:
        tm = (t + 0.5) * self.dt
        kappa = heat_kappa(tm)
        s = kappa * self.dt / (2.0 * self.h * self.h)
        A = (self.I + s * self.P).tocsr()
        A.sort_indices()
        b = state - s * (self.P @ state) + self.dt * self.forcing(tm)
        return LinearSystem(A, b, {"kappa": kappa}, state, f"step {t}")

    def advance(self, t: int, state, x):
        return x

    def optimal_omega(self, t: int) -> float:
        """Young's ω* for SOR on this step's matrix (for SSOR-PCG the best ω differs; search it)."""
        s = heat_kappa((t + 0.5) * self.dt) * self.dt / (self.h * self.h) / 2.0
        return optimal_omega(4.0 * s * math.cos(math.pi * self.h) / (1.0 + 4.0 * s))


class RepeatedPoisson:
    """The model problem repeated: the m×m Poisson matrix with one right-hand side, ``steps`` times."""

    context_key = None
    context_range = (0.0, 1.0)
    warm_started = False

    def __init__(self, m: int = 32, steps: int = 1000, seed: int = 0):
        self.m, self.steps, self.seed = int(m), int(steps), int(seed)
        self.A = poisson_2d(self.m)
        self.b = np.random.default_rng([self.seed, 8]).standard_normal(self.m * self.m)

    def identity(self) -> dict:
        return {"problem": "poisson", "m": self.m, "steps": self.steps, "seed": self.seed}

    def __len__(self) -> int:
        return self.steps

    def start(self, t0: int = 0):
        return None

    def system(self, t: int, state=None) -> LinearSystem:
        return LinearSystem(self.A, self.b, {}, None, f"instance {t}", self.A, 0.0)

    def advance(self, t: int, state, x):
        return None

    def optimal_omega(self, t: int = 0) -> float:
        return 2.0 / (1.0 + math.sin(math.pi / (self.m + 1)))
