"""numba for the compiled loops (the linear solvers, S^3's trees, the SOR learners), with its cache of compiled
code kept in the user's cache folder (``$XDG_CACHE_HOME/steptune/numba``, or ``~/.cache/steptune/numba``) rather
than beside the installed sources: there it would be files the package manager does not know of, left behind by an
uninstall (a ``steptune`` folder that then hides a later install of the package), and unwritable in a read-only
installation. A ``NUMBA_CACHE_DIR`` the user set is kept."""

import os
from pathlib import Path

if not os.environ.get("NUMBA_CACHE_DIR"):
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    os.environ["NUMBA_CACHE_DIR"] = str(base / "steptune" / "numba")  # numba reads its settings again as it compiles

import numba  # noqa: E402

numba.config.CACHE_DIR = os.environ["NUMBA_CACHE_DIR"]  # where numba was imported before this

njit = numba.njit

__all__ = ["njit", "numba"]
