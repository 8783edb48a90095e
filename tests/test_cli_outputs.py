"""Output paths that cannot be written are refused before any work: one line, exit status 2."""

import pytest

from steptune.cli import main
from steptune.storage import connect


@pytest.fixture
def paths(tmp_path):
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "a-folder").mkdir()
    return tmp_path


CASES = [
    (["schedule", "preset:ddim", "--nfe", "4", "-o", "{d}/a-folder"], "-o {d}/a-folder is a folder; give a file name"),
    (["schedule", "preset:ddim", "--nfe", "4", "-o", "{d}/a-file/x.json"],
     "-o {d}/a-file/x.json: {d}/a-file is a file, not a folder; choose another path"),
    (["sweep", "--problem", "gmm-2d", "--nfe", "4", "--presets", "ddim", "--out", "{d}/a-file"],
     "--out {d}/a-file is a file; give a folder"),
    (["search", "--problem", "gmm-2d", "--nfe", "4", "--method", "random", "--budget", "2", "--out",
      "{d}/a-file/sub", "--db", "sqlite:///{d}/s.db"],
     "--out {d}/a-file/sub: {d}/a-file is a file, not a folder; choose another path"),
    (["export", "--study", "s", "--nfe", "4", "-o", "{d}/a-folder", "--db", "sqlite:///{d}/s.db"],
     "-o {d}/a-folder is a folder; give a file name"),
    (["export", "--study", "s", "--nfe", "4", "--format", "diffusers", "-o", "{d}/a-file", "--db",
      "sqlite:///{d}/s.db"], "-o {d}/a-file is a file; give a folder"),
    (["report", "--study", "s", "-o", "{d}/a-folder", "--db", "sqlite:///{d}/s.db"],
     "-o {d}/a-folder is a folder; give a file name"),
    (["search", "--problem", "gmm-2d", "--nfe", "4", "--method", "random", "--budget", "2", "--out",
      "{d}/" + "x" * 300, "--db", "sqlite:///{d}/s.db"],
     "--out {d}/" + "x" * 300 + ": File name too long; choose another path"),
    (["schedule", "preset:ddim", "--nfe", "4", "-o", "{d}/" + "x" * 300 + ".json"],
     "-o {d}/" + "x" * 300 + ".json: File name too long; choose another path"),
]


@pytest.mark.parametrize("argv,message", CASES, ids=lambda c: c[0] if isinstance(c, list) else "")
def test_an_output_path_that_cannot_be_written_is_refused_first(argv, message, paths, capsys):
    d = str(paths)
    if "export" in argv or "report" in argv:
        with connect(f"sqlite:///{d}/s.db") as db:
            db.create_study("s", method="sweep")
    assert main([a.format(d=d) for a in argv] + ["--cache", f"{d}/cache"] * (argv[0] in ("sweep", "search"))) == 2
    assert capsys.readouterr().err == f"error: {message.format(d=d)}\n"
    if argv[0] == "search":  # refused before the study was made
        assert not (paths / "s.db").exists()


@pytest.mark.parametrize("option,message", [(["--samples", "0"], "--samples 0: give at least 1"),
                                            (["--samples", "5000"], "--samples 5000: the heldout bank holds 1024 "
                                                                    "states; give at most that"),
                                            (["--cache", "{d}/a-file"], "--cache {d}/a-file is a file; give a folder")])
def test_eval_refuses_a_sample_count_or_cache_it_cannot_use(option, message, paths, capsys):
    d = str(paths)
    argv = ["eval", "--problem", "gmm-2d", "-s", "preset:ddim", "--nfe", "4", "--cache", f"{d}/cache"]
    assert main([*argv, *(o.format(d=d) for o in option)]) == 2
    assert capsys.readouterr().err == f"error: {message.format(d=d)}\n"
