"""Initial schema: problems, studies, trials, relaxation records.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _json():
    return sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "problems",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("identity", _json(), nullable=False),
        sa.Column("conventions", _json(), nullable=False),
        sa.Column("created", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_problems"),
        sa.UniqueConstraint("fingerprint", name="uq_problems_fingerprint"),
    )
    op.create_index("ix_problems_name", "problems", ["name"])
    op.create_table(
        "studies",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("method", sa.String(length=100), nullable=False),
        sa.Column("seed", sa.Integer(), nullable=True),
        sa.Column("config", _json(), nullable=False),
        sa.Column("metric", sa.String(length=100), nullable=False),
        sa.Column("problem_id", sa.Integer(), nullable=True),
        sa.Column("n_trials", sa.Integer(), nullable=False),
        sa.Column("created", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["problem_id"], ["problems.id"], name="fk_studies_problem_id_problems"),
        sa.PrimaryKeyConstraint("id", name="pk_studies"),
        sa.UniqueConstraint("name", name="uq_studies_name"),
    )
    op.create_index("ix_studies_problem_id", "studies", ["problem_id"])
    op.create_table(
        "trials",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("schedule", _json(), nullable=False),
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("nfe", sa.Integer(), nullable=False),
        sa.Column("fidelity", sa.String(length=100), nullable=False),
        sa.Column("bank", sa.String(length=100), nullable=False),
        sa.Column("n_samples", sa.Integer(), nullable=True),
        sa.Column("metrics", _json(), nullable=False),
        sa.Column("score", sa.Float(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created", sa.DateTime(), nullable=False),
        sa.Column("started", sa.DateTime(), nullable=True),
        sa.Column("finished", sa.DateTime(), nullable=True),
        sa.Column("seconds", sa.Float(), nullable=True),
        sa.Column("worker", sa.String(length=200), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("heartbeat", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(["study_id"], ["studies.id"], name="fk_trials_study_id_studies", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_trials"),
        sa.UniqueConstraint("study_id", "number", name="uq_trials_study_id_number"),
    )
    op.create_index("ix_trials_study_status_nfe_score", "trials", ["study_id", "status", "nfe", "score"])
    op.create_index("ix_trials_queue", "trials", ["status", "study_id", "number"])
    op.create_index("ix_trials_status_heartbeat", "trials", ["status", "heartbeat"])
    op.create_index("ix_trials_study_key", "trials", ["study_id", "key"])
    op.create_table(
        "relaxation_records",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("arm", sa.Integer(), nullable=True),
        sa.Column("omega", sa.Float(), nullable=False),
        sa.Column("context", _json(), nullable=False),
        sa.Column("cost", sa.Float(), nullable=True),
        sa.Column("iterations", sa.Integer(), nullable=True),
        sa.Column("converged", sa.Boolean(), nullable=True),
        sa.Column("created", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["study_id"], ["studies.id"], name="fk_relaxation_records_study_id_studies",
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_relaxation_records"),
    )
    op.create_index("ix_relaxation_study_round", "relaxation_records", ["study_id", "round"])


def downgrade() -> None:
    op.drop_table("relaxation_records")
    op.drop_table("trials")
    op.drop_table("studies")
    op.drop_table("problems")
