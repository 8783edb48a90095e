"""SOR commands: ``steptune relax`` (choose ω online over a sequence of linear systems, recording every
round) and ``steptune relax-report`` (cumulative iterations against baselines)."""

from __future__ import annotations

import json
from pathlib import Path
from shlex import quote as shell_quote
from typing import Annotated

import numpy as np
import typer
from rich.progress import BarColumn, MofNCompleteColumn, TimeElapsedColumn
from rich.table import Table

from steptune.cli.console import err, out, text_column
from steptune.cli.errors import CliError, Interrupted
from steptune.cli.options import DEFAULT_DB, DbOpt, JsonOpt
from steptune.cli.progress import task_bar

TABLES = Path("runs/relax/tables")


def _sequence(problem, matrices, steps, nx, m, variance, seed):
    from steptune.evaluators.linear import LinearInputError, make_sequence

    try:
        return make_sequence(problem, steps=steps, nx=nx, m=m, variance=variance, seed=seed, matrices=matrices)
    except (ValueError, LinearInputError) as e:
        raise CliError(str(e)) from None


def _policy(learner: str, seq, seed: int, omega: float, arms: int, omega_max: float, prior: str = "none"):
    from steptune.search.sor_learners import LEARNERS, AdaptiveSOR, YoungSOR, make_learner

    if learner not in LEARNERS:
        raise CliError(f"--learner {learner!r} is unknown; use one of {', '.join(LEARNERS)}")
    if prior not in ("none", "lanczos"):
        raise CliError(f"--prior {prior!r} is unknown; use none or lanczos")
    if prior != "none" and learner != "young":
        raise CliError(f"--prior {prior} is for --learner young only")
    if learner == "adaptive":
        return AdaptiveSOR(seed=seed)
    if learner == "young":
        if not 1.0 < omega_max < 2.0:
            raise CliError(f"--omega-max {omega_max:g}: the largest ω must be in (1, 2)")
        return YoungSOR(seed=seed, context_range=seq.context_range, context_key=getattr(seq, "context_key", None),
                        omega_max=omega_max, prior=prior)
    if not 1 <= arms <= 200:
        raise CliError(f"--arms {arms}: the grid needs 1 to 200 values of ω")
    if not 1.0 < omega_max < 2.0:
        raise CliError(f"--omega-max {omega_max:g}: the largest grid ω must be in (1, 2)")
    key = getattr(seq, "context_key", None)
    try:
        if learner in ("chebcb", "tsallis-inf-cb") and key is None:
            raise ValueError(f"--learner {learner} needs a context per instance, and this sequence has none "
                             "(a matrix folder gives one in context.csv)")
        grid = np.linspace(1.0, omega_max, arms) if arms > 1 else [1.0]
        return make_learner(learner, grid, seed, seq.context_range, key, omega=omega)
    except ValueError as e:
        raise CliError(str(e)) from None


GRID_LEARNERS = ("tsallis-inf", "tsallis-inf-cb", "chebcb")


def _option_users() -> dict:
    """Option -> (whether a sequence (its problem; None: a matrix folder) and learner use it, which ones do); the
    learners' options are the last three."""
    from steptune.evaluators.linear import FAMILIES

    return {"--steps": (lambda p, lr: p is not None, "generated sequences (not --matrices)"),
            "--nx": (lambda p, lr: p == "heat2d", "--problem heat2d"),
            "--m": (lambda p, lr: p in ("shifted-laplacian", "poisson", *FAMILIES), "the problems other than heat2d"),
            "--variance": (lambda p, lr: p == "shifted-laplacian", "--problem shifted-laplacian"),
            "--omega": (lambda p, lr: lr == "fixed", "--learner fixed"),
            "--arms": (lambda p, lr: lr in GRID_LEARNERS, "--learner tsallis-inf, tsallis-inf-cb or chebcb"),
            "--omega-max": (lambda p, lr: lr in (*GRID_LEARNERS, "young"),
                            "--learner tsallis-inf, tsallis-inf-cb, chebcb or young")}


def _refuse_unused(problem: str | None, matrices, learner: str, given: dict) -> None:
    """An option the sequence or the learner would not use is refused, rather than accepted and ignored (the
    study would record a setup that never ran)."""
    from steptune.search.sor_learners import LEARNERS

    if learner not in LEARNERS:
        raise CliError(f"--learner {learner!r} is unknown; use one of {', '.join(LEARNERS)}")
    if matrices is not None and problem is not None:
        raise CliError(f"--problem {problem} and --matrices: give one (--matrices runs your own sequence)")
    sequence = None if matrices is not None else problem or "shifted-laplacian"
    users = _option_users()
    for option, value in given.items():
        uses, which = users[option]
        if value is not None and not uses(sequence, learner):
            here = (f"--learner {learner}" if option in ("--omega", "--arms", "--omega-max") else
                    "--matrices" if sequence is None else f"--problem {sequence}")
            raise CliError(f"{option} is for {which}; {here} does not use it, so leave it out")


def _warm_start(store, policy, study: str) -> dict:
    """Feed ``study``'s observations to ``policy``; what the new study's config records of it."""
    from steptune.storage import StorageError

    try:
        rec = store.get_study(study)
    except StorageError:
        raise CliError(f"--warm-start {study}: no such study in this database; name an earlier relaxation "
                       "study run with --learner young") from None
    rounds = store.relaxation_rounds(study)
    learner = (rec.config or {}).get("policy", {}).get("learner")
    if rec.kind != "relaxation" or learner != "young":
        raise CliError(f"--warm-start {study}: it is a {rec.kind} study with learner {learner}; it needs one run "
                       "with --learner young (their rounds carry the residual factors)")
    try:
        used = policy.warm_start(rounds)
    except ValueError as e:
        raise CliError(f"--warm-start {study}: {e}; warm-start from a sequence with the same context") from None
    return {"study": study, "rounds": len(rounds), "rounds_with_factor": used,
            "problem": (rec.config or {}).get("problem")}


def _setup(seq, policy, solver, tol, maxiter) -> dict:
    return {"kind": "relaxation", "problem": seq.identity(), "policy": policy.config(), "solver": solver,
            "tol": tol, "maxiter": maxiter}


def _check_image_path(output: Path | None) -> None:
    """Refuse an -o path the plot cannot be saved to, before any work (see ``output_file``; also a format
    matplotlib does not write)."""
    if output is None:
        return
    from matplotlib.backend_bases import FigureCanvasBase

    from steptune.cli.paths import output_file

    output_file(output, "-o")
    fmt = output.suffix.removeprefix(".").lower()
    if fmt not in FigureCanvasBase.get_supported_filetypes():
        what = f"matplotlib cannot write .{fmt} images" if fmt else "the name has no image extension"
        raise CliError(f"-o {output}: {what}; end the name in .png, .pdf or .svg")


def _summary(name, all_rows, new_rounds, start) -> dict:
    its = np.array([r.iterations for r in all_rows], dtype=float)
    omegas = np.round([r.omega for r in all_rows], 3)
    vals, counts = np.unique(omegas, return_counts=True)
    solve = sum(r.seconds for r in new_rounds)
    learn = sum(r.learner_seconds for r in new_rounds) + sum(r.probe_seconds for r in new_rounds)
    modes = [r.context.get("mode") for r in all_rows if r.context.get("mode")]
    extra = {"bandit_rounds": sum(1 for m in modes if m == "bandit")} if modes else {}
    return {"study": name, "rounds": len(all_rows), "new_rounds": len(new_rounds),
            "mean_iterations": round(float(its.mean()), 2), "last_1000_mean": round(float(its[-1000:].mean()), 2),
            "not_converged": int(sum(1 for r in all_rows if r.converged is False)),
            "most_played_omega": float(vals[np.argmax(counts)]), "solve_seconds": round(solve, 3),
            "learner_overhead": round(learn / solve, 6) if solve > 0 else None, **extra}  # a share of solve time


def _baselines(setup: dict, count: int):
    """(the study's sequence rebuilt, its cost table over the first ``count`` instances)."""
    from steptune.evaluators.linear import DEFAULT_GRID, LinearInputError, build_cost_table, make_sequence

    prob = dict(setup["problem"])
    name = prob.pop("problem")
    try:
        if name == "matrices":
            seq = make_sequence(name, matrices=prob["folder"])
        else:
            seq = make_sequence(name, **{k: v for k, v in prob.items() if k in ("steps", "nx", "m", "variance",
                                                                                  "seed")})
    except (ValueError, LinearInputError) as e:
        raise CliError(f"cannot rebuild the study's sequence for baselines: {e}") from None
    omegas = setup["policy"].get("omegas")
    omegas = omegas if omegas and len(omegas) > 1 else DEFAULT_GRID
    with task_bar(text_column(), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) as bar:
        task = bar.add_task("cost table", total=count)
        try:
            table = build_cost_table(seq, omegas, solver=setup["solver"], tol=setup["tol"], maxiter=setup["maxiter"],
                                     cache=TABLES, count=count,
                                     progress=lambda done, total: bar.update(task, completed=done))
        except LinearInputError as e:
            raise CliError(f"{e} (while building the baselines' cost table)") from None
    return seq, table


def _online_baselines(seq, setup: dict, table, kernel: str) -> list[dict]:
    """The baselines run online over the sequence, for their seconds (see ``steptune.relax_verdict``)."""
    from steptune.evaluators.linear import LinearInputError
    from steptune.relax_verdict import run_baselines

    with task_bar(text_column(), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) as bar:
        task = bar.add_task("baselines online", total=4 * len(table))
        try:
            return run_baselines(seq, setup, table, kernel=kernel, progress=lambda r: bar.advance(task))
        except LinearInputError as e:
            raise CliError(f"{e} (while running the baselines online)") from None


def _plot(png: Path, study: str, curves: dict, rows) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for k, v in curves.items():
        a.plot(np.arange(1, len(v) + 1), np.cumsum(v), label=k)
    a.set_xlabel("instance")
    a.set_ylabel("cumulative iterations")
    a.set_title(study)
    a.legend(fontsize=8)
    b.scatter([r.round for r in rows], [r.omega for r in rows], s=2)
    b.set_xlabel("instance")
    b.set_ylabel("ω")
    b.set_title("ω chosen")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def relax_cmd(
    problem: Annotated[str, typer.Option("--problem", "-p", help="shifted-laplacian, heat2d, poisson (the model "
                                                                 "problem repeated), laplace3d, anisotropic, "
                                                                 "reaction or ninepoint (default: "
                                                                 "shifted-laplacian).")]
    = None,
    matrices: Annotated[Path | None, typer.Option(
        "--matrices", help="Folder with your own sequence: NAME.mtx or NAME.npz, NAME.rhs.npy (or .rhs.mtx, "
                           ".rhs.txt), optional context.csv.")] = None,
    learner: Annotated[str, typer.Option("--learner", "-l", help="young, tsallis-inf, tsallis-inf-cb, chebcb, "
                                                                 "fixed or adaptive.")] = "tsallis-inf",
    warm_start: Annotated[str | None, typer.Option(
        "--warm-start", help="young: start from what an earlier young study (same context) observed.")] = None,
    prior: Annotated[str, typer.Option("--prior", help="young: none, or lanczos (a Jacobi-radius estimate from "
                                                       "matrix-vector products on the first system).")] = "none",
    steps: Annotated[int | None, typer.Option("--steps", help="Instances in a generated sequence (default: 5000; "
                                                              "300 for the short sweeps laplace3d, anisotropic, "
                                                              "reaction, ninepoint).")] = None,
    nx: Annotated[int | None, typer.Option("--nx", help="heat2d: cells across the unit square (default: 100).")] = None,
    m: Annotated[int | None, typer.Option("--m", help="Interior grid side (shifted-laplacian / poisson: 10; a "
                                                      "family: its own default).")] = None,
    variance: Annotated[str | None, typer.Option("--variance", help="shifted-laplacian: low or high (default: "
                                                                    "high).")] = None,
    solver: Annotated[str | None, typer.Option("--solver", help="sor, ssor or ssor-pcg (default: ssor-pcg "
                                                                "for heat2d, sor otherwise).")] = None,
    omega: Annotated[float | None, typer.Option("--omega", help="ω for --learner fixed (default: 1).")] = None,
    arms: Annotated[int | None, typer.Option("--arms", help="Grid size of the learners tsallis-inf, tsallis-inf-cb "
                                                            "and chebcb (default: 20).")] = None,
    omega_max: Annotated[float | None, typer.Option("--omega-max", help="Largest grid ω (default: 1.95); young: "
                                                                        "the largest ω it plays.")] = None,
    tol: Annotated[float, typer.Option("--tol", help="Relative residual tolerance.")] = 1e-8,
    maxiter: Annotated[int, typer.Option("--maxiter", help="Iteration cap per solve.")] = 10_000,
    kernel: Annotated[str, typer.Option("--kernel", help="pyamg (C++ sweeps) or numba (compiled loop).")]
    = "pyamg",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the learner and of a generated sequence.")] = 0,
    study: Annotated[str | None, typer.Option(
        "--study", "-s", help="Study name; an existing study with the same setup is resumed.")] = None,
    db: DbOpt = DEFAULT_DB,
    json_: JsonOpt = False,
):
    """Choose SOR's ω online for every system of a sequence; record each round in the database."""
    from steptune.evaluators.linear import SOLVERS, LinearInputError
    from steptune.relax_verdict import VERDICT
    from steptune.search.sor_driver import run_sequence
    from steptune.storage import StorageError, connect
    from steptune.study_problem import difference

    _refuse_unused(problem, matrices, learner, {"--steps": steps, "--nx": nx, "--m": m, "--variance": variance,
                                                "--omega": omega, "--arms": arms, "--omega-max": omega_max})
    problem = problem or "shifted-laplacian"
    nx, variance = 100 if nx is None else nx, variance or "high"
    omega = 1.0 if omega is None else omega
    arms, omega_max = 20 if arms is None else arms, 1.95 if omega_max is None else omega_max
    solver = solver or ("ssor-pcg" if problem == "heat2d" and matrices is None else "sor")
    if solver not in SOLVERS:
        raise CliError(f"--solver {solver!r} is unknown; use one of {', '.join(SOLVERS)}")
    if kernel not in ("pyamg", "numba"):
        raise CliError(f"--kernel {kernel!r} is unknown; use pyamg or numba")
    if not 0 < tol < 1:
        raise CliError(f"--tol {tol:g}: the relative residual tolerance must be in (0, 1), e.g. 1e-8")
    for option, value in (("--maxiter", maxiter), ("--steps", steps), ("--m", m)):
        if value is not None and value < 1:
            raise CliError(f"{option} {value}: must be at least 1")
    if seed < 0:
        raise CliError(f"--seed {seed}: a seed must be 0 or more")
    if learner == "fixed" and not 0 < omega < 2:
        raise CliError(f"--omega {omega} is outside (0, 2)")
    seq = _sequence(problem, matrices, steps, nx, m, variance, seed)
    if learner in ("young", "adaptive") and solver != "sor":
        how = "reads Young's relation off" if learner == "young" else "adapts ω from the convergence of"
        raise CliError(f"--learner {learner} {how} plain SOR solves; use --solver sor (not {solver}"
                       f"{', the default for heat2d' if solver == 'ssor-pcg' and problem == 'heat2d' else ''})")
    policy = _policy(learner, seq, seed, omega, arms, omega_max, prior)
    setup = _setup(seq, policy, solver, tol, maxiter)
    name = study or f"relax-{setup['problem']['problem']}-{learner}-s{seed}"
    if warm_start is not None and learner != "young":
        raise CliError("--warm-start is for --learner young only")
    if warm_start is not None and warm_start == name:
        raise CliError(f"--warm-start {warm_start}: a study cannot start from itself; name an earlier study")
    try:
        store = connect(db)
        if warm_start is not None:
            setup["warm_start"] = _warm_start(store, policy, warm_start)
        rec = store.create_study(name, kind="relaxation", method=learner, seed=seed, config=setup,
                                 metric="iterations", exist_ok=True)
        if rec.kind != "relaxation":
            made = f"a {rec.kind} study" if rec.kind else "another kind of study"
            raise CliError(f"study {name!r} is {made}, not a relaxation study; give relax another --study name")
        kept = {k: v for k, v in rec.config.items() if k != VERDICT}  # relax-report's verdict is not setup
        now = json.loads(json.dumps(setup))
        if json.dumps(kept, sort_keys=True) != json.dumps(now, sort_keys=True):
            learners = (kept.get("policy") or {}).get("learner"), now["policy"].get("learner")
            key, there, here = (("policy.learner", *learners) if learners[0] != learners[1]  # the rest follows it
                                else difference(kept, now, every_key=True))
            raise CliError(f"study {name!r} was run with another setup ({key} {there!r} there, {here!r} here); give "
                           "the options it was run with to resume it, or another --study name")
        done = store.relaxation_rounds(name)
    except StorageError as e:
        raise CliError(str(e)) from None
    policy.replay(done)
    start = len(done)

    def record(r):
        ctx = {**r.context, **r.extra, "seconds": r.seconds, "learner_seconds": r.learner_seconds, "kernel": kernel}
        if r.probe_seconds:
            ctx["probe_seconds"] = r.probe_seconds
        if r.omega_start is not None:
            ctx["omega_start"] = r.omega_start
        store.add_relaxation(name, r.round, r.omega, arm=r.arm, context=ctx, cost=float(r.iterations),
                             iterations=r.iterations, converged=r.converged)

    rounds = []
    if start >= len(seq):
        err.print(f"study {name!r} already has all {len(seq)} rounds")
    with task_bar(text_column(bold=True), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  disable=json_) as bar:
        task = bar.add_task(f"{name}", total=len(seq), completed=start)
        try:
            if start < len(seq):
                rounds = run_sequence(seq, policy, solver=solver, kernel=kernel, tol=tol, maxiter=maxiter,
                                      start=start, record=record, progress=lambda r: bar.advance(task))
        except LinearInputError as e:
            raise CliError(f"{e} (rounds before it are recorded in study {name!r})") from None
        except KeyboardInterrupt:
            kept = len(store.relaxation_rounds(name))
            raise Interrupted(f"{kept} of {len(seq)} rounds are recorded in study {name!r}; run the same command "
                              "to resume") from None
    summary = _summary(name, store.relaxation_rounds(name), rounds, start)
    if json_:
        print(json.dumps(summary, indent=2))
        return
    t = Table(title=f"relax {name}")
    t.add_column("")
    t.add_column("value", justify="right")
    for key in ("rounds", "new_rounds", "mean_iterations", "last_1000_mean", "not_converged", "most_played_omega",
                "solve_seconds", "learner_overhead", "bandit_rounds"):
        if key not in summary or (key == "last_1000_mean" and summary["rounds"] <= 1000):  # the mean itself
            continue
        value = summary[key]
        if key == "learner_overhead":
            value = "—" if value is None else f"{100 * value:.2f}% of solve time"
        t.add_row(key.replace("_", " ").replace("omega", "ω"), str(value))
    out.print(t)
    out.print(f"steptune relax-report --study {shell_quote(name)}  (cumulative iterations vs baselines)")

def relax_report_cmd(
    study: Annotated[str, typer.Option("--study", "-s", help="Study name.")],
    output: Annotated[Path | None, typer.Option("-o", "--output", help="PNG path (default "
                                                                      "runs/relax/STUDY.png).")] = None,
    baselines: Annotated[bool, typer.Option("--baselines/--no-baselines", help="Compare with Gauss–Seidel, "
                                            "best fixed ω and instance-optimal ω (builds a cost table once, "
                                            "cached under runs/relax/tables) and run them and adaptive SOR "
                                            "online for their seconds.")] = True,
    db: DbOpt = DEFAULT_DB,
    json_: JsonOpt = False,
):
    """Cumulative iterations of a relaxation study against baselines, ω over time (table + PNG), and the totals of
    iterations and seconds against the baselines run online (kept with the study for the dashboard)."""
    from steptune.cli.paths import file_stem
    from steptune.storage import StorageError, connect

    _check_image_path(output)
    try:
        store = connect(db, must_exist=True)
        rec = store.get_study(study)
        rows = store.relaxation_rounds(study)
    except StorageError as e:
        raise CliError(str(e)) from None
    setup = rec.config or {}
    if rec.kind != "relaxation":
        raise CliError(f"study {study!r} is not a relaxation study")
    if not rows:
        raise CliError(f"study {study!r} has no rounds yet")
    from steptune.relax_verdict import VERDICT, study_totals, verdict
    from steptune.search.sor_driver import table_baselines

    its = np.array([r.iterations if r.iterations is not None else r.cost for r in rows], dtype=float)
    learner = setup["policy"]["learner"]
    curves = {learner: its}
    own = study_totals(learner, rows)
    online = []
    if baselines:
        seq, table = _baselines(setup, len(rows))
        curves.update(table_baselines(table))
        kernel = rows[-1].context.get("kernel", "pyamg")  # the study's own (relax --kernel; recorded per round)
        online = _online_baselines(seq, setup, table, kernel)
    seconds = own["seconds"]
    report = {"study": study, "rounds": len(rows),
              "mean_iterations": {k: float(v.mean()) for k, v in curves.items()},
              "total_iterations": {k: float(v.sum()) for k, v in curves.items()},
              "seconds": seconds, "probe_matvecs": int(sum(r.context.get("probe_matvecs", 0) for r in rows)),
              "bandit_rounds": int(sum(1 for r in rows if r.context.get("mode") == "bandit")),
              "verdict": {**verdict(own, online), **({"kernel": kernel} if online else {})}}
    if online:  # kept with the study for the dashboard
        try:
            store.update_study_config(study, {VERDICT: report["verdict"]})
        except StorageError as e:
            raise CliError(str(e)) from None
    png = output or Path("runs/relax") / f"{file_stem(study)}.png"
    _plot(png, study, curves, rows)
    report["png"] = str(png)
    if json_:
        print(json.dumps(report, indent=2))
        return
    t = Table(title=f"{study}: {len(rows)} instances")
    t.add_column("policy")
    t.add_column("mean iterations", justify="right")
    t.add_column("total", justify="right")
    t.add_column("vs learner", justify="right")
    own = its.sum()
    for k, v in curves.items():
        t.add_row(k, f"{v.mean():.1f}", f"{v.sum():.0f}", f"{v.sum() / own:.2f}×")
    out.print(t)
    if online:
        print_verdict(report["verdict"])
    out.print(f"{setup['policy']['learner']}: {seconds['total']:.3f}s in all = solves {seconds['solve']:.3f}s + "
              f"learner {seconds['learner']:.3f}s + probing {seconds['probe']:.3f}s "
              f"({report['probe_matvecs']} matrix-vector products)"
              + (f"; {report['bandit_rounds']} rounds played by the offset bandit (Young's predictions missed)"
                 if report["bandit_rounds"] else ""), highlight=False)
    out.print(f"saved {png}")


def print_verdict(v: dict) -> None:
    """The totals of iterations and seconds of the study and of the baselines run online."""
    t = Table(title=f"wall-clock: totals over the same instances (baselines run online with the same solver, "
                    f"{v.get('kernel', 'pyamg')} kernel; adaptive SOR compiled)")
    for col in ("policy", "iterations", "seconds", "solves", "learner + probing", "vs study (its.)",
                "vs study (s)"):
        t.add_column(col, justify="left" if col == "policy" else "right")
    for p in v["policies"]:
        s, vs = p["seconds"], p["vs_study"]
        t.add_row(p["policy"], f"{p['iterations']:.0f}", f"{s['total']:.3f}", f"{s['solve']:.3f}",
                  f"{s['learner'] + s['probe']:.3f}", "—" if vs["iterations"] is None else f"{vs['iterations']:.2f}×",
                  "—" if vs["seconds"] is None else f"{vs['seconds']:.2f}×")
    out.print(t)


def register(app: typer.Typer) -> None:
    app.command("relax")(relax_cmd)
    app.command("relax-report")(relax_report_cmd)


def sor_study_summary(store, st) -> dict:
    """What `status` and `best` show of an SOR study: its learner, rounds and mean iterations so far."""
    rows = store.relaxation_rounds(st.name)
    its = [r.iterations if r.iterations is not None else r.cost for r in rows]
    setup = st.config or {}
    return {"study": st.name, "kind": st.kind, "learner": (setup.get("policy") or {}).get("learner", st.method),
            "problem": (setup.get("problem") or {}).get("problem"), "rounds": len(rows),
            "mean_iterations": float(np.mean(its)) if its else None,
            "report": f"steptune relax-report --study {shell_quote(st.name)}"}


def print_sor_study(summary: dict, json_: bool) -> None:
    if json_:
        print(json.dumps(summary, indent=2))
        return
    mean = summary["mean_iterations"]
    out.print(f"{summary['study']}: an SOR study ({summary['learner']} on {summary['problem'] or 'a sequence'}), "
              f"{summary['rounds']} rounds" + (f", mean {mean:.1f} iterations per system" if mean is not None else "")
              + f"; '{summary['report']}' compares it with the baselines", highlight=False)
