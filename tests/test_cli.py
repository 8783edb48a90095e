"""The command line: bad input gets one clear line and exit code 2, good input runs."""

import json
import subprocess
import sys

import pytest

from steptune.cli import main
from steptune.space import noise, presets


def _write(tmp_path, name, d):
    p = tmp_path / name
    p.write_text(json.dumps(d))
    return p


def _valid(nfe=4):
    return presets.ddim(nfe, noise.VPLinear()).to_dict()


def _bad_cases():
    cases = {}
    d = _valid()
    d["steps"][1]["t"] = d["steps"][0]["t"] + 0.01
    cases["non_monotone"] = (d, ["step 1", "'t'"])
    d = _valid()
    d["steps"][1]["order"] = 3
    cases["order_too_high"] = (d, ["step 1", "order"])
    d = _valid()
    d["steps"][2]["prediction"] = "velocity"
    cases["unknown_prediction"] = (d, ["step 2", "prediction"])
    d = _valid()
    d["steps"][-1]["corrector"] = {"kind": "pseudo"}
    cases["corrector_last"] = (d, ["step 3", "corrector", "last step"])
    d = _valid()
    d["nfe"] = 7
    cases["nfe_field_mismatch"] = (d, ["nfe", "7", "4"])
    d = _valid()
    d["version"] = 99
    cases["newer_schema"] = (d, ["version 99", "newer"])
    return cases


@pytest.mark.parametrize("case", sorted(_bad_cases()))
def test_invalid_schedule_file_is_refused(case, tmp_path, capsys):
    d, words = _bad_cases()[case]
    path = _write(tmp_path, f"{case}.json", d)
    code = main(["eval", "--problem", "gmm-2d", "--schedule", str(path), "--cache", str(tmp_path / "c")])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: ") and str(path) in lines[0]
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert "Traceback" not in captured.err + captured.out
    assert not (tmp_path / "c").exists(), "nothing may run for an invalid schedule"


def test_nfe_flag_must_match_file(tmp_path, capsys):
    path = _write(tmp_path, "s.json", _valid(4))
    code = main(["eval", "--schedule", str(path), "--nfe", "5", "--cache", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code == 2 and "4 model calls" in err and "--nfe" in err


@pytest.mark.parametrize("argv,words", [
    (["eval", "--schedule", "preset:nope", "--nfe", "5"], ["unknown preset", "steptune presets"]),
    (["eval", "--schedule", "preset:unipc", "--nfe", "5"], ["unknown preset 'unipc'; did you mean unipc-bh1 or "
                                                           "unipc-bh2? run 'steptune presets'"]),
    (["eval", "--schedule", "preset:ddim2", "--nfe", "5"], ["did you mean ddim? run"]),
    (["eval", "--schedule", "preset:ddim"], ["needs --nfe"]),
    (["eval", "--schedule", "preset:ddim", "--nfe", "5,x"], ["--nfe", "'x'"]),
    (["eval", "--schedule", "missing.json"], ["no such file"]),
    (["eval", "--schedule", "preset:ddim:order", "--nfe", "5"], ["key=value"]),
    (["eval", "--schedule", "preset:ddim:bogus=1", "--nfe", "5"], ["bogus"]),
    (["eval", "--schedule", "preset:unipc-bh2:order=4", "--nfe", "5"],  # refused at every NFE, not only where used
     ["preset 'unipc-bh2': option 'order' is 4; use 1 to 3 (its corrector is one order higher, at most 4)"]),
    (["eval", "--schedule", "preset:deis:order=0", "--nfe", "8"], ["preset 'deis': option 'order' is 0; use 1 to 4"]),
    (["eval", "--schedule", "preset:ddim", "--nfe", "5", "--device", "gpu0"], ["--device 'gpu0'", "cuda:N"]),
])
def test_bad_arguments(argv, words, capsys, tmp_path):
    code = main([*argv, "--cache", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    for w in words:
        assert w in err, (w, err)


def test_console_script_prints_no_traceback(tmp_path):
    path = _write(tmp_path, "bad.json", _bad_cases()["order_too_high"][0])
    res = subprocess.run([sys.executable, "-m", "steptune", "eval", "--schedule", str(path)],
                         capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr


def test_presets_json_lists_every_preset(capsys):
    assert main(["presets", "--json"]) == 0
    names = [p["name"] for p in json.loads(capsys.readouterr().out)]
    assert names == list(presets.names())


def test_schedule_command_round_trips(tmp_path, capsys):
    out = tmp_path / "u.json"
    assert main(["schedule", "preset:unipc-bh2:order=3", "--nfe", "6", "-o", str(out)]) == 0
    from steptune import load_schedule

    s = load_schedule(out)
    assert s.nfe == 6 and s == presets.build("unipc-bh2:order=3", 6, noise.VPLinear())


def test_a_preset_list_keeps_each_specs_own_options_together(tmp_path, capsys):
    from steptune.space.presets import split_specs

    assert split_specs("unipc-bh2:order=3,lower_order_final=false,ddim") == [
        "unipc-bh2:order=3,lower_order_final=false", "ddim"]
    assert split_specs("ddim, dpm-solver++-3m:second_scale=1 ,heun,") == ["ddim", "dpm-solver++-3m:second_scale=1",
                                                                       "heun"]
    code = main(["sweep", "--problem", "gmm-2d", "--nfe", "4", "--presets", "unipc-bh2:order=3,lower_order_final=false,"
                 "ddim", "--out", str(tmp_path / "sw"), "--cache", str(tmp_path / "c"), "--json"])
    assert code == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["preset"] for r in rows] == ["unipc-bh2:order=3,lower_order_final=false", "ddim"]
