"""A non-editable install into a fresh virtual environment gives a working `steptune` command."""

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pkg")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    # Dependencies come from this environment (no second torch download); steptune itself is built from
    # the source tree into a wheel and installed non-editable.
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "parent_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp / "dist"), str(ROOT)],
                   check=True, cwd=tmp)
    wheel = next((tmp / "dist").glob("steptune-*.whl"))
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True, cwd=tmp)
    return venv, tmp


def test_wheel_has_subpackages_and_no_generic_top_level(installed):
    venv, tmp = installed
    code = ("import steptune, steptune.space, steptune.evaluators, steptune.search, steptune.storage, importlib.util;"
            "print(steptune.__file__);"
            "print([m for m in ('space','evaluators','search','storage') if importlib.util.find_spec(m)])")
    res = subprocess.run([str(venv / "bin" / "python"), "-c", code], check=True, capture_output=True, text=True,
                         cwd=tmp)
    first, second = res.stdout.splitlines()
    assert str(venv) in first, "steptune must be imported from the installed wheel, not the source tree"
    assert second == "[]"


def test_cli_help_and_eval(installed):
    venv, tmp = installed
    exe = venv / "bin" / "steptune"
    res = subprocess.run([str(exe), "--help"], capture_output=True, text=True, cwd=tmp)
    assert res.returncode == 0 and "eval" in res.stdout and "presets" in res.stdout
    res = subprocess.run([str(exe), "eval", "--problem", "gmm-2d", "--schedule", "preset:ddim", "--nfe", "4",
                          "--bank", "train", "--samples", "32", "--cache", str(tmp / "cache"), "--json"],
                         capture_output=True, text=True, cwd=tmp)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["results"][0]["nfe"] == 4 and out["results"][0]["status"] == "complete"
    assert 0 < out["results"][0]["rmse"] < 10




def test_installed_database_migrations(installed):
    venv, tmp = installed
    res = subprocess.run([str(venv / "bin" / "steptune"), "db", "upgrade", "--db", f"sqlite:///{tmp / 'x.db'}"],
                         capture_output=True, text=True, cwd=tmp)
    assert res.returncode == 0, res.stderr
    assert (tmp / "x.db").exists()
