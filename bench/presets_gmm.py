"""RMSE of every preset at NFE 3..20 on gmm-digits, with time-uniform and logSNR spacings.

    python bench/presets_gmm.py [--problem gmm-digits] [--noise vp-linear] [--nfe 3-20] [--bank heldout]

Prints one table per spacing, saves runs/bench/presets_gmm.json and runs/bench/presets_gmm.png.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, save_json  # noqa: E402

from steptune import sweep  # noqa: E402
from steptune.evaluators import Evaluator, get_problem  # noqa: E402
from steptune.resolve import parse_nfe_list  # noqa: E402
from steptune.search import DEFAULT_PRESETS  # noqa: E402

SPACINGS = ("time-uniform", "logsnr")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--problem", default="gmm-digits")
    ap.add_argument("--noise", default="vp-linear")
    ap.add_argument("--nfe", default="3-20")
    ap.add_argument("--bank", default="heldout")
    ap.add_argument("--replot", action="store_true", help="Only redraw the PNG from the saved JSON.")
    args = ap.parse_args()
    if args.replot:
        import json

        print(plot(json.loads((OUT / "presets_gmm.json").read_text())["results"], args))
        return
    nfes = parse_nfe_list(args.nfe)
    ev = Evaluator(get_problem(args.problem, noise=args.noise))
    t0 = time.perf_counter()
    ev.reference(args.bank)
    ref_s = time.perf_counter() - t0
    results = {}
    for sp in SPACINGS:
        rows = sweep.run_sweep(ev, DEFAULT_PRESETS, nfes, sp, args.bank)
        results[sp] = rows
        print(f"\n## {args.problem} ({args.noise}), {sp} spacing, RMSE to the exact ODE solution "
              f"({args.bank} bank, best per NFE in bold)\n")
        print(sweep.markdown_table(rows))
    path = save_json("presets_gmm", {"problem": args.problem, "noise": args.noise, "bank": args.bank,
                                     "samples": ev.bank(args.bank).size, "reference_seconds": ref_s,
                                     "results": results})
    png = plot(results, args)
    print(f"\nsaved {path} and {png}")


def plot(results: dict, args) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 5), sharey=True)
    for ax, (sp, rows) in zip(axes, results.items()):
        specs, nfes, cells = sweep.pivot(rows)
        colors = plt.cm.tab20.colors
        for k, s in enumerate(specs):
            xs = [n for n in nfes if cells.get((s, n)) is not None]
            ax.plot(xs, [cells[(s, n)] for n in xs], marker="os^v"[k % 4], ms=3, color=colors[(2 * k) % 20 + k // 10],
                    ls="-" if k % 2 == 0 else "--", label=s)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(nfes)
        ax.set_xticklabels([str(n) for n in nfes], fontsize=7)
        ax.set_xlabel("NFE")
        ax.set_title(f"{args.problem} ({args.noise}), {sp}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel(f"RMSE to exact ODE solution ({args.bank} bank)")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "presets_gmm.png"
    fig.savefig(path, dpi=120)
    return path


if __name__ == "__main__":
    main()
