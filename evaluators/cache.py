"""Content hashes for cache keys and fingerprints, and the on-disk cache files they name.

The digests name files written by earlier versions (references, network references, fitted mixtures),
so the bytes each one hashes are fixed: change none of them without a new cache version.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

Tensor = torch.Tensor


def content_digest(obj, *, compact: bool = True) -> str:
    """sha256 (hex) of ``obj`` as JSON with sorted keys; ``compact=False`` keeps json's default separators
    (", " and ": "), as the fitted-mixture cache names were made."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":") if compact else None)
    return hashlib.sha256(text.encode()).hexdigest()


def _float64_bytes(x: Tensor) -> bytes:
    return x.detach().to("cpu", torch.float64).contiguous().numpy().tobytes()


def tensor_sha256(x: Tensor) -> str:
    """sha256 of a tensor's values as float64 and its shape."""
    return hashlib.sha256(_float64_bytes(x) + repr(tuple(x.shape)).encode()).hexdigest()


def float64_sha256(*tensors: Tensor) -> str:
    """sha256 of the tensors' values as float64, one after the other (no shapes)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(_float64_bytes(t))
    return h.hexdigest()


def hash_tensor(h, name: str, v: Tensor) -> None:
    """Feed ``h`` a named tensor exactly as stored: name, shape, dtype and raw bytes."""
    t = v.detach().to("cpu").contiguous()
    h.update(name.encode() + repr(tuple(t.shape)).encode() + str(t.dtype).encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def atomic_torch_save(obj, path: str | Path) -> Path:
    """``torch.save(obj)`` to a temporary file beside ``path``, then renamed over it: readers never see a
    partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_cached(path: str | Path | None, read: Callable[[Any], Any] = lambda stored: stored):
    """``read`` of what ``path`` holds (tensors on the CPU), or None when there is no path or no file, or the
    file is damaged or foreign (``read`` fails or returns None): the caller then recomputes and overwrites it."""
    if path is None or not Path(path).is_file():
        return None
    try:
        return read(torch.load(path, map_location="cpu", weights_only=True))
    except Exception:
        return None
