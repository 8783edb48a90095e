"""`steptune dashboard` (a local read-only web app over the database) and `steptune report` (one
self-contained HTML file). ``register(app)`` adds them to the main typer app."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated

import typer

from steptune.cli.console import err
from steptune.cli.errors import CliError
from steptune.cli.options import DEFAULT_CACHE, DEFAULT_DB, CacheOpt, DbOpt, DeviceOpt, StudyOpt
from steptune.cli.paths import file_stem, output_file
from steptune.cli.problems import pick_device

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def dashboard_cmd(
    db: DbOpt = DEFAULT_DB,
    host: Annotated[str, typer.Option("--host", help="Address to listen on; anything but loopback exposes the "
                                                     "database to the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 8750,
    poll: Annotated[float, typer.Option("--poll", help="Seconds between the page's checks for new trials.")] = 5.0,
    cache: CacheOpt = DEFAULT_CACHE,
    device: DeviceOpt = None,
):
    """Serve the dashboard (NFE-quality fronts, search efficiency, trials, schedules, exports) read-only at
    http://HOST:PORT; it opens no browser by itself."""
    import uvicorn

    from steptune.dashboard import create_app, open_read_only

    if not 0 < port < 65536:
        raise CliError(f"--port {port} is not a TCP port; use 1..65535")
    if poll <= 0:
        raise CliError("--poll must be a positive number of seconds")
    _check_listen(host, port)
    store = open_read_only(db)
    allowed = [host, *LOOPBACK_NAMES] if _is_loopback(host) else None
    app = create_app(store, allowed_hosts=allowed, poll_seconds=poll, cache_dir=cache, device=pick_device(device))
    shown = f"[{host}]" if ":" in host else host
    err.print(f"steptune dashboard on http://{shown}:{port}/ (read-only, database {db}); Ctrl-C stops it")
    if not _is_loopback(host):
        err.print("note: listening beyond loopback; anyone who can reach this address can read the database")
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        store.close()


def _check_listen(host: str, port: int) -> None:
    """Refuse, before the server starts and says where it is, an address that cannot be listened on."""
    import socket

    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
    except OSError as e:
        raise CliError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e}); choose another "
                       "address or port") from None


def report_cmd(
    study: StudyOpt,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="HTML file to write "
                                                "(default runs/reports/STUDY.html).")] = None,
    db: DbOpt = DEFAULT_DB,
    cache: CacheOpt = DEFAULT_CACHE,
    device: DeviceOpt = None,
):
    """Write one self-contained HTML report of a study's problem (fronts, efficiency, trials, schedules)."""
    from steptune.dashboard import open_read_only
    from steptune.dashboard.queries import NotFound
    from steptune.report import report_data, save_report

    output = output_file(output or Path("runs/reports") / f"{file_stem(study)}.html", "-o")
    store = open_read_only(db)
    try:
        store.get_study(study)
        data = report_data(store, study, cache, pick_device(device))
        path, kept, total = save_report(data, output), len(data["trials"]), data["trials_total"]
    except NotFound as e:
        raise CliError(str(e)) from None
    finally:
        store.close()
    err.print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, opens offline)")
    if kept < total:
        err.print(f"note: its trial table holds the best {kept:,} of the problem's {total:,} trials by score (the "
                  f"dashboard, steptune dashboard, shows every one)")


def register(app: typer.Typer) -> None:
    app.command("dashboard")(dashboard_cmd)
    app.command("report")(report_cmd)
