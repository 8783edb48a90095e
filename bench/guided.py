"""Guided sampling on digits-cond: the baselines users run against DC-UniPC.

Per guidance scale (1.5, 3, 5) and NFE (5, 6, 8), on the held-out bank (RMSE to the converged reference from the
same noises):

* every preset at its default spacing (logSNR) and at the best of its spacings (logSNR, time-uniform,
  time-quadratic, diffusers' linspace/leading/trailing), the spacing chosen on the train bank;
* diffusers' stock schedulers with their default config, run by their own step loop on the same noises;
* DC-UniPC: unipc-bh2 at its best spacing with DC-Solver ratios fitted (greedy then joint) on 10 train-bank
  noises, in DC-Solver's box (0.3, 1.7) and in the unbounded log form, and the box fit on the logSNR base
  (where guidance pins the last ratio on the box's lower bound);
* DC (log form) on the cell's best preset at its best spacing.

Prints a table, saves runs/bench/guided.json, guided.md and guided.png.

    OMP_NUM_THREADS=1 .venv/bin/python bench/guided.py [--guidance 1.5,3,5] [--nfe 5,6,8]
"""

from __future__ import annotations

import argparse
import time

import torch
from common import OUT, save_json

from steptune import diffusers_default
from steptune.evaluators import Evaluator
from steptune.evaluators.digits_cond import digits_problem
from steptune.search import DEFAULT_PRESETS, baselines, dc
from steptune.space import ScheduleError, presets

DC_BASE = "unipc-bh2"


def preset_rows(ev, nfe: int) -> dict[str, dict]:
    p = ev.problem
    out = {}
    for spec in DEFAULT_PRESETS:
        variants = baselines.spacing_variants(spec, nfe, p.noise, p.t_start, p.t_end)
        if not variants:
            continue
        train = {sp: ev.evaluate(s, "train").metrics["rmse"] for sp, s in variants}
        best = baselines.best_spacing(train)
        sched = dict(variants)[best]
        held = ev.evaluate(sched, "heldout").metrics
        try:
            default = ev.evaluate(presets.build(spec, nfe, p.noise, t_start=p.t_start, t_end=p.t_end),
                                  "heldout").metrics["rmse"]
        except ScheduleError:
            default = None
        out[spec] = {"spacing": best, "train": train, "rmse": held["rmse"], "fd_reference": held["fd_reference"],
                     "rmse_default_spacing": default, "schedule": sched}
    return out


def diffusers_rows(ev, nfe: int) -> dict[str, dict]:
    out = {}
    for name in diffusers_default.SCHEDULERS:
        res, _ = diffusers_default.evaluate(ev, name, nfe, "heldout")
        out[name] = {"rmse": res.metrics["rmse"], "fd_reference": res.metrics.get("fd_reference"),
                     "status": res.status}
    return out


def dc_rows(ev, base_schedule, logsnr_schedule) -> dict:
    out = {"base_rmse": ev.evaluate(base_schedule, "heldout").metrics["rmse"]}
    for label, sched, bounds in (("box", base_schedule, dc.BOUNDS), ("log", base_schedule, None),
                                 ("box_logsnr", logsnr_schedule, dc.BOUNDS)):
        start = time.perf_counter()
        fit = dc.fit_config(ev, sched, bounds=bounds)
        ratios = fit.fits["joint"].ratios
        res = ev.evaluate(fit.fitted("joint"), "heldout").metrics
        out[label] = {"rmse": res["rmse"], "fd_reference": res["fd_reference"], "ratios": ratios,
                      "greedy_ratios": fit.fits["greedy"].ratios, "on_bound": dc.on_bound(ratios, bounds),
                      "greedy_on_bound": dc.on_bound(fit.fits["greedy"].ratios, bounds),
                      "seconds": time.perf_counter() - start}
    out["logsnr_base_rmse"] = ev.evaluate(logsnr_schedule, "heldout").metrics["rmse"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--guidance", default="1.5,3,5")
    ap.add_argument("--nfe", default="5,6,8")
    args = ap.parse_args()
    torch.set_num_threads(1)
    guidances = [float(g) for g in args.guidance.split(",")]
    nfes = [int(n) for n in args.nfe.split(",")]
    cells = []
    for g in guidances:
        p = digits_problem(guidance_scale=g)
        ev = Evaluator(p, n_train=64, n_heldout=256, cache_dir=OUT.parent / "cache")
        for nfe in nfes:
            start = time.perf_counter()
            pre = preset_rows(ev, nfe)
            dif = diffusers_rows(ev, nfe)
            logsnr = presets.build(DC_BASE, nfe, p.noise, t_start=p.t_start, t_end=p.t_end)
            dcr = dc_rows(ev, pre[DC_BASE]["schedule"], logsnr)
            best_preset = min(pre, key=lambda k: pre[k]["rmse"])
            fit = dc.fit_config(ev, pre[best_preset]["schedule"], bounds=None)
            dcr["best_preset"] = {"preset": best_preset, "spacing": pre[best_preset]["spacing"],
                                  "rmse": ev.evaluate(fit.fitted("joint"), "heldout").metrics["rmse"],
                                  "ratios": fit.fits["joint"].ratios}
            best_dif = min(dif, key=lambda k: dif[k]["rmse"])
            cell = {"guidance": g, "nfe": nfe, "seconds": time.perf_counter() - start,
                    "presets": {k: {kk: vv for kk, vv in v.items() if kk != "schedule"} for k, v in pre.items()},
                    "diffusers_default": dif, "dc_unipc": dcr, "best_preset": best_preset,
                    "best_preset_rmse": pre[best_preset]["rmse"], "best_preset_spacing": pre[best_preset]["spacing"],
                    "best_default_spacing_rmse": min(v["rmse_default_spacing"] for v in pre.values()
                                                     if v["rmse_default_spacing"] is not None),
                    "best_diffusers": best_dif, "best_diffusers_rmse": dif[best_dif]["rmse"]}
            cells.append(cell)
            print(f"guidance {g:g} NFE {nfe}: best preset {best_preset} ({cell['best_preset_spacing']}) "
                  f"{cell['best_preset_rmse']:.4f}; best diffusers default {best_dif} {dif[best_dif]['rmse']:.4f}; "
                  f"UniPC {pre[DC_BASE]['spacing']} {dcr['base_rmse']:.4f} -> DC {dcr['log']['rmse']:.4f} "
                  f"(box {dcr['box']['rmse']:.4f}); DC on {best_preset} {dcr['best_preset']['rmse']:.4f}; "
                  f"[{cell['seconds']:.0f}s]", flush=True)
    targets = _targets(cells)
    payload = {"problem": "digits-cond", "bank": "heldout", "samples": 256, "cells": cells, "targets": targets}
    path = save_json("guided", payload)
    md = _markdown(cells, targets)
    (OUT / "guided.md").write_text(md)
    print(md)
    _plot(cells, guidances, nfes)
    print(f"saved {path}, {OUT / 'guided.md'} and {OUT / 'guided.png'}")


def _cell(cells, g, nfe):
    return next((c for c in cells if c["guidance"] == g and c["nfe"] == nfe), None)


def _targets(cells) -> dict:
    out = {"dc_never_worse": all(min(c["dc_unipc"]["log"]["rmse"], c["dc_unipc"]["box"]["rmse"])
                                 <= c["dc_unipc"]["base_rmse"] for c in cells),
           "dc_log_never_worse": all(c["dc_unipc"]["log"]["rmse"] <= c["dc_unipc"]["base_rmse"] for c in cells)}
    a, b = _cell(cells, 5.0, 5), _cell(cells, 5.0, 6)
    if a and b:
        dcv = a["dc_unipc"]["log"]["rmse"]
        dpm = b["presets"]["dpm-solver++-2m"]["rmse"]
        out["dc_unipc_g5_nfe5"] = dcv
        out["dpmpp2m_g5_nfe6_best_spacing"] = dpm
        out["dc_unipc_g5_nfe5_le_dpmpp2m_nfe6"] = dcv <= dpm
    return out


def _markdown(cells, targets) -> str:
    lines = ["| guidance | NFE | best preset (spacing) | same preset at logSNR | best diffusers default | "
             "UniPC best spacing | DC-UniPC (log) | DC-UniPC (box) | last ratio (box, logSNR base) | "
             "DC on the best preset (log) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        d = c["dc_unipc"]
        lines.append(
            f"| {c['guidance']:g} | {c['nfe']} | {c['best_preset']} ({c['best_preset_spacing']}) "
            f"{c['best_preset_rmse']:.4f} | {c['presets'][c['best_preset']]['rmse_default_spacing']:.4f} | "
            f"{c['best_diffusers'].removesuffix('Scheduler')} {c['best_diffusers_rmse']:.4f} | "
            f"{c['presets'][DC_BASE]['spacing']} {d['base_rmse']:.4f} | {d['log']['rmse']:.4f} | "
            f"{d['box']['rmse']:.4f} | {d['box_logsnr']['ratios'][-1]:.3f} | {d['best_preset']['rmse']:.4f} |")
    lines.append("")
    lines.append("Targets: " + ", ".join(f"{k} = {v:.4f}" if isinstance(v, float) else f"{k} = {v}"
                                         for k, v in targets.items()))
    return "\n".join(lines) + "\n"


def _plot(cells, guidances, nfes) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(guidances), figsize=(4.2 * len(guidances), 3.6), sharey=True)
    for ax, g in zip(axes if len(guidances) > 1 else [axes], guidances):
        cs = [_cell(cells, g, n) for n in nfes]
        series = {
            "best preset, logSNR": [c["best_default_spacing_rmse"] for c in cs],
            "best preset, best spacing": [c["best_preset_rmse"] for c in cs],
            "best diffusers default": [c["best_diffusers_rmse"] for c in cs],
            "UniPC, best spacing": [c["dc_unipc"]["base_rmse"] for c in cs],
            "DC-UniPC (log form)": [c["dc_unipc"]["log"]["rmse"] for c in cs],
            "DC on the best preset (log form)": [c["dc_unipc"]["best_preset"]["rmse"] for c in cs],
        }
        for label, ys in series.items():
            ax.plot(nfes, ys, marker="o", label=label)
        ax.set_yscale("log")
        ax.set_title(f"digits-cond, guidance {g:g}")
        ax.set_xlabel("NFE")
        ax.set_xticks(nfes)
    (axes[0] if len(guidances) > 1 else axes).set_ylabel("held-out RMSE to the reference")
    (axes[-1] if len(guidances) > 1 else axes).legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(OUT / "guided.png", dpi=110)


if __name__ == "__main__":
    main()
