"""An NFE a job did not search but interpolated from its searched NFEs (``[refine] interpolate``) is a row of its own
wherever per-NFE results are shown: the run's final table, `status`, `best`, the export's provenance, the dashboard's
answers and its page. Every figure is checked against the stored trials at that NFE (the interpolated one and its
refinement), summed here."""

from __future__ import annotations

import contextlib
import io
import json
import re

import pytest
from runner_jobs import run_cli, write_job
from test_dashboard_browser import _open, browser, page, shots  # noqa: F401  (fixtures)

from steptune.dashboard import create_app, open_read_only
from steptune.search_cost import seconds_text
from steptune.storage import connect

STUDY = "interp"
SEARCHED, MADE = [3, 5], 4


@pytest.fixture(scope="module")
def job_run(tmp_path_factory):
    """A tiny searched study with NFE 4 interpolated and refined (no neighbour pass, so the NFE's trials are the
    interpolated schedule and its refinement, and the best preset there and its refinement): its job file, database
    and `run --json`."""
    from steptune.cli import main

    folder = tmp_path_factory.mktemp("interp")
    job = write_job(folder / "job.toml", STUDY, folder / "cache", evaluations=6, nfe=str(SEARCHED))
    job.write_text(job.read_text() + f"\n[refine]\niters = 3\ninterpolate = [{MADE}]\nneighbours = false\n")
    url = f"sqlite:///{folder / 'db.sqlite'}"
    printed = io.StringIO()  # a module fixture cannot take capsys
    with contextlib.redirect_stdout(printed):
        assert main(["run", str(job), "--db", url, "--json"]) == 0
    return job, url, json.loads(printed.getvalue())


def _own(url: str) -> list:
    """The study's trials at the interpolated NFE, its preset baselines left out."""
    with connect(url) as store:
        return [t for t in store.trials(STUDY, nfe=MADE) if not t.info.get("baseline")]


def _sums(trials) -> dict:
    """What the trials at the NFE cost, summed over them (none has a dispatch time: the wall is their seconds)."""
    assert all(t.started is None for t in trials)
    return {"evaluations": len(trials), "model_calls": sum(t.metrics["model_calls"] for t in trials),
            "wall_seconds": pytest.approx(sum(t.seconds for t in trials)),
            "device_seconds": pytest.approx(sum(t.seconds for t in trials))}


def _stored(url: str) -> tuple:
    """The interpolated trial, its refinement, the NFEs it was built from and the best held-out score after the
    stage (``_best``'s)."""
    trials = _own(url)
    made = next(t for t in trials if "interpolated" in t.info)
    fit = next(t for t in trials if t.info.get("refines") == made.id)
    return made, fit, sorted(made.info["interpolated"]["between"]), _best(url).score


def _best(url: str):
    """The NFE's best after the stage: of the interpolated trial, the best preset at its best spacing there (the
    stage refines it as at a searched NFE) and each one's refinement where that beat its parent; ties to the
    earlier trial."""
    with connect(url) as store:
        trials = store.trials(STUDY, nfe=MADE)
    (preset,) = [t for t in trials if t.info.get("baseline") and "best_of" in t.info]
    parents = [next(t for t in trials if "interpolated" in t.info), preset]
    fits = [next(t for t in trials if t.info.get("refines") == p.id) for p in parents]
    found = [t for t in parents + fits if t.status == "complete"]
    return min(found, key=lambda t: (t.score, t.number))


def _cost_row(cost: dict) -> dict:
    return next(c for c in cost["per_nfe"] if c["nfe"] == MADE)


def _check_cost(c: dict, url: str) -> None:
    trials = _own(url)
    made, _, between, _ = _stored(url)
    assert len(trials) == 3  # the interpolated schedule scored on the held-out bank, its refinement, the preset's
    assert {k: c[k] for k in ("evaluations", "model_calls", "wall_seconds", "device_seconds")} == _sums(trials)
    assert c["interpolated_from"] == between and c["repeats"] == c["reused"] == 0


def test_the_stored_trials_are_an_interpolation_and_its_refinement(job_run):
    _, url, _ = job_run
    made, fit, between, _ = _stored(url)
    assert between and set(between) <= set(SEARCHED)
    assert made.status == "complete" and fit.status in ("complete", "pruned")
    # each method's schedule scored once on the held-out bank, the better one stored with the cost of both
    assert made.metrics["model_calls"] == len(made.info["interpolated"]["tried"]) * MADE * made.n_samples
    assert fit.metrics["model_calls"] > made.metrics["model_calls"]  # the fit's calls and its checks


def test_the_runs_table_has_a_row_for_the_interpolated_nfe(job_run, capsys):
    job, url, payload = job_run
    made, _, between, refined = _stored(url)
    assert [r["nfe"] for r in payload["per_nfe"]] == sorted([*SEARCHED, MADE])
    row = next(r for r in payload["per_nfe"] if r["nfe"] == MADE)
    assert row["interpolated_from"] == between and row["searched_score"] == made.score
    assert row["refined"] == refined and row["found_at"] is None
    assert all(r["interpolated_from"] is None for r in payload["per_nfe"] if r["nfe"] != MADE)
    _check_cost(_cost_row(payload["cost"]), url)
    code, out, _ = run_cli(["run", str(job), "--db", url], capsys)  # the finished study: its table again
    assert code == 0
    _check_text_row(out, url)


def _check_text_row(out: str, url: str) -> None:
    """The NFE's row of a printed table: marked with the NFEs it came from, its cost cells the summed trials'."""
    made, _, between, _ = _stored(url)
    label = f"{MADE} (from {', '.join(map(str, between))})"
    line = next(ln for ln in out.splitlines() if ln.lstrip("│ ").startswith(label))
    cells = [c.strip() for c in line.strip("│").split("│")]
    sums = sum(t.seconds for t in _own(url))
    assert cells[-4:] == ["3", f"{sum(t.metrics['model_calls'] for t in _own(url)):,}", seconds_text(sums),
                          seconds_text(sums)]
    note = f"NFE {MADE} from NFE {', '.join(map(str, between))}"
    assert re.search(re.escape(note), " ".join(out.split())), out


def test_status_shows_the_interpolated_nfe_with_its_score_and_cost(job_run, capsys):
    _, url, payload = job_run
    made, _, between, refined = _stored(url)
    code, out, _ = run_cli(["status", "--study", STUDY, "--db", url, "--json"], capsys)
    info = json.loads(out)
    row = next(r for r in info["per_nfe"] if r["nfe"] == MADE)
    assert row == {"nfe": MADE, "heldout": made.score, "train": None, "refined": refined, "preset": row["preset"],
                   "preset_score": row["preset_score"], "interpolated_from": between}
    assert info["cost"] == payload["cost"]
    _check_cost(_cost_row(info["cost"]), url)
    code, out, _ = run_cli(["status", "--study", STUDY, "--db", url], capsys)
    assert code == 0
    _check_text_row(out, url)


def test_best_and_export_say_it_is_interpolated_and_what_it_cost(job_run, capsys):
    _, url, _ = job_run
    made, fit, between, _ = _stored(url)
    best = _best(url)  # the interpolated trial, a refinement, or the preset at its best spacing
    code, out, _ = run_cli(["best", "--study", STUDY, "--db", url, "--json"], capsys)
    row = next(r for r in json.loads(out) if r["nfe"] == MADE)
    # marked as the interpolated NFE's own schedule only when it is one (or its refinement): the preset at its best
    # spacing there, refined or not, is no interpolation
    assert row["id"] == best.id and row["interpolated_from"] == (between if best.id in (made.id, fit.id) else None)
    code, out, _ = run_cli(["best", "--study", STUDY, "--nfe", str(MADE), "--db", url], capsys)
    assert code == 0 and ("interpolated" in out) == (best.id in (made.id, fit.id)), out
    code, out, _ = run_cli(["export", "--study", STUDY, "--nfe", str(MADE), "--db", url], capsys)
    prov = json.loads(out)["provenance"]
    assert prov["trial"] == best.id and prov["status"] == "complete"
    _check_cost(prov["cost"], url)
    if best.id == made.id:
        assert prov["interpolated"]["between_trials"] == made.info["interpolated"]["from_trials"]
    elif best.id == fit.id:
        assert prov["refined_from"]["trial"] == made.id


def test_the_dashboards_answers_carry_the_interpolated_nfe(job_run):
    from fastapi.testclient import TestClient

    _, url, payload = job_run
    made, _, between, refined = _stored(url)
    store = open_read_only(url)
    try:
        with TestClient(create_app(store)) as c:
            history = c.get("/api/history", params={"study": STUDY}).json()
            problem = next(p for p in c.get("/api/problems").json() if any(s["name"] == STUDY for s in p["studies"]))
            front = c.get("/api/front", params={"problem": problem["id"], "fidelity": "heldout"}).json()
    finally:
        store.close()
    assert history["cost"] == payload["cost"]
    _check_cost(_cost_row(history["cost"]), url)
    assert history["reported"] == {"fidelity": "heldout", "best": {**history["reported"]["best"], str(MADE): refined}}
    series = next(s for s in front["series"] if s["study"] == STUDY)
    point = next(p for p in series["points"] if p["nfe"] == MADE)
    assert point["score"] == refined and point["interpolated_from"] == between
    assert all(p["interpolated_from"] is None for p in series["points"] if p["nfe"] != MADE)


def test_the_dashboard_page_shows_the_interpolated_row(job_run, page, shots):  # noqa: F811
    from dashboard_server import serving

    _, url, payload = job_run
    _, _, between, refined = _stored(url)
    c = _cost_row(payload["cost"])
    with serving(url) as server:
        _open(page, f"{server}/#history", "history")
        page.select_option("#history-study", STUDY)
        page.wait_for_function(f"document.querySelector('#history-cost tr[data-nfe=\"{MADE}\"]') !== null")
        cells = page.eval_on_selector(f"#history-cost tr[data-nfe='{MADE}']",
                                      "tr => [...tr.cells].map((td) => td.textContent)")
        names = page.evaluate("document.getElementById('history-plot').data.map((t) => t.name)")
        page.screenshot(path=str(shots / "history-interpolated.png"), full_page=True)
        _open(page, f"{server}/#front", "front")
        symbols = page.evaluate(f"""() => document.getElementById('front-plot').data
            .filter((t) => t.name === '{STUDY} (heldout)')
            .map((t) => t.x.map((x, i) => [x, t.marker.symbol[i]]))[0]""")
    text = f"interpolated from NFE {', '.join(map(str, between))}"
    assert cells[0] == f"{MADE} ({text})"
    assert float(cells[1]) == pytest.approx(refined, rel=1e-3)  # the page's 4 significant digits
    assert cells[2:6] == [str(c["evaluations"]), f"{c['model_calls']:,}", seconds_text(c["wall_seconds"]),
                          seconds_text(c["device_seconds"])]
    assert any(n.startswith(f"NFE {MADE} (heldout") and text in n for n in names), names
    assert dict(symbols) == {n: "diamond" if n == MADE else "circle" for n in sorted([*SEARCHED, MADE])}


def test_the_static_report_carries_the_same_rows(job_run, tmp_path):
    from steptune.report import api_path, report_data

    _, url, payload = job_run
    with connect(url) as store:
        data = report_data(store, STUDY, cache_dir=tmp_path)
    history = data["responses"][api_path("/api/history", {"study": STUDY})]
    assert history["cost"] == payload["cost"]
    _check_cost(_cost_row(history["cost"]), url)


def test_postgresql_gives_the_dashboard_the_same_rows(job_run):
    """The dashboard reads the marks and the cost with JSON paths in SQL: on PostgreSQL too."""
    from test_storage_db import fresh_pg_schema

    from steptune.cli import main
    from steptune.dashboard import queries
    from steptune.search_cost import study_cost

    job, _, _ = job_run
    with fresh_pg_schema() as pg:
        with contextlib.redirect_stdout(io.StringIO()):
            assert main(["run", str(job), "--db", pg, "--json"]) == 0
        with connect(pg) as store:
            want = json.loads(json.dumps(study_cost(store.trials(STUDY)).as_dict()))
            made = next(t for t in store.trials(STUDY, nfe=MADE) if "interpolated" in t.info)
            history = queries.history(store, STUDY)
            problem = next(p for p in queries.problems(store) if any(s["name"] == STUDY for s in p["studies"]))
            front = queries.front(store, problem["id"], "heldout")
    between = sorted(made.info["interpolated"]["between"])
    assert history["cost"] == want and _cost_row(want)["interpolated_from"] == between
    points = next(s for s in front["series"] if s["study"] == STUDY)["points"]
    assert {p["nfe"]: p["interpolated_from"] for p in points} == {n: between if n == MADE else None
                                                                  for n in sorted([*SEARCHED, MADE])}
