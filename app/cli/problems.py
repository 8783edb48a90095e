"""The problem a command runs on (a built-in one or ``--model module:factory`` with its conventions), the
device it runs on and the Evaluator that scores schedules on it."""

from __future__ import annotations

from pathlib import Path

from steptune.cli.errors import CliError


def set_threads(threads: int | None) -> None:
    if threads is None:
        return
    if threads < 1:
        raise CliError("--threads must be at least 1")
    import torch

    torch.set_num_threads(threads)


def pick_device(device: str | None) -> str:
    """``device`` checked against what torch sees; None: cuda when available, else cpu."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise CliError(f"--device {device!r} is not a device torch knows; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CliError(f"--device {device}: torch sees no CUDA device here; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise CliError(f"--device {device}: torch sees {torch.cuda.device_count()} CUDA device(s); use cuda:0 to "
                       f"cuda:{torch.cuda.device_count() - 1}")
    if dev.type not in ("cpu", "cuda"):
        raise CliError(f"--device {device}: use cpu or cuda[:N]")
    return str(dev)


def chosen_problem(problem: str | None, model: str | None) -> str | None:
    """The built-in problem a command runs on: ``--problem``, the default one, or None with ``--model``, which
    replaces it (both given are refused: one of them would be ignored)."""
    from steptune.cli.options import DEFAULT_PROBLEM

    if model is not None and problem is not None:
        raise CliError(f"--problem {problem} and --model {model}: give one (--model runs your network in place of a "
                       "built-in problem)")
    return None if model is not None else problem or DEFAULT_PROBLEM


def build_problem(problem: str | None, model: str | None = None, noise: str | None = None,
                  prediction: str | None = None, time_input: str | None = None, time_scale: float | None = None,
                  guidance: float | None = None, shape: str | None = None, note: bool = True):
    """The problem a command was given (see :func:`chosen_problem`); bad input raises CliError. With
    ``note``, a line on stderr says when a built-in network runs retrained weights rather than the shipped ones."""
    from steptune.cli.console import err
    from steptune.evaluators.load import load_error_text, load_problem, parse_shape
    from steptune.study_problem import conventions_note, weights_note

    problem = chosen_problem(problem, model)
    try:
        built = load_problem(model or problem, noise=noise, prediction=prediction, time_input=time_input,
                             time_scale=time_scale, guidance_scale=guidance, shape=parse_shape(shape))
    except (KeyError, ValueError, FileNotFoundError) as e:
        raise CliError(load_error_text(e)) from None
    line = weights_note(built) if note else None
    given = {"--prediction": prediction, "--time-input": time_input, "--time-scale": time_scale}
    for said in (line, conventions_note(None if model else problem, given)):
        if said:
            err.print(said, markup=False, highlight=False)
    return built


def problem_evaluator(problem, cache: Path, device: str):
    """The Evaluator the commands use: the problem's own bank sizes, references cached under ``cache``."""
    from steptune.cli.paths import output_folder
    from steptune.evaluators import Evaluator, evaluator_options

    output_folder(cache, "--cache")
    return Evaluator(problem, cache_dir=cache, device=device, **evaluator_options(problem))


def guidance_of(problem) -> float | None:
    """The guidance scale a problem samples with, set by its model or its source (None: unguided)."""
    g = problem.model.guidance_scale
    return g if g is not None else problem.source.get("guidance_scale")
