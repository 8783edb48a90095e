"""Cost tables: every instance of a sequence solved at every grid ω, once, so that any number of
policies and seeds can be replayed offline.

Replaying is exact when the initial guess does not depend on the policy (x0 = 0, as in the shifted
Laplacian). For warm-started sequences (the heat equation) the table warm-starts every ω from one
reference trajectory, the solution of the cheapest ω at each step; a policy's own trajectory differs
from it by at most the solver tolerance, so its iteration counts can differ by about one.
Solves run in parallel on numba threads (``threads``), and for sequences without warm starts
optionally as Ray tasks over instance ranges (``ray=True`` or a cluster address).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numba
import numpy as np

from . import kernels
from .solvers import DEFAULT_MAXITER, DEFAULT_TOL

DEFAULT_GRID = tuple(float(w) for w in np.linspace(1.0, 1.95, 20))


@dataclass
class CostTable:
    omegas: np.ndarray  # (d,)
    iterations: np.ndarray  # (T, d) int
    converged: np.ndarray  # (T, d) bool
    contexts: np.ndarray  # (T,) the sequence's context value per instance (NaN when it has none)
    identity: dict
    seconds: float = 0.0  # wall time to build

    def __len__(self) -> int:
        return self.iterations.shape[0]

    def best_fixed(self) -> tuple[int, float]:
        """(arm, mean iterations) of the best single grid ω in hindsight."""
        means = self.iterations.mean(axis=0)
        arm = int(np.argmin(means))
        return arm, float(means[arm])

    def instance_optimal(self) -> np.ndarray:
        """Per-instance minimum over the grid."""
        return self.iterations.min(axis=1)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, omegas=self.omegas, iterations=self.iterations, converged=self.converged,
                            contexts=self.contexts, identity=json.dumps(self.identity), seconds=self.seconds)
        return path

    @classmethod
    def load(cls, path: str | Path) -> CostTable:
        with np.load(path) as z:
            return cls(z["omegas"], z["iterations"], z["converged"], z["contexts"], json.loads(str(z["identity"])),
                       float(z["seconds"]))


def table_identity(seq, omegas, solver: str, tol: float, maxiter: int) -> dict:
    return {**seq.identity(), "solver": solver, "tol": tol, "maxiter": maxiter,
            "omegas": [round(float(w), 12) for w in omegas]}


def cache_path(folder: str | Path, identity: dict) -> Path:
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return Path(folder) / f"{identity['problem']}-{key}.npz"


def build_cost_table(seq, omegas=DEFAULT_GRID, *, solver: str = "sor", tol: float = DEFAULT_TOL,
                     maxiter: int = DEFAULT_MAXITER, threads: int | None = None, cache: str | Path | None = None,
                     progress: Callable[[int, int], None] | None = None, count: int | None = None,
                     ray: bool | str = False, chunks: int | None = None) -> CostTable:
    """The (instances × ω) iteration table of the first ``count`` (default: all) instances of ``seq``
    (loaded from ``cache`` when built before).

    ``ray``: build it as ``chunks`` Ray tasks over instance ranges (True: the running or a new local Ray
    instance; a string: the address of a cluster). Only for sequences whose initial guesses do not
    depend on earlier solves; a warm-started sequence follows one trajectory and is built here."""
    omegas = np.asarray(omegas, dtype=np.float64)
    count = len(seq) if count is None else min(int(count), len(seq))
    identity = {**table_identity(seq, omegas, solver, tol, maxiter), "count": count}
    path = cache_path(cache, identity) if cache is not None else None
    if path is not None and path.is_file():
        return CostTable.load(path)
    method = kernels.METHOD_CODES[solver]
    previous = numba.get_num_threads()
    if threads:
        numba.set_num_threads(min(int(threads), numba.config.NUMBA_NUM_THREADS))
    start = time.perf_counter()
    try:
        if ray and not getattr(seq, "warm_started", False):
            its, ok = _rows_on_ray(seq, count, omegas, method, tol, maxiter, ray, chunks)
        elif getattr(seq, "warm_started", False):
            its, ok = _table_by_instance(seq, count, omegas, method, tol, maxiter, progress)
        else:
            its, ok = table_rows(seq, 0, count, omegas, method, tol, maxiter, progress)
    finally:
        numba.set_num_threads(previous)
    key = getattr(seq, "context_key", None)
    contexts = np.full(count, np.nan)
    if key is not None:
        contexts = _contexts(seq, key)[:count]
    table = CostTable(omegas, its, ok, contexts, identity, time.perf_counter() - start)
    if path is not None:
        table.save(path)
    return table


def _contexts(seq, key) -> np.ndarray:
    if hasattr(seq, "context_values"):
        return seq.context_values()
    if hasattr(seq, "shifts"):
        return np.asarray(seq.shifts, dtype=np.float64)
    if hasattr(seq, "contexts"):
        return np.array([seq.contexts.get(p.name[: -len(p.suffix)], {}).get(key, np.nan) for p in seq.files])
    from .problems import heat_kappa

    return np.array([heat_kappa((t + 0.5) * seq.dt) for t in range(len(seq))])


def table_rows(seq, lo, hi, omegas, method, tol, maxiter, progress=None):
    """Rows lo…hi − 1 of the table of a sequence whose initial guesses do not depend on earlier solves."""
    if hasattr(seq, "shifts") and method != kernels.SSOR_PCG:
        base = seq.base
        its, ok = kernels.sor_table_shifted(base.indptr, base.indices, base.data, seq.shifts[lo:hi], seq.rhs[lo:hi],
                                            omegas, tol, maxiter, method == kernels.SSOR)
        if progress is not None:
            progress(hi, hi)
        return its, ok
    its = np.zeros((hi - lo, len(omegas)), dtype=np.int64)
    ok = np.zeros((hi - lo, len(omegas)), dtype=bool)
    for t in range(lo, hi):
        s = seq.system(t, None)
        x0 = np.zeros_like(s.b) if s.x0 is None else s.x0
        its[t - lo], ok[t - lo], _ = kernels.solve_each_omega(s.A.indptr, s.A.indices, s.A.data, 0.0, s.b, x0,
                                                              omegas, tol, maxiter, method)
        if progress is not None:
            progress(t + 1, hi)
    return its, ok


def _rows_on_ray(seq, count, omegas, method, tol, maxiter, address, chunks):
    import ray

    from steptune.evaluators.ray_start import init_ray

    started = False
    if not ray.is_initialized():
        init_ray(address if isinstance(address, str) else None)
        started = True
    try:
        chunks = chunks or max(1, int(ray.cluster_resources().get("CPU", 1)))
        bounds = np.linspace(0, count, chunks + 1).astype(int)
        task = ray.remote(num_cpus=1)(table_rows)
        refs = [task.remote(seq, lo, hi, omegas, method, tol, maxiter) for lo, hi in zip(bounds[:-1], bounds[1:])
                if hi > lo]
        parts = ray.get(refs)
    finally:
        if started:
            ray.shutdown()
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _table_by_instance(seq, T, omegas, method, tol, maxiter, progress):
    d = len(omegas)
    its = np.zeros((T, d), dtype=np.int64)
    ok = np.zeros((T, d), dtype=bool)
    state = seq.start(0)
    for t in range(T):
        s = seq.system(t, state)
        A = s.A
        x0 = np.zeros_like(s.b) if s.x0 is None else s.x0
        its[t], ok[t], xs = kernels.solve_each_omega(A.indptr, A.indices, A.data, 0.0, s.b, x0, omegas, tol,
                                                     maxiter, method)
        best = int(np.argmin(np.where(ok[t], its[t], np.iinfo(np.int64).max)))
        state = seq.advance(t, state, xs[best])
        if progress is not None:
            progress(t + 1, T)
    return its, ok
