"""`steptune studies`, `best`, `export` and `import`: what a database holds, and the way out of it."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from shlex import quote as shell_quote
from typing import Annotated, Literal

import typer
from rich.markup import escape
from rich.table import Table

from steptune.cli.console import err, fmt, out
from steptune.cli.cost import nfe_cell, print_interpolated_note
from steptune.cli.errors import CliError
from steptune.cli.options import DEFAULT_DB, DbOpt, JsonOpt, StudyOpt
from steptune.cli.paths import STDOUT, file_stem, output_file, output_folder
from steptune.cli.sor import print_sor_study, sor_study_summary
from steptune.suggested import command

Format = Literal["json", "diffusers", "diffusers-stock", "sigmas", "comfyui"]
Interpolation = Literal["auto", "split", "blend", "pad"]


def _open(url: str, *, create: bool = False):
    from steptune.storage import connect

    return connect(url, create=create, must_exist=not create)


def _trial_json(t) -> dict:
    return {"id": t.id, "study": t.study, "number": t.number, "nfe": t.nfe, "score": t.score, "status": t.status,
            "name": t.schedule.get("name", ""), "fidelity": t.fidelity, "bank": t.bank, "n_samples": t.n_samples,
            "metrics": t.metrics, "worker": t.worker, "attempts": t.attempts, "seconds": t.seconds}


# ---- commands ------------------------------------------------------------------------------------


def studies_cmd(db: DbOpt = DEFAULT_DB, json_: JsonOpt = False):
    """List the studies: method, problem, trial counts and the best score at each NFE."""
    with _open(db) as store:
        counts = store.status_counts()
        rows = []
        for st in store.studies():
            if st.kind == "relaxation":  # rounds of SOR solves, not trials
                sor = sor_study_summary(store, st)
                rows.append({"study": st.name, "method": st.method, "kind": st.kind, "problem": sor["problem"],
                             "created": st.created.isoformat(), "rounds": sor["rounds"],
                             "mean_iterations": sor["mean_iterations"]})
                continue
            fidelity = st.config.get("fidelity")  # a searched study reports its held-out scores, as best does
            best = store.best_per_nfe(st.name, fidelity=fidelity)
            rows.append({"study": st.name, "method": st.method, "seed": st.seed, "metric": st.metric,
                         "fidelity": fidelity,
                         "problem": st.problem["name"] if st.problem else None, "noise": _noise_name(st.problem),
                         "created": st.created.isoformat(),
                         "trials": counts.get(st.name, {}),
                         "best": [{"nfe": t.nfe, "score": t.score, "trial": t.id, "number": t.number} for t in best]})
    if json_:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title=f"Studies in {db}")
    counted = ("trials", "complete", "pruned", "failed", "running/queued")
    for col in ("study", "method", "problem", *counted, "best score per NFE"):
        table.add_column(col, justify="right" if col in counted else "left")
    for r in rows:
        if "rounds" in r:
            mean = r["mean_iterations"]
            table.add_row(r["study"], r["method"], f"{r['problem'] or 'a sequence'} (SOR)", f"{r['rounds']} rounds",
                          "—", "—", "—", "—", f"mean {mean:.1f} iterations per system" if mean is not None else "—")
            continue
        c = r["trials"]
        problem = f"{r['problem']} ({r['noise']})" if r["problem"] and r["noise"] else r["problem"] or "—"
        table.add_row(r["study"], r["method"], problem, *(f"{n:,}" for n in (sum(c.values()), c.get("complete", 0),
                                                                         c.get("pruned", 0), c.get("failed", 0))),
                      f"{c.get('running', 0)}/{c.get('queued', 0)}",
                      ("  ".join(f"{b['nfe']}: {fmt(b['score'])}" for b in r["best"])
                       + (f"  ({r['fidelity']})" if r["fidelity"] and r["best"] else "")) or "—")
    out.print(table)


def best_cmd(study: StudyOpt, nfe: Annotated[int | None, typer.Option(
        "--nfe", min=1, help="NFE to report (default: the best at every NFE, with the Pareto front marked).")] = None,
             fidelity: Annotated[str | None, typer.Option("--fidelity", help="Only trials of this fidelity (default: "
                                                                       "the study's reporting fidelity, e.g. heldout "
                                                                       "for searches).")] = None,
             db: DbOpt = DEFAULT_DB, json_: JsonOpt = False):
    """The best complete trial of a study at an NFE (or at every NFE)."""
    from steptune.exports import export_dict
    from steptune.exports.json_export import built_from
    from steptune.search_cost import cost_at

    with _open(db) as store:
        st = store.get_study(study)
        if st.kind == "relaxation":
            if nfe is not None:
                raise CliError(f"study {study!r} is a relaxation study: it holds SOR rounds, not schedules at an "
                               "NFE; leave out --nfe")
            return print_sor_study(sor_study_summary(store, st), json_)
        fidelity = fidelity or st.config.get("fidelity")  # a searched study reports its held-out scores
        if nfe is not None:
            t = _best_or_fail(store, study, nfe, fidelity)
            if json_:
                print(json.dumps(export_dict(t, st, cost_at(store, t), built_from(store, t)), indent=2))
                return
            out.print(f"[bold]{escape(study)}[/] NFE {t.nfe}: {st.metric} {fmt(t.score)}  (trial id {t.id}, number "
                      f"{t.number} in the study, {escape(t.schedule.get('name') or 'unnamed')}, fidelity "
                      f"{t.fidelity or '—'}, bank {t.bank or '—'})", markup=True)
            if t.metrics:
                out.print("metrics: " + ", ".join(f"{k} {fmt(v) if isinstance(v, float) else v}"
                                                  for k, v in t.metrics.items()))
            made = _interpolated_nfes(store, study).get(t.nfe) if built_from(store, t) else None
            print_interpolated_note([(t.nfe, made)], with_cost=False)
            out.print(_describe(t.to_schedule()))
            return
        _check_fidelity(store, study, fidelity)
        best = store.best_per_nfe(study, fidelity=fidelity)
        front = {t.id for t in store.pareto(study, fidelity=fidelity)}
        made = _interpolated_nfes(store, study)
        # marked: a trial interpolated for its NFE or refined from one; not a preset (or its refinement) there
        source = {t.id: made.get(t.nfe) if t.nfe in made and built_from(store, t) else None for t in best}
    if not best:
        raise CliError(f"study {study!r} has no complete trial with a score yet")
    if json_:
        print(json.dumps([{**_trial_json(t), "pareto": t.id in front, "interpolated_from": source[t.id]}
                          for t in best], indent=2))
        return
    table = Table(title=f"Best per NFE: {study} ({st.metric}, lower is better; * = Pareto front)")
    for col in ("NFE", st.metric, "trial id", "schedule", "fidelity", ""):
        table.add_column(col, justify="right" if col in ("NFE", st.metric, "trial id") else "left",
                         no_wrap=col == "trial id")
    for t in best:
        table.add_row(nfe_cell(t.nfe, source[t.id]), fmt(t.score), str(t.id), t.schedule.get("name") or "—",
                      t.fidelity or "—", "*" if t.id in front else "")
    out.print(table)
    print_interpolated_note([(t.nfe, source[t.id]) for t in best], with_cost=False)


def _interpolated_nfes(store, study: str) -> dict[int, list[int]]:
    """The study's NFEs interpolated from searched ones, with the NFEs each was built from (its cost's mark)."""
    from steptune.search_cost import study_cost

    cost = study_cost(store.trials(study, schedules=False))
    return {c.nfe: c.interpolated_from for c in cost.per_nfe if c.interpolated_from}


def _check_fidelity(store, study: str, fidelity: str | None) -> None:
    """Refuse a fidelity none of the study's trials has, naming the ones it has."""
    if fidelity is None or store.best_per_nfe(study, fidelity=fidelity):
        return
    have = sorted({t.fidelity for t in store.trials(study) if t.fidelity})
    if fidelity not in have:
        raise CliError(f"--fidelity {fidelity!r}: study {study!r} has no trials of that fidelity"
                       + (f" (it has {', '.join(have)})" if have else ""))


def _best_or_fail(store, study: str, nfe: int, fidelity: str | None):
    _check_fidelity(store, study, fidelity)
    t = store.best(study, nfe, fidelity=fidelity)
    if t is None:
        have = [b.nfe for b in store.best_per_nfe(study, fidelity=fidelity)]
        hint = f"NFEs with results: {', '.join(map(str, have))}" if have else "it has no complete trial yet"
        raise CliError(f"study {study!r} has no complete trial at NFE {nfe} ({hint})")
    return t


def _describe(s) -> str:
    parts = []
    for st in s.steps:
        p = f"{st.prediction[0]}{st.order}"
        if st.corrector is not None:
            p += "+" + ("C" if st.corrector.kind == "implicit" else "c")
        parts.append(p)
    times = ", ".join(f"{t:.4g}" for t in s.times)
    return f"times: {times}\nsteps (prediction, order, +c corrector, +C implicit corrector): {' '.join(parts)}"


def export_cmd(
    study: StudyOpt,
    nfe: Annotated[int | None, typer.Option("--nfe", min=1, help="Export the best trial at this NFE (interpolated "
                                            "from the searched NFEs if the study has none there).")] = None,
    trial: Annotated[int | None, typer.Option("--trial", help="Export this trial id instead of the best.")] = None,
    format_: Annotated[Format, typer.Option("--format", "-f", help="The export's form.")] = "json",
    output: Annotated[Path | None, typer.Option("-o", "--output", help="File (json, sigmas, comfyui) or folder "
                                                "(diffusers, diffusers-stock); default (or -): print, or a "
                                                "folder under runs/export/.")] = None,
    stock: Annotated[str | None, typer.Option("--stock", help="diffusers-stock: dpmsolver, euler, flowmatch or "
                                              "auto (the default).")] = None,
    prediction: Annotated[str | None, typer.Option("--prediction", help="diffusers and diffusers-stock: the model's "
                                                   "prediction type (eps, x0, v, flow), where the study has no problem "
                                                   "stored or to override its.")] = None,
    time_input: Annotated[str | None, typer.Option("--time-input", help="diffusers and diffusers-stock: the model's "
                                                   "time input (discrete, continuous, sigma), as --prediction.")]
    = None,
    fidelity: Annotated[str | None, typer.Option("--fidelity", help="Only trials of this fidelity.")] = None,
    interpolation: Annotated[Interpolation | None, typer.Option(
        "--interpolation", help="At an NFE the study did not search: auto (split up to the largest searched "
                                "NFE, blend above it), split (the searched NFE below, its widest intervals split), "
                                "blend (times blended between the neighbours) or pad (the searched NFE below with "
                                "short steps added at its end); default auto.")] = None,
    db: DbOpt = DEFAULT_DB,
):
    """Export a study's best schedule at an NFE as JSON, a diffusers scheduler folder, or a sigma list."""
    from steptune.exports import (
        comfyui_sigmas,
        conventions_for,
        export_dict,
        k_diffusion_sigmas,
        scheduler_for,
        sigma_list_calls,
        stock_diffusers_export,
    )
    from steptune.exports.json_export import built_from
    from steptune.search_cost import cost_at

    if (nfe is None) == (trial is None):
        raise CliError("give either --nfe N (the best trial at that NFE) or --trial ID")
    if output is not None:
        if format_ in ("diffusers", "diffusers-stock"):
            output_folder(output, "-o")
        else:
            output_file(output, "-o", stdout=True)
    interpolated = None
    with _open(db) as store:
        st = store.get_study(study)
        if st.kind == "relaxation":
            raise CliError(f"study {study!r} is a relaxation study: it holds SOR rounds, not schedules; "
                           f"{command('steptune', 'relax-report', '--study', study)} reports it")
        fidelity = fidelity or st.config.get("fidelity")
        if trial is not None:
            t = store.trial(trial)
            if t.study != study:
                raise CliError(f"trial {trial} belongs to study {t.study!r}, not {study!r}")
        else:
            t = store.best(study, nfe, fidelity=fidelity)
            interpolated = None if t is not None else _interpolated(store, st, nfe, fidelity,
                                                                    interpolation or "auto")
            if t is None and interpolated is None:
                t = _best_or_fail(store, study, nfe, fidelity)
        cost = cost_at(store, t) if format_ == "json" and interpolated is None else None
        source = built_from(store, t) if format_ == "json" and interpolated is None else None
    sched = t.to_schedule() if interpolated is None else interpolated["schedule"]
    folder_form = format_ in ("diffusers", "diffusers-stock")
    unused = [(stock is not None and format_ != "diffusers-stock", f"--stock {stock}", "--format diffusers-stock"),
              (prediction is not None and not folder_form, f"--prediction {prediction}", "the diffusers formats"),
              (time_input is not None and not folder_form, f"--time-input {time_input}", "the diffusers formats"),
              (interpolation is not None and interpolated is None, f"--interpolation {interpolation}",
               "an NFE the study did not search")]
    for _, option, what in (u for u in unused if u[0]):
        err.print(f"note: {option} is not used: it is for {what}", highlight=False, markup=False)
    if interpolated is not None:
        between = interpolated["between"]
        err.print(f"note: study {study!r} has no trial at NFE {nfe}: the schedule is interpolated from "
                  f"{'NFEs' if len(between) > 1 else 'NFE'} {', '.join(map(str, between))} (decisions from NFE "
                  f"{interpolated['near']}), not searched or scored"
                  + (f"; above the largest searched NFE a preset may do better (bench/extrapolate.py: on gmm-digits "
                     "the best preset at its best spacing beat such schedules at NFE 12 to 30): compare them with "
                     f"'steptune eval', or search NFE {nfe}" if nfe > interpolated["top"] else ""))
    elif t.status == "pruned":
        err.print(f"note: trial id {t.id} is pruned: a refinement that did not beat its parent on the held-out bank "
                  "(its scores are in the export; the parent is the better schedule)")
    elif t.status != "complete":
        err.print(f"note: trial id {t.id} is {t.status}, not evaluated: the export carries no scores")
    stem = f"{file_stem(study)}-nfe{sched.nfe}"
    if format_ == "json":
        doc = export_dict(t, st, cost, source) if interpolated is None else interpolated["doc"]
        text = json.dumps(doc, indent=2) + "\n"
        _emit(text, output)
    elif format_ in ("sigmas", "comfyui"):
        text = (json.dumps(k_diffusion_sigmas(sched)) if format_ == "sigmas" else comfyui_sigmas(sched)) + "\n"
        _emit(text, output)
        calls, why = sigma_list_calls(sched)
        space = "t (a flow model's sigma)" if _noise_kind(sched) == "flow" else "sigma/alpha"
        err.print(f"note: the list is in {space}; a sampler making one model call per interval (Euler, DPM++ 2M) "
                  f"makes {calls} calls on it, the tuned schedule {sched.nfe}" + (f": {'; '.join(why)}" if why else ""))
        err.print("note: the list carries only the times; the per-step decisions (orders, correctors) travel in the "
                  "JSON and diffusers exports")
    else:
        try:
            conv = conventions_for(sched, st, prediction=prediction, time_input=time_input)
        except ValueError as e:
            raise CliError(str(e)) from None
        folder = output or Path("runs/export") / (stem + ("-scheduler" if format_ == "diffusers" else "-stock"))
        if folder.exists() and not folder.is_dir():
            raise CliError(f"{folder} is a file; the {format_} export writes a folder")
        try:
            if format_ == "diffusers":
                scheduler_for(sched, conv).save_pretrained(str(folder))
                err.print(f"wrote {folder}/ (SteptuneScheduler, {sched.nfe} NFE); load it with "
                          f"SteptuneScheduler.from_pretrained({str(folder)!r})")
            else:
                exp = stock_diffusers_export(sched, conv, stock or "auto")
                exp.save(folder)
                key = next(iter(exp.kwargs))
                err.print(f"wrote {folder}/ ({exp.class_name}); call the pipeline with {key}= from "
                          f"{folder}/steptune_set_timesteps.json")
        except ModuleNotFoundError as e:
            raise CliError(f"the {format_} export needs the Python package {e.name!r}; install it with: "
                           'pip install "steptune[diffusers]"') from None


def _interpolated(store, st, nfe: int, fidelity: str | None, method: str) -> dict | None:
    """The schedule ``retime.interpolate`` builds at ``nfe`` from the study's best trials, with its export JSON; None
    when the study has no complete trial to build from."""
    from steptune.exports.json_export import interpolated_export_dict
    from steptune.space.retime import interpolate

    best = {t.nfe: t for t in store.best_per_nfe(st.name, fidelity=fidelity)}
    if not best:
        return None
    sched = interpolate({n: t.to_schedule() for n, t in best.items()}, nfe, method=method)
    info = sched.meta["interpolated"]
    doc = interpolated_export_dict(sched, best[info["decisions_from"]], [best[n] for n in info["between"]], st)
    return {"schedule": sched, "doc": doc, "between": info["between"], "near": info["decisions_from"],
            "top": max(best)}


def _noise_name(problem: dict | None) -> str | None:
    """The noise schedule a stored problem runs on: its name (ddpm-linear) or its kind (vp-linear)."""
    noise = ((problem or {}).get("identity") or {}).get("noise") or {}
    return noise.get("name") or noise.get("kind")


def _noise_kind(schedule) -> str:
    return (schedule.noise or {}).get("kind", "")


def _emit(text: str, output: Path | None) -> None:
    if output is None or output == STDOUT:
        sys.stdout.write(text)
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    err.print(f"wrote {output}")


def import_cmd(
    file: Annotated[Path, typer.Argument(help="Schedule JSON file (a steptune export or a hand-written schedule), "
                                              "or the folder 'export --format diffusers' wrote.")],
    study: StudyOpt,
    queue: Annotated[bool, typer.Option("--queue", help="Import as a queued trial (to evaluate) even if the file "
                                                        "carries metrics.")] = False,
    allow_duplicates: Annotated[bool, typer.Option("--allow-duplicates", help="Import the schedule even if the "
                                                                             "study already holds it.")] = False,
    db: DbOpt = DEFAULT_DB,
    json_: JsonOpt = False,
):
    """Add a schedule file to a study (created if missing); the file is checked before anything is written."""
    from steptune.exports import import_schedule, read_export
    from steptune.study_problem import difference

    if not study.strip():
        raise CliError("--study is empty; give the study a name")
    _, prov = read_export(file)  # refuse a bad file before even opening the database
    with _open(db, create=True) as store:
        t = import_schedule(store, file, study, queue=queue, allow_duplicates=allow_duplicates)
        record = store.get_study(study)
        stored = record.problem
    if json_:
        print(json.dumps(_trial_json(t), indent=2))
        return
    scored_elsewhere = ""
    if t.status != "complete" and not queue and (prov or {}).get("metrics"):  # why its scores were not taken
        found = difference((prov.get("problem") or {}).get("identity") or {}, (stored or {}).get("identity") or {},
                           every_key=True)  # as the import compares them: every key
        if found is not None:
            key, there, here = found
            scored_elsewhere = (f" (the file's scores are of another problem: {key} {str(there)[:40]} there, "
                                f"{str(here)[:40]} in the study)")
    if t.status == "complete":
        how = f"complete, {fmt(t.score)} from its provenance"
    elif record.kind == "import":  # no job or search made the study: no run of it will come to score the trial
        how = (f"queued{scored_elsewhere}; no run scores trials of a study made by import: score the file with "
               f"{command('steptune', 'eval', '-s', str(file))}, or import"
               " it into the study of a search or job, whose next run scores it")
    else:
        how = (f"queued{scored_elsewhere}: the study's next run scores it, 'steptune run' of its job file or the "
               f"'steptune search' that made it again with --study {shell_quote(study)}")
    err.print(f"imported {file} into study {study!r} as trial id {t.id} (number {t.number} in the study, NFE {t.nfe}, "
              f"{how})")


def register(app: typer.Typer) -> None:
    app.command("studies")(studies_cmd)
    app.command("best")(best_cmd)
    app.command("export")(export_cmd)
    app.command("import")(import_cmd)
