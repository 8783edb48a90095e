"""numba for the compiled loops (the linear solvers, S^3's trees, the SOR learners), with its cache of compiled
code kept in the user's cache folder (``$XDG_CACHE_HOME/steptune/numba``, or ``~/.cache/steptune/numba``) rather
than beside the installed sources: there it would be files the package manager does not know of, left behind by an
uninstall (a ``steptune`` folder that then hides a later install of the package), and unwritable in a read-only
installation. A ``NUMBA_CACHE_DIR`` the user set is kept."""

import os
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    """Where the compiled code is kept: ``$XDG_CACHE_HOME/steptune/numba``, else ``~/.cache/steptune/numba``; where
    that cannot be (a service account's home that does not exist, a read-only home), a folder of this user's in the
    temporary folder, so that no folder is made at the root of the file system and no compilation fails."""
    xdg, home = os.environ.get("XDG_CACHE_HOME"), Path.home()
    if xdg or home.is_dir():
        path = Path(xdg or home / ".cache") / "steptune" / "numba"
        try:
            path.mkdir(parents=True, exist_ok=True)
            if os.access(path, os.W_OK):
                return path
        except OSError:
            pass
    return Path(tempfile.gettempdir()) / f"steptune-{os.getuid() if hasattr(os, 'getuid') else 'user'}" / "numba"


if not os.environ.get("NUMBA_CACHE_DIR"):
    os.environ["NUMBA_CACHE_DIR"] = str(cache_dir())  # numba reads its settings again as it compiles

import numba  # noqa: E402

numba.config.CACHE_DIR = os.environ["NUMBA_CACHE_DIR"]  # where numba was imported before this

njit = numba.njit

__all__ = ["njit", "numba"]
