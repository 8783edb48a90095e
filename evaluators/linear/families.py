"""Short parameter sweeps of SPD systems (300 instances by default), one operator family each, with a
context per instance and x0 = 0 (so a cost table replays them exactly):

* ``laplace3d``: implicit-Euler heat in 3-D, A = s·I + P₃ (P₃ the 7-point Laplacian on an m³ grid),
  s = h²/(κ dt), dt = 10⁻³, κ log-uniform in [0.1, 1000]; context ``log10_kappa``.
* ``anisotropic``: ε ∂xx + ∂yy by 5-point differences on a 3m × m grid, log₁₀ ε drifting from −2 to 2
  and back with noise (strong anisotropy both ways); context ``log10_eps``.
* ``reaction``: −Δu + σ r(x, y) u on an m × m grid, r = 1 + x + y a variable reaction rate, σ
  log-uniform; context ``log10_sigma``.
* ``ninepoint``: the 9-point Laplacian (8 at the centre, −1 at the eight neighbours) plus a shift c·I on
  an m × m grid, c uniform; not consistently ordered, so Young's relation is only approximate; context ``c``.

Every family but ``ninepoint`` is consistently ordered (natural ordering of a 5- or 7-point stencil),
so SOR follows Young's theory with the Jacobi radius μ, which is known in closed form for the constant-
coefficient ones (``jacobi_radius``). Seeds change the contexts and right-hand sides.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp

from .problems import LinearSystem, poisson_2d, truncated_gaussian

FAMILIES = ("laplace3d", "anisotropic", "reaction", "ninepoint")
DEFAULT_SIDES = {"laplace3d": 10, "anisotropic": 10, "reaction": 20, "ninepoint": 16}


def second_difference(m: int) -> sp.csr_matrix:
    """tridiag(−1, 2, −1) of size m."""
    return sp.diags([-np.ones(m - 1), 2 * np.ones(m), -np.ones(m - 1)], [-1, 0, 1], format="csr")


def laplace_3d(m: int) -> sp.csr_matrix:
    """The 7-point Laplacian on an m×m×m interior grid, unscaled (diagonal 6)."""
    T, I = second_difference(m), sp.identity(m, format="csr")
    return (sp.kron(sp.kron(T, I), I) + sp.kron(sp.kron(I, T), I) + sp.kron(sp.kron(I, I), T)).tocsr()


def anisotropic_2d(mx: int, my: int, eps: float) -> sp.csr_matrix:
    """−(ε ∂xx + ∂yy), 5-point, unscaled, on an mx × my interior grid (x the slow index)."""
    return (eps * sp.kron(second_difference(mx), sp.identity(my)) +
            sp.kron(sp.identity(mx), second_difference(my))).tocsr()


def nine_point(m: int) -> sp.csr_matrix:
    """8 at the centre, −1 at the eight neighbours, on an m × m interior grid."""
    T = sp.diags([np.ones(m - 1), np.ones(m), np.ones(m - 1)], [-1, 0, 1])
    return (9.0 * sp.identity(m * m) - sp.kron(T, T)).tocsr()


def _sorted(A) -> sp.csr_matrix:
    A = sp.csr_matrix(A, dtype=np.float64)
    A.sort_indices()
    return A


class OperatorFamily:
    """``steps`` systems A(context_t) x = b_t of one family (see the module docstring)."""

    warm_started = False

    def __init__(self, family: str, steps: int = 300, m: int | None = None, seed: int = 0):
        if family not in FAMILIES:
            raise ValueError(f"unknown family {family!r}; use one of {', '.join(FAMILIES)}")
        self.family, self.steps, self.seed = family, int(steps), int(seed)
        self.m = int(m) if m else DEFAULT_SIDES[family]
        if not 2 <= self.m <= (64 if family == "laplace3d" else 400):
            raise ValueError(f"--m {self.m}: too small or too large a grid for {family}")
        rng = np.random.default_rng([self.seed, 18, FAMILIES.index(family)])
        u = rng.random(self.steps)
        if family == "laplace3d":
            self.context_key, self.context_range = "log10_kappa", (-1.0, 3.0)
            self.base = laplace_3d(self.m)
            self.values = -1.0 + 4.0 * u
        elif family == "anisotropic":
            self.context_key, self.context_range = "log10_eps", (-2.5, 2.5)
            phase = np.linspace(0.0, 2.0 * math.pi, self.steps, endpoint=False)
            self.values = np.clip(2.0 * np.sin(phase + rng.uniform(0, 2 * math.pi)) + 0.25 * rng.standard_normal(
                self.steps), -2.5, 2.5)
        elif family == "reaction":
            self.context_key, self.context_range = "log10_sigma", (-1.0, 3.0)
            self.values = -1.0 + 4.0 * u
            self.base = poisson_2d(self.m)
            g = np.arange(1, self.m + 1) / (self.m + 1)
            X, Y = (a.ravel() for a in np.meshgrid(g, g, indexing="ij"))
            self.rate = 1.0 + X + Y
        else:
            self.context_key, self.context_range = "c", (0.0, 2.0)
            self.base = nine_point(self.m)
            self.values = 2.0 * u
        n = self._n()
        self.rhs = np.stack([truncated_gaussian(rng, n) for _ in range(self.steps)])

    def _n(self) -> int:
        return {"laplace3d": self.m ** 3, "anisotropic": 3 * self.m * self.m}.get(self.family, self.m * self.m)

    def identity(self) -> dict:
        return {"problem": self.family, "m": self.m, "steps": self.steps, "seed": self.seed}

    def __len__(self) -> int:
        return self.steps

    def context_values(self) -> np.ndarray:
        return np.asarray(self.values, dtype=np.float64)

    def matrix(self, t: int) -> sp.csr_matrix:
        v = float(self.values[t])
        n = self._n()
        if self.family == "laplace3d":
            h = 1.0 / (self.m + 1)
            return _sorted(self.base + (h * h / (10.0 ** v * 1e-3)) * sp.identity(n))
        if self.family == "anisotropic":
            return _sorted(anisotropic_2d(3 * self.m, self.m, 10.0 ** v))
        if self.family == "reaction":
            h = 1.0 / (self.m + 1)
            return _sorted(self.base + sp.diags(10.0 ** v * h * h * self.rate))
        return _sorted(self.base + v * sp.identity(n))

    def start(self, t0: int = 0):
        return None

    def system(self, t: int, state=None) -> LinearSystem:
        v = float(self.values[t])
        return LinearSystem(self.matrix(t), self.rhs[t], {self.context_key: v}, None, f"instance {t}")

    def advance(self, t: int, state, x):
        return None

    def jacobi_radius(self, t: int) -> float | None:
        """ρ(I − D⁻¹A) in closed form where there is one (constant coefficients), else None."""
        v = float(self.values[t])
        if self.family == "laplace3d":
            h = 1.0 / (self.m + 1)
            s = h * h / (10.0 ** v * 1e-3)
            return 6.0 * math.cos(math.pi * h) / (6.0 + s)
        if self.family == "anisotropic":
            eps = 10.0 ** v
            return (eps * math.cos(math.pi / (3 * self.m + 1)) + math.cos(math.pi / (self.m + 1))) / (1.0 + eps)
        return None
