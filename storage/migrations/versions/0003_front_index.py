"""An index for the dashboard's NFE-quality front: best per (study, fidelity, NFE) without reading rows.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_trials_study_status_fidelity_nfe_score", "trials",
                    ["study_id", "status", "fidelity", "nfe", "score"])


def downgrade() -> None:
    op.drop_index("ix_trials_study_status_fidelity_nfe_score", table_name="trials")
