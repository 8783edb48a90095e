"""DC-Solver compensation on the trained digits model (digits-cond): held-out MSE to the converged
reference, FD-digits (to the data) and FD to the reference solutions for UniPC and DPM-Solver++(2M),
without DC, with greedy-fitted and with jointly fitted ratios; CPR's held-out error; fit times.

FD-digits measures distance to the data set; at strong guidance the exact (reference) solution is
itself far from the data, so a sampler that follows it more closely can score a higher FD-digits.
The FD to the reference isolates the sampler's own error at the distribution level.

    python bench/dc.py [--cfg 1.5,3,5] [--nfe 5,6,8,10] [--heldout 7:2,9:4,6:4] [--threads 1] [--device cuda]

Ratios are fitted on the first 10 noises of the train bank (labels 0..9) and scored on the
256-sample held-out bank. "joint" starts from the greedy ratios (a refinement). CPR is fitted on
the UniPC joint ratios of the (NFE, CFG) grid and compared, on the held-out configurations, with
ratios fitted directly there, once as DC-Solver does it (regression on the fitted ratios) and once
refined end to end (``dc.refine_cpr``: the coefficients optimised on the grid's final-state errors);
where the held-out NFE is in the grid, also with the joint ratios interpolated in the guidance between
the two fitted scales at that NFE (``dc.interpolate_ratios``, what ``dc predict`` does there). The
second protocol fits every NFE and holds out guidance scales:

    python bench/dc.py --nfe 5,6,7,8,9,10 --heldout 7:2,9:4,6:4,7:4,8:2,10:4 --name dc_dense
Saves runs/bench/dc.json (``--name``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_json  # noqa: E402

from steptune.evaluators import Evaluator, evaluator_options, load_problem  # noqa: E402
from steptune.search import dc  # noqa: E402
from steptune.space import presets  # noqa: E402

SOLVERS = {"unipc": "unipc-bh2", "dpm++2m": "dpm-solver++-2m"}
ROWS = (("base", ""), ("greedy", " +DC greedy"), ("joint_single", " +DC joint"), ("joint", " +DC joint, cont."))


def score(ev, schedule) -> dict:
    r = ev.evaluate(schedule, "heldout")
    return {"mse": r.metrics["rmse"] ** 2, "fd": r.metrics.get("fd_digits"), "fd_ref": r.metrics.get("fd_reference"),
            "acc": r.metrics.get("accuracy")}


def fit_only(ev, spec: str, nfe: int, args):
    """The schedule, its fits, and the joint fit from the greedy start alone (kept before any restart)."""
    prob = ev.problem
    s = presets.build(spec, nfe, prob.noise, t_start=prob.t_start, t_end=prob.t_end)
    fit = dc.fit_config(ev, s, fit_samples=args.fit_samples, greedy_iters=args.greedy_iters,
                        joint_iters=args.joint_iters)
    return s, fit, fit.fits["joint"]


def score_fit(ev, s, fit, single) -> dict:
    row = {"nfe": s.nfe, "reference_seconds": fit.reference_seconds, "base": score(ev, s)}
    for m, r in fit.fits.items():
        row[m] = {**score(ev, fit.fitted(m)), "ratios": r.ratios, "seconds": r.seconds, "model_calls": r.model_calls}
    same = single is fit.fits["joint"]
    row["joint_single"] = row["joint"] if same else {**score(ev, dc.with_ratios(s, single.ratios)),
                                                     "ratios": single.ratios, "seconds": single.seconds}
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cfg", default="1.5,3,5")
    ap.add_argument("--nfe", default="5,6,8,10")
    ap.add_argument("--heldout", default="7:2,9:4,6:4", help="NFE:CFG configurations CPR is tested on")
    ap.add_argument("--fit-samples", type=int, default=10)
    ap.add_argument("--greedy-iters", type=int, default=20)
    ap.add_argument("--joint-iters", type=int, default=30)
    ap.add_argument("--cpr-iters", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="where the network runs (cpu, cuda)")
    ap.add_argument("--cache", default="runs/cache")
    ap.add_argument("--name", default="dc", help="saves runs/bench/NAME.json")
    ap.add_argument("--no-continuation", dest="continuation", action="store_false",
                    help="joint fits from the greedy start only (no restarts from neighbouring guidance scales)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfgs = [float(v) for v in args.cfg.split(",")]
    nfes = [int(v) for v in args.nfe.split(",")]
    held = [(int(a), float(b)) for a, b in (p.split(":") for p in args.heldout.split(","))]

    evaluators = {}

    def evaluator(cfg):
        if cfg not in evaluators:
            prob = load_problem("digits-cond", guidance_scale=cfg)
            evaluators[cfg] = Evaluator(prob, cache_dir=args.cache, device=args.device, **evaluator_options(prob))
            t = time.perf_counter()
            evaluators[cfg].reference("heldout")
            print(f"held-out reference at CFG {cfg:g}: {time.perf_counter() - t:.0f} s", flush=True)
        return evaluators[cfg]

    fits = {}
    for cfg in cfgs:
        for nfe in nfes:
            for name, spec in SOLVERS.items():
                fits[(name, cfg, nfe)] = (evaluator(cfg), *fit_only(evaluator(cfg), spec, nfe, args))
                f = fits[(name, cfg, nfe)][2].fits
                print(f"CFG {cfg:g} NFE {nfe} {name}: fit loss greedy {f['greedy'].loss:.4g}, joint "
                      f"{f['joint'].loss:.4g} ({f['greedy'].seconds:.1f} + {f['joint'].seconds:.1f} s)", flush=True)
    if args.continuation:
        for name in SOLVERS:
            for nfe in nfes:
                group = [(cfg, fits[(name, cfg, nfe)][2]) for cfg in cfgs]
                k = dc.continue_across_guidance(group, iters=args.joint_iters)
                print(f"{name} NFE {nfe}: {k} of {2 * len(group) - 2} restarts across CFG improved a joint fit",
                      flush=True)
    grid = []
    for (name, cfg, nfe), (ev, sched, fit, single) in fits.items():
        row = score_fit(ev, sched, fit, single)
        row.update(cfg=cfg, name=name, solver=SOLVERS[name])
        grid.append(row)
        print(f"CFG {cfg:g} NFE {nfe} {name}: held-out MSE {row['base']['mse']:.4g} -> greedy "
              f"{row['greedy']['mse']:.4g}, joint {row['joint_single']['mse']:.4g}, continued "
              f"{row['joint']['mse']:.4g}", flush=True)

    unipc = [r for r in grid if r["name"] == "unipc"]
    cpr = dc.CPR.fit([(r["nfe"], r["cfg"], r["joint"]["ratios"]) for r in unipc])
    t = time.perf_counter()
    cases = [dc.CPRCase(f.model, f.schedule, f.x_T, f.target, nfe, cfg)
             for (name, cfg, nfe), (_, _, f, _) in fits.items() if name == "unipc"]
    cpr_e2e, history = dc.refine_cpr(cpr, cases, iters=args.cpr_iters)
    cpr_seconds = time.perf_counter() - t
    print(f"CPR refined end to end over {len(cases)} configurations: relative loss {history[0]:.4g} -> "
          f"{min(history):.4g} ({cpr_seconds:.0f} s)", flush=True)
    cpr_rows = []
    for nfe, cfg in held:
        ev = evaluator(cfg)
        sched, fit, single = fit_only(ev, SOLVERS["unipc"], nfe, args)
        if args.continuation and nfe in nfes:  # the direct fit also restarts from its fitted neighbours' ratios
            below = [c for c in cfgs if c < cfg]
            above = [c for c in cfgs if c > cfg]
            for c in [*below[-1:], *above[:1]]:
                fit.refit_joint(fits[("unipc", c, nfe)][2].fits["joint"].ratios, iters=args.joint_iters,
                                note={"from_cfg": c})
        row = score_fit(ev, sched, fit, single)
        row["solver"] = SOLVERS["unipc"]
        base = presets.build(SOLVERS["unipc"], nfe, ev.problem.noise, t_start=ev.problem.t_start,
                             t_end=ev.problem.t_end)
        row["cfg"] = cfg
        predictions = {"cpr": cpr.predict(nfe, cfg, len(base.steps)),
                       "cpr_e2e": cpr_e2e.predict(nfe, cfg, len(base.steps))}
        interp = dc.interpolate_ratios([(r["nfe"], r["cfg"], r["joint"]["ratios"]) for r in unipc], nfe, cfg)
        if interp is not None:
            predictions["interp"] = interp[0]
        for key, ratios in predictions.items():
            row[key] = {**score(ev, dc.with_ratios(base, ratios)), "ratios": ratios}
            row[f"{key}_vs_direct"] = row[key]["mse"] / row["joint"]["mse"] - 1
            row[f"{key}_vs_greedy"] = row[key]["mse"] / row["greedy"]["mse"] - 1
        cpr_rows.append(row)
        print(f"held-out NFE {nfe} CFG {cfg:g}: MSE none {row['base']['mse']:.4g}, greedy {row['greedy']['mse']:.4g}, "
              f"joint {row['joint']['mse']:.4g}, CPR {row['cpr']['mse']:.4g}, CPR end to end "
              f"{row['cpr_e2e']['mse']:.4g}", flush=True)

    reference_quality = {cfg: evaluators[cfg].problem.quality(evaluators[cfg].reference("heldout")) for cfg in cfgs}
    print_tables(grid, cpr_rows, cfgs, nfes, reference_quality)
    path = save_json(args.name, {"args": vars(args), "grid": grid, "cpr": cpr.to_dict(), "cpr_e2e": cpr_e2e.to_dict(),
                            "cpr_e2e_history": history, "cpr_e2e_seconds": cpr_seconds, "cpr_heldout": cpr_rows,
                            "reference_quality": {str(k): v for k, v in reference_quality.items()},
                            "fd_summary": {m: fd_summary(grid, reference_quality, m) for m in ("greedy", "joint")}})
    print(f"saved {path}")


def fd_summary(grid, reference_quality, method: str) -> dict:
    """How FD-digits with ``method``'s ratios compares with no DC, cell by cell, next to how the exact
    reference solution's own FD-digits compares with no DC."""
    ref = [reference_quality[r["cfg"]]["fd_digits"] > r["base"]["fd"] for r in grid]
    worse = [r[method]["fd"] > r["base"]["fd"] for r in grid]
    return {"cells": len(grid), "worse": sum(worse), "reference_worse": sum(ref),
            "worse_where_reference_worse": sum(w and x for w, x in zip(worse, ref)),
            "no_worse_where_reference_no_worse": sum(not w and not x for w, x in zip(worse, ref))}


def print_tables(grid, cpr_rows, cfgs, nfes, reference_quality):
    cells = {(r["name"], r["cfg"], r["nfe"]): r for r in grid}
    head = "".join(f"{f'{c:g}/{n}':>10}" for c in cfgs for n in nfes)
    print("\nheld-out MSE to the reference (columns CFG/NFE)")
    print(f"{'method':<34}{head}")
    for name, label in (("unipc", "UniPC"), ("dpm++2m", "DPM-Solver++(2M)")):
        for m, suffix in ROWS:
            vals = "".join(f"{cells[(name, c, n)][m]['mse']:>10.4g}" for c in cfgs for n in nfes)
            print(f"{label + suffix:<34}{vals}")
    print("\nFD-digits (held-out, 256 samples; the data's own 256-sample FD is the floor)")
    for name, label in (("unipc", "UniPC"), ("dpm++2m", "DPM-Solver++(2M)")):
        for m, suffix in ROWS:
            vals = "".join(f"{cells[(name, c, n)][m]['fd']:>10.4g}" for c in cfgs for n in nfes)
            print(f"{label + suffix:<34}{vals}")
    print(f"{'reference solution':<34}" + "".join(f"{reference_quality[c]['fd_digits']:>10.4g}"
                                                  for c in cfgs for n in nfes))
    for m in ("greedy", "joint"):
        f = fd_summary(grid, reference_quality, m)
        print(f"DC {m} against no DC: FD-digits higher in {f['worse']} of {f['cells']} cells; the exact reference "
              f"solution scores higher than no DC in {f['reference_worse']} cells, {f['worse_where_reference_worse']} "
              f"of the {f['worse']}; where it does not ({f['cells'] - f['reference_worse']} cells), DC {m} is no worse "
              f"in {f['no_worse_where_reference_no_worse']}")
    print("\nFD to the reference solutions from the same noises (held-out, 256 samples; 0 is the exact sampler)")
    for name, label in (("unipc", "UniPC"), ("dpm++2m", "DPM-Solver++(2M)")):
        for m, suffix in ROWS:
            vals = "".join(f"{cells[(name, c, n)][m]['fd_ref']:>10.4g}" for c in cfgs for n in nfes)
            print(f"{label + suffix:<34}{vals}")
    print("\nclassifier accuracy on the guided labels (UniPC, UniPC +DC joint, reference)")
    for m in ("base", "joint"):
        print(f"{m:<34}" + "".join(f"{cells[('unipc', c, n)][m]['acc']:>10.3f}" for c in cfgs for n in nfes))
    print(f"{'reference solution':<34}" + "".join(f"{reference_quality[c]['accuracy']:>10.3f}"
                                                  for c in cfgs for n in nfes))
    print("\nfit seconds (greedy + joint, with the joint restarts) for UniPC")
    secs = [cells[("unipc", c, n)]["greedy"]["seconds"] + cells[("unipc", c, n)]["joint"]["seconds"]
            for c in cfgs for n in nfes]
    print(f"{'':<34}" + "".join(f"{v:>10.1f}" for v in secs))
    print("\nCPR on held-out configurations (UniPC): held-out MSE with predicted ratios, and its change against"
          " the ratios fitted directly there (greedy, as DC-Solver fits them; joint)")
    for r in cpr_rows:
        print(f"  NFE {r['nfe']:>2} CFG {r['cfg']:<4g} none {r['base']['mse']:.4g}  greedy {r['greedy']['mse']:.4g}  "
              f"joint {r['joint_single']['mse']:.4g}  joint with restarts {r['joint']['mse']:.4g} (the direct fit)")
        for key, label in (("cpr", "CPR (regression)"), ("cpr_e2e", "CPR (end to end)"), ("interp", "interpolated")):
            if key not in r:
                continue
            print(f"      {label:<18} {r[key]['mse']:.4g}  vs greedy {100 * r[f'{key}_vs_greedy']:+.1f}%  "
                  f"vs joint {100 * r[f'{key}_vs_direct']:+.1f}%  FD-digits {r[key]['fd']:.4g}  "
                  f"FD to reference {r[key]['fd_ref']:.4g}")


if __name__ == "__main__":
    main()
