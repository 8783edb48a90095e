"""Commands given a database they cannot use: one line, exit status 2, and the file left as it was."""

import sqlite3

import pytest

from steptune.cli import main

READERS = [["studies"], ["best", "--study", "s"], ["export", "--study", "s", "--nfe", "4"], ["db", "current"],
           ["db", "upgrade"], ["report", "--study", "s"], ["relax-report", "--study", "s"], ["status", "--study", "s"],
           ["dc", "predict", "--study", "s", "--nfe", "5"]]


@pytest.mark.parametrize("argv", READERS, ids=lambda a: " ".join(a[:2]))
def test_a_file_that_is_not_a_database_is_one_line(argv, tmp_path, capsys):
    path = tmp_path / "notes.db"
    path.write_bytes(b"not a database\n")
    assert main([*argv, "--db", f"sqlite:///{path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "file is not a database" in err and "\n" not in err
    assert path.read_bytes() == b"not a database\n"


@pytest.mark.parametrize("argv", [a for a in READERS if a[0] != "db"], ids=lambda a: " ".join(a[:2]))
def test_reading_commands_leave_another_applications_database_alone(argv, tmp_path, capsys):
    path = tmp_path / "app.db"
    with sqlite3.connect(path) as c:
        c.execute("create table notes (x)")
    assert main([*argv, "--db", f"sqlite:///{path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no steptune schema" in err and "\n" not in err
    with sqlite3.connect(path) as c:
        assert c.execute("select name from sqlite_master").fetchall() == [("notes",)]


@pytest.mark.parametrize("argv", [a for a in READERS if a[0] != "db"], ids=lambda a: " ".join(a[:2]))
def test_reading_commands_create_no_database(argv, tmp_path, capsys):
    path = tmp_path / "none.db"
    assert main([*argv, "--db", f"sqlite:///{path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "no database at" in err and "\n" not in err
    assert not path.exists()


def test_db_upgrade_names_the_revisions_and_never_goes_back(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    assert main(["db", "upgrade", "--db", url]) == 0
    capsys.readouterr()
    assert main(["db", "upgrade", "--revision", "bogus", "--db", url]) == 2
    assert capsys.readouterr().err.startswith("error: unknown schema revision 'bogus'; the revisions are 0001, ")
    assert main(["db", "upgrade", "--revision", "0001", "--db", url]) == 0
    err = capsys.readouterr().err
    assert "which is past 0001; 'db upgrade' does not go back" in err


@pytest.mark.parametrize("argv", [["studies"], ["status", "--study", "s"]], ids=lambda a: a[0])
def test_a_server_that_does_not_answer_is_one_line_that_hides_the_password(argv, capsys):
    import socket

    with socket.socket() as s:  # a port nothing listens on: bound here, never listened on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        assert main([*argv, "--db", f"postgresql+psycopg://user:secret@127.0.0.1:{port}/x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and \
        f"cannot open the database postgresql+psycopg://user:***@127.0.0.1:{port}/x (" in err, err
    assert err.endswith("start the server, or fix the URL (--db or $STEPTUNE_DB)") and "\n" not in err, err
    assert "secret" not in err and "Storage(" not in err


@pytest.mark.parametrize("url, kind", [("mysql://user:secret@db.example/x", "mysql"),
                                       ("postgres://user:secret@db.example/x", "postgres")])
def test_a_database_steptune_does_not_store_in_is_named_without_its_password(url, kind, capsys):
    """Before any connection is tried: the kind the URL names, the two steptune stores in, and no password."""
    assert main(["studies", "--db", url]) == 2
    err = capsys.readouterr().err.strip()
    shown = url.replace("secret", "***")
    assert err == (f"error: database URL {shown!r} names a {kind} database; steptune stores in SQLite or PostgreSQL: "
                   "use sqlite:///path/to.db or postgresql+psycopg://user@host/db"), err
