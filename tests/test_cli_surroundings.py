"""The command line in the surroundings users start it in: a narrow terminal, a closed or ASCII-only stdout, names
with square brackets or path separators, FORCE_COLOR in a log, odd environment variables, in-memory databases."""

from __future__ import annotations

import io
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from rich.table import Table

from steptune.cli import main
from steptune.cli.console import _Results
from steptune.storage import StorageError, connect

STEPTUNE = Path(sys.executable).parent / "steptune"
CELLS = ["4", "0.1815", "0.02218", "unipc-bh2 (time-quadratic)", "0.0367", "1,116", "1,219,456", "10.41 s"]
HEADERS = ["NFE", "searched (held-out)", "searched (train)", "best preset", "preset (held-out)", "evals",
           "model calls", "wall"]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _table_in(width: int) -> list[str]:
    out = _Terminal()
    table = Table(title="best per NFE")
    for h in HEADERS:
        table.add_column(h, justify="left" if h == "best preset" else "right")
    table.add_row(*CELLS)
    _Results(file=out, width=width, force_terminal=True, color_system=None, markup=False).print(table)
    return out.getvalue().splitlines()


@pytest.mark.parametrize("width", [60, 80, 100])
def test_a_table_in_a_narrow_terminal_keeps_every_number_whole(width):
    lines = _table_in(width)
    text = "\n".join(lines)
    for number in ("0.1815", "0.02218", "1,219,456", "10.41 s", "1,116"):
        assert number in text, text  # rich would cut them short ("0.02…")
    assert "…" not in text
    assert max(len(line) for line in lines) <= width, text  # folded text, not lines the terminal wraps
    assert "unip" in text and "c)" in text  # the text is folded, not dropped


def test_a_table_too_wide_for_even_folded_text_is_printed_whole():
    lines = _table_in(30)
    assert "1,219,456" in "\n".join(lines) and max(len(line) for line in lines) > 30


def _cli(args, env=None, **kw):
    return subprocess.run([str(STEPTUNE), *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})}, **kw)


def test_a_closed_stdout_or_an_ascii_stream_is_written_to_without_a_traceback(tmp_path):
    closed = subprocess.run(f"'{STEPTUNE}' schedule preset:ddim --nfe 4 >&-", shell=True, capture_output=True,
                            text=True, timeout=300)
    assert closed.returncode == 0 and "Traceback" not in closed.stderr, closed.stderr
    ascii_ = _cli(["relax", "--help"], env={"PYTHONIOENCODING": "ascii"})
    assert ascii_.returncode == 0 and "\\u03c9" in ascii_.stdout, ascii_.stderr  # the omega, escaped


def test_force_color_in_a_log_gives_stamped_lines_not_a_live_bar(tmp_path):
    run = _cli(["search", "--problem", "gmm-2d", "--nfe", "3", "--budget", "2", "--confirm", "0", "--cheap-samples",
                "16", "--heldout-samples", "64", "--db", f"sqlite:///{tmp_path / 'x.db'}", "--out", str(tmp_path),
                "--cache", str(tmp_path / "cache"), "--study", "fc"],
               env={"FORCE_COLOR": "1", "STEPTUNE_LOG_INTERVAL": "0"})
    assert run.returncode == 0, run.stderr
    assert "\x1b[?25l" not in run.stderr and "\r" not in run.stderr  # no cursor control of a live display
    assert any(line.startswith("[0:00:0") and "search 2/2" in line for line in run.stderr.splitlines()), run.stderr


@pytest.mark.parametrize("value", ["", "abc", "-1", "nan"])
def test_a_log_interval_that_is_not_seconds_is_refused_before_anything_is_written(tmp_path, capsys, monkeypatch,
                                                                                   value):
    monkeypatch.setenv("STEPTUNE_LOG_INTERVAL", value)
    db = tmp_path / "x.db"
    code = main(["search", "--problem", "gmm-2d", "--nfe", "3", "--budget", "2", "--confirm", "0", "--db",
                 f"sqlite:///{db}", "--out", str(tmp_path), "--cache", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    if value == "":  # empty is unset: the default
        assert code == 0, err
        return
    assert code == 2 and err.strip() == (f"error: STEPTUNE_LOG_INTERVAL={value!r}: give the seconds between progress "
                                         "lines as a number, 0 or more (0 writes a line for every result), or unset "
                                         "it for the default 30"), err
    assert not db.exists()
    assert main(["search", "--help"]) == 0 and "Usage" in capsys.readouterr().out  # its help is still shown


def test_names_with_square_brackets_are_printed_as_they_are(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    argv = ["search", "--problem", "gmm-2d", "--nfe", "3", "--budget", "2", "--confirm", "1", "--cheap-samples", "16",
            "--heldout-samples", "64", "--db", url, "--out", str(tmp_path), "--cache", str(tmp_path / "cache"),
            "--study", "s[x]"]
    assert main(argv) == 0
    said = capsys.readouterr()
    assert "study 's[x]' is in the database" in said.err and (tmp_path / "s[x].json").exists(), said.err
    for argv in (["status", "--study", "s[x]"], ["best", "--study", "s[x]", "--nfe", "3"], ["studies"]):
        assert main([*argv, "--db", url]) == 0
        assert "s[x]" in capsys.readouterr().out
    out = tmp_path / "[red]best[nfe3].json"
    assert main(["export", "--study", "s[x]", "--nfe", "3", "--db", url, "-o", str(out)]) == 0
    assert out.exists() and f"wrote {out}" in capsys.readouterr().err


def test_a_study_name_is_one_line_of_at_most_200_characters_and_names_no_file_elsewhere(tmp_path, capsys):
    with connect(f"sqlite:///{tmp_path / 'x.db'}") as db:
        for bad, said in (("a\nb", "holds a line break"), ("x" * 201, "201 characters long; use at most 200"),
                          ("   ", "not empty or blank"), ("a\u202eb", "invisible format character"),
                          ("a\u2028b", "holds a line break")):
            with pytest.raises(StorageError, match=said):
                db.create_study(bad)
        db.create_study("x" * 200)
        assert [s.name for s in db.studies()] == ["x" * 200]
    url = f"sqlite:///{tmp_path / 'y.db'}"
    out = tmp_path / "out"
    assert main(["search", "--problem", "gmm-2d", "--nfe", "3", "--budget", "2", "--confirm", "0", "--db", url,
                 "--out", str(out), "--cache", str(tmp_path / "cache"), "--study", "../../team/exp"]) == 0
    saved = list(out.iterdir())
    assert [p.name for p in saved] == ["_._.._team_exp.json"] and json.loads(saved[0].read_text())["study"] == \
        "../../team/exp"
    long = "é" * 200  # 400 bytes: more than a file name holds
    assert main(["search", "--problem", "gmm-2d", "--nfe", "3", "--budget", "2", "--confirm", "0", "--db", url,
                 "--out", str(out), "--cache", str(tmp_path / "cache"), "--study", long]) == 0
    made = [p for p in out.iterdir() if p.name != "_._.._team_exp.json"]
    assert len(made) == 1 and json.loads(made[0].read_text())["study"] == long and len(made[0].name.encode()) <= 160
    capsys.readouterr()


@pytest.mark.parametrize("name", ["plain", "a b", "it's", "$HOME"])
def test_a_suggested_command_reads_back_as_the_words_it_was_made_of(name):
    from steptune.suggested import command

    text = command("steptune", "best", "--study", name)
    assert text[0] == text[-1] and text[0] in "'\"" and shlex.split(text[1:-1]) == ["steptune", "best", "--study", name]


def test_a_message_suggests_a_command_a_shell_reads_back_for_a_name_that_needs_quotes(tmp_path, capsys):
    url, name = f"sqlite:///{tmp_path / 'x.db'}", "team's run 1"
    assert main(["search", "--problem", "gmm-2d", "--nfe", "3", "--budget", "2", "--confirm", "0", "--db", url,
                 "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache"), "--study", name]) == 0
    capsys.readouterr()
    assert main(["refine", "--study", name, "--trial", "99999", "--db", url]) == 2
    err = capsys.readouterr().err.strip()
    suggested = err.split("; ", 1)[1].rsplit(" lists its best trials", 1)[0]
    assert suggested[0] == suggested[-1] == '"', err  # the name's own quotes inside, not nested in others
    assert shlex.split(suggested[1:-1]) == ["steptune", "best", "--study", name], err


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///", "sqlite:///:memory:", "sqlite:///file::memory:?uri=true"])
def test_an_in_memory_database_is_refused(url, capsys):
    assert main(["studies", "--db", url]) == 2
    assert "is an in-memory SQLite database, which is gone when the command ends" in capsys.readouterr().err


def test_db_delete_says_what_it_would_delete_and_deletes_only_with_yes(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    for study in ("old test", "keep"):
        assert main(["search", "--problem", "gmm-2d", "--nfe", "3", "--budget", "2", "--confirm", "0", "--db", url,
                     "--out", str(tmp_path), "--cache", str(tmp_path / "cache"), "--study", study]) == 0
    with connect(url) as db:
        n = db.get_study("old test").n_trials
    capsys.readouterr()
    assert main(["db", "delete", "--study", "old test", "--db", url]) == 2
    assert capsys.readouterr().err.strip() == (f"error: study 'old test' (s3) holds {n} trials; add --yes to delete it "
                                               "with them (nothing is deleted without it)")
    assert main(["db", "delete", "--study", "old test", "--db", url, "--yes"]) == 0
    assert f"deleted study 'old test' and its {n} trials" in capsys.readouterr().err
    with connect(url) as db:
        assert [s.name for s in db.studies()] == ["keep"]


def test_compiled_code_is_cached_in_the_temporary_folder_where_the_home_does_not_exist(tmp_path):
    """A service account's home often does not exist: numba's cache goes to a folder of the user's in the temporary
    folder, no folder is made where the home would be, and a function compiled with its cache works and is kept."""
    (tmp_path / "tmp").mkdir()
    (tmp_path / "cached.py").write_text("from steptune.evaluators.compiled import njit\n\n\n"
                                        "@njit(cache=True)\ndef twice(x):\n    return 2 * x\n")
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "XDG_CACHE_HOME")}
    env.update(HOME=str(tmp_path / "home"), TMPDIR=str(tmp_path / "tmp"), PYTHONPATH=str(tmp_path))
    code = "import os, cached; print(cached.twice(21), os.environ['NUMBA_CACHE_DIR'])"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    answer, folder = r.stdout.split()
    assert answer == "42" and Path(folder) == tmp_path / "tmp" / f"steptune-{os.getuid()}" / "numba", r.stdout
    assert not (tmp_path / "home").exists()
    assert any(p.suffix == ".nbi" for p in Path(folder).rglob("*")), list(Path(folder).rglob("*"))

    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")  # where the user says, the home or not
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                       cwd=tmp_path)
    assert r.returncode == 0 and Path(r.stdout.split()[1]) == tmp_path / "xdg" / "steptune" / "numba", r.stderr
    assert any(p.suffix == ".nbi" for p in (tmp_path / "xdg").rglob("*"))
