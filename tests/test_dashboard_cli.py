"""`steptune dashboard` and `steptune report` from the command line."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from test_dashboard_data import SEARCH_STUDY, dashboard_db  # noqa: F401

from steptune.cli import main


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as /proc/net/tcp writes them) with a socket listening on ``port``."""
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, _, hexport = local.rpartition(":")
            if state == "0A" and int(hexport, 16) == port:  # 0A: LISTEN
                out.add(addr)
    return out


def test_dashboard_serves_on_loopback_read_only_and_opens_no_browser(dashboard_db, tmp_path):  # noqa: F811
    url, _ = dashboard_db
    port = _free_port()
    marker = tmp_path / "browser-was-opened"
    fake_browser = tmp_path / "fake-browser"
    fake_browser.write_text(f"#!/bin/sh\ntouch {marker}\n")
    fake_browser.chmod(0o755)
    env = {**os.environ, "BROWSER": str(fake_browser), "DISPLAY": ":0"}
    proc = subprocess.Popen([sys.executable, "-m", "steptune", "dashboard", "--db", url, "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status", timeout=2) as r:
                    assert r.status == 200
                    break
            except (urllib.error.URLError, ConnectionError):
                assert proc.poll() is None, proc.communicate()[1]
                assert time.monotonic() < deadline, "the dashboard did not start within 60 s"
                time.sleep(0.2)
        assert _listening_addresses(port) == {"0100007F"}  # 127.0.0.1 only
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
            assert b"plotly.min.js" in r.read()
        # a request naming another host (DNS rebinding) is refused
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/problems", headers={"Host": "evil.example"})
        try:
            urllib.request.urlopen(req, timeout=5)
            raise AssertionError("a foreign Host header was served")
        except urllib.error.HTTPError as e:
            assert e.code == 400
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            _, stderr = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, stderr = proc.communicate()
    assert f"http://127.0.0.1:{port}/" in stderr and "read-only" in stderr
    assert not marker.exists()


def test_dashboard_refuses_a_missing_database(tmp_path, capsys):
    assert main(["dashboard", "--db", f"sqlite:///{tmp_path / 'none.db'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no database at") and "\n" not in err
    assert not (tmp_path / "none.db").exists()


def test_report_writes_one_self_contained_file(dashboard_db, tmp_path, capsys):  # noqa: F811
    url, _ = dashboard_db
    out = tmp_path / "reports" / "search.html"
    assert main(["report", "--study", SEARCH_STUDY, "-o", str(out), "--db", url]) == 0
    html = out.read_text()
    assert "<script src=" not in html and '<link rel="stylesheet"' not in html
    assert "window.STEPTUNE_REPORT = " in html and "Plotly" in html
    assert "wrote" in capsys.readouterr().err


def test_report_of_an_unknown_study_is_one_line(dashboard_db, tmp_path, capsys):  # noqa: F811
    url, _ = dashboard_db
    assert main(["report", "--study", "nope", "-o", str(tmp_path / "r.html"), "--db", url]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no study named 'nope'") and "\n" not in err
    assert not (tmp_path / "r.html").exists()


def test_a_port_in_use_is_one_line_before_the_server_says_where_it_is(dashboard_db, capsys):  # noqa: F811
    url, _ = dashboard_db
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["dashboard", "--port", str(port), "--db", url]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --host 127.0.0.1 --port {port}: cannot listen there (Address already in use); choose " \
                  "another address or port\n"


def test_a_report_answers_every_fidelity_its_menu_offers_and_opens_the_studys_own_schedules(dashboard_db):  # noqa: F811
    from steptune.dashboard import queries
    from steptune.report import MAX_SCHEDULES, api_path, report_data
    from steptune.storage import connect

    url, _ = dashboard_db
    with connect(url, create=False) as store:
        data = report_data(store, SEARCH_STUDY, cache_dir=None)
        prob = data["responses"]["/api/problems"][0]
        assert {"train", "heldout"} <= set(prob["fidelities"])
        for fidelity in prob["fidelities"]:  # what the page asks for when the menu picks it
            key = api_path("/api/front", {"problem": prob["id"], "fidelity": fidelity})
            assert data["responses"][key] == queries.front(store, prob["id"], fidelity)
        complete = [t.id for t in store.trials(SEARCH_STUDY, status="complete") if t.score is not None]
    views = {int(k.split("/")[3]) for k in data["responses"] if k.startswith("/api/trials/")}
    assert len(complete) <= MAX_SCHEDULES and set(complete) <= views


def test_a_reports_exports_and_table_are_what_the_dashboard_serves_one_request_at_a_time(dashboard_db):  # noqa: F811
    """The report reads each study's costs once for all its exports and its table in one query: what it carries is
    what the dashboard answers to each download and each page of the table."""
    from steptune.dashboard import downloads, queries
    from steptune.report import report_data
    from steptune.storage import connect

    def same(text: str, fmt: str):  # an export's JSON but for the moment it was written
        if fmt != "json":
            return text
        d = json.loads(text)
        d["provenance"].pop("exported")
        return d

    url, _ = dashboard_db
    with connect(url, create=False) as store:
        data = report_data(store, SEARCH_STUDY, cache_dir=None)
        assert data["exports"]
        for tid, formats in data["exports"].items():
            for fmt, d in formats.items():
                alone = downloads.export(store, tid, fmt)
                assert (d["filename"], same(d["content"], fmt)) == (alone.filename, same(alone.content.decode(), fmt))
        pid = data["responses"]["/api/problems"][0]["id"]
        rows, offset = [], 0
        while offset < data["trials_total"]:
            rows += queries.trials_page(store, problem=pid, offset=offset, limit=queries.MAX_PAGE)["items"]
            offset += queries.MAX_PAGE
    assert data["trials"] == rows and len(rows) == data["trials_total"]


def test_a_report_of_more_trials_than_it_holds_keeps_the_best_and_says_so(dashboard_db, tmp_path, capsys,  # noqa: F811
                                                                          monkeypatch):
    from steptune import report
    from steptune.dashboard import open_read_only

    url, _ = dashboard_db
    store = open_read_only(url)
    try:
        every = report.report_data(store, SEARCH_STUDY, cache_dir=None)["trials"]
    finally:
        store.close()
    monkeypatch.setattr(report, "MAX_TRIALS", 10)
    out = tmp_path / "r.html"
    assert main(["report", "--study", SEARCH_STUDY, "--db", url, "-o", str(out)]) == 0
    said = capsys.readouterr().err
    assert (f"note: its trial table holds the best 10 of the problem's {len(every):,} trials by score (the dashboard, "
            "steptune dashboard, shows every one)") in " ".join(said.split()), said
    scored = sorted((t for t in every if t["score"] is not None), key=lambda t: (t["score"], t["id"]))
    page = out.read_text()
    for t in scored[:10]:  # the best ten are in the page's data, with the count of all
        assert f'"id":{t["id"]},' in page
    assert f'"trials_total":{len(every)}' in page
