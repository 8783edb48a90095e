"""`steptune run` as an overnight job meets it: a log file that shows progress, a refused start that
writes nothing, and a study that nothing ran in, re-run with a corrected job."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from runner_jobs import write_job

from steptune.cli import main
from steptune.jobs import load_job
from steptune.storage import connect

STEPTUNE = Path(sys.executable).parent / "steptune"


def unstamped(line: str) -> str:
    """A log line without the elapsed time every line of a run's log begins with."""
    return re.sub(r"^\[\d+:\d\d:\d\d\] ", "", line)


def test_log_of_a_redirected_job_has_progress_lines_and_whole_tables(tmp_path):
    job = write_job(tmp_path / "job.toml", "logged", tmp_path / "cache", evaluations=8, nfe="[3]")
    log = tmp_path / "run.log"
    env = {**os.environ, "STEPTUNE_LOG_INTERVAL": "0", "COLUMNS": "80"}
    with log.open("w") as f:  # as `steptune run job.toml > run.log 2>&1` does
        res = subprocess.run([str(STEPTUNE), "run", str(job), "--db", f"sqlite:///{tmp_path / 'x.db'}"],
                             stdout=f, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, timeout=600)
    text = log.read_text()
    assert res.returncode == 0, text
    lines = text.splitlines()
    search = [ln for ln in lines if "] search " in ln]
    assert search and "search 8/8 (100%)" in search[-1], text
    assert any("search 1/8" in ln or "search 2/8" in ln or "search 4/8" in ln for ln in search), text
    assert "evals/s" in search[-1] and "best 3:" in search[-1]
    assert any("] baseline " in ln for ln in lines) and any("] confirm " in ln for ln in lines), text
    before_table = lines[:next(i for i, ln in enumerate(lines) if "held-out confirmations" in ln)]
    assert all(re.match(r"\[\d+:\d\d:\d\d\] ", ln) for ln in before_table), text  # each with its time
    said = [ln.split("] ", 1)[1] for ln in lines if ln.startswith("[")]
    assert all(a != b for a, b in zip(said, said[1:])), f"a progress line is written twice running:\n{text}"
    assert "…" not in text, "tables in a log are printed whole, not cut at 80 columns"
    with connect(f"sqlite:///{tmp_path / 'x.db'}") as db:
        best_name = db.best_per_nfe("logged", fidelity="heldout")[0].schedule["name"]
    assert best_name in text


def test_the_log_of_a_job_on_ray_evaluators_holds_only_what_steptune_says(tmp_path):
    """The private Ray instance a run starts is steptune's business: the log opens with the run's own first line,
    not with Ray's notices about the instance."""
    job = write_job(tmp_path / "job.toml", "ray-log", tmp_path / "cache", evaluations=4, nfe="[3]", backend="ray")
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}  # as a new user's shell has it
    log = tmp_path / "run.log"
    with log.open("w") as f:
        res = subprocess.run([str(STEPTUNE), "run", str(job), "--db", f"sqlite:///{tmp_path / 'x.db'}"],
                             stdout=f, stderr=subprocess.STDOUT, env={**env, "STEPTUNE_LOG_INTERVAL": "0"},
                             cwd=tmp_path, timeout=600)
    text = log.read_text()
    assert res.returncode == 0, text
    assert re.match(r"\[\d+:\d\d:\d\d\] (preparing the evaluators: |choosing the presets' spacings: )", text), text
    # Ray: slow or not
    assert "Token authentication" not in text, text


def test_refused_ray_start_writes_nothing_and_the_corrected_job_runs(tmp_path, capsys):
    job = write_job(tmp_path / "job.toml", "rayaddr", tmp_path / "cache", evaluations=4, nfe="[3, 4]",
                    backend="ray")
    db = tmp_path / "r.db"
    code = main(["run", str(job), "--ray-address", "auto", "--db", f"sqlite:///{db}"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: backend.address") and len(err.strip().splitlines()) == 1, err
    assert not db.exists(), "a start refused before any work leaves no database behind"
    job.write_text(job.read_text().replace("nfe = [3, 4]", "nfe = [3]"))  # the user edits the job
    assert main(["run", str(job), "--backend", "local", "--db", f"sqlite:///{db}", "--json"]) == 0, \
        capsys.readouterr().err


def test_a_study_nothing_ran_in_takes_a_changed_job(tmp_path, capsys):
    first = load_job(write_job(tmp_path / "a.toml", "empty", tmp_path / "cache", evaluations=4, nfe="[3, 4]"))
    url = f"sqlite:///{tmp_path / 'x.db'}"
    with connect(url) as db:  # what a run stopped before its first evaluation leaves
        db.create_study("empty", method="s3", seed=first.seed, kind="search",
                        config={"job": first.model_dump(), "identity": first.identity(), "fidelity": "heldout"})
    changed = write_job(tmp_path / "b.toml", "empty", tmp_path / "cache", evaluations=4, nfe="[3]")
    assert main(["run", str(changed), "--db", url, "--json"]) == 0, capsys.readouterr().err
    with connect(url) as db:
        assert db.get_study("empty").config["identity"]["search"]["nfe"] == [3]
        assert {t.nfe for t in db.trials("empty") if t.fidelity == "train"} == {3}


def test_the_resume_line_counts_done_and_queued_apart_as_status_does(tmp_path, capsys):
    from runner_jobs import run_job

    from steptune.cli.run import study_status

    job = load_job(write_job(tmp_path / "job.toml", "half", tmp_path / "cache", evaluations=40, nfe="[3, 4]"))
    url = f"sqlite:///{tmp_path / 'x.db'}"
    result, _ = run_job(job, url, stop_after=10)  # stopped mid-batch, as Ctrl-C does
    assert result.status == "interrupted"
    with connect(url) as db:
        info = study_status(db, "half")
    assert info["queued"] > 0 and info["running"] == 0
    assert main(["run", str(tmp_path / "job.toml"), "--db", url, "--json"]) == 0
    line = next(unstamped(ln) for ln in capsys.readouterr().err.splitlines() if "] resuming" in ln)
    assert line == (f"resuming study 'half': {info['search_done']} search evaluations done, "
                    f"{info['queued']} queued"), line


@pytest.mark.parametrize("budget", ["1", "1s", "0.001"])
def test_a_search_stopped_by_its_time_budget_says_how_to_resume(tmp_path, capsys, budget):
    """A time budget given as seconds or as a duration; a stop before the presets were all scored says so: how many
    stored ones were not, or, stopped before every preset was even chosen and stored, that they were not all
    (it counted only the stored ones: 2 of 165). Checked against an uninterrupted run's baselines."""
    def search(study, *extra):
        return main(["search", "--problem", "gmm-2d", "--nfe", "3", "--method", "random", "--cheap-samples", "16",
                     "--heldout-samples", "64", "--study", study, "--out", str(tmp_path), "--cache",
                     str(tmp_path / "cache"), "--db", db, *extra])

    db = f"sqlite:///{tmp_path / 'x.db'}"
    assert search("whole", "--budget", "1") == 0
    capsys.readouterr()
    assert search("tb", "--budget", "100000", "--time-budget", budget) == 0
    with connect(db) as store:
        store_whole = [t for t in store.trials("whole") if t.info.get("baseline")]
        whole = {t.key for t in store_whole}
        trials = store.trials("tb")
    mine = [t for t in trials if t.info.get("baseline")]
    unscored = sum(1 for t in mine if t.status == "queued")
    err = capsys.readouterr().err
    if {t.key for t in mine} != whole:  # it says how many stored ones are not scored, and that some are not stored
        stored = f"{unscored} stored and not scored yet, " if unscored else ""
        line = re.search(r"stopped \(time-budget\) before its preset baselines were all chosen and scored \(" + stored
                         + r"(\d+) presets? and NFEs? not stored yet; (the best preset above "
                         r"is the best of those scored|none is scored yet)\); run the same command again to resume "
                         r"study 'tb'", err)
        assert line and int(line[1]) > 0, err
        assert f"stored {len(mine)} preset schedules for the held-out bank; the next run scores them" in err or \
            not mine, err
        assert "evaluating" not in err, err  # none was
    else:
        said = "" if not unscored else f" with {unscored} preset baseline{'s' * (unscored != 1)} not scored yet"
        tail = " (the best preset above is the best of those scored)" if said else ""
        assert f"stopped (time-budget){said}{tail}; run the same command again to resume study 'tb'" in err, err
    if budget == "0.001":  # over before the presets' spacings were chosen: nothing was stored, all of it is said
        assert trials == [] and {t.key for t in mine} != whole
        from steptune.search import DEFAULT_PRESETS

        chosen = {t.info["best_of"] for t in store_whole if "best_of" in t.info}  # presets and NFEs with a choice
        assert len(chosen) <= int(line[1]) <= len(DEFAULT_PRESETS) * 4, err  # NFE 3-6
        assert "none is scored yet" in err


def test_ctrl_c_in_a_sweep_says_what_was_kept(tmp_path):
    import signal
    import time

    cache = tmp_path / "cache"
    proc = subprocess.Popen([str(STEPTUNE), "sweep", "--problem", "gmm-digits", "--nfe", "3-40", "--cache", str(cache),
                             "--out", str(tmp_path / "out")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=tmp_path)
    deadline = time.monotonic() + 300
    while not list(cache.rglob("*.pt")):  # the reference is cached: the presets are being evaluated
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    last = err.strip().splitlines()[-1]
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert last.startswith("interrupted: the sweep stopped after ") and last.endswith(
        "evaluations; nothing was saved or stored; run the same command again to sweep"), last
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_sweep_in_a_log_writes_its_progress_as_plain_lines(tmp_path, capsys, monkeypatch):
    """The commands with a bar of their own (sweep, refine, dc, relax, train-digits) write plain lines in a log."""
    import re

    monkeypatch.setenv("STEPTUNE_LOG_INTERVAL", "0")
    assert main(["sweep", "--problem", "gmm-2d", "--nfe", "3,4", "--presets", "ddim,unipc-bh2", "--out",
                 str(tmp_path / "out"), "--cache", str(tmp_path / "cache")]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert lines and all(re.fullmatch(r"\[\d+:\d\d:\d\d\] .+", ln) for ln in lines), lines
    counts = [int(m.group(1)) for ln in lines if (m := re.search(r"\] evaluating presets (\d+)/4$", ln))]
    assert counts == sorted(set(counts)) and len(counts) >= 2 and counts[-1] == 4, lines


def test_a_count_started_over_is_not_written_as_its_part_ends(capsys):
    """``refine`` starts its count over before each message: the log ends on the last count made, not on 0."""
    from steptune.cli.progress import LogBar

    with LogBar(interval=0) as bar:
        task = bar.add_task("NFE 5", total=420)
        bar.update(task, completed=60)
        bar.reset(task)
    with LogBar(interval=0) as bar:
        task = bar.add_task("NFE 6", total=420)
        bar.reset(task)
        bar.update(task, completed=40)
    lines = [ln.split("] ", 1)[1] for ln in capsys.readouterr().err.splitlines()]
    assert lines == ["NFE 5 60/420", "NFE 6 40/420"]


def test_a_command_that_fails_at_once_writes_only_its_error_in_a_log(capsys):
    import pytest

    from steptune.cli.progress import LogBar

    with pytest.raises(RuntimeError), LogBar() as bar:
        task = bar.add_task("evaluating presets", total=3)
        bar.advance(task)
        raise RuntimeError("the reference could not be solved")
    assert capsys.readouterr().err == ""


SLOW_START = """
import json
import os
import time
from pathlib import Path

from steptune.evaluators import Plug

built = 0


def load():
    global built
    built += 1
    driver = Path(__file__).with_name("driver.pid")
    if not driver.exists():
        driver.write_text(str(os.getpid()))
    # the evaluators' own build (a second one in the driver, or one in a Ray actor): it lasts until a signal ends it
    while built > 1 or driver.read_text() != str(os.getpid()):
        time.sleep(0.05)
    return Plug(network=lambda x, t: 0.1 * x, shape=(4,), noise="vp-linear", prediction="eps",
                time_input="continuous")
"""


@pytest.mark.parametrize("signame,backend", [("SIGINT", "local"), ("SIGTERM", "local"), ("SIGINT", "ray")])
def test_a_signal_while_the_evaluators_start_stops_at_once(tmp_path, signame, backend):
    """Nothing is in flight while the evaluators start (a first run computes its references for minutes on a large
    model): Ctrl-C or SIGTERM then ends the run at once with one line, instead of waiting for the start to end; on
    Ray too, which turns what the signal raises in its wait into a KeyboardInterrupt of its own."""
    import signal

    (tmp_path / "slow_start.py").write_text(SLOW_START)
    job = write_job(tmp_path / "job.toml", "s", tmp_path / "cache", evaluations=4, nfe="[3]", backend=backend)
    job.write_text(job.read_text().replace('name = "gmm-2d"', 'model = "slow_start:load"'))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.Popen([str(STEPTUNE), "run", str(job), "--db", f"sqlite:///{tmp_path / 'x.db'}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env)
    first = proc.stderr.readline()  # said once the start has taken 3 s
    assert unstamped(first).startswith("preparing the evaluators: "), first + proc.stderr.read()
    proc.send_signal(getattr(signal, signame))
    _, rest = proc.communicate(timeout=60)
    shown = "Ctrl-C" if signame == "SIGINT" else "SIGTERM"
    assert proc.returncode == 130 and rest.strip() == (
        f"interrupted: {shown} while the evaluators were starting, before any evaluation of this run; nothing was "
        "lost: run the same command again to go on with study 's'"), rest
    with connect(f"sqlite:///{tmp_path / 'x.db'}") as db:
        assert db.trials("s") == []


def test_a_slow_step_is_said_while_it_runs_and_with_its_time_at_its_end():
    import re
    import threading

    from steptune.slow_steps import said_if_slow

    said, heard = [], threading.Event()

    def say(line):
        said.append(line)
        heard.set()

    with said_if_slow(say, "doing it", "done", after=0.01):
        assert heard.wait(30)  # the block goes on until the line is out
    assert said[0] == "doing it" and re.fullmatch(r"done after \d+ s", said[1]) and len(said) == 2
    quick = []
    with said_if_slow(quick.append, "doing it", "done", after=600):
        pass
    assert quick == []


def test_a_slow_step_in_a_log_is_stamped_as_the_bar_lines_beside_it(capsys):
    """In a log, the lines of a slow step carry the elapsed time as the log bar's lines do (a sweep's log had one
    unstamped line among stamped ones)."""
    import re
    import time

    from steptune.cli.progress import LogBar, said_in_log

    bar = LogBar(interval=0)
    bar.started -= 65  # as if the command had begun a minute ago
    lines: list[str] = []
    with said_in_log("computing it", "computed", since=bar.started, after=0.01):
        deadline = time.monotonic() + 30
        while not lines:  # the step goes on until its line is out
            lines += capsys.readouterr().err.splitlines()
            assert time.monotonic() < deadline
            time.sleep(0.01)
    task = bar.add_task("evaluating", total=2)
    bar.advance(task)
    lines += capsys.readouterr().err.splitlines()
    assert len(lines) == 3, lines
    assert re.fullmatch(r"\[0:01:0\d\] computing it", lines[0]), lines
    assert re.fullmatch(r"\[0:01:0\d\] computed after \d+ s", lines[1]), lines
    assert re.fullmatch(r"\[0:01:0\d\] evaluating 1/2", lines[2]), lines


def test_a_refine_stage_in_a_log_writes_its_counts_as_the_other_phases_do(tmp_path, capsys, monkeypatch):
    """The refinement stage of search --refine (a job's [refine]) was silent in a log between its first and last
    lines; its counts are written like the search's and the refine command's, with the NFE and its best."""
    import re

    monkeypatch.setenv("STEPTUNE_LOG_INTERVAL", "0")
    assert main(["search", "--problem", "gmm-2d", "--nfe", "4", "--method", "random", "--budget", "4",
                 "--cheap-samples", "16", "--heldout-samples", "64", "--refine", "20", "--study", "lg",
                 "--db", f"sqlite:///{tmp_path / 'x.db'}", "--cache", str(tmp_path / "cache"),
                 "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().err.splitlines()
    counts = [ln for ln in lines if re.fullmatch(r"\[\d+:\d\d:\d\d\] refine \d+/\d+ \| NFE 4 \| held-out RMSE [\d.e-]+",
                                                 ln)]
    first = next(i for i, ln in enumerate(lines) if unstamped(ln).startswith("refining NFE 4"))
    last = max(i for i, ln in enumerate(lines) if unstamped(ln).startswith("refined NFE 4"))
    assert len(counts) >= 2 and all(first < lines.index(ln) < last for ln in counts), lines


COMMANDS_WITHOUT_A_RUN = {  # a command with its own line on stopping, and one without: (argv, a line under way)
    "sweep": (["sweep", "--problem", "gmm-2d", "--nfe", "3-40"], "evaluating presets 2/"),
    "train-digits": (["train-digits", "--steps", "100000"], "classifier 2/"),
}


@pytest.mark.parametrize("command,signame", [("sweep", "SIGTERM"), ("train-digits", "SIGTERM"),
                                             ("train-digits", "SIGINT")])
def test_a_command_without_a_run_stopped_by_a_signal_says_it_was_interrupted(tmp_path, command, signame):
    """`kill` (or Ctrl-C) of a command that is not a run ends it at once with status 130 and a line saying so: the
    command's own (a sweep says what it kept), or a plain one; not silently, and not killed by SIGTERM's default."""
    import signal

    argv, under_way = COMMANDS_WITHOUT_A_RUN[command]
    env = {**os.environ, "STEPTUNE_LOG_INTERVAL": "0"}
    proc = subprocess.Popen([str(STEPTUNE), *argv, "--out", str(tmp_path / "out")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env)
    for line in proc.stderr:
        if under_way in line:
            break
    proc.send_signal(getattr(signal, signame))
    _, rest = proc.communicate(timeout=60)
    assert proc.returncode == 130, rest
    assert rest.strip().splitlines()[-1].startswith("interrupted") and "Traceback" not in rest, rest


def test_a_count_held_back_in_a_log_goes_out_before_a_line_the_run_says(capsys):
    """In a log, counts are written at most every interval; the last one held back is written before a line the
    run says (a refinement's result), not after it as an older count at the next change of phase."""
    from steptune.cli.progress import LineProgress

    def st(phase, done, total):
        return {"phase": phase, "done": 0, "total": 0, "best": {}, "phase_done": done, "phase_total": total,
                "detail": "NFE 4", "failed": 0, "retried": 0, "evaluators": 1, "busy": 0}

    with LineProgress(interval=3600) as shown:
        shown.update(st("refine", 10, 60))
        shown.update(st("refine", 50, 60))  # held back: within the interval
        shown.flush()
        print("refined NFE 4: 0.1 -> 0.05 (58 of at most 60 iterations, the time budget ran out)", file=sys.stderr)
        shown.update(st("confirm", 1, 2))
    lines = [ln.split("] ", 1)[-1] for ln in capsys.readouterr().err.splitlines()]
    assert lines == ["refine 10/60 | NFE 4", "refine 50/60 | NFE 4",
                     "refined NFE 4: 0.1 -> 0.05 (58 of at most 60 iterations, the time budget ran out)",
                     "confirm 1/2 | NFE 4"], lines


def test_a_stopped_search_printing_json_points_at_its_results_not_at_a_table(tmp_path, capsys):
    """With --json no table is printed: the stop's line speaks of the results' best preset, not of one 'above'."""
    assert main(["search", "--problem", "gmm-2d", "--nfe", "3", "--method", "random", "--cheap-samples", "16",
                 "--heldout-samples", "64", "--study", "js", "--out", str(tmp_path), "--cache", str(tmp_path / "cache"),
                 "--db", f"sqlite:///{tmp_path / 'x.db'}", "--budget", "100000", "--time-budget", "0.001",
                 "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["status"] == "time-budget"
    assert "none is scored yet" in err and "above" not in err, err  # stopped before any preset was scored
    from steptune.cli.run import print_stopped
    from steptune.runner import NfeSummary, RunResult

    row = NfeSummary(3, "ddim", 0.2, None, None, None)
    scored = RunResult("js", "time-budget", 0, 0, 0, 0, 1.0, [row], baselines_queued=2)
    for table, said in ((True, "the best preset above is"), (False, "its results' best preset is")):
        print_stopped(scored, table=table)
        assert f"with 2 preset baselines not scored yet ({said} the best of those scored)" in capsys.readouterr().err


def test_the_same_count_is_not_written_twice_running_with_another_rate(capsys):
    """A stop writes the phase's last count, which the log may have just written with another rate: once is enough."""
    from steptune.cli.progress import LineProgress

    st = {"phase": "search", "done": 2, "total": 60, "best": {8: 0.1}, "phase_done": 0, "phase_total": 0,
          "detail": "", "failed": 0, "retried": 0, "evaluators": 1, "busy": 1, "eta": 30.0}
    with LineProgress(interval=0) as shown:
        shown.update(st)
        shown.update({**st, "eta": 50.0, "busy": 0})  # later: another rate and ETA, the same count
        shown.update({**st, "done": 3})
    lines = [ln.split("] ", 1)[-1] for ln in capsys.readouterr().err.splitlines()]
    assert [ln.split(" | ")[0] for ln in lines] == ["search 2/60 (3%)", "search 3/60 (5%)"], lines
