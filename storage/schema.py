"""The database schema (SQLAlchemy 2 ORM): problems, studies, trials, relaxation records and requests.

Schedules are stored as their versioned JSON form (``Schedule.to_dict()``). Every trial carries its
NFE and a ``score`` column, the study's primary metric (lower is better), so the best-per-NFE and
Pareto queries run on one composite index instead of reading JSON.

Timestamps are naive UTC. The Alembic migrations in ``migrations/`` create exactly this schema; a
change here needs a new revision there (``tests/test_storage_db.py`` checks that they agree).
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# JSONB on PostgreSQL (compact, indexable), JSON text elsewhere.
JsonType = JSON().with_variant(JSONB(), "postgresql")

# Alembic's revision table; named for steptune so a shared database can hold other Alembic schemas
VERSION_TABLE = "steptune_schema_version"

STATUSES = ("queued", "running", "complete", "failed", "pruned")
FINAL_STATUSES = ("complete", "failed", "pruned")
# what made a study: a job or `steptune search`, `sweep`, `relax`, `dc fit`, `import`; "" for one made through
# the Python API without saying
STUDY_KINDS = ("search", "sweep", "relaxation", "dc-fit", "import", "")


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


# predictable constraint names, so later migrations can alter them (SQLite batch mode needs names)
NAMING = {"ix": "ix_%(column_0_label)s", "uq": "uq_%(table_name)s_%(column_0_name)s",
          "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s", "pk": "pk_%(table_name)s"}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Problem(Base):
    """A model-and-data pair: its identity (``Problem.identity()`` of the evaluators) and the model's
    conventions (prediction type, time input, ...). ``fingerprint`` is the SHA-256 of the identity's
    canonical JSON, so the same problem is stored once."""

    __tablename__ = "problems"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), index=True)
    fingerprint: Mapped[str] = mapped_column(String(64), unique=True)
    identity: Mapped[dict] = mapped_column(JsonType)
    conventions: Mapped[dict] = mapped_column(JsonType)
    created: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    studies: Mapped[list[Study]] = relationship(back_populates="problem")


class Study(Base):
    """One search (or one import target): what made it (``kind``, one of ``STUDY_KINDS``), its method, seed
    and configuration. ``metric`` names the metric copied into ``Trial.score``; ``n_trials`` hands out trial
    numbers."""

    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    kind: Mapped[str] = mapped_column(String(32), default="", server_default="")
    method: Mapped[str] = mapped_column(String(100), default="")
    seed: Mapped[int | None] = mapped_column(Integer, nullable=True)
    config: Mapped[dict] = mapped_column(JsonType, default=dict)
    metric: Mapped[str] = mapped_column(String(100), default="rmse")
    problem_id: Mapped[int | None] = mapped_column(ForeignKey("problems.id"), nullable=True, index=True)
    n_trials: Mapped[int] = mapped_column(Integer, default=0)
    created: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    problem: Mapped[Problem | None] = relationship(back_populates="studies")


class Trial(Base):
    """One evaluation of one schedule at one fidelity.

    Life cycle: ``queued`` -> ``running`` (claimed by a worker, with a heartbeat) -> ``complete`` |
    ``failed`` | ``pruned``. A ``running`` trial whose heartbeat is older than the lease goes back to
    ``queued`` (``attempts`` counts the claims) or, after ``max_attempts``, to ``failed``.
    """

    __tablename__ = "trials"
    __table_args__ = (
        UniqueConstraint("study_id", "number", name="uq_trials_study_id_number"),
        # best(study, nfe), best per NFE and the Pareto front read only this index
        Index("ix_trials_study_status_nfe_score", "study_id", "status", "nfe", "score"),
        # the claim queue (oldest queued trial, of one study or of any) and the lease reaper
        Index("ix_trials_queue", "status", "study_id", "number"),
        Index("ix_trials_status_heartbeat", "status", "heartbeat"),
        Index("ix_trials_study_key", "study_id", "key"),
        # the dashboard's front: best per (study, fidelity, NFE) from the index alone
        Index("ix_trials_study_status_fidelity_nfe_score", "study_id", "status", "fidelity", "nfe", "score"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    schedule: Mapped[dict] = mapped_column(JsonType)
    key: Mapped[str] = mapped_column(String(64))
    nfe: Mapped[int] = mapped_column(Integer)
    fidelity: Mapped[str] = mapped_column(String(100), default="")
    bank: Mapped[str] = mapped_column(String(100), default="")
    n_samples: Mapped[int | None] = mapped_column(Integer, nullable=True)
    metrics: Mapped[dict] = mapped_column(JsonType, default=dict)
    score: Mapped[float | None] = mapped_column(Float, nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="queued")
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    started: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    finished: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    worker: Mapped[str | None] = mapped_column(String(200), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    heartbeat: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    # the searcher's bookkeeping: batch number, origin, its own parameters (rebuilds its state on resume)
    info: Mapped[dict] = mapped_column(JsonType, default=dict, server_default=text("'{}'"))


class RelaxationRecord(Base):
    """One round of a relaxation-parameter bandit (SOR over a sequence of linear systems): the arm
    played (its index and omega), the context it saw, and what it cost."""

    __tablename__ = "relaxation_records"
    __table_args__ = (Index("ix_relaxation_study_round", "study_id", "round"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"))
    round: Mapped[int] = mapped_column(Integer)
    arm: Mapped[int | None] = mapped_column(Integer, nullable=True)
    omega: Mapped[float] = mapped_column(Float)
    context: Mapped[dict] = mapped_column(JsonType, default=dict)
    cost: Mapped[float | None] = mapped_column(Float, nullable=True)
    iterations: Mapped[int | None] = mapped_column(Integer, nullable=True)
    converged: Mapped[bool | None] = mapped_column(nullable=True)
    created: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Request(Base):
    """A write that a retrying caller may send twice (its first commit's answer lost with the connection):
    the caller's token for it and what it returned, stored in the same transaction, so a second send
    returns that instead of doing it again."""

    __tablename__ = "requests"

    token: Mapped[str] = mapped_column(String(64), primary_key=True)
    result: Mapped[dict | list | None] = mapped_column(JsonType, nullable=True)
    created: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
