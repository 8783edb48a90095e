"""Usage errors through the installed `steptune` command: typer's usage lines, exit status 2, no traceback,
whatever click typer runs on (recent typers ship their own)."""

import subprocess
import sys
from pathlib import Path

import pytest

STEPTUNE = Path(sys.executable).parent / "steptune"

CASES = {
    "unknown command": (["nosuchcmd"], "No such command 'nosuchcmd'"),
    "unknown option": (["eval", "--bogus"], "No such option: --bogus"),
    "missing option": (["export", "--nfe", "5"], "Missing option '--study'"),
    "bad choice": (["export", "--study", "s", "--nfe", "5", "--format", "png"], "Invalid value for '--format'"),
    "bad choice of bank": (["sweep", "--bank", "bogus"], "Invalid value for '--bank': 'bogus' is not one of 'heldout', "
                           "'train'."),
    "misspelled option": (["search", "--budjet", "3"], "No such option: --budjet"),
    "dc: unknown command": (["dc", "fitt"], "No such command 'fitt'"),
    "dc: unknown option": (["dc", "fit", "--bogus"], "No such option: --bogus"),
    "dc: missing option": (["dc", "predict", "--nfe", "5"], "Missing option '--study'"),
    "dc: bad choice": (["dc", "fit", "--method", "both-ways"], "Invalid value for '--method'"),
    "dc: bad fit": (["dc", "predict", "--study", "s", "--nfe", "5", "--fit", "Joint"], "Invalid value for '--fit': "
                    "'Joint' is not one of 'joint', 'greedy'."),
    "db: unknown command": (["db", "downgrade"], "No such command 'downgrade'"),
    "db: unknown option": (["db", "upgrade", "--bogus"], "No such option: --bogus"),
    "bad number": (["relax", "--steps", "many"], "Invalid value for '--steps'"),
    "no model calls": (["export", "--study", "s", "--nfe", "0"], "Invalid value for '--nfe'"),
    "dc: no model calls": (["dc", "predict", "--study", "s", "--nfe", "0"], "Invalid value for '--nfe'"),
}


@pytest.mark.parametrize("case", CASES)
def test_usage_error_is_the_usage_line_and_status_2(case, tmp_path):
    args, expected = CASES[case]
    res = subprocess.run([str(STEPTUNE), *args], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    assert res.stderr.startswith("Usage: steptune"), res.stderr
    assert f"Error: {expected}" in res.stderr
    assert not any(tmp_path.iterdir()), "a usage error must write nothing"


def test_version_and_help_exit_0(tmp_path):
    from steptune import __version__

    res = subprocess.run([str(STEPTUNE), "--version"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == f"steptune {__version__}"
    res = subprocess.run([str(STEPTUNE), "dc", "fit", "--help"], capture_output=True, text=True, cwd=tmp_path,
                         timeout=120)
    assert res.returncode == 0 and "--guidance" in res.stdout and "--cfg" not in res.stdout  # the old name is hidden


@pytest.mark.parametrize("command", [[], ["export"], ["run"]])
def test_a_flag_shows_no_value_type_in_the_help(command, tmp_path):
    """A flag takes no value: its row in the help names no type (typer 0.29 wrote <bool> beside each); an option
    that takes one keeps its type."""
    res = subprocess.run([str(STEPTUNE), *command, "--help"], capture_output=True, text=True, cwd=tmp_path,
                         timeout=120, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr
    cells = [line.strip("│ *") for line in res.stdout.splitlines()]
    rows = {cell.split()[0]: cell for cell in cells if cell.startswith("--")}
    assert "--help" in rows and "<bool>" not in res.stdout, res.stdout
    assert rows["--help"].split()[1] == "Show", rows["--help"]
    if command == ["export"]:
        assert "<int range>" in rows["--nfe"] and "<str>" in rows["--study"]


@pytest.mark.parametrize("group", [[], ["dc"], ["db"]])
def test_each_command_in_a_help_list_is_summed_up_on_one_line(group, tmp_path):
    """The first paragraph of each command's docstring, reflowed: wide enough not to wrap, each summary is one
    line of the list, not broken where the docstring's source lines break."""
    import inspect

    import typer

    from steptune.cli.main import app

    res = subprocess.run([str(STEPTUNE), *group, "--help"], capture_output=True, text=True, cwd=tmp_path,
                         timeout=120, env={"COLUMNS": "400", "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr
    command = typer.main.get_command(app)
    for name in group:
        command = command.commands[name]
    assert command.commands  # typer's own click: the group's commands, by name
    for name, cmd in command.commands.items():
        doc = inspect.getdoc(cmd.callback) if cmd.callback else cmd.help
        summary = " ".join(doc.split("\n\n")[0].split())
        assert any(line.strip("│ ").split(maxsplit=1) == [name, summary] for line in res.stdout.splitlines()), \
            f"{name}: {summary!r}\n{res.stdout}"
