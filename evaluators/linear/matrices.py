"""A user's sequence of linear systems from a folder.

Layout: one matrix per instance, ``NAME.mtx`` (Matrix Market) or ``NAME.npz`` (``scipy.sparse.save_npz``),
taken in name order; its right-hand side ``NAME.rhs.npy``, ``NAME.rhs.mtx`` or ``NAME.rhs.txt``; an
optional ``context.csv`` whose first column names the instance (NAME) and whose other columns are its
numeric context (e.g. ``name,kappa``); the first of them is what contextual learners see. Every
instance is checked when it is loaded: square, symmetric, finite, positive definite, a right-hand side
of the right length. A bad file stops the sequence there
with a :class:`LinearInputError` that names the file.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import scipy.io
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from .problems import LinearSystem

MATRIX_SUFFIXES = (".mtx", ".npz")
RHS_SUFFIXES = (".rhs.npy", ".rhs.mtx", ".rhs.txt")


class LinearInputError(ValueError):
    """A user-supplied system that cannot be solved by SOR; the message names the file."""


def check_spd(A: sp.csr_matrix, where: str) -> None:
    """Raise LinearInputError unless A is square, finite, symmetric and positive definite.

    Definiteness: a sparse LU with symmetric (fill-reducing) ordering and diagonal pivots only is an
    LDLᵀ factorisation; A is positive definite exactly when every pivot is positive."""
    if A.shape[0] != A.shape[1]:
        raise LinearInputError(f"{where}: the matrix is not square ({A.shape[0]}×{A.shape[1]})")
    if not np.all(np.isfinite(A.data)):
        raise LinearInputError(f"{where}: the matrix has NaN or infinite entries")
    scale = float(np.abs(A.data).max(initial=0.0))
    asym = abs(A - A.T)
    if asym.nnz and float(asym.max()) > 1e-12 * max(scale, 1e-300):
        raise LinearInputError(f"{where}: the matrix is not symmetric (max |A − Aᵀ| = {float(asym.max()):.3g}); "
                               "SOR tuning needs symmetric positive definite systems")
    diag = A.diagonal()
    if np.any(diag <= 0):
        i = int(np.argmax(diag <= 0))
        raise LinearInputError(f"{where}: the matrix is not positive definite (diagonal entry {i} is {diag[i]:.3g})")
    try:
        lu = spla.splu(A.tocsc(), permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0,
                       options={"SymmetricMode": True})
        pivots = lu.U.diagonal()
        definite = np.array_equal(lu.perm_r, lu.perm_c) and bool(np.all(pivots > 0))
    except RuntimeError:  # exactly singular
        definite = False
    if not definite:
        raise LinearInputError(f"{where}: the matrix is not positive definite (indefinite or singular)")


class MatrixFolder:
    """The systems in a folder (see the module docstring), loaded and checked one at a time."""

    warm_started = False

    def __init__(self, folder: str | Path, check: bool = True):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise LinearInputError(f"{self.folder}: no such folder")
        self.files = sorted(p for p in self.folder.iterdir()
                            if p.suffix in MATRIX_SUFFIXES and not p.name.endswith(RHS_SUFFIXES))
        if not self.files:
            raise LinearInputError(f"{self.folder}: no .mtx or .npz matrices in the folder")
        self.check = check
        self.contexts = self._read_contexts()
        self.context_key = next((k for c in self.contexts.values() for k in c), None)  # the first context column
        values = [c[self.context_key] for c in self.contexts.values() if self.context_key in c]
        self.context_range = (min(values), max(values)) if values else (0.0, 1.0)
        if self.context_range[0] == self.context_range[1]:
            self.context_range = (self.context_range[0] - 0.5, self.context_range[1] + 0.5)

    def identity(self) -> dict:
        return {"problem": "matrices", "folder": str(self.folder.resolve()), "count": len(self.files)}

    def __len__(self) -> int:
        return len(self.files)

    def _read_contexts(self) -> dict[str, dict]:
        path = self.folder / "context.csv"
        if not path.is_file():
            return {}
        out = {}
        with path.open(newline="") as f:
            rows = list(csv.reader(f))
        if not rows:
            return {}
        header = [h.strip() for h in rows[0]]
        for line, row in enumerate(rows[1:], start=2):
            if not row or not row[0].strip():
                continue
            try:
                values = {k: float(v) for k, v in zip(header[1:], row[1:])}
            except ValueError:
                raise LinearInputError(f"{path}: line {line} has a context value that is not a number") from None
            if not all(math.isfinite(v) for v in values.values()):
                raise LinearInputError(f"{path}: line {line} has a NaN or infinite context value")
            out[row[0].strip()] = values
        return out

    def start(self, t0: int = 0):
        return None

    def advance(self, t: int, state, x):
        return None

    def system(self, t: int, state=None) -> LinearSystem:
        path = self.files[t]
        stem = path.name[: -len(path.suffix)]
        A = _read_matrix(path)
        if self.check:
            check_spd(A, str(path))
        b = _read_rhs(self.folder, stem, A.shape[0], path)
        context = dict(self.contexts.get(stem, {}))
        if self.context_key is not None and self.context_key not in context:
            raise LinearInputError(f"{self.folder / 'context.csv'}: no {self.context_key!r} value for instance {stem} "
                                   f"({path.name})")
        return LinearSystem(A, b, context, None, path.name)


def _read_matrix(path: Path) -> sp.csr_matrix:
    try:
        M = sp.load_npz(path) if path.suffix == ".npz" else scipy.io.mmread(path)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's input error
        raise LinearInputError(f"{path}: cannot read the matrix ({type(e).__name__}: {e})") from None
    A = sp.csr_matrix(M, dtype=np.float64)
    A.sort_indices()
    return A


def _read_rhs(folder: Path, stem: str, n: int, matrix_path: Path) -> np.ndarray:
    for suffix in RHS_SUFFIXES:
        path = folder / f"{stem}{suffix}"
        if path.is_file():
            break
    else:
        raise LinearInputError(f"{matrix_path}: no right-hand side (expected {stem}.rhs.npy, .rhs.mtx or .rhs.txt)")
    try:
        if suffix == ".rhs.npy":
            b = np.load(path)
        elif suffix == ".rhs.mtx":
            b = scipy.io.mmread(path)
            b = b.toarray() if sp.issparse(b) else b
        else:
            b = np.loadtxt(path)
    except Exception as e:  # noqa: BLE001
        raise LinearInputError(f"{path}: cannot read the right-hand side ({type(e).__name__}: {e})") from None
    b = np.asarray(b, dtype=np.float64).ravel()
    if b.shape[0] != n:
        raise LinearInputError(f"{path}: the right-hand side has {b.shape[0]} entries, the matrix {n} rows")
    if not np.all(np.isfinite(b)):
        raise LinearInputError(f"{path}: the right-hand side has NaN or infinite entries")
    return np.ascontiguousarray(b)
