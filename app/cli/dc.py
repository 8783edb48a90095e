"""`steptune dc fit`, `steptune dc cpr`, `steptune dc predict` and `steptune train-digits`; the model-plug-in
options that `eval` and `search` share."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from steptune.cli_storage import DEFAULT_DB
from steptune.outputs import CliError, Interrupted

out = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, soft_wrap=True)  # one line per message, also in logs

ModelOpt = Annotated[str | None, typer.Option(
    "--model", help="Your network as module:factory (replaces --problem); see README 'Your own model'.")]
PredictionOpt = Annotated[str | None, typer.Option("--prediction", help="What the network predicts: eps, x0, v "
                                                                        "or flow (default: from the noise schedule).")]
TimeInputOpt = Annotated[str | None, typer.Option("--time-input", help="What the network takes as time: discrete "
                                                                       "(training timestep), continuous or sigma.")]
TimeScaleOpt = Annotated[float | None, typer.Option("--time-scale", help="Multiplier on t for --time-input "
                                                                         "continuous (e.g. 1000).")]
GuidanceOpt = Annotated[float | None, typer.Option("--guidance", help="Classifier-free guidance scale (digits-cond, "
                                                                      "or a model whose factory gives cond/uncond "
                                                                      "arguments).")]
ShapeOpt = Annotated[str | None, typer.Option("--shape", help="Sample shape, e.g. 3,32,32 (when the factory does "
                                                              "not say).")]
DbOpt = Annotated[str, typer.Option("--db", envvar="STEPTUNE_DB", help="Database URL (default runs/steptune.db).")]
ThreadsOpt = Annotated[int | None, typer.Option("--threads", help="CPU threads for torch (default: torch's own; 1 "
                                                                  "is fastest on a busy machine).")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="Where the network runs: cpu, cuda, cuda:1 "
                                                                "(default: cuda when torch sees one, else cpu).")]


class DcCliError(CliError):
    """One line on stderr, exit status 2."""


def set_threads(threads: int | None) -> None:
    if threads is None:
        return
    if threads < 1:
        raise DcCliError("--threads must be at least 1")
    import torch

    torch.set_num_threads(threads)


def guidance_of(problem) -> float | None:
    """The guidance scale a problem samples with, set by its model or its source (None: unguided)."""
    g = problem.model.guidance_scale
    return g if g is not None else problem.source.get("guidance_scale")


def pick_device(device: str | None) -> str:
    """``device`` checked against what torch sees; None: cuda when available, else cpu."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise DcCliError(f"--device {device!r} is not a device torch knows; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DcCliError(f"--device {device}: torch sees no CUDA device here; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DcCliError(f"--device {device}: torch sees {torch.cuda.device_count()} CUDA device(s); use cuda:0 to "
                         f"cuda:{torch.cuda.device_count() - 1}")
    if dev.type not in ("cpu", "cuda"):
        raise DcCliError(f"--device {device}: use cpu or cuda[:N]")
    return str(dev)


def build_problem(problem: str, model: str | None = None, noise: str | None = None, prediction: str | None = None,
                  time_input: str | None = None, time_scale: float | None = None, guidance: float | None = None,
                  shape: str | None = None, error=DcCliError):
    """The problem a command was given (``--model`` wins over ``--problem``); bad input raises ``error``."""
    from steptune.evaluators.plugins import load_problem, parse_shape

    try:
        return load_problem(model or problem, noise=noise, prediction=prediction, time_input=time_input,
                            time_scale=time_scale, guidance_scale=guidance, shape=parse_shape(shape))
    except (KeyError, ValueError, FileNotFoundError) as e:
        raise error(str(e).strip("'\"")) from None


def _floats(text: str | None, what: str) -> list[float | None]:
    if text is None or not text.strip():
        return [None]
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise DcCliError(f"{what} {text!r}: give numbers like 1.5,3,5") from None


def _check_cfg(cfg: float | None) -> None:
    """A guidance scale is a finite number, 0 or more."""
    if cfg is not None and not (math.isfinite(cfg) and cfg >= 0):
        raise DcCliError(f"--cfg {cfg:g}: a guidance scale must be a finite number, 0 or more")


def _check_ridge(ridge: float) -> None:
    if not (math.isfinite(ridge) and ridge >= 0):
        raise DcCliError(f"--ridge {ridge:g}: the ridge penalty must be a finite number, 0 or more")


def _fmt(v) -> str:
    return "—" if v is None or not math.isfinite(v) else f"{v:.4g}"


# ---- a study written by `dc fit`: its fits, its problem, its schedules ------------------------------

FITS = ("joint", "greedy")


def load_dc_study(db: str, study: str) -> tuple[dict, list]:
    """The config and complete trials of a study `dc fit` wrote."""
    from steptune.storage import StorageError, connect

    try:
        with connect(db, must_exist=True) as store:
            rec = store.get_study(study)
            trials = store.trials(study, status="complete")
    except StorageError as e:
        raise DcCliError(str(e)) from None
    config = rec.config or {}
    if config.get("kind") != "dc-fit":
        raise DcCliError(f"study {study!r} was not written by 'steptune dc fit'")
    return config, trials


FIT_KEYS = ("problem", "solver", "conventions", "fit_samples")


def check_bank_version(study: str, config: dict) -> None:
    """Refuse to add to, or refit from, a study whose fit noises came from an earlier drawing of the banks."""
    from steptune.evaluators.base import BANK_VERSION

    if config.get("bank_version", 1) != BANK_VERSION:
        raise DcCliError(f"study {study!r} was fitted on noise banks drawn by an earlier steptune (bank version "
                         f"{config.get('bank_version', 1)}, now {BANK_VERSION}); its fits cannot be mixed with new "
                         "ones: choose another --study")


def fit_command(study: str, config: dict, nfe: int, cfg: float | None) -> str:
    """The `dc fit` command that adds (``nfe``, ``cfg``) to ``study`` as its earlier fits were made."""
    conv = config.get("conventions") or {}
    opts = [f"--problem {config['problem']}", f"--solver {config['solver'].removeprefix('preset:')}"]
    opts += [f"--{k.replace('_', '-')} {v}" for k, v in conv.items() if v is not None]
    if config.get("fit_samples", 10) != 10:
        opts.append(f"--fit-samples {config['fit_samples']}")
    where = f"--nfe {nfe}" + ("" if cfg is None else f" --cfg {cfg:g}")
    return f"'steptune dc fit {' '.join(opts)} {where} --study {study}'"


def check_same_fit(db: str, study: str, config: dict) -> None:
    """Refuse to add fits to an existing study that was fitted on another problem, solver, conventions or
    number of fit noises (its CPR and interpolation would mix them)."""
    from steptune.storage import StorageError, connect

    try:
        with connect(db) as store:
            old = store.get_study(study).config or {}
    except StorageError:
        return  # a new study
    if old.get("kind") != "dc-fit":
        raise DcCliError(f"study {study!r} was not written by 'steptune dc fit'; choose another --study")
    check_bank_version(study, old)
    for key in FIT_KEYS:
        if key in old and old[key] != config.get(key):
            raise DcCliError(f"study {study!r} was fitted with {key} {old.get(key)!r}, not {config.get(key)!r}; use "
                             f"the same options (e.g. {fit_command(study, old, 5, None)}) or another --study")


def fit_rows(trials: list, fit: str) -> list[tuple[int, float | None, list[float]]]:
    """(NFE, CFG, ratios) of every ``fit`` trial."""
    return [(t.nfe, t.info.get("cfg"), [float(st.get("dc_ratio", 1.0)) for st in t.schedule["steps"]])
            for t in trials if t.info.get("dc_fit") == fit]


def fitted_rows(study: str, trials: list, fit: str) -> list[tuple[int, float | None, list[float]]]:
    """``fit_rows``, refusing an unknown fit or a study without such fits."""
    if fit not in FITS:
        raise DcCliError(f"--fit {fit!r}: use joint or greedy")
    rows = fit_rows(trials, fit)
    if not rows:
        other = [f for f in FITS if any(t.info.get("dc_fit") == f for t in trials)]
        hint = f"use --fit {other[0]}" if other else f"run 'steptune dc fit --study {study}' first"
        raise DcCliError(f"study {study!r} has no '{fit}' fits; {hint}")
    return rows


def study_schedule(study: str, config: dict, nfe: int):
    """The study's solver preset at ``nfe``, uncompensated."""
    from steptune.space import ScheduleError, presets
    from steptune.space import noise as noise_mod

    spec = config["solver"]
    if not spec.startswith("preset:"):
        raise DcCliError(f"study {study!r} fitted a schedule file ({spec}); CPR needs a preset solver")
    try:
        ns = noise_mod.from_dict(config["noise"])
        return presets.build(spec.removeprefix("preset:"), nfe, ns, t_start=config["t_start"], t_end=config["t_end"])
    except (ScheduleError, ValueError) as e:
        raise DcCliError(str(e)) from None


def problem_evaluator(problem, cache: Path, device: str):
    """The Evaluator the commands use: the problem's own bank sizes, references cached under ``cache``."""
    from steptune.evaluators import Evaluator
    from steptune.evaluators.plugins import evaluator_options

    return Evaluator(problem, cache_dir=cache, device=device, **evaluator_options(problem))


def study_evaluator(config: dict, cfg: float | None, cache: Path, device: str = "cpu"):
    """The Evaluator (and problem) `dc fit` built for the study at guidance ``cfg`` (conventions it did not
    record take their defaults)."""
    conv = config.get("conventions") or {}
    prob = build_problem(config["problem"], None, conv.get("noise"), conv.get("prediction"), conv.get("time_input"),
                         conv.get("time_scale"), cfg, conv.get("shape"))
    return problem_evaluator(prob, cache, device)


def checked(ev, schedule):
    from steptune.space import ScheduleError

    try:
        ev.check(schedule)
    except ScheduleError as e:
        raise DcCliError(str(e)) from None
    return schedule


def cpr_plan(study: str, config: dict, rows: list, cache: Path, device: str = "cpu") -> list[tuple]:
    """(evaluator, schedule, NFE, CFG) of each fitted configuration, rebuilt as `dc fit` built it."""
    evaluators, plan = {}, []
    for nfe, cfg in dict.fromkeys((nfe, cfg) for nfe, cfg, _ in rows):
        if cfg not in evaluators:
            evaluators[cfg] = study_evaluator(config, cfg, cache, device)
        ev = evaluators[cfg]
        plan.append((ev, checked(ev, study_schedule(study, config, nfe)), nfe, cfg))
    return plan


def cpr_cases(plan: list[tuple], fit_samples: int, bar: Progress) -> list:
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


def refine(start, cases: list, iters: int, lr: float, bar: Progress):
    from steptune.search.dc import refine_cpr

    task = bar.add_task("end-to-end CPR", total=iters)
    cpr, history = refine_cpr(start, cases, iters=iters, lr=lr, progress=lambda k, n: bar.update(task, completed=k))
    bar.remove_task(task)
    finite = [h for h in history if math.isfinite(h)]
    if not finite:
        raise DcCliError("the end-to-end CPR fit gave no finite loss; nothing was stored")
    return cpr, [h if math.isfinite(h) else None for h in history], min(finite)


def store_cpr(db: str, study: str, record: dict) -> None:
    from steptune.storage import StorageError, connect

    try:
        with connect(db, must_exist=True) as store:
            store.update_study_config(study, {"cpr": record})
    except StorageError as e:
        raise DcCliError(str(e)) from None


def stored_cpr(study: str, config: dict):
    from steptune.search.dc import CPR

    try:
        return CPR.from_dict(config["cpr"])
    except (KeyError, TypeError, ValueError):
        raise DcCliError(f"study {study!r} holds an unreadable end-to-end CPR; rerun 'steptune dc cpr' or use "
                         "--regression") from None


def heldout_mse(ev, schedule) -> float:
    return ev.evaluate(checked(ev, schedule), "heldout").metrics["rmse"] ** 2


def interpolated(trials: list, fit: str, nfe: int, cfg: float | None, n_steps: int):
    """``dc.interpolate_ratios`` over the study's ``fit`` trials, or None."""
    from steptune.search.dc import interpolate_ratios

    got = interpolate_ratios(fit_rows(trials, fit), nfe, cfg)
    return got if got is not None and len(got[0]) == n_steps else None


def choose_cpr(study: str, config: dict, trials: list, fit: str, ridge: float, regression: bool):
    """The study's stored end-to-end CPR (warning when it predates some fits) or, without one or with
    ``regression``, CPR fitted by regression: (cpr, kind, configurations, fit)."""
    from steptune.search.dc import CPR

    if regression or "cpr" not in config:
        rows = fitted_rows(study, trials, fit)
        return CPR.fit(rows, ridge=ridge), "regression", [[n, c] for n, c, _ in rows], fit
    configs = config["cpr"].get("configurations", [])
    fit = config["cpr"].get("fit", fit)
    newer = sorted({(t.nfe, t.info.get("cfg")) for t in trials if t.info.get("dc_fit") == fit}
                   - {(n, c) for n, c in configs}, key=lambda nc: (nc[0], nc[1] or 0.0))
    if newer:
        err.print(f"warning: the stored CPR predates {len(newer)} '{fit}' fit(s) of {study!r} (e.g. NFE "
                  f"{newer[0][0]}, CFG {newer[0][1]}); rerun 'steptune dc cpr --study {study}' to include them")
    return stored_cpr(study, config), "end-to-end", configs, fit


def _fit_all(plans, configs: list, methods, fit_samples: int, greedy_iters: int, joint_iters: int,
             continuation: bool, quiet: bool) -> None:
    """Fit every (CFG, schedule) of ``plans`` into ``configs`` (as they finish, so an interrupt leaves the
    finished ones there), then continue each NFE's joint fits across the guidance scales."""
    from steptune.search import dc

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err, disable=quiet, transient=True) as bar:
        for g, ev, scheds in plans:
            for s in scheds:
                task = bar.add_task(f"CFG {g} NFE {s.nfe}: reference", total=None)

                def tick(name, k, n, task=task, s=s, g=g):
                    bar.update(task, description=f"CFG {g} NFE {s.nfe}: {name} fit", completed=k, total=n)

                fit = dc.fit_config(ev, s, methods=methods, fit_samples=fit_samples, greedy_iters=greedy_iters,
                                    joint_iters=joint_iters, progress=tick)
                bar.remove_task(task)
                configs.append((g, ev, s, fit))
        if continuation and "joint" in methods:
            for n in sorted({s.nfe for _, _, s, _ in configs}):
                group = [(0.0 if g is None else g, fit) for g, _, s, fit in configs if s.nfe == n]
                if len(group) > 1:
                    task = bar.add_task(f"NFE {n}: joint fits continued across CFG", total=2 * len(group) - 2)
                    dc.continue_across_guidance(group, iters=joint_iters,
                                                progress=lambda k, _, task=task: bar.update(task, completed=k))
                    bar.remove_task(task)


def register(app: typer.Typer) -> None:
    dc_app = typer.Typer(help="DC-Solver compensation ratios: fit them, predict them for unseen configurations.",
                         no_args_is_help=True)
    app.add_typer(dc_app, name="dc")

    @dc_app.command("fit")
    def fit_cmd(
        problem: Annotated[str, typer.Option("--problem", "-p", help="digits-cond, gmm-digits, gmm-2d or "
                                                                     "module:factory.")] = "digits-cond",
        solver: Annotated[str, typer.Option("--solver", help="Preset spec, or a schedule JSON file (e.g. a "
                                                             "searched one) to refine.")] = "unipc-bh2",
        nfe: Annotated[str | None, typer.Option("--nfe", help="NFE list, e.g. 5,6,8,10 (the default for a preset); "
                                                              "a schedule file has its own NFE.")] = None,
        cfg: Annotated[str | None, typer.Option("--cfg", help="Guidance scales, e.g. 1.5,3,5.")] = None,
        method: Annotated[str, typer.Option("--method", help="greedy, joint, or both (joint refines greedy).")]
        = "both",
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
        cache: Annotated[Path, typer.Option("--cache", help="Folder for cached references.")] = Path("runs/cache"),
        db: DbOpt = DEFAULT_DB,
        threads: ThreadsOpt = None,
        device: DeviceOpt = None,
        json_: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    ):
        """Fit DC-Solver ratios per (NFE, CFG) on fixed noises; report held-out MSE against the reference."""
        from steptune.resolve import parse_nfe_list, resolve
        from steptune.search import dc
        from steptune.space import ScheduleError

        set_threads(threads)
        device = pick_device(device)
        methods = {"both": ("greedy", "joint"), "greedy": ("greedy",), "joint": ("joint",)}.get(method)
        if methods is None:
            raise DcCliError(f"--method {method!r}: use greedy, joint or both")
        if fit_samples < 1:
            raise DcCliError("--fit-samples must be at least 1")
        for option, iters in (("--greedy-iters", greedy_iters), ("--joint-iters", joint_iters)):
            if iters < 1:
                raise DcCliError(f"{option} {iters}: the fit needs at least 1 iteration")
        is_file = not solver.startswith("preset:") and Path(solver).suffix == ".json"
        spec = solver if is_file or solver.startswith("preset:") else f"preset:{solver}"
        from steptune.evaluators.base import BANK_VERSION

        made_as = {"kind": "dc-fit", "problem": problem, "solver": spec, "fit_samples": fit_samples,
                   "bank_version": BANK_VERSION,
                   "conventions": {"noise": noise, "prediction": prediction, "time_input": time_input,
                                   "time_scale": time_scale, "shape": shape}}
        if is_file and not Path(solver).is_file():
            raise DcCliError(f"--solver {solver}: no such schedule file")
        try:
            nfes = parse_nfe_list(nfe if nfe is not None or is_file else "5,6,8,10")
            if is_file:
                resolve(spec, nfes, None)  # a bad file, or an --nfe it does not cost, is refused before any work
        except ScheduleError as e:
            raise DcCliError(str(e)) from None
        cfgs = _floats(cfg, "--cfg")
        for g in cfgs:
            _check_cfg(g)
        plans = []  # (cfg, evaluator, schedules) of every configuration, all checked before any fit
        for g in cfgs:
            prob = build_problem(problem, None, noise, prediction, time_input, time_scale, g, shape)
            g = guidance_of(prob) if g is None else g
            ev = problem_evaluator(prob, cache, device)
            if fit_samples > ev.sizes["train"]:
                raise DcCliError(f"--fit-samples {fit_samples} is more than the {ev.sizes['train']} noises of "
                                 f"the train bank of {problem}; use 1 .. {ev.sizes['train']}")
            try:
                scheds = resolve(spec, nfes, prob.noise, None, prob.t_start, prob.t_end)
                for s in scheds:
                    ev.check(s)
            except ScheduleError as e:
                raise DcCliError(str(e)) from None
            plans.append((g, ev, scheds))
        if study is not None:
            check_same_fit(db, study, made_as)
        configs = []  # (cfg, evaluator, schedule, ConfigFit)
        try:
            _fit_all(plans, configs, methods, fit_samples, greedy_iters, joint_iters, continuation, json_)
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
                info = {"dc_fit": m, "cfg": g, "solver": spec, "fit_samples": fit_samples,
                        "fit_loss": r.loss, "fit_loss_start": r.loss_start,
                        "mse_uncompensated": row["mse_base"]}
                items.append({"schedule": fitted, "status": "complete", "metrics": res.metrics,
                              "fidelity": "heldout", "bank": "heldout", "n_samples": res.n,
                              "seconds": r.seconds, "info": info})
            rows.append(row)
        if study is not None and items:
            from steptune.storage import StorageError, connect

            try:
                with connect(db) as store:
                    config = {**made_as, "noise": prob.noise.to_dict(), "t_start": prob.t_start, "t_end": prob.t_end}
                    store.add_trials(study, items, create={"method": "dc", "config": config,
                                                           "problem": prob.identity()})
            except StorageError as e:
                raise DcCliError(str(e)) from None
        if json_:
            print(json.dumps({"problem": problem, "solver": spec, "study": study, "rows": rows}, indent=2,
                             default=float))
            return
        table = Table(title=f"DC-Solver ratios: {problem}, {spec}, held-out MSE to the reference")
        cols = ["NFE", "CFG", "MSE (no DC)"] + [f"MSE {m}" for m in methods] + ["change", "fit s"]
        for c in cols:
            table.add_column(c, justify="right")
        for r in rows:
            best = min(r.get(f"mse_{m}", math.inf) for m in methods)
            secs = sum(r.get(f"seconds_{m}", 0.0) for m in methods)
            table.add_row(str(r["nfe"]), "—" if r["cfg"] is None else f"{r['cfg']:g}", _fmt(r["mse_base"]),
                          *[_fmt(r.get(f"mse_{m}")) for m in methods],
                          f"{100 * (best / r['mse_base'] - 1):+.1f}%", f"{secs:.1f}")
        out.print(table)
        if study is not None:
            err.print(f"stored {len(items)} fitted schedules in study {study!r} ({db})")

    @dc_app.command("cpr")
    def cpr_cmd(
        study: Annotated[str, typer.Option("--study", help="A study written by 'steptune dc fit'.")],
        fit: Annotated[str, typer.Option("--fit", help="Which fitted ratios the regression starts from: joint or "
                                                       "greedy.")] = "joint",
        iters: Annotated[int, typer.Option("--iters", help="Adam iterations of the end-to-end fit.")] = 40,
        lr: Annotated[float, typer.Option("--lr", help="Adam learning rate.")] = 0.003,
        ridge: Annotated[float, typer.Option("--ridge", help="Ridge penalty of the starting regression.")] = 1e-3,
        cache: Annotated[Path, typer.Option("--cache", help="Folder for cached references.")] = Path("runs/cache"),
        db: DbOpt = DEFAULT_DB,
        threads: ThreadsOpt = None,
        device: DeviceOpt = None,
        json_: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    ):
        """Fit the cascade polynomial regression end to end on every fitted configuration of a study (backprop
        through each sampler) and store its coefficients with the study; 'dc predict' then uses them."""
        from steptune.search.dc import CPR

        set_threads(threads)
        device = pick_device(device)
        if iters < 1:
            raise DcCliError("--iters must be at least 1")
        if not lr > 0:
            raise DcCliError("--lr must be positive")
        _check_ridge(ridge)
        config, trials = load_dc_study(db, study)
        check_bank_version(study, config)  # CPR end to end runs the stored fits' configurations on their fit noises
        rows = fitted_rows(study, trials, fit)
        start = CPR.fit(rows, ridge=ridge)
        plan = cpr_plan(study, config, rows, cache, device)
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=err, transient=True) as bar:
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
                  f"mean final-state MSE relative to no DC {_fmt(history[0])} -> {_fmt(loss)}")
        err.print(f"stored in study {study!r} ({db}); 'steptune dc predict' uses it")

    @dc_app.command("predict")
    def predict_cmd(
        study: Annotated[str, typer.Option("--study", help="A study written by 'steptune dc fit'.")],
        nfe: Annotated[int, typer.Option("--nfe", help="NFE of the configuration to predict.")],
        cfg: Annotated[float | None, typer.Option("--cfg", help="Guidance scale of the configuration.")] = None,
        fit: Annotated[str, typer.Option("--fit", help="Which fitted ratios to regress on: joint or greedy.")]
        = "joint",
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
        cache: Annotated[Path, typer.Option("--cache", help="Folder for cached references.")] = Path("runs/cache"),
        output: Annotated[Path | None, typer.Option("-o", "--output", help="Write the schedule JSON here.")] = None,
        db: DbOpt = DEFAULT_DB,
        device: DeviceOpt = None,
        json_: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    ):
        """Ratios for an unseen (NFE, CFG) from a study's fits: interpolated in the guidance between the fits
        at that NFE that bracket it, else cascade polynomial regression (the study's end-to-end CPR when
        'dc cpr' stored one)."""
        from steptune.search.dc import with_ratios

        device = pick_device(device) if evaluate else None
        _check_cfg(cfg)
        _check_ridge(ridge)
        config, trials = load_dc_study(db, study)
        if cfg is not None and not any(t.info.get("cfg") is not None for t in trials):
            raise DcCliError(f"--cfg {cfg:g}: study {study!r} was fitted without guidance (problem "
                             f"{config.get('problem')}); drop --cfg")
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
            cpr, kind, configs, fit = choose_cpr(study, config, trials, fit, ridge, regression)
            if not cpr.inside(nfe, cfg):
                box = f"NFE {cpr.nfe_range[0]:g}-{cpr.nfe_range[1]:g}, CFG {cpr.cfg_range[0]:g}-{cpr.cfg_range[1]:g}"
                if not extrapolate:
                    raise DcCliError(f"{where} lies outside the configurations study {study!r} was fitted on ({box}); "
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
            out.print(f"held-out MSE: without DC {_fmt(base_mse)}, with the predicted ratios {_fmt(pred_mse)}{change}")
            if pred_mse > base_mse:
                err.print(f"warning: the predicted ratios are worse than none at this configuration; fit it with "
                          f"{refit}")
        if output is not None:
            err.print(f"wrote {output}")

    @app.command("train-digits")
    def train_digits_cmd(
        out_dir: Annotated[Path, typer.Option("--out", help="Folder for the checkpoints.")] = Path("runs/models"),
        steps: Annotated[int, typer.Option("--steps", help="UNet training steps.")] = 3000,
        seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
        threads: Annotated[int, typer.Option("--threads", help="CPU threads (fixed for reproducibility; one is "
                                                               "fastest on a busy machine).")] = 1,
    ):
        """Train the digits UNet (class-conditional, label dropout for guidance) and the digit classifier
        deterministically; later runs use them instead of the shipped checkpoints."""
        from steptune.evaluators.digits import TrainConfig, train_and_save

        if steps < 1:
            raise DcCliError("--steps must be at least 1")
        if threads < 1:
            raise DcCliError("--threads must be at least 1")
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), TextColumn("{task.fields[loss]}"), console=err) as bar:
            clf = bar.add_task("classifier", total=60, loss="")
            unet = bar.add_task("UNet", total=steps, loss="")

            def clf_progress(epoch, loss):
                bar.update(clf, completed=epoch + 1, loss=f"loss {loss:.3g}")

            def unet_progress(step, loss):
                if step % 20 == 0 or step == steps - 1:
                    bar.update(unet, completed=step + 1, loss=f"loss {loss:.3g}")

            report = train_and_save(out_dir, TrainConfig(steps=steps, seed=seed), threads, unet_progress,
                                    clf_progress)
        out.print(f"classifier: held-out accuracy {report['classifier_accuracy']:.3f} "
                  f"({report['classifier_seconds']:.0f} s) -> {report['classifier']}")
        out.print(f"UNet: {steps} steps ({report['unet_seconds']:.0f} s) -> {report['unet']}")
