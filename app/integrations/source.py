"""Where an integration's schedule comes from: a Schedule, a schedule JSON file, or a study in a database (its best
trial at an NFE, a trial by id, or a schedule interpolated from the searched NFEs when the study lacks that NFE)."""

from __future__ import annotations

from pathlib import Path

from steptune.space import Schedule, ScheduleError
from steptune.space.retime import interpolate


def best_schedules(store, study: str, fidelity: str | None = None) -> dict[int, Schedule]:
    """The best complete trial's schedule at every NFE a study has (its reporting fidelity unless given)."""
    fidelity = fidelity or store.get_study(study).config.get("fidelity")
    return {t.nfe: t.to_schedule() for t in store.best_per_nfe(study, fidelity=fidelity)}


def study_schedule(store, study: str, nfe: int, fidelity: str | None = None) -> tuple[Schedule, bool]:
    """The schedule a study gives at ``nfe`` and whether it was interpolated: its best trial where it searched that
    NFE, else ``retime.interpolate`` over the best trials of the NFEs it searched."""
    best = best_schedules(store, study, fidelity)
    if not best:
        raise ScheduleError(f"study {study!r} has no complete trial to take a schedule from")
    if nfe in best:
        return best[nfe], False
    return interpolate(best, nfe), True


def load(schedule: Schedule | str | Path | None = None, *, db: str | None = None, study: str | None = None,
         nfe: int | None = None, trial: int | None = None) -> Schedule:
    """A validated schedule from a Schedule, a JSON file (a steptune export or a plain schedule), or a database
    (``db`` URL, default runs/steptune.db; ``study`` with ``nfe`` or ``trial``)."""
    if schedule is not None:
        if study is not None or trial is not None:
            raise ScheduleError("give a schedule or a study (with nfe or trial), not both")
        if isinstance(schedule, Schedule):
            return schedule.validate()
        from steptune.exports import read_export

        return read_export(schedule)[0]
    if study is None:
        raise ScheduleError("no schedule given: pass a Schedule, a schedule JSON path, or study= with nfe= or trial=")
    if (nfe is None) == (trial is None):
        raise ScheduleError(f"study {study!r}: give either nfe= (its best schedule at that NFE) or trial= (a trial id)")
    from steptune.storage import connect

    with connect(db, must_exist=True, create=False) as store:
        if trial is not None:
            t = store.trial(trial)
            if t.study != study:
                raise ScheduleError(f"trial {trial} belongs to study {t.study!r}, not {study!r}")
            return t.to_schedule().validate()
        return study_schedule(store, study, nfe)[0]
