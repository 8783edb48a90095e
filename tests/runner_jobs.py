"""Small job files and study comparisons shared by the runner tests."""

from __future__ import annotations

import tomllib
from pathlib import Path


def job_text(study: str, cache: Path, *, backend: str = "local", evaluations: int = 12, time: str | None = None,
             nfe: str = "[3, 4]", extra_backend: str = "") -> str:
    return f"""
study = "{study}"
seed = 3

[problem]
name = "gmm-2d"

[search]
method = "s3"
nfe = {nfe}

[evaluation]
cheap_samples = 32
train_samples = 64
heldout_samples = 128
confirm = 2
cache = "{cache}"

[budget]
evaluations = {evaluations}
{f'time = "{time}"' if time else ""}

[backend]
kind = "{backend}"
{extra_backend}
"""


def write_job(path: Path, study: str, cache: Path, **kw) -> Path:
    text = job_text(study, cache, **kw)
    tomllib.loads(text)
    path.write_text(text)
    return path


def outcome(storage, study: str) -> list[tuple]:
    """What a study found, independent of timing and workers: every trial's number, fidelity, schedule and
    result, in order."""
    return [(t.number, t.fidelity, t.key, t.status, tuple(sorted((t.metrics or {}).items())), t.info.get("batch"))
            for t in storage.trials(study)]
