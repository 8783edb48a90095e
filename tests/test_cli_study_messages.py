"""What the commands say about studies: a misspelled name, an SOR study asked for search results, a
finished study's status, a schedule imported twice."""

import json
import shutil
from pathlib import Path

import pytest

from steptune.cli import main
from steptune.storage import connect

PRE = Path(__file__).parent / "data" / "pre-redesign.db"


@pytest.fixture
def db(tmp_path):
    """A copy of a database written before the study kind was a column, upgraded."""
    path = tmp_path / "pre.db"
    shutil.copy(PRE, path)
    url = f"sqlite:///{path}"
    assert main(["db", "upgrade", "--db", url]) == 0
    return url


def test_a_misspelled_study_suggests_the_closest_and_counts_them(db, capsys):
    assert main(["best", "--study", "gmm-2d-quik", "--db", db]) == 2
    line = capsys.readouterr().err.strip()
    assert "no study named 'gmm-2d-quik'" in line and "6 studies" in line and "did you mean 'gmm-2d-quick'?" in line
    with connect(db) as store:
        for i in range(8):
            store.create_study(f"extra-{i}")
    assert main(["status", "--study", "nosuch", "--db", db]) == 2
    line = capsys.readouterr().err.strip()
    assert "14 studies" in line and "and 8 more" in line and "did you mean" not in line


@pytest.mark.parametrize("command", ["best", "status"])
def test_an_sor_study_is_summarised_and_pointed_to_its_report(db, command, capsys):
    assert main([command, "--study", "relax-small", "--db", db, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    with connect(db) as store:
        rounds = store.relaxation_rounds("relax-small")
    its = [r.iterations for r in rounds]
    assert got["rounds"] == len(rounds) == 50 and got["learner"] == "tsallis-inf"
    assert got["mean_iterations"] == pytest.approx(sum(its) / len(its))
    assert got["report"] == "steptune relax-report --study relax-small"


def test_a_finished_study_says_finished_not_an_eta(db, capsys):
    assert main(["status", "--study", "gmm-2d-quick", "--db", db]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert "search 120/120 (100%)" in first and first.rstrip().endswith("finished"), first


def test_a_schedule_imported_twice_is_refused_unless_allowed(db, tmp_path, capsys):
    exported = tmp_path / "best5.json"
    assert main(["export", "--study", "gmm-2d-quick", "--nfe", "5", "-o", str(exported), "--db", db]) == 0
    assert main(["import", str(exported), "--study", "mine", "--db", db]) == 0
    capsys.readouterr()
    assert main(["import", str(exported), "--study", "mine", "--db", db]) == 2
    line = capsys.readouterr().err.strip()
    assert "already holds this schedule" in line and "--allow-duplicates" in line
    with connect(db) as store:
        assert len(store.trials("mine")) == 1
    assert main(["import", str(exported), "--study", "mine", "--db", db, "--allow-duplicates"]) == 0
    with connect(db) as store:
        assert len(store.trials("mine")) == 2


def test_a_rate_reads_as_a_count_a_minute_not_in_exponent_form():
    from steptune.cli.console import per_minute

    assert [per_minute(v) for v in (1840.4, 12345.0, 100.0, 99.94, 0.25, None, float("nan"))] == [
        "1,840/min", "12,345/min", "100/min", "99.9/min", "0.25/min", "—", "—"]


def test_results_written_to_a_file_keep_each_line_of_text_whole_and_tables_within_200_columns():
    """`steptune status > file`: a long line of text (a run's state, its advice) is written as one line, not
    wrapped at the table width; a table still fits in 200 columns."""
    import io

    from rich.table import Table

    from steptune.cli.console import _Results

    buf = io.StringIO()
    con = _Results(file=buf, width=200)
    line = "no run is on it: the last one " + "x" * 250 + " ended without letting go; run the job again to resume"
    con.print(line)
    table = Table(title="best per NFE")
    for name in ("NFE", "a" * 120, "b" * 120):
        table.add_column(name)
    table.add_row("4", "0.1", "0.2")
    con.print(table)
    lines = buf.getvalue().splitlines()
    assert lines[0] == line
    assert all(len(row) <= 200 for row in lines[1:]) and len(lines) > 4


def test_conventions_given_for_an_exact_mixture_are_said_to_change_no_score(tmp_path, capsys):
    """On gmm-2d, --prediction and --time-scale change no score (its model is exact in every convention, simulated
    for the exports): a note says so, and the scores are those without them; a job file's are named by its keys."""
    argv = ["eval", "--problem", "gmm-2d", "--schedule", "preset:ddim", "--nfe", "4", "--json", "--cache",
            str(tmp_path / "cache")]
    assert main(argv) == 0
    plain = capsys.readouterr()
    assert main([*argv, "--prediction", "x0", "--time-scale", "1000"]) == 0
    given = capsys.readouterr()
    assert "note:" not in plain.err
    assert ("note: --prediction and --time-scale change no score on gmm-2d, whose exact model answers alike in every "
            "convention") in given.err
    scores = [[r["rmse"] for r in json.loads(o)["results"]] for o in (plain.out, given.out)]
    assert scores[0] == pytest.approx(scores[1], rel=1e-6)
    job = tmp_path / "job.toml"
    job.write_text('study = "conv"\n[problem]\nname = "gmm-2d"\nprediction = "x0"\n[search]\nnfe = [3]\n'
                   f'[evaluation]\ncheap_samples = 16\nheldout_samples = 64\nconfirm = 1\n'
                   f'cache = "{tmp_path / "cache"}"\nbaseline = false\n[budget]\nevaluations = 2\n')
    assert main(["run", str(job), "--db", f"sqlite:///{tmp_path / 'x.db'}", "--json"]) == 0
    assert "note: problem.prediction changes no score on gmm-2d" in capsys.readouterr().err
