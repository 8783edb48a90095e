"""The baseline presets: what a searched schedule is compared against, and what searches are seeded with.

A baseline is each preset at the best of its spacings on the problem (``spacing_variants``, ``best_spacing``):
the spacing is chosen on the train bank and the preset reported on the held-out bank, so that a gain over it is
a gain over the best a user could pick."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

from steptune.space import Schedule, ScheduleError, presets
from steptune.space import spacing as spacing_mod

from .searcher import Candidate

DEFAULT_PRESETS = ("ddim", "dpm-solver-2", "dpm-solver-3", "dpm-solver++-2s", "dpm-solver++-2m", "dpm-solver++-3m",
                   "unipc-bh1", "unipc-bh2", "unipc-bh2:order=3", "deis", "deis-tab", "heun")


def unbuildable(spec: str, nfes: Sequence[int], noise, t_start: float, t_end: float, **options) -> str | None:
    """Why preset ``spec`` builds at none of ``nfes`` (its error at the first: a name or an option out of range), or
    None where it builds at one of them."""
    first = None
    for nfe in nfes:
        try:
            presets.build(spec, nfe, noise, t_start=t_start, t_end=t_end, **options).validate(nfe=nfe)
            return None
        except ScheduleError as e:
            first = first or f"at NFE {nfe}: {e}"
    return first


def preset_candidates(space, nfes: Sequence[int], specs: Sequence[str] = DEFAULT_PRESETS,
                      afs: bool = False) -> list[Candidate]:
    """Every preset that can be built at every NFE, on the space's time interval (duplicates removed), each
    preset at all NFEs before the next, so that a budget too small for all of them still reaches every NFE.
    With ``afs`` (where the space allows an analytical first step) they are followed by the same presets with one
    (``afs_variant``; origin ``preset-afs:SPEC``). A spec that names no preset, or that builds at none of ``nfes`` (an
    option out of range), raises ScheduleError: a misspelled seed is not dropped without a word."""
    for spec in specs:
        presets.parse_spec(spec)
        why = unbuildable(spec, nfes, space.noise, space.t_start, space.t_end)
        if why:
            raise ScheduleError(f"preset {spec!r} cannot be built at any NFE searched ({why})")
    out, keys = [], set()
    variants = (False, True) if afs and "zero" in space.afs_kinds else (False,)
    for with_afs in variants:
        for spec in specs:
            for nfe in nfes:
                try:
                    if with_afs:  # repaired to what the space allows (e.g. a corrector the new first step can't have)
                        s = space.finish(afs_variant(spec, nfe, space.noise, space.t_start, space.t_end), nfe)
                    else:
                        s = presets.build(spec, nfe, space.noise, t_start=space.t_start, t_end=space.t_end)
                        s.validate(nfe=nfe)
                except ScheduleError:
                    continue
                if s is None:
                    continue
                c = Candidate(s, nfe, f"preset-afs:{spec}" if with_afs else f"preset:{spec}")
                if c.key not in keys:
                    keys.add(c.key)
                    out.append(c)
    return out


def afs_variant(spec: str, nfe: int, noise, t_start: float, t_end: float) -> Schedule:
    """The preset ``spec`` with an analytical first step at ``nfe``: built at ``nfe + 1``, its first step takes
    the data prediction as zero instead of calling the model (``afs = "zero"``), so it makes ``nfe`` calls (a
    multistep preset: one step more than at ``nfe``). ScheduleError where that is not a schedule of ``nfe`` calls."""
    s = presets.build(spec, nfe + 1, noise, t_start=t_start, t_end=t_end)
    return replace(s, afs="zero", name=f"{s.name}+afs")


def default_spacing(problem) -> str | None:
    """``spacing.default_for`` the problem's noise schedule and guidance (its model's, or its source's)."""
    g = problem.model.guidance_scale
    g = g if g is not None else (getattr(problem, "source", None) or {}).get("guidance_scale")
    return spacing_mod.default_for(problem.noise, g)


def spacing_variants(spec: str, nfe: int, noise, t_start: float, t_end: float,
                     spacings: Sequence[str] | None = None) -> list[tuple[str, Schedule]]:
    """(spacing, schedule) of the preset ``spec`` at ``nfe`` on every candidate spacing of ``noise`` that builds
    (``spacing.candidates`` unless ``spacings`` names them), named ``spec:spacing=...`` so that ``preset:NAME``
    rebuilds it; a spacing whose schedule equals an earlier one's is left out."""
    out, keys = [], set()
    for sp in spacings or spacing_mod.candidates(noise):
        try:
            s = presets.build(spec, nfe, noise, spacing=sp, t_start=t_start, t_end=t_end)
            s.validate(nfe=nfe)
        except ScheduleError:
            continue
        s = replace(s, name=with_spacing(spec, sp))
        if s.key() not in keys:
            keys.add(s.key())
            out.append((sp, s))
    return out


def spacing_scores(evaluator, variants: Sequence[tuple[str, Schedule]], bank: str,
                   n: int | None = None) -> dict[str, float | None]:
    """The RMSE of each of ``variants`` (``spacing_variants``) on the first ``n`` states of ``bank``: None for one the
    model cannot run, which is then no candidate."""
    scores: dict[str, float | None] = {}
    for sp, sched in variants:
        try:
            scores[sp] = evaluator.evaluate(sched, bank, n=n).metrics["rmse"]
        except Exception:
            scores[sp] = None
    return scores


def best_spacing(scores: dict[str, float]) -> str | None:
    """The spacing with the lowest finite score (the first of equal ones), or None when none scored."""
    finite = {k: v for k, v in scores.items() if v is not None and math.isfinite(v)}
    return min(finite, key=finite.__getitem__) if finite else None


def origin(spec: str, nfe: int, spacing: str | None = None) -> str:
    """How a baseline trial names the preset it ran: ``preset:unipc-bh2@5 spacing=time-uniform``."""
    return f"preset:{spec}@{nfe}" + (f" spacing={spacing}" if spacing else "")


def with_spacing(spec: str, spacing: str | None) -> str:
    """The preset spec with a ``spacing`` option (``unipc-bh2:order=3,spacing=time-uniform``), so that
    ``preset:SPEC`` rebuilds the schedule; ``spec`` itself when ``spacing`` is None."""
    if not spacing:
        return spec
    return f"{spec}{',' if ':' in spec else ':'}spacing={spacing}"
