"""Studies say what made them in a ``kind`` column (search, sweep, relaxation, dc-fit, import, or "").

Existing studies get the kind steptune used to infer from their config and method: the config's own
``kind`` (relaxation, dc-fit); a job's ``identity`` in the config (search); method ``preset`` (sweep) or
``import`` (import); otherwise "" (made through the Python API).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_KIND_OF_METHOD = {"preset": "sweep", "import": "import"}


def inferred_kind(method: str | None, config: dict | None) -> str:
    """The kind of a study written before this revision, from its config and method."""
    config = config or {}
    if config.get("kind"):
        return str(config["kind"])
    if "identity" in config:
        return "search"
    return _KIND_OF_METHOD.get(method or "", "")


def upgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.add_column(sa.Column("kind", sa.String(length=32), nullable=False, server_default=""))
    json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
    studies = sa.table("studies", sa.column("id", sa.Integer()), sa.column("method", sa.String()),
                       sa.column("config", json), sa.column("kind", sa.String()))
    conn = op.get_bind()
    for sid, method, config in conn.execute(sa.select(studies.c.id, studies.c.method, studies.c.config)).all():
        kind = inferred_kind(method, config)
        if kind:
            conn.execute(sa.update(studies).where(studies.c.id == sid).values(kind=kind))


def downgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.drop_column("kind")
