"""How reproducible a direct DC fit is, against the CPR predictions bench/dc.py compares with it.

At each held-out (NFE, CFG) configuration of ``bench/dc.py`` (UniPC, digits-cond), the direct fit of
that benchmark (greedy, then joint from greedy's ratios, restarted from the fitted neighbouring guidance
scales' joint ratios where the NFE is in the grid) is repeated on ``--draws`` disjoint draws of
``--fit-samples`` noises of the train bank. The held-out MSE of each draw's ratios shows how far "the
directly fitted ratios" move with the choice of fit noises; CPR's predictions (read from bench/dc.py's
saved JSON) are placed against that spread. Draw 0 is bench/dc.py's own direct fit.

    python bench/dc_repro.py [--draws 5] [--source runs/bench/dc.json] [--threads 1] [--device cuda]

Saves runs/bench/dc_repro.json (``--name``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, save_json  # noqa: E402

from steptune.evaluators import Evaluator, evaluator_options, load_problem  # noqa: E402
from steptune.search import dc  # noqa: E402
from steptune.space import presets  # noqa: E402

SOLVER = "unipc-bh2"
LABELS = 10  # digits-cond gives sample i of a batch the label i mod 10


def fit_draw(ev, schedule, k: int, n: int, args) -> dc.ConfigFit:
    """Greedy, then joint from greedy, on noises [k n, (k + 1) n) of the train bank. The network labels a
    batch by position, so draws start at multiples of 10 to keep each noise's label."""
    lo = k * n
    if lo % LABELS or n % LABELS:
        raise SystemExit(f"--fit-samples must be a multiple of {LABELS} so each draw keeps its noises' labels")
    bank = ev.bank("train")
    if bank.size < lo + n:
        raise SystemExit(f"the train bank holds {bank.size} noises, too few for {k + 1} draws of {n}")
    t = time.perf_counter()
    x = ev.x_T("train", lo + n)[lo:]
    targets = ev.problem.reference_states(x, schedule.times, bank={**bank.describe(), "n": n, "offset": lo},
                                          cache_dir=ev.cache_dir).states
    seconds = time.perf_counter() - t
    model = ev.problem.model
    greedy = dc.fit_greedy(model, dc.with_ratios(schedule, [1.0] * len(schedule.steps)), x, targets,
                           iters=args.greedy_iters)
    joint = dc.fit_joint(model, schedule, x, targets[-1], init=greedy.ratios, iters=args.joint_iters)
    return dc.ConfigFit(schedule, {"greedy": greedy, "joint": joint}, seconds, model, x, targets[-1])


def spread(values: list[float]) -> dict:
    mean = statistics.mean(values)
    return {"values": values, "mean": mean, "min": min(values), "max": max(values),
            "cv": statistics.stdev(values) / mean if len(values) > 1 else 0.0,
            "max_over_min": max(values) / min(values)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", default=str(OUT / "dc.json"), help="bench/dc.py's JSON: CPR, grid fits, held-out set")
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--fit-samples", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="where the network runs (cpu, cuda)")
    ap.add_argument("--cache", default="runs/cache")
    ap.add_argument("--name", default="dc_repro", help="saves runs/bench/NAME.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    src = json.loads(Path(args.source).read_text())
    args.greedy_iters, args.joint_iters = src["args"]["greedy_iters"], src["args"]["joint_iters"]
    cprs = {"cpr": dc.CPR.from_dict(src["cpr"]), "cpr_e2e": dc.CPR.from_dict(src["cpr_e2e"])}
    grid = {(r["cfg"], r["nfe"]): r["joint"]["ratios"] for r in src["grid"] if r["name"] == "unipc"}
    cfgs = sorted({c for c, _ in grid})
    rows = []
    evaluators: dict[float, Evaluator] = {}
    for held in src["cpr_heldout"]:
        nfe, cfg = held["nfe"], held["cfg"]
        if cfg not in evaluators:
            prob = load_problem("digits-cond", guidance_scale=cfg)
            evaluators[cfg] = Evaluator(prob, cache_dir=args.cache, device=args.device, **evaluator_options(prob))
        ev = evaluators[cfg]
        prob = ev.problem
        s = presets.build(SOLVER, nfe, prob.noise, t_start=prob.t_start, t_end=prob.t_end)

        def mse(ratios, ev=ev, s=s):
            return ev.evaluate(dc.with_ratios(s, ratios), "heldout").metrics["rmse"] ** 2

        neighbours = [c for c in cfgs if c < cfg][-1:] + [c for c in cfgs if c > cfg][:1]
        neighbours = [c for c in neighbours if (c, nfe) in grid]
        row = {"nfe": nfe, "cfg": cfg, "none": mse([1.0] * len(s.steps)), "draws": []}
        for k in range(args.draws):
            fit = fit_draw(ev, s, k, args.fit_samples, args)
            for c in neighbours:
                fit.refit_joint(grid[(c, nfe)], iters=args.joint_iters, note={"from_cfg": c})
            row["draws"].append({m: {"mse": mse(r.ratios), "ratios": r.ratios, "loss": r.loss, "seconds": r.seconds}
                                 for m, r in fit.fits.items()})
            print(f"NFE {nfe} CFG {cfg:g} draw {k}: held-out MSE greedy {row['draws'][-1]['greedy']['mse']:.4g}, "
                  f"direct (joint) {row['draws'][-1]['joint']['mse']:.4g}", flush=True)
        for m in ("greedy", "joint"):
            row[m] = spread([d[m]["mse"] for d in row["draws"]])
        for key, cpr in cprs.items():
            v = mse(cpr.predict(nfe, cfg, len(s.steps)))
            row[key] = {"mse": v, "over_best": v / row["joint"]["min"], "over_mean": v / row["joint"]["mean"],
                        "over_worst": v / row["joint"]["max"]}
        rows.append(row)

    print(f"\nheld-out MSE of direct fits on {args.draws} disjoint draws of {args.fit_samples} fit noises (UniPC)")
    print(f"{'NFE/CFG':<9}{'none':>10}{'greedy mean':>13}{'CV':>7}{'direct mean':>13}{'min':>10}{'max':>10}"
          f"{'CV':>7}{'CPR e2e':>10}{'/worst':>8}{'/mean':>8}")
    for r in rows:
        j, e = r["joint"], r["cpr_e2e"]
        print(f"{r['nfe']}/{r['cfg']:<7g}{r['none']:>10.4g}{r['greedy']['mean']:>13.4g}{100 * r['greedy']['cv']:>6.1f}%"
              f"{j['mean']:>13.4g}{j['min']:>10.4g}{j['max']:>10.4g}{100 * j['cv']:>6.1f}%{e['mse']:>10.4g}"
              f"{e['over_worst']:>8.2f}{e['over_mean']:>8.2f}")
    print(f"saved {save_json(args.name, {'args': vars(args), 'rows': rows})}")


if __name__ == "__main__":
    main()
