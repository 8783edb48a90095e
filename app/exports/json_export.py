"""The JSON export: the Schedule's own versioned dict plus a ``provenance`` block (study, trial, problem and
model identity, metrics, steptune version, and ``tuned_for``: the sampler and model conventions the schedule
was tuned for, the σ convention and the final σ); ``parse_export`` validates a file with one-sentence
errors and reads the provenance of every version up to this one."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from steptune.space import Schedule, ScheduleError
from steptune.space.errors import unknown_field
from steptune.space.schedule import SCHEMA_VERSION, not_a_schedule, schedule_file, schedule_json, schedule_text
from steptune.storage import StudyRecord, TrialRecord

from .conventions import ExportError, conventions_for, schedule_noise
from .tuning import tuned_model_conventions, tuning_record

PROVENANCE_VERSION = 3  # 2: tuned_for; 3: imported
PROVENANCE_FIELDS = ("version", "steptune", "exported", "study", "method", "trial", "trial_number", "status",
                     "problem", "metric", "score", "metrics", "fidelity", "bank", "n_samples", "cost", "tuned_for",
                     "interpolated", "origin", "refined_from", "imported")


def steptune_version() -> str:
    try:
        from importlib.metadata import version

        return version("steptune")
    except Exception:  # not installed as a distribution (e.g. run from a source tree)
        return "unknown"


def built_from(store, trial: TrialRecord) -> TrialRecord | None:
    """The trial that ``trial``'s refinements started from (following ``refines``), where that one was interpolated
    for an NFE its study did not search; else None."""
    seen = set()
    while "refines" in trial.info and "interpolated" not in trial.info and trial.id not in seen:
        seen.add(trial.id)
        trial = store.trial(trial.info["refines"])
    return trial if "interpolated" in trial.info else None


def _method(trial: TrialRecord, study: StudyRecord | None) -> str | None:
    """What found the trial's schedule: for one imported, the method its export named (``import`` for a schedule
    written by hand), else its study's."""
    if "imported" in trial.info:
        return trial.info["imported"].get("method") or "import"
    return study.method if study else None


def export_dict(trial: TrialRecord, study: StudyRecord | None = None, cost: dict | None = None,
                interpolated: TrialRecord | None = None) -> dict:
    """The exported JSON form of a stored trial: its schedule dict plus ``provenance`` (with ``cost``, what the
    study spent at the trial's NFE: ``steptune.search_cost``). ``interpolated``: the interpolated trial a refined
    one started from (``built_from``), named in ``provenance.interpolated`` as the trial itself would be."""
    sched = trial.to_schedule()
    d = sched.to_dict()
    prov = {"version": PROVENANCE_VERSION, "steptune": steptune_version(),
            "exported": datetime.now(UTC).isoformat(timespec="seconds"), "study": trial.study,
            "method": _method(trial, study), "trial": trial.id, "trial_number": trial.number,
            "status": trial.status, "problem": study.problem if study else None,
            "metric": study.metric if study else None, "score": trial.score, "metrics": trial.metrics,
            "fidelity": trial.fidelity, "bank": trial.bank, "n_samples": trial.n_samples}
    if trial.info.get("origin"):
        prov["origin"] = trial.info["origin"]
    if "imported" in trial.info:  # imported into this study (steptune import): where it was found
        prov["imported"] = trial.info["imported"]
    if "refines" in trial.info:  # a refinement by gradient (steptune refine): the searched trial it started from
        rec = trial.info.get("refine", {})
        prov["refined_from"] = {"trial": trial.info["refines"], "trial_number": trial.info.get("refines_number"),
                                "score": rec.get("parent_rmse")}
    source = trial if "interpolated" in trial.info else interpolated
    if source is not None:  # built for an NFE the study did not search (a job's [refine] interpolate)
        how = source.info["interpolated"]
        trials = how.get("from_trials", {})
        prov["interpolated"] = {"nfe": trial.nfe, "rule": "steptune.space.retime.interpolate",
                                "method": how.get("method"), "between_trials": trials,
                                "decisions_from_trial": trials.get(str(how.get("decisions_from"))),
                                **({"trial": source.id} if source is not trial else {})}
    if cost is not None:
        prov["cost"] = cost
    if sched.noise:
        try:
            conv = conventions_for(sched, study)
        except ExportError:  # no problem stored: the model's conventions stay unknown (model: null)
            conv = None
        prov["tuned_for"] = tuning_record(sched, conv, schedule_noise(sched))
    d["provenance"] = prov
    return d


def interpolated_export_dict(schedule: Schedule, source: TrialRecord, neighbours: list[TrialRecord],
                             study: StudyRecord | None = None) -> dict:
    """The exported JSON form of a schedule ``steptune.space.retime.interpolate`` built for an NFE the study did not
    search: no trial or score of its own (status ``interpolated``); ``provenance.interpolated`` names the trials its
    times were interpolated between and the one its decisions come from."""
    prov = export_dict(source, study)["provenance"]
    prov.update(trial=None, trial_number=None, status="interpolated", score=None, metrics={}, n_samples=None,
                interpolated={"nfe": schedule.nfe, "rule": "steptune.space.retime.interpolate",
                              "method": schedule.meta.get("interpolated", {}).get("method"),
                              "between_trials": {str(t.nfe): t.id for t in neighbours},
                              "decisions_from_trial": source.id})
    return {**schedule.to_dict(), "provenance": prov}


def parse_export(text: str, where: str = "schedule") -> tuple[Schedule, dict | None]:
    """A validated Schedule and its provenance (None for a plain schedule file) from JSON text.

    Refuses malformed JSON, another schema or schema version, unknown fields (top level, steps,
    provenance) and an ``nfe`` field that disagrees with the steps, each with one sentence.
    """
    d = schedule_json(text, where)
    if isinstance(d, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in d):
        raise ScheduleError(f"{where}: a sigma list carries only the times, not the per-step decisions; use the "
                            "JSON export (steptune export --format json) or the diffusers one")
    if not isinstance(d, dict) or d.get("schema") != "steptune.schedule":
        raise not_a_schedule(d, where)
    version = d.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ScheduleError(f"{where}: field 'version' must be an integer (this steptune reads version "
                            f"{SCHEMA_VERSION})")
    if version != SCHEMA_VERSION:
        hint = "upgrade steptune to read it" if version > SCHEMA_VERSION else "re-export it with this steptune"
        raise ScheduleError(f"{where}: schedule schema version {version} is not supported (this steptune reads "
                            f"version {SCHEMA_VERSION}); {hint}")
    prov = d.get("provenance")
    if prov is not None:
        if not isinstance(prov, dict):
            raise ScheduleError(f"{where}: field 'provenance' must be an object")
        bad = [k for k in prov if k not in PROVENANCE_FIELDS]
        if bad:
            raise ScheduleError(f"{where}: {unknown_field(bad[0], PROVENANCE_FIELDS, 'provenance field')}")
        pv = prov.get("version", PROVENANCE_VERSION)
        if not isinstance(pv, int) or pv > PROVENANCE_VERSION:
            raise ScheduleError(f"{where}: provenance version {pv!r} is not supported (this steptune reads "
                                f"version {PROVENANCE_VERSION}); upgrade steptune")
        for name in ("metrics", "cost", "tuned_for", "refined_from", "imported"):
            if prov.get(name) is not None and not isinstance(prov[name], dict):
                raise ScheduleError(f"{where}: provenance field {name!r} must be an object")
    sched = Schedule.from_dict({k: v for k, v in d.items() if k != "provenance"}, where=where)
    try:
        sched.validate()
    except ScheduleError as e:
        raise ScheduleError(f"{where}: {e}") from None
    return sched, prov


def scheduler_from_export(path: str | Path, **config):
    """A diffusers ``SteptuneScheduler`` for a schedule file (a steptune export or a plain schedule): it runs
    with the model conventions the export's provenance says the schedule was tuned for, unless ``config``
    (``prediction_type``, ``time_input``, ``time_scale``, ...) says otherwise, which then warns once. Needs
    diffusers."""
    from .diffusers_scheduler import SteptuneScheduler

    sched, prov = read_export(path)
    record = (prov or {}).get("tuned_for")
    if record is None and sched.noise:  # a version-1 export: its problem's conventions
        record = tuning_record(sched, tuned_model_conventions(sched, prov), schedule_noise(sched))
    return SteptuneScheduler(schedule=sched.to_dict(), tuned_for=record, **config)


def read_export(path: str | Path) -> tuple[Schedule, dict | None]:
    path = schedule_file(path)
    return parse_export(schedule_text(path), where=str(path))
