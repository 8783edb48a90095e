"""Output paths checked before any work, so a long command never fails at its last step on a path."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from steptune.cli.errors import CliError


def _writable_parent(path: Path, option: str) -> None:
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise CliError(f"{option} {path}: {ancestor} is a file, not a folder; choose another path")
    if not os.access(ancestor, os.W_OK):
        raise CliError(f"{option} {path}: cannot write in {ancestor}; choose another path")


def _named_validly(path: Path, option: str) -> None:
    """A path the file system cannot even look up (a name too long) is refused with its reason."""
    try:
        path.exists()
    except OSError as e:
        raise CliError(f"{option} {path}: {e.strerror or e}; choose another path") from None


STDOUT = Path("-")  # -o - : the standard output, as the command prints without -o


STEM_BYTES = 150  # a file name holds 255 bytes; the rest is for what follows the stem (-nfe10-scheduler.json)


def file_stem(name: str) -> str:
    """A study's name as the start of a file name in the folder it is written to: its path separators as ``_``, and a
    leading dot too (``../x`` and ``a/b`` name no file elsewhere); a name longer than ``STEM_BYTES`` in UTF-8 cut
    short, with a digest of it to keep two such names apart."""
    stem = name.replace("/", "_").replace("\\", "_")
    stem = "_" + stem[1:] if stem.startswith(".") else stem
    if len(stem.encode()) > STEM_BYTES:
        digest = hashlib.sha256(name.encode()).hexdigest()[:8]
        stem = stem.encode()[:STEM_BYTES - 9].decode(errors="ignore") + "-" + digest
    return stem


def output_file(path: Path, option: str, *, stdout: bool = False) -> Path:
    """``path`` when a file can be written there (its folders are made when it is written); with ``stdout``, ``-`` as
    it is (the caller prints)."""
    if path == STDOUT and stdout:
        return path
    _named_validly(path, option)
    if path.is_dir():
        raise CliError(f"{option} {path} is a folder; give a file name")
    if path.exists() and not os.access(path, os.W_OK):
        raise CliError(f"{option} {path} cannot be written; choose another path")
    _writable_parent(path, option)
    return path


def output_folder(path: Path, option: str) -> Path:
    """``path`` when it is, or can become, a folder to write in."""
    if path == STDOUT:
        raise CliError(f"{option} -: this export is a folder of files and cannot go to the standard output; give a "
                       "folder")
    _named_validly(path, option)
    if path.exists() and not path.is_dir():
        raise CliError(f"{option} {path} is a file; give a folder")
    if path.is_dir():
        if not os.access(path, os.W_OK):
            raise CliError(f"{option} {path}: cannot write in this folder; choose another")
        return path
    _writable_parent(path, option)
    return path
