"""Storage at scale: insert 100,000 trials into one study, then time the queries a search and the
dashboard make (best at one NFE, best per NFE, Pareto front, claim/finish, the lease reaper, loading
all trials to resume, the pandas frame). SQLite (a file under runs/bench/) and PostgreSQL (a fresh
schema on the server at --pg-url, default $STEPTUNE_TEST_PG_URL; skipped without one).
Target: best-per-NFE and Pareto under 200 ms at 100,000 trials. Also the CPU a search's driver spends in storage
per trial, as the runner writes and reads a batch of 20: added (their records returned), started and finished
in one ``record``, refreshed once after evaluation (``refresh``: what changed), each write with a request token
as the retrying store sends it and checked against the study's driver as a run's writes are (and once without that
check, to show what it costs).

    python bench/storage.py [--n 100000] [--pg-url postgresql+psycopg://user@host/db] [--repeats 5]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_databases, pg_url_default, save_json  # noqa: E402

from steptune.space import Schedule, noise, presets  # noqa: E402
from steptune.storage import connect, trials_frame  # noqa: E402
from steptune.storage.schema import utcnow  # noqa: E402

TARGET_MS = 200.0
NFES = list(range(3, 21))
SOLVERS = ("ddim", "dpm-solver++-2m", "dpm-solver++-3m", "unipc-bh2", "deis", "heun")


def _schedules():
    ns = noise.VPLinear()
    pool = []
    for name in SOLVERS:
        for nfe in NFES:
            for sp in ("logsnr", "time-uniform", "time-quadratic"):
                s = presets.build(name, nfe, ns, spacing=sp)
                if s.nfe in NFES:
                    pool.append(s.to_dict())
    return pool


def _items(n: int, seed: int = 0):
    rng = random.Random(seed)
    pool = _schedules()
    for i in range(n):
        d = pool[rng.randrange(len(pool))]
        status = "complete" if rng.random() < 0.9 else rng.choice(["failed", "pruned"])
        rmse = rng.lognormvariate(0, 0.5) / d["nfe"] ** 2
        yield {"schedule": d, "status": status, "metrics": {"rmse": rmse, "sw": 2 * rmse} if status == "complete"
               else {}, "error": "NonFiniteError: step 2" if status == "failed" else None,
               "fidelity": "cheap", "bank": "train", "n_samples": 256, "seconds": rng.uniform(0.1, 2.0),
               "worker": f"w{i % 8}"}


def _ms(fn, repeats: int) -> float:
    fn()  # warm caches (the dashboard asks the same queries over and over)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def run(url: str, n: int, repeats: int) -> dict:
    db = connect(url)
    db.create_study("bench", method="random", problem={"name": "bench", "noise": noise.VPLinear().to_dict()})
    items = list(_items(n))
    t = time.perf_counter()
    batch = 10_000
    for i in range(0, n, batch):
        db.add_trials("bench", items[i:i + batch])
    insert_s = time.perf_counter() - t
    t = time.perf_counter()
    for it in items[:200]:  # one transaction per trial, as a runner writes results
        db.add_trial("bench", it["schedule"], status="complete", metrics=it["metrics"])
    single_ms = (time.perf_counter() - t) / 200 * 1000
    db.add_trials("bench", [{"schedule": items[0]["schedule"]}] * 1000)  # a queue to claim from
    total = db.count_trials("bench")

    def claim_finish():
        c = db.claim("bench", "bench-worker")
        db.finish(c.id, metrics={"rmse": 1.0}, worker="bench-worker")

    res = {
        "trials": total,
        "insert_trials_per_s": n / insert_s,
        "insert_one_per_transaction_ms": single_ms,
        "best_one_nfe_ms": _ms(lambda: [db.best("bench", k) for k in NFES], repeats) / len(NFES),
        "best_per_nfe_ms": _ms(lambda: db.best_per_nfe("bench"), repeats),
        "pareto_ms": _ms(lambda: db.pareto("bench"), repeats),
        "claim_and_finish_ms": _ms(claim_finish, repeats),
        "reap_stale_ms": _ms(lambda: db.reap_stale(3600), repeats),
        "load_all_trials_s": _ms(lambda: db.trials("bench"), 1) / 1000,
        "trials_frame_s": _ms(lambda: trials_frame(db, "bench"), 1) / 1000,
    }
    res["driver_cpu_ms_per_trial"] = driver_cpu_ms(db, items, repeats)
    res["driver_cpu_ms_per_trial_unfenced"] = driver_cpu_ms(db, items, repeats, fenced=False)
    front = db.pareto("bench")
    res["pareto_points"] = len(front)
    res["best_per_nfe_points"] = len(db.best_per_nfe("bench"))
    db.close()
    return res


def driver_cpu_ms(db, items: list[dict], repeats: int, batch: int = 20, batches: int = 50,
                  fenced: bool = True) -> float:
    """CPU ms per trial of a dispatching driver's storage calls (median of ``repeats`` studies of ``batches``
    batches): ``add_trials(..., records=True)``, one ``record`` of the batch's starts and outcomes, one ``refresh``;
    with ``fenced``, the writes checked against the study's driver as a run's are."""
    scheds = [Schedule.from_dict(it["schedule"]) for it in items[:batch * batches]]
    for sc in scheds:
        sc.key()  # a searcher's candidates come keyed
    runs = []
    for r in range(repeats):
        study = f"driver-{r}" + ("" if fenced else "-unfenced")
        db.create_study(study, method="s3")
        db.claim_driver(study, "bench:1", 60)
        fence = {"fence": (study, "bench:1")} if fenced else {}
        c0 = time.thread_time()
        for b in range(batches):
            added = db.add_trials(study, [{"schedule": sc, "fidelity": "cheap", "bank": "train", "n_samples": 64,
                                           "info": {"batch": b, "origin": "mutation", "params": {}}}
                                          for sc in scheds[b * batch:(b + 1) * batch]],
                                  records=True, request=uuid.uuid4().hex, **fence)
            ids = [t.id for t in added]
            now = utcnow()
            db.record([(i, "driver/w0", now) for i in ids],
                      [{"trial_id": i, "status": "complete", "metrics": {"rmse": 0.1, "swd": 0.2, "nll": 1.5},
                        "seconds": 0.01, "worker": "driver/w0", "finished": now} for i in ids],
                      request=uuid.uuid4().hex, **fence)
            db.refresh(added)
        runs.append(1000 * (time.thread_time() - c0) / (batch * batches))
    return statistics.median(runs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--pg-url", default=pg_url_default())
    args = ap.parse_args()
    results = {}
    for backend, url in bench_databases("storage-bench", args.pg_url):
        print(f"{backend}: {args.n:,} trials ...", flush=True)
        results[backend] = run(url, args.n, args.repeats)

    rows = [("trials in the study", "trials", "{:,.0f}"),
            ("bulk insert (trials/s)", "insert_trials_per_s", "{:,.0f}"),
            ("insert, one per transaction (ms)", "insert_one_per_transaction_ms", "{:.2f}"),
            ("best(study, nfe) (ms)", "best_one_nfe_ms", "{:.2f}"),
            ("best per NFE, 18 NFEs (ms)", "best_per_nfe_ms", "{:.1f}"),
            ("Pareto front (ms)", "pareto_ms", "{:.1f}"),
            ("claim + finish (ms)", "claim_and_finish_ms", "{:.2f}"),
            ("reap_stale, none stale (ms)", "reap_stale_ms", "{:.2f}"),
            ("load all trials to resume (s)", "load_all_trials_s", "{:.2f}"),
            ("trials_frame (s)", "trials_frame_s", "{:.2f}"),
            ("a driver's storage CPU per trial (ms)", "driver_cpu_ms_per_trial", "{:.3f}"),
            ("  without the driver check of its writes", "driver_cpu_ms_per_trial_unfenced", "{:.3f}")]
    backends = list(results)
    print(f"\n{'':36}" + "".join(f"{b:>14}" for b in backends))
    for label, key, fmt in rows:
        print(f"{label:36}" + "".join(f"{fmt.format(results[b][key]):>14}" for b in backends))
    ok = {b: results[b]["best_per_nfe_ms"] < TARGET_MS and results[b]["pareto_ms"] < TARGET_MS for b in backends}
    print("\ntarget (best per NFE and Pareto < 200 ms): " + ", ".join(f"{b} {'met' if v else 'MISSED'}"
                                                                       for b, v in ok.items()))
    out = save_json("storage", {"n": args.n, "repeats": args.repeats, "target_ms": TARGET_MS, "results": results,
                                "target_met": ok})
    print(f"saved {out}")


if __name__ == "__main__":
    main()
