"""Schedules above the largest searched NFE: held-out RMSE of the schedule `steptune export --nfe N` builds there
by each interpolation method, against the best preset at its best spacing at that NFE.

For every seed, one S^3 search job (``--nfe``, ``--budget`` cheap evaluations per NFE, no preset baselines) runs
in-process into a temporary database; its best held-out schedule at each searched NFE is then carried to every NFE
of ``--at`` by ``split`` (the searched NFE below kept whole, its widest lambda intervals but the last split),
``blend`` (the schedule's own relative lambda profile over the new step count) and ``auto`` (the export's default:
split up to the largest searched NFE, blend above it), each scored on the held-out bank.

    python bench/extrapolate.py --problem gmm-digits --nfe 5,6,8,10 --budget 150 --seeds 0,1 --at 12,15,20,30

Saves runs/bench/extrapolate-PROBLEM.json and prints a table (mean over the seeds).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_json  # noqa: E402

from steptune.backends import LocalBackend  # noqa: E402
from steptune.jobs import job_from_dict  # noqa: E402
from steptune.runner import Runner  # noqa: E402
from steptune.search import DEFAULT_PRESETS  # noqa: E402
from steptune.space.retime import interpolate  # noqa: E402
from steptune.storage import connect  # noqa: E402
from steptune.sweep import best_by_nfe, run_sweep  # noqa: E402

METHODS = ("split", "blend", "auto")


def search_job(args, seed: int, nfes: list[int]):
    return job_from_dict({"study": f"s3-{seed}", "seed": seed, "problem": {"name": args.problem},
                          "search": {"method": "s3", "nfe": nfes},
                          "evaluation": {"cheap_samples": args.cheap_samples, "heldout_samples": args.heldout_samples,
                                         "confirm": 3, "baseline": False, "cache": "runs/cache"},
                          "budget": {"evaluations": args.budget},
                          "backend": {"kind": "local", "num_cpus": args.threads}})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problem", default="gmm-digits")
    ap.add_argument("--nfe", default="5,6,8,10", help="the searched NFEs")
    ap.add_argument("--budget", type=int, default=150, help="cheap evaluations per NFE of the search")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--at", default="12,15,20,30", help="the NFEs the searched schedules are carried to")
    ap.add_argument("--cheap-samples", type=int, default=64)
    ap.add_argument("--heldout-samples", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    nfes = [int(x) for x in args.nfe.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    at = [int(x) for x in args.at.split(",")]
    first = search_job(args, seeds[0], nfes)
    backend = LocalBackend(first.problem, first.evaluation, first.backend)
    backend.start()
    ev = backend.worker.evaluator
    n = args.heldout_samples

    def score(schedule) -> float:
        return ev.evaluate(schedule, bank="heldout", n=n).metrics["rmse"]

    presets = {k: {"preset": r["preset"], "rmse": r["rmse"]} for k, r in best_by_nfe(
        run_sweep(ev, list(DEFAULT_PRESETS), at, spacing="best")).items()}
    tmp = tempfile.TemporaryDirectory(prefix="extrapolate-bench-")
    rows = []
    with connect(f"sqlite:///{Path(tmp.name) / 'x.db'}") as db:
        for seed in seeds:
            job = search_job(args, seed, nfes)
            Runner(job, db, backend).run()
            best = {t.nfe: t.to_schedule() for t in db.best_per_nfe(job.study)}
            for nfe in at:
                row = {"seed": seed, "nfe": nfe, "searched": {k: db.best(job.study, k).score for k in nfes}}
                for method in METHODS:
                    sched = interpolate(best, nfe, method=method)
                    row[method] = score(sched)
                    row[f"{method}_built_as"] = sched.meta["interpolated"]["method"]
                rows.append(row)
                print(f"seed {seed} NFE {nfe}: " + ", ".join(f"{m} {row[m]:.4g}" for m in METHODS)
                      + f"; best preset {presets[nfe]['preset']} {presets[nfe]['rmse']:.4g}", flush=True)
    tmp.cleanup()
    backend.close()
    table = []
    for nfe in at:
        mine = [r for r in rows if r["nfe"] == nfe]
        table.append({"nfe": nfe, **{m: statistics.mean(r[m] for r in mine) for m in METHODS},
                      "preset": presets[nfe]["preset"], "preset_rmse": presets[nfe]["rmse"]})
    print(f"\n{args.problem}, searched NFE {args.nfe} (budget {args.budget}), held-out RMSE on {n} states, mean of "
          f"{len(seeds)} seed(s)")
    print(f"{'NFE':>4} {'split':>9} {'blend':>9} {'auto':>9}  best preset at its best spacing")
    for t in table:
        print(f"{t['nfe']:>4} {t['split']:>9.4g} {t['blend']:>9.4g} {t['auto']:>9.4g}  {t['preset']} "
              f"{t['preset_rmse']:.4g}")
    print(f"saved {save_json(f'extrapolate-{args.problem}', {'args': vars(args), 'rows': rows, 'table': table})}")


if __name__ == "__main__":
    main()
