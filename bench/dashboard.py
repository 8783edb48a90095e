"""Dashboard endpoints at scale: a database of 50,000 trials on one problem (four searched studies as
`steptune run` stores them, a preset study, an imported schedule), then the time each endpoint takes
through the web app (routing, query, JSON) with FastAPI's test client. SQLite (a file under
runs/bench/) and PostgreSQL (a fresh schema on the server at --pg-url, default $STEPTUNE_TEST_PG_URL;
skipped without one). Target: the front's data endpoint under 300 ms at 50,000 trials.

    python bench/dashboard.py [--n 50000] [--repeats 15] [--pg-url postgresql+psycopg://user@host/db]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_databases, pg_url_default, save_json  # noqa: E402

from steptune.space import noise, presets  # noqa: E402
from steptune.storage import connect  # noqa: E402

TARGET_MS = 300.0
NFES = list(range(3, 21))
SOLVERS = ("ddim", "dpm-solver++-2m", "dpm-solver++-3m", "unipc-bh2", "deis", "heun")
SEARCHES = ("s3", "tpe", "cmaes", "random")
PROBLEM = {"name": "bench-problem", "noise": noise.VPLinear().to_dict(),
           "model": {"prediction": "eps", "time_input": "continuous", "time_scale": 1.0}, "t_start": 1.0,
           "t_end": 1e-3}


def _pool() -> list[tuple[int, str]]:
    """(nfe, schedule JSON) pairs; JSON text lets the storage validate each distinct schedule once."""
    ns = noise.VPLinear()
    pool = []
    for name in SOLVERS:
        for nfe in NFES:
            for sp in ("logsnr", "time-uniform", "time-quadratic"):
                s = presets.build(name, nfe, ns, spacing=sp, t_start=1.0, t_end=1e-3)
                if s.nfe in NFES:
                    pool.append((s.nfe, s.to_json(indent=None)))
    return pool


def _preset_items(rng: random.Random, baseline: bool) -> list[dict]:
    items = []
    for name in SOLVERS:
        for nfe in NFES:
            try:
                s = presets.build(name, nfe, noise.VPLinear(), t_start=1.0, t_end=1e-3)
            except ValueError:
                continue
            rmse = rng.lognormvariate(0, 0.3) / s.nfe ** 1.5
            items.append({"schedule": s, "status": "complete", "metrics": {"rmse": rmse}, "fidelity": "heldout",
                          "bank": "heldout", "n_samples": 1024,
                          "info": {"baseline": True, "origin": f"preset:{name}@{nfe}"} if baseline else {}})
    return items


def build_database(url: str, n: int, seed: int = 0) -> dict:
    """Fill ``url`` with ``n`` trials on one problem, shaped as ``steptune run`` stores them: per searched
    study, preset baselines and confirmations on the held-out bank and the bulk of the search on the train
    bank; plus a preset study and an imported schedule. Returns {study: count}."""
    rng = random.Random(seed)
    pool = _pool()
    counts = {}
    with connect(url) as db:
        preset_items = _preset_items(rng, baseline=False)
        db.add_trials("presets", preset_items, create={"method": "preset", "kind": "sweep", "problem": PROBLEM})
        counts["presets"] = len(preset_items)
        left = n - len(preset_items) - 1
        for k, method in enumerate(SEARCHES):
            m = left // (len(SEARCHES) - k)
            left -= m
            items = _preset_items(rng, baseline=True)
            for nfe in NFES:  # confirmations of the best candidates
                for _ in range(3):
                    _, d = rng.choice([p for p in pool if p[0] == nfe])
                    items.append({"schedule": d, "status": "complete", "fidelity": "heldout", "bank": "heldout",
                                  "metrics": {"rmse": rng.lognormvariate(-0.5, 0.3) / nfe ** 2}, "n_samples": 1024})
            for i in range(m - len(items)):
                nfe, d = pool[rng.randrange(len(pool))]
                status = "complete" if rng.random() < 0.9 else rng.choice(["failed", "pruned"])
                rmse = rng.lognormvariate(0, 0.5) / nfe ** 2
                items.append({"schedule": d, "status": status, "fidelity": "train", "bank": "train",
                              "metrics": {"rmse": rmse, "sw": 2 * rmse} if status == "complete" else {},
                              "error": "NonFiniteError: step 2" if status == "failed" else None,
                              "n_samples": 64, "seconds": rng.uniform(0.1, 2.0), "worker": f"w{i % 8}",
                              "info": {"batch": i // 36, "origin": "mutation"}})
            for i in range(0, m, 10_000):
                db.add_trials(f"search-{method}", items[i:i + 10_000],
                              create={"method": method, "kind": "search", "seed": k, "problem": PROBLEM})
            counts[f"search-{method}"] = m
        db.add_trials("hand-made", [{"schedule": pool[0][1], "status": "complete", "metrics": {"rmse": 0.05},
                                     "fidelity": "heldout"}],
                      create={"method": "import", "kind": "import", "problem": PROBLEM})
        counts["hand-made"] = 1
        assert db.count_trials() == n, (db.count_trials(), n)
    return counts


def time_endpoints(url: str, repeats: int) -> dict:
    """Median and worst time (ms) of each endpoint through the app, after one warm-up call."""
    from fastapi.testclient import TestClient

    from steptune.dashboard import create_app, open_read_only

    store = open_read_only(url)
    try:
        with TestClient(create_app(store)) as c:
            pid = next(p["id"] for p in c.get("/api/problems").json() if p["name"] == PROBLEM["name"])
            paths = {"front": f"/api/front?problem={pid}",
                     "front_heldout": f"/api/front?fidelity=heldout&problem={pid}",
                     "problems": "/api/problems", "status": "/api/status",
                     "trials_page_by_score": f"/api/trials?problem={pid}&sort=score&limit=50",
                     "trials_page_filtered": "/api/trials?study=search-s3&nfe=8&status=complete&sort=score",
                     "history_12k": "/api/history?study=search-tpe"}
            out = {}
            for name, path in paths.items():
                r = c.get(path)
                assert r.status_code == 200, (path, r.status_code, r.text[:200])
                times = []
                for _ in range(repeats):
                    t = time.perf_counter()
                    r = c.get(path)
                    times.append((time.perf_counter() - t) * 1000)
                out[name] = {"median_ms": statistics.median(times), "max_ms": max(times), "bytes": len(r.content)}
            front = c.get(paths["front"]).json()
            out["front_series"] = len(front["series"])
            out["front_points"] = sum(len(s["points"]) for s in front["series"])
    finally:
        store.close()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--pg-url", default=pg_url_default())
    args = ap.parse_args()
    results = {}
    for backend, url in bench_databases("dashboard-bench", args.pg_url):
        print(f"{backend}: {args.n:,} trials ...", flush=True)
        build_database(url, args.n)
        results[backend] = time_endpoints(url, args.repeats)
    backends = list(results)
    print(f"\n{'endpoint (median / max ms, ' + str(args.repeats) + ' calls)':44}" + "".join(f"{b:>20}"
                                                                                          for b in backends))
    for key in ("front", "front_heldout", "problems", "status", "trials_page_by_score", "trials_page_filtered",
                "history_12k"):
        cells = [f"{results[b][key]['median_ms']:.1f} / {results[b][key]['max_ms']:.1f}" for b in backends]
        print(f"{key:44}" + "".join(f"{c:>20}" for c in cells))
    ok = {b: results[b]["front"]["median_ms"] < TARGET_MS for b in backends}
    print(f"\nfront: {results[backends[0]]['front_series']} series, {results[backends[0]]['front_points']} points")
    print("target (front endpoint < 300 ms at 50,000 trials): "
          + ", ".join(f"{b} {'met' if v else 'MISSED'}" for b, v in ok.items()))
    out = save_json("dashboard", {"n": args.n, "repeats": args.repeats, "target_ms": TARGET_MS, "results": results,
                                  "target_met": ok, "load": os.getloadavg()})
    print(f"saved {out}")


if __name__ == "__main__":
    main()
