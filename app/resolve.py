"""Turn what a user typed (a preset spec or a schedule file) into validated Schedules."""

from __future__ import annotations

from pathlib import Path

from steptune.space import Schedule, ScheduleError, presets
from steptune.space import spacing as spacing_mod
from steptune.space.noise import NoiseSchedule, from_dict, name_of


def parse_nfe_list(text: str | None) -> list[int]:
    if text is None or text.strip() == "":
        return []
    out = []
    for part in text.split(","):
        part = part.strip()
        if part.lstrip("-").isdigit() and int(part) < 1:
            raise ScheduleError(f"--nfe: {part} is not a number of model calls; each NFE is a positive integer, e.g. "
                                "5,6,8,10 or a range 3-10")
        if "-" in part:
            lo, _, hi = part.partition("-")
            if not (lo.isdigit() and hi.isdigit()) or int(lo) > int(hi):
                raise ScheduleError(f"--nfe: {part!r} is not a range like 3-10")
            if int(lo) < 1:
                raise ScheduleError(f"--nfe: {part!r} starts at {lo}; each NFE is a positive integer, e.g. 3-10")
            out += list(range(int(lo), int(hi) + 1))
        elif part.isdigit():
            out.append(int(part))
        else:
            raise ScheduleError(f"--nfe: {part!r} is not a positive integer; give a list like 5,6,8,10 or a range 3-10")
    return out


def resolve(spec: str, nfes: list[int], noise: NoiseSchedule | None, spacing: str | None = None,
            t_start: float | None = None, t_end: float | None = None) -> list[Schedule]:
    """``preset:NAME[:key=value,...]`` built at each NFE, or a schedule JSON file (its own NFE)."""
    if spec.startswith("preset:"):
        if not nfes:
            raise ScheduleError(f"--schedule {spec}: a preset needs --nfe (e.g. --nfe 5,6,8,10)")
        kwargs = {"t_start": t_start, "t_end": t_end}
        if spacing is not None:
            try:
                spacing_mod.check(spacing, noise)
            except ScheduleError as e:
                raise ScheduleError(f"--spacing: {e}") from None
            kwargs["spacing"] = spacing
        return [presets.build(spec.removeprefix("preset:"), n, noise, **kwargs) for n in nfes]
    path = Path(spec)
    if not path.exists():
        raise ScheduleError(f"--schedule {spec}: no such file, and not a preset (write preset:NAME, "
                            "see 'steptune presets')")
    from steptune.exports import read_export

    sched, _ = read_export(path)  # the same checks as 'steptune import' (a binary file, unknown fields, ...)
    if noise is not None and sched.noise and from_dict(sched.noise) != noise:
        named = name_of(noise)
        remake = (f"write it for {named} (a preset: steptune schedule preset:NAME --nfe {sched.nfe} --noise {named})"
                  if named else "write it for the model's noise schedule")
        raise ScheduleError(f"{path}: the schedule is for noise schedule {from_dict(sched.noise)!r} but the model "
                            f"uses {noise!r}; {remake}, or give the --noise it was written for")
    if nfes and nfes != [sched.nfe]:
        raise ScheduleError(f"{path}: the schedule costs {sched.nfe} model calls but --nfe asked for "
                            f"{','.join(map(str, nfes))}; drop --nfe or fix the file")
    return [sched]
