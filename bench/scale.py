"""How a search job scales with its evaluators: a plug-in model that waits a fixed latency per call and uses
no CPU meanwhile (bench/latency_model.py: 40 ms, so one NFE-5 evaluation is 200 ms of model time), searched
with S^3 at NFE 5 through the runner on the Ray backend, W = 1, 2, 4, 8, 16 evaluators, the job's default
settings (batch, in_flight). Targets: 8 evaluators >= 6.4x one, 16 >= 11x; projected 64-evaluator efficiency
>= 70%.

    python bench/scale.py [--workers 1,2,4,8,16] [--latency 0.04] [--seconds 12]

Evaluations/s is the search phase's, from the stored dispatch and finish times (the run's utilisation record).
The driver's cost per evaluation is the driver process's CPU time over the search phase (asking and telling the
searcher, storage writes, Ray bookkeeping) per evaluation. The projection to 64 and 256 evaluators is Amdahl's
law with that serial cost: rate(W) = 1 / (c + e / W), e the time of one evaluation on one evaluator; it is a
projection, not a measurement.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import OUT, save_json  # noqa: E402


def job(study: str, workers: int, evaluations: int, cache: str):
    from steptune.jobs import job_from_dict

    return job_from_dict({
        "study": study, "seed": 0,
        "problem": {"model": "latency_model:slow_gmm"},
        "search": {"method": "s3", "nfe": [5]},
        "evaluation": {"cheap_samples": 64, "train_samples": 64, "heldout_samples": 64, "confirm": 0,
                       "baseline": False, "cache": cache},
        "budget": {"evaluations": evaluations},
        # many evaluators on a 2-core machine: each asks a small share of a CPU (the model waits, it does not compute)
        "backend": {"kind": "ray", "workers": workers, "num_cpus": 0.1},
    })


def measure(workers: int, evaluations: int, cache: str, db: str) -> dict:
    import ray

    from steptune.backends import RayBackend
    from steptune.runner import Runner
    from steptune.storage import connect

    j = job(f"scale-{workers}", workers, evaluations, cache)
    backend = RayBackend(j.problem, j.evaluation, j.backend)
    cpu = {}

    def progress(st):  # the driver's CPU time from the first search result to the last
        if st["phase"] == "search":
            cpu.setdefault("first", (time.process_time(), st["done"]))
            cpu["last"] = (time.process_time(), st["done"])

    with connect(db) as storage:
        try:
            res = Runner(j, storage, backend, progress=progress).run()
        finally:
            backend.close()
            if ray.is_initialized():
                ray.shutdown()
    u = res.utilisation
    (c0, d0), (c1, d1) = cpu["first"], cpu["last"]
    return {"workers": workers, "evaluations": u["evaluations"], "batch": u["batch"], "seconds": u["seconds"],
            "per_second": u["per_second"], "busy": u["fraction"],
            "driver_seconds_per_eval": (c1 - c0) / max(1, d1 - d0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", default="1,2,4,8,16")
    ap.add_argument("--latency", type=float, default=0.04)
    ap.add_argument("--seconds", type=float, default=12.0, help="aimed length of each run at the ideal rate")
    args = ap.parse_args()
    os.environ["STEPTUNE_BENCH_LATENCY"] = str(args.latency)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])  # for the actors
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    eval_seconds = 5 * args.latency
    cache = str(OUT / "scale-cache")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for w in [int(x) for x in args.workers.split(",")]:
            n = max(40, int(args.seconds * w / eval_seconds))
            rows.append(measure(w, n, cache, f"sqlite:///{tmp}/scale.db"))
            r = rows[-1]
            print(f"W={w}: {r['per_second']:.2f} evaluations/s, batch {r['batch']}, busy {100 * r['busy']:.0f}%",
                  flush=True)
    one = next((r for r in rows if r["workers"] == 1), rows[0])
    base = one["per_second"] / one["workers"]
    for r in rows:
        r["speedup"] = r["per_second"] / base
        r["efficiency"] = r["speedup"] / r["workers"]
    c = max(rows, key=lambda r: r["workers"])["driver_seconds_per_eval"]  # the serial cost, at the largest batch
    e = 1.0 / base
    projection = [{"workers": w, "per_second": 1.0 / (c + e / w), "efficiency": (1.0 / (c + e / w)) / (w * base)}
                  for w in (64, 256)]
    print(f"\n{'W':>4} {'evals/s':>9} {'speedup':>8} {'efficiency':>10} {'batch':>6} {'busy':>6} "
          f"{'driver ms/eval':>15}")
    for r in rows:
        print(f"{r['workers']:>4} {r['per_second']:>9.2f} {r['speedup']:>7.2f}x {100 * r['efficiency']:>9.0f}% "
              f"{r['batch']:>6} {100 * r['busy']:>5.0f}% {1000 * r['driver_seconds_per_eval']:>15.2f}")
    print(f"projection (Amdahl, serial driver cost {1000 * c:.2f} ms per evaluation, "
          f"one evaluation {1000 * e:.0f} ms):")
    for p in projection:
        print(f"{p['workers']:>4} {p['per_second']:>9.1f} evaluations/s, efficiency {100 * p['efficiency']:.0f}%")
    path = save_json("scale", {"latency": args.latency, "rows": rows, "driver_seconds_per_eval": c,
                               "eval_seconds_one_evaluator": e, "projection": projection})
    plot(rows, projection, base)
    print(f"saved {path}")


def plot(rows, projection, base) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ws = [r["workers"] for r in rows]
    ax.plot(ws, [r["per_second"] for r in rows], "o-", label="measured")
    ax.plot(ws + [p["workers"] for p in projection], [w * base for w in ws + [p["workers"] for p in projection]],
            ":", color="grey", label="linear")
    ax.plot([p["workers"] for p in projection], [p["per_second"] for p in projection], "s--", label="projected")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("evaluators")
    ax.set_ylabel("evaluations / s")
    ax.legend()
    ax.set_title("S^3 search, NFE 5, 200 ms per evaluation")
    fig.tight_layout()
    fig.savefig(OUT / "scale.png", dpi=120)


if __name__ == "__main__":
    main()
