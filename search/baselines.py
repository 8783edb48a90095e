"""The baseline presets: what a searched schedule is compared against, and what searches are seeded with."""

from __future__ import annotations

from collections.abc import Sequence

from steptune.space import ScheduleError, presets

from .searcher import Candidate

DEFAULT_PRESETS = ("ddim", "dpm-solver-2", "dpm-solver-3", "dpm-solver++-2s", "dpm-solver++-2m", "dpm-solver++-3m",
                   "unipc-bh1", "unipc-bh2", "unipc-bh2:order=3", "deis", "deis-tab", "heun")


def preset_candidates(space, nfes: Sequence[int], specs: Sequence[str] = DEFAULT_PRESETS) -> list[Candidate]:
    """Every preset that can be built at every NFE, on the space's time interval (duplicates removed), each
    preset at all NFEs before the next, so that a budget too small for all of them still reaches every NFE."""
    out, keys = [], set()
    for spec in specs:
        for nfe in nfes:
            try:
                s = presets.build(spec, nfe, space.noise, t_start=space.t_start, t_end=space.t_end)
                s.validate(nfe=nfe)
            except ScheduleError:
                continue
            c = Candidate(s, nfe, f"preset:{spec}")
            if c.key not in keys:
                keys.add(c.key)
                out.append(c)
    return out
