"""Sample grids for image problems: the same held-out noises sampled by a schedule, by the best preset at its
NFE and by the reference solution, side by side, with each sample's error printed under it.

An image problem is one whose ``decode(x)`` turns final states into images in [0, 1]: ``digits-cond``, or a
plugged network whose Plug gives ``decode``. A grid shows the first ``rows`` states of the held-out bank (the
states every held-out score is measured on). A sample's error is its RMS error over its dimensions against
the reference from the same noise: the per-sample figure whose median is ``median_err`` and whose root mean
square over the rows is the ``rmse`` of those rows.

"The best preset at the same NFE" is, for a stored trial, the best preset baseline stored for its problem at that
NFE (``steptune.dashboard.grid_view``); where none is stored, and for ``steptune eval --grid``, the default preset
(``DEFAULT_PRESETS``) at the best of its spacings with the lowest RMSE on the train bank, the cheap bank searches
rank on (``best_default_preset``).
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from steptune.space import NonFiniteError, Schedule, sample

Tensor = torch.Tensor

ROWS = 8
CELL = 96  # pixels an image is enlarged towards (by a whole factor, nearest neighbour)
COLUMN_MIN = 170  # pixels: room for the column titles
PAD, GAP, HEADER, LABEL, FOOTER = 10, 10, 56, 22, 44
DPI = 100
BACKGROUND = 255


class GridError(ValueError):
    """A grid that cannot be drawn: one sentence saying why and what to do."""


def not_images(problem) -> str | None:
    """Why ``problem``'s samples cannot be shown as images, or None when they can."""
    if getattr(problem, "decode", None) is None:
        return (f"problem {problem.name!r} has no images to show: sample grids are drawn for digits-cond and for a "
                "plugged network whose Plug gives decode(x)")
    return None


def is_image_identity(identity: dict | None) -> bool:
    """Whether a stored problem identity is an image problem (without building it)."""
    data = (identity or {}).get("data") or {}
    return data.get("model") == "digits-unet" or bool(data.get("images"))


def grid_evaluator(problem, cache_dir: str | Path | None, device: str = "cpu", rows: int = ROWS):
    """An Evaluator whose held-out bank is the first ``rows`` held-out states (banks are drawn in blocks, so
    they are the same states as in every larger held-out bank); its train bank is the problem's own."""
    from steptune.evaluators import Evaluator, evaluator_options

    n_train = evaluator_options(problem).get("n_train", 256)
    return Evaluator(problem, n_train=n_train, n_heldout=rows, cache_dir=cache_dir, device=device)


def per_sample_errors(x: Tensor, ref: Tensor) -> list[float]:
    """Each sample's RMS error over its dimensions against the reference."""
    d = (x.to(torch.float64) - ref.to(x.device, torch.float64)).reshape(x.shape[0], -1)
    return [float(v) for v in torch.sqrt((d ** 2).mean(dim=1))]


def to_pixels(images: Tensor) -> np.ndarray:
    """Decoded images (n, 1 or 3, H, W) in [0, 1] as uint8 RGB (n, H, W, 3)."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise GridError(f"decode returned shape {tuple(images.shape)}; return images (n, 1 or 3, H, W) in [0, 1]")
    px = torch.round(images.detach().to("cpu", torch.float64).clamp(0, 1) * 255).to(torch.uint8)
    px = px.permute(0, 2, 3, 1).numpy()
    return np.repeat(px, 3, axis=3) if px.shape[3] == 1 else px


@dataclass
class Column:
    role: str  # "schedule", "best preset", "reference"
    name: str
    states: Tensor | None  # None: the run diverged
    errors: list[float]
    error: str | None = None
    schedule: Schedule | None = None  # None for the reference


@dataclass
class Grid:
    problem: str
    nfe: int
    columns: list[Column]
    chosen: str = ""  # how the best preset was found
    pixels: list[np.ndarray | None] = field(default_factory=list)  # per column: (rows, H, W, 3) uint8

    @property
    def rows(self) -> int:
        return len(self.columns[-1].errors)

    def to_dict(self) -> dict:
        return {"problem": self.problem, "nfe": self.nfe, "bank": "heldout", "rows": self.rows, "chosen": self.chosen,
                "columns": [{"role": c.role, "name": c.name, "errors": c.errors, "error": c.error}
                            for c in self.columns]}

    def layout(self) -> Layout:
        shape = next(p.shape for p in self.pixels if p is not None)
        return Layout(rows=self.rows, columns=len(self.columns), height=shape[1], width=shape[2])

    def png(self) -> bytes:
        return render_png(self)


@dataclass(frozen=True)
class Layout:
    """Where each image sits in the PNG: ``box(row, column)`` -> (top, left, bottom, right) in pixels."""

    rows: int
    columns: int
    height: int
    width: int

    @property
    def scale(self) -> int:
        return max(1, CELL // max(self.height, self.width))

    @property
    def cell(self) -> tuple[int, int]:
        return self.height * self.scale, self.width * self.scale

    @property
    def column_width(self) -> int:
        return max(self.cell[1], COLUMN_MIN)

    @property
    def row_height(self) -> int:
        return self.cell[0] + LABEL + GAP

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the PNG."""
        return (HEADER + self.rows * self.row_height + FOOTER,
                2 * PAD + self.columns * self.column_width + (self.columns - 1) * GAP)

    def box(self, row: int, column: int) -> tuple[int, int, int, int]:
        ch, cw = self.cell
        top = HEADER + row * self.row_height
        left = PAD + column * (self.column_width + GAP) + (self.column_width - cw) // 2
        return top, left, top + ch, left + cw


def _sample(problem, x_T: Tensor, schedule: Schedule) -> tuple[Tensor | None, str | None]:
    try:
        with torch.no_grad():
            return sample(problem.model, x_T, schedule), None
    except NonFiniteError as e:
        return None, str(e)


def build_grid(ev, schedule: Schedule, best: tuple[str, Schedule] | None, name: str | None = None,
               chosen: str = "") -> Grid:
    """The grid of ``schedule`` (shown as ``name``) on the first rows of ``ev``'s held-out bank: the schedule, the
    best preset ``best`` = (spec, schedule) if given (found as ``chosen`` says), and the reference at the
    schedule's end. Each sample's error is against the reference at its own schedule's end, as the evaluator
    measures it (the problem's t_end, or t = 0 for a schedule with a final step to t = 0)."""
    problem = ev.problem
    why = not_images(problem)
    if why:
        raise GridError(why)
    ev.check(schedule)
    x_T = ev.x_T("heldout")
    columns = []
    for role, label, s in [("schedule", name or schedule.name or "schedule", schedule),
                           *([("best preset", best[0], best[1])] if best else [])]:
        x, error = _sample(problem, x_T, s)
        ref = ev.reference("heldout", float(s.steps[-1].t))
        errors = per_sample_errors(x, ref) if x is not None else [math.inf] * x_T.shape[0]
        columns.append(Column(role, label, x, errors, error, s))
    ref = ev.reference("heldout", float(schedule.steps[-1].t))
    columns.append(Column("reference", "reference solution", ref, [0.0] * x_T.shape[0]))
    pixels = []
    for c in columns:
        if c.states is None:
            pixels.append(None)
            continue
        try:
            with torch.no_grad():
                images = problem.decode(c.states)
        except Exception as e:  # the user's decode
            raise GridError(f"problem {problem.name!r}: decode raised {type(e).__name__}: {e}") from None
        if not isinstance(images, Tensor):
            raise GridError(f"problem {problem.name!r}: decode returned {type(images).__name__}; return a tensor of "
                            "images (n, 1 or 3, H, W) in [0, 1]")
        pixels.append(to_pixels(images))
    return Grid(problem.name, schedule.nfe, columns, chosen, pixels)


def best_default_preset(ev, nfe: int, spacings: Sequence[str] | None = None) -> tuple[str, Schedule] | None:
    """The default preset at the best of its spacings: of every default preset at every candidate spacing of the
    problem's noise schedule (``spacing_variants``; ``spacings`` to try fewer), the one with the lowest RMSE at
    ``nfe`` on ``ev``'s train bank, as (``spec:spacing=S``, schedule); None if none can run."""
    from steptune.search.baselines import DEFAULT_PRESETS, spacing_variants

    p = ev.problem
    built = [s for spec in DEFAULT_PRESETS for _, s in spacing_variants(spec, nfe, p.noise, p.t_start, p.t_end,
                                                                         spacings)]
    if not built:
        return None
    results = ev.evaluate_many(built, bank="train")
    scored = [(r.metrics["rmse"], i) for i, r in enumerate(results) if r.ok]
    if not scored:
        return None
    best = built[min(scored)[1]]
    return best.name, best


def stored_problem(identity: dict):
    """The problem a study stored ``identity`` of, built again (GridError when it cannot be, or when what is
    built now differs from what the study ran: other weights, another factory)."""
    from steptune.evaluators.load import load_problem
    from steptune.space import noise as noise_mod

    if not is_image_identity(identity):
        raise GridError(f"problem {identity.get('name')!r} has no images to show: sample grids are drawn for "
                        "digits-cond and for a plugged network whose Plug gives decode(x)")
    data, model = identity.get("data") or {}, identity.get("model") or {}
    ref = identity.get("reference") or {}
    options = {"reference_tol": ref["tol"]} if "tol" in ref else {}
    try:
        if data.get("model") == "digits-unet":
            problem = load_problem("digits-cond", guidance_scale=data.get("guidance_scale"), **options)
        else:
            problem = load_problem(data["factory"], noise=noise_mod.from_dict(identity["noise"]),
                                   prediction=model.get("prediction"), time_input=model.get("time_input"),
                                   time_scale=model.get("time_scale"), guidance_scale=model.get("guidance_scale"),
                                   shape=tuple(identity["shape"]), t_start=identity["t_start"],
                                   t_end=identity["t_end"], **options)
    except (KeyError, ValueError, FileNotFoundError) as e:
        raise GridError(f"problem {identity.get('name')!r} cannot be built here to draw its samples: "
                        f"{str(e).strip(chr(39))}") from None
    if json.loads(json.dumps(problem.identity())) != identity:
        raise GridError(f"problem {identity.get('name')!r} built here is not the one the study ran (other weights "
                        "or settings); draw its samples where the study's model is")
    return problem


# ---- the PNG ------------------------------------------------------------------------------------------------

def _fmt(v: float) -> str:
    return "failed" if not math.isfinite(v) else f"{v:.3f}"


def render_png(grid: Grid) -> bytes:
    """The grid as a PNG: the images enlarged by a whole factor (nearest neighbour, so each pixel is a block of
    equal pixels), column titles above, each sample's error under it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    lay = grid.layout()
    height, width = lay.size
    canvas = np.full((height, width, 3), BACKGROUND, dtype=np.uint8)
    s = lay.scale
    for c, px in enumerate(grid.pixels):
        for r in range(lay.rows):
            top, left, bottom, right = lay.box(r, c)
            canvas[top:bottom, left:right] = 128 if px is None else np.kron(px[r], np.ones((s, s, 1), np.uint8))
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.figimage(canvas, 0, 0, origin="upper")

    def text(x: float, y: float, s: str, fontsize: float = 8, room: float | None = None, **kw):
        """``s`` centred at (x, y) px; with ``room`` (px), cut with an ellipsis until it is no wider."""
        t = fig.text(x / width, 1 - y / height, s, ha="center", va="top", fontsize=fontsize, **kw)
        while room is not None and len(s) > 2 and t.get_window_extent(renderer).width > room:
            s = s[:-2] + "…"
            t.set_text(s)

    for c, col in enumerate(grid.columns):
        _, left, _, right = lay.box(0, c)
        mid = (left + right) / 2
        title = {"schedule": "this schedule", "best preset": "best preset", "reference": "reference"}[col.role]
        text(mid, 6, title, weight="bold")
        name = col.name.removeprefix("preset:") if col.role != "reference" else "(converged solve)"
        spec, _, options = name.partition(":")
        for k, line in enumerate(v for v in (spec, options) if v):  # within the column and the gaps beside it
            text(mid, 20 + 13 * k, line, room=lay.column_width + GAP - 4)
        for r, e in enumerate(col.errors):
            _, _, bottom, _ = lay.box(r, c)
            text(mid, bottom + 4, "error 0 (reference)" if col.role == "reference" else f"error {_fmt(e)}")
    text(width / 2, height - FOOTER + 4, f"{grid.problem}, NFE {grid.nfe}, held-out noises 0-{lay.rows - 1}",
         color="#555")
    text(width / 2, height - FOOTER + 18, "error: RMS against the reference", color="#555")
    if grid.chosen:
        text(width / 2, height - FOOTER + 30, grid.chosen, color="#555", fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, facecolor="white")
    return buf.getvalue()


CHOSEN_DEFAULT = "best preset: lowest RMSE on the train bank of the default presets at every spacing"
CHOSEN_STORED = "best preset: the best preset baseline stored for this problem at this NFE"


def schedule_grid(problem, schedule: Schedule, name: str, cache_dir: str | Path | None,
                  device: str = "cpu") -> Grid:
    """The grid ``steptune eval --grid`` writes: ``schedule`` against the best default preset at its NFE (at the
    best of its spacings, on the cheap bank), and the reference."""
    ev = grid_evaluator(problem, cache_dir, device)
    return build_grid(ev, schedule, best_default_preset(ev, schedule.nfe), name, CHOSEN_DEFAULT)
