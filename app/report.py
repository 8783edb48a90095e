"""Static HTML reports: the dashboard's page with plotly.js, the styles, the script and the data of one
study's problem inlined into a single file that opens with no server and no network.

The embedded data are the dashboard endpoints' own answers (front, search efficiency, trials, schedule
views, relaxation), so a report shows the same figures and tables as the live page.
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

from steptune.dashboard import downloads, queries
from steptune.dashboard.app import STATIC, plotly_js
from steptune.dashboard.grid_view import Grids
from steptune.dashboard.schedule_view import schedule_view
from steptune.exports import ExportError
from steptune.grids import GridError
from steptune.storage import Storage
from steptune.storage.schema import STATUSES

MAX_TRIALS = 20_000  # rows of the trial table a report carries
MAX_SCHEDULES = 500  # the reported study's own schedule views it carries besides the front's, the best first
REPORT_FORMATS = ("json", "sigmas", "comfyui")


def api_path(path: str, params: dict | None = None) -> str:
    """The key the page asks for: parameters sorted, empty ones left out, encoded as encodeURIComponent."""
    keys = sorted(k for k, v in (params or {}).items() if v not in (None, ""))
    if not keys:
        return path
    return path + "?" + "&".join(f"{quote(k, safe='')}={quote(str(params[k]), safe=chr(126) + '()*!.' + chr(39))}"
                                 for k in keys)


def _problem_of(problems: list[dict], study: str) -> dict:
    for p in problems:
        if any(s["name"] == study for s in p["studies"]):
            return p
    raise queries.NotFound(f"no study named {study!r}")


def _all_trials(store: Storage, problem: int) -> tuple[list[dict], int]:
    """The problem's trials for the report's table, and how many it has: all of them, or where they are more than
    ``MAX_TRIALS``, the best that many by score (every trial's row, scored or not, is in the dashboard)."""
    total = queries.trials_page(store, problem=problem, limit=1)["total"]
    sort = "number" if total <= MAX_TRIALS else "score"
    page = queries.trials_page(store, problem=problem, sort=sort, limit=MAX_TRIALS, most=MAX_TRIALS)
    return page["items"], page["total"]


def _exports(store: Storage, trial_id: int, memo: dict) -> dict:
    out = {}
    for fmt in REPORT_FORMATS:
        try:
            d = downloads.export(store, trial_id, fmt, memo)
        except ExportError:
            continue
        out[fmt] = {"filename": d.filename, "type": d.media_type, "content": d.content.decode()}
    return out


def report_data(store: Storage, study: str, cache_dir: str | Path | None = "runs/cache", device: str = "cpu") -> dict:
    """Everything the page asks for about ``study``'s problem, keyed by the request path; the sample grids of the
    trials shown (image problems) as PNG data URLs, drawn with the references cached under ``cache_dir``."""
    problems = queries.problems(store)
    prob = _problem_of(problems, study)
    responses: dict[str, object] = {"/api/problems": [prob]}
    for fidelity in ("", *prob["fidelities"]):  # the page's fidelity menu offers the problem's fidelities
        responses[api_path("/api/front", {"problem": prob["id"], "fidelity": fidelity})] = \
            queries.front(store, prob["id"], fidelity or None)
    for st in prob["studies"]:
        if st["method"] != queries.PRESET_METHOD and any(st["trials"].values()):
            responses[api_path("/api/history", {"study": st["name"]})] = queries.history(store, st["name"])
    front = responses[api_path("/api/front", {"problem": prob["id"]})]
    shown = sorted({p["trial"] for s in front["series"] for p in s["points"]})
    own = sorted((t for t in store.trials(study, status="complete", schedules=False) if t.score is not None),
                 key=lambda t: (t.score, t.id))[:MAX_SCHEDULES]
    for t in own:  # the reported study's own schedules open from its rows, whether on the front or not
        responses[f"/api/trials/{t.id}/schedule"] = schedule_view(store, t.id)
    exports, grids, sample_grids, costs = {}, {}, Grids(store, cache_dir, device), {}
    for tid in shown:
        view = responses[f"/api/trials/{tid}/schedule"] = schedule_view(store, tid)
        exports[tid] = _exports(store, tid, costs)
        if view["grid"]:
            try:
                grids[tid] = "data:image/png;base64," + base64.b64encode(sample_grids.png(tid)).decode()
            except GridError:
                continue  # the page says the grid is not in the report
    names = {st["name"] for st in prob["studies"]}
    relax = [s for s in queries.relaxation_studies(store) if s in names]
    responses["/api/relaxation/studies"] = relax
    for s in relax:
        responses[api_path("/api/relaxation", {"study": s})] = queries.relaxation(store, s)
    written = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    config = {"mode": "report", "statuses": list(STATUSES), "formats": list(REPORT_FORMATS),
              "sortable": list(queries.SORTABLE)}
    trials, total = _all_trials(store, prob["id"])
    return {"study": study, "written": written, "config": config, "responses": responses,
            "trials": trials, "trials_total": total, "exports": exports, "grids": grids}


def _inline_script(code: str) -> str:
    return "<script>" + code.replace("</script", "<\\/script") + "</script>"


def render_report(data: dict, title: str) -> str:
    html = (STATIC / "index.html").read_text()
    css = (STATIC / "dashboard.css").read_text()
    payload = json.dumps(data, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    html = html.replace("<title>steptune dashboard</title>", f"<title>{_escape(title)}</title>")
    html = html.replace('<link rel="stylesheet" href="/static/dashboard.css">', f"<style>\n{css}</style>")
    html = html.replace('<script src="/static/plotly.min.js"></script>', _inline_script(plotly_js().read_text()))
    html = html.replace('<script src="/static/dashboard.js"></script>',
                        _inline_script(f"window.STEPTUNE_REPORT = {payload};") + "\n"
                        + _inline_script((STATIC / "dashboard.js").read_text()))
    return html


def _escape(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def save_report(data: dict, output: str | Path) -> Path:
    """Write the page of :func:`report_data`'s ``data`` to ``output``; returns the path."""
    output = Path(output)
    html = render_report(data, f"steptune report: {data['study']}")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(html)
    return output


def write_report(store: Storage, study: str, output: str | Path, cache_dir: str | Path | None = "runs/cache",
                 device: str = "cpu") -> Path:
    """Write the report of ``study`` (its problem's front, its search efficiency, trials, schedules, sample grids
    of image problems) to ``output``; returns the path."""
    return save_report(report_data(store, study, cache_dir, device), output)
