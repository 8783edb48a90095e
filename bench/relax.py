"""SOR relaxation tuning over sequences of linear systems: learners against baselines, kernel speed.

1. Shifted Laplacian (10×10 grid, n = 100, tol 1e-8, x0 = 0), low and high variance, ``--steps``
   instances per sequence, ``--seeds`` sequences (seed s: sequence s and learner seed s). Costs come from
   a cost table (every instance × every grid ω), which is exact here because x0 does not depend on the
   policy. Reported in mean iterations per instance: Gauss–Seidel, fixed ω, best fixed grid ω in
   hindsight, Tsallis-INF, Tsallis-INF with 5 context bins, ChebCB, instance-optimal over the grid,
   the closed-form ω*(c_t) and classical adaptive SOR (run for real, it is not a grid policy).
2. heat2d (``--nx``, ``--heat-steps`` Crank–Nicolson steps, SSOR-PCG warm-started): learners replayed on
   the table for iterations; then SSOR ω = 1, the best fixed ω, Tsallis-INF and ChebCB run online, in
   lockstep, with PyAMG sweeps for wall-clock, the learner's own ask/tell time measured apart (overhead).
3. Kernel speed: one forward SOR sweep on the 200×200 Laplacian, our compiled kernel vs PyAMG's C++
   sweep, interleaved in one process; median time ratio.

    python bench/relax.py                      # full run; tables cached under runs/bench/relax_tables
    python bench/relax.py --seeds 2 --steps 1000 --heat-steps 200 --nx 50   # quick
    python bench/relax.py --ray                # shifted-Laplacian tables built as Ray tasks
    python bench/relax.py --replot             # redraw the PNG from the saved JSON

Saves runs/bench/relax.json and relax.png and prints tables.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, save_json  # noqa: E402
from pyamg.relaxation import relaxation  # noqa: E402

from steptune.evaluators.linear import (  # noqa: E402
    Heat2D,
    ShiftedLaplacian,
    build_cost_table,
    kernels,
    poisson_2d,
)
from steptune.evaluators.linear.solvers import solve  # noqa: E402
from steptune.search.sor_driver import adaptive_costs, replay_costs  # noqa: E402
from steptune.search.sor_learners import (  # noqa: E402
    AdaptiveSOR,
    ChebCB,
    FixedOmega,
    TsallisINF,
    TsallisINFBins,
    warm_up,
)

TABLES = OUT / "relax_tables"
RAY = False  # build stateless cost tables as Ray tasks (--ray)


def learners(seed: int, context_range) -> dict:
    return {"tsallis-inf": TsallisINF(seed=seed),
            "tsallis-inf-cb (5 bins)": TsallisINFBins(seed=seed, context_range=context_range, bins=5),
            "chebcb": ChebCB(seed=seed, context_range=context_range)}


def closed_form_costs(seq: ShiftedLaplacian) -> np.ndarray:
    """Iterations at ω*(c_t) = 2/(1 + √(1 − μ(c_t)²)), solved per instance with the compiled kernel."""
    A = seq.base
    out = np.empty(len(seq), dtype=np.int64)
    for t in range(len(seq)):
        x = np.zeros(A.shape[0])
        out[t], _ = kernels.sor_solve(A.indptr, A.indices, A.data, x, seq.rhs[t], seq.optimal_omega(t),
                                      float(seq.shifts[t]), 1e-8, 10_000, False)
    return out


def shifted(variance: str, seeds: int, steps: int, log) -> dict:
    per_seed = []
    for s in range(seeds):
        seq = ShiftedLaplacian(steps, m=10, variance=variance, seed=s)
        tick = time.perf_counter()
        table = build_cost_table(seq, cache=TABLES, ray=RAY)
        log(f"  {variance} seed {s}: table {table.iterations.shape} in {time.perf_counter() - tick:.1f}s "
            f"(built {table.seconds:.1f}s)")
        its = table.iterations
        arm, _ = table.best_fixed()
        curves = {"gauss-seidel (ω=1)": its[:, 0]}
        for w in (1.2, 1.4, 1.6, 1.8):
            curves[f"fixed ω={w}"] = its[:, int(np.argmin(np.abs(table.omegas - w)))]
        curves["best fixed ω (hindsight)"] = its[:, arm]
        curves["_best fixed ω value"] = np.array([table.omegas[arm]])
        for name, learner in learners(s, seq.context_range).items():
            tick = time.perf_counter()
            curves[name] = replay_costs(learner, table)
            curves[f"_{name} replay seconds"] = np.array([time.perf_counter() - tick])
        curves["instance-optimal (grid)"] = its.min(axis=1)
        curves["ω*(c_t) closed form"] = closed_form_costs(seq)
        curves["adaptive SOR"] = adaptive_costs(seq, AdaptiveSOR())
        per_seed.append(curves)
    return summarise(per_seed)


def summarise(per_seed: list[dict]) -> dict:
    names = [k for k in per_seed[0] if not k.startswith("_")]
    rows = {}
    for k in names:
        key = k if k in per_seed[0] else k
        means = [float(np.mean(c[key])) for c in per_seed if key in c]
        last = [float(np.mean(c[key][-1000:])) for c in per_seed if key in c]
        rows[k] = {"mean": float(np.mean(means)), "sd_over_seeds": float(np.std(means)),
                   "last_1000": float(np.mean(last)), "per_seed": means}
    best = next(v["mean"] for k, v in rows.items() if k.startswith("best fixed"))
    opt = rows["instance-optimal (grid)"]["mean"]
    for v in rows.values():
        v["vs_best_fixed"] = v["mean"] / best
        v["vs_instance_optimal"] = v["mean"] / opt
    curve = {k: np.cumsum(per_seed[0][k]).tolist()[:: max(1, len(per_seed[0][k]) // 500)] for k in names}
    T = len(per_seed[0][names[0]])
    overhead = {k[1:-15]: float(np.mean([c[k][0] for c in per_seed])) / T
                for k in per_seed[0] if k.endswith(" replay seconds")}
    best_omegas = [float(c["_best fixed ω value"][0]) for c in per_seed]
    return {"rows": rows, "cumulative_seed0": curve, "learner_seconds_per_round_replay": overhead,
            "best_fixed_omega_per_seed": best_omegas}


def heat(nx: int, steps: int, seeds: int, log) -> dict:
    seq = Heat2D(nx=nx, steps=steps)
    tick = time.perf_counter()
    table = build_cost_table(seq, solver="ssor-pcg", cache=TABLES,
                             progress=lambda d, t: log(f"  heat2d table {d}/{t}") if d % 250 == 0 else None)
    log(f"  heat2d table {table.iterations.shape} in {time.perf_counter() - tick:.1f}s")
    its = table.iterations
    arm, _ = table.best_fixed()
    per_seed = []
    for s in range(seeds):
        curves = {"gauss-seidel-ssor (ω=1)": its[:, 0],
                  "best fixed ω (hindsight)": its[:, arm], "_best fixed ω value": np.array([table.omegas[arm]])}
        for name, learner in learners(s, seq.context_range).items():
            curves[name] = replay_costs(learner, table)
        curves["instance-optimal (grid)"] = its.min(axis=1)
        per_seed.append(curves)
    out = summarise(per_seed)
    out["online"] = online_wall_clock(seq, {
        "gauss-seidel-ssor (ω=1)": lambda: FixedOmega(1.0),
        "best fixed ω": lambda: FixedOmega(float(table.omegas[arm])),
        "tsallis-inf": lambda: TsallisINF(seed=0),
        "chebcb": lambda: ChebCB(seed=0, context_range=seq.context_range, context_key="kappa")}, table, log)
    out["table_seconds"] = table.seconds
    return out


def online_wall_clock(seq, makers: dict, table, log) -> dict:
    """Each policy solves the sequence online on its own warm-started trajectory with PyAMG sweeps. The
    policies advance in lockstep (step t for all, then t + 1), so load changes on a shared machine hit
    them alike. Learner time (ask + tell) is measured apart from solve time; the learner is also timed
    alone in a tight loop over the cost table."""
    policies = {k: make() for k, make in makers.items()}
    states = {k: seq.start(0) for k in policies}
    stats = {k: {"iterations": 0, "solve_seconds": 0.0, "learner_seconds": 0.0} for k in policies}
    warm_up()
    for t in range(len(seq)):
        for name, policy in policies.items():
            system = seq.system(t, states[name])
            tick = time.perf_counter()
            a = policy.ask(system.context.get(policy.context_key) if policy.context_key else None)
            asked = time.perf_counter() - tick
            res = solve(system.A, system.b, a.omega, solver="ssor-pcg", x0=system.x0, kernel="pyamg")
            tick = time.perf_counter()
            policy.tell(res.iterations)
            st = stats[name]
            st["learner_seconds"] += asked + time.perf_counter() - tick
            st["solve_seconds"] += res.seconds
            st["iterations"] += res.iterations
            states[name] = res.x
        if (t + 1) % 1000 == 0:
            log(f"  heat2d online step {t + 1}/{len(seq)}")
    for name, st in stats.items():
        st["iterations_mean"] = st["iterations"] / len(seq)
        st["learner_overhead_pct_of_solve"] = 100 * st["learner_seconds"] / st["solve_seconds"]
        fresh = makers[name]()
        tick = time.perf_counter()
        replay_costs(fresh, table)  # a one-arm learner replays column 0; only the time matters here
        per_round = (time.perf_counter() - tick) / len(table)
        st["learner_us_per_round_tight_loop"] = 1e6 * per_round
        st["tight_loop_overhead_pct_of_solve"] = 100 * per_round * len(seq) / st["solve_seconds"]
    return stats


def kernel_speed(m: int = 200, repeats: int = 31) -> dict:
    A = poisson_2d(m)
    b = np.random.default_rng(0).standard_normal(m * m)
    x1, x2 = np.zeros(m * m), np.zeros(m * m)
    kernels.sor_sweep(A.indptr, A.indices, A.data, x1, b, 1.5, 0.0, True)  # compile / warm up
    relaxation.sor(A, x2, b, 1.5, iterations=1)
    ours, theirs = [], []
    for _ in range(repeats):
        tick = time.perf_counter()
        kernels.sor_sweep(A.indptr, A.indices, A.data, x1, b, 1.5, 0.0, True)
        ours.append(time.perf_counter() - tick)
        tick = time.perf_counter()
        relaxation.sor(A, x2, b, 1.5, iterations=1, sweep="forward")
        theirs.append(time.perf_counter() - tick)
    same = bool(np.allclose(x1, x2, rtol=1e-10, atol=1e-12))
    ratios = np.array(ours) / np.array(theirs)
    return {"n": m * m, "ours_ms_median": 1e3 * float(np.median(ours)),
            "pyamg_ms_median": 1e3 * float(np.median(theirs)), "ratio_median": float(np.median(ratios)),
            "ratio_of_medians": float(np.median(ours) / np.median(theirs)),
            "same_iterates": same}


def print_rows(title: str, rows: dict) -> None:
    print(f"\n{title}")
    print(f"{'policy':42s} {'mean it':>9s} {'± sd':>7s} {'last 1000':>10s} {'/best fixed':>12s} {'/inst-opt':>10s}")
    for k, v in rows.items():
        print(f"{k:42s} {v['mean']:9.2f} {v['sd_over_seeds']:7.2f} {v['last_1000']:10.2f} {v['vs_best_fixed']:12.3f} "
              f"{v['vs_instance_optimal']:10.3f}")


def plot(result: dict, path: Path) -> None:
    """Cumulative iterations of each policy over the instance-optimal grid policy's (seed 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("shifted Laplacian, low variance", result["shifted_low"], result["config"]["steps"]),
              ("shifted Laplacian, high variance", result["shifted_high"], result["config"]["steps"])]
    if "heat2d" in result:
        panels.append((f"heat2d n_x={result['config']['nx']}, SSOR-PCG", result["heat2d"],
                       result["config"]["heat_steps"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5))
    for ax, (title, data, steps) in zip(np.atleast_1d(axes), panels):
        curves = data["cumulative_seed0"]
        ref = np.asarray(curves["instance-optimal (grid)"], dtype=float)
        x = np.arange(len(ref)) * max(1, steps // 500) + 1
        for k, c in curves.items():
            if not k.startswith("fixed ω="):
                ax.plot(x, np.asarray(c) / ref, label=k, lw=1.2)
        ax.set_ylim(0.9, 2.5)
        ax.set_xlabel("instance")
        ax.set_ylabel("cumulative iterations / instance-optimal")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5000, help="instances per shifted-Laplacian sequence")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--nx", type=int, default=100)
    ap.add_argument("--heat-steps", type=int, default=1000)
    ap.add_argument("--heat-seeds", type=int, default=5)
    ap.add_argument("--no-heat", action="store_true")
    ap.add_argument("--replot", action="store_true", help="redraw the PNG from runs/bench/relax.json")
    ap.add_argument("--ray", action="store_true", help="build the shifted-Laplacian tables as Ray tasks")
    args = ap.parse_args(argv)
    global RAY
    RAY = args.ray
    if args.replot:
        plot(json.loads((OUT / "relax.json").read_text()), OUT / "relax.png")
        return
    start = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - start:6.1f}s] {msg}", flush=True)

    result = {"config": {"steps": args.steps, "seeds": args.seeds, "nx": args.nx, "heat_steps": args.heat_steps,
                         "grid": "20 ω in [1, 1.95]", "tol": 1e-8}}
    log("kernel speed")
    result["kernel"] = kernel_speed()
    for v in ("low", "high"):
        log(f"shifted Laplacian, {v} variance")
        result[f"shifted_{v}"] = shifted(v, args.seeds, args.steps, log)
    if not args.no_heat:
        log("heat2d")
        result["heat2d"] = heat(args.nx, args.heat_steps, args.heat_seeds, log)
    result["seconds"] = time.perf_counter() - start

    for v in ("low", "high"):
        print_rows(f"shifted Laplacian n=100, {v} variance, T={args.steps}, {args.seeds} seeds "
                   "(mean iterations per instance)", result[f"shifted_{v}"]["rows"])
    if "heat2d" in result:
        print_rows(f"heat2d n_x={args.nx}, T={args.heat_steps}, SSOR-PCG warm-started, {args.heat_seeds} learner "
                   "seeds (table replay)", result["heat2d"]["rows"])
        print("\nheat2d online (PyAMG sweeps, seed 0, policies in lockstep):")
        for k, v in result["heat2d"]["online"].items():
            print(f"  {k:24s} {v['iterations_mean']:7.2f} it/instance  solve {v['solve_seconds']:7.2f}s  "
                  f"learner {v['learner_seconds']:6.3f}s = {v['learner_overhead_pct_of_solve']:.2f}% of solve "
                  f"(ask/tell alone: {v['learner_us_per_round_tight_loop']:.0f} µs/round = "
                  f"{v['tight_loop_overhead_pct_of_solve']:.2f}%)")
    k = result["kernel"]
    print(f"\nSOR sweep, 200×200 Laplacian: ours {k['ours_ms_median']:.3f} ms, PyAMG {k['pyamg_ms_median']:.3f} ms, "
          f"ratio {k['ratio_median']:.2f} (same iterates: {k['same_iterates']})")
    path = save_json("relax", result)
    plot(result, OUT / "relax.png")
    print(f"\nsaved {path} and {OUT / 'relax.png'} ({result['seconds']:.0f}s)")


if __name__ == "__main__":
    main()
