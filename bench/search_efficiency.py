"""Sample efficiency of the searchers: best held-out RMSE vs number of true evaluations.

For every method and seed, one search job over all NFEs, run by the runner in-process into a temporary
SQLite database (``--budget`` cheap-fidelity evaluations per NFE, on the first ``--cheap-samples`` states of
the train bank, 128 by default; no preset baseline: the baseline is every preset at its best spacing on the
held-out bank, at the searched NFEs and at 8, 10, 15 and 20, where the targets compare). The curve at ``c``
evaluations per NFE is the held-out RMSE of the best-by-train schedule among the first ``c`` trials at that
NFE; the final figure is the job's (top ``--confirm`` per NFE confirmed on the held-out bank).

    python bench/search_efficiency.py --problem gmm-digits --nfe 4,5,6,8,10 --budget 300 --seeds 0,1,2

``--batch`` and ``--lookahead`` run the searches as a wide cluster would (e.g. ``--batch 64``, or
``--batch 32 --lookahead 1`` as 16 Ray evaluators do by default), to compare their quality with batch 4.
``--alone`` also searches each NFE by itself with the same budget and reports the job over all NFEs against it.
``--refine`` adds the job's ``[refine]`` stage (to the NFE-alone searches too): each NFE's best searched schedule
and the best preset at its best spacing refined by gradient, the better one reported beside the searched one;
``--interpolate 7,9`` has the stage also build those NFEs from the searched ones
(``steptune.space.retime.interpolate``) and refine them, reported against the best preset there and, with
``--alone``, against a direct search of that NFE with the same budget (refined too).

Saves runs/bench/search_efficiency.json and .png and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, save_json  # noqa: E402

from steptune.backends import LocalBackend  # noqa: E402
from steptune.jobs import job_from_dict  # noqa: E402
from steptune.refine import best_found, searched  # noqa: E402
from steptune.runner import Runner  # noqa: E402
from steptune.search import CHEAP, CONFIRM, DEFAULT_PRESETS, FAIL_SCORE  # noqa: E402
from steptune.search.refine import ITERS, STRUCTURES, TRIMS  # noqa: E402
from steptune.search.s3 import encode, select_predictor  # noqa: E402
from steptune.space import Schedule  # noqa: E402
from steptune.storage import connect  # noqa: E402
from steptune.sweep import best_by_nfe, run_sweep  # noqa: E402


def heldout_score(ev, schedule: dict) -> float:
    """The schedule's RMSE on the whole held-out bank (FAIL_SCORE when it fails), as a confirmation scores it."""
    res = ev.evaluate(Schedule.from_dict(schedule), bank=CONFIRM)
    v = res.metrics.get("rmse")
    return min(float(v), FAIL_SCORE) if res.status == "complete" and v is not None and math.isfinite(v) else FAIL_SCORE


def curve(trials, ev, nfe: int, checkpoints: list[int], cache: dict) -> list[float]:
    """Held-out RMSE of the best cheap-fidelity trial among the first ``c`` at ``nfe``, for each checkpoint ``c``;
    ``cache`` holds held-out scores by schedule key (the study's own confirmations seed it)."""
    rows = [t for t in trials if t.fidelity == CHEAP and t.nfe == nfe]
    out = []
    for c in checkpoints:
        head = [t for t in rows[:c] if t.status == "complete"]
        if not head:
            out.append(math.nan)
            continue
        best = min(head, key=lambda t: (min(t.score, FAIL_SCORE) if t.score is not None else FAIL_SCORE, t.number))
        if best.key not in cache:
            cache[best.key] = heldout_score(ev, best.schedule)
        out.append(cache[best.key])
    return out


def search_job(args, method: str, seed: int, nfes: list[int], study: str | None = None, interpolate=()):
    refine = {"refine": {"iters": args.refine_iters, "structures": args.refine_structures, "trim": args.refine_trim,
                          "interpolate": list(interpolate)}} if args.refine else {}
    return job_from_dict({"study": study or f"{method}-{seed}", "seed": seed, "problem": {"name": args.problem},
                          "search": {"method": method, "nfe": nfes, "batch": args.batch, "lookahead": args.lookahead,
                                     "options": json.loads(args.options).get(method, {})},
                          "evaluation": {"cheap_samples": args.cheap_samples, "confirm": args.confirm,
                                         "baseline": False, "cache": "runs/cache"},
                          "budget": {"evaluations": args.budget},
                          "backend": {"kind": "local", "num_cpus": args.threads}, **refine})


def held_out(trials) -> dict:
    """Per NFE, the held-out RMSE of the best searched schedule (``searched``), of the best after refinement
    (``refined``: the best of it, its refinement and the refined best preset) and, at the NFEs the refine stage
    interpolated, of the interpolated schedule (``interpolated``) and of the best after its refinement and the
    schedules built there from the neighbouring NFEs (with their refinements)."""
    out: dict[int, dict] = {}
    for nfe, t in best_found(trials).items():
        out[nfe] = {"refined": t.score, "searched": min(p.score for p in trials if searched(p) and p.nfe == nfe)}
    found = best_found(trials, interpolated=True)
    for t in trials:
        if "interpolated" in t.info and t.status == "complete" and t.score is not None:
            out[t.nfe] = {"interpolated": t.score, "refined": found[t.nfe].score}
    return out


def alone_final(args, db, backend, method: str, seed: int, nfe: int) -> dict:
    """The held-out results of a search of ``nfe`` alone with the same budget, seed and settings."""
    study = f"{method}-{seed}-alone-{nfe}"
    Runner(search_job(args, method, seed, [nfe], study=study), db, backend).run()
    return held_out(db.trials(study)).get(nfe, {})


def first_reach(xs: list[int], ys: list[float], target: float) -> int | None:
    for x, y in zip(xs, ys):
        if y <= target:
            return x
    return None


def time_by_difference() -> None:
    """Every problem built from here on has a model that does not say it is differentiable in its time input."""
    import steptune.backends as backends
    import steptune.runner as runner

    build = backends.build_problem

    def built(spec):
        problem = build(spec)
        problem.model.time_differentiable = False
        return problem

    backends.build_problem = runner.build_problem = built


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problem", default="gmm-digits")
    ap.add_argument("--nfe", default="4,5,6,8,10")
    ap.add_argument("--budget", type=int, default=300, help="cheap evaluations per NFE")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--methods", default="s3,tpe,cmaes,random")
    ap.add_argument("--cheap-samples", type=int, default=128,
                    help="train-bank states per search evaluation (the cheap fidelity every method ranks on); the "
                         "RMSE is dominated by a few hard states, so 64 picks the wrong basin too often")
    ap.add_argument("--confirm", type=int, default=3)
    ap.add_argument("--points", type=int, default=10, help="checkpoints on the curve")
    ap.add_argument("--batch", type=int, default=None,
                    help="candidates asked at a time (default: the method's own, as in-process with one evaluator)")
    ap.add_argument("--lookahead", type=int, default=None,
                    help="batches asked ahead of their results (default 0 in-process; Ray's default is 1)")
    ap.add_argument("--alone", action="store_true",
                    help="also search each NFE alone (same budget) and compare the job over all NFEs with it")
    ap.add_argument("--refine", action="store_true",
                    help="refine each NFE's best searched schedule by gradient afterwards (the job's [refine] stage)")
    ap.add_argument("--refine-iters", type=int, default=ITERS, help="gradient iterations per NFE, at most")
    ap.add_argument("--refine-trim", type=lambda v: [float(x) for x in v.split(",")], default=list(TRIMS),
                    help="share of the fit states, those of the largest error, the refinements leave out of the loss, "
                         "or several separated by commas (each screened, the best kept; the [refine] stage's trim)")
    ap.add_argument("--refine-structures", type=int, default=STRUCTURES,
                    help="searched step structures screened per NFE by the refine stage (1: the best schedule alone)")
    ap.add_argument("--interpolate", default="",
                    help="with --refine: NFEs not searched, interpolated from the searched ones and refined, e.g. 7,9")
    ap.add_argument("--options", default="{}",
                    help='searcher options by method, as JSON, e.g. \'{"s3": {"auto_kinds": ["extra-trees"]}}\'')
    ap.add_argument("--time-difference", action="store_true",
                    help="refinements take the network's time input by a forward difference, as before the models "
                         "said they were differentiable in it (for comparison)")
    ap.add_argument("--name", default="search_efficiency")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: small batches run faster single-threaded, above all on a shared machine)")
    args = ap.parse_args(argv)
    if args.time_difference:
        time_by_difference()
    nfes = [int(x) for x in args.nfe.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    methods = args.methods.split(",")
    interp = [int(x) for x in args.interpolate.split(",") if x] if args.refine else []
    t_all = time.perf_counter()
    first = search_job(args, methods[0], seeds[0], nfes)
    backend = LocalBackend(first.problem, first.evaluation, first.backend)  # one evaluator for every job
    backend.start()  # sets the torch threads; computes (or loads) the references of both banks
    ev = backend.worker.evaluator
    wide = sorted(set(nfes) | set(interp) | {n for n in (8, 10, 15, 20) if n >= min(nfes)})  # the targets' NFEs
    sweep = run_sweep(ev, list(DEFAULT_PRESETS), wide, spacing="best", bank="heldout")  # the strongest a user picks
    best_preset = {n: {"preset": r["preset"], "rmse": r["rmse"]} for n, r in best_by_nfe(sweep).items()}
    step = max(args.budget // args.points, 1)
    checkpoints = sorted({*range(step, args.budget + 1, step), args.budget})
    runs, cache = [], {}
    tmp = tempfile.TemporaryDirectory(prefix="search_efficiency-")
    db = connect(f"sqlite:///{Path(tmp.name) / 'searches.db'}")
    for method in methods:
        for seed in seeds:
            t0, cpu0 = time.perf_counter(), time.process_time()
            job = search_job(args, method, seed, nfes, interpolate=interp)
            runner = Runner(job, db, backend)
            res = runner.run()
            search_s, cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
            trials = db.trials(job.study)
            for t in trials:
                if t.fidelity == CONFIRM and t.status == "complete" and t.score is not None:
                    cache.setdefault(t.key, min(t.score, FAIL_SCORE))
            curves = {n: curve(trials, ev, n, checkpoints, cache) for n in nfes}
            found = [s for s in res.per_nfe if s.searched_score is not None]
            refine_s = sum(t.seconds or 0.0 for t in trials if "refines" in t.info)  # each with its screening
            run = {"method": method, "seed": seed, "seconds": search_s, "cpu_seconds": cpu_s,
                   "refine_seconds": refine_s, "n_evals": res.evaluations,
                   "n_confirm": res.confirmations, "final": {s.nfe: s.searched_score for s in found},
                   "curves": curves, "schedules": {s.nfe: s.schedule for s in found},
                   "held_out": held_out(trials)}
            se = runner.searcher
            if method == "s3":
                run["tau_report"] = se.tau_report
                X = np.array([encode(c.schedule, se.space, se.max_steps) for c, _ in se.trials])
                nf = np.array([c.nfe for c, _ in se.trials])
                sc = np.array([s for _, s in se.trials])
                run["heldout_tau"] = select_predictor(X, nf, sc, seed=seed + 99)[1]
            if args.alone and len(nfes) > 1:
                run["alone"] = {n: alone_final(args, db, backend, method, seed, n) for n in nfes + interp}
            runs.append(run)
            print(f"{method} seed {seed}: {search_s:.0f}s ({cpu_s:.0f} s of CPU; refinements {refine_s:.0f} s); "
                  "held-out " + " ".join(
                f"{n}:{v}" for n, v in sorted(run["held_out"].items())) +
                ("; alone " + " ".join(f"{n}:{v}" for n, v in run["alone"].items()) if "alone" in run else ""),
                flush=True)
            save_json(args.name + "-partial", {"args": vars(args), "runs": runs})
    db.close()
    tmp.cleanup()
    backend.close()
    total_s = time.perf_counter() - t_all

    def mean_final(method, n):
        v = [r["final"][n] for r in runs if r["method"] == method]
        return float(np.mean(v)) if v else math.nan

    def mean_curve(method, n):
        v = [r["curves"][n] for r in runs if r["method"] == method]
        return list(np.mean(v, axis=0)) if v else []

    def mean_of(method, n, get):
        v = [get(r, n) for r in runs if r["method"] == method]
        v = [x for x in v if x is not None]
        return float(np.mean(v)) if v else math.nan

    def refined(r, n):
        return r["held_out"].get(n, {}).get("refined")

    def alone(kind):
        return lambda r, n: r["alone"].get(n, {}).get(kind) if "alone" in r else None

    def per_seed_ratio(method, n, mine, theirs):
        return [mine(r, n) / theirs(r, n) for r in runs if r["method"] == method and mine(r, n) and theirs(r, n)]

    table = []
    for n in nfes:
        row = {"nfe": n, "best_preset": best_preset[n]["preset"], "preset_rmse": best_preset[n]["rmse"]}
        for m in methods:
            row[m] = mean_final(m, n)
            if args.refine:
                row[f"{m}_refined"] = mean_of(m, n, refined)
        for m in methods:
            if any("alone" in r for r in runs if r["method"] == m):
                row[f"{m}_alone"] = mean_of(m, n, alone("searched"))
                row[f"{m}_vs_alone"] = row[m] / row[f"{m}_alone"]
                row[f"{m}_vs_alone_per_seed"] = per_seed_ratio(m, n, lambda r, k: r["final"].get(k),
                                                               alone("searched"))
                if args.refine:
                    row[f"{m}_alone_refined"] = mean_of(m, n, alone("refined"))
                    row[f"{m}_refined_vs_alone"] = row[f"{m}_refined"] / row[f"{m}_alone_refined"]
                    row[f"{m}_refined_vs_alone_per_seed"] = per_seed_ratio(m, n, refined, alone("refined"))
        if "s3" in methods and "tpe" in methods:
            row["s3_evals_to_tpe_final"] = first_reach(checkpoints, mean_curve("s3", n), mean_final("tpe", n))
        table.append(row)
    targets = {}
    if "s3" in methods:
        for n, ref in ((5, 5), (5, 8), (5, 10), (8, 15), (10, 20)):
            if n in nfes and ref in best_preset:
                targets[f"nfe{n}_vs_preset{ref}"] = mean_final("s3", n) / best_preset[ref]["rmse"]
                if args.refine:
                    targets[f"refined_nfe{n}_vs_preset{ref}"] = mean_of("s3", n, refined) / best_preset[ref]["rmse"]
    alone_cols = [m for m in methods if f"{m}_alone" in table[0]]
    head = (["NFE", "best preset", "preset"] + methods + [f"{m} alone / ratio" for m in alone_cols]
            + ([f"{m} refined" for m in methods] + [f"{m} alone refined / ratio" for m in alone_cols]
               if args.refine else [])
            + (["s3 evals to TPE final"] if "s3" in methods and "tpe" in methods else []))
    print("\n| " + " | ".join(head) + " |\n" + "|---" * len(head) + "|")
    for r in table:
        cells = [str(r["nfe"]), r["best_preset"], f"{r['preset_rmse']:.4g}"] + [f"{r[m]:.4g}" for m in methods]
        cells += [f"{r[m + '_alone']:.4g} / {r[m + '_vs_alone']:.2f}" for m in alone_cols]
        if args.refine:
            cells += [f"{r[m + '_refined']:.4g}" for m in methods]
            cells += [f"{r[m + '_alone_refined']:.4g} / {r[m + '_refined_vs_alone']:.2f}" for m in alone_cols]
        if "s3_evals_to_tpe_final" in r:
            v = r["s3_evals_to_tpe_final"]
            cells.append(f"{v}" if v is not None else f"> {args.budget}")
        print("| " + " | ".join(cells) + " |")
    interpolated = []
    for n in interp:
        for m in methods:
            bp = best_preset[n]["rmse"]
            row = {"nfe": n, "method": m, "best_preset": best_preset[n]["preset"], "preset_rmse": bp,
                   "interpolated": mean_of(m, n, lambda r, k: r["held_out"].get(k, {}).get("interpolated")),
                   "refined": mean_of(m, n, refined), "direct": mean_of(m, n, alone("searched")),
                   "direct_refined": mean_of(m, n, alone("refined"))}
            row.update(preset_over_refined=bp / row["refined"], refined_over_direct_refined=row["refined"] /
                       row["direct_refined"], interpolated_over_direct=row["interpolated"] / row["direct"],
                       refined_over_direct_per_seed=per_seed_ratio(m, n, refined, alone("refined")))
            interpolated.append(row)
    if interpolated:
        print("\ninterpolated NFEs (targets: preset / refined interpolated >= 1.3; refined interpolated / direct "
              "refined <= 1.15)\n| NFE | method | best preset | interpolated | refined | direct search | direct "
              "refined | preset / refined | refined / direct refined | interpolated / direct |\n" + "|---" * 10 + "|")
        for r in interpolated:
            print(f"| {r['nfe']} | {r['method']} | {r['best_preset']} {r['preset_rmse']:.4g} | {r['interpolated']:.4g} "
                  f"| {r['refined']:.4g} | {r['direct']:.4g} | {r['direct_refined']:.4g} | "
                  f"{r['preset_over_refined']:.2f}x | {r['refined_over_direct_refined']:.2f} | "
                  f"{r['interpolated_over_direct']:.2f} |")
    print(f"\ntargets: {targets}")
    taus = [r.get("heldout_tau") for r in runs if r["method"] == "s3"]
    print(f"predictor held-out Kendall tau (S^3 trials, 70/30 split): {taus}")
    print(f"total {total_s:.0f}s")
    payload = {"args": vars(args), "checkpoints": checkpoints, "best_preset": best_preset, "sweep": sweep,
               "table": table, "targets": targets, "interpolated": interpolated, "runs": runs, "total_seconds": total_s}
    path = save_json(args.name, payload)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(nfes), figsize=(3.2 * len(nfes), 3.2), squeeze=False)
        for ax, n in zip(axes[0], nfes):
            for m in methods:
                ax.plot(checkpoints, mean_curve(m, n), label=m, marker=".")
            ax.axhline(best_preset[n]["rmse"], color="k", ls="--", lw=1,
                       label=f"best preset ({best_preset[n]['preset']})")
            ax.set_title(f"NFE {n}")
            ax.set_xlabel("true evaluations at this NFE")
            ax.set_yscale("log")
        axes[0][0].set_ylabel("held-out RMSE (mean over seeds)")
        axes[0][-1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(OUT / f"{args.name}.png", dpi=110)
    except Exception as e:  # a missing plotting backend must not lose the numbers
        print(f"no plot: {e}")
    print(f"saved {path}")


if __name__ == "__main__":
    main()
