"""Read-only queries behind the dashboard and the reports: everything is aggregated in SQL, and every
value from a request reaches the database as a bound parameter.

Each function takes a ``Storage`` and returns JSON-ready dicts. Unknown studies, problems and trials
raise ``NotFound``.
"""

from __future__ import annotations

import math
from collections import defaultdict

from sqlalchemy import and_, func, select

from steptune.storage import Storage
from steptune.storage.schema import STATUSES, Problem, RelaxationRecord, Study, Trial

NO_PROBLEM = 0  # the problem id under which studies without a stored problem are listed
PRESET_METHOD = "preset"
SORTABLE = {"id": Trial.id, "number": Trial.number, "nfe": Trial.nfe, "score": Trial.score,
            "status": Trial.status, "seconds": Trial.seconds, "created": Trial.created, "fidelity": Trial.fidelity}
MAX_PAGE = 500


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
        studies = s.execute(select(Study.id, Study.name, Study.method, Study.metric, Study.problem_id, Study.created)
                            .order_by(Study.id)).all()
        counts: dict[int, dict[str, int]] = defaultdict(dict)
        for sid, status, n in s.execute(select(Trial.study_id, Trial.status, func.count())
                                        .group_by(Trial.study_id, Trial.status)):
            counts[sid][status] = n
        rounds = dict(s.execute(select(RelaxationRecord.study_id, func.count()).group_by(RelaxationRecord.study_id))
                      .all())
    by_problem: dict[int, list[dict]] = defaultdict(list)
    for st in studies:
        by_problem[st.problem_id or NO_PROBLEM].append({
            "name": st.name, "method": st.method, "metric": st.metric, "created": _iso(st.created),
            "trials": {k: counts[st.id].get(k, 0) for k in STATUSES}, "relaxation_rounds": rounds.get(st.id, 0)})
    out = []
    for p in probs:
        noise = (p.identity or {}).get("noise") or {}
        out.append({"id": p.id, "name": p.name, "noise": noise.get("kind"), "studies": by_problem.get(p.id, [])})
    if by_problem.get(NO_PROBLEM):
        out.append({"id": NO_PROBLEM, "name": "(no problem recorded)", "noise": None,
                    "studies": by_problem[NO_PROBLEM]})
    return out


def change_token(store: Storage) -> dict:
    """What changes whenever a trial or relaxation round is added or finishes (for live refresh)."""
    with store._tx(write=False) as s:
        n, last_id, last_finished = s.execute(select(func.count(), func.max(Trial.id), func.max(Trial.finished))).one()
        rounds, last_round = s.execute(select(func.count(), func.max(RelaxationRecord.id))).one()
        running = s.scalar(select(func.count()).where(Trial.status == "running"))
    return {"token": f"{n}-{last_id}-{_iso(last_finished)}-{rounds}-{last_round}-{running}", "trials": n,
            "running": running}


# ---- the NFE-quality front ---------------------------------------------------------------------------


def _problem_studies(s, problem: int):
    if problem != NO_PROBLEM and s.scalar(select(Problem.id).where(Problem.id == problem)) is None:
        raise NotFound(f"no problem with id {problem}")
    cond = Study.problem_id.is_(None) if problem == NO_PROBLEM else Study.problem_id == problem
    return s.execute(select(Study.id, Study.name, Study.method, Study.metric).where(cond).order_by(Study.id)).all()


def front(store: Storage, problem: int, fidelity: str | None = None) -> dict:
    """The NFE-quality front of every study of a problem: one series per (study, fidelity), and one per
    preset inside a study of method ``preset``, each holding the best complete trial at every NFE.

    Two grouped queries over the (study, status, nfe, score) index give the minima; one join back on
    the same index fetches the trial behind each minimum, so the cost follows the number of points
    shown, not of trials stored."""
    with store._tx(write=False) as s:
        studies = _problem_studies(s, problem)
        by_id = {st.id: st for st in studies}
        preset_ids = [st.id for st in studies if st.method == PRESET_METHOD]
        other_ids = [st.id for st in studies if st.method != PRESET_METHOD]
        points = _best_points(s, other_ids, fidelity, by_name=False) + _best_points(s, preset_ids, fidelity,
                                                                                     by_name=True)
    series: dict[tuple, dict] = {}
    for p in sorted(points, key=lambda p: (p["study_id"], p["series"], p["fidelity"], p["nfe"])):
        st = by_id[p["study_id"]]
        key = (st.id, p["series"], p["fidelity"])
        if key not in series:
            label = p["series"] if st.method == PRESET_METHOD else st.name
            if p["fidelity"]:
                label += f" ({p['fidelity']})"
            series[key] = {"name": label, "study": st.name, "method": st.method, "metric": st.metric,
                           "fidelity": p["fidelity"], "preset": p["series"] or None, "points": []}
        series[key]["points"].append({k: p[k] for k in ("nfe", "score", "trial", "number", "schedule", "count",
                                                       "metrics")})
    traces = list(series.values())
    for tr in traces:
        _mark_pareto(tr["points"])
    metrics = sorted({st.metric for st in studies})
    fronts = []
    for fid in sorted({tr["fidelity"] for tr in traces}):
        pts = [(p["nfe"], p["score"], tr["name"], p["trial"]) for tr in traces if tr["fidelity"] == fid
               for p in tr["points"]]
        fronts.append({"fidelity": fid, "points": [{"nfe": n, "score": sc, "series": name, "trial": t}
                                                   for n, sc, name, t in _pareto(pts)]})
    return {"problem": problem, "metric": metrics[0] if len(metrics) == 1 else "score", "fidelity": fidelity,
            "series": traces, "fronts": fronts}


def _best_points(s, study_ids: list[int], fidelity: str | None, by_name: bool) -> list[dict]:
    if not study_ids:
        return []
    cond = [Trial.study_id.in_(study_ids), Trial.status == "complete", Trial.score.is_not(None)]
    if fidelity is not None:
        cond.append(Trial.fidelity == fidelity)
    name = _name_of_schedule()
    keys = [Trial.study_id, Trial.fidelity, Trial.nfe] + ([name.label("series")] if by_name else [])
    groups = (select(*keys, func.min(Trial.score).label("best"), func.count().label("n"))
              .where(*cond).group_by(*keys).subquery())
    join = [Trial.study_id == groups.c.study_id, Trial.fidelity == groups.c.fidelity, Trial.nfe == groups.c.nfe,
            Trial.status == "complete", Trial.score == groups.c.best]
    if by_name:
        join.append(name == groups.c.series)
    rows = s.execute(select(Trial.id, Trial.study_id, Trial.fidelity, Trial.nfe, Trial.score, Trial.number,
                            Trial.metrics, name.label("schedule_name"), groups.c.n)
                     .join(groups, and_(*join)).order_by(Trial.id)).all()
    out: dict[tuple, dict] = {}
    for r in rows:  # ties on the minimum: the earliest trial
        series = (r.schedule_name or "") if by_name else ""
        key = (r.study_id, r.fidelity, r.nfe, series)
        if key not in out:
            out[key] = {"study_id": r.study_id, "fidelity": r.fidelity, "nfe": r.nfe, "score": r.score,
                        "trial": r.id, "number": r.number, "schedule": r.schedule_name or "", "count": r.n,
                        "metrics": r.metrics or {}, "series": series}
    return list(out.values())


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
    where the best improved, plus the last evaluation, so the answer stays small for long searches."""
    with store._tx(write=False) as s:
        sid = study_id(s, study)
        metric = s.scalar(select(Study.metric).where(Study.id == sid))
        rows = s.execute(select(Trial.number, Trial.nfe, Trial.fidelity, Trial.score, Trial.status)
                         .where(Trial.study_id == sid, Trial.status.in_(("complete", "failed")))
                         .order_by(Trial.number)).all()
    curves: dict[tuple, dict] = {}
    done: dict[str, int] = defaultdict(int)
    for r in rows:
        done[r.fidelity] += 1
        key = (r.fidelity, r.nfe)
        c = curves.setdefault(key, {"fidelity": r.fidelity, "nfe": r.nfe, "evaluations": [], "best": [],
                                    "trials": [], "n": 0, "_best": math.inf})
        c["n"] += 1
        if r.status == "complete" and r.score is not None and r.score < c["_best"]:
            c["_best"] = r.score
            c["evaluations"].append(done[r.fidelity])
            c["best"].append(r.score)
            c["trials"].append(r.number)
    for c in curves.values():
        if c["best"] and c["evaluations"][-1] != done[c["fidelity"]]:
            c["evaluations"].append(done[c["fidelity"]])
            c["best"].append(c["best"][-1])
            c["trials"].append(None)
        del c["_best"]
    ordered = sorted(curves.values(), key=lambda c: (c["fidelity"], c["nfe"]))
    return {"study": study, "metric": metric, "evaluations": dict(done), "curves": [c for c in ordered if c["best"]]}


# ---- the trial table ---------------------------------------------------------------------------------


def trials_page(store: Storage, *, study: str | None = None, problem: int | None = None, nfe: int | None = None,
                status: str | None = None, fidelity: str | None = None, sort: str = "number", descending: bool = False,
                offset: int = 0, limit: int = 50) -> dict:
    """One page of trials, filtered, sorted and counted in SQL."""
    limit = max(1, min(int(limit), MAX_PAGE))
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
                                _name_of_schedule().label("schedule"), Trial.metrics, Trial.seconds, Trial.worker,
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


def relaxation(store: Storage, study: str) -> dict:
    """The chosen omega per round and the cumulative iterations of this study, beside every other
    relaxation study of the same problem (fixed-omega baselines, other learners) and any per-round
    baselines the records carry in ``context["baselines"]`` ({name: iterations})."""
    with store._tx(write=False) as s:
        own = study_id(s, study)
    rounds = store.relaxation_rounds(study)
    st = store.get_study(study)
    with store._tx(write=False) as s:
        pid = s.scalar(select(Study.problem_id).where(Study.id == own))
        peers = s.scalars(select(Study.name).where(
            Study.id.in_(select(RelaxationRecord.study_id).distinct()), Study.id != own,
            Study.problem_id.is_(None) if pid is None else Study.problem_id == pid).order_by(Study.id)).all()
    curves = [_cumulative(study, st.method, rounds)]
    for name in peers:
        curves.append(_cumulative(name, store.get_study(name).method, store.relaxation_rounds(name)))
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
    return {"study": study, "method": st.method,
            "rounds": [r.round for r in rounds], "omega": [r.omega for r in rounds], "arm": [r.arm for r in rounds],
            "iterations": [r.iterations for r in rounds], "cost": [r.cost for r in rounds],
            "converged": [r.converged for r in rounds], "curves": curves}


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
