"""Read-only queries behind the dashboard and the reports: everything is aggregated in SQL, and every
value from a request reaches the database as a bound parameter.

Each function takes a ``Storage`` and returns JSON-ready dicts. Unknown studies, problems and trials
raise ``NotFound``.
"""

from __future__ import annotations

import math
from collections import defaultdict

from sqlalchemy import and_, func, or_, select

from steptune.relax_verdict import VERDICT, stored_or_own
from steptune.run_lease import lease
from steptune.search import CONFIRM
from steptune.search_cost import FINISHED, CostRow, cost_of_rows
from steptune.storage import Storage
from steptune.storage.schema import STATUSES, Problem, RelaxationRecord, Study, Trial, utcnow

NO_PROBLEM = 0  # the problem id under which studies without a stored problem are listed
PRESET_METHOD = "preset"
SORTABLE = {"id": Trial.id, "number": Trial.number, "nfe": Trial.nfe, "score": Trial.score,
            "status": Trial.status, "seconds": Trial.seconds, "created": Trial.created, "fidelity": Trial.fidelity}
MAX_PAGE = 500
DETAIL_LIMIT = 5_000  # trials of one (study, fidelity) read row by row on the front


class NotFound(LookupError):
    """A study, problem or trial the database does not have."""


def _name_of_schedule():
    return Trial.schedule["name"].as_string()


def _iso(dt) -> str | None:
    return None if dt is None else dt.isoformat(timespec="seconds")


def study_id(s, name: str) -> int:
    sid = s.scalar(select(Study.id).where(Study.name == name))
    if sid is None:
        raise NotFound(f"no study named {name!r}")
    return sid


# ---- overview --------------------------------------------------------------------------------------


def problems(store: Storage) -> list[dict]:
    """Every problem with its studies (method, metric, trial counts per status, relaxation rounds)."""
    with store._tx(write=False) as s:
        probs = s.execute(select(Problem.id, Problem.name, Problem.identity).order_by(Problem.id)).all()
        studies = s.execute(select(Study.id, Study.name, Study.method, Study.metric, Study.problem_id, Study.created,
                                   Study.config).order_by(Study.id)).all()
        counts: dict[int, dict[str, int]] = defaultdict(dict)
        for sid, status, n in s.execute(select(Trial.study_id, Trial.status, func.count())
                                        .group_by(Trial.study_id, Trial.status)):
            counts[sid][status] = n
        fidelities: dict[int, list[str]] = defaultdict(list)
        for sid, fid in s.execute(select(Trial.study_id, Trial.fidelity).group_by(Trial.study_id, Trial.fidelity)
                                  .order_by(Trial.study_id, Trial.fidelity)):
            fidelities[sid].append(fid)
        rounds = dict(s.execute(select(RelaxationRecord.study_id, func.count()).group_by(RelaxationRecord.study_id))
                      .all())
    by_problem: dict[int, list[dict]] = defaultdict(list)
    now = utcnow()
    for st in studies:
        by_problem[st.problem_id or NO_PROBLEM].append({
            "name": st.name, "method": st.method, "metric": st.metric, "created": _iso(st.created),
            "trials": {k: counts[st.id].get(k, 0) for k in STATUSES}, "fidelities": fidelities.get(st.id, []),
            "relaxation_rounds": rounds.get(st.id, 0), "run": lease(st.config, now)})
    out = []
    for p in probs:
        noise = (p.identity or {}).get("noise") or {}
        out.append({"id": p.id, "name": p.name, "noise": noise.get("name") or noise.get("kind"),  # ddpm-linear
                    "studies": by_problem.get(p.id, []),
                    "fidelities": sorted({f for st in by_problem.get(p.id, []) for f in st["fidelities"]})})
    if by_problem.get(NO_PROBLEM):
        out.append({"id": NO_PROBLEM, "name": "(no problem recorded)", "noise": None,
                    "studies": by_problem[NO_PROBLEM],
                    "fidelities": sorted({f for st in by_problem[NO_PROBLEM] for f in st["fidelities"]})})
    return out


def change_token(store: Storage) -> dict:
    """What changes whenever a trial or relaxation round is added or a trial changes status, or a run starts,
    moves to another phase, ends or dies (for live refresh); the trials' part read from the (status, ...) index, so
    it stays cheap for large databases."""
    with store._tx(write=False) as s:
        per_status = dict(s.execute(select(Trial.status, func.count()).group_by(Trial.status)).all())
        last_id = s.scalar(select(func.max(Trial.id)))
        rounds, last_round = s.execute(select(func.count(), func.max(RelaxationRecord.id))).one()
        configs = s.execute(select(Study.name, Study.config).order_by(Study.id)).all()
    counts = "-".join(str(per_status.get(k, 0)) for k in STATUSES)
    now = utcnow()
    runs = ";".join(f"{name}={r['id']}/{r['phase']}/{int(r['alive'])}" for name, config in configs
                    if (r := lease(config, now)) is not None)
    return {"token": f"{counts}-{last_id}-{rounds}-{last_round}-{runs}", "trials": sum(per_status.values()),
            "running": per_status.get("running", 0)}


# ---- the NFE-quality front ---------------------------------------------------------------------------


def _problem_studies(s, problem: int):
    if problem != NO_PROBLEM and s.scalar(select(Problem.id).where(Problem.id == problem)) is None:
        raise NotFound(f"no problem with id {problem}")
    cond = Study.problem_id.is_(None) if problem == NO_PROBLEM else Study.problem_id == problem
    return s.execute(select(Study.id, Study.name, Study.method, Study.metric).where(cond).order_by(Study.id)).all()


def _baseline_flag():
    return Trial.info["baseline"].as_boolean()


def _origin():
    return Trial.info["origin"].as_string()


def preset_of(origin: str | None) -> str | None:
    """The preset spec of a baseline trial's origin (``preset:SPEC@NFE``), else None."""
    if not origin or not origin.startswith("preset:"):
        return None
    return origin.removeprefix("preset:").rpartition("@")[0] or origin.removeprefix("preset:")


def front(store: Storage, problem: int, fidelity: str | None = None) -> dict:
    """The NFE-quality front of a problem: the best complete trial at every NFE of each series.

    A series is a searched or imported study at one fidelity, or a preset at one fidelity (from studies
    of method ``preset`` and from the preset baselines a search stores beside its own trials, marked
    ``info.baseline``). Studies are grouped in SQL over the (study, status, fidelity, nfe, score) index;
    a (study, fidelity) group of more than ``DETAIL_LIMIT`` trials is read only through that index (as
    one series: searches store their baselines on the held-out bank, where few trials are), smaller
    groups are read row by row to tell baselines apart. The cost follows the points shown, not the
    trials stored."""
    with store._tx(write=False) as s:
        studies = _problem_studies(s, problem)
        by_id = {st.id: st for st in studies}
        cond = _scored(list(by_id), fidelity)
        sizes = s.execute(select(Trial.study_id, Trial.fidelity, func.count()).where(*cond)
                          .group_by(Trial.study_id, Trial.fidelity)).all() if by_id else []
        bulk = [(sid, fid) for sid, fid, n in sizes if n > DETAIL_LIMIT and by_id[sid].method != PRESET_METHOD]
        detail = [(sid, fid) for sid, fid, n in sizes if (sid, fid) not in bulk]
        points = _bulk_points(s, bulk, cond, by_id) + _detail_points(s, detail, cond, by_id)
        metrics = _metrics_of(s, [p["trial"] for p in points])
        made = _interpolated_nfes(s, list(by_id))
    series: dict[tuple, dict] = {}
    for p in sorted(points, key=lambda p: (p["key"], p["nfe"], p["score"], p["trial"])):
        if p["key"] not in series:
            kind, who, fid = p["key"]
            st = by_id[p["study_id"]]
            series[p["key"]] = {"name": f"{who} ({fid})" if fid else who, "kind": kind, "fidelity": fid,
                                "study": st.name if kind != "preset" else None, "method": st.method,
                                "preset": who if kind == "preset" else None, "metric": st.metric, "points": []}
        pts = series[p["key"]]["points"]
        if pts and pts[-1]["nfe"] == p["nfe"]:  # the same preset from several studies: keep the best
            pts[-1]["count"] += p["count"]
            continue
        pts.append({"nfe": p["nfe"], "score": p["score"], "trial": p["trial"], "number": p["number"],
                    "study": by_id[p["study_id"]].name, "schedule": p["schedule"], "count": p["count"],
                    "metrics": metrics.get(p["trial"], {}),
                    "interpolated_from": made.get((p["study_id"], p["nfe"])) if p["key"][0] == "study" else None})
    traces = sorted(series.values(), key=lambda t: (t["kind"] == "preset", t["name"]))
    for tr in traces:
        _mark_pareto(tr["points"])
    fronts = []
    for fid in sorted({tr["fidelity"] for tr in traces}):
        pts = [(p["nfe"], p["score"], tr["name"], p["trial"]) for tr in traces if tr["fidelity"] == fid
               for p in tr["points"]]
        fronts.append({"fidelity": fid, "points": [{"nfe": n, "score": sc, "series": name, "trial": t}
                                                   for n, sc, name, t in _pareto(pts)]})
    names = sorted({st.metric for st in studies})
    return {"problem": problem, "metric": names[0] if len(names) == 1 else "score", "fidelity": fidelity,
            "series": traces, "fronts": fronts}


def _scored(study_ids: list[int], fidelity: str | None) -> list:
    cond = [Trial.study_id.in_(study_ids), Trial.status == "complete", Trial.score.is_not(None)]
    if fidelity is not None:
        cond.append(Trial.fidelity == fidelity)
    return cond


def _groups(pairs: list[tuple[int, str]]):
    return or_(*(and_(Trial.study_id == sid, Trial.fidelity == fid) for sid, fid in pairs))


def _bulk_points(s, pairs: list[tuple[int, str]], cond: list, by_id: dict) -> list[dict]:
    if not pairs:
        return []
    keys = [Trial.study_id, Trial.fidelity, Trial.nfe]
    groups = (select(*keys, func.min(Trial.score).label("best"), func.count().label("n"))
              .where(*cond, _groups(pairs)).group_by(*keys).subquery())
    rows = s.execute(select(Trial.id, Trial.study_id, Trial.fidelity, Trial.nfe, Trial.score, Trial.number,
                            _name_of_schedule().label("schedule_name"), groups.c.n)
                     .join(groups, and_(Trial.study_id == groups.c.study_id, Trial.fidelity == groups.c.fidelity,
                                        Trial.nfe == groups.c.nfe, Trial.score == groups.c.best))
                     .where(*cond).order_by(Trial.id)).all()
    out: dict[tuple, dict] = {}
    for r in rows:  # ties on the minimum: the earliest trial
        key = ("study", r.study_id, r.fidelity, r.nfe)
        if key not in out:
            out[key] = {"key": ("study", by_id[r.study_id].name, r.fidelity), "study_id": r.study_id, "nfe": r.nfe,
                        "score": r.score, "trial": r.id, "number": r.number, "schedule": r.schedule_name or "",
                        "count": r.n}
    return list(out.values())


def _detail_points(s, pairs: list[tuple[int, str]], cond: list, by_id: dict) -> list[dict]:
    if not pairs:
        return []
    columns = (Trial.id, Trial.study_id, Trial.fidelity, Trial.nfe, Trial.score, Trial.number,
               _name_of_schedule().label("schedule_name"), _baseline_flag().label("baseline"),
               _origin().label("origin"))
    rows = []
    for sid, fid in pairs:  # one index range each (an OR of the pairs makes SQLite scan instead)
        rows += s.execute(select(*columns).where(*cond, Trial.study_id == sid, Trial.fidelity == fid)).all()
    best: dict[tuple, dict] = {}
    for r in sorted(rows, key=lambda r: (r.score, r.id)):
        st = by_id[r.study_id]
        if st.method == PRESET_METHOD:
            key = ("preset", r.schedule_name or "preset", r.fidelity)
        elif r.baseline:
            key = ("preset", preset_of(r.origin) or r.schedule_name or "preset", r.fidelity)
        else:
            key = ("study", st.name, r.fidelity)
        k = (key, r.nfe, r.study_id if key[0] == "study" else None)
        if k in best:
            best[k]["count"] += 1
            continue
        best[k] = {"key": key, "study_id": r.study_id, "nfe": r.nfe, "score": r.score, "trial": r.id,
                   "number": r.number, "schedule": r.schedule_name or "", "count": 1}
    return list(best.values())


def _interpolated_nfes(s, study_ids: list[int]) -> dict[tuple[int, int], list[int]]:
    """(study id, NFE) of the NFEs built from searched ones: the NFEs each was built from (``info.interpolated`` of
    a complete held-out trial; read through the index of those, which are few)."""
    out = {}
    for sid in study_ids:  # one index range each
        rows = s.execute(select(Trial.nfe, Trial.info[("interpolated", "between")])
                         .where(Trial.study_id == sid, Trial.status == "complete", Trial.fidelity == CONFIRM,
                                Trial.info["interpolated"].as_string().is_not(None))).all()
        out.update({(sid, nfe): sorted(int(n) for n in between) for nfe, between in rows if between})
    return out


def _metrics_of(s, trial_ids: list[int]) -> dict[int, dict]:
    if not trial_ids:
        return {}
    return {tid: m or {} for tid, m in s.execute(select(Trial.id, Trial.metrics).where(Trial.id.in_(trial_ids)))}


def _pareto(points: list[tuple]) -> list[tuple]:
    """The (nfe, score, ...) tuples no other point beats on both (fewer NFE, lower score)."""
    kept, best = [], math.inf
    for p in sorted(points, key=lambda p: (p[0], p[1])):
        if p[1] < best:
            kept.append(p)
            best = p[1]
    return kept


def _mark_pareto(points: list[dict]) -> None:
    front = {id(p) for p in _pareto_dicts(points)}
    for p in points:
        p["pareto"] = id(p) in front


def _pareto_dicts(points: list[dict]) -> list[dict]:
    kept, best = [], math.inf
    for p in sorted(points, key=lambda p: (p["nfe"], p["score"])):
        if p["score"] < best:
            kept.append(p)
            best = p["score"]
    return kept


# ---- search efficiency -------------------------------------------------------------------------------


def history(store: Storage, study: str) -> dict:
    """Best score so far against the number of evaluations done, per (fidelity, NFE): only the points
    where the best improved, plus the last evaluation, so the answer stays small for long searches; ``trials`` holds the
    id of the trial that set each point (as ``/api/trials/ID`` takes it; None at the last evaluation's point).
    Preset baselines stored in the study (``info.baseline``) are left out. ``reported``: the best per NFE on the
    study's reporting fidelity (a search's held-out bank), beside the cost per NFE."""
    with store._tx(write=False) as s:
        sid = study_id(s, study)
        metric, config = s.execute(select(Study.metric, Study.config).where(Study.id == sid)).one()
        busy = s.scalar(select(func.count(func.distinct(Trial.worker)))
                        .where(Trial.study_id == sid, Trial.status == "running"))
        rows = s.execute(select(Trial.id, Trial.nfe, Trial.fidelity, Trial.score, Trial.status,
                                _baseline_flag().label("baseline"))
                         .where(Trial.study_id == sid, Trial.status.in_(("complete", "failed")))
                         .order_by(Trial.number)).all()
        cost = _study_cost(s, sid)
    curves: dict[tuple, dict] = {}
    done: dict[str, int] = defaultdict(int)
    for r in rows:
        if r.baseline:  # preset baselines are not the search's own evaluations
            continue
        done[r.fidelity] += 1
        key = (r.fidelity, r.nfe)
        c = curves.setdefault(key, {"fidelity": r.fidelity, "nfe": r.nfe, "evaluations": [], "best": [],
                                    "trials": [], "n": 0, "_best": math.inf})
        c["n"] += 1
        if r.status == "complete" and r.score is not None and r.score < c["_best"]:
            c["_best"] = r.score
            c["evaluations"].append(done[r.fidelity])
            c["best"].append(r.score)
            c["trials"].append(r.id)
    for c in curves.values():
        if c["best"] and c["evaluations"][-1] != done[c["fidelity"]]:
            c["evaluations"].append(done[c["fidelity"]])
            c["best"].append(c["best"][-1])
            c["trials"].append(None)
        del c["_best"]
    ordered = sorted(curves.values(), key=lambda c: (c["fidelity"], c["nfe"]))
    evaluators = (config or {}).get("evaluators") or {}
    run = lease(config, utcnow())
    if run and run["alive"] and run.get("busy") is not None:  # in-process no row is stored running: the run says
        busy = run["busy"]
    reported = (config or {}).get("fidelity")  # a search's held-out scores, as best and export choose
    if reported is None and len({c["fidelity"] for c in ordered}) == 1:
        reported = ordered[0]["fidelity"]
    return {"study": study, "metric": metric, "evaluations": dict(done), "curves": [c for c in ordered if c["best"]],
            "evaluators": {"count": evaluators.get("count"), "backend": evaluators.get("backend"), "busy": busy},
            "utilisation": (config or {}).get("utilisation"), "cost": cost,
            "reported": {"fidelity": reported, "best": {str(c["nfe"]): c["best"][-1] for c in ordered
                                                         if c["fidelity"] == reported and c["best"]}}}


def _study_cost(s, sid: int) -> dict:
    """``steptune.search_cost``'s cost of a study, reading only the columns it needs (its ``CostRow``)."""
    rows = s.execute(select(Trial.nfe, Trial.status, Trial.key, Trial.bank, Trial.n_samples, Trial.seconds,
                            Trial.started, Trial.finished, _baseline_flag().label("baseline"),
                            Trial.metrics["model_calls"].as_float().label("model_calls"),
                            Trial.metrics["device"].as_string().label("device"),
                            Trial.info[("interpolated", "between")].label("interpolated"),
                            Trial.info["refines"].as_integer().label("refines"))
                     .where(Trial.study_id == sid, Trial.status.in_(FINISHED)).order_by(Trial.number)).all()
    return cost_of_rows(CostRow(*r) for r in rows).as_dict()


# ---- the trial table ---------------------------------------------------------------------------------


def trials_page(store: Storage, *, study: str | None = None, problem: int | None = None, nfe: int | None = None,
                status: str | None = None, fidelity: str | None = None, sort: str = "number", descending: bool = False,
                offset: int = 0, limit: int = 50, most: int = MAX_PAGE) -> dict:
    """One page of trials, filtered, sorted and counted in SQL; ``limit`` is cut to ``most`` (a report reads its
    rows in one page)."""
    limit = max(1, min(int(limit), most))
    with store._tx(write=False) as s:
        cond = []
        if study is not None:
            cond.append(Trial.study_id == study_id(s, study))
        if problem is not None:
            ids = [st.id for st in _problem_studies(s, problem)]
            cond.append(Trial.study_id.in_(ids))
        nfe_choices = list(cond)
        if nfe is not None:
            cond.append(Trial.nfe == nfe)
        if status is not None:
            cond.append(Trial.status == status)
        if fidelity is not None:
            cond.append(Trial.fidelity == fidelity)
            nfe_choices.append(Trial.fidelity == fidelity)
        total = s.scalar(select(func.count()).select_from(Trial).where(*cond))
        col = SORTABLE[sort]
        order = [col.desc().nulls_last() if descending else col.asc().nulls_last(), Trial.id]
        rows = s.execute(select(Trial.id, Study.name.label("study"), Study.method, Trial.number, Trial.nfe,
                                Trial.score, Trial.status, Trial.fidelity, Trial.bank, Trial.n_samples,
                                _name_of_schedule().label("schedule"), _origin().label("origin"),
                                _baseline_flag().label("baseline"), Trial.metrics, Trial.seconds, Trial.worker,
                                Trial.attempts, Trial.error, Trial.created, Trial.finished)
                         .join(Study, Study.id == Trial.study_id).where(*cond).order_by(*order)
                         .offset(max(0, int(offset))).limit(limit)).all()
        nfes = s.scalars(select(Trial.nfe).distinct().where(*nfe_choices).order_by(Trial.nfe)).all()
    items = [{**r._asdict(), "created": _iso(r.created), "finished": _iso(r.finished), "metrics": r.metrics or {},
              "schedule": r.schedule or ""} for r in rows]
    return {"total": total, "offset": offset, "limit": limit, "sort": sort, "descending": descending,
            "nfes": list(nfes), "items": items}


# ---- relaxation (SOR) studies ------------------------------------------------------------------------


def relaxation_studies(store: Storage) -> list[str]:
    with store._tx(write=False) as s:
        return list(s.scalars(select(Study.name).where(Study.id.in_(select(RelaxationRecord.study_id).distinct()))
                              .order_by(Study.id)))


def _same_sequence_as(other, me) -> bool:
    """Whether two relaxation studies solved the same systems the same way: the same stored problem, or
    (without one) setups that differ only in the policy."""
    if me.problem_id is not None or other.problem_id is not None:
        return other.problem_id == me.problem_id

    def setup(config):
        return {k: v for k, v in (config or {}).items() if k not in ("policy", VERDICT)}

    return setup(other.config) == setup(me.config)


def relaxation(store: Storage, study: str) -> dict:
    """The chosen omega per round and the cumulative iterations of this study, beside every other
    relaxation study of the same sequence (a fixed-omega run is a baseline; setups equal but for the
    policy, or the same stored problem) and any per-round baselines the records carry in
    ``context["baselines"]`` ({name: iterations})."""
    with store._tx(write=False) as s:
        own = study_id(s, study)
        me = s.execute(select(Study.method, Study.config, Study.problem_id).where(Study.id == own)).one()
        others = s.execute(select(Study.name, Study.method, Study.config, Study.problem_id).where(
            Study.id.in_(select(RelaxationRecord.study_id).distinct()), Study.id != own).order_by(Study.id)).all()
    peers = [o for o in others if _same_sequence_as(o, me)]
    rounds = store.relaxation_rounds(study)
    curves = [_cumulative(study, me.method, rounds)]
    for o in peers:
        curves.append(_cumulative(o.name, o.method, store.relaxation_rounds(o.name)))
    extra: dict[str, list] = defaultdict(list)
    for r in rounds:
        for name, its in ((r.context or {}).get("baselines") or {}).items():
            if isinstance(its, (int, float)) and not isinstance(its, bool):
                extra[str(name)].append((r.round, float(its)))
    for name, pts in extra.items():
        total, xs, ys = 0.0, [], []
        for rnd, its in pts:
            total += its
            xs.append(rnd)
            ys.append(total)
        curves.append({"name": name, "method": "baseline", "rounds": xs, "cumulative": ys})
    learner = ((me.config or {}).get("policy") or {}).get("learner") or me.method
    return {"study": study, "method": me.method,
            "rounds": [r.round for r in rounds], "omega": [r.omega for r in rounds], "arm": [r.arm for r in rounds],
            "iterations": [r.iterations for r in rounds], "cost": [r.cost for r in rounds],
            "converged": [r.converged for r in rounds], "curves": curves,
            "verdict": stored_or_own(me.config, learner, rounds)}


def _cumulative(name: str, method: str, rounds) -> dict:
    total, xs, ys = 0.0, [], []
    for r in rounds:
        its = r.iterations if r.iterations is not None else r.cost
        if its is None:
            continue
        total += its
        xs.append(r.round)
        ys.append(total)
    return {"name": name, "method": method, "rounds": xs, "cumulative": ys}
