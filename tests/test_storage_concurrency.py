"""Two processes writing to one SQLite database at the same time lose nothing."""

import multiprocessing as mp
import time
from pathlib import Path

from steptune.space import noise, presets
from steptune.storage import connect

N_PER_WRITER = 60
NS = noise.VPLinear()


def _writer(url: str, me: str, n: int, gate: str) -> None:
    """One process: per iteration a complete trial, and a queued one that it (or the other process) claims
    and finishes; every call is its own transaction."""
    gate = Path(gate)
    db = connect(url)
    (gate / f"ready-{me}").touch()
    deadline = time.time() + 60
    while len(list(gate.glob("ready-*"))) < 2 and time.time() < deadline:  # start writing together
        time.sleep(0.005)
    for i in range(n):
        db.add_trial("shared", presets.ddim(3 + i % 5, NS), status="complete",
                     metrics={"rmse": i / 1000, "writer": me, "i": i}, worker=me)
        db.add_trial("shared", presets.ddim(3, NS), metrics={"writer": me, "i": i, "queued": True})
        t = db.claim("shared", me)
        db.finish(t.id, metrics={**t.metrics, "done_by": me}, worker=me)
    db.close()


def test_two_processes_writing_one_sqlite_file_lose_nothing(tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    db = connect(url)
    db.create_study("shared")
    gate = tmp_path / "gate"
    gate.mkdir()
    # spawn, not fork: earlier tests in this process may have left threads (Ray, torch, tokenizers) that a
    # forked child inherits in an unusable state; the gate still makes the two write at the same time
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(url, name, N_PER_WRITER, str(gate))) for name in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0, f"writer process failed with exit code {p.exitcode}"
    trials = db.trials("shared")
    assert len(trials) == 4 * N_PER_WRITER == db.get_study("shared").n_trials
    assert sorted(t.number for t in trials) == list(range(4 * N_PER_WRITER))
    direct = {(t.metrics["writer"], t.metrics["i"]): t for t in trials if not t.metrics.get("queued")}
    assert sorted(direct) == sorted((w, i) for w in "ab" for i in range(N_PER_WRITER))
    for (w, i), t in direct.items():
        assert t.status == "complete" and t.worker == w and t.score == i / 1000
        assert t.schedule == presets.ddim(3 + i % 5, NS).to_dict()
    queued = [t for t in trials if t.metrics.get("queued")]
    assert sorted((t.metrics["writer"], t.metrics["i"]) for t in queued) == sorted(direct)
    # every queued trial was claimed once and finished by the process that claimed it
    assert all(t.status == "complete" and t.attempts == 1 and t.metrics["done_by"] == t.worker for t in queued)
    # the two processes' writes interleaved (they ran at the same time)
    writers = [t.metrics["writer"] for t in sorted(trials, key=lambda t: t.number)]
    assert sum(a != b for a, b in zip(writers, writers[1:])) > 2
    db.close()
