"""Alembic environment for the steptune database (used by ``Storage.upgrade()`` and ``steptune db upgrade``).

``Storage.upgrade()`` hands over an open connection in ``config.attributes["connection"]``; the
``alembic`` command line works too, with ``-x url=...`` or ``sqlalchemy.url`` in its ini file.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from steptune.storage.schema import VERSION_TABLE, Base

# concurrent upgrades of one PostgreSQL database wait for each other on this advisory lock
_PG_LOCK = 0x5745_7054_554E  # arbitrary fixed key


def _run(connection) -> None:
    context.configure(connection=connection, target_metadata=Base.metadata, version_table=VERSION_TABLE,
                      render_as_batch=connection.dialect.name == "sqlite", compare_type=True)
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_LOCK})")
        context.run_migrations()


def run_migrations_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = context.get_x_argument(as_dictionary=True).get("url") or context.config.get_main_option("sqlalchemy.url")
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            _run(conn)
            conn.commit()
    finally:
        engine.dispose()


def run_migrations_offline() -> None:
    url = context.get_x_argument(as_dictionary=True).get("url") or context.config.get_main_option("sqlalchemy.url")
    context.configure(url=url, target_metadata=Base.metadata, version_table=VERSION_TABLE, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
