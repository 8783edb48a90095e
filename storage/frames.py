"""pandas views of the database, for the dashboard, reports and notebooks.

Each function takes a ``Storage`` or a database URL (opened read-only and closed again).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING

from sqlalchemy import func, select

from .db import Storage, connect, reporting_fidelity
from .schema import STATUSES, Problem, Study, Trial

if TYPE_CHECKING:
    import pandas as pd

_BASE_COLUMNS = ["study", "number", "id", "status", "nfe", "score", "fidelity", "bank", "n_samples", "worker",
                 "attempts", "max_attempts", "created", "started", "finished", "seconds", "error", "key"]


@contextmanager
def _open(db: Storage | str | None):
    if isinstance(db, Storage):
        yield db
        return
    store = connect(db, must_exist=True, create=False)
    try:
        yield store
    finally:
        store.close()


def _metric_columns(rows_metrics: list[dict], taken: set[str]) -> dict[str, list]:
    """Flatten the metrics dicts into columns (prefixed ``metric_`` where a name is already taken)."""
    names: list[str] = []
    for m in rows_metrics:
        for k in m:
            if k not in names:
                names.append(k)
    return {(f"metric_{k}" if k in taken else k): [m.get(k) for m in rows_metrics] for k in names}


def trials_frame(db: Storage | str | None, study: str | None = None, *, schedules: bool = False) -> pd.DataFrame:
    """One row per trial (of one study, or all): status, NFE, score, timings, worker, attempts, and one
    column per metric. ``schedules=True`` adds the schedule JSON (dict) and its name."""
    import pandas as pd

    with _open(db) as store, store._tx(write=False) as s:
        cols = [Study.name.label("study"), *(getattr(Trial, c) for c in _BASE_COLUMNS[1:]), Trial.metrics]
        if schedules:
            cols.append(Trial.schedule)
        q = select(*cols).join(Study, Study.id == Trial.study_id)
        if study is not None:
            q = q.where(Trial.study_id == store._study_row(s, study).id)
        rows = s.connection().execute(q.order_by(Trial.study_id, Trial.number)).all()
    data = {c: [r._mapping[c] for r in rows] for c in _BASE_COLUMNS}
    if schedules:
        data["name"] = [r.schedule.get("name", "") for r in rows]
        data["schedule"] = [r.schedule for r in rows]
    data.update(_metric_columns([r.metrics or {} for r in rows], set(data)))
    df = pd.DataFrame(data)
    for c in ("created", "started", "finished"):
        df[c] = pd.to_datetime(df[c])
    return df


def studies_frame(db: Storage | str | None) -> pd.DataFrame:
    """One row per study: kind, method, seed, metric, problem, trial counts per status, the best score and the
    NFEs that have complete trials (at the study's reporting fidelity, as ``Storage.best`` counts them)."""
    import pandas as pd

    with _open(db) as store, store._tx(write=False) as s:
        studies = s.execute(select(Study.id, Study.name, Study.kind, Study.method, Study.seed, Study.metric,
                                   Study.created, Study.config, Problem.name.label("problem"))
                            .outerjoin(Problem, Problem.id == Study.problem_id).order_by(Study.id)).all()
        counts = s.execute(select(Trial.study_id, Trial.status, func.count()).group_by(Trial.study_id, Trial.status))
        per: dict[int, dict[str, int]] = {}
        for sid, status, n in counts:
            per.setdefault(sid, {})[status] = n
        fidelity = {st.id: reporting_fidelity(st.config) for st in studies}
        best: dict[int, dict[int, float]] = {}
        for sid, fid, nfe, score in s.execute(
                select(Trial.study_id, Trial.fidelity, Trial.nfe, func.min(Trial.score))
                .where(Trial.status == "complete", Trial.score.is_not(None))
                .group_by(Trial.study_id, Trial.fidelity, Trial.nfe)):
            if fidelity.get(sid) in (None, fid):
                b = best.setdefault(sid, {})
                b[nfe] = min(score, b.get(nfe, score))
    rows = []
    for st in studies:
        c = per.get(st.id, {})
        b = best.get(st.id, {})
        rows.append({"study": st.name, "kind": st.kind, "method": st.method, "seed": st.seed, "metric": st.metric,
                     "problem": st.problem, "created": st.created, "trials": sum(c.values()),
                     **{status: c.get(status, 0) for status in STATUSES},
                     "best_score": min(b.values()) if b else None, "nfes": sorted(b)})
    columns = ["study", "kind", "method", "seed", "metric", "problem", "created", "trials", *STATUSES, "best_score",
               "nfes"]
    return pd.DataFrame(rows, columns=columns)


def best_frame(db: Storage | str | None, study: str, *, fidelity: str | None = None) -> pd.DataFrame:
    """The best complete trial at each NFE of a study (NFE order), with a ``pareto`` column marking the
    non-dominated ones on (NFE, score); best as ``Storage.best`` counts it (at ``fidelity``, by default the
    study's reporting fidelity: held-out for a search)."""
    import pandas as pd

    with _open(db) as store:
        best = store.best_per_nfe(study, fidelity=fidelity)
        front = {t.id for t in store.pareto(study, fidelity=fidelity)}
    data = {"nfe": [t.nfe for t in best], "score": [t.score for t in best], "id": [t.id for t in best],
            "number": [t.number for t in best], "name": [t.schedule.get("name", "") for t in best],
            "fidelity": [t.fidelity for t in best], "bank": [t.bank for t in best],
            "n_samples": [t.n_samples for t in best], "pareto": [t.id in front for t in best]}
    data.update(_metric_columns([t.metrics for t in best], set(data)))
    return pd.DataFrame(data)
