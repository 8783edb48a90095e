"""Importing a schedule file (a steptune export or a hand-written schedule) into a study."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from steptune.space import ScheduleError
from steptune.space import noise as noise_mod
from steptune.storage import Storage, StorageError, TrialRecord

from .json_export import parse_export, read_export


class DuplicateImport(ScheduleError):
    """The study already holds this schedule."""


def import_schedule(db: Storage, source: str | Path, study: str, *, queue: bool = False,
                    allow_duplicates: bool = False) -> TrialRecord:
    """Add a schedule JSON file (or JSON text starting with ``{``) to ``study`` (created if missing).

    The file is validated completely before anything is written. A steptune export whose metrics
    belong to the same problem as the study keeps them as a ``complete`` trial; anything else (a
    hand-written schedule, another problem, ``queue=True``) becomes a ``queued`` trial to evaluate. A
    schedule the study already holds is refused (DuplicateImport) unless ``allow_duplicates``.
    """
    if isinstance(source, str) and source.lstrip().startswith("{"):
        sched, prov = parse_export(source, where="schedule JSON")
    else:
        sched, prov = read_export(source)
    prov = prov or {}
    problem = prov.get("problem") if isinstance(prov.get("problem"), dict) else None
    identity = problem.get("identity") if problem else None
    try:
        existing = db.get_study(study)
    except StorageError:
        existing = None
    if existing is not None and existing.kind in ("relaxation", "dc-fit"):
        raise ScheduleError(f"{source}: study {study!r} is a {existing.kind} study; import the schedule into another "
                            "study")
    if existing is not None and existing.problem and sched.noise:
        study_noise = existing.problem["identity"].get("noise")
        theirs = noise_mod.from_dict(study_noise) if study_noise else None
        if theirs is not None and theirs != noise_mod.from_dict(sched.noise):
            named = noise_mod.name_of(theirs)
            remake = (f"write it for {named} (a preset: steptune schedule preset:NAME --nfe N --noise {named}) or "
                      if named else "")
            raise ScheduleError(f"{source}: the schedule is for noise schedule "
                                f"{noise_mod.from_dict(sched.noise)!r} but study {study!r} uses {theirs!r}; "
                                f"{remake}import it into another study")
    if existing is not None and not allow_duplicates:
        key = sched.key()
        twin = next((t for t in db.trials(study) if t.key == key), None)
        if twin is not None:
            raise DuplicateImport(f"{source}: study {study!r} already holds this schedule as trial id {twin.id} "
                                  f"({twin.status}); nothing was imported (allow a second copy with "
                                  "--allow-duplicates)")
    same_problem = existing is None or existing.problem is None or (
        identity is not None and existing.problem["identity"] == identity)
    fields: dict[str, Any] = {"schedule": sched, "info": {"imported": import_record(source, prov)}}
    if not queue and prov.get("metrics") and same_problem:
        fields.update(status="complete", metrics=prov["metrics"], score=prov.get("score"),
                      fidelity=prov.get("fidelity") or "", bank=prov.get("bank") or "",
                      n_samples=prov.get("n_samples"))
    else:  # to evaluate on the held-out bank, as a job's next run does with its own held-out sample count
        job = ((existing.config or {}).get("job") or {}) if existing is not None else {}
        fields.update(fidelity="heldout", bank="heldout",
                      n_samples=(job.get("evaluation") or {}).get("heldout_samples"))
    create = {"method": "import", "kind": "import", "problem": identity,
              "conventions": problem.get("conventions") if problem else None, "metric": prov.get("metric") or "rmse"}
    tid = db.add_trials(study, [fields], create=create)[0]
    return db.trial(tid)


def import_record(source: str | Path, prov: dict) -> dict:
    """What an imported trial keeps of where it came from (``info.imported``): the file, and from an export's
    provenance the study, trial, method, origin and cost it was found with (an export of an import: the first)."""
    first = prov.get("imported") if isinstance(prov.get("imported"), dict) else prov
    kept = {k: first[k] for k in ("study", "trial", "method", "origin", "exported", "cost") if first.get(k) is not None}
    text = isinstance(source, str) and source.lstrip().startswith("{")
    return {"file": "JSON text" if text else Path(source).name, **kept}
