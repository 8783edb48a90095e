"""Sample grids on digits-cond: what `steptune eval --grid` draws and what it costs. For each guidance scale, the
grid of a preset at one NFE: the best preset found (the default presets at every spacing, lowest train-bank RMSE),
the mean of the per-sample errors of the schedule and of the best preset over the grid's 8 held-out noises, and
the seconds of each part (the reference of the 8 noises, uncached; the best-preset search; sampling and decoding
the columns; the PNG). Saves runs/bench/grids.json and one PNG per guidance scale.

    OMP_NUM_THREADS=1 python bench/grids.py [--guidance 1.5,3,5] [--nfe 5] [--schedule unipc-bh2] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, save_json  # noqa: E402

from steptune import grids  # noqa: E402
from steptune.evaluators.digits_cond import digits_problem  # noqa: E402
from steptune.space import presets  # noqa: E402


def one(guidance: float, nfe: int, spec: str) -> dict:
    prob = digits_problem(guidance_scale=guidance)
    sched = presets.build(spec, nfe, prob.noise, t_start=prob.t_start, t_end=prob.t_end)
    ev = grids.grid_evaluator(prob, None)
    t0 = time.perf_counter()
    ev.reference("heldout")
    t1 = time.perf_counter()
    best = grids.best_default_preset(ev, nfe)
    t2 = time.perf_counter()
    grid = grids.build_grid(ev, sched, best, f"preset:{spec}", grids.CHOSEN_DEFAULT)
    t3 = time.perf_counter()
    png = grid.png()
    t4 = time.perf_counter()
    path = OUT / f"grid-digits-cond-g{guidance:g}-nfe{nfe}.png"
    path.write_bytes(png)
    mine, theirs = (sum(c.errors) / len(c.errors) for c in grid.columns[:2])
    return {"guidance": guidance, "nfe": nfe, "schedule": spec, "best_preset": best[0], "mean_error": mine,
            "best_mean_error": theirs, "reference_s": t1 - t0, "best_preset_s": t2 - t1, "columns_s": t3 - t2,
            "png_s": t4 - t3, "png_bytes": len(png), "png": str(path)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--guidance", default="1.5,3,5")
    ap.add_argument("--nfe", type=int, default=5)
    ap.add_argument("--schedule", default="unipc-bh2")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    OUT.mkdir(parents=True, exist_ok=True)
    rows = [one(float(g), args.nfe, args.schedule) for g in args.guidance.split(",")]
    print(f"{'guidance':>8} {'schedule err':>12} {'best preset':>34} {'its err':>8} {'ref s':>6} {'best s':>7} "
          f"{'cols s':>7} {'png s':>6}")
    for r in rows:
        print(f"{r['guidance']:>8g} {r['mean_error']:>12.3f} {r['best_preset']:>34} {r['best_mean_error']:>8.3f} "
              f"{r['reference_s']:>6.1f} {r['best_preset_s']:>7.1f} {r['columns_s']:>7.2f} {r['png_s']:>6.2f}")
    print(f"saved {save_json('grids', {'rows': rows})} and {len(rows)} PNGs under {OUT}")


if __name__ == "__main__":
    main()
