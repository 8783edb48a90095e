"""Refinement by gradient after a search: held-out RMSE of each searched schedule before and after
`steptune refine`, and what the refinement cost (wall and CPU seconds of this process).

For every seed, one S^3 search job (``--budget`` cheap evaluations per NFE, no preset baselines) runs
in-process into a temporary database; then each NFE is refined as `steptune refine` does (``--iters``,
``--samples``, ``--structures``: the best searched schedule alone with 1, else the most promising of that many
structures after screening) and the result compared on the held-out bank with the best searched schedule.

    python bench/refine.py --problem gmm-digits --nfe 5 --budget 300 --seeds 0,1,2
    python bench/refine.py --problem digits-cond --guidance 3 --nfe 5 --budget 100 --seeds 0,1,2 \\
        --train-samples 64 --heldout-samples 256 --cheap-samples 32

``--time S`` bounds each refinement as `steptune refine --time S` does.

Saves runs/bench/refine-PROBLEM-sSTRUCTURES[-tTIME].json and prints a table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_json  # noqa: E402

from steptune.backends import LocalBackend  # noqa: E402
from steptune.jobs import job_from_dict  # noqa: E402
from steptune.refine import parents, refine_trials, structure_groups  # noqa: E402
from steptune.runner import Runner  # noqa: E402
from steptune.search import DEFAULT_PRESETS  # noqa: E402
from steptune.search.refine import ITERS, STRUCTURES, TRIMS  # noqa: E402
from steptune.storage import connect  # noqa: E402
from steptune.sweep import best_by_nfe, run_sweep  # noqa: E402


def search_job(args, seed: int, nfes: list[int]):
    problem = {"name": args.problem, **({"guidance_scale": args.guidance} if args.guidance is not None else {})}
    return job_from_dict({"study": f"s3-{seed}", "seed": seed, "problem": problem,
                          "search": {"method": "s3", "nfe": nfes},
                          "evaluation": {"cheap_samples": args.cheap_samples, "train_samples": args.train_samples,
                                         "heldout_samples": args.heldout_samples, "confirm": 3, "baseline": False,
                                         "cache": "runs/cache"},
                          "budget": {"evaluations": args.budget},
                          "backend": {"kind": "local", "num_cpus": args.threads}})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problem", default="gmm-digits")
    ap.add_argument("--guidance", type=float, default=None)
    ap.add_argument("--nfe", default="5")
    ap.add_argument("--budget", type=int, default=300, help="cheap evaluations per NFE of the search")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--iters", type=int, default=ITERS)
    ap.add_argument("--structures", type=int, default=STRUCTURES,
                    help="searched step structures screened per NFE (1: the best searched schedule alone)")
    ap.add_argument("--samples", type=int, default=None, help="train-bank states the refinement fits on (default 128)")
    ap.add_argument("--trim", type=lambda v: [float(x) for x in v.split(",")], default=list(TRIMS),
                    help="share of the fit states, those of the largest error, left out of the loss, or several "
                         "separated by commas: each screened with every structure, the best kept (default "
                         f"{','.join(f'{t:g}' for t in TRIMS)})")
    ap.add_argument("--cheap-samples", type=int, default=128)
    ap.add_argument("--train-samples", type=int, default=256)
    ap.add_argument("--heldout-samples", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--time", type=float, default=None,
                    help="seconds each refinement may take, its screening included (`steptune refine --time`)")
    ap.add_argument("--presets-at", default="",
                    help="also the best preset (at its best spacing) on the held-out bank at these NFEs, e.g. 5,10")
    args = ap.parse_args(argv)
    nfes = [int(x) for x in args.nfe.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    first = search_job(args, seeds[0], nfes)
    backend = LocalBackend(first.problem, first.evaluation, first.backend)
    backend.start()  # sets the torch threads; loads (or computes) the references of both banks
    ev = backend.worker.evaluator
    preset_nfes = [int(x) for x in args.presets_at.split(",") if x]
    presets = {n: {"preset": r["preset"], "rmse": r["rmse"]} for n, r in best_by_nfe(
        run_sweep(ev, list(DEFAULT_PRESETS), preset_nfes, spacing="best")).items()} if preset_nfes else {}
    tmp = tempfile.TemporaryDirectory(prefix="refine-bench-")
    db = connect(f"sqlite:///{Path(tmp.name) / 'refine.db'}")
    rows = []
    for seed in seeds:
        job = search_job(args, seed, nfes)
        t0 = time.perf_counter()
        Runner(job, db, backend).run()
        search_s = time.perf_counter() - t0
        for parent in parents(db.trials(job.study), job.study, nfes):
            cpu0, wall0 = time.process_time(), time.perf_counter()
            todo = structure_groups(db, job.study, ev, [parent], args.structures, args.iters)
            (r,) = refine_trials(db, job.study, ev, todo, iters=args.iters, samples=args.samples, seconds=args.time,
                                 trim=args.trim)
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
            info = db.trial(r.trial).info["refine"]
            kept = min(parent.score, r.rmse if r.improved else r.parent_rmse)  # the search's best is the parent
            rows.append({"seed": seed, "nfe": r.nfe, "parent_rmse": parent.score, "refined_rmse": r.rmse,
                         "kept_rmse": kept, "change": kept / parent.score - 1, "improved": kept < parent.score,
                         "refined_parent": r.parent, "refined_parent_rmse": r.parent_rmse,
                         "screened": info.get("screened", []), "wall_s": wall, "cpu_s": cpu, "search_s": search_s,
                         "iters": info["iters"], "best_iter": info["best_iter"], "fitted": info["fitted"],
                         "model_calls": info["model_calls"], "out_of_time": info.get("out_of_time", False)})
            print(f"seed {seed} NFE {r.nfe}: {parent.score:.4g} -> {kept:.4g} ({100 * rows[-1]['change']:+.1f}%; "
                  f"{r.structures} structure(s)), {wall:.1f} s wall, {cpu:.1f} s CPU"
                  + (", out of time" if rows[-1]["out_of_time"] else ""), flush=True)
    threads = torch.get_num_threads()
    db.close()
    tmp.cleanup()
    backend.close()
    table = []
    for n in nfes:
        mine = [r for r in rows if r["nfe"] == n]
        parent, kept = float(np.mean([r["parent_rmse"] for r in mine])), float(np.mean([r["kept_rmse"] for r in mine]))
        table.append({"nfe": n, "parent_rmse": parent, "refined_rmse": kept, "reduction": 1 - kept / parent,
                      "per_seed_reduction": [1 - r["kept_rmse"] / r["parent_rmse"] for r in mine],
                      "cpu_s": float(np.mean([r["cpu_s"] for r in mine])),
                      "wall_s": float(np.mean([r["wall_s"] for r in mine]))})
    name = args.problem + ("" if args.guidance is None else f"-g{args.guidance:g}")
    print(f"\n{name}, mean of seeds {args.seeds} (held-out RMSE; refinement: {args.iters} iterations at most, "
          f"{args.structures} structure(s) screened, {args.samples or 'default'} samples, {threads} thread(s)"
          + (f", at most {args.time:g} s each" if args.time else "") + ")")
    print("| NFE | searched | refined | reduction | per seed | CPU s | wall s |\n|---|---|---|---|---|---|---|")
    for t in table:
        per = ", ".join(f"{100 * v:.0f}%" for v in t["per_seed_reduction"])
        print(f"| {t['nfe']} | {t['parent_rmse']:.4g} | {t['refined_rmse']:.4g} | {100 * t['reduction']:.1f}% | {per} "
              f"| {t['cpu_s']:.1f} | {t['wall_s']:.1f} |")
    for n, b in presets.items():
        print(f"best preset at NFE {n}: {b['preset']} {b['rmse']:.4g}" + "".join(
            f"; refined NFE {t['nfe']} / it = {t['refined_rmse'] / b['rmse']:.2f}" for t in table))
    path = save_json(f"refine-{name}-s{args.structures}" + (f"-t{args.time:g}" if args.time else ""),
                     {"args": vars(args), "table": table, "runs": rows, "best_preset": presets})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
