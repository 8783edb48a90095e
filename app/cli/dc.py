"""`steptune dc fit`, `steptune dc cpr` and `steptune dc predict`: DC-Solver compensation ratios."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
from rich.table import Table

from steptune.cli.console import err, fmt, out, text_column
from steptune.cli.errors import CliError, Interrupted
from steptune.cli.options import (
    DEFAULT_CACHE,
    DEFAULT_DB,
    CacheOpt,
    DbOpt,
    DeviceOpt,
    JsonOpt,
    PredictionOpt,
    ShapeOpt,
    ThreadsOpt,
    TimeInputOpt,
    TimeScaleOpt,
)
from steptune.cli.problems import build_problem, guidance_of, pick_device, problem_evaluator, set_threads
from steptune.cli.progress import LogBar, task_bar
from steptune.dc_studies import (
    check_bank_version,
    check_same_fit,
    choose_cpr,
    cpr_plan,
    fit_command,
    fit_rows,
    fitted_rows,
    heldout_mse,
    interpolated,
    load_dc_study,
    solver_baselines,
    store_cpr,
    study_evaluator,
    study_schedule,
)

dc_app = typer.Typer(help="DC-Solver compensation ratios: fit them, predict them for unseen configurations.",
                     no_args_is_help=True, add_completion=False)


def _bounds(text: str) -> tuple[float, float] | None:
    if text.strip().lower() == "none":
        return None
    parts = text.split(",")
    try:
        lo, hi = (float(v) for v in parts)
    except ValueError:
        raise CliError(f"--bounds {text!r}: give LO,HI (e.g. 0.3,1.7) or none") from None
    if not (0 < lo < 1 < hi and math.isfinite(hi)):
        raise CliError(f"--bounds {text!r}: need 0 < LO < 1 < HI (a ratio of 1 is no compensation)")
    return lo, hi


def _floats(text: str | None, what: str) -> list[float | None]:
    if text is None or not text.strip():
        return [None]
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise CliError(f"{what} {text!r}: give numbers like 1.5,3,5") from None
    twice = sorted({v for v in values if values.count(v) > 1})
    if twice:
        raise CliError(f"{what} {text!r}: {twice[0]:g} is given twice; give each value once")
    return values


def _guidance(guidance, cfg):
    """``--guidance``, or its old name ``--cfg``."""
    if guidance is not None and cfg is not None:
        raise CliError("--cfg is the old name of --guidance; give one of them")
    return guidance if guidance is not None else cfg


def _check_cfg(cfg: float | None) -> None:
    """A guidance scale is a finite number, 0 or more."""
    if cfg is not None and not (math.isfinite(cfg) and cfg >= 0):
        raise CliError(f"--guidance {cfg:g}: a guidance scale must be a finite number, 0 or more")


def _check_ridge(ridge: float) -> None:
    if not (math.isfinite(ridge) and ridge >= 0):
        raise CliError(f"--ridge {ridge:g}: the ridge penalty must be a finite number, 0 or more")


def cpr_cases(plan: list[tuple], fit_samples: int, bar: Progress | LogBar) -> list:
    """Each configuration's fit noises (the train bank's first ``fit_samples``) and cached final reference."""
    from steptune.search.dc import CPRCase, fit_targets

    task = bar.add_task("references", total=len(plan))
    cases = []
    for ev, schedule, nfe, cfg in plan:
        x, targets = fit_targets(ev, schedule, fit_samples)
        cases.append(CPRCase(ev.problem.model, schedule, x, targets[-1], nfe, cfg))
        bar.advance(task)
    bar.remove_task(task)
    return cases


def refine(start, cases: list, iters: int, lr: float, bar: Progress | LogBar):
    from steptune.search.dc import refine_cpr

    task = bar.add_task("end-to-end CPR", total=iters)
    cpr, history = refine_cpr(start, cases, iters=iters, lr=lr, progress=lambda k, n: bar.update(task, completed=k))
    bar.remove_task(task)
    finite = [h for h in history if math.isfinite(h)]
    if not finite:
        raise CliError("the end-to-end CPR fit gave no finite loss; nothing was stored")
    return cpr, [h if math.isfinite(h) else None for h in history], min(finite)


def _fit_all(plans, configs: list, methods, fit_samples: int, greedy_iters: int, joint_iters: int,
             continuation: bool, quiet: bool, bounds) -> None:
    """Fit every (CFG, schedule) of ``plans`` into ``configs`` (as they finish, so an interrupt leaves the
    finished ones there), then continue each NFE's joint fits across the guidance scales."""
    from steptune.search import dc

    with task_bar(text_column(bold=True), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  disable=quiet) as bar:
        for g, ev, scheds in plans:
            for s in scheds:
                cfg = "unguided" if g is None else f"CFG {g:g}"
                task = bar.add_task(f"{cfg} NFE {s.nfe}: reference", total=None)

                def tick(name, k, n, task=task, s=s, cfg=cfg):
                    bar.update(task, description=f"{cfg} NFE {s.nfe}: {name} fit", completed=k, total=n)

                fit = dc.fit_config(ev, s, methods=methods, fit_samples=fit_samples, greedy_iters=greedy_iters,
                                    joint_iters=joint_iters, bounds=bounds, progress=tick)
                bar.remove_task(task)
                configs.append((g, ev, s, fit))
        if continuation and "joint" in methods:
            for n in sorted({s.nfe for _, _, s, _ in configs}):
                group = [(0.0 if g is None else g, fit) for g, _, s, fit in configs if s.nfe == n]
                if len(group) > 1:
                    task = bar.add_task(f"NFE {n}: joint fits continued across CFG", total=2 * len(group) - 2)
                    dc.continue_across_guidance(group, iters=joint_iters, bounds=bounds,
                                                progress=lambda k, _, task=task: bar.update(task, completed=k))
                    bar.remove_task(task)



@dc_app.command("fit")
def fit_cmd(
    problem: Annotated[str, typer.Option("--problem", "-p", help="digits-cond, gmm-digits, gmm-2d or "
                                                                 "module:factory.")] = "digits-cond",
    solver: Annotated[str, typer.Option("--solver", help="Preset spec, or a schedule JSON file (e.g. a "
                                                         "searched one) to refine.")] = "unipc-bh2",
    nfe: Annotated[str | None, typer.Option("--nfe", help="NFE list, e.g. 5,6,8,10 (the default for a preset); "
                                                          "a schedule file has its own NFE.")] = None,
    guidance: Annotated[str | None, typer.Option("--guidance", help="Guidance scales, e.g. 1.5,3,5.")] = None,
    cfg: Annotated[str | None, typer.Option("--cfg", hidden=True, help="Old name of --guidance.")] = None,
    method: Annotated[Literal["greedy", "joint", "both"], typer.Option(
        "--method", help="greedy, joint, or both (joint refines greedy).")] = "both",
    study: Annotated[str | None, typer.Option("--study", help="Store the fitted schedules as trials of this "
                                                              "study.")] = None,
    fit_samples: Annotated[int, typer.Option("--fit-samples", help="Train-bank noises to fit on.")] = 10,
    greedy_iters: Annotated[int, typer.Option("--greedy-iters", help="AdamW iterations per step.")] = 20,
    joint_iters: Annotated[int, typer.Option("--joint-iters", help="Adam iterations of the joint fit.")] = 30,
    continuation: Annotated[bool, typer.Option("--continuation/--no-continuation",
                                               help="Restart each joint fit from its neighbouring guidance "
                                                    "scales' ratios at the same NFE, keeping the better fit.")]
    = True,
    noise: Annotated[str | None, typer.Option("--noise", help="Noise schedule (gmm problems and models).")]
    = None,
    prediction: PredictionOpt = None, time_input: TimeInputOpt = None, time_scale: TimeScaleOpt = None,
    shape: ShapeOpt = None,
    bounds: Annotated[str, typer.Option("--bounds", help="Box of the ratios, LO,HI (DC-Solver's 0.3,1.7), or "
                                                         "none: fit log(ratio), no bound to end on.")] = "0.3,1.7",
    cache: CacheOpt = DEFAULT_CACHE,
    db: DbOpt = DEFAULT_DB,
    threads: ThreadsOpt = None,
    device: DeviceOpt = None,
    json_: JsonOpt = False,
):
    """Fit DC-Solver ratios per (NFE, CFG) on fixed noises; report held-out MSE against the reference, against the
    solver at its best spacing and against diffusers' default scheduler."""
    from steptune.resolve import parse_nfe_list, resolve
    from steptune.search import baselines, dc
    from steptune.space import ScheduleError

    set_threads(threads)
    device = pick_device(device)
    methods = {"both": ("greedy", "joint"), "greedy": ("greedy",), "joint": ("joint",)}[method]
    box = _bounds(bounds)
    if fit_samples < 1:
        raise CliError("--fit-samples must be at least 1")
    for option, iters in (("--greedy-iters", greedy_iters), ("--joint-iters", joint_iters)):
        if iters < 1:
            raise CliError(f"{option} {iters}: the fit needs at least 1 iteration")
    is_file = not solver.startswith("preset:") and Path(solver).suffix == ".json"
    spec = solver if is_file or solver.startswith("preset:") else f"preset:{solver}"
    from steptune.evaluators.evaluator import BANK_VERSION

    made_as = {"kind": "dc-fit", "problem": problem, "solver": spec, "fit_samples": fit_samples,
               "bank_version": BANK_VERSION,
               "conventions": {"noise": noise, "prediction": prediction, "time_input": time_input,
                               "time_scale": time_scale, "shape": shape}}
    if is_file and not Path(solver).is_file():
        raise CliError(f"--solver {solver}: no such schedule file")
    try:
        nfes = parse_nfe_list(nfe if nfe is not None or is_file else "5,6,8,10")
        if is_file:
            resolve(spec, nfes, None)  # a bad file, or an --nfe it does not cost, is refused before any work
    except ScheduleError as e:
        raise CliError(str(e)) from None
    cfgs = _floats(_guidance(guidance, cfg), "--guidance")
    for g in cfgs:
        _check_cfg(g)
    plans = []  # (cfg, evaluator, schedules) of every configuration, all checked before any fit
    for g in cfgs:
        prob = build_problem(problem, None, noise, prediction, time_input, time_scale, g, shape)
        g = guidance_of(prob) if g is None else g
        ev = problem_evaluator(prob, cache, device)
        if fit_samples > ev.sizes["train"]:
            raise CliError(f"--fit-samples {fit_samples} is more than the {ev.sizes['train']} noises of "
                             f"the train bank of {problem}; use 1 .. {ev.sizes['train']}")
        if not is_file and not plans and "spacing=" not in spec:  # a preset at the model's default spacing
            spec = "preset:" + baselines.with_spacing(spec.removeprefix("preset:"), baselines.default_spacing(prob))
            made_as["solver"] = spec
        try:
            scheds = resolve(spec, nfes, prob.noise, None, prob.t_start, prob.t_end)
            for s in scheds:
                ev.check(s)
        except ScheduleError as e:
            raise CliError(str(e)) from None
        plans.append((g, ev, scheds))
    if study is not None:
        check_same_fit(db, study, made_as, prob)
    configs = []  # (cfg, evaluator, schedule, ConfigFit)
    try:
        err.print(f"fitting {sum(len(scheds) for _, _, scheds in plans)} configurations ({', '.join(methods)})",
                  highlight=False)
        _fit_all(plans, configs, methods, fit_samples, greedy_iters, joint_iters, continuation, json_, box)
    except KeyboardInterrupt:
        total = sum(len(scheds) for _, _, scheds in plans)
        kept = "nothing was stored (a study gets its fits all at once); " if study is not None else ""
        raise Interrupted(f"{len(configs)} of {total} configurations were fitted; {kept}run the command again "
                          "to fit them") from None
    rows, items = [], []
    for g, ev, s, fit in configs:
        base = ev.evaluate(dc.with_ratios(s, [1.0] * len(s.steps)), "heldout")
        row = {"nfe": s.nfe, "cfg": g, "solver": spec, "mse_base": base.metrics["rmse"] ** 2,
               "reference_seconds": fit.reference_seconds}
        for m, r in fit.fits.items():
            fitted = fit.fitted(m)
            res = ev.evaluate(fitted, "heldout")
            row[f"mse_{m}"] = res.metrics["rmse"] ** 2
            row[f"ratios_{m}"] = r.ratios
            row[f"seconds_{m}"] = r.seconds
            row[f"on_bound_{m}"] = {str(i): side for i, side in dc.on_bound(r.ratios, box).items()}
            info = {"dc_fit": m, "cfg": g, "solver": spec, "fit_samples": fit_samples,
                    "fit_loss": r.loss, "fit_loss_start": r.loss_start,
                    "mse_uncompensated": row["mse_base"]}
            items.append({"schedule": fitted, "status": "complete", "metrics": res.metrics,
                          "fidelity": "heldout", "bank": "heldout", "n_samples": res.n,
                          "seconds": r.seconds, "info": info})
        for label, res, sched, info in solver_baselines(ev, spec, s.nfe):
            row[f"mse_{label.replace(' ', '_')}"] = res.metrics["rmse"] ** 2
            items.append({"schedule": sched, "status": res.status, "metrics": res.metrics, "error": res.error,
                          "fidelity": "heldout", "bank": "heldout", "n_samples": res.n, "seconds": res.seconds,
                          "info": {**info, "cfg": g}})
        rows.append(row)
    if study is not None and items:
        from steptune.storage import StorageError, connect

        try:
            with connect(db) as store:
                config = {**made_as, "noise": prob.noise.to_dict(), "t_start": prob.t_start, "t_end": prob.t_end}
                store.add_trials(study, items, create={"method": "dc", "kind": "dc-fit", "config": config,
                                                       "problem": prob.identity()})
        except StorageError as e:
            raise CliError(str(e)) from None
    if json_:
        print(json.dumps({"problem": problem, "solver": spec, "study": study, "rows": rows}, indent=2,
                         default=float))
        return
    table = Table(title=f"DC-Solver ratios: {problem}, {spec}, held-out MSE to the reference")
    cols = (["NFE", "CFG", "MSE (no DC)"] + [f"MSE {m}" for m in methods]
            + ["change", "best spacing", "diffusers default", "on bound", "fit s"])
    for c in cols:
        table.add_column(c, justify="right")
    for r in rows:
        best = min(r.get(f"mse_{m}", math.inf) for m in methods)
        secs = sum(r.get(f"seconds_{m}", 0.0) for m in methods)
        pinned = "; ".join(f"{m} step {i} {side}" for m in methods for i, side in r[f"on_bound_{m}"].items())
        table.add_row(str(r["nfe"]), "—" if r["cfg"] is None else f"{r['cfg']:g}", fmt(r["mse_base"]),
                      *[fmt(r.get(f"mse_{m}")) for m in methods],
                      f"{100 * (best / r['mse_base'] - 1):+.1f}%", fmt(r.get("mse_best_spacing")),
                      fmt(r.get("mse_diffusers_default")), pinned or "—", f"{secs:.1f}")
    out.print(table)
    if any(r[f"on_bound_{m}"] for r in rows for m in methods):
        err.print(f"note: a ratio ended on a bound of the box {box}; the fit wanted it outside: try --bounds none, "
                  "or a better base spacing (--solver NAME:spacing=time-uniform)", highlight=False)
    if study is not None:
        fits = sum(1 for item in items if "dc_fit" in item["info"])
        err.print(f"stored {fits} fitted schedule{'s' * (fits != 1)} and {len(items) - fits} of the solver's baselines "
                  f"in study {study!r} ({db})")

@dc_app.command("cpr")
def cpr_cmd(
    study: Annotated[str, typer.Option("--study", help="A study written by 'steptune dc fit'.")],
    fit: Annotated[Literal["joint", "greedy"], typer.Option("--fit", help="Which fitted ratios the regression starts "
                                                                          "from.")] = "joint",
    iters: Annotated[int, typer.Option("--iters", help="Adam iterations of the end-to-end fit.")] = 40,
    lr: Annotated[float, typer.Option("--lr", help="Adam learning rate.")] = 0.003,
    ridge: Annotated[float, typer.Option("--ridge", help="Ridge penalty of the starting regression.")] = 1e-3,
    cache: CacheOpt = DEFAULT_CACHE,
    db: DbOpt = DEFAULT_DB,
    threads: ThreadsOpt = None,
    device: DeviceOpt = None,
    json_: JsonOpt = False,
):
    """Fit the cascade polynomial regression end to end on every fitted configuration of a study (backprop
    through each sampler) and store its coefficients with the study; 'dc predict' then uses them."""
    from steptune.search.dc import CPR

    set_threads(threads)
    device = pick_device(device)
    if iters < 1:
        raise CliError("--iters must be at least 1")
    if not lr > 0:
        raise CliError("--lr must be positive")
    _check_ridge(ridge)
    config, trials = load_dc_study(db, study)
    check_bank_version(study, config)  # CPR end to end runs the stored fits' configurations on their fit noises
    rows = fitted_rows(study, trials, fit)
    start = CPR.fit(rows, ridge=ridge)
    plan = cpr_plan(study, config, rows, cache, device)
    with task_bar(text_column(bold=True), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn()) as bar:
        cases = cpr_cases(plan, int(config.get("fit_samples", 10)), bar)
        cpr, history, loss = refine(start, cases, iters, lr, bar)
    record = {**cpr.to_dict(), "start": "regression", "fit": fit, "iters": iters, "lr": lr,
              "loss_start": history[0], "loss": loss, "history": history,
              "configurations": [[c.nfe, c.cfg] for c in cases]}
    store_cpr(db, study, record)
    if json_:
        print(json.dumps({"study": study, **record}, indent=2))
        return
    out.print(f"end-to-end CPR over {len(cases)} configurations of {study!r} (from the {fit} regression): "
              f"mean final-state MSE relative to no DC {fmt(history[0])} -> {fmt(loss)}")
    err.print(f"stored in study {study!r} ({db}); 'steptune dc predict' uses it")

@dc_app.command("predict")
def predict_cmd(
    study: Annotated[str, typer.Option("--study", help="A study written by 'steptune dc fit'.")],
    nfe: Annotated[int, typer.Option("--nfe", min=1, help="NFE of the configuration to predict.")],
    guidance: Annotated[float | None, typer.Option("--guidance", help="Guidance scale of the configuration.")]
    = None,
    cfg: Annotated[float | None, typer.Option("--cfg", hidden=True, help="Old name of --guidance.")] = None,
    fit: Annotated[Literal["joint", "greedy"], typer.Option("--fit", help="Which fitted ratios to use.")] = "joint",
    ridge: Annotated[float, typer.Option("--ridge", help="Ridge penalty of the regression.")] = 1e-3,
    regression: Annotated[bool, typer.Option("--regression", help="Use CPR by regression on the fitted ratios, "
                                                                  "even when the study holds an end-to-end "
                                                                  "CPR.")] = False,
    use_cpr: Annotated[bool, typer.Option("--cpr", help="Use CPR even where fits at this NFE bracket the "
                                                        "guidance scale.")] = False,
    evaluate: Annotated[bool, typer.Option("--evaluate", help="Also score the schedule without DC and with the "
                                                              "predicted ratios on the held-out bank.")] = False,
    extrapolate: Annotated[bool, typer.Option("--extrapolate", help="Answer outside the fitted NFE and CFG "
                                                                    "ranges (with the ratios at their nearest "
                                                                    "point).")] = False,
    cache: CacheOpt = DEFAULT_CACHE,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Write the schedule JSON here.")] = None,
    db: DbOpt = DEFAULT_DB,
    device: DeviceOpt = None,
    json_: JsonOpt = False,
):
    """Ratios for an unseen (NFE, CFG) from a study's fits: interpolated in the guidance between the fits
    at that NFE that bracket it, else cascade polynomial regression (the study's end-to-end CPR when
    'dc cpr' stored one)."""
    from steptune.search.dc import with_ratios

    device = pick_device(device) if evaluate else None
    cfg = _guidance(guidance, cfg)
    _check_cfg(cfg)
    _check_ridge(ridge)
    config, trials = load_dc_study(db, study)
    if cfg is not None and not any(t.info.get("cfg") is not None for t in trials):
        raise CliError(f"--guidance {cfg:g}: study {study!r} was fitted without guidance (problem "
                       f"{config.get('problem')}); drop --guidance")
    scales = sorted({t.info["cfg"] for t in trials if t.info.get("cfg") is not None})
    if cfg is None and scales:
        raise CliError(f"study {study!r} was fitted with guidance (CFG {', '.join(f'{g:g}' for g in scales)}); give "
                       "the configuration's --guidance")
    base = study_schedule(study, config, nfe)
    where = f"NFE {nfe}" + ("" if cfg is None else f", CFG {cfg:g}")
    refit = fit_command(study, config, nfe, cfg)
    interp = None if (use_cpr or regression) else interpolated(trials, fit, nfe, cfg, len(base.steps))
    if interp is not None:
        ratios, (lo, hi) = interp
        payload = {"method": "interpolation", "between_cfg": [lo, hi]}
        line = (f"the '{fit}' fit of {study!r} at {where}" if lo == hi else
                f"interpolated between the '{fit}' fits of {study!r} at NFE {nfe}, CFG {lo:g} and {hi:g}: {where}")
    else:
        cpr, kind, configs, fit = choose_cpr(study, config, trials, fit, ridge, regression, warn=err.print)
        if not cpr.inside(nfe, cfg):
            guided = any(t.info.get("cfg") is not None for t in trials)
            box = f"NFE {cpr.nfe_range[0]:g}-{cpr.nfe_range[1]:g}" + (
                f", CFG {cpr.cfg_range[0]:g}-{cpr.cfg_range[1]:g}" if guided else "")
            if not extrapolate:
                raise CliError(f"{where} lies outside the configurations study {study!r} was fitted on ({box}); "
                                 f"fit it with {refit}, or pass --extrapolate for the ratios at the nearest "
                                 "point of the fitted ranges")
            err.print(f"warning: {where} lies outside the fitted {box}; the ratios are those at the nearest "
                      "point of the fitted ranges (check them with --evaluate)")
        ratios = cpr.predict(nfe, cfg, len(base.steps))
        nfe_fitted = any(n == nfe for n, _, _ in fit_rows(trials, fit))
        payload = {"method": "cpr", "cpr": kind, "nfe_fitted": nfe_fitted, "fitted_configurations": configs,
                   "coefficients": cpr.to_dict()}
        if not nfe_fitted:
            err.print(f"note: study {study!r} has no '{fit}' fit at NFE {nfe}; there CPR's ratios fall well short "
                      f"of a direct fit (2-2.6x its held-out error in bench/dc.py); {refit} fits them in seconds")
        line = f"CPR ({kind}, {fit} fits) over {len(configs)} fitted configurations of {study!r}: {where}"
    sched = with_ratios(base, ratios)
    payload = {"study": study, "nfe": nfe, "cfg": cfg, "fit": fit, "ratios": ratios, **payload}
    if evaluate:
        ev = study_evaluator(config, cfg, cache, device)
        payload.update(mse_base=heldout_mse(ev, base), mse_predicted=heldout_mse(ev, sched))
    if output is not None:
        sched.save(output)
    if json_:
        print(json.dumps(payload, indent=2))
        return
    out.print(line)
    out.print("ratios: " + ", ".join(f"{r:.3f}" for r in ratios))
    if evaluate:
        base_mse, pred_mse = payload["mse_base"], payload["mse_predicted"]
        change = f" ({100 * (pred_mse / base_mse - 1):+.1f}%)" if base_mse > 0 else ""
        out.print(f"held-out MSE: without DC {fmt(base_mse)}, with the predicted ratios {fmt(pred_mse)}{change}")
        if pred_mse > base_mse:
            err.print(f"warning: the predicted ratios are worse than none at this configuration; fit it with "
                      f"{refit}")
    if output is not None:
        err.print(f"wrote {output}")


def register(app: typer.Typer) -> None:
    app.add_typer(dc_app, name="dc")
