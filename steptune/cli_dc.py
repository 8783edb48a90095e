"""`steptune dc fit`, `steptune dc predict` and `steptune train-digits`; the model-plug-in options that
`eval` and `search` share."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from steptune.cli_storage import DEFAULT_DB

out = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True)

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


class DcCliError(click.ClickException):
    """One line on stderr, exit status 2."""

    exit_code = 2

    def show(self, file=None) -> None:
        print(f"error: {self.message}", file=file or sys.stderr)


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


def _fmt(v) -> str:
    return "—" if v is None or not math.isfinite(v) else f"{v:.4g}"


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
        nfe: Annotated[str, typer.Option("--nfe", help="NFE list, e.g. 5,6,8,10 (ignored for a file).")] = "5,6,8,10",
        cfg: Annotated[str | None, typer.Option("--cfg", help="Guidance scales, e.g. 1.5,3,5.")] = None,
        method: Annotated[str, typer.Option("--method", help="greedy, joint, or both (joint refines greedy).")]
        = "both",
        study: Annotated[str | None, typer.Option("--study", help="Store the fitted schedules as trials of this "
                                                                  "study.")] = None,
        fit_samples: Annotated[int, typer.Option("--fit-samples", help="Train-bank noises to fit on.")] = 10,
        greedy_iters: Annotated[int, typer.Option("--greedy-iters", help="AdamW iterations per step.")] = 20,
        joint_iters: Annotated[int, typer.Option("--joint-iters", help="Adam iterations of the joint fit.")] = 30,
        noise: Annotated[str | None, typer.Option("--noise", help="Noise schedule (gmm problems and models).")]
        = None,
        prediction: PredictionOpt = None, time_input: TimeInputOpt = None, time_scale: TimeScaleOpt = None,
        shape: ShapeOpt = None,
        cache: Annotated[Path, typer.Option("--cache", help="Folder for cached references.")] = Path("runs/cache"),
        db: DbOpt = DEFAULT_DB,
        json_: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    ):
        """Fit DC-Solver ratios per (NFE, CFG) on fixed noises; report held-out MSE against the reference."""
        from steptune.evaluators import Evaluator
        from steptune.evaluators.plugins import evaluator_options
        from steptune.resolve import parse_nfe_list, resolve
        from steptune.search import dc
        from steptune.space import ScheduleError

        methods = {"both": ("greedy", "joint"), "greedy": ("greedy",), "joint": ("joint",)}.get(method)
        if methods is None:
            raise DcCliError(f"--method {method!r}: use greedy, joint or both")
        if fit_samples < 1:
            raise DcCliError("--fit-samples must be at least 1")
        is_file = not solver.startswith("preset:") and Path(solver).suffix == ".json"
        spec = solver if is_file or solver.startswith("preset:") else f"preset:{solver}"
        try:
            nfes = [] if is_file else parse_nfe_list(nfe)
        except ScheduleError as e:
            raise DcCliError(str(e)) from None
        cfgs = _floats(cfg, "--cfg")
        rows, items = [], []
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=err, disable=json_, transient=True) as bar:
            for g in cfgs:
                prob = build_problem(problem, None, noise, prediction, time_input, time_scale, g, shape)
                ev = Evaluator(prob, cache_dir=cache, **evaluator_options(prob))
                try:
                    scheds = resolve(spec, nfes, prob.noise, None, prob.t_start, prob.t_end)
                    for s in scheds:
                        ev.check(s)
                except ScheduleError as e:
                    raise DcCliError(str(e)) from None
                for s in scheds:
                    task = bar.add_task(f"CFG {g} NFE {s.nfe}: reference", total=None)

                    def tick(name, k, n, task=task, s=s, g=g):
                        bar.update(task, description=f"CFG {g} NFE {s.nfe}: {name} fit", completed=k, total=n)

                    fit = dc.fit_config(ev, s, methods=methods, fit_samples=fit_samples, greedy_iters=greedy_iters,
                                        joint_iters=joint_iters, progress=tick)
                    bar.remove_task(task)
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
                    config = {"kind": "dc-fit", "solver": spec, "problem": problem, "noise": prob.noise.to_dict(),
                              "t_start": prob.t_start, "t_end": prob.t_end}
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

    @dc_app.command("predict")
    def predict_cmd(
        study: Annotated[str, typer.Option("--study", help="A study written by 'steptune dc fit'.")],
        nfe: Annotated[int, typer.Option("--nfe", help="NFE of the configuration to predict.")],
        cfg: Annotated[float | None, typer.Option("--cfg", help="Guidance scale of the configuration.")] = None,
        fit: Annotated[str, typer.Option("--fit", help="Which fitted ratios to regress on: joint or greedy.")]
        = "joint",
        ridge: Annotated[float, typer.Option("--ridge", help="Ridge penalty of the regression.")] = 1e-3,
        output: Annotated[Path | None, typer.Option("-o", "--output", help="Write the schedule JSON here.")] = None,
        db: DbOpt = DEFAULT_DB,
        json_: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    ):
        """Cascade polynomial regression over a study's fitted (NFE, CFG) configurations: ratios for an unseen one."""
        from steptune.search.dc import CPR, with_ratios
        from steptune.space import ScheduleError, presets
        from steptune.space import noise as noise_mod
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
        rows = [(t.nfe, t.info.get("cfg"), [float(st.get("dc_ratio", 1.0)) for st in t.schedule["steps"]])
                for t in trials if t.info.get("dc_fit") == fit]
        if not rows:
            raise DcCliError(f"study {study!r} has no '{fit}' fits; use --fit greedy or joint")
        cpr = CPR.fit(rows, ridge=ridge)
        spec = config["solver"]
        if spec.startswith("preset:"):
            try:
                ns = noise_mod.from_dict(config["noise"])
                base = presets.build(spec.removeprefix("preset:"), nfe, ns, t_start=config["t_start"],
                                     t_end=config["t_end"])
            except (ScheduleError, ValueError) as e:
                raise DcCliError(str(e)) from None
        else:
            raise DcCliError(f"study {study!r} fitted a schedule file ({spec}); CPR needs a preset solver")
        ratios = cpr.predict(nfe, cfg, len(base.steps))
        sched = with_ratios(base, ratios)
        if output is not None:
            sched.save(output)
        payload = {"study": study, "nfe": nfe, "cfg": cfg, "fit": fit, "ratios": ratios,
                   "fitted_configurations": [[n, c] for n, c, _ in rows], "cpr": cpr.to_dict()}
        if json_:
            print(json.dumps(payload, indent=2))
            return
        out.print(f"CPR over {len(rows)} fitted configurations of {study!r} ({fit}): NFE {nfe}, CFG "
                  f"{'—' if cfg is None else f'{cfg:g}'}")
        out.print("ratios: " + ", ".join(f"{r:.3f}" for r in ratios))
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
