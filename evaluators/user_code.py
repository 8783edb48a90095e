"""Which code is the user's own (not Python's, an installed package's or steptune's): the files a plugged network's
cache keys follow, and where in them an error was raised."""

from __future__ import annotations

import functools
import importlib.util
import inspect
import sysconfig
import traceback
from pathlib import Path


@functools.cache
def installed_code() -> tuple[Path, ...]:
    """The folders of Python's own library, of installed packages and of steptune's packages."""
    paths = sysconfig.get_paths()
    ours = [importlib.util.find_spec(f"steptune{sub}").submodule_search_locations[0]
            for sub in ("", ".space", ".evaluators", ".search", ".storage")]
    return tuple(Path(p).resolve() for p in (paths["stdlib"], paths["purelib"], paths["platlib"], *ours))


def is_own(path: str | Path) -> bool:
    path = Path(path).resolve()
    return path.is_file() and not any(path.is_relative_to(p) for p in installed_code())


def own_source_file(obj) -> Path | None:
    """The file that defines ``obj`` (a function, a class, or an instance's class) where it is the user's own."""
    target = obj if inspect.isfunction(obj) or inspect.isclass(obj) or inspect.ismethod(obj) else type(obj)
    try:
        found = inspect.getsourcefile(target)
    except TypeError:  # built in
        return None
    return Path(found).resolve() if found is not None and is_own(found) else None


def where_raised(error: BaseException) -> str:
    """``file.py:line`` of the last frame of ``error``'s traceback in the user's own code (where there is one; else
    its last frame)."""
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return "?"
    at = next((f for f in reversed(frames) if is_own(f.filename)), frames[-1])
    return f"{Path(at.filename).name}:{at.lineno}"


def raised_text(error: BaseException) -> str:
    """What a network's error says to its user: the error and the line of their code that raised it (a
    :class:`NetworkOutputError` says all there is by itself)."""
    from steptune.space.errors import NetworkOutputError

    if isinstance(error, NetworkOutputError):
        return str(error)
    return f"the model raised {type(error).__name__}: {error} (at {where_raised(error)})"
