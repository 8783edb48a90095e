"""`steptune presets`, `schedule`, `eval` and `sweep`: schedules, built and measured."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.table import Table
from rich.text import Text

from steptune import grids
from steptune.cli.console import err, fmt, live, out
from steptune.cli.errors import CliError, Interrupted
from steptune.cli.options import (
    DEFAULT_CACHE,
    CacheOpt,
    DeviceOpt,
    GuidanceOpt,
    JsonOpt,
    ModelOpt,
    NoiseOpt,
    PredictionOpt,
    ProblemOpt,
    ShapeOpt,
    SpacingOpt,
    TimeInputOpt,
    TimeScaleOpt,
)
from steptune.cli.paths import STDOUT, output_file, output_folder
from steptune.cli.problems import build_problem, pick_device, problem_evaluator
from steptune.cli.progress import said_in_log, task_bar
from steptune.resolve import parse_nfe_list, resolve
from steptune.space import ScheduleError, presets
from steptune.space import spacing as spacing_mod

Bank = Literal["heldout", "train"]


def _evaluator(problem: str, noise: str | None, cache: Path, device: str | None = None, **model_options):
    return problem_evaluator(build_problem(problem, noise=noise, **model_options), cache, pick_device(device))


def presets_cmd(json_: JsonOpt = False):
    """List the preset solvers (use them as --schedule preset:NAME)."""
    if json_:
        print(json.dumps([{"name": n, "description": presets.DESCRIPTIONS[n]} for n in presets.names()], indent=2))
        return
    table = Table(title="Preset solvers")
    table.add_column("name", style="bold")
    table.add_column("description")
    for n in presets.names():
        table.add_row(n, presets.DESCRIPTIONS[n])
    out.print(table)
    out.print("Options: preset:NAME:key=value,... e.g. preset:unipc-bh2:order=3 or preset:ddim:prediction=noise")


def schedule_cmd(
    spec: Annotated[str, typer.Argument(help="preset:NAME[:key=value,...]")],
    nfe: Annotated[int, typer.Option("--nfe", min=1, help="Number of model calls.")],
    noise: Annotated[str, typer.Option("--noise", help="Noise schedule the timesteps live on.")] = "vp-linear",
    spacing: SpacingOpt = None,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Write the JSON here (-: print it).")] = None,
):
    """Print a preset as schedule JSON (a starting point for your own schedule files)."""
    from steptune.space import noise as noise_mod

    if output is not None:
        output_file(output, "-o", stdout=True)
    ns = noise_mod.get(noise)
    sched = resolve(spec if spec.startswith("preset:") else f"preset:{spec}", [nfe], ns, spacing)[0]
    if output is None or output == STDOUT:
        print(sched.to_json())
    else:
        sched.save(output)
        err.print(f"wrote {output} ({sched.nfe} NFE, {len(sched.steps)} steps)")


def eval_cmd(
    schedule: Annotated[list[str], typer.Option("--schedule", "-s", help="preset:NAME[:opts] or a schedule JSON "
                                                                         "file; repeat to compare several.")],
    problem: ProblemOpt = None,
    nfe: Annotated[str | None, typer.Option("--nfe", help="NFE list for presets, e.g. 5,6,8,10 or 3-10.")] = None,
    noise: NoiseOpt = None,
    spacing: SpacingOpt = None,
    bank: Annotated[Bank, typer.Option("--bank", help="Noise bank to score on.")] = "heldout",
    samples: Annotated[int | None, typer.Option("--samples", "-n", help="Use the first N samples of the bank.")] = None,
    cache: CacheOpt = DEFAULT_CACHE,
    json_: JsonOpt = False,
    model: ModelOpt = None,
    prediction: PredictionOpt = None,
    time_input: TimeInputOpt = None,
    time_scale: TimeScaleOpt = None,
    guidance: GuidanceOpt = None,
    shape: ShapeOpt = None,
    device: DeviceOpt = None,
    grid: Annotated[Path | None, typer.Option("--grid", help="Also write a PNG of held-out samples (image problems): "
                                                             "this schedule, the best preset, the reference.")] = None,
):
    """Run schedules on a problem (or your --model) and measure their error against the reference solution."""
    from steptune.evaluators.neural_reference import ReferenceNotConverged
    from steptune.evaluators.user_code import raised_text
    from steptune.exports import read_export
    from steptune.study_problem import tuned_elsewhere

    if samples is not None and samples < 1:
        raise CliError(f"--samples {samples}: give at least 1")
    nfes = parse_nfe_list(nfe)
    if grid is not None:
        output_file(grid, "--grid")
        if len(schedule) != 1 or len(nfes) > 1:
            raise CliError("--grid draws one schedule at one NFE; give one --schedule and at most one --nfe")
    for spec in schedule:  # bad files are refused before any problem or reference is built
        if not spec.startswith("preset:"):
            resolve(spec, nfes, None)
    ev = _evaluator(problem, noise, cache, device, model=model, prediction=prediction, time_input=time_input,
                    time_scale=time_scale, guidance=guidance, shape=shape)
    prob = ev.problem
    if spacing is None:  # presets at the model's default spacing (time-uniform for a guided discrete model)
        from steptune.search import baselines

        spacing = baselines.default_spacing(prob)
    if grid is not None and grids.not_images(prob):
        raise CliError(f"--grid: {grids.not_images(prob)}")
    if samples is not None and samples > ev.bank(bank).size:
        raise CliError(f"--samples {samples}: the {bank} bank holds {ev.bank(bank).size} states; give at most that")
    scheds = [(spec, s) for spec in schedule
              for s in resolve(spec, nfes, prob.noise, spacing, prob.t_start, prob.t_end)]
    for spec in schedule:
        note = None if spec.startswith("preset:") else tuned_elsewhere(spec, read_export(spec)[1], prob)
        if note is not None and not json_:
            err.print(note, markup=False, highlight=False)
    rows = []
    spinner = err.status("computing reference solution and evaluating...") if not json_ and live() else \
        contextlib.nullcontext()
    logged = said_in_log(f"computing the reference solution of the {bank} bank (once; later runs read it from "
                         f"{cache}) and evaluating", "evaluated", quiet=json_)
    with spinner, logged:
        for spec, s in scheds:
            try:
                res = ev.evaluate(s, bank=bank, n=samples)
            except (ScheduleError, ReferenceNotConverged):
                raise
            except Exception as e:  # the network raised on this schedule's inputs
                raise CliError(f"{spec} at NFE {s.nfe}: {raised_text(e)}") from None
            rows.append({"schedule": spec, "name": s.name, "nfe": res.nfe, "status": res.status, "error": res.error,
                         "bank": res.bank, "samples": res.n, "seconds": res.seconds, **res.metrics})
        try:
            drawn = None if grid is None else grids.schedule_grid(prob, scheds[0][1], scheds[0][0], cache,
                                                                    ev.device.type)
        except grids.GridError as e:
            raise CliError(f"--grid: {e}") from None
    if drawn is not None:
        grid.write_bytes(drawn.png())
        err.print(f"wrote {grid} ({drawn.rows} held-out samples: {drawn.columns[0].name}, "
                  f"{drawn.columns[1].name if len(drawn.columns) > 2 else 'no preset'}, the reference)")
    if json_:
        print(json.dumps({"problem": prob.name, "noise": prob.noise.to_dict().get("kind"), "results": rows,
                          **({"grid": {"path": str(grid), **drawn.to_dict()}} if drawn else {})},
                         indent=2, default=float))
        return
    table = Table(title=f"{prob.name} ({prob.noise.kind}), {bank} bank")
    shown = {"schedule", "name", "nfe", "status", "error", "bank", "samples", "seconds", "rmse", "median_err", "sw",
             "nll"}
    extra = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in shown]  # e.g. fd_digits, fd_reference
    for col in ("schedule", "NFE", "RMSE", "median err", "SW", "NLL", *extra, "status"):
        table.add_column(col, justify="right" if col not in ("schedule", "status") else "left")
    for r in rows:
        table.add_row(r["schedule"], str(r["nfe"]), fmt(r.get("rmse")), fmt(r.get("median_err")),
                      fmt(r.get("sw")), fmt(r.get("nll")), *[fmt(r.get(k)) for k in extra],
                      r["status"] if not r["error"] else f"{r['status']}: {r['error']}")
    out.print(table)


def sweep_cmd(
    problem: ProblemOpt = None,
    nfe: Annotated[str, typer.Option("--nfe", help="NFE list or ranges.")] = "3-10,12,15,20",
    preset_list: Annotated[str | None, typer.Option("--presets", help="Comma-separated preset specs, each "
                                                    "followed by its own options (unipc-bh2:order=3,"
                                                    "lower_order_final=false,ddim; default: all families).")] = None,
    noise: NoiseOpt = None,
    spacing: Annotated[str | None, typer.Option(
        "--spacing", help="Timestep spacing for the presets, or best: each preset at the best of its spacings "
                          "(chosen on the train bank) plus diffusers' default schedulers (default: the model's "
                          "default spacing).")] = None,
    bank: Annotated[Bank, typer.Option("--bank", help="Noise bank to score on.")] = "heldout",
    out_dir: Annotated[Path, typer.Option("--out", help="Output folder.")] = Path("runs/sweep"),
    cache: CacheOpt = DEFAULT_CACHE,
    study: Annotated[str | None, typer.Option("--study", help="Also store the results as trials of this study "
                                                              "(method preset) in the database.")] = None,
    db: Annotated[str | None, typer.Option("--db", envvar="STEPTUNE_DB", help="Database URL for --study "
                                                                              "(default runs/steptune.db).")] = None,
    json_: JsonOpt = False,
    model: ModelOpt = None,
    prediction: PredictionOpt = None,
    time_input: TimeInputOpt = None,
    time_scale: TimeScaleOpt = None,
    guidance: GuidanceOpt = None,
    shape: ShapeOpt = None,
    device: DeviceOpt = None,
):
    """NFE sweep of the preset solvers on a problem (or your --model): prints the RMSE table and saves it under
    runs/sweep/."""
    from steptune import sweep
    from steptune.search import DEFAULT_PRESETS

    nfes = parse_nfe_list(nfe)
    output_folder(out_dir, "--out")
    if study is not None and not study.strip():
        raise CliError("--study is empty; give the study a name")
    specs = presets.split_specs(preset_list) if preset_list else list(DEFAULT_PRESETS)
    for s in specs:
        _, opts = presets.parse_spec(s)  # a bad name or option is refused here, not as a row of "n/a"
        if spacing is not None and "spacing" in opts:
            also = "chooses one" if spacing == sweep.BEST else "sets one too"
            raise CliError(f"--presets {s}: it sets its own spacing, and --spacing {spacing} {also}; give one of them")
    ev = _evaluator(problem, noise, cache, device, model=model, prediction=prediction, time_input=time_input,
                    time_scale=time_scale, guidance=guidance, shape=shape)
    prob = ev.problem
    if spacing is None:
        from steptune.search import baselines

        spacing = baselines.default_spacing(prob)
    elif spacing != sweep.BEST:
        try:
            spacing_mod.check(spacing, prob.noise)
        except ScheduleError as e:
            raise ScheduleError(f"--spacing: {e}") from None
    why = sweep.unbuildable(specs, nfes, prob, spacing)
    if why:
        raise CliError(f"--presets: {why}")
    if study is not None:  # the database and the study are checked before the sweep runs
        from steptune.storage import StorageError, connect

        try:
            with connect(db) as store:
                why = sweep.study_problem_mismatch(store, study, prob, bank)
        except StorageError as e:
            raise CliError(f"--db: {e}") from None
        if why:
            raise CliError(why)
    total = sweep.size(specs, nfes, spacing, ev)
    done = []
    try:
        with task_bar(disable=json_) as progress:
            task = progress.add_task("reference solution", total=total)
            with said_in_log(f"computing the reference solution of the {bank} bank (once; later runs read it from "
                             f"{cache})", "reference solution ready", quiet=json_,
                             since=getattr(progress, "started", None)):
                ev.reference(bank)
            progress.update(task, description="evaluating presets")
            rows = sweep.run_sweep(ev, specs, nfes, spacing, bank,
                                   on_result=lambda r: (done.append(r), progress.advance(task)))
    except KeyboardInterrupt:
        raise Interrupted(f"the sweep stopped after {len(done)} of {total} evaluations; nothing was saved or stored; "
                          "run the same command again to sweep") from None
    stem = f"{prob.name}-{prob.noise.kind}".replace(":", "-") + (f"-{spacing}" if spacing else "")
    meta = {"problem": prob.name, "noise": prob.noise.to_dict(), "bank": bank, "metric": "rmse",
            "samples": ev.bank(bank).size}
    jpath, mpath = sweep.save(rows, out_dir, stem, meta)
    if study is not None:
        from steptune.storage import connect

        with connect(db) as store:
            stored = sweep.store_sweep(store, study, ev, rows, spacing, bank)
        err.print(f"stored {len(stored)} new trials in study {study!r}")
    if json_:
        print(json.dumps({"meta": meta, "rows": rows}, indent=2, default=float))
        return
    specs_, nfes_, cells = sweep.pivot(rows)
    best = sweep.best_by_nfe(rows)
    table = Table(title=f"RMSE to the exact ODE solution: {prob.name} ({prob.noise.kind}), {bank} bank")
    table.add_column("preset", style="bold")
    for n in nfes_:
        table.add_column(str(n), justify="right")
    chosen = sweep.chosen_spacings(rows) if spacing == sweep.BEST else {}
    for s in specs_:
        texts = [fmt(cells.get((s, n))) + (f" {chosen[s, n]}" if (s, n) in chosen else "") for n in nfes_]
        table.add_row(s, *[(Text(t, style="green") if best.get(n, {}).get("preset") == s else t)
                           for t, n in zip(texts, nfes_)])
    out.print(table)
    out.print(f"saved {jpath} and {mpath}")


def register(app: typer.Typer) -> None:
    app.command("presets")(presets_cmd)
    app.command("schedule")(schedule_cmd)
    app.command("eval")(eval_cmd)
    app.command("sweep")(sweep_cmd)
