"""`steptune search`: find, per NFE, a schedule that beats the presets (S^3, TPE, CMA-ES or random)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from steptune.cli.console import err, fmt, out
from steptune.cli.errors import CliError, Interrupted
from steptune.cli.options import (
    DEFAULT_CACHE,
    CacheOpt,
    GuidanceOpt,
    JsonOpt,
    ModelOpt,
    PredictionOpt,
    ProblemOpt,
    ShapeOpt,
    TimeInputOpt,
    TimeScaleOpt,
)
from steptune.suggested import command

# the job keys a search's options fill in, for errors to name the options
OPTION_OF_KEY = {"seed": "--seed", "search.nfe": "--nfe", "search.method": "--method", "budget.evaluations": "--budget",
                 "budget.time": "--time-budget", "evaluation.cheap_samples": "--cheap-samples",
                 "evaluation.heldout_samples": "--heldout-samples", "evaluation.confirm": "--confirm",
                 "evaluation.cache": "--cache", "refine.iters": "--refine", "storage.db": "--db",
                 "problem.name": "--problem", "problem.model": "--model", "problem.noise": "--noise",
                 "problem.prediction": "--prediction", "problem.time_input": "--time-input",
                 "problem.time_scale": "--time-scale", "problem.guidance_scale": "--guidance",
                 "problem.shape": "--shape"}


def in_options(message: str) -> str:
    """A job's error as the search's options name its keys (``search.nfe 500: ...`` -> ``--nfe 500: ...``)."""
    for key, option in OPTION_OF_KEY.items():
        message = message.replace(f"key '{key}'", option).replace(f"'{key}'", option)
        if "." in key:
            message = message.replace(key, option)
    return message


def search_cmd(
    problem: ProblemOpt = None,
    nfe: Annotated[str, typer.Option("--nfe", help="NFE list, e.g. 4,5,6,8,10 or 3-10.")] = "4,5,6,8,10",
    method: Annotated[str, typer.Option("--method", "-m", help="s3, tpe, cmaes, random or mo-tpe.")] = "s3",
    budget: Annotated[int, typer.Option("--budget", help="True (cheap-fidelity) evaluations per NFE.")] = 300,
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
    study: Annotated[str | None, typer.Option(
        "--study", help="Study name in the database; an unfinished study of the same search is resumed.")]
    = None,
    noise: Annotated[str | None, typer.Option("--noise", help="Noise schedule of the problem.")] = None,
    cheap_n: Annotated[int, typer.Option("--cheap-samples", help="Train-bank samples per evaluation.")] = 64,
    confirm_k: Annotated[int, typer.Option("--confirm", help="Best candidates per NFE confirmed on the "
                                                             "held-out bank.")] = 3,
    heldout_n: Annotated[int | None, typer.Option("--heldout-samples", help="Size of the held-out bank the "
                                                                           "results are reported on (default "
                                                                           "1024; 256 for networks).")] = None,
    time_budget: Annotated[str | None, typer.Option("--time-budget", help="Stop after this long (the whole run: "
                                                                          "baselines, search and confirmations): "
                                                                          "seconds or a text like 90s, 30m, 8h, "
                                                                          "1h30m.")] = None,
    refine: Annotated[int, typer.Option("--refine", help="After the search, refine the most promising searched "
                                                         "schedule per NFE by gradient for at most this many "
                                                         "iterations (as a job's refine stage; 0: none).")] = 0,
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the summary JSON.")] = Path("runs/search"),
    db: Annotated[str | None, typer.Option("--db", envvar="STEPTUNE_DB", help="Database URL (default "
                                                                              "sqlite:///runs/steptune.db).")]
    = None,
    cache: CacheOpt = DEFAULT_CACHE,
    json_: JsonOpt = False,
    model: ModelOpt = None,
    prediction: PredictionOpt = None,
    time_input: TimeInputOpt = None,
    time_scale: TimeScaleOpt = None,
    guidance: GuidanceOpt = None,
    shape: ShapeOpt = None,
):
    """Search schedules per NFE on a problem (or your --model); report held-out scores against the best preset."""
    from steptune.cli import cost as cost_table
    from steptune.cli.paths import file_stem, output_folder
    from steptune.cli.problems import build_problem, chosen_problem
    from steptune.cli.run import execute_job, print_imports, print_overfit, print_refine_hint, print_stopped

    output_folder(out_dir, "--out")
    from steptune.evaluators import evaluator_options
    from steptune.evaluators.load import parse_shape
    from steptune.jobs import JobError, job_from_dict
    from steptune.resolve import parse_nfe_list
    from steptune.search import METHODS
    from steptune.storage.db import resolve_url

    if method not in METHODS:
        raise CliError(f"--method {method!r} is unknown; use one of {', '.join(METHODS)}")
    problem = chosen_problem(problem, model)
    if study is not None and not study.strip():
        raise CliError("--study is empty; give the study a name (or leave --study out for one made of the problem, "
                       "method and seed)")
    if budget < 1:
        raise CliError(f"--budget {budget} is too small; give at least 1 evaluation per NFE")
    if refine < 0:
        raise CliError(f"--refine {refine} is negative; give the most gradient iterations per NFE, or 0 for none")
    nfes = parse_nfe_list(nfe)
    if not nfes:
        raise CliError("--nfe is empty; give at least one NFE, e.g. --nfe 4,5,6")
    prob = build_problem(problem, model, noise, prediction, time_input, time_scale, guidance, shape, note=False)
    sizes = evaluator_options(prob)
    if cheap_n > sizes.get("n_train", 256):
        err.print(f"note: --cheap-samples {cheap_n} is more than the {sizes.get('n_train', 256)} states of "
                  f"{prob.name}'s train bank: the bank grows to {cheap_n} (its reference solution is computed for each "
                  "of them, once)", highlight=False)
    name = study or f"{prob.name if model else problem}-{method}-s{seed}".replace(":", "-")
    conventions = {"noise": noise, "prediction": prediction, "time_input": time_input, "time_scale": time_scale,
                   "guidance_scale": guidance, "shape": list(parse_shape(shape)) if shape else None}
    # the presets over a wider NFE range too, to say at which NFE they catch up with the search
    wide = sorted(set(range(min(nfes), min(2 * max(nfes), 20) + 1)) - set(nfes))
    spec = {"study": name, "seed": seed,
            "problem": {"model" if model else "name": model or problem,
                        **{k: v for k, v in conventions.items() if v is not None}},
            "search": {"method": method, "nfe": nfes},
            "evaluation": {"cheap_samples": cheap_n, "train_samples": max(cheap_n, sizes.get("n_train", 256)),
                           "heldout_samples": sizes.get("n_heldout", 1024) if heldout_n is None else heldout_n,
                           "confirm": confirm_k,
                           "cache": str(cache), "baseline_nfe": wide},
            "budget": {"evaluations": budget, "time": time_budget},
            "storage": {"db": db}, "backend": {"kind": "local"}, **({"refine": {"iters": refine}} if refine else {})}
    try:
        job = job_from_dict(spec, where="search", names=OPTION_OF_KEY)
    except JobError as e:
        raise CliError(str(e).removeprefix("search: ")) from None
    try:
        result = execute_job(job, quiet=json_, db_from="--db" if db else None)
    except Interrupted:
        raise
    except CliError as e:  # the runner's checks name the job's keys
        raise CliError(in_options(str(e))) from None
    cost = cost_table.load_cost(job.storage.db, name)
    refined = refinements(job.storage.db, name)  # this run's, or an earlier run's: the study's all the same
    refine = bool(refine or refined)
    rows = [{"nfe": r.nfe, "best_preset": r.preset, "preset_rmse": r.preset_score,
             "searched_rmse": r.searched_score, "improvement": r.improvement,
             "preset_matches_at_nfe": r.preset_matches_at, "found_at_eval": r.found_at, "trial": r.trial,
             "schedule": r.schedule, **({"refined": refined.get(r.nfe)} if refine else {})} for r in result.per_nfe]
    payload = {"study": name, "problem": prob.name, "noise": prob.noise.to_dict(), "method": method,
               "seed": seed, "budget_per_nfe": budget, "status": result.status, "n_evals": result.evaluations,
               "n_confirm": result.confirmations, "baselines_unscored": result.baselines_queued,
               "baselines_finished": result.baselines_finished, "baselines_left": result.baselines_left,
               "search_exhausted": result.search_exhausted,
               "imports": result.imports, "failed": result.failed, "seconds": result.seconds,
               "cheap_samples": cheap_n, "heldout_samples": job.evaluation.heldout_samples, "results": rows,
               "database": resolve_url(job.storage.db), "cost": cost}
    jpath = out_dir / f"{file_stem(name)}.json"
    if json_:
        print(json.dumps(payload, indent=2, default=float))
    else:
        table = Table(title=f"{prob.name}: {method} search, {result.evaluations} evaluations "
                            f"(+{result.confirmations} held-out confirmations), held-out RMSE")
        for col in ("NFE", "best preset", "preset RMSE", "searched RMSE", "improvement", "preset matches at NFE",
                    *(("refined RMSE",) if refine else ())):
            table.add_column(col, justify="left" if col == "best preset" else "right")
        cost_table.add_columns(table)
        for r in rows:
            ref = r.get("refined")
            table.add_row(str(r["nfe"]), r["best_preset"] or "—", fmt(r["preset_rmse"]),
                          fmt(r["searched_rmse"]),
                          "—" if r["improvement"] is None else f"{r['improvement']:.2f}x",
                          "—" if r["searched_rmse"] is None else
                          str(r["preset_matches_at_nfe"] or f"> {max(wide + nfes)}"),
                          *(() if not refine else ("—",) if ref is None else
                            (fmt(ref["rmse"]) + ("" if ref["improved"] else " (the searched one kept)"),)),
                          *cost_table.cells(cost, r["nfe"]))
        out.print(table)
        out.print(cost_table.line(cost), highlight=False)
    _save_summary(jpath, payload, name)
    if not json_:
        err.print(f"study {name!r} is in the database; saved {jpath}")
        print_overfit(result, cheap_n, f"--cheap-samples {4 * cheap_n}")
        print_refine_hint(result, refine)
    print_imports(result)
    print_stopped(result, table=not json_)
    if result.status == "interrupted":
        raise typer.Exit(130)


def _save_summary(path: Path, payload: dict, study: str) -> None:
    """The summary JSON, written after the table is shown: a folder the checks passed and the file system refuses
    all the same loses the summary alone (exit status 1), never the study or its table."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    except OSError as e:
        failure = CliError(f"--out {path.parent}: could not save the summary ({e.strerror or e}); study {study!r} is "
                           f"in the database: {command('steptune', 'status', '--study', study)} shows it, and the same "
                           "search with another --out writes the summary without evaluating again")
        failure.exit_code = 1
        raise failure from None


def refinements(url: str | None, study: str) -> dict[int, dict]:
    """Per refined NFE, what the refine stage made of the search (the presets it also refines left out): the best
    held-out RMSE of the searched schedules, the schedules built from a neighbouring NFE's best and the refinements
    of either (``rmse``) and its trial's id (``trial``), whether a refinement or a built schedule beat the best
    searched one (``improved``), and the best refinement's own RMSE, trial id and seconds (``candidate_rmse``,
    ``candidate_trial``, ``seconds``; where a built schedule won, its seconds)."""
    from steptune.refine import best_found, is_refinement, searched
    from steptune.storage import connect

    with connect(url, must_exist=True) as store:
        trials = store.trials(study)
    by_id = {t.id: t for t in trials}
    kids = [t for t in trials if is_refinement(t) and not by_id[t.info["refines"]].info.get("baseline")]
    found = best_found([t for t in trials if not is_refinement(t) or t in kids])
    out = {}
    for nfe in sorted({t.nfe for t in kids if t.score is not None}):
        mine, best = [t for t in kids if t.nfe == nfe and t.score is not None], found.get(nfe)
        if best is None:  # refinements of a schedule the search did not make (an interpolated NFE's)
            continue
        start = min((t.score for t in trials if t.nfe == nfe and searched(t)), default=math.inf)
        improved = not searched(best) and best.score < start
        candidate = min(mine, key=lambda t: (t.score, t.number))
        out[nfe] = {"rmse": best.score, "trial": best.id, "improved": improved, "candidate_rmse": candidate.score,
                    "candidate_trial": candidate.id, "seconds": (best if improved else candidate).seconds}
    return out


def register(app: typer.Typer) -> None:
    app.command("search")(search_cmd)
