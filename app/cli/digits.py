"""`steptune train-digits`: retrain the digits UNet and classifier the digits problems use."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, TimeElapsedColumn

from steptune.cli.console import err, out, text_column
from steptune.cli.errors import CliError
from steptune.cli.progress import task_bar


def train_digits_cmd(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the checkpoints.")] = Path("runs/models"),
    steps: Annotated[int, typer.Option("--steps", help="UNet training steps.")] = 3000,
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
    threads: Annotated[int, typer.Option("--threads", help="CPU threads (fixed for reproducibility; one is "
                                                           "fastest on a busy machine).")] = 1,
):
    """Train the digits UNet (class-conditional, label dropout for guidance) and the digit classifier
    deterministically; later runs use them instead of the shipped checkpoints."""
    from steptune.evaluators.digits_networks import MODELS_DIR, TrainConfig, train_and_save

    if steps < 1:
        raise CliError("--steps must be at least 1")
    if threads < 1:
        raise CliError("--threads must be at least 1")
    with task_bar(text_column(bold=True), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), text_column("{task.fields[loss]}"), transient=False) as bar:
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
    if out_dir.resolve() == MODELS_DIR.resolve():
        err.print(f"digits-cond runs started in this folder now use these weights, not the shipped ones (their studies "
                  f"are kept apart from those scored on other weights); delete {MODELS_DIR} to go back", markup=False)
    else:
        err.print(f"digits-cond loads the weights in {MODELS_DIR} of the folder it runs in, else the shipped ones; "
                  "copy both files there to use these", markup=False)


def register(app: typer.Typer) -> None:
    app.command("train-digits")(train_digits_cmd)
