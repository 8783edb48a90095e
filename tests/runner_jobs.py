"""Small job files, a job run into a database, and study comparisons shared by the runner tests."""

from __future__ import annotations

import tomllib
from pathlib import Path

from steptune.backends import LocalBackend
from steptune.runner import Runner
from steptune.storage import connect


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


def run_job(job, url: str, backend=None, progress=None, stop_after: int | None = None, stop_when=None):
    """Run ``job`` into the database at ``url`` on ``backend`` (in-process by default), then close the backend.
    ``stop_after`` interrupts the run, as SIGINT does, once that many search evaluations are done; ``stop_when``
    once it is true of the run's progress (its ``status()``). Returns the run's result and the runner (its searcher
    holds what it was told)."""
    backend = backend or LocalBackend(job.problem, job.evaluation, job.backend)

    def report(status: dict) -> None:
        if progress is not None:
            progress(status)
        if (stop_after is not None and status["phase"] == "search" and status["done"] >= stop_after
                or stop_when is not None and stop_when(status)):
            runner.interrupt()

    with connect(url) as db:
        runner = Runner(job, db, backend, progress=report)
        try:
            return runner.run(), runner
        finally:
            backend.close()


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """The CLI run in-process: its exit code and what it wrote to stdout and stderr."""
    from steptune.cli import main

    code = main(argv)
    c = capsys.readouterr()
    return code, c.out, c.err
