"""`steptune search`: find, per NFE, a schedule that beats the presets (S^3, TPE, CMA-ES or random)."""

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

from steptune.cli_dc import GuidanceOpt, ModelOpt, PredictionOpt, ShapeOpt, TimeInputOpt, TimeScaleOpt

err = Console(stderr=True)
out = Console()


class SearchCliError(click.ClickException):
    """Bad input: one line on stderr, exit status 2."""

    exit_code = 2

    def show(self, file=None) -> None:
        print(f"error: {self.message}", file=file or sys.stderr)


def preset_baseline(evaluator, nfes, specs=None) -> tuple[dict[int, dict], list[dict]]:
    """Held-out score of every preset at every NFE: ({nfe: {"preset", "rmse"}} for the best one, all rows)."""
    from steptune.sweep import DEFAULT_PRESETS, run_sweep

    rows = run_sweep(evaluator, list(specs or DEFAULT_PRESETS), list(nfes), bank="heldout")
    return _best(rows), rows


def _best(rows: list[dict]) -> dict[int, dict]:
    from steptune.sweep import best_by_nfe

    return {n: {"preset": r["preset"], "rmse": r["rmse"]} for n, r in best_by_nfe(rows).items()}


def matching_nfe(rows: list[dict], target: float) -> int | None:
    """The smallest NFE at which some preset's held-out RMSE is at most ``target``."""
    ok = [r["nfe"] for r in rows if r.get("status") == "complete" and r.get("rmse", math.inf) <= target]
    return min(ok) if ok else None


def summary_rows(result, baseline: dict, sweep_rows: list[dict]) -> list[dict]:
    rows = []
    for nfe in sorted(result.best):
        b = result.best[nfe]
        got = b.heldout.get("rmse", math.inf)
        base = baseline.get(nfe, {})
        brmse = base.get("rmse")
        rows.append({"nfe": nfe, "best_preset": base.get("preset"), "preset_rmse": brmse, "searched_rmse": got,
                     "improvement": (brmse / got) if brmse and got > 0 else None,
                     "preset_matches_at_nfe": matching_nfe(sweep_rows, got), "found_at_eval": b.found_at,
                     "schedule": b.schedule})
    return rows


def register(app: typer.Typer) -> None:
    @app.command("search")
    def search_cmd(
        problem: Annotated[str, typer.Option("--problem", "-p", help="Built-in problem: gmm-digits or gmm-2d.")]
        = "gmm-digits",
        nfe: Annotated[str, typer.Option("--nfe", help="NFE list, e.g. 4,5,6,8,10 or 3-10.")] = "4,5,6,8,10",
        method: Annotated[str, typer.Option("--method", "-m", help="s3, tpe, cmaes, random or mo-tpe.")] = "s3",
        budget: Annotated[int, typer.Option("--budget", help="True (cheap-fidelity) evaluations per NFE.")] = 300,
        seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
        study: Annotated[str | None, typer.Option(
            "--study", help="Study name; an existing runs/search/NAME.trials.jsonl is resumed.")] = None,
        noise: Annotated[str | None, typer.Option("--noise", help="Noise schedule of the problem.")] = None,
        cheap_n: Annotated[int, typer.Option("--cheap-samples", help="Train-bank samples per evaluation.")] = 64,
        confirm_k: Annotated[int, typer.Option("--confirm", help="Best candidates per NFE confirmed on the "
                                                                 "held-out bank.")] = 3,
        heldout_n: Annotated[int | None, typer.Option("--heldout-samples", help="Size of the held-out bank the "
                                                                               "results are reported on (default "
                                                                               "1024; 256 for networks).")] = None,
        time_budget: Annotated[float | None, typer.Option("--time-budget", help="Stop searching after this "
                                                                                "many seconds.")] = None,
        out_dir: Annotated[Path, typer.Option("--out", help="Folder for the study files.")] = Path("runs/search"),
        cache: Annotated[Path, typer.Option("--cache", help="Folder for cached reference solutions.")]
        = Path("runs/cache"),
        json_: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of a table.")]
        = False,
        model: ModelOpt = None,
        prediction: PredictionOpt = None,
        time_input: TimeInputOpt = None,
        time_scale: TimeScaleOpt = None,
        guidance: GuidanceOpt = None,
        shape: ShapeOpt = None,
    ):
        """Search schedules per NFE on a problem (or your --model); report held-out scores against the best preset."""
        from steptune.resolve import parse_nfe_list
        from steptune.search import METHODS, TrialLog, make_searcher, run_search

        if method not in METHODS:
            raise SearchCliError(f"--method {method!r} is unknown; use one of {', '.join(METHODS)}")
        if budget < 1:
            raise SearchCliError(f"--budget {budget} is too small; give at least 1 evaluation per NFE")
        nfes = parse_nfe_list(nfe)
        if not nfes:
            raise SearchCliError("--nfe is empty; give at least one NFE, e.g. --nfe 4,5,6")
        from steptune.cli_dc import build_problem
        from steptune.evaluators import Evaluator
        from steptune.evaluators.plugins import evaluator_options

        prob = build_problem(problem, model, noise, prediction, time_input, time_scale, guidance, shape,
                             error=SearchCliError)
        sizes = {**evaluator_options(prob), **({"n_heldout": heldout_n} if heldout_n is not None else {})}
        ev = Evaluator(prob, cache_dir=cache, seed=0, **sizes)
        name = study or f"{prob.name if model else problem}-{method}-s{seed}".replace(":", "-")
        trials_path = out_dir / f"{name}.trials.jsonl"
        log = TrialLog.load(trials_path)
        searcher = make_searcher(method, prob.noise, prob.t_start, prob.t_end, nfes, seed=seed)
        total = budget * len(nfes)
        if log.records and not json_:
            err.print(f"resuming study {name!r}: {len(log.bank('train'))} evaluations in {trials_path}")

        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), TextColumn("{task.fields[best]}"), console=err,
                      disable=json_) as bar:
            bar_task = bar.add_task("preset baseline", total=None, best="")
            # the presets over a wider NFE range too, to say at which NFE they catch up with the search
            wide = sorted(set(nfes) | set(range(min(nfes), min(2 * max(nfes), 20) + 1)))
            _, sweep_rows = preset_baseline(ev, wide)
            baseline = {n: v for n, v in _best(sweep_rows).items() if n in nfes}
            bar.update(bar_task, total=1, completed=1, best="")
            search_task = bar.add_task(f"{method} search", total=total, best="")

            def progress(info):
                best = " ".join(f"{k}:{v:.4g}" + (f"({baseline[k]['rmse']:.3g})" if k in baseline else "")
                                for k, v in sorted(info["best"].items()))
                bar.update(search_task, completed=info["done"], best=f"best(preset) {best}",
                           description="confirming" if info["phase"] == "confirm" else f"{method} search")

            result = run_search(searcher, ev, budget=total, time_budget=time_budget, progress=progress, log=log,
                                cheap_n=cheap_n, confirm_k=confirm_k)
        rows = summary_rows(result, baseline, sweep_rows)
        payload = {"study": name, "problem": prob.name, "noise": prob.noise.to_dict(), "method": method,
                   "seed": seed, "budget_per_nfe": budget, "n_evals": result.n_evals,
                   "n_confirm": result.n_confirm, "seconds": result.seconds, "cheap_samples": cheap_n,
                   "heldout_samples": ev.sizes["heldout"], "searcher": searcher.state(), "results": rows,
                   "trials": str(trials_path)}
        out_dir.mkdir(parents=True, exist_ok=True)
        jpath = out_dir / f"{name}.json"
        jpath.write_text(json.dumps(payload, indent=2, default=float) + "\n")
        if json_:
            print(json.dumps(payload, indent=2, default=float))
            return
        table = Table(title=f"{prob.name}: {method} search, {result.n_evals} evaluations "
                            f"(+{result.n_confirm} held-out confirmations), held-out RMSE")
        for col in ("NFE", "best preset", "preset RMSE", "searched RMSE", "improvement", "preset matches at NFE"):
            table.add_column(col, justify="left" if col == "best preset" else "right")
        for r in rows:
            table.add_row(str(r["nfe"]), str(r["best_preset"]), _fmt(r["preset_rmse"]), _fmt(r["searched_rmse"]),
                          "—" if r["improvement"] is None else f"{r['improvement']:.2f}x",
                          str(r["preset_matches_at_nfe"] or f"> {max(nfes)}"))
        out.print(table)
        err.print(f"saved {jpath} and {trials_path}")


def _fmt(v) -> str:
    return "—" if v is None or not math.isfinite(v) else f"{v:.4g}"
