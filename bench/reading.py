"""The reading commands on a big study: a real search of gmm-2d (NFE 4, 5, 6) made into a study of --n trials by
adding copies of its train-bank trials with other scores (as a long search stores them), then each command run as
a user runs it, the installed ``steptune`` in a process of its own: its wall time and peak memory (the process's
maximum resident set). ``--help`` is the floor every command pays (Python, torch and the package imported).

    python bench/reading.py [--n 50000] [--repeats 2]

Writes runs/bench/reading.json; the database is runs/bench/reading.db, removed afterwards.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, save_json  # noqa: E402

from steptune.storage import connect  # noqa: E402

STEPTUNE = Path(sys.executable).parent / "steptune"
CHUNK = 5000


def build(url: str, n: int, folder: Path) -> int:
    """The study ``big`` with ``n`` trials or more: the search's own, then copies of its train-bank trials."""
    subprocess.run([str(STEPTUNE), "search", "--problem", "gmm-2d", "--nfe", "4,5,6", "--budget", "40", "--db", url,
                    "--study", "big", "--out", str(folder / "out"), "--cache", str(folder / "cache")], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rng = random.Random(0)
    with connect(url) as db:
        base = [t for t in db.trials("big") if t.fidelity == "train" and t.status == "complete"]
        left = n - db.count_trials("big")
        while left > 0:
            items = []
            for t in rng.choices(base, k=min(CHUNK, left)):
                score = t.score * (1 + rng.random())
                items.append({"schedule": t.schedule, "fidelity": t.fidelity, "bank": t.bank, "n_samples": t.n_samples,
                              "metrics": {**t.metrics, "rmse": score}, "score": score, "status": "complete",
                              "info": t.info, "seconds": t.seconds, "worker": t.worker})
            db.add_trials("big", items)
            left -= len(items)
        return db.count_trials("big")


def timed(argv: list[str]) -> tuple[float, float]:
    """Seconds and peak resident MB of one run of the command (its own process, waited for with its usage)."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {proc.returncode}")
    return seconds, usage.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50_000, help="trials in the study")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each command (the fastest is reported)")
    ap.add_argument("--name", default="reading")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{args.name}.db"
    url = f"sqlite:///{path}"
    with tempfile.TemporaryDirectory(prefix="steptune-reading-") as tmp:
        tmp = Path(tmp)
        try:
            path.unlink(missing_ok=True)
            trials = build(url, args.n, tmp)
            commands = {
                "--help": ["--help"],
                "studies": ["studies", "--db", url],
                "status": ["status", "--study", "big", "--db", url],
                "best": ["best", "--study", "big", "--db", url],
                "best --nfe 5": ["best", "--study", "big", "--nfe", "5", "--db", url],
                "export --nfe 5": ["export", "--study", "big", "--nfe", "5", "--db", url, "-o", str(tmp / "e.json")],
                "report": ["report", "--study", "big", "--db", url, "-o", str(tmp / "r.html")],
            }
            rows = []
            print(f"a study of {trials:,} trials (SQLite); fastest of {args.repeats} runs each")
            print(f"{'command':<16} {'seconds':>8} {'peak MB':>8}")
            for name, argv in commands.items():
                runs = [timed([str(STEPTUNE), *argv]) for _ in range(args.repeats)]
                seconds, mb = min(runs)
                rows.append({"command": name, "seconds": seconds, "peak_mb": mb, "runs": runs})
                print(f"{name:<16} {seconds:>8.2f} {mb:>8.0f}")
        finally:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
    print(f"saved {save_json(args.name, {'trials': trials, 'repeats': args.repeats, 'rows': rows})}")


if __name__ == "__main__":
    main()
