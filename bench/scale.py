"""How a search job scales with its evaluators: a plug-in model that waits a fixed latency per call and uses
no CPU meanwhile (bench/latency_model.py: 40 ms, so one NFE-5 evaluation is 200 ms of model time), searched
with S^3 at NFE 5 through the runner on the Ray backend, W = 1, 2, 4, 8, 16 evaluators, the job's default
settings (batch, in_flight). Targets: 8 evaluators >= 6.4x one, 16 >= 11x; projected 64-evaluator efficiency
>= 70%.

    python bench/scale.py [--workers 1,2,4,8,16] [--latency 0.04] [--seconds 12]

Evaluations/s is the search phase's, from the stored dispatch and finish times (the run's utilisation record).
The driver's cost per evaluation is the driver process's CPU time over the search phase per evaluation, less the
S^3 predictor fits (which run in the searcher's background thread, beside the driver: a stage of their own),
split into the searcher's ask and tell and the storage calls (the main thread's CPU time in each) and the rest
(Ray bookkeeping, the backend's loop, progress, Ray's own threads in the driver). It falls with the batch (the
searcher's fit is per batch): c(B) = a + k / B is fitted to the measured rows, for the whole driver and for the
driver outside the searcher. The projection to 64 and 256 evaluators (batch
W x in_flight) takes the driver as the serial part. With the searcher a batch ahead (the default on Ray) the
driver works while the evaluators do, so rate(W) = min(W / e, 1 / c(B), 1 / f(B)), f the fit thread's cost per
evaluation fitted the same way; without it, Amdahl's law,
rate(W) = 1 / (c(B) + e / W); e is one evaluation's time on one evaluator. Both are projections, not
measurements.
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
    parts = {"searcher": 0.0, "storage": 0.0}  # the main thread's CPU seconds in each, over the search phase

    def progress(st):  # the driver's CPU time from the first search result to the last
        if st["phase"] == "search":
            fits = getattr(runner.searcher, "background_fit_cpu_seconds", 0.0)
            now = (time.process_time(), st["done"], {**parts, "fits": fits})
            cpu.setdefault("first", now)
            cpu["last"] = now

    def timed(part, fn):
        def call(*args, **kwargs):
            t = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                parts[part] += time.thread_time() - t
        return call

    with connect(db) as storage:
        for name in STORAGE_CALLS:
            setattr(storage, name, timed("storage", getattr(storage, name)))
        runner = Runner(j, storage, backend, progress=progress)
        try:
            runner.prepare()
            runner.searcher.ask = timed("searcher", runner.searcher.ask)
            runner.searcher.tell = timed("searcher", runner.searcher.tell)
            res = runner.run()
        finally:
            backend.close()
            if ray.is_initialized():
                ray.shutdown()
    u = res.utilisation
    (c0, d0, p0), (c1, d1, p1) = cpu["first"], cpu["last"]
    n = max(1, d1 - d0)
    fits = (p1["fits"] - p0["fits"]) / n
    total = (c1 - c0) / n - fits  # the fits run beside the driver, in the searcher's background thread
    searcher, stored = (p1["searcher"] - p0["searcher"]) / n, (p1["storage"] - p0["storage"]) / n
    return {"workers": workers, "evaluations": u["evaluations"], "batch": u["batch"], "seconds": u["seconds"],
            "per_second": u["per_second"], "busy": u["fraction"], "driver_seconds_per_eval": total,
            "searcher_seconds_per_eval": searcher, "storage_seconds_per_eval": stored,
            "other_seconds_per_eval": total - searcher - stored, "fit_thread_seconds_per_eval": fits}


# the storage calls a search makes (the runner's writes and reads of trials)
STORAGE_CALLS = ("add_trials", "record", "requeue", "trials", "get_study", "update_study_config")


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
    import numpy as np

    e = 1.0 / base
    fit_rows = [r for r in rows if r["batch"] > 4] or rows  # beyond the searcher's own minimum batch

    def fit(key):  # cost per evaluation c(B) = a + k / B over the measured batches
        A = np.array([[1.0, 1.0 / r["batch"]] for r in fit_rows])
        return np.linalg.lstsq(A, np.array([r[key] for r in fit_rows]), rcond=None)[0]

    a, k = fit("driver_seconds_per_eval")
    a_out, k_out = fit("driver_seconds_per_eval") - fit("searcher_seconds_per_eval")
    a_fit, k_fit = fit("fit_thread_seconds_per_eval")
    from steptune.jobs import BackendSpec

    in_flight = BackendSpec().in_flight  # the default the runs above used
    projection = []
    for w in (64, 256):
        c, c_out = max(a + k / (w * in_flight), 0.0), max(a_out + k_out / (w * in_flight), 1e-12)
        c_fit = max(a_fit + k_fit / (w * in_flight), 1e-12)  # the fit thread: a stage beside the driver's own
        overlapped, serial = min(w / e, 1.0 / c if c > 0 else np.inf, 1.0 / c_fit), 1.0 / (c + e / w)
        alone = min(w / e, 1.0 / c_out)
        projection.append({"workers": w, "batch": w * in_flight, "driver_seconds_per_eval": c,
                           "fit_thread_seconds_per_eval": c_fit,
                           "per_second": overlapped, "efficiency": overlapped / (w * base),
                           "per_second_without_lookahead": serial, "efficiency_without_lookahead": serial / (w * base),
                           "driver_outside_searcher_seconds_per_eval": c_out,
                           "efficiency_driver_outside_searcher": alone / (w * base)})
    print(f"\n{'W':>4} {'evals/s':>9} {'speedup':>8} {'efficiency':>10} {'batch':>6} {'busy':>6} "
          f"{'driver ms/eval':>15} {'searcher':>9} {'storage':>8} {'other':>6} {'fits':>6}")
    for r in rows:
        print(f"{r['workers']:>4} {r['per_second']:>9.2f} {r['speedup']:>7.2f}x {100 * r['efficiency']:>9.0f}% "
              f"{r['batch']:>6} {100 * r['busy']:>5.0f}% {1000 * r['driver_seconds_per_eval']:>15.2f} "
              f"{1000 * r['searcher_seconds_per_eval']:>9.2f} {1000 * r['storage_seconds_per_eval']:>8.2f} "
              f"{1000 * r['other_seconds_per_eval']:>6.2f} {1000 * r['fit_thread_seconds_per_eval']:>6.2f}")
    print(f"projection (driver cost per evaluation c(B) = {1000 * a:.2f} ms + {1000 * k:.0f} ms / B, of which "
          f"outside the searcher {1000 * a_out:.2f} ms + {1000 * k_out:.0f} ms / B; one evaluation {1000 * e:.0f} ms):")
    for p in projection:
        print(f"{p['workers']:>4} evaluators, batch {p['batch']}: driver {1000 * p['driver_seconds_per_eval']:.2f} "
              f"ms/eval, fit thread {1000 * p['fit_thread_seconds_per_eval']:.2f} ms/eval; a batch ahead "
              f"{p['per_second']:.1f} evaluations/s, efficiency {100 * p['efficiency']:.0f}%; "
              f"without {p['per_second_without_lookahead']:.1f}/s, {100 * p['efficiency_without_lookahead']:.0f}%; "
              f"the driver outside the searcher alone ({1000 * p['driver_outside_searcher_seconds_per_eval']:.2f} "
              f"ms/eval) would allow {100 * p['efficiency_driver_outside_searcher']:.0f}%")
    path = save_json("scale", {"latency": args.latency, "rows": rows, "driver_fit": {"a": a, "k": k},
                               "driver_outside_searcher_fit": {"a": a_out, "k": k_out},
                               "fit_thread_fit": {"a": a_fit, "k": k_fit},
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
