"""The Storage API: one object over SQLite (default, ``runs/steptune.db``) or PostgreSQL (a URL).

    db = connect()                                   # sqlite:///runs/steptune.db, schema created if new
    db = connect("postgresql+psycopg://user@host/steptune")
    study = db.create_study("digits-s3", method="s3", seed=0, problem=problem.identity())
    t = db.add_trial("digits-s3", schedule)          # queued; validated first, nothing written if invalid
    t = db.claim("digits-s3", worker="host:pid")     # running, attempts + 1, heartbeat now
    db.heartbeat(t.id, "host:pid")                   # False once the lease was lost
    with db.keep_alive(t.id, "host:pid") as lost:    # or heartbeat from a background thread
    db.finish(t.id, metrics={"rmse": 0.12}, worker="host:pid")
    db.reap_stale(lease_seconds=120)                 # dead workers' trials: re-queued, or failed after max_attempts
    db.best("digits-s3", nfe=5); db.pareto("digits-s3"); db.trials("digits-s3")
    db.update_study_config("digits-s3", {"note": "x"})  # merged into the study's config

Every write is one transaction: it happens completely or not at all. On SQLite, writers take the
database's write lock at the start of their transaction (``BEGIN IMMEDIATE``), in WAL mode with a
busy timeout, so several local processes can write at once without "database is locked" errors;
readers never block writers. On PostgreSQL, claims use ``FOR UPDATE SKIP LOCKED``.

Scores are "lower is better" (the study's ``metric``, ``rmse`` by default). "Best" counts scores at the
study's reporting fidelity (held-out for a search, where its winners are confirmed) unless told otherwise.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import time
import unicodedata
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, bindparam, create_engine, delete, event, func, insert, inspect, null, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import (
    ArgumentError,
    DatabaseError,
    DBAPIError,
    IntegrityError,
    NoSuchModuleError,
    OperationalError,
)
from sqlalchemy.orm import Session

from steptune.space import Schedule, ScheduleError

from .schema import (
    FINAL_STATUSES,
    STATUSES,
    STUDY_KINDS,
    VERSION_TABLE,
    Base,
    Problem,
    RelaxationRecord,
    Request,
    Study,
    Trial,
    utcnow,
)

DEFAULT_URL = "sqlite:///runs/steptune.db"
MAX_NAME = 200  # characters of a study's name (the column's width)
MIGRATIONS = Path(__file__).resolve().parent / "migrations"


class StorageError(ValueError):
    """A storage request that cannot be done (unknown study, bad URL, old schema); one sentence."""


class LeaseLost(StorageError):
    """The trial is no longer running under this worker (its lease expired and it was reaped)."""


class DatabaseUnavailable(StorageError):
    """The database did not answer for the whole retry time."""


class DriverBusy(StorageError):
    """Another live driver runs the study: ``driver`` ("host:pid"), whose heartbeat is ``age`` seconds old."""

    def __init__(self, study: str, driver: str, age: float):
        host, _, pid = driver.partition(":")
        super().__init__(f"study {study!r} is being run by another driver (host {host}, process {pid}, heartbeat "
                         f"{age:.0f} s ago); wait for it to finish or stop it first")
        self.driver, self.age = driver, age


class DriverLost(StorageError):
    """The study's driver is no longer ``driver``: another run took the study over (this one was paused past its
    lease); the write was refused, and this run should write nothing more."""

    def __init__(self, study: str, driver: str, holder: str | None):
        now = f"run {holder} holds it now" if holder else "no run holds it now"
        super().__init__(f"study {study!r} was taken over by another run while this one ({driver}) was paused past its "
                         f"lease ({now}); this run stops without writing more: its evaluations in flight are done "
                         "again by the run that took over, or by the next run of the job")
        self.study, self.driver, self.holder = study, driver, holder


# ---- records returned by the API (plain, detached from any session) ------------------------------


@dataclass(frozen=True)
class StudyRecord:
    id: int
    name: str
    method: str
    seed: int | None
    config: dict
    metric: str
    n_trials: int
    created: datetime
    problem: dict | None = None  # {"name", "identity", "conventions"}
    # what made the study: "search" (a job or `steptune search`), "sweep", "relaxation", "dc-fit", "import", or
    # "" (the Python API, unless told)
    kind: str = ""

    @property
    def made_by(self) -> str:
        """What made the study, as a user ran it: ``steptune relax`` for a relaxation study (for messages)."""
        return _MADE_BY.get(self.kind, f"a {self.kind} run") if self.kind else "the Python API"

    @property
    def reporting_fidelity(self) -> str | None:
        """The fidelity whose scores the study reports ("heldout" for a search, whose winners are confirmed
        on the held-out bank); None when every fidelity counts."""
        return reporting_fidelity(self.config)


_MADE_BY = {"search": "a search", "sweep": "steptune sweep", "relaxation": "steptune relax",
            "dc-fit": "steptune dc fit", "import": "steptune import"}


@dataclass(frozen=True)
class TrialRecord:
    id: int
    study: str
    number: int
    schedule: dict
    key: str
    nfe: int
    fidelity: str
    bank: str
    n_samples: int | None
    metrics: dict
    score: float | None
    status: str
    error: str | None
    created: datetime
    started: datetime | None
    finished: datetime | None
    seconds: float | None
    worker: str | None
    attempts: int
    max_attempts: int
    heartbeat: datetime | None
    info: dict

    def to_schedule(self) -> Schedule:
        return Schedule.from_dict(self.schedule, where=f"study {self.study!r} trial {self.number}")


@dataclass(frozen=True)
class ReapResult:
    requeued: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class RelaxationRound:
    id: int
    study: str
    round: int
    arm: int | None
    omega: float
    context: dict
    cost: float | None
    iterations: int | None
    converged: bool | None
    created: datetime


_TRIAL_COLUMNS = [c for c in Trial.__table__.columns if c.name != "study_id"]
_TRIAL_NAMES = [c.name for c in _TRIAL_COLUMNS]
# the same columns with the schedule left unread (None): for reading a big study's outcomes, where decoding every
# schedule is most of the time and memory
_TRIAL_COLUMNS_UNSCHEDULED = [null().label("schedule") if c.name == "schedule" else c for c in _TRIAL_COLUMNS]
_TRIAL_FIELDS = frozenset({"status", "metrics", "score", "fidelity", "bank", "n_samples", "worker", "error", "seconds",
                           "max_attempts", "info"})  # what an added trial may set
# what a trial's later writes (start, finish, re-queue, heartbeat) change; the rest is fixed when it is added
_CHANGING_NAMES = ("id", "status", "metrics", "score", "error", "started", "finished", "seconds", "worker", "attempts",
                   "heartbeat")

# The statements a search's driver sends with every batch, built once: building a statement and working out its
# cache key costs SQLAlchemy more than running it on a few rows.
_T, _S, _R = Trial.__table__, Study.__table__, Request.__table__
_REPLAYED = select(_R.c.result).where(_R.c.token == bindparam("token"))
_REMEMBER = insert(_R)
_STUDY_METRIC = select(_S.c.id, _S.c.metric).where(_S.c.name == bindparam("name"))
# the study's driver, its row shared-locked until the write that asked commits (a claim waits for it)
_DRIVER_OF = (select(_S.c.config[("driver", "id")].as_string()).where(_S.c.name == bindparam("name"))
              .with_for_update(read=True))
_COUNT_ADDED = (update(_S).where(_S.c.id == bindparam("study")).values(n_trials=_S.c.n_trials + bindparam("added"))
                .returning(_S.c.n_trials))
_INSERT_TRIALS = insert(_T)
_IDS_FROM = (select(_T.c.id).where(_T.c.study_id == bindparam("study"), _T.c.number >= bindparam("first"))
             .order_by(_T.c.number))
_TO_START = (select(_T.c.id, _T.c.status, _S.c.metric).join(_S, _S.c.id == _T.c.study_id)
             .where(_T.c.id.in_(bindparam("ids", expanding=True))).with_for_update(of=_T))
_START = update(_T).where(_T.c.id == bindparam("tid")).values(
    status="running", worker=bindparam("w"), started=bindparam("at"), heartbeat=bindparam("at"),
    attempts=_T.c.attempts + 1)
_TO_FINISH = (select(_T.c.id, _T.c.status, _T.c.worker, _T.c.started, _S.c.metric).join(_S, _S.c.id == _T.c.study_id)
              .where(_T.c.id.in_(bindparam("ids", expanding=True))).with_for_update(of=_T))
# what finishing a trial writes, from the values _finished_row makes (and "fin", when it finished)
_FINISH_VALUES = {"status": bindparam("st"), "metrics": bindparam("m"), "score": bindparam("sc"),
                  "error": bindparam("e"), "finished": bindparam("fin"), "seconds": bindparam("sec"), "heartbeat": None}
_FINISH = update(_T).where(_T.c.id == bindparam("tid")).values(**_FINISH_VALUES)
_START_AND_FINISH = update(_T).where(_T.c.id == bindparam("tid")).values(
    **_FINISH_VALUES, worker=bindparam("w"), started=bindparam("at"), attempts=_T.c.attempts + 1)
_REFRESH = select(*(_T.c[name] for name in _CHANGING_NAMES)).where(_T.c.id.in_(bindparam("ids", expanding=True)))


def _trial_record(row, study_name: str) -> TrialRecord:
    """From a row whose first columns are _TRIAL_COLUMNS (in order)."""
    return TrialRecord(study=study_name, **dict(zip(_TRIAL_NAMES, row)))


# ---- helpers -------------------------------------------------------------------------------------


def _canonical(d: Any) -> str:
    return json.dumps(d, sort_keys=True, separators=(",", ":"), allow_nan=False)


_JSON_SCALARS = frozenset({int, float, str, bool, type(None)})  # what JSON holds as it is (finite floats)


def _clean_metrics(metrics: Mapping | None, where: str = "metrics") -> dict:
    """JSON-safe metrics: non-finite floats become None (JSON has no NaN; PostgreSQL refuses it),
    numpy/torch scalars become numbers; anything else JSON cannot hold is an error."""
    if metrics is not None and not isinstance(metrics, Mapping):
        raise StorageError(f"{where}: metrics must be a mapping of names to values")
    out = {}
    for k, v in (metrics or {}).items():
        if type(v) in _JSON_SCALARS and (type(v) is not float or math.isfinite(v)):
            out[str(k)] = v
            continue
        if hasattr(v, "item") and callable(v.item) and getattr(v, "ndim", 0) == 0:  # numpy / torch scalars
            v = v.item()
        if isinstance(v, float) and not math.isfinite(v):
            v = None
        try:
            json.dumps(v, allow_nan=False)
        except (TypeError, ValueError):
            raise StorageError(f"{where}: metric {k!r} is a {type(v).__name__}, which JSON cannot store") from None
        out[str(k)] = v
    return out


def _score(score: float | None, metrics: dict, metric: str) -> float | None:
    if score is None:
        score = metrics.get(metric)
    if score is None or isinstance(score, bool) or not isinstance(score, (int, float)):
        return None
    score = float(score)
    return score if math.isfinite(score) else None


def _unshared(value: dict) -> dict:
    """Metrics :func:`_clean_metrics` made, as decoding their JSON text gives them: themselves where every value is a
    scalar JSON holds as it is, else decoded from their text."""
    if all(type(v) in _JSON_SCALARS for v in value.values()):
        return value
    return json.loads(json.dumps(value))


def _json_info(info: Mapping | None, i: int) -> dict:
    if info is None:
        return {}
    if not isinstance(info, Mapping):
        raise StorageError(f"trial {i}: info must be a mapping")
    try:
        return json.loads(json.dumps(dict(info), allow_nan=False))
    except (TypeError, ValueError) as e:
        raise StorageError(f"trial {i}: info cannot be stored as JSON ({e})") from None


def reporting_fidelity(config: Mapping | None) -> str | None:
    """The fidelity a study with this config reports its scores at (its ``fidelity`` entry), or None."""
    return (config or {}).get("fidelity") or None


def _not_held(st: Study, lease_seconds: float, gone: Callable[[str], bool], now: datetime,
              but: str | None = None) -> None:
    """DriverBusy while a driver other than ``but`` holds the study: one whose heartbeat is at most ``lease_seconds``
    old and that ``gone`` does not know to be dead."""
    held = (st.config or {}).get("driver") or {}
    if held.get("id") not in (None, but):
        age = (now - datetime.fromisoformat(held["heartbeat"])).total_seconds()
        if age <= lease_seconds and not gone(held["id"]):
            raise DriverBusy(st.name, held["id"], age)


def _check_name(name) -> None:
    """A study's name: one line of at most ``MAX_NAME`` characters (it is printed in tables and typed again)."""
    if not isinstance(name, str) or not name.strip():
        raise StorageError("a study needs a name that is not empty or blank")
    if len(name) > MAX_NAME:
        raise StorageError(f"study name {name[:40]!r}... is {len(name)} characters long; use at most {MAX_NAME}")
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") for ch in name):
        raise StorageError(f"study name {name!r} holds a line break, a control character or an invisible format "
                           "character (such as a change of writing direction); give it on one line of visible text")


def _check_kind(kind: str) -> None:
    if kind not in STUDY_KINDS:
        raise StorageError(f"study kind {kind!r} is unknown; use one of {', '.join(k for k in STUDY_KINDS if k)} "
                           "(or leave it empty)")


class _Encoded(str):
    """A value's JSON text, written already (a schedule's, by :meth:`Schedule.json_text_and_key`): stored as it is."""


def _json_text(value) -> str:
    """The JSON columns' serializer: ``json.dumps``, except for text :class:`_Encoded` holds."""
    return value if type(value) is _Encoded else json.dumps(value)


def _validated(schedule: Schedule | Mapping | str, where: str) -> tuple[_Encoded, int, str]:
    """The schedule's JSON text, NFE and key, validated; raises ScheduleError (nothing is written)."""
    if isinstance(schedule, str):
        sched = Schedule.from_json(schedule, where=where)
    elif isinstance(schedule, Schedule):
        sched = schedule
    elif isinstance(schedule, Mapping):
        sched = Schedule.from_dict(dict(schedule), where=where)
    else:
        raise ScheduleError(f"{where}: expected a Schedule, a schedule dict or its JSON, got {type(schedule).__name__}")
    try:
        sched.validate()
    except ScheduleError as e:
        raise ScheduleError(f"{where}: {e}") from None
    text, key = sched.json_text_and_key()
    return _Encoded(text), sched.nfe, key


def _sqlite_path(url) -> Path | None:
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    if url.database.startswith("file:"):
        return None
    return Path(url.database)


def sqlite_file(url: str | None) -> Path | None:
    """The file a SQLite URL names (None for other databases and in-memory ones)."""
    try:
        return _sqlite_path(make_url(url or os.environ.get("STEPTUNE_DB") or DEFAULT_URL))
    except ArgumentError:
        return None


# ---- connecting ----------------------------------------------------------------------------------


def resolve_url(url: str | None, must_exist: bool = False) -> str:
    """The URL to open (default ``$STEPTUNE_DB`` or ``sqlite:///runs/steptune.db``), checked; a SQLite
    file's folder is created unless ``must_exist`` (then a missing file is an error)."""
    url = url or os.environ.get("STEPTUNE_DB") or DEFAULT_URL
    try:
        u = make_url(url)
    except ArgumentError:
        raise StorageError(f"database URL {url!r} is not a SQLAlchemy URL; use e.g. sqlite:///runs/steptune.db "
                           "or postgresql+psycopg://user@host/db") from None
    if u.get_backend_name() == "sqlite" and (":memory:" in (u.database or ":memory:") or "mode=memory" in url):
        raise StorageError(f"database URL {url!r} is an in-memory SQLite database, which is gone when the command "
                           "ends (and not shared between its connections); name a file, e.g. sqlite:///runs/steptune.db")
    path = _sqlite_path(u)
    if path is not None and not path.exists():
        if must_exist:
            raise StorageError(f"no database at {path}; run a search first, or name the database that holds your "
                                   "studies (--db URL on the command line, db= in Python, or $STEPTUNE_DB)")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(f"cannot make the folder {path.parent} for the database {url!r} ({e.strerror or e}); "
                               "run where you can write, or name a database in a writable place (--db URL on the "
                               "command line, db= in Python, or $STEPTUNE_DB)") from None
    elif path is not None and must_exist and path.is_file() and path.stat().st_size == 0:  # left as it is: not opened
        raise StorageError(f"{path} is empty, not a steptune database; run a search first, or name the database that "
                           "holds your studies (--db URL on the command line, db= in Python, or $STEPTUNE_DB)")
    return url


def connect(url: str | None = None, *, create: bool | None = None, must_exist: bool = False) -> Storage:
    """Open the database at ``url`` (default ``sqlite:///runs/steptune.db``, or ``$STEPTUNE_DB``).

    A new, empty database gets the current schema when ``create`` is true (the default unless
    ``must_exist``). A database at an older schema revision is refused with the command that upgrades
    it (``steptune db upgrade``). ``must_exist`` refuses a SQLite file that does not exist yet and, unless
    ``create`` is given, a database without steptune's schema (for read-only commands).
    """
    db = Storage(resolve_url(url, must_exist))
    try:
        db.check_schema(create=not must_exist if create is None else create)
    except BaseException:
        db.close()
        raise
    return db


class Storage:
    """Studies and trials in one SQL database. See the module docstring for the life cycle."""

    def __init__(self, url: str):
        self.url = url
        u = make_url(url)
        self.dialect = u.get_backend_name()
        shown = u.render_as_string(hide_password=True)
        if self.dialect not in ("sqlite", "postgresql"):
            raise StorageError(f"database URL {shown!r} names a {self.dialect} database; steptune stores in SQLite or "
                               "PostgreSQL: use sqlite:///path/to.db or postgresql+psycopg://user@host/db")
        try:
            if self.dialect == "sqlite":
                self.engine = create_engine(u, connect_args={"timeout": 60}, json_serializer=_json_text)
                _sqlite_setup(self.engine)
            else:
                self.engine = create_engine(u, pool_pre_ping=True, json_serializer=_json_text)
        except ModuleNotFoundError as e:
            raise StorageError(f"database URL {shown!r} needs the Python package {e.name!r}; pip install it") from None
        except NoSuchModuleError:
            raise StorageError(f"database URL {shown!r} names an unknown database driver {u.drivername!r}; use "
                               "sqlite:/// or postgresql+psycopg://") from None
        self._write_engine = self.engine.execution_options(steptune_write=True)

    # -- lifecycle --

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Storage:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def shown(self) -> str:
        """The URL as messages name it: its password hidden."""
        return make_url(self.url).render_as_string(hide_password=True)

    def __repr__(self) -> str:
        return f"Storage({self.shown!r})"

    @contextmanager
    def _tx(self, write: bool = True) -> Iterator[Session]:
        try:
            with Session(self._write_engine if write else self.engine, expire_on_commit=False) as s, s.begin():
                yield s
        except (OperationalError, IntegrityError) as e:
            hint = ("; the file, or the folder that holds it (SQLite writes its journal beside it), cannot be "
                    "written: make both writable, or copy the database where they are" if _read_only(e) else "")
            raise StorageError(f"database {self.shown!r} refused the change: "
                               f"{str(e.orig).strip().splitlines()[0]}{hint}") from e

    # -- writes a retrying caller may send twice --

    @staticmethod
    def _replayed(s: Session, request: str | None):
        """What the write with token ``request`` returned if it was already done; _FIRST otherwise."""
        if request is None:
            return _FIRST
        row = s.connection().execute(_REPLAYED, {"token": request}).first()
        return _FIRST if row is None else row.result

    @staticmethod
    def _remember(s: Session, request: str | None, result=None) -> None:
        if request is not None:
            s.connection().execute(_REMEMBER, {"token": request, "result": result, "created": utcnow()})

    def forget_requests(self, older_than: timedelta) -> int:
        """Drop the tokens of writes older than ``older_than`` (no caller retries them any more); how many."""
        with self._tx() as s:
            return s.execute(delete(Request).where(Request.created < utcnow() - older_than)).rowcount

    # -- schema --

    def _alembic_config(self, connection=None):
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        cfg.set_main_option("sqlalchemy.url", self.url.replace("%", "%%"))
        if connection is not None:
            cfg.attributes["connection"] = connection
        return cfg

    @property
    def head(self) -> str:
        from alembic.script import ScriptDirectory

        return ScriptDirectory.from_config(self._alembic_config()).get_current_head()

    def revision(self) -> str | None:
        """The schema revision the database is at (None for an empty database)."""
        from alembic.runtime.migration import MigrationContext

        try:
            with self.engine.connect() as conn:
                return MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_revision()
        except DatabaseError as e:  # unreachable server, refused login, or a file that is not a database
            shown = make_url(self.url).render_as_string(hide_password=True)
            said = str(e.orig).strip().splitlines()[0]
            fix = ("start the server, or fix the URL (--db or $STEPTUNE_DB)" if self.dialect != "sqlite" else
                   "check that the file can be read and its folder exists and can be written (SQLite keeps its "
                   "journal beside the file)" if "unable to open" in said else
                   "check that the file is a steptune database")
            raise StorageError(f"cannot open the database {shown} ({said}); {fix}") from None

    def upgrade(self, revision: str = "head") -> str:
        """Apply the Alembic migrations up to ``revision``; a no-op at head. Returns the new revision."""
        from alembic import command
        from alembic.script import ScriptDirectory

        known = [r.revision for r in ScriptDirectory.from_config(self._alembic_config()).walk_revisions()]
        if revision != "head" and revision not in known:
            raise StorageError(f"unknown schema revision {revision!r}; the revisions are {', '.join(sorted(known))} "
                               "(or head)")

        try:
            with self._write_engine.begin() as conn:
                command.upgrade(self._alembic_config(conn), revision)
        except DatabaseError as e:
            raise StorageError(f"cannot upgrade database {self.shown!r}: "
                               f"{str(e.orig).strip().splitlines()[0]}") from None
        return self.revision()

    def check_schema(self, create: bool = True) -> None:
        from alembic.script import ScriptDirectory

        current = self.revision()
        script = ScriptDirectory.from_config(self._alembic_config())
        head = script.get_current_head()
        if current == head:
            return
        if current is None:
            with self.engine.connect() as conn:
                tables = set(inspect(conn).get_table_names())
            clash = sorted(tables & set(Base.metadata.tables))
            if clash and self.revision() != head:  # (at head now: another process made it since this one looked)
                raise StorageError(f"database {self.shown!r} already has tables named {', '.join(clash)} that "
                                   "steptune's migrations did not make (another tool's database?); use another "
                                   "database")
            if clash:
                return
            if not create:
                raise StorageError(f"database {self.shown!r} has no steptune schema; run 'steptune db upgrade "
                                   "--db URL'")
            try:
                self.upgrade()
            except StorageError:
                if self.revision() != head:  # not another process that made the schema first
                    raise
            return
        known = {r.revision for r in script.walk_revisions()}
        if current not in known:
            raise StorageError(f"database {self.shown!r} is at schema revision {current!r}, newer than this "
                               f"steptune knows (head {head!r}); upgrade steptune")
        raise StorageError(f"database {self.shown!r} is at schema revision {current!r} but this steptune needs "
                           f"{head!r}; run 'steptune db upgrade --db URL'")

    # -- problems and studies --

    def _problem_id(self, s: Session, identity: Mapping, conventions: Mapping | None) -> int:
        identity = dict(identity)
        fp = hashlib.sha256(_canonical(identity).encode()).hexdigest()
        pid = s.scalar(select(Problem.id).where(Problem.fingerprint == fp))
        if pid is None:
            conv = dict(conventions if conventions is not None else identity.get("model") or {})
            p = Problem(name=str(identity.get("name", "")), fingerprint=fp, identity=identity, conventions=conv)
            s.add(p)
            s.flush()
            pid = p.id
        return pid

    def _study_row(self, s: Session, name: str, *, lock: bool = False) -> Study:
        q = select(Study).where(Study.name == name)
        st = s.scalar(q.with_for_update() if lock else q)
        if st is None:
            raise StorageError(f"no study named {name!r}{_study_hint(s, name)}")
        return st

    @staticmethod
    def _study_record(st: Study) -> StudyRecord:
        prob = None
        if st.problem is not None:
            prob = {"name": st.problem.name, "identity": st.problem.identity, "conventions": st.problem.conventions}
        return StudyRecord(st.id, st.name, st.method, st.seed, st.config, st.metric, st.n_trials, st.created, prob,
                           st.kind)

    def create_study(self, name: str, *, method: str = "", seed: int | None = None, config: Mapping | None = None,
                     problem: Mapping | None = None, conventions: Mapping | None = None, metric: str = "rmse",
                     kind: str = "", exist_ok: bool = False) -> StudyRecord:
        """A new study. ``problem`` is the problem's identity dict (e.g. ``Problem.identity()``), stored
        once per distinct identity; ``conventions`` default to its ``model`` entry; ``kind`` says what made
        it (one of ``STUDY_KINDS``). With ``exist_ok``, an existing study of that name is returned instead
        (resuming)."""
        with self._tx() as s:
            existing = s.scalar(select(Study).where(Study.name == name))
            if existing is not None:
                if exist_ok:
                    return self._study_record(existing)
                raise StorageError(f"a study named {name!r} already exists; pick another name or resume it")
            self._insert_study(s, name, method, seed, config, problem, conventions, metric, kind)
        return self.get_study(name)

    def _insert_study(self, s: Session, name, method="", seed=None, config=None, problem=None, conventions=None,
                      metric="rmse", kind="") -> Study:
        _check_name(name)
        _check_kind(kind)
        pid = self._problem_id(s, problem, conventions) if problem is not None else None
        st = Study(name=name, kind=kind, method=method, seed=seed, config=json.loads(_canonical(dict(config or {}))),
                   metric=metric, problem_id=pid, n_trials=0)
        s.add(st)
        try:
            s.flush()
        except IntegrityError:
            raise StorageError(f"a study named {name!r} already exists; pick another name or resume it") from None
        return st

    def update_study_config(self, name: str, changes: Mapping, *, problem: Mapping | None = None,
                            fence: tuple[str, str] | None = None) -> StudyRecord:
        """Merge ``changes`` into the study's config (top-level keys; a value of None removes its key)
        in one transaction, the study's row locked meanwhile; returns the updated study. ``problem``: a new problem
        identity for a study that has no trials yet. ``fence``: as in :meth:`add_trials`."""
        with self._tx() as s:
            st = self._study_row(s, name, lock=True)
            self._fenced(s.connection(), fence)
            if problem is not None:
                if st.n_trials:
                    raise StorageError(f"study {name!r} has trials scored on its problem; it cannot change problem")
                st.problem_id = self._problem_id(s, problem, None)
            config = {k: v for k, v in {**(st.config or {}), **dict(changes)}.items() if v is not None}
            try:
                st.config = json.loads(_canonical(config))
            except (TypeError, ValueError) as e:
                raise StorageError(f"study {name!r}: the config must be finite JSON ({e})") from None
            s.flush()
            return self._study_record(st)

    # -- the study's one live driver: a lease in its config, {"id": "host:pid", "heartbeat": ISO time} --

    def claim_driver(self, study: str, driver: str, lease_seconds: float, *,
                     gone: Callable[[str], bool] = lambda driver: False, now: datetime | None = None) -> None:
        """Make ``driver`` the study's driver. Raises DriverBusy while another driver holds it: one whose
        heartbeat is at most ``lease_seconds`` old and that ``gone`` does not know to be dead."""
        now = now or utcnow()
        with self._tx() as s:
            st = self._study_row(s, study, lock=True)
            _not_held(st, lease_seconds, gone, now, but=driver)
            st.config = {**(st.config or {}), "driver": {"id": driver, "heartbeat": now.isoformat()}}

    def beat_driver(self, study: str, driver: str, *, now: datetime | None = None, phase: str | None = None,
                    busy: int | None = None) -> bool:
        """Renew the driver's lease, with the ``phase`` its run is in where given (else the one it gave last) and how
        many of its evaluators are ``busy`` where given; False once another driver took the study over."""
        with self._tx() as s:
            st = self._study_row(s, study, lock=True)
            held = (st.config or {}).get("driver") or {}
            if held.get("id") != driver:
                return False
            phase = phase or held.get("phase")
            st.config = {**st.config, "driver": {"id": driver, "heartbeat": (now or utcnow()).isoformat(),
                                                 **({"phase": phase} if phase else {}),
                                                 **({"busy": busy} if busy is not None else {})}}
            return True

    def release_driver(self, study: str, driver: str) -> None:
        """The driver stops: the study is free to run at once."""
        with self._tx() as s:
            st = self._study_row(s, study, lock=True)
            if ((st.config or {}).get("driver") or {}).get("id") == driver:
                st.config = {k: v for k, v in st.config.items() if k != "driver"}

    def delete_study(self, study: str, lease_seconds: float, *, gone: Callable[[str], bool] = lambda driver: False,
                     now: datetime | None = None) -> tuple[int, int]:
        """Delete ``study`` with its trials and relaxation rounds, in one transaction; how many of each it held.
        Refused (DriverBusy) while a driver holds it: one whose heartbeat is at most ``lease_seconds`` old and that
        ``gone`` does not know to be dead. Its problem stays for the studies that share it."""
        with self._tx() as s:
            st = self._study_row(s, study, lock=True)
            _not_held(st, lease_seconds, gone, now or utcnow())
            trials, rounds = (s.execute(delete(table).where(table.study_id == st.id)).rowcount
                              for table in (Trial, RelaxationRecord))  # as the foreign keys' cascade would, anywhere
            s.delete(st)
            return trials, rounds

    def drop_unused_study(self, study: str, driver: str) -> bool:
        """Delete ``study`` if ``driver`` holds it and it holds nothing (no trial, no relaxation round): a run that
        made it and failed before writing anything leaves no empty study behind. True when it was deleted."""
        with self._tx() as s:
            st = self._study_row(s, study, lock=True)
            if ((st.config or {}).get("driver") or {}).get("id") != driver or st.n_trials:
                return False
            for table in (Trial, RelaxationRecord):
                if s.scalar(select(func.count()).select_from(table).where(table.study_id == st.id)):
                    return False
            s.delete(st)
            return True

    def get_study(self, name: str) -> StudyRecord:
        with self._tx(write=False) as s:
            return self._study_record(self._study_row(s, name))

    def studies(self) -> list[StudyRecord]:
        with self._tx(write=False) as s:
            return [self._study_record(st) for st in s.scalars(select(Study).order_by(Study.id))]

    def status_counts(self, study: str | None = None) -> dict[str, dict[str, int]]:
        """{study name: {status: count}} (one study or all)."""
        q = select(Study.name, Trial.status, func.count()).join(Trial, Trial.study_id == Study.id)
        if study is not None:
            q = q.where(Study.name == study)
        out: dict[str, dict[str, int]] = {}
        with self._tx(write=False) as s:
            if study is not None:
                self._study_row(s, study)
            for name, status, n in s.execute(q.group_by(Study.name, Trial.status)):
                out.setdefault(name, {})[status] = n
        return out

    # -- trials: adding --

    def add_trial(self, study: str, schedule: Schedule | Mapping | str, **fields) -> TrialRecord:
        """Add one trial (default ``queued``). Fields: ``status``, ``metrics``, ``score``, ``fidelity``,
        ``bank``, ``n_samples``, ``worker``, ``error``, ``seconds``, ``max_attempts``, ``info``. The schedule is
        validated first; an invalid one raises ScheduleError and nothing is written."""
        return self.add_trials(study, [{"schedule": schedule, **fields}], records=True)[0]

    def add_trials(self, study: str, items: Iterable[Mapping], *, create: Mapping | None = None,
                   request: str | None = None, records: bool = False,
                   fence: tuple[str, str] | None = None) -> list[int] | list[TrialRecord]:
        """Add many trials in one transaction (all or nothing); returns their ids in order (their records with
        ``records=True``: what reading them back would give, without the read).

        Each item is a mapping with ``schedule`` and the fields of ``add_trial``. With ``create`` (the
        keyword arguments of ``create_study``), a missing study is created in the same transaction.
        A second call with the same ``request`` token adds nothing and returns the first call's ids (or, with
        ``records``, those trials as they are now). With ``fence`` (study, driver), nothing is added unless that driver
        holds that study (DriverLost).
        """
        rows, now = [], utcnow()
        memo: dict[str, tuple[dict, str]] = {}
        for i, item in enumerate(items):
            item = dict(item)
            if "schedule" not in item:
                raise StorageError(f"trial {i}: no 'schedule' given")
            sched = item.pop("schedule")
            where = f"trial {i}" if not isinstance(sched, Schedule) else f"trial {i} ({sched.name or 'schedule'})"
            mkey = sched if isinstance(sched, str) else None
            if mkey is None and isinstance(sched, Mapping):
                try:
                    mkey = _canonical(sched)
                except (TypeError, ValueError):
                    mkey = None
            if mkey is not None and mkey in memo:
                text, nfe, key = memo[mkey]
            else:
                text, nfe, key = _validated(sched, where)
                if mkey is not None:
                    memo[mkey] = (text, nfe, key)
            rows.append(self._trial_fields(i, text, nfe, key, item, now))
        if not rows:
            return []
        with self._tx() as s:
            done = self._replayed(s, request)
            if done is not _FIRST:
                ids = list(done)
            else:
                c = s.connection()
                self._fenced(c, fence)
                st = c.execute(_STUDY_METRIC, {"name": study}).first()
                if st is None:
                    if create is None:
                        self._study_row(s, study)  # raises the "no study" error
                    st = self._insert_study(s, study, **dict(create))
                end = c.execute(_COUNT_ADDED, {"study": st.id, "added": len(rows)}).scalar_one()
                first = end - len(rows)
                for j, r in enumerate(rows):
                    r["study_id"] = st.id
                    r["number"] = first + j
                    r["score"] = _score(r.pop("_score"), r["metrics"], st.metric)
                c.execute(_INSERT_TRIALS, rows)
                ids = c.execute(_IDS_FROM, {"study": st.id, "first": first}).scalars().all()
                self._remember(s, request, list(ids))
        if self.dialect == "postgresql" and len(rows) >= 5000 and done is _FIRST:
            # fresh statistics after a bulk load, so the planner keeps using the indexes
            with self.engine.begin() as conn:
                conn.exec_driver_sql("ANALYZE trials")
        if not records:
            return list(ids)
        if done is not _FIRST:
            return self._records(list(ids))
        # JSON columns as reading them back gives them, sharing nothing with the caller: the schedule's text decoded,
        # info as _json_info decoded it, the metrics _clean_metrics copied (decoded where a value is not a scalar)
        return [_trial_record([tid if name == "id" else json.loads(r[name]) if name == "schedule"
                               else _unshared(r[name]) if name == "metrics" else r[name] for name in _TRIAL_NAMES],
                              study) for tid, r in zip(ids, rows)]

    @staticmethod
    def _trial_fields(i: int, schedule: _Encoded, nfe: int, key: str, item: dict, now: datetime) -> dict:
        known = _TRIAL_FIELDS
        unknown = item.keys() - known
        if unknown:
            raise StorageError(f"trial {i}: unknown field {sorted(unknown)[0]!r}; use {', '.join(sorted(known))}")
        status = item.get("status", "queued")
        if status not in STATUSES or status == "running":
            raise StorageError(f"trial {i}: status {status!r} cannot be added; use queued, complete, failed or "
                               "pruned (running trials come from claim())")
        max_attempts = int(item.get("max_attempts", 3))
        if max_attempts < 1:
            raise StorageError(f"trial {i}: max_attempts must be at least 1")
        return {"schedule": schedule, "key": key, "nfe": nfe, "fidelity": str(item.get("fidelity") or ""),
                "bank": str(item.get("bank") or ""), "n_samples": item.get("n_samples"),
                "metrics": _clean_metrics(item.get("metrics"), f"trial {i}"), "_score": item.get("score"),
                "status": status,
                "error": item.get("error"), "created": now, "started": None,
                "finished": now if status in FINAL_STATUSES else None, "seconds": item.get("seconds"),
                "worker": item.get("worker"), "attempts": 0 if status == "queued" else 1,
                "max_attempts": max_attempts, "heartbeat": None, "info": _json_info(item.get("info"), i)}

    # -- trials: leases --

    def claim(self, study: str | None, worker: str, *, now: datetime | None = None) -> TrialRecord | None:
        """Take the oldest queued trial (of ``study``, or of any study): it becomes ``running`` under
        ``worker`` with a fresh heartbeat, and its attempt count goes up by one. None if none is queued."""
        now = now or utcnow()
        with self._tx() as s:
            q = select(Trial.id, Trial.study_id).where(Trial.status == "queued")
            if study is not None:
                q = q.where(Trial.study_id == self._study_row(s, study).id)
            q = q.order_by(Trial.study_id, Trial.number).limit(1).with_for_update(skip_locked=True)
            row = s.execute(q).first()
            if row is None:
                return None
            s.execute(update(Trial).where(Trial.id == row.id)
                      .values(status="running", worker=worker, started=now, heartbeat=now,
                              attempts=Trial.attempts + 1))
        return self.trial(row.id)

    def start(self, trial_id: int, worker: str, *, now: datetime | None = None,
              request: str | None = None) -> TrialRecord:
        """Start a given queued trial under ``worker`` (a driver that dispatches trials itself, instead of
        workers claiming them): it becomes ``running`` and its attempt count goes up by one. A second call
        with the same ``request`` token changes nothing."""
        return self.start_many([(trial_id, worker)], now=now, request=request)[0]

    def start_many(self, starts: Iterable[tuple], *, now: datetime | None = None, request: str | None = None,
                   records: bool = True) -> list[TrialRecord] | None:
        """``start`` for many (trial id, worker) pairs, or (trial id, worker, when started), in one transaction
        (all or none); their records in order (None with ``records=False``: one read less)."""
        starts = list(starts)
        self.record(starts, (), now=now, request=request)
        return self._records([st[0] for st in starts]) if records else None

    def record(self, starts: Iterable[tuple] = (), outcomes: Iterable[Mapping] = (), *,
               now: datetime | None = None, request: str | None = None, fence: tuple[str, str] | None = None) -> None:
        """``start_many``'s starts, then ``finish_many``'s outcomes (a trial may be in both), in one transaction
        (all or none): what a driver dispatched and got back since its last write. A trial in both is written once,
        as the start and the finish would leave it. ``fence``: as in :meth:`add_trials`."""
        starts, outcomes, now = [tuple(s) for s in starts], _final_outcomes(outcomes), now or utcnow()
        with self._tx() as s:
            if self._replayed(s, request) is not _FIRST:
                return
            c = s.connection()
            self._fenced(c, fence)
            self._remember(s, request)
            if starts:
                ids = [st[0] for st in starts]
                found = {r.id: r for r in c.execute(_TO_START, {"ids": ids})}
                for tid in ids:
                    if tid not in found or found[tid].status != "queued":
                        raise StorageError(f"trial {tid} cannot start: it is "
                                           f"{found[tid].status if tid in found else 'missing'}, not queued")
                finishing = {o["trial_id"]: o for o in outcomes}
                together = [] if len(finishing) < len(outcomes) or len(set(ids)) < len(ids) else [
                    st for st in starts if st[0] in finishing]  # started and finished here: one update each
                both = {st[0] for st in together}
                if len(together) < len(starts):
                    c.execute(_START, [{"tid": st[0], "w": st[1], "at": st[2] if len(st) > 2 else now}
                                       for st in starts if st[0] not in both])
                if together:
                    values = []
                    for st in together:
                        o, started = finishing[st[0]], st[2] if len(st) > 2 else now
                        at = o.pop("finished", None) or now
                        row = _Started(st[0], "running", st[1], started, found[st[0]].metric)
                        values.append({**_finished_row(row, at, **o), "fin": at, "w": st[1], "at": started})
                    c.execute(_START_AND_FINISH, values)
                    outcomes = [o for o in outcomes if o["trial_id"] not in both]
            if outcomes:
                rows = {r.id: r for r in c.execute(_TO_FINISH, {"ids": [o["trial_id"] for o in outcomes]})}
                values = []
                for o in outcomes:
                    at = o.pop("finished", None) or now
                    values.append({**_finished_row(rows.get(o["trial_id"]), at, **o), "fin": at})
                c.execute(_FINISH, values)

    @staticmethod
    def _fenced(c, fence: tuple[str, str] | None) -> None:
        """DriverLost unless ``fence``'s driver holds its study (nothing to check without one)."""
        if fence is not None:
            holder = c.execute(_DRIVER_OF, {"name": fence[0]}).scalar()
            if holder != fence[1]:
                raise DriverLost(*fence, holder)

    def _records(self, ids: list[int]) -> list[TrialRecord]:
        with self._tx(write=False) as s:
            rows = {r.id: _trial_record(r, r.study_name)
                    for r in s.execute(self._trial_query(s, None).where(Trial.id.in_(ids)))}
        missing = [i for i in ids if i not in rows]
        if missing:
            raise StorageError(f"no trial with id {missing[0]}")
        return [rows[i] for i in ids]

    def requeue(self, trial_id: int, reason: str, *, now: datetime | None = None,
                request: str | None = None, began: bool = True) -> TrialRecord:
        """A running trial whose worker was lost: back to ``queued`` with ``reason`` noted in its error text
        if it has attempts left, otherwise ``failed`` with the reason. With ``began=False`` (it was still
        waiting behind another on its worker) the attempt is given back and it is always re-queued. A second
        call with the same ``request`` token changes nothing."""
        now = now or utcnow()
        with self._tx() as s:
            if self._replayed(s, request) is not _FIRST:
                return self.trial(trial_id)
            self._remember(s, request)
            t = s.scalar(select(Trial).where(Trial.id == trial_id).with_for_update())
            if t is None or t.status != "running":
                raise LeaseLost(f"trial {trial_id} is not running; it cannot be re-queued")
            note = f"attempt {t.attempts} of {t.max_attempts}: {reason}"
            if not began:
                t.attempts, note = t.attempts - 1, f"not started: {reason}"
            if t.attempts < t.max_attempts or not began:
                t.status, t.error = "queued", f"re-queued: {note}"
            else:
                t.status, t.finished, t.error = "failed", now, f"failed: {note}; no attempts left"
            t.worker, t.heartbeat, t.started = None, None, None
        return self.trial(trial_id)

    def heartbeat(self, trial_id: int, worker: str, *, now: datetime | None = None) -> bool:
        """Renew the lease; False if the trial is no longer running under ``worker`` (stop working on it)."""
        with self._tx() as s:
            res = s.execute(update(Trial).where(Trial.id == trial_id, Trial.status == "running",
                                                Trial.worker == worker).values(heartbeat=now or utcnow()))
            return res.rowcount == 1

    @contextmanager
    def keep_alive(self, trial_id: int, worker: str, interval: float = 30.0) -> Iterator[threading.Event]:
        """Heartbeat the trial every ``interval`` seconds from a background thread while the block runs.
        Yields an Event that is set if the lease is lost (the worker should then stop and not finish)."""
        stop, lost = threading.Event(), threading.Event()

        def beat():
            while not stop.wait(interval):
                try:
                    alive = self.heartbeat(trial_id, worker)
                except StorageError:  # a transient database error: try again next interval
                    continue
                if not alive:
                    lost.set()
                    return

        thread = threading.Thread(target=beat, name=f"steptune-heartbeat-{trial_id}", daemon=True)
        thread.start()
        try:
            yield lost
        finally:
            stop.set()
            thread.join()

    def finish(self, trial_id: int, *, status: str = "complete", metrics: Mapping | None = None,
               score: float | None = None, error: str | None = None, seconds: float | None = None,
               worker: str | None = None, now: datetime | None = None, request: str | None = None) -> TrialRecord:
        """Record the outcome of a running trial: ``complete`` (with metrics), ``failed`` (with an
        error text) or ``pruned``. Raises LeaseLost if the trial is not running (under ``worker``).
        A second call with the same ``request`` token changes nothing."""
        outcome = {"trial_id": trial_id, "status": status, "metrics": metrics, "score": score, "error": error,
                   "seconds": seconds, "worker": worker}
        return self.finish_many([outcome], now=now, request=request)[0]

    def finish_many(self, outcomes: Iterable[Mapping], *, now: datetime | None = None,
                    request: str | None = None, records: bool = True) -> list[TrialRecord] | None:
        """``finish`` for many trials in one transaction (all or none): each outcome a mapping with
        ``trial_id``, ``finish``'s keywords and optionally ``finished`` (when it finished, default now); their
        records in order (None with ``records=False``: one read less)."""
        outcomes = list(outcomes)
        self.record((), outcomes, now=now, request=request)
        ids = [o["trial_id"] for o in outcomes]
        return self._records(ids) if records else None

    def reap_stale(self, lease_seconds: float, *, study: str | None = None,
                   now: datetime | None = None) -> ReapResult:
        """Trials left ``running`` whose last heartbeat is older than ``lease_seconds`` (their worker
        died or hung): re-queued if they have attempts left, otherwise failed with an error text."""
        now = now or utcnow()
        cutoff = now - timedelta(seconds=float(lease_seconds))
        requeued, failed = [], []
        with self._tx() as s:
            q = select(Trial).where(Trial.status == "running", func.coalesce(Trial.heartbeat, Trial.started) < cutoff)
            if study is not None:
                q = q.where(Trial.study_id == self._study_row(s, study).id)
            for t in s.scalars(q.order_by(Trial.id).with_for_update(skip_locked=True)):
                last = t.heartbeat or t.started
                why = (f"worker {t.worker!r} sent no heartbeat for {(now - last).total_seconds():.0f} s "
                       f"(lease {lease_seconds:g} s) on attempt {t.attempts} of {t.max_attempts}")
                if t.attempts < t.max_attempts:
                    t.status, t.error = "queued", f"re-queued: {why}"
                    requeued.append(t.id)
                else:
                    t.status, t.finished = "failed", now
                    t.error = f"failed: {why}; no attempts left"
                    failed.append(t.id)
                t.worker, t.heartbeat, t.started = None, None, None
        return ReapResult(requeued, failed)

    # -- trials: reading --

    def _trial_query(self, s: Session, study: str | None, schedules: bool = True):
        columns = _TRIAL_COLUMNS if schedules else _TRIAL_COLUMNS_UNSCHEDULED
        q = select(*columns, Study.name.label("study_name")).join(Study, Study.id == Trial.study_id)
        if study is not None:
            q = q.where(Trial.study_id == self._study_row(s, study).id)
        return q

    def trial(self, trial_id: int) -> TrialRecord:
        return self._records([trial_id])[0]

    def trials(self, study: str, *, status: str | Iterable[str] | None = None, nfe: int | None = None,
               key: str | None = None, ids: Iterable[int] | None = None,
               schedules: bool = True) -> list[TrialRecord]:
        """A study's trials in number order (for rebuilding a searcher's state on resume); ``ids`` keeps those.
        ``schedules=False`` leaves each record's ``schedule`` None (its ``key`` is there): a reading of outcomes only,
        several times faster and smaller on a big study."""
        with self._tx(write=False) as s:
            q = self._trial_query(s, study, schedules)
            if status is not None:
                q = q.where(Trial.status.in_([status] if isinstance(status, str) else list(status)))
            if nfe is not None:
                q = q.where(Trial.nfe == nfe)
            if key is not None:
                q = q.where(Trial.key == key)
            if ids is not None:
                q = q.where(Trial.id.in_(list(ids)))
            return [_trial_record(r, study) for r in s.connection().execute(q.order_by(Trial.number))]

    def refresh(self, records: Iterable[TrialRecord]) -> list[TrialRecord]:
        """The trials ``records`` hold as they are now, reading only what changes once a trial is added (its
        status, outcome, lease and attempts): what ``trials(study, ids=...)`` gives for them, without decoding
        their schedules and info again."""
        records = list(records)
        with self._tx(write=False) as s:
            rows = {r.id: r._asdict() for r in s.connection().execute(_REFRESH, {"ids": [r.id for r in records]})}
        missing = [r.id for r in records if r.id not in rows]
        if missing:
            raise StorageError(f"no trial with id {missing[0]}")
        return [replace(r, **rows[r.id]) for r in records]

    def count_trials(self, study: str | None = None) -> int:
        with self._tx(write=False) as s:
            q = select(func.count()).select_from(Trial)
            if study is not None:
                q = q.where(Trial.study_id == self._study_row(s, study).id)
            return s.scalar(q)

    def _scored(self, s: Session, study: str, fidelity: str | None):
        """Complete, scored trials of ``study`` at ``fidelity``, by default the study's reporting fidelity."""
        st = self._study_row(s, study)
        fidelity = fidelity or reporting_fidelity(st.config)
        cond = [Trial.study_id == st.id, Trial.status == "complete", Trial.score.is_not(None)]
        if fidelity is not None:
            cond.append(Trial.fidelity == fidelity)
        return cond

    def best(self, study: str, nfe: int, *, fidelity: str | None = None) -> TrialRecord | None:
        """The complete trial with the lowest score at this NFE (earliest on ties), or None.

        "Best" is one rule everywhere (``best_per_nfe``, ``pareto``, ``best_frame``, ``steptune best``): scores
        count at ``fidelity``, by default the study's reporting fidelity, so a search's best is its held-out
        (confirmed) trial, never a cheaper train-bank score; a study without one compares every fidelity."""
        with self._tx(write=False) as s:
            cond = self._scored(s, study, fidelity)
            row = s.execute(self._trial_query(s, None).where(*cond, Trial.nfe == nfe)
                            .order_by(Trial.score, Trial.id).limit(1)).first()
            return None if row is None else _trial_record(row, study)

    def _best_rows(self, s: Session, study: str, fidelity: str | None, keep) -> list[TrialRecord]:
        """The best trial at each NFE (filtered by ``keep`` on (nfe, score) pairs in NFE order).

        A skip scan over the (study, status, nfe, score) index: one probe for the next NFE and one for its
        best trial, so the cost grows with the number of distinct NFEs, not of trials."""
        cond = self._scored(s, study, fidelity)
        best, prev = [], None
        while True:
            q = select(func.min(Trial.nfe)).where(*cond)
            nfe = s.scalar(q if prev is None else q.where(Trial.nfe > prev))
            if nfe is None:
                break
            row = s.execute(self._trial_query(s, None).where(*cond, Trial.nfe == nfe)
                            .order_by(Trial.score, Trial.id).limit(1)).first()
            best.append(row)
            prev = nfe
        rows = {(r.nfe, r.score): r for r in best}
        return [_trial_record(rows[k], study) for k in keep([(r.nfe, r.score) for r in best])]

    def best_per_nfe(self, study: str, *, fidelity: str | None = None) -> list[TrialRecord]:
        """The best complete trial at every NFE the study has, in NFE order (best as in ``best``)."""
        with self._tx(write=False) as s:
            return self._best_rows(s, study, fidelity, lambda mins: mins)

    def pareto(self, study: str, *, fidelity: str | None = None) -> list[TrialRecord]:
        """The non-dominated complete trials on (NFE, score), both minimised, in NFE order: each has a
        strictly lower score than every trial with fewer NFE (one trial per point, earliest on ties; scores at
        the fidelity ``best`` uses)."""

        def front(mins):
            kept, best = [], math.inf
            for nfe, score in mins:
                if score < best:
                    kept.append((nfe, score))
                    best = score
            return kept

        with self._tx(write=False) as s:
            return self._best_rows(s, study, fidelity, front)

    # -- relaxation (SOR bandit) records --

    def add_relaxation(self, study: str, round: int, omega: float, *, arm: int | None = None,
                       context: Mapping | None = None, cost: float | None = None, iterations: int | None = None,
                       converged: bool | None = None) -> int:
        """Record one bandit round: the arm (index, omega) played, its context and what it cost."""
        with self._tx() as s:
            sid = self._study_row(s, study).id
            r = RelaxationRecord(study_id=sid, round=int(round), arm=arm, omega=float(omega),
                                 context=json.loads(_canonical(dict(context or {}))), cost=cost,
                                 iterations=iterations, converged=converged)
            s.add(r)
            s.flush()
            return r.id

    def relaxation_rounds(self, study: str) -> list[RelaxationRound]:
        with self._tx(write=False) as s:
            sid = self._study_row(s, study).id
            rows = s.scalars(select(RelaxationRecord).where(RelaxationRecord.study_id == sid)
                             .order_by(RelaxationRecord.round, RelaxationRecord.id))
            return [RelaxationRound(r.id, study, r.round, r.arm, r.omega, r.context, r.cost, r.iterations,
                                    r.converged, r.created) for r in rows]


def _unreachable(e: BaseException) -> bool:
    """True for an error that a reachable database would not have given: a lost or refused connection
    (a restart, a failover, a server that is down) or a locked SQLite file, not a refused change."""
    cause = e.__cause__ if isinstance(e, StorageError) else e
    if not isinstance(cause, DBAPIError) or _read_only(cause):
        return False
    return cause.connection_invalidated or isinstance(cause, OperationalError)


def _read_only(e: DBAPIError) -> bool:
    """SQLite refusing to write a file that cannot be written (its file or folder read-only): an answer, not an
    outage, so nothing is gained by waiting for it."""
    return "readonly database" in str(e.orig)


def _final_outcomes(outcomes: Iterable[Mapping]) -> list[dict]:
    outcomes = [dict(o) for o in outcomes]
    for o in outcomes:
        if o.get("status", "complete") not in FINAL_STATUSES:
            raise StorageError(f"finish: status {o['status']!r} is not final; use complete, failed or pruned")
    return outcomes



@dataclass(frozen=True)
class _Started:
    """A trial as its start in the same write leaves it: what finishing it reads."""

    id: int
    status: str
    worker: str
    started: datetime
    metric: str


def _finished_row(row, now: datetime, trial_id: int, status: str = "complete", metrics=None,
                  score: float | None = None, error: str | None = None, seconds: float | None = None,
                  worker: str | None = None) -> dict:
    """The new values of a running trial that finished (``row``: its status, worker, start and study metric);
    LeaseLost if it is not running under ``worker``."""
    if row is None:
        raise StorageError(f"no trial with id {trial_id}")
    if row.status != "running" or (worker is not None and row.worker != worker):
        who = f" under worker {worker!r}" if worker is not None else ""
        raise LeaseLost(f"trial {trial_id} is not running{who} (it is {row.status}"
                        f"{', worker ' + repr(row.worker) if row.worker else ''}); its lease was lost")
    metrics = _clean_metrics(metrics)
    if seconds is None and row.started is not None:
        seconds = (now - row.started).total_seconds()
    return {"tid": trial_id, "st": status, "m": metrics, "sc": _score(score, metrics, row.metric), "e": error,
            "sec": seconds}


_FIRST = object()  # a write's token not seen before

# the writes that take a ``request`` token, so that sending one twice does it once
REPLAYABLE = frozenset({"add_trials", "start", "start_many", "finish", "finish_many", "record", "requeue"})


class Retrying:
    """``storage`` whose calls are retried, with backoff, while the database is unreachable, for up to
    ``seconds`` from the first failure; then DatabaseUnavailable. ``say`` hears of each outage once. A write
    whose commit's answer was lost with the connection is sent again with the same request token, so it is
    done once (``REPLAYABLE``; the others do the same thing when done twice)."""

    def __init__(self, storage: Storage, seconds: float, say: Callable[[str], None] = lambda msg: None):
        self.storage, self.seconds, self.say = storage, float(seconds), say

    def __getattr__(self, name: str):
        attr = getattr(self.storage, name)
        if name.startswith("_") or not callable(attr):
            return attr
        if name in REPLAYABLE:
            return lambda *args, **kwargs: self.call(attr, *args, request=uuid.uuid4().hex, **kwargs)
        return lambda *args, **kwargs: self.call(attr, *args, **kwargs)

    def call(self, fn: Callable, *args, **kwargs):
        first, delay = None, 0.25
        while True:
            try:
                return fn(*args, **kwargs)
            except (StorageError, DBAPIError) as e:
                if not _unreachable(e):
                    raise
                cause = e.__cause__ if isinstance(e, StorageError) else e
                reason = str(getattr(cause, "orig", cause)).strip().splitlines()[0]
                now, url = time.monotonic(), make_url(self.storage.url).render_as_string(hide_password=True)
                if first is None:
                    first = now
                    self.say(f"database {url} unreachable ({reason}); retrying for up to {self.seconds:g} s")
                waited = now - first
                if waited >= self.seconds:
                    raise DatabaseUnavailable(f"database {url} did not answer for {waited:.0f} s ({reason})") from None
                time.sleep(min(delay, self.seconds - waited))
                delay = min(2 * delay, 10.0)


def _sqlite_setup(engine: Engine) -> None:
    """WAL, a busy timeout, foreign keys; and BEGIN IMMEDIATE for writing transactions, so a writer
    waits for the lock up front instead of failing when it upgrades a read lock."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None  # SQLAlchemy emits BEGIN itself (below)
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA busy_timeout = 60000")
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA synchronous = NORMAL")
        cur.execute("PRAGMA foreign_keys = ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("steptune_write") else "BEGIN")


def _study_hint(s: Session, name: str, shown: int = 6) -> str:
    """What a session asking for a study that does not exist is told: the closest names and how many there are."""
    import difflib

    known = s.scalars(select(Study.name).order_by(Study.name)).all()
    if not known:
        return " (the database has no studies)"
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    listed = close + [k for k in known if k not in close][:max(0, shown - len(close))]
    more = f" and {len(known) - len(listed)} more" if len(known) > len(listed) else ""
    mean = f"; did you mean {close[0]!r}?" if close else ""
    if len(known) == 1:
        return f" (the only study is {known[0]!r})"
    return f" ({len(known)} studies: {', '.join(listed)}{more}{mean}; 'steptune studies' lists them all)"
