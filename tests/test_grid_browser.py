"""The sample grid in headless Chromium: the schedule view of a digits-cond trial shows the grid as an image
whose natural size is the grid's and whose reference and best-preset cells are, read back from the rendered
image, the decoded reference and the decoded samples of the best stored preset; a problem without images shows
none, one that cannot be built here says why in its place; the static report carries the same image offline."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from dashboard_server import serving
from test_dashboard_browser import browser, page, shots  # noqa: F401

from steptune import grids, sweep
from steptune.evaluators import Evaluator
from steptune.evaluators.digits_cond import digits_problem
from steptune.evaluators.problems import get_problem
from steptune.report import write_report
from steptune.space import presets, sample
from steptune.storage import connect

NFE = 5
SWEPT = ["ddim", "dpm-solver++-2m", "unipc-bh2", "heun"]
TUNED_STUDY = "digits-tuned"
SWEEP_STUDY = "digits-presets"
PLAIN_STUDY = "gmm-presets"
OTHER_STUDY = "digits-other-weights"


@pytest.fixture(scope="module")
def grid_db(tmp_path_factory):
    """A preset sweep of digits-cond at guidance 3 stored by the sweep's own code, a tuned-looking schedule in a
    study of its own, and a preset sweep of gmm-2d (no images); scored on the grid's held-out noises."""
    folder = tmp_path_factory.mktemp("grid-db")
    url = f"sqlite:///{folder / 'steptune.db'}"
    prob = digits_problem(guidance_scale=3.0)
    ev = grids.grid_evaluator(prob, folder / "cache")
    with connect(url) as store:
        rows = sweep.run_sweep(ev, SWEPT, [NFE], None, "heldout")
        sweep.store_sweep(store, SWEEP_STUDY, ev, rows)
        tuned = replace(presets.build("dpm-solver++-3m", NFE, prob.noise, t_start=prob.t_start, t_end=prob.t_end),
                        name="tuned")
        res = ev.evaluate(tuned, "heldout")
        [tuned_id] = store.add_trials(TUNED_STUDY, [{"schedule": tuned, "status": "complete", "metrics": res.metrics,
                                                     "bank": "heldout", "n_samples": res.n, "fidelity": "heldout"}],
                                      create={"method": "random", "problem": prob.identity(), "metric": "rmse"})
        other = prob.identity()
        other["data"] = {**other["data"], "unet_sha256": "0" * 64}  # a study of weights this checkout lacks
        [other_id] = store.add_trials(OTHER_STUDY, [{"schedule": tuned, "status": "complete", "metrics": res.metrics,
                                                     "bank": "heldout", "n_samples": res.n, "fidelity": "heldout"}],
                                      create={"method": "random", "problem": other, "metric": "rmse"})
        gmm = Evaluator(get_problem("gmm-2d"), n_train=16, n_heldout=32, cache_dir=None)
        [plain_id, *_] = sweep.store_sweep(store, PLAIN_STUDY, gmm, sweep.run_sweep(gmm, ["ddim"], [NFE], None,
                                                                                     "heldout"))
    best = min((r for r in rows if r["status"] == "complete"), key=lambda r: r["rmse"])["preset"]
    return {"url": url, "cache": folder / "cache", "tuned": tuned_id, "tuned_schedule": tuned, "plain": plain_id,
            "other": other_id, "best": best}


@pytest.fixture(scope="module")
def expected(grid_db):
    """The reference and the best stored preset's samples on the first held-out noises, decoded, from an
    evaluator of their own (no cache shared with the dashboard)."""
    prob = digits_problem(guidance_scale=3.0, quality=False)
    ev = Evaluator(prob, n_train=16, n_heldout=grids.ROWS, cache_dir=None)
    best = presets.build(grid_db["best"], NFE, prob.noise, t_start=prob.t_start, t_end=prob.t_end)
    with torch.no_grad():
        samples = sample(prob.model, ev.x_T("heldout"), best)
    pixels = [np.round(prob.decode(x)[:, 0].double().numpy() * 255).astype(np.uint8)
              for x in (samples, ev.reference("heldout"))]
    return {"best preset": pixels[0], "reference": pixels[1]}


@pytest.fixture(scope="module")
def grid_server(grid_db):
    with serving(grid_db["url"], cache_dir=grid_db["cache"]) as address:
        yield address


LAYOUT = grids.Layout(rows=grids.ROWS, columns=3, height=8, width=8)


def _rendered_grid(pg) -> dict:
    """The grid image as the page shows it: its natural size, and its pixels drawn onto a canvas."""
    pg.wait_for_function("(() => { const i = document.getElementById('sample-grid-img'); "
                         "return i && i.complete && i.naturalWidth > 0; })()", timeout=120_000)
    return pg.evaluate("""() => {
        const img = document.getElementById('sample-grid-img');
        const c = document.createElement('canvas');
        c.width = img.naturalWidth; c.height = img.naturalHeight;
        const g = c.getContext('2d');
        g.drawImage(img, 0, 0);
        return { width: img.naturalWidth, height: img.naturalHeight, shown: img.getBoundingClientRect().width,
                 src: img.src.slice(0, 100), pixels: Array.from(g.getImageData(0, 0, c.width, c.height).data) };
    }""")


def _check_cells(shown: dict, expected: dict) -> None:
    assert (shown["height"], shown["width"]) == LAYOUT.size
    assert shown["shown"] > 0
    png = np.array(shown["pixels"], dtype=np.uint8).reshape(shown["height"], shown["width"], 4)
    s = LAYOUT.scale
    for column, role in ((1, "best preset"), (2, "reference")):
        for row in range(grids.ROWS):
            top, left, bottom, right = LAYOUT.box(row, column)
            cell = png[top:bottom, left:right, :3]
            assert np.array_equal(cell[::s, ::s, 0], expected[role][row]), (role, row)
            assert np.array_equal(cell, np.kron(cell[::s, ::s], np.ones((s, s, 1), np.uint8)))


def _open(pg, url: str) -> None:
    pg.goto(url)
    pg.wait_for_function("document.body.dataset.rendered === 'schedule'")


def test_the_schedule_view_shows_the_sample_grid(page, grid_server, grid_db, expected, shots):  # noqa: F811
    _open(page, f"{grid_server}/#schedule/{grid_db['tuned']}")
    page.wait_for_selector(f"#schedule-head h2:has-text('trial id {grid_db['tuned']}')")
    shown = _rendered_grid(page)
    assert shown["src"].startswith(f"{grid_server}/api/trials/{grid_db['tuned']}/grid.png")
    _check_cells(shown, expected)
    page.screenshot(path=str(shots / "schedule-grid.png"), full_page=True)


def test_a_problem_without_images_shows_no_grid(page, grid_server, grid_db):  # noqa: F811
    _open(page, f"{grid_server}/#schedule/{grid_db['plain']}")
    page.wait_for_selector(f"#schedule-head h2:has-text('trial id {grid_db['plain']}')")
    assert page.locator("#sample-grid img").count() == 0
    answer = page.request.get(f"{grid_server}/api/trials/{grid_db['plain']}/grid.png")
    assert answer.status == 404 and "not of an image problem" in answer.json()["detail"]


def test_a_problem_that_cannot_be_built_here_says_why_in_place_of_the_grid(page, grid_server, grid_db):  # noqa: F811
    _open(page, f"{grid_server}/#schedule/{grid_db['other']}")
    page.wait_for_selector("#sample-grid p.hint:has-text('no grid:')")
    assert "not the one the study ran" in page.inner_text("#sample-grid")
    answer = page.request.get(f"{grid_server}/api/trials/{grid_db['other']}/grid.png")
    assert answer.status == 409 and "not the one the study ran" in answer.json()["detail"]


def test_the_static_report_carries_the_grid_offline(page, grid_db, expected, tmp_path, shots):  # noqa: F811
    with connect(grid_db["url"], create=False) as store:
        out = write_report(store, TUNED_STUDY, tmp_path / "report.html", cache_dir=None)
    page.route("**/*", lambda route: route.abort() if not route.request.url.startswith(("file:", "data:"))
               else route.continue_())
    _open(page, f"{out.as_uri()}#schedule/{grid_db['tuned']}")
    shown = _rendered_grid(page)
    assert shown["src"].startswith("data:image/png;base64,")
    _check_cells(shown, expected)
    page.screenshot(path=str(shots / "report-grid.png"), full_page=True)
