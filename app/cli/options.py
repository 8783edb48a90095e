"""Options that several commands share, defined once so they read the same everywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

DEFAULT_DB = "sqlite:///runs/steptune.db"
DEFAULT_CACHE = Path("runs/cache")

DbOpt = Annotated[str, typer.Option(
    "--db", envvar="STEPTUNE_DB",
    help="Database URL: sqlite:///path/to.db (default runs/steptune.db) or postgresql+psycopg://user@host/db.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of a table.")]
StudyOpt = Annotated[str, typer.Option("--study", "-s", help="Study name.")]
ProblemOpt = Annotated[str | None, typer.Option("--problem", "-p", help="Built-in problem: gmm-digits (default), "
                                                                         "gmm-2d or digits-cond.")]
DEFAULT_PROBLEM = "gmm-digits"
NoiseOpt = Annotated[str | None, typer.Option(
    "--noise", help="Noise schedule of the problem: vp-linear (default), vp-cosine, ddpm-linear, sd-scaled-linear, "
                    "cosine-discrete, edm, flow.")]
SpacingOpt = Annotated[str | None, typer.Option(
    "--spacing", help="Timestep spacing for presets: logsnr, time-uniform, time-quadratic, karras, or on a "
                      "discrete noise schedule diffusers-linspace, diffusers-leading, diffusers-trailing (default: "
                      "the model's default spacing for eval, each preset's own for schedule).")]
CacheOpt = Annotated[Path, typer.Option("--cache", help="Folder for cached reference solutions.")]
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
ThreadsOpt = Annotated[int | None, typer.Option("--threads", help="CPU threads for torch (default: torch's own; 1 "
                                                                  "is fastest on a busy machine).")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="Where the network runs: cpu, cuda, cuda:1 "
                                                                "(default: cuda when torch sees one, else cpu).")]
