"""`steptune db upgrade` and `steptune db current`: the database schema; `steptune db delete`: a study."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from steptune.cli.console import err, out
from steptune.cli.options import DEFAULT_DB, DbOpt, JsonOpt

db_app = typer.Typer(help="Database maintenance.", no_args_is_help=True, add_completion=False)


@db_app.command("upgrade")
def db_upgrade_cmd(db: DbOpt = DEFAULT_DB,
                   revision: Annotated[str, typer.Option("--revision", help="Target schema revision.")] = "head"):
    """Create the schema or migrate it to the current revision (a no-op when up to date)."""
    from steptune.storage import Storage, resolve_url

    store = Storage(resolve_url(db))
    try:
        before = store.revision()
        after = store.upgrade(revision)
    finally:
        store.close()
    if before == after and revision not in ("head", after):
        err.print(f"database {db} is at schema revision {after}, which is past {revision}; 'db upgrade' does not "
                  "go back")
    elif before == after:
        err.print(f"database {db} is at schema revision {after} (up to date)")
    else:
        err.print(f"database {db}: schema revision {before or 'none'} -> {after}")


@db_app.command("current")
def db_current_cmd(db: DbOpt = DEFAULT_DB, json_: JsonOpt = False):
    """Print the database's schema revision and the one this steptune needs."""
    from sqlalchemy.engine import make_url

    from steptune.storage import Storage, resolve_url

    url = resolve_url(db, must_exist=True)
    store = Storage(url)
    try:
        revision, head = store.revision(), store.head
    finally:
        store.close()
    shown = make_url(url).render_as_string(hide_password=True)
    if json_:
        print(json.dumps({"database": shown, "revision": revision, "head": head}))
    elif revision == head:
        out.print(f"database {shown} is at schema revision {revision}, the one this steptune needs", highlight=False)
    else:
        out.print(f"database {shown} is at schema revision {revision or 'none'}; this steptune needs {head}: run "
                  f"'steptune db upgrade --db URL'", highlight=False)


@db_app.command("delete")
def db_delete_cmd(study: Annotated[str, typer.Option("--study", help="The study to delete.")],
                  yes: Annotated[bool, typer.Option("--yes", help="Delete it (without, only say what would go).")]
                  = False,
                  db: DbOpt = DEFAULT_DB):
    """Delete a study with all its trials (refused while a run holds it); --yes to do it."""
    from steptune.cli.errors import CliError
    from steptune.run_lease import LEASE_SECONDS, process_gone
    from steptune.storage import StorageError, connect

    try:
        store = connect(db, must_exist=True)
    except StorageError as e:
        raise CliError(f"--db: {e}") from None
    try:
        st = store.get_study(study)
        if not yes:
            held = _held(st.n_trials, len(store.relaxation_rounds(study)))
            raise CliError(f"study {study!r} ({st.method or st.kind or 'no method'}) holds {held}; add --yes to delete "
                           "it with them (nothing is deleted without it)")
        trials, rounds = store.delete_study(study, LEASE_SECONDS, gone=process_gone)
    except StorageError as e:
        raise CliError(str(e)) from None
    finally:
        store.close()
    err.print(f"deleted study {study!r} and its {_held(trials, rounds)} from {db or 'the database'}; files written "
              "from it (runs/search, runs/export, reports) are left as they are", highlight=False)


def _held(trials: int, rounds: int) -> str:
    said = [f"{n:,} {what}{'s' if n != 1 else ''}" for n, what in ((trials, "trial"), (rounds, "relaxation round"))
            if n or what == "trial"]
    return " and ".join(said)


def register(app: typer.Typer) -> None:
    app.add_typer(db_app, name="db")
