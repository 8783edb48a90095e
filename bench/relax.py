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
4. Short horizon (``--short``): the four operator families (300 systems, ``--short-seeds`` seeds each).
   The young learner runs online (compiled kernel, residual histories) with and without the Lanczos
   prior; Gauss–Seidel, the best fixed grid ω in hindsight and the instance-optimal grid ω come from the
   cost table (exact: x0 = 0), adaptive SOR runs for real, Tsallis-INF and ChebCB replay the table.
   Totals of iterations, and of seconds for the policies run online (solves + learner + probing; the best
   fixed ω is also run online for its seconds). The young learner also joins section 1 (online).

    python bench/relax.py                      # full run; tables cached under runs/bench/relax_tables
    python bench/relax.py --seeds 2 --steps 1000 --heat-steps 200 --nx 50   # quick
    python bench/relax.py --ray                # shifted-Laplacian tables built as Ray tasks
    python bench/relax.py --replot             # redraw the PNG from the saved JSON
    python bench/relax.py --short --short-only # only the short-horizon families

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
    FAMILIES,
    Heat2D,
    OperatorFamily,
    ShiftedLaplacian,
    build_cost_table,
    kernels,
    poisson_2d,
)
from steptune.evaluators.linear.solvers import solve  # noqa: E402
from steptune.search.sor_driver import RoundResult, adaptive_costs, replay_costs, run_sequence  # noqa: E402
from steptune.search.sor_learners import (  # noqa: E402
    AdaptiveSOR,
    ChebCB,
    FixedOmega,
    TsallisINF,
    TsallisINFBins,
    YoungSOR,
    warm_up,
)

TABLES = OUT / "relax_tables"
RAY = False  # build stateless cost tables as Ray tasks (--ray)


def numba_threads_one() -> None:
    import numba

    numba.set_num_threads(1)


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
        young = run_sequence(seq, YoungSOR(seed=s, context_range=seq.context_range, context_key="c"), kernel="numba")
        curves["young (online)"] = np.array([r.iterations for r in young])
        curves["_young learner seconds"] = np.array([sum(r.learner_seconds for r in young)])
        curves["_young solve seconds"] = np.array([sum(r.seconds for r in young)])
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


def tight_loop_seconds(make, rounds) -> float:
    """ask + tell of a fresh learner over recorded rounds (told their factors), timed alone: the learner's
    cost without the scheduling noise of a shared machine between the calls."""
    learner = make()
    warm_up()
    tick = time.perf_counter()
    for r in rounds:
        if r.extra.get("prior_mu") is not None:
            learner.tell_prior(r.extra["prior_mu"])
        learner.ask(r.context.get(learner.context_key) if learner.context_key else None)
        learner.tell(r.iterations, factor=r.extra.get("factor"), omega=r.omega)
    return time.perf_counter() - tick


def online(seq, policy, kernel: str = "numba", make=None) -> dict:
    rounds = run_sequence(seq, policy, kernel=kernel)
    out = {"iterations": int(sum(r.iterations for r in rounds)),
           "solve_seconds": sum(r.seconds for r in rounds), "learner_seconds": sum(r.learner_seconds for r in rounds),
           "probe_seconds": sum(r.probe_seconds for r in rounds), "probe_matvecs": sum(r.probe_matvecs for r in rounds),
           "bandit_rounds": sum(1 for r in rounds if r.extra.get("mode") == "bandit")}
    out["seconds"] = out["solve_seconds"] + out["learner_seconds"] + out["probe_seconds"]
    if make is not None:
        out["learner_seconds_tight_loop"] = tight_loop_seconds(make, rounds)
    return out


def short_horizon(families, seeds: int, steps: int, log) -> dict:
    """Totals per family and seed (see the module docstring, section 4)."""
    result = {}
    for family in families:
        per_seed = []
        for s in range(seeds):
            seq = OperatorFamily(family, steps=steps, seed=s)
            table = build_cost_table(seq, cache=TABLES)
            its = table.iterations
            arm, _ = table.best_fixed()
            fixed = float(table.omegas[arm])
            row = {"gauss-seidel": {"iterations": int(its[:, 0].sum())},
                   "best fixed ω (hindsight)": {"iterations": int(its[:, arm].sum()), "omega": fixed},
                   "instance-optimal (grid)": {"iterations": int(its.min(axis=1).sum())}}
            row["best fixed ω (hindsight)"].update(
                {k: v for k, v in online(seq, FixedOmega(fixed)).items() if k.endswith("seconds")})
            for name, prior in (("young", "none"), ("young + lanczos prior", "lanczos")):
                def make(prior=prior, seq=seq, s=s):
                    return YoungSOR(seed=s, context_range=seq.context_range, context_key=seq.context_key, prior=prior)
                row[name] = online(seq, make(), make=make)
            ad = run_sequence(seq, AdaptiveSOR(), kernel="numba")
            row["adaptive SOR"] = {"iterations": int(sum(r.iterations for r in ad)),
                                   "seconds": sum(r.seconds for r in ad)}
            for name, learner in (("tsallis-inf", TsallisINF(seed=s)),
                                  ("chebcb", ChebCB(seed=s, context_range=seq.context_range))):
                row[name] = {"iterations": int(replay_costs(learner, table).sum())}
            per_seed.append(row)
            young = row["young"]
            log(f"  {family} seed {s}: young {young['iterations']} vs best fixed "
                f"{row['best fixed ω (hindsight)']['iterations']}, instance-optimal "
                f"{row['instance-optimal (grid)']['iterations']}, adaptive {row['adaptive SOR']['iterations']}")
        names = list(per_seed[0])
        summary = {}
        for k in names:
            total = sum(r[k]["iterations"] for r in per_seed)
            entry = {"iterations": total, "per_seed": [r[k]["iterations"] for r in per_seed]}
            if "seconds" in per_seed[0][k]:
                entry["seconds"] = sum(r[k]["seconds"] for r in per_seed)
            if "learner_seconds" in per_seed[0][k]:
                solve_s = sum(r[k]["solve_seconds"] for r in per_seed)
                entry["learner_pct_of_solve"] = 100 * sum(r[k]["learner_seconds"] + r[k].get("probe_seconds", 0)
                                                          for r in per_seed) / solve_s
            if "learner_seconds_tight_loop" in per_seed[0][k]:
                tight = sum(r[k]["learner_seconds_tight_loop"] for r in per_seed)
                entry["learner_us_per_round_tight_loop"] = 1e6 * tight / (steps * len(per_seed))
                entry["tight_loop_pct_of_solve"] = 100 * (tight + sum(r[k]["probe_seconds"] for r in per_seed)) \
                    / solve_s
            if "bandit_rounds" in per_seed[0][k]:
                entry["bandit_rounds"] = sum(r[k]["bandit_rounds"] for r in per_seed)
                entry["probe_matvecs"] = sum(r[k]["probe_matvecs"] for r in per_seed)
            summary[k] = entry
        best = summary["best fixed ω (hindsight)"]["iterations"]
        opt = summary["instance-optimal (grid)"]["iterations"]
        for v in summary.values():
            v["vs_best_fixed"] = v["iterations"] / best
            v["vs_instance_optimal"] = v["iterations"] / opt
        result[family] = summary
    return result


def print_heat_sor(rows: dict, steps: int) -> None:
    """The live heat2d run by plain SOR: its table and each learner's median overhead."""
    print_short({"heat2d-sor": rows}, steps, 1)
    print("heat2d-sor live learner overhead, median round × T: " + ", ".join(
        f"{k} {v['learner_median_pct_of_solve']:.2f}%" for k, v in rows.items() if "learner_median_pct_of_solve" in v))


def print_short(result: dict, steps: int, seeds: int) -> None:
    print(f"\nshort horizon: {steps} systems per sequence, {seeds} seeds (totals over seeds)")
    print(f"{'family':12s} {'policy':26s} {'iterations':>11s} {'/best fixed':>12s} {'/inst-opt':>10s} "
          f"{'seconds':>9s} {'learner %':>10s} {'tight µs':>9s} {'tight %':>8s}")
    for family, rows in result.items():
        for k, v in rows.items():
            sec = f"{v['seconds']:9.3f}" if "seconds" in v else f"{'—':>9s}"
            pct = f"{v['learner_pct_of_solve']:9.2f}%" if "learner_pct_of_solve" in v else f"{'—':>10s}"
            tight = (f"{v['learner_us_per_round_tight_loop']:9.1f} {v['tight_loop_pct_of_solve']:7.2f}%"
                     if "tight_loop_pct_of_solve" in v else f"{'—':>9s} {'—':>8s}")
            print(f"{family:12s} {k:26s} {v['iterations']:11d} {v['vs_best_fixed']:12.3f} "
                  f"{v['vs_instance_optimal']:10.3f} {sec} {pct} {tight}")


def heat_sor(nx: int, steps: int, log) -> dict:
    """heat2d solved by plain SOR (the young learner's solver), warm-started: Gauss–Seidel, best fixed and
    instance-optimal ω from the cost table (its reference trajectory), ChebCB and Tsallis-INF replayed on
    it; then the young learner, ChebCB and the best fixed ω live with PyAMG sweeps, each on its own
    trajectory, with learner seconds measured live and in a tight loop."""
    seq = Heat2D(nx=nx, steps=steps)
    table = build_cost_table(seq, solver="sor", cache=TABLES,
                             progress=lambda d, t: log(f"  heat2d SOR table {d}/{t}") if d % 250 == 0 else None)
    its = table.iterations
    arm, _ = table.best_fixed()
    rows = {"gauss-seidel": {"iterations": int(its[:, 0].sum())},
            "best fixed ω (hindsight)": {"iterations": int(its[:, arm].sum()), "omega": float(table.omegas[arm])},
            "instance-optimal (grid)": {"iterations": int(its.min(axis=1).sum())},
            "tsallis-inf (replay)": {"iterations": int(replay_costs(TsallisINF(seed=0), table).sum())},
            "chebcb (replay)": {"iterations": int(replay_costs(ChebCB(seed=0, context_range=seq.context_range),
                                                               table).sum())}}
    makers = {"young (live)": lambda: YoungSOR(seed=0, context_range=seq.context_range, context_key="kappa"),
              "chebcb (live)": lambda: ChebCB(seed=0, context_range=seq.context_range, context_key="kappa"),
              "best fixed ω (live)": lambda: FixedOmega(float(table.omegas[arm]))}
    log("  heat2d SOR live, policies in lockstep")
    live = online_wall_clock(seq, makers, table, log, solver="sor")
    for name, st in live.items():
        rows[name] = {"iterations": st["iterations"], "seconds": st["solve_seconds"] + st["learner_seconds"],
                      "learner_pct_of_solve": st["learner_overhead_pct_of_solve"],
                      "learner_median_pct_of_solve": st["median_overhead_pct_of_solve"]}
        if name.startswith("young"):
            rows[name]["learner_us_per_round_tight_loop"] = st["learner_us_per_round_tight_loop"]
            rows[name]["tight_loop_pct_of_solve"] = st["tight_loop_overhead_pct_of_solve"]
    best = rows["best fixed ω (hindsight)"]["iterations"]
    opt = rows["instance-optimal (grid)"]["iterations"]
    for v in rows.values():
        v["vs_best_fixed"] = v["iterations"] / best
        v["vs_instance_optimal"] = v["iterations"] / opt
    return rows


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


def online_wall_clock(seq, makers: dict, table, log, solver: str = "ssor-pcg") -> dict:
    """Each policy solves the sequence online on its own warm-started trajectory with PyAMG sweeps. The
    policies advance in lockstep (step t for all, then t + 1), so load changes on a shared machine hit
    them alike. Learner time (ask + tell) is measured apart from solve time; the learner is also timed
    alone in a tight loop (over the cost table; the young learner over its own rounds)."""
    policies = {k: make() for k, make in makers.items()}
    states = {k: seq.start(0) for k in policies}
    stats = {k: {"iterations": 0, "solve_seconds": 0.0, "learner_seconds": 0.0} for k in policies}
    recorded = {k: [] for k in policies}
    round_seconds = {k: [] for k in policies}
    warm_up()
    for t in range(len(seq)):
        for name, policy in policies.items():
            system = seq.system(t, states[name])
            young = isinstance(policy, YoungSOR)
            tick = time.perf_counter()
            a = policy.ask(system.context.get(policy.context_key) if policy.context_key else None)
            asked = time.perf_counter() - tick
            res = solve(system.A, system.b, a.omega, solver=solver, x0=system.x0, kernel="pyamg", trace=young)
            tick = time.perf_counter()
            if young:
                policy.tell(res.iterations, residuals=res.residuals)
                recorded[name].append(RoundResult(t, None, a.omega, dict(system.context), res.iterations, True, 0.0,
                                                  0.0, extra=dict(policy.last)))
            else:
                policy.tell(res.iterations)
            st = stats[name]
            round_seconds[name].append(asked + time.perf_counter() - tick)
            st["learner_seconds"] += round_seconds[name][-1]
            st["solve_seconds"] += res.seconds
            st["iterations"] += res.iterations
            states[name] = res.x
        if (t + 1) % 1000 == 0:
            log(f"  heat2d online step {t + 1}/{len(seq)}")
    for name, st in stats.items():
        st["iterations_mean"] = st["iterations"] / len(seq)
        st["learner_overhead_pct_of_solve"] = 100 * st["learner_seconds"] / st["solve_seconds"]
        # the median round's learner time × rounds: robust to the process being descheduled inside a timed call
        median = float(np.median(round_seconds[name]))
        st["learner_us_per_round_median"] = 1e6 * median
        st["median_overhead_pct_of_solve"] = 100 * median * len(seq) / st["solve_seconds"]
        if recorded[name]:
            per_round = tight_loop_seconds(makers[name], recorded[name]) / len(seq)
        else:
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
    ap.add_argument("--short", action="store_true", help="also the short-horizon families (section 4)")
    ap.add_argument("--short-only", action="store_true", help="only section 4")
    ap.add_argument("--short-seeds", type=int, default=3)
    ap.add_argument("--short-steps", type=int, default=300)
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--heat-sor", action="store_true", help="also heat2d solved by plain SOR (young vs ChebCB)")
    ap.add_argument("--heat-sor-nx", type=int, default=50)
    ap.add_argument("--heat-sor-steps", type=int, default=1000)
    args = ap.parse_args(argv)
    if args.short_only:
        numba_threads_one()
        start = time.perf_counter()
        result = {"config": {"short_steps": args.short_steps, "short_seeds": args.short_seeds}}
        log = lambda m: print(f"[{time.perf_counter() - start:6.1f}s] {m}", flush=True)  # noqa: E731
        result["short"] = short_horizon(args.families.split(","), args.short_seeds, args.short_steps, log)
        if args.heat_sor:
            result["heat_sor"] = heat_sor(args.heat_sor_nx, args.heat_sor_steps, log)
            result["config"].update(heat_sor_nx=args.heat_sor_nx, heat_sor_steps=args.heat_sor_steps)
        print_short(result["short"], args.short_steps, args.short_seeds)
        if "heat_sor" in result:
            print_heat_sor(result["heat_sor"], args.heat_sor_steps)
        path = save_json("relax_short", result)
        print(f"\nsaved {path}")
        return
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
    if args.short:
        log("short horizon")
        result["short"] = short_horizon(args.families.split(","), args.short_seeds, args.short_steps, log)
    if args.heat_sor:
        log("heat2d, plain SOR")
        result["heat_sor"] = heat_sor(args.heat_sor_nx, args.heat_sor_steps, log)
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
                  f"(median round × T: {v['median_overhead_pct_of_solve']:.2f}%) "
                  f"(ask/tell alone: {v['learner_us_per_round_tight_loop']:.0f} µs/round = "
                  f"{v['tight_loop_overhead_pct_of_solve']:.2f}%)")
    if "short" in result:
        print_short(result["short"], args.short_steps, args.short_seeds)
    if "heat_sor" in result:
        print_heat_sor(result["heat_sor"], args.heat_sor_steps)
    k = result["kernel"]
    print(f"\nSOR sweep, 200×200 Laplacian: ours {k['ours_ms_median']:.3f} ms, PyAMG {k['pyamg_ms_median']:.3f} ms, "
          f"ratio {k['ratio_median']:.2f} (same iterates: {k['same_iterates']})")
    path = save_json("relax", result)
    plot(result, OUT / "relax.png")
    print(f"\nsaved {path} and {OUT / 'relax.png'} ({result['seconds']:.0f}s)")


if __name__ == "__main__":
    main()
