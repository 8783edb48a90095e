"""Time of one DC fit (greedy, then joint from greedy's ratios; 10 fit noises, DC-Solver's iteration
counts) per (NFE, CFG) on digits-cond with UniPC, on each device asked for. The converged references
are computed (or loaded) and a warm-up fit is run before timing, so the figures are the fit alone.

    python bench/dc_fit_time.py                         # cpu with 2 threads, and cuda when there is one
    python bench/dc_fit_time.py --devices cpu --configs 5:3 --repeats 1   # quick
Saves runs/bench/dc_fit_time.json (``--name``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_json  # noqa: E402

from steptune.evaluators import Evaluator, evaluator_options, load_problem  # noqa: E402
from steptune.search import dc  # noqa: E402
from steptune.space import presets  # noqa: E402


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_fits(device: str, configs, args) -> list[dict]:
    rows = []
    evaluators = {}
    for nfe, cfg in configs:
        if cfg not in evaluators:
            prob = load_problem("digits-cond", guidance_scale=cfg)
            evaluators[cfg] = Evaluator(prob, cache_dir=args.cache, device=device, **evaluator_options(prob))
        ev = evaluators[cfg]
        s = presets.build("unipc-bh2", nfe, ev.problem.noise, t_start=ev.problem.t_start, t_end=ev.problem.t_end)
        fit = dc.fit_config(ev, s, fit_samples=args.fit_samples)  # warm-up: references, kernels, allocator
        seconds = []
        for _ in range(args.repeats):
            sync(device)
            t = time.perf_counter()
            fit = dc.fit_config(ev, s, fit_samples=args.fit_samples)
            sync(device)
            seconds.append(time.perf_counter() - t - fit.reference_seconds)
        f = fit.fits
        rows.append({"device": device, "nfe": nfe, "cfg": cfg, "seconds": statistics.median(seconds),
                     "all_seconds": seconds, "greedy_seconds": f["greedy"].seconds, "joint_seconds": f["joint"].seconds,
                     "model_calls": f["greedy"].model_calls + f["joint"].model_calls,
                     "loss_start": f["greedy"].loss_start, "loss_greedy": f["greedy"].loss,
                     "loss_joint": f["joint"].loss,
                     "ratios_joint": f["joint"].ratios})
        r = rows[-1]
        print(f"{device:<8} NFE {nfe:>2} CFG {cfg:<4g} {r['seconds']:8.2f} s  ({r['model_calls']} model calls; "
              f"fit loss {r['loss_start']:.4g} -> greedy {r['loss_greedy']:.4g} -> joint {r['loss_joint']:.4g})",
              flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", default=None, help="comma list (default: cpu, and cuda when torch sees one)")
    ap.add_argument("--configs", default="5:3,10:3", help="NFE:CFG list")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--fit-samples", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cache", default="runs/cache")
    ap.add_argument("--name", default="dc_fit_time")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    devices = args.devices.split(",") if args.devices else ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
    configs = [(int(a), float(b)) for a, b in (c.split(":") for c in args.configs.split(","))]
    rows = [r for d in devices for r in time_fits(d, configs, args)]
    print(f"\nDC fit time per configuration (greedy + joint, {args.fit_samples} noises, median of {args.repeats})")
    print(f"{'configuration':<18}" + "".join(f"{d:>12}" for d in devices))
    for nfe, cfg in configs:
        cells = {r["device"]: r["seconds"] for r in rows if (r["nfe"], r["cfg"]) == (nfe, cfg)}
        print(f"{f'NFE {nfe}, CFG {cfg:g}':<18}" + "".join(f"{cells[d]:>11.2f}s" for d in devices))
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    print(f"saved {save_json(args.name, {'args': vars(args), 'gpu': name, 'rows': rows})}")


if __name__ == "__main__":
    main()
