"""The dashboard's cost figures: the search-efficiency answer carries what a study spent per NFE (a real search
and a real preset sweep of known size), and the page shows it in the browser."""

from __future__ import annotations

import json

import pytest
import torch
from fastapi.testclient import TestClient
from test_dashboard_browser import _open, browser, page, shots  # noqa: F401  (fixtures)
from test_dashboard_data import (  # noqa: F401  (the session fixture)
    EVALUATIONS,
    HAND_STUDY,
    PRESET_STUDY,
    SEARCH_NFES,
    SEARCH_STUDY,
    dashboard_db,
)

from steptune.cli import main
from steptune.dashboard import create_app, open_read_only
from steptune.search_cost import seconds_text, study_cost
from steptune.storage import connect

CHEAP, HELDOUT, CONFIRM = 32, 1024, 2  # the dashboard job's samples and confirmations


@pytest.fixture(scope="module")
def client(dashboard_db):  # noqa: F811
    url, _ = dashboard_db
    store = open_read_only(url)
    with TestClient(create_app(store)) as c:
        yield c
    store.close()


def _cost(client, study: str) -> dict:
    r = client.get("/api/history", params={"study": study})
    assert r.status_code == 200
    return r.json()["cost"]


def test_a_searchs_cost_per_nfe(client, dashboard_db):  # noqa: F811
    url, _ = dashboard_db
    cost = _cost(client, SEARCH_STUDY)
    with connect(url, create=False) as store:
        trials = store.trials(SEARCH_STUDY)
        assert cost == json.loads(json.dumps(study_cost(trials).as_dict()))
    own = [t for t in trials if not t.info.get("baseline")]
    assert [c["nfe"] for c in cost["per_nfe"]] == SEARCH_NFES
    for c in cost["per_nfe"]:
        cheap = sum(t.fidelity == "train" and t.nfe == c["nfe"] for t in own)
        assert c["evaluations"] == cheap + CONFIRM
        assert c["model_calls"] == c["nfe"] * (CHEAP * cheap + HELDOUT * CONFIRM)
        assert c["device"].startswith("cuda:" if torch.cuda.is_available() else "cpu")  # where the job evaluated
    assert cost["total"]["evaluations"] == (EVALUATIONS + CONFIRM) * len(SEARCH_NFES)


def test_a_sweeps_cost_is_its_presets_times_nfe_times_samples(client, dashboard_db):  # noqa: F811
    url, info = dashboard_db
    ran = [r for r in info["sweep_rows"] if r["status"] in ("complete", "failed")]
    with connect(url, create=False) as store:
        samples = {t.n_samples for t in store.trials(PRESET_STUDY)}
    assert len(samples) == 1
    n = samples.pop()
    cost = _cost(client, PRESET_STUDY)
    for c in cost["per_nfe"]:
        rows = [r for r in ran if r["nfe"] == c["nfe"]]
        assert c["evaluations"] == len(rows) and c["model_calls"] == c["nfe"] * n * len(rows)
        # evaluated one after another in one process: the wall time is their own seconds
        assert c["wall_seconds"] == pytest.approx(sum(r["seconds"] for r in rows))
        assert c["device_seconds"] == pytest.approx(c["wall_seconds"])
    assert cost["baselines"]["evaluations"] == 0


def test_an_imported_result_is_reused_not_evaluated(client):
    cost = _cost(client, HAND_STUDY)
    assert cost["total"]["evaluations"] == 0 and cost["total"]["reused"] == 1
    assert cost["total"]["model_calls"] == 0 and cost["total"]["device"] is None  # JSON: null, not a dash


def test_the_history_view_shows_the_cost_table(page, dashboard_db, client, shots):  # noqa: F811
    from dashboard_server import serving

    url, _ = dashboard_db
    cost = _cost(client, SEARCH_STUDY)
    with serving(url) as server:
        _open(page, f"{server}/#history", "history")
        page.select_option("#history-study", SEARCH_STUDY)
        page.wait_for_function("document.querySelectorAll('#history-cost tbody tr').length > 0")
        rows = page.eval_on_selector_all("#history-cost tbody tr",
                                         "trs => trs.map((tr) => [...tr.cells].map((td) => td.textContent))")
        page.screenshot(path=str(shots / "history-cost.png"), full_page=True)
    want = [(str(c["nfe"]), c) for c in cost["per_nfe"]] + [("all NFEs", cost["total"]),
                                                            ("baselines", cost["baselines"])]
    assert [r[0] for r in rows] == [label for label, _ in want]
    best = client.get("/api/history", params={"study": SEARCH_STUDY}).json()["reported"]["best"]
    for row, (label, c) in zip(rows, want):
        # the study's best held-out score at the NFE (none on the totals' rows)
        assert (float(row[1]) == pytest.approx(best[label], rel=1e-3)) if c["nfe"] is not None else row[1] == ""
        assert row[2].split(" ")[0] == str(c["evaluations"])
        assert row[3] == f"{c['model_calls']:,}"
        assert row[4] == seconds_text(c["wall_seconds"]) and row[5] == seconds_text(c["device_seconds"])
        assert row[6] == c["device"]
    assert "repeated" in rows[-1][2] or cost["baselines"]["repeats"] == 0


# ---- relaxation studies: iterations and seconds against the baselines ------------------------------------------

RELAX = ["relax", "--problem", "shifted-laplacian", "--m", "6", "--steps", "30", "--learner", "chebcb", "--study",
         "sor"]


@pytest.fixture(scope="module")
def relax_db(tmp_path_factory):
    """A real relaxation study (`steptune relax`) and its `relax-report --json`."""
    folder = tmp_path_factory.mktemp("relax")
    url = f"sqlite:///{folder / 'r.db'}"
    assert main([*RELAX, "--db", url, "--json"]) == 0
    assert main(["relax", "--problem", "shifted-laplacian", "--m", "6", "--steps", "30", "--learner", "fixed",
                 "--omega", "1.5", "--study", "unreported", "--db", url, "--json"]) == 0
    return url, folder


def _report(capsys, url: str, folder) -> dict:
    capsys.readouterr()
    assert main(["relax-report", "--study", "sor", "--db", url, "-o", str(folder / "sor.png"), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_relax_report_totals_seconds_against_baselines_run_online(relax_db, capsys):
    url, folder = relax_db
    report = _report(capsys, url, folder)
    policies = report["verdict"]["policies"]
    names = [p["policy"] for p in policies]
    best = next(k for k in report["total_iterations"] if k.startswith("best fixed"))
    assert names == ["chebcb", "gauss-seidel", best, "instance-optimal (grid)", "adaptive SOR"]
    with connect(url) as store:
        rows = store.relaxation_rounds("sor")
        assert store.get_study("sor").config["verdict"] == json.loads(json.dumps(report["verdict"]))
    own = policies[0]
    assert own["iterations"] == sum(r.iterations for r in rows) == report["total_iterations"]["chebcb"]
    assert own["seconds"]["solve"] == pytest.approx(sum(r.context["seconds"] for r in rows))
    assert own["seconds"] == pytest.approx(report["seconds"])
    # the shifted Laplacian starts every solve from zero: the online runs take exactly the cost table's iterations
    for p in policies[1:4]:
        assert p["iterations"] == report["total_iterations"][p["policy"]]
    from steptune.evaluators.linear import make_sequence
    from steptune.search.sor_driver import adaptive_costs
    from steptune.search.sor_learners import AdaptiveSOR

    setup = report_setup(url)
    seq = make_sequence("shifted-laplacian", steps=30, m=6, variance="high", seed=0)
    assert policies[4]["iterations"] == adaptive_costs(seq, AdaptiveSOR(), setup["tol"], setup["maxiter"]).sum()
    for p in policies:
        s = p["seconds"]
        assert s["solve"] > 0 and s["total"] == pytest.approx(s["solve"] + s["learner"] + s["probe"])
        assert p["vs_study"]["seconds"] == pytest.approx(s["total"] / own["seconds"]["total"])
        assert p["vs_study"]["iterations"] == pytest.approx(p["iterations"] / own["iterations"])
    # the verdict kept with the study is not part of its setup: the same command resumes it
    capsys.readouterr()
    assert main([*RELAX, "--db", url, "--json"]) == 0
    assert "already has all 30 rounds" in capsys.readouterr().err


def report_setup(url: str) -> dict:
    with connect(url) as store:
        return store.get_study("sor").config


def test_the_dashboard_shows_the_stored_verdict_or_the_studys_own_totals(relax_db, capsys):
    url, folder = relax_db
    report = _report(capsys, url, folder)
    store = open_read_only(url)
    try:
        with TestClient(create_app(store)) as c:
            got = c.get("/api/relaxation", params={"study": "sor"}).json()["verdict"]
            alone = c.get("/api/relaxation", params={"study": "unreported"}).json()["verdict"]
    finally:
        store.close()
    assert got == {**json.loads(json.dumps(report["verdict"])), "from": "relax-report"}
    with connect(url) as db:
        rows = db.relaxation_rounds("unreported")
    assert alone["from"] == "rounds" and [p["policy"] for p in alone["policies"]] == ["fixed"]
    assert alone["policies"][0]["iterations"] == sum(r.iterations for r in rows)
    assert alone["policies"][0]["seconds"]["solve"] == pytest.approx(sum(r.context["seconds"] for r in rows))


def test_the_relaxation_view_shows_iterations_and_seconds(relax_db, page, shots, capsys):  # noqa: F811
    from dashboard_server import serving

    url, folder = relax_db
    policies = _report(capsys, url, folder)["verdict"]["policies"]
    with serving(url) as server:
        _open(page, f"{server}/#relaxation", "relaxation")
        page.select_option("#relax-study", "sor")
        page.wait_for_function("document.querySelectorAll('#relax-verdict tbody tr').length === 5")
        rows = page.eval_on_selector_all("#relax-verdict tbody tr",
                                         "trs => trs.map((tr) => [...tr.cells].map((td) => td.textContent))")
        note = page.inner_text("#relax-verdict-note")
        page.screenshot(path=str(shots / "relaxation-verdict.png"), full_page=True)
    for row, p in zip(rows, policies, strict=True):
        s = p["seconds"]
        assert row[:5] == [p["policy"], str(round(p["iterations"])), f"{s['total']:.3f}", f"{s['solve']:.3f}",
                           f"{s['learner'] + s['probe']:.3f}"]
        assert row[6] == f"{p['vs_study']['seconds']:.2f}×"
    assert "relax-report" in note and "run online" in note
