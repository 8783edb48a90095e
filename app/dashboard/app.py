"""The dashboard web app (FastAPI): JSON endpoints over the database plus one page and its static files.

The app only reads: its connections are opened read-only (SQLite ``query_only``, PostgreSQL read-only
transactions), and on SQLite in WAL mode readers never block a search that is writing.
"""

from importlib.resources import files
from pathlib import Path
from typing import Annotated, Literal

from fastapi import FastAPI, HTTPException, Query, Response
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy import event
from starlette.middleware.trustedhost import TrustedHostMiddleware

from steptune import grids
from steptune.exports import ExportError
from steptune.storage import Storage, connect
from steptune.storage.schema import STATUSES

from . import downloads, queries
from .grid_view import Grids
from .schedule_view import schedule_view

STATIC = Path(str(files("steptune.dashboard") / "static"))
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8750

StudyName = Annotated[str, Query(min_length=1, max_length=200)]
Fidelity = Annotated[str | None, Query(max_length=100)]
ProblemId = Annotated[int, Query(ge=0, le=2**31 - 1)]
TrialId = Annotated[int, PathParam(ge=1, le=2**63 - 1)]


def plotly_js() -> Path:
    """plotly.min.js as shipped inside the plotly Python package (served locally: no CDN)."""
    import plotly

    path = Path(plotly.__file__).resolve().parent / "package_data" / "plotly.min.js"
    if not path.is_file():
        raise FileNotFoundError(f"plotly.min.js is missing from the plotly package at {path}; reinstall plotly")
    return path


def open_read_only(url: str | None) -> Storage:
    """The database at ``url`` (must exist, with the current schema), every connection read-only."""
    store = connect(url, create=False, must_exist=True)

    @event.listens_for(store.engine, "connect")
    def _read_only(dbapi_conn, _record):
        cur = dbapi_conn.cursor()
        if store.dialect == "sqlite":
            cur.execute("PRAGMA query_only = ON")
        else:
            cur.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
        cur.close()
        if store.dialect != "sqlite":
            dbapi_conn.commit()

    store.engine.dispose()  # connections opened before the listener existed
    return store


def create_app(store: Storage, *, allowed_hosts: list[str] | None = None, poll_seconds: float = 5.0,
               cache_dir: str | Path | None = "runs/cache", device: str = "cpu") -> FastAPI:
    """The dashboard over ``store`` (see ``open_read_only``). ``allowed_hosts`` refuses requests for other
    Host headers (a guard against DNS rebinding when bound to loopback). Sample grids of image problems are drawn
    on ``device`` with the reference solutions cached under ``cache_dir``."""
    app = FastAPI(title="steptune dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    if allowed_hosts:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)

    @app.exception_handler(queries.NotFound)
    def _not_found(_request, exc: queries.NotFound):
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(ExportError)
    def _cannot_export(_request, exc: ExportError):
        return JSONResponse({"detail": str(exc)}, status_code=409)

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon():
        return Response(status_code=204)

    @app.get("/static/plotly.min.js", include_in_schema=False)
    def plotly_file():
        return FileResponse(plotly_js(), media_type="text/javascript")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/config")
    def config():
        return {"mode": "server", "poll_seconds": poll_seconds, "statuses": list(STATUSES),
                "formats": list(downloads.FORMATS), "sortable": list(queries.SORTABLE)}

    @app.get("/api/status")
    def status():
        return queries.change_token(store)

    @app.get("/api/problems")
    def problems():
        return queries.problems(store)

    @app.get("/api/front")
    def front(problem: ProblemId, fidelity: Fidelity = None):
        return queries.front(store, problem, fidelity)

    @app.get("/api/history")
    def history(study: StudyName):
        return queries.history(store, study)

    @app.get("/api/trials")
    def trials(study: Annotated[str | None, Query(min_length=1, max_length=200)] = None,
               problem: Annotated[int | None, Query(ge=0, le=2**31 - 1)] = None,
               nfe: Annotated[int | None, Query(ge=0, le=100_000)] = None,
               status: Literal[STATUSES] | None = None,  # type: ignore[valid-type]
               fidelity: Fidelity = None,
               sort: Literal[tuple(queries.SORTABLE)] = "number",  # type: ignore[valid-type]
               order: Literal["asc", "desc"] = "asc",
               offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
               limit: Annotated[int, Query(ge=1, le=queries.MAX_PAGE)] = 50):
        return queries.trials_page(store, study=study, problem=problem, nfe=nfe, status=status, fidelity=fidelity,
                                   sort=sort, descending=order == "desc", offset=offset, limit=limit)

    @app.get("/api/trials/{trial_id}/schedule")
    def schedule(trial_id: TrialId):
        return schedule_view(store, trial_id)

    sample_grids = Grids(store, cache_dir, device)

    @app.get("/api/trials/{trial_id}/grid.png")
    def grid(trial_id: TrialId):
        try:
            png = sample_grids.png(trial_id)
        except grids.GridError as e:
            raise HTTPException(409, str(e)) from None
        return Response(png, media_type="image/png")

    @app.get("/api/trials/{trial_id}/export/{fmt}")
    def export(trial_id: TrialId, fmt: Literal[downloads.FORMATS]):  # type: ignore[valid-type]
        try:
            d = downloads.export(store, trial_id, fmt)
        except ModuleNotFoundError as e:
            raise HTTPException(501, f"the {fmt} export needs the Python package {e.name!r}; pip install it") from None
        return Response(d.content, media_type=d.media_type,
                        headers={"Content-Disposition": f'attachment; filename="{d.filename}"'})

    @app.get("/api/relaxation/studies")
    def relaxation_studies():
        return queries.relaxation_studies(store)

    @app.get("/api/relaxation")
    def relaxation(study: StudyName):
        return queries.relaxation(store, study)

    for route in app.routes:  # HEAD (curl -I, a health check) is answered as GET is, without the body
        methods = getattr(route, "methods", None)
        if methods is not None and "GET" in methods:
            methods.add("HEAD")
    return app
