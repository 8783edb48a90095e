"""A ``requests`` table: the tokens of writes a retrying caller may send twice, with what they returned.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
    op.create_table(
        "requests",
        sa.Column("token", sa.String(length=64), nullable=False),
        sa.Column("result", json, nullable=True),
        sa.Column("created", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("token", name="pk_requests"),
    )
    op.create_index("ix_requests_created", "requests", ["created"])


def downgrade() -> None:
    op.drop_index("ix_requests_created", table_name="requests")
    op.drop_table("requests")
