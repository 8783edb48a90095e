"""Where searched schedules lose to the presets at twice their NFE: the best preset at its best spacing at each of
``--presets-at``, the error of every state along each schedule against the reference solution at the same time
(held-out bank, first ``--states``), how much of each one's RMSE a few states make (the cheap fidelity's 128 train
states, the train bank, the held-out bank without its worst 1% of states, and how many states end more than
``--far`` from the reference in RMSE), and what refinement makes of the best presets and of the searched schedules.

The searched schedules are those a ``bench/search_efficiency.py`` run saved (``--from``, its JSON; the job's best
searched schedule per seed and NFE, before refinement).

    python bench/gap.py --from runs/bench/search_efficiency_refine.json --nfe 8,10 --presets-at 8,10,15,20

Saves runs/bench/gap.json and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_json  # noqa: E402

from steptune.backends import LocalBackend  # noqa: E402
from steptune.jobs import job_from_dict  # noqa: E402
from steptune.search import DEFAULT_PRESETS  # noqa: E402
from steptune.search.baselines import spacing_variants  # noqa: E402
from steptune.search.refine import refine  # noqa: E402
from steptune.space import Schedule, sample  # noqa: E402
from steptune.sweep import best_by_nfe, run_sweep  # noqa: E402


def errors_along(ev, schedule: Schedule, n: int) -> list[float]:
    """RMSE of the state after each step against the reference at that step's time (first ``n`` held-out states)."""
    p = ev.problem
    x_T = ev.x_T("heldout", n)
    states: list[torch.Tensor] = []
    with torch.no_grad():
        sample(p.model, x_T, schedule, callback=lambda i, x: states.append(x))
    ref, _ = p.reference_states(x_T, list(schedule.times), cache_dir=None, rtol=ev.rtol, atol=ev.atol)
    return [float((x - r).pow(2).mean().sqrt()) for x, r in zip(states, ref)]


def per_state(ev, schedule: Schedule, bank: str, n: int | None = None) -> torch.Tensor:
    """Each state's mean squared error at the end of ``schedule`` (first ``n`` states of ``bank``)."""
    x_T = ev.x_T(bank, n)
    with torch.no_grad():
        x = sample(ev.problem.model, x_T, schedule)
    return (x - ev.reference(bank, schedule.steps[-1].t)[: len(x)]).pow(2).mean(1)


def tail(ev, schedule: Schedule, far: float) -> dict:
    cheap, train, held = (per_state(ev, schedule, b, n) for b, n in (("train", 128), ("train", None),
                                                                      ("heldout", None)))
    k = max(1, len(held) // 100)
    return {"cheap": float(cheap.mean().sqrt()), "train": float(train.mean().sqrt()),
            "heldout": float(held.mean().sqrt()),
            "heldout_without_worst_1pct": float(held.sort().values[:-k].mean().sqrt()),
            "far_train": int((train.sqrt() > far).sum()), "far_heldout": int((held.sqrt() > far).sum())}


def describe(ev, schedule: Schedule, errs: list[float]) -> list[dict]:
    lam = ev.problem.noise.lam(torch.tensor([st.t for st in schedule.steps], dtype=torch.float64)).tolist()
    return [{"t": st.t, "lambda": lam[i], "prediction": st.prediction, "order": st.order,
             "corrector": st.corrector.kind if st.corrector else None, "relaxation": st.relaxation, "error": errs[i]}
            for i, st in enumerate(schedule.steps)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--from", dest="source", default="runs/bench/search_efficiency_refine.json",
                    help="a bench/search_efficiency.py JSON whose searched schedules are diagnosed")
    ap.add_argument("--nfe", default="8,10", help="the searched NFEs to diagnose and refine")
    ap.add_argument("--presets-at", default="8,10,15,20")
    ap.add_argument("--states", type=int, default=256, help="held-out states the errors along the run are taken on")
    ap.add_argument("--iters", type=int, default=60, help="refinement iterations")
    ap.add_argument("--far", type=float, default=0.1, help="a state's RMSE above which it counts as far")
    ap.add_argument("--name", default="gap", help="the JSON's name under runs/bench/")
    ap.add_argument("--metrics-only", action="store_true",
                    help="leave out the errors along the run and the per-state tables: the refinement and the table "
                         "of every held-out metric only")
    args = ap.parse_args(argv)
    nfes = [int(x) for x in args.nfe.split(",")]
    preset_nfes = [int(x) for x in args.presets_at.split(",")]
    runs = json.loads(Path(args.source).read_text())["runs"]
    job = job_from_dict({"study": "gap", "problem": {"name": "gmm-digits"}, "search": {"method": "s3", "nfe": nfes},
                         "evaluation": {"train_samples": 256, "heldout_samples": 1024, "cache": "runs/cache"},
                         "backend": {"kind": "local", "num_cpus": 1}})
    backend = LocalBackend(job.problem, job.evaluation, job.backend)
    backend.start()
    ev = backend.worker.evaluator
    p = ev.problem

    rows = run_sweep(ev, list(DEFAULT_PRESETS), sorted(set(preset_nfes) | set(nfes)), spacing="best")
    best = best_by_nfe(rows)
    presets = {n: dict(spacing_variants(best[n]["preset"], n, p.noise, p.t_start, p.t_end))[best[n]["spacing"]]
               for n in best}
    schedules = {f"preset {n} ({best[n]['preset']}, {best[n]['spacing']})": s for n, s in presets.items()}
    for r in runs:
        for n in nfes:
            if str(n) in r["schedules"]:
                schedules[f"searched NFE {n} seed {r['seed']}"] = Schedule.from_dict(r["schedules"][str(n)])
    along = {}
    if not args.metrics_only:
        print(f"errors along the run (RMSE against the reference at each step's time, {args.states} held-out states)")
    for name, s in schedules.items() if not args.metrics_only else ():
        steps = describe(ev, s, errors_along(ev, s, args.states))
        along[name] = steps
        print(f"\n{name}, NFE {s.nfe}\n| t | lambda | prediction | order | corrector | error |\n" + "|---" * 6 + "|")
        for st in steps:
            print(f"| {st['t']:.4f} | {st['lambda']:.2f} | {st['prediction']} | {st['order']} "
                  f"| {st['corrector'] or '-'} | {st['error']:.4f} |")

    tails = {name: tail(ev, s, args.far) for name, s in schedules.items()} if not args.metrics_only else {}
    if tails:
        print(f"\nhow much a few states make (RMSE; far: states whose own RMSE is above {args.far})\n"
              "| schedule | cheap (128 train) | train (256) | held-out | held-out without its worst 1% | far, train "
              "| far, held-out |\n" + "|---" * 7 + "|")
    for name, t in tails.items():
        print(f"| {name} | {t['cheap']:.4f} | {t['train']:.4f} | {t['heldout']:.4f} "
              f"| {t['heldout_without_worst_1pct']:.4f} | {t['far_train']} | {t['far_heldout']} |")

    refined, refined_schedules = [], {}
    for name, s in schedules.items():
        if s.nfe not in nfes:
            continue
        t0 = time.process_time()
        r = refine(ev, s, iters=args.iters)
        refined.append({"schedule": name, "nfe": s.nfe, "before": r.parent_rmse, "after": r.rmse,
                        "iters": r.iters, "best_iter": r.best_iter, "cpu_s": time.process_time() - t0})
        if r.rmse < r.parent_rmse:
            refined_schedules[f"{name}, refined"] = r.schedule
    print("\nrefinement (held-out RMSE, 1024 states)\n| schedule | before | refined | CPU s |\n|---|---|---|---|")
    for r in refined:
        print(f"| {r['schedule']} | {r['before']:.4f} | {r['after']:.4f} | {r['cpu_s']:.0f} |")
    every = {**schedules, **refined_schedules}
    metrics = {name: ev.evaluate(s, "heldout").metrics for name, s in every.items()}
    names = list(next(iter(metrics.values())))
    print("\nevery held-out metric (1024 states; rmse and median_err against the reference solution from the same "
          "noise, sw and nll of the samples against the data)\n| schedule | NFE | " + " | ".join(names) + " |\n"
          + "|---" * (len(names) + 2) + "|")
    for name, m in sorted(metrics.items(), key=lambda kv: (every[kv[0]].nfe, kv[0])):
        print(f"| {name} | {every[name].nfe} | "
              + " | ".join(f"{m[k]:.4g}" for k in names) + " |")
    print("\nbest preset at its best spacing: " + ", ".join(
        f"NFE {n} {best[n]['preset']} ({best[n]['spacing']}) {best[n]['rmse']:.4f}" for n in sorted(best)))
    backend.close()
    path = save_json(args.name, {"args": vars(args), "best_preset": {n: {k: best[n][k] for k in ("preset", "spacing",
                                                                                              "rmse")} for n in best},
                             "along": along, "tails": tails, "refined": refined, "metrics": metrics})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
