"""A search on the guided digits model against the best-spacing presets at higher NFE.

Runs, per seed, the command users run (a fresh database each time, the reference cache shared):

    steptune search --problem digits-cond --guidance G --nfe N --budget B --seed S [--refine ITERS]

and reads the study back: the searched schedule's held-out RMSE (and the refined one's), the best preset at its
best spacing at the searched NFE and at ``--against`` (the baselines the search stores up to twice the NFE), the
whole command's wall time and the search's own (its evaluations, without the baselines), and where the schedule
starts and ends. Prints a table, saves runs/bench/guided_search.json.

    OMP_NUM_THREADS=1 .venv/bin/python bench/guided_search.py [--guidance 5] [--nfe 5] [--budget 300]
        [--seeds 0] [--against 8] [--refine 0]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import OUT, save_json

from steptune.search.baselines import with_spacing
from steptune.storage import connect

ROOT = Path(__file__).resolve().parents[1]


def best_baseline(trials, nfe: int):
    """The best preset at its best spacing on the held-out bank at ``nfe`` (a diffusers default is not a preset)."""
    rows = [t for t in trials if t.info.get("baseline") and t.fidelity == "heldout" and t.nfe == nfe
            and t.status == "complete" and t.score is not None and t.info.get("origin", "").startswith("preset:")]
    return min(rows, key=lambda t: t.score, default=None)


def baseline_name(t) -> str:
    name, _, rest = t.info["origin"].removeprefix("preset:").rpartition("@")
    return with_spacing(name, rest.partition(" ")[2].removeprefix("spacing=") or None)


def run_one(args, seed: int) -> dict:
    db = OUT / f"guided_search_s{seed}.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    study = f"guided-search-g{args.guidance:g}-nfe{args.nfe}-s{seed}"
    cmd = [sys.executable, "-m", "steptune", "search", "--problem", "digits-cond", "--guidance", str(args.guidance),
           "--nfe", str(args.nfe), "--budget", str(args.budget), "--seed", str(seed), "--study", study,
           "--db", f"sqlite:///{db}", "--out", str(OUT / "guided_search"), "--json"]
    if args.refine:
        cmd += ["--refine", str(args.refine)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"seed {seed}: the search failed:\n{proc.stderr[-2000:]}")
    payload = json.loads(proc.stdout)
    (row,) = payload["results"]
    with connect(f"sqlite:///{db}") as store:
        trials = store.trials(study)
    here, there = best_baseline(trials, args.nfe), best_baseline(trials, args.against)
    sched = row["schedule"]
    refined = row.get("refined") or {}
    best = refined.get("rmse") if refined else row["searched_rmse"]
    search_cost = next(c for c in payload["cost"]["per_nfe"] if c["nfe"] == args.nfe)
    return {"seed": seed, "searched_rmse": row["searched_rmse"], "refined_rmse": refined.get("rmse"),
            "refine_improved": refined.get("improved"), "best_rmse": best,
            "preset": baseline_name(here), "preset_rmse": here.score,
            "against_preset": baseline_name(there), "against_rmse": there.score,
            "beats_against": best < there.score, "preset_matches_at_nfe": row["preset_matches_at_nfe"],
            "found_at_eval": row["found_at_eval"], "evaluations": payload["n_evals"],
            "search_wall_s": search_cost["wall_seconds"], "command_wall_s": wall,
            "t_start": sched["t_start"], "ends_at_zero": sched["steps"][-1]["t"] == 0.0,
            "last_time": sched["steps"][-2]["t"] if sched["steps"][-1]["t"] == 0.0 else sched["steps"][-1]["t"],
            "orders": [st.get("order", 1) for st in sched["steps"]], "schedule": sched, "command": " ".join(cmd[2:])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--nfe", type=int, default=5)
    ap.add_argument("--budget", type=int, default=300)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--against", type=int, default=8, help="the higher NFE whose best preset the search should beat")
    ap.add_argument("--refine", type=int, default=0, help="gradient iterations after the search (0: none)")
    args = ap.parse_args()
    if not args.nfe < args.against <= min(2 * args.nfe, 20):
        raise SystemExit(f"--against {args.against} must be above --nfe {args.nfe} and at most twice it (the "
                         "presets a search stores)")
    rows = []
    for seed in args.seeds.split(","):  # saved after each seed: a long run leaves what it measured
        rows.append(run_one(args, int(seed)))
        path = save_json("guided_search", {"guidance": args.guidance, "nfe": args.nfe, "budget": args.budget,
                                           "against": args.against, "refine": args.refine, "rows": rows})
    head = (f"digits-cond, guidance {args.guidance:g}, NFE {args.nfe}, budget {args.budget}: held-out RMSE "
            f"(256 noises) against the best preset at its best spacing at NFE {args.nfe} and {args.against}")
    print(head)
    cols = ["seed", "searched", "refined", f"best preset @{args.nfe}", f"best preset @{args.against}", "beats",
            "start", "end", "search s", "command s"]
    print(" | ".join(cols))
    for r in rows:
        ref = "—" if r["refined_rmse"] is None else f"{r['refined_rmse']:.4f}"
        end = "t=0 after " + f"{r['last_time']:.3g}" if r["ends_at_zero"] else f"{r['last_time']:.3g}"
        print(" | ".join([str(r["seed"]), f"{r['searched_rmse']:.4f}", ref,
                          f"{r['preset']} {r['preset_rmse']:.4f}", f"{r['against_preset']} {r['against_rmse']:.4f}",
                          "yes" if r["beats_against"] else "no", f"{r['t_start']:.3g}", end,
                          f"{r['search_wall_s']:.0f}", f"{r['command_wall_s']:.0f}"]))
    print(f"saved {path}")


if __name__ == "__main__":
    main()
