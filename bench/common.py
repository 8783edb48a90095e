"""Shared helpers for the benchmark scripts: output folder and saving."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parents[1] / "runs" / "bench"


def machine() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or
            platform.machine(), "threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def save_json(name: str, payload: dict) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2, default=float) + "\n")
    return path


def bench_databases(name: str, pg_url: str | None):
    """Yield ("sqlite", url) for a fresh file runs/bench/NAME.db, then ("postgresql", url) for a fresh schema on
    the server at ``pg_url``, or a note that PostgreSQL is skipped. Both are removed once used."""
    import uuid

    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.db"
    def remove():
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)

    remove()
    try:
        yield "sqlite", f"sqlite:///{path}"
    finally:
        remove()
    if not pg_url:
        print("PostgreSQL: skipped (no --pg-url and no STEPTUNE_TEST_PG_URL)")
        return
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    admin = create_engine(pg_url)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    try:
        url = make_url(pg_url).update_query_dict({"options": f"-csearch_path={schema}"})
        yield "postgresql", url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


def pg_url_default() -> str | None:
    import os

    return os.environ.get("STEPTUNE_BENCH_PG_URL") or os.environ.get("STEPTUNE_TEST_PG_URL")
