"""`steptune refine`: tune a searched study's best schedules by gradient and store them as new trials."""

from __future__ import annotations

import json
from contextlib import ExitStack
from typing import Annotated

import typer
from rich.progress import BarColumn, TimeElapsedColumn
from rich.table import Table

from steptune.cli.console import err, fmt, out, text_column
from steptune.cli.errors import CliError, Interrupted
from steptune.cli.options import DEFAULT_DB, DbOpt, DeviceOpt, JsonOpt, StudyOpt, ThreadsOpt
from steptune.cli.problems import pick_device, set_threads
from steptune.cli.progress import LogBar, stamped, task_bar

STRUCTURES = 8  # steptune.search.refine.STRUCTURES, which imports torch
TRIMS = (0.0, 0.03)  # steptune.search.refine.TRIMS
GATE = 0.25  # steptune.search.refine.GATE


def refine_cmd(
    study: StudyOpt,
    nfe: Annotated[list[int] | None, typer.Option("--nfe", help="Refine the best searched schedules at this NFE "
                                                  "(repeat for several; default: every searched NFE).")] = None,
    trial: Annotated[int | None, typer.Option("--trial", help="Refine this trial id instead.")] = None,
    iters: Annotated[int, typer.Option("--iters", help="Gradient iterations per schedule (at most; the held-out "
                                       "bank stops it earlier).")] = 300,
    structures: Annotated[int | None, typer.Option("--structures", help="Screen the best searched schedules of this "
                                                   "many step structures at each NFE and refine the most promising "
                                                   "(default 8; 1: the best searched schedule alone).")] = None,
    neighbours: Annotated[bool, typer.Option("--neighbours/--no-neighbours", help="Then, in sweeps down and up the "
                                             "NFEs (with those the study's job interpolated, unless --nfe is "
                                             "given), also refine at each NFE schedules built from its neighbours' "
                                             "best.")] = True,
    samples: Annotated[int | None, typer.Option("--samples", help="Train-bank states the refinement fits on "
                                                "(default 128, or the whole train bank when it is smaller).")] = None,
    trim: Annotated[str, typer.Option("--trim", help="Share of those states, the ones of the largest error at each "
                                      "iteration, left out of the loss, or several separated by commas: each is "
                                      f"screened with every structure whose loss it changes by {GATE:.0%} or more, "
                                      "and the best kept (default "
                                      f"{','.join(f'{t:g}' for t in TRIMS)}).")] = ",".join(f"{t:g}" for t in TRIMS),
    time_: Annotated[str | None, typer.Option("--time", help="How long each refinement may take, its screening "
                                              "included: seconds or a text like 90s, 2m (default: no limit); it "
                                              "then keeps its best so far.")] = None,
    device: DeviceOpt = None,
    threads: ThreadsOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    json_: JsonOpt = False,
    db: DbOpt = DEFAULT_DB,
):
    """Refine a searched study's best schedules: their times, DC ratios and derivative coefficients tuned by
    gradient through the sampler against the reference on the train bank, judged on the held-out bank."""
    from steptune.jobs import parse_duration
    from steptune.refine import (
        built,
        neighbour_pass,
        parents,
        refine_trials,
        structure_groups,
        study_evaluator,
        study_job,
    )
    from steptune.run_lease import holding
    from steptune.runner import summarize
    from steptune.search.refine import RefineError
    from steptune.storage import connect

    if nfe and trial is not None:
        raise CliError("give either --nfe N or --trial ID, not both")
    if trial is not None and structures is not None:
        raise CliError("give either --trial ID (that trial alone) or --structures K, not both")
    for name, value in (("iters", iters), ("samples", samples), ("structures", structures)):
        if value is not None and value < 1:
            raise CliError(f"--{name} must be at least 1")
    trim = _trims(trim)
    structures = 1 if trial is not None else STRUCTURES if structures is None else structures
    try:
        seconds = None if time_ is None else parse_duration(time_)
    except ValueError as e:
        raise CliError(f"--time: {e}") from None
    set_threads(threads)
    device = pick_device(device)
    done = []
    todo = []
    with connect(db, must_exist=True) as store, ExitStack() as lease:
        try:
            job = study_job(store, study)
            lease.enter_context(holding(store, study, "refine"))  # no run works on the study meanwhile
            todo = parents(store.trials(study), study, nfe or None, trial)
            nfes = [t.nfe for t in todo]
            if samples is not None and samples > job.evaluation.train_samples:
                raise RefineError(f"--samples {samples} is larger than the study's train bank "
                                  f"({job.evaluation.train_samples}); use at most that many")
            ev = study_evaluator(job, device, store.get_study(study).problem)
            with task_bar(text_column(bold=True), BarColumn(), text_column("{task.fields[best]}"),
                          TimeElapsedColumn(), disable=quiet or json_) as bar:
                task = bar.add_task("refine", total=iters, best="")

                def tick(nfe_, i, n, best):
                    bar.update(task, completed=i, total=n, best=f"NFE {nfe_} | held-out RMSE {fmt(best)}")

                def say(msg):
                    bar.reset(task)
                    if not (quiet or json_):  # in a log, with the time its count lines carry
                        err.print(stamped(msg, bar.started) if isinstance(bar, LogBar) else msg)

                todo = structure_groups(store, study, ev, todo, structures, iters, say=say)
                done = refine_trials(store, study, ev, todo, iters=iters, samples=samples, trim=trim, say=say,
                                     progress=tick, seconds=seconds)
                if neighbours and trial is None:
                    # without --nfe, the NFEs a job's [refine] stage interpolated are swept with the searched ones
                    between = [] if nfe else [t.nfe for t in store.trials(study) if built(t, "interpolated")]
                    done += neighbour_pass(store, study, ev, [*nfes, *between], iters=iters,
                                           samples=samples, trim=trim, say=say, progress=tick, seconds=seconds)
            best = {r.nfe: store.best(study, r.nfe) for r in done}
            presets = {s.nfe: s for s in summarize(store.trials(study), sorted(best))}
        except RefineError as e:
            raise CliError(str(e)) from None
        except KeyboardInterrupt:
            stored = store.trials(study)
            ids = {p.id for item in todo for p in (item if isinstance(item, list) else [item])}
            n = sum(1 for t in stored if "refines" in t.info and t.info["refines"] in ids)
            raise Interrupted(f"{n} of {len(todo)} refinements were stored; run the command again to do the "
                              "rest") from None
    rows = [r.as_dict() for r in done]
    if json_:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title=f"Refinement of {study} (held-out RMSE)")
    for col in ("NFE", "structures", "before", "parent", "parent RMSE", "refined RMSE", "change", "seconds", "stored"):
        table.add_column(col, justify="left" if col == "stored" else "right")
    for r in done:
        change = "—" if r.change is None else f"{100 * r.change:+.1f}%"
        kept = _kept(r, best[r.nfe])
        stored = f"trial {r.trial} ({kept}{', earlier' if r.skipped else ''})"
        table.add_row(str(r.nfe), f"{r.structures}" + (f" from NFE {r.built_from}" if r.built_from else ""),
                      fmt(r.start_rmse), str(r.parent), fmt(r.parent_rmse),
                      fmt(r.rmse), change, f"{r.seconds:.1f}", stored)
    out.print(table)
    for n in sorted(best):
        if best[n] is not None:
            out.print(_verdict(n, best[n], presets.get(n)), highlight=False)


def _verdict(nfe: int, best, summary) -> str:
    """One line: the study's best at ``nfe`` now, against the best preset there (``summary``'s)."""
    p = None if summary is None else summary.preset_score
    if p is None or best.score is None:
        return f"NFE {nfe}: the best is trial {best.id}, {fmt(best.score)} held-out"
    if best.score < p:
        return (f"NFE {nfe}: the best is trial {best.id}, {fmt(best.score)} held-out, {p / best.score:.2f}x better "
                f"than the best preset ({summary.preset}, {fmt(p)}); best and export give it")
    return f"NFE {nfe}: the best preset ({summary.preset}, {fmt(p)}) is still the best held-out"


def _trims(text: str) -> list[float]:
    """``--trim``'s shares, each from 0 to below 1 (a CliError if not)."""
    try:
        trims = [float(x) for x in text.split(",")]
    except ValueError:
        trims = []
    if not trims or not all(0 <= t < 1 for t in trims):
        raise CliError(f"--trim {text}: give a share of the fit states from 0 to below 1, or several separated by "
                       "commas, e.g. 0,0.03")
    return trims


def _kept(r, best) -> str:
    """What became of refinement ``r``, against ``best``, the study's best trial at its NFE now."""
    if r.improved:
        if best is None or best.id == r.trial:
            return "better: preferred"
        return f"better than its parent; the NFE's best is trial {best.id}, {fmt(best.score)}"
    if r.built_from is not None and r.change is not None and r.change < 0:  # the built schedule beat the NFE's best
        now = "" if best is None else f"; the NFE's best is trial {best.id}, {fmt(best.score)}"
        return f"not better than its parent, which beats the NFE's previous best{now}"
    if r.built_from is not None:
        return "not better than the NFE's best, which stays"
    return "not better: the parent stays the best"


def register(app: typer.Typer) -> None:
    app.command("refine")(refine_cmd)
