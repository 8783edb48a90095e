"""The dashboard in headless Chromium (Playwright driving Debian's chromium): the front's traces, click to
the schedule view, table filters, an export download that imports back, live refresh, the static
report offline. Each view is saved as a PNG under $STEPTUNE_SCREENSHOTS (default: a temporary folder)."""

from __future__ import annotations

import json
import math
import os
import shutil
import sqlite3
from pathlib import Path

import pytest
from dashboard_server import serving
from test_dashboard_data import PRESETS, SEARCH_STUDY, dashboard_db  # noqa: F401

from steptune.dashboard import open_read_only
from steptune.dashboard.queries import front, problems
from steptune.exports import import_schedule, k_diffusion_sigmas
from steptune.report import write_report
from steptune.search import DEFAULT_PRESETS
from steptune.storage import connect

CHROMIUM = os.environ.get("STEPTUNE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
NO_CHROMIUM = ("no chromium binary (install Debian's chromium package or set STEPTUNE_CHROMIUM); "
               "scripts/test.sh installs it")
TIMEOUT_MS = 20_000


@pytest.fixture(scope="module")
def db_url(dashboard_db, tmp_path_factory):  # noqa: F811
    """A copy of the session database, so the live-refresh test can write to it."""
    src_url, _ = dashboard_db
    path = tmp_path_factory.mktemp("browser") / "steptune.db"
    src = sqlite3.connect(src_url.removeprefix("sqlite:///"))
    dst = sqlite3.connect(path)
    src.backup(dst)
    src.close()
    dst.close()
    return f"sqlite:///{path}"


@pytest.fixture(scope="module")
def server(db_url):
    with serving(db_url) as address:
        yield address


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(NO_CHROMIUM)
        pytest.skip(NO_CHROMIUM)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser):
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    pg = ctx.new_page()
    pg.set_default_timeout(TIMEOUT_MS)
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    ctx.close()
    assert not errors, f"JavaScript errors: {errors}"


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("STEPTUNE_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _open(page, url: str, view: str) -> None:
    page.goto(url)
    page.wait_for_function(f"document.body.dataset.rendered === {view!r}")
    page.wait_for_timeout(300)  # let plotly finish its transitions before a screenshot


def _expected_front(db_url: str) -> dict:
    with connect(db_url, create=False) as store:
        problem = next(p for p in problems(store) if any(s["name"] == SEARCH_STUDY for s in p["studies"]))
        return front(store, problem["id"])


def _overlapping_tick_labels(page, plot: str) -> list[tuple[str, str]]:
    """The neighbouring y-axis tick labels of ``plot`` that Chromium draws over each other."""
    boxes = page.eval_on_selector_all(f"#{plot} .ytick text", """els => els.map((e) => {
        const r = e.getBoundingClientRect(); return [e.textContent, r.top, r.bottom]; })""")
    boxes.sort(key=lambda b: b[1])
    return [(a[0], b[0]) for a, b in zip(boxes, boxes[1:]) if b[1] < a[2]]


def _trace_count(page, plot: str) -> tuple[int, int]:
    return tuple(page.evaluate(f"""() => {{
        const gd = document.getElementById({plot!r});
        return [gd.data.length, gd.querySelectorAll('.scatterlayer .trace').length];
    }}"""))


def test_front_renders_one_trace_per_series_and_front(page, server, db_url, shots):
    _open(page, f"{server}/#front", "front")
    want = _expected_front(db_url)
    n = len(want["series"]) + len(want["fronts"])
    presets = set(PRESETS) | set(DEFAULT_PRESETS)
    assert n == len(presets) + 3 + 2  # presets, the search at two fidelities, hand-made; a front per fidelity
    assert _trace_count(page, "front-plot") == (n, n)
    legend = page.eval_on_selector_all("#front-plot .legendtext", "els => els.map((e) => e.textContent)")
    assert sorted(legend) == sorted([s["name"] for s in want["series"]] + [f"Pareto front ({f['fidelity']})"
                                                                          for f in want["fronts"]])
    assert page.evaluate("document.getElementById('front-plot')._fullLayout.yaxis.type") == "log"
    assert page.evaluate("document.querySelectorAll('#front-plot .ytick text').length") >= 3
    assert not _overlapping_tick_labels(page, "front-plot")
    page.screenshot(path=str(shots / "front.png"), full_page=True)
    # the fidelity filter keeps only the search's ranking curve and its front
    page.select_option("#fidelity", "train")
    page.wait_for_function("document.getElementById('front-plot').data.length === 2")


def _most_isolated_preset_point(page, presets: list[str]) -> dict:
    """The preset point farthest (in pixels) from any other point, so a click lands on it alone."""
    return page.evaluate("""(presets) => {
        const gd = document.getElementById('front-plot');
        const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis;
        const box = gd.querySelector('.nsewdrag').getBoundingClientRect();
        const pts = [];
        gd.data.forEach((t) => { if (!t.customdata) return;
            t.x.forEach((x, k) => pts.push({ name: t.name, trial: t.customdata[k],
                px: box.left + xa.d2p(x), py: box.top + ya.d2p(t.y[k]) })); });
        let best = null;
        for (const p of pts) {
            if (!presets.includes(p.name)) continue;
            const gap = Math.min(...pts.filter((q) => q !== p).map((q) => Math.hypot(q.px - p.px, q.py - p.py)));
            if (!best || gap > best.gap) best = { ...p, gap };
        }
        return best;
    }""", presets)


def _preset_series(db_url: str) -> list[str]:
    return [s["name"] for s in _expected_front(db_url)["series"] if s["kind"] == "preset"]


def test_clicking_a_point_opens_its_schedule(page, server, db_url, shots):
    _open(page, f"{server}/#schedule", "schedule")  # nothing picked yet: the hint, no empty plot frames
    assert page.inner_text("#schedule-head").startswith("Pick a point on the front")
    assert not page.is_visible("#lambda-plot") and not page.is_visible("#steps-table")
    _open(page, f"{server}/#front", "front")
    pt = _most_isolated_preset_point(page, _preset_series(db_url))
    assert pt["gap"] > 8, "no front point is far enough from the others to click unambiguously"
    page.mouse.move(pt["px"], pt["py"])
    page.mouse.click(pt["px"], pt["py"])
    page.wait_for_function(f"location.hash === '#schedule/{pt['trial']}' && document.body.dataset.rendered === "
                           "'schedule'")
    page.wait_for_selector(f"#schedule-head h2:has-text('trial id {pt['trial']}')")
    assert page.is_visible("#lambda-plot") and page.is_visible("#steps-table")
    preset = pt["name"].removesuffix(" (heldout)")
    # a preset's schedule resembles itself most
    assert page.inner_text("#nearest-preset").startswith(f"most like {preset} (distance 0")
    steps = page.locator("#steps-table tr").count() - 1
    assert steps >= 1
    assert _trace_count(page, "lambda-plot")[0] == 4  # the schedule and its three nearest presets
    page.wait_for_timeout(300)
    page.screenshot(path=str(shots / "schedule.png"), full_page=True)


def test_table_filters_sorts_and_pages(page, server, db_url, shots):
    _open(page, f"{server}/#trials", "trials")
    with connect(db_url, create=False) as store:
        want = store.trials(SEARCH_STUDY, nfe=4, status="complete")
    page.select_option("#f-study", SEARCH_STUDY)
    page.wait_for_function(f"document.getElementById('trials-count').dataset.total === '{len(store_all(db_url))}'")
    page.select_option("#f-status", "complete")
    page.select_option("#f-nfe", "4")
    page.wait_for_function(f"document.getElementById('trials-count').dataset.total === '{len(want)}'")
    rows = page.locator("#trials-table tbody tr")
    assert rows.count() == len(want)
    nfe_col = [page.locator("#trials-table th").nth(i).inner_text() for i in range(4)].index("NFE")
    assert {rows.nth(i).locator("td").nth(nfe_col).inner_text() for i in range(rows.count())} == {"4"}
    page.click("#trials-table th[data-key=score]")
    page.wait_for_selector("#trials-table th.sorted-asc[data-key=score]")
    ids = [int(rows.nth(i).get_attribute("data-trial")) for i in range(rows.count())]
    assert ids == [t.id for t in sorted(want, key=lambda t: (t.score, t.id))]
    page.screenshot(path=str(shots / "trials.png"), full_page=True)
    # paging on the server: the whole study is more than one page of 50
    page.select_option("#f-nfe", "")
    page.select_option("#f-status", "")
    total = len(store_all(db_url))
    assert total > 50
    page.wait_for_function(f"document.getElementById('trials-count').dataset.total === '{total}'")
    assert rows.count() == 50 and page.is_disabled("#prev")
    page.click("#next")
    end = min(total, 100)
    page.wait_for_function(f"document.getElementById('trials-count').textContent === '51–{end} of {total}'")
    assert rows.count() == end - 50 and page.is_disabled("#next") == (total <= 100)
    rows.first.click()
    page.wait_for_function("location.hash.startsWith('#schedule/')")


def store_all(db_url: str) -> list:
    with connect(db_url, create=False) as store:
        return store.trials(SEARCH_STUDY)


def test_export_download_imports_back(page, server, db_url, tmp_path):
    with connect(db_url, create=False) as store:
        t = min((t for t in store.trials(SEARCH_STUDY, status="complete", nfe=5)
                 if t.fidelity == "heldout" and not t.info.get("baseline")), key=lambda t: t.score)
    _open(page, f"{server}/#schedule/{t.id}", "schedule")
    with page.expect_download() as dl:
        page.click("#downloads a[data-format=json]")
    path = tmp_path / dl.value.suggested_filename
    dl.value.save_as(path)
    assert path.name.endswith(".json")
    with connect(f"sqlite:///{tmp_path / 'fresh.db'}") as fresh:
        back = import_schedule(fresh, path, "from-the-page")
        assert back.schedule == t.schedule and back.status == "complete"
        assert math.isclose(back.score, t.score) and back.nfe == t.nfe
    with page.expect_download() as dl:
        page.click("#downloads a[data-format=sigmas]")
    sig = tmp_path / "sigmas.json"
    dl.value.save_as(sig)
    assert json.loads(sig.read_text()) == k_diffusion_sigmas(t.to_schedule())


def test_history_view(page, server, db_url, shots):
    _open(page, f"{server}/#history", "history")
    page.select_option("#history-study", SEARCH_STUDY)
    with connect(db_url, create=False) as store:
        keys = {(t.fidelity, t.nfe) for t in store.trials(SEARCH_STUDY, status="complete")
                if not t.info.get("baseline")}
    page.wait_for_function(f"document.getElementById('history-plot').dataset.traces === '{len(keys)}'")
    assert _trace_count(page, "history-plot") == (len(keys), len(keys))
    assert not _overlapping_tick_labels(page, "history-plot")
    # the run's utilisation, as the stored trials' dispatch and finish times give it
    from steptune.utilisation import utilisation

    with connect(db_url, create=False) as store:
        config = store.get_study(SEARCH_STUDY).config
        searched = [t for t in store.trials(SEARCH_STUDY) if t.fidelity == "train" and "batch" in t.info]
    u = utilisation(searched, config["evaluators"]["count"])
    text = page.locator("#history-run").inner_text()
    assert text.startswith(f"evaluators: {config['evaluators']['count']} (local), busy now 0"), text
    assert f"busy {round(100 * u.fraction)}% of {u.seconds:.1f} s" in text, text
    assert f"batch {config['search_batch']}" in text, text
    page.screenshot(path=str(shots / "history.png"), full_page=True)


def test_relaxation_view(page, server, shots):
    _open(page, f"{server}/#relaxation", "relaxation")
    page.wait_for_function("document.getElementById('cumulative-plot').dataset.traces === '2'")
    assert _trace_count(page, "omega-plot") == (1, 1)
    page.screenshot(path=str(shots / "relaxation.png"), full_page=True)


def test_live_refresh_shows_new_trials(page, server, db_url):
    _open(page, f"{server}/#trials", "trials")
    page.select_option("#f-study", SEARCH_STUDY)
    before = len(store_all(db_url))
    page.wait_for_function(f"document.getElementById('trials-count').dataset.total === '{before}'")
    with connect(db_url, create=False) as writer:
        writer.add_trial(SEARCH_STUDY, writer.trials(SEARCH_STUDY)[0].schedule)  # queued, as a running search adds
    page.wait_for_function(f"document.getElementById('trials-count').dataset.total === '{before + 1}'")


def _run_cell(page) -> str:
    return page.evaluate(f"""() => [...document.querySelectorAll('#studies-table tr')]
        .find((r) => r.cells[0] && r.cells[0].textContent === {SEARCH_STUDY!r}).querySelector('td.run').textContent""")


def test_the_studies_table_says_which_run_is_on_a_study_and_what_it_does(page, server, db_url):
    """A run's lease (its driver and phase), as a running job keeps it in the study's config: the live page shows
    the phase while it holds the study, nothing once it lets go, and that it died when its process is gone."""
    import socket
    import subprocess
    import sys

    _open(page, f"{server}/#front", "front")
    assert _run_cell(page) == "—"
    me = f"{socket.gethostname()}:{os.getpid()}"
    with connect(db_url, create=False) as writer:
        writer.claim_driver(SEARCH_STUDY, me, 120.0)
        writer.beat_driver(SEARCH_STUDY, me, phase="refine")
    page.wait_for_function(f"document.querySelector('#studies-table').textContent.includes('refining ({me})')")
    with connect(db_url, create=False) as writer:
        writer.release_driver(SEARCH_STUDY, me)
    page.wait_for_function("!document.querySelector('#studies-table').textContent.includes('refining')")
    assert _run_cell(page) == "—"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()  # a process that has ended
    dead = f"{socket.gethostname()}:{gone}"
    with connect(db_url, create=False) as writer:
        writer.claim_driver(SEARCH_STUDY, dead, 120.0)
        writer.beat_driver(SEARCH_STUDY, dead, phase="search")
    page.wait_for_function("document.querySelector('#studies-table').textContent.includes('ended without')")
    assert _run_cell(page) == f"none: the last run ({dead}) ended without letting go"
    with connect(db_url, create=False) as writer:
        writer.release_driver(SEARCH_STUDY, dead)


def test_static_report_works_offline(page, db_url, tmp_path, shots):
    store = open_read_only(db_url)
    try:
        path = write_report(store, SEARCH_STUDY, tmp_path / "report.html")
    finally:
        store.close()
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    _open(page, path.as_uri() + "#front", "front")
    want = _expected_front(db_url)
    n = len(want["series"]) + len(want["fronts"])
    assert _trace_count(page, "front-plot") == (n, n)
    assert page.inner_text("#refreshed").startswith(f"report of {SEARCH_STUDY}, written ")
    # a snapshot: no column saying which run was on a study as the report was written
    assert page.eval_on_selector_all("#studies-table th", "els => els.map((e) => e.textContent)")[-1] == \
        "relaxation rounds"
    page.screenshot(path=str(shots / "report-front.png"), full_page=True)
    pt = _most_isolated_preset_point(page, _preset_series(db_url))
    page.mouse.move(pt["px"], pt["py"])
    page.mouse.click(pt["px"], pt["py"])
    page.wait_for_selector(f"#schedule-head h2:has-text('trial id {pt['trial']}')")
    with page.expect_download() as dl:
        page.click("#downloads a[data-format=json]")
    dl.value.save_as(tmp_path / "from-report.json")
    # the trial table filters the embedded trials in the page
    page.evaluate("location.hash = '#trials'")
    page.wait_for_function("document.body.dataset.rendered === 'trials'")
    page.select_option("#f-status", "complete")
    with connect(db_url, create=False) as store:
        complete = len(store.trials(SEARCH_STUDY, status="complete"))
    page.wait_for_function(f"document.getElementById('trials-count').dataset.total === '{complete}'")
    with connect(f"sqlite:///{tmp_path / 'fresh.db'}") as fresh:
        assert import_schedule(fresh, tmp_path / "from-report.json", "r").id == 1
    assert all(u.startswith(("file:", "blob:", "data:")) for u in requests), requests


def test_a_late_answer_to_an_older_filter_does_not_overwrite_a_newer_one(page, server, db_url):
    _open(page, f"{server}/#trials", "trials")
    page.select_option("#f-study", SEARCH_STUDY)
    page.wait_for_function(f"document.getElementById('trials-count').dataset.total === '{len(store_all(db_url))}'")
    # from here on, an answer for any table filter but NFE 4 arrives a second late
    page.evaluate("""() => {
        const fetchNow = window.fetch;
        window.fetch = (url, ...rest) => String(url).startsWith("/api/trials?") && !String(url).includes("nfe=4")
            ? new Promise((done) => setTimeout(() => done(fetchNow(url, ...rest)), 1000)) : fetchNow(url, ...rest);
    }""")
    with connect(db_url, create=False) as store:
        want = store.trials(SEARCH_STUDY, nfe=4, status="complete")
    page.select_option("#f-status", "complete")
    page.select_option("#f-nfe", "4")
    page.wait_for_function(f"document.getElementById('trials-count').dataset.total === '{len(want)}'")
    page.wait_for_timeout(2500)  # the older filter's answer has come back by now
    assert page.get_attribute("#trials-count", "data-total") == str(len(want))
    assert page.evaluate("document.querySelector('#f-nfe').value") == "4"
