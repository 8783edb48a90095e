"""`steptune relax` / `relax-report`: rounds stored per instance, resume continues the learner's state,
bad user systems end in one line naming the file (exit 2) with earlier rounds kept."""

import json

import numpy as np
import pytest
import scipy.sparse as sp

from steptune.cli import main
from steptune.evaluators.linear import poisson_2d
from steptune.storage import connect


def write_sequence(folder, count=8, m=5):
    folder.mkdir(parents=True, exist_ok=True)
    A = poisson_2d(m)
    rng = np.random.default_rng(0)
    rows = ["name,c"]
    for i in range(count):
        c = 0.05 * i
        sp.save_npz(folder / f"{i:03d}.npz", (A + c * sp.identity(m * m)).tocsr())
        np.save(folder / f"{i:03d}.rhs.npy", rng.standard_normal(m * m))
        rows.append(f"{i:03d},{c}")
    (folder / "context.csv").write_text("\n".join(rows) + "\n")
    return folder


def run(capsys, *args):
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_relax_records_every_round_and_reports(tmp_path, capsys):
    db = f"sqlite:///{tmp_path / 'r.db'}"
    code, out, err = run(capsys, "relax", "--problem", "shifted-laplacian", "--m", "6", "--steps", "40",
                         "--learner", "chebcb", "--study", "s", "--db", db, "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["rounds"] == 40 and summary["new_rounds"] == 40
    rows = connect(db).relaxation_rounds("s")
    assert [r.round for r in rows] == list(range(40))
    assert all(r.converged and r.iterations > 0 and "c" in r.context and r.context["seconds"] > 0 for r in rows)
    assert {r.omega for r in rows} <= {float(w) for w in np.linspace(1, 1.95, 20)}
    # the learner's share of the solve time, as a number (it was the table's text)
    solve = sum(r.context["seconds"] for r in rows)
    learn = sum(r.context["learner_seconds"] + r.context.get("probe_seconds", 0.0) for r in rows)
    assert summary["learner_overhead"] == pytest.approx(learn / solve, abs=1e-6)
    code, out, err = run(capsys, "relax", "--problem", "shifted-laplacian", "--m", "6", "--steps", "40",
                         "--learner", "chebcb", "--study", "s", "--db", db, "--json")
    assert code == 0 and json.loads(out)["new_rounds"] == 0 and "already has all 40 rounds" in err
    png = tmp_path / "s.png"
    code, out, err = run(capsys, "relax-report", "--study", "s", "--db", db, "-o", str(png), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert png.is_file() and report["rounds"] == 40
    means = report["mean_iterations"]
    assert means["gauss-seidel"] > means["chebcb"] >= means["instance-optimal (grid)"]


def test_resumed_study_continues_the_learner_state(tmp_path, capsys):
    folder = write_sequence(tmp_path / "seq")
    db_full, db_cut = (f"sqlite:///{tmp_path / n}" for n in ("full.db", "cut.db"))
    assert run(capsys, "relax", "--matrices", str(folder), "--learner", "tsallis-inf", "--study", "a", "--seed", "2",
               "--db", db_full)[0] == 0
    # the same run, interrupted by a missing right-hand side at instance 5, then resumed once it is back
    rhs = folder / "005.rhs.npy"
    rhs.rename(tmp_path / "kept.npy")
    code, _, err = run(capsys, "relax", "--matrices", str(folder), "--learner", "tsallis-inf", "--study", "a",
                       "--seed", "2", "--db", db_cut)
    assert code == 2 and "005.npz" in err and "right-hand side" in err
    assert len(connect(db_cut).relaxation_rounds("a")) == 5
    (tmp_path / "kept.npy").rename(rhs)
    assert run(capsys, "relax", "--matrices", str(folder), "--learner", "tsallis-inf", "--study", "a", "--seed", "2",
               "--db", db_cut)[0] == 0
    full = [(r.arm, r.iterations) for r in connect(db_full).relaxation_rounds("a")]
    resumed = [(r.arm, r.iterations) for r in connect(db_cut).relaxation_rounds("a")]
    assert resumed == full and len(full) == 8


def test_resume_with_another_setup_is_refused(tmp_path, capsys):
    db = f"sqlite:///{tmp_path / 'r.db'}"
    base = ["relax", "--problem", "shifted-laplacian", "--m", "4", "--steps", "5", "--study", "x", "--db", db]
    assert run(capsys, *base)[0] == 0
    code, _, err = run(capsys, *base[:-4], "--learner", "chebcb", *base[-4:])
    assert code == 2 and err.startswith("error: study 'x' was run with another setup (policy.learner 'tsallis-inf' "
                                        "there, 'chebcb' here); give the options it was run with to resume it"), err
    code, _, err = run(capsys, *base[:5], "--steps", "7", *base[7:])  # a longer sequence: the key that differs
    assert code == 2 and "another setup (problem.steps 5 there, 7 here)" in err, err
    with connect(db) as store:
        assert len(store.relaxation_rounds("x")) == 5


def _break(folder, how):
    A = poisson_2d(5).tolil()
    path = folder / "004.npz"
    if how == "non-square":
        sp.save_npz(path, sp.csr_matrix(np.ones((25, 24))))
        return "not square"
    if how == "non-symmetric":
        A[0, 1] = -2.0
    elif how == "indefinite":
        A = (A.tocsr() - 4.5 * sp.identity(25)).tolil()
        A.setdiag(np.r_[np.full(24, 0.5), 0.5])  # positive diagonal, negative eigenvalues
    elif how == "nan":
        A[3, 3] = np.nan
    elif how == "missing rhs":
        (folder / "004.rhs.npy").unlink()
        return "no right-hand side"
    elif how == "nan rhs":
        b = np.load(folder / "004.rhs.npy")
        b[2] = np.nan
        np.save(folder / "004.rhs.npy", b)
        return "NaN"
    sp.save_npz(path, A.tocsr())
    return {"non-symmetric": "not symmetric", "indefinite": "not positive definite", "nan": "NaN"}[how]


@pytest.mark.parametrize("how", ["non-square", "non-symmetric", "indefinite", "nan", "missing rhs", "nan rhs"])
def test_bad_systems_end_in_one_line_naming_the_file(tmp_path, capsys, how):
    folder = write_sequence(tmp_path / "seq", count=6)
    phrase = _break(folder, how)
    db = f"sqlite:///{tmp_path / 'r.db'}"
    code, out, err = run(capsys, "relax", "--matrices", str(folder), "--learner", "tsallis-inf", "--study", "b",
                         "--db", db)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ")
    assert "004" in lines[0] and phrase in lines[0]
    rows = connect(db).relaxation_rounds("b")
    assert [r.round for r in rows] == [0, 1, 2, 3] and all(r.converged for r in rows)


def test_a_missing_context_row_is_named(tmp_path, capsys):
    folder = write_sequence(tmp_path / "seq", count=4)
    csv = folder / "context.csv"
    csv.write_text("\n".join(ln for ln in csv.read_text().splitlines() if not ln.startswith("002")) + "\n")
    code, _, err = run(capsys, "relax", "--matrices", str(folder), "--learner", "chebcb", "--study", "c",
                       "--db", f"sqlite:///{tmp_path / 'r.db'}")
    assert code == 2 and "context.csv" in err and "002" in err and len(err.strip().splitlines()) == 1


def test_unknown_learner_and_missing_context_are_user_errors(tmp_path, capsys):
    db = f"sqlite:///{tmp_path / 'r.db'}"
    code, _, err = run(capsys, "relax", "--learner", "nope", "--db", db)
    assert code == 2 and "--learner 'nope'" in err
    code, _, err = run(capsys, "relax", "--problem", "poisson", "--learner", "chebcb", "--db", db)
    assert code == 2 and "needs a context" in err


def test_heat_sequence_runs_warm_started_ssor_pcg(tmp_path, capsys):
    db = f"sqlite:///{tmp_path / 'r.db'}"
    code, out, err = run(capsys, "relax", "--problem", "heat2d", "--nx", "10", "--steps", "30", "--learner",
                         "tsallis-inf-cb", "--study", "h", "--db", db, "--json")
    assert code == 0, err
    rows = connect(db).relaxation_rounds("h")
    setup = connect(db).get_study("h").config
    assert setup["solver"] == "ssor-pcg" and setup["problem"]["nx"] == 10
    assert len(rows) == 30 and all(r.converged for r in rows)
    kappas = [r.context["kappa"] for r in rows]
    assert kappas[0] < kappas[-1] <= 0.1  # κ(t) = 0.1 sin 2πt on the first half period
    assert max(r.iterations for r in rows) < 20  # warm starts: a few PCG iterations per step


def test_young_learner_runs_end_to_end_and_reports_seconds(tmp_path, capsys):
    db = f"sqlite:///{tmp_path / 'r.db'}"
    code, out, err = run(capsys, "relax", "--problem", "reaction", "--m", "8", "--steps", "40", "--learner", "young",
                         "--prior", "lanczos", "--study", "y", "--db", db, "--json")
    assert code == 0, err
    rows = connect(db).relaxation_rounds("y")
    assert len(rows) == 40 and all(r.converged and r.arm is None for r in rows)
    assert rows[0].context["probe_matvecs"] == 30 and 0 < rows[0].context["prior_mu"] < 1
    assert all(r.context["mode"] == "model" and "factor" in r.context for r in rows)
    assert connect(db).get_study("y").config["policy"]["prior"] == "lanczos"
    code, out, err = run(capsys, "relax-report", "--study", "y", "--db", db, "-o", str(tmp_path / "y.png"), "--json")
    assert code == 0, err
    report = json.loads(out)
    seconds = report["seconds"]
    assert seconds["solve"] > 0 and seconds["probe"] > 0 and report["probe_matvecs"] == 30
    assert seconds["total"] == pytest.approx(seconds["solve"] + seconds["learner"] + seconds["probe"])
    means = report["mean_iterations"]
    assert means["young"] < means[next(k for k in means if k.startswith("best fixed"))]


def test_resumed_young_study_continues_from_the_stored_factors(tmp_path, capsys):
    folder = write_sequence(tmp_path / "seq", count=10, m=8)
    db_full, db_cut = (f"sqlite:///{tmp_path / n}" for n in ("full.db", "cut.db"))
    args = ["relax", "--matrices", str(folder), "--learner", "young", "--study", "a"]
    assert run(capsys, *args, "--db", db_full)[0] == 0
    rhs = folder / "006.rhs.npy"
    rhs.rename(tmp_path / "kept.npy")
    assert run(capsys, *args, "--db", db_cut)[0] == 2
    assert len(connect(db_cut).relaxation_rounds("a")) == 6
    (tmp_path / "kept.npy").rename(rhs)
    assert run(capsys, *args, "--db", db_cut)[0] == 0
    full = [(r.omega, r.iterations) for r in connect(db_full).relaxation_rounds("a")]
    resumed = [(r.omega, r.iterations) for r in connect(db_cut).relaxation_rounds("a")]
    assert resumed == full and len(full) == 10


@pytest.mark.parametrize("learner", ["young", "adaptive"])
def test_young_and_adaptive_refuse_other_solvers_before_anything_is_written(tmp_path, capsys, learner):
    db = f"sqlite:///{tmp_path / 'r.db'}"
    code, _, err = run(capsys, "relax", "--problem", "heat2d", "--nx", "8", "--steps", "3", "--learner", learner,
                       "--db", db)
    assert code == 2 and err.strip().endswith("plain SOR solves; use --solver sor (not ssor-pcg, the default for "
                                              "heat2d)") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r.db").exists()


@pytest.mark.parametrize("args, line", [
    (["--learner", "tsallis-inf", "--omega", "1.3"], "--omega is for --learner fixed; --learner tsallis-inf does not "
                                                     "use it"),
    (["--learner", "adaptive", "--omega-max", "1.5"], "--omega-max is for --learner tsallis-inf, tsallis-inf-cb, "
                                                      "chebcb or young; --learner adaptive does not use it"),
    (["--learner", "young", "--arms", "5"], "--arms is for --learner tsallis-inf, tsallis-inf-cb or chebcb; --learner "
                                            "young does not use it"),
    (["--problem", "poisson", "--nx", "50"], "--nx is for --problem heat2d; --problem poisson does not use it"),
    (["--nx", "50"], "--nx is for --problem heat2d; --problem shifted-laplacian does not use it"),
    (["--problem", "heat2d", "--m", "5"], "--m is for the problems other than heat2d; --problem heat2d does not use "
                                          "it"),
    (["--problem", "reaction", "--variance", "low"], "--variance is for --problem shifted-laplacian; --problem "
                                                     "reaction does not use it"),
    (["--matrices", "seq", "--steps", "3"], "--steps is for generated sequences (not --matrices); --matrices does not "
                                            "use it"),
    (["--matrices", "seq", "--problem", "heat2d"], "--problem heat2d and --matrices: give one"),
])
def test_an_option_the_sequence_or_learner_would_not_use_is_refused(tmp_path, capsys, monkeypatch, args, line):
    """Such an option was accepted and ignored (the study recorded a setup that never ran): one line, nothing
    written."""
    monkeypatch.chdir(tmp_path)
    write_sequence(tmp_path / "seq", count=3)
    code, _, err = run(capsys, "relax", *args, "--db", f"sqlite:///{tmp_path / 'r.db'}")
    assert code == 2 and err.startswith(f"error: {line}") and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r.db").exists()


def test_relax_on_a_study_of_another_kind_says_what_it_is(tmp_path, capsys):
    db = f"sqlite:///{tmp_path / 'r.db'}"
    with connect(db) as store:
        store.create_study("s1", method="s3", kind="search")
    code, _, err = run(capsys, "relax", "--steps", "3", "--study", "s1", "--db", db)
    assert code == 2 and err.strip() == ("error: study 's1' is a search study, not a relaxation study; give relax "
                                         "another --study name"), err
    with connect(db) as store:
        assert store.relaxation_rounds("s1") == [] and store.get_study("s1").kind == "search"


def test_prior_is_for_young_only(tmp_path, capsys):
    db = f"sqlite:///{tmp_path / 'r.db'}"
    code, _, err = run(capsys, "relax", "--learner", "chebcb", "--prior", "lanczos", "--db", db)
    assert code == 2 and "--learner young only" in err


def test_warm_start_takes_an_earlier_studys_observations_and_is_recorded(tmp_path, capsys):
    db = f"sqlite:///{tmp_path / 'r.db'}"
    base = ["relax", "--problem", "reaction", "--m", "8", "--steps", "40", "--learner", "young", "--db", db]
    assert run(capsys, *base, "--seed", "0", "--study", "first")[0] == 0
    assert run(capsys, *base, "--seed", "1", "--study", "cold")[0] == 0
    assert run(capsys, *base, "--seed", "1", "--study", "warm", "--warm-start", "first")[0] == 0
    store = connect(db)
    config = store.get_study("warm").config["warm_start"]
    assert config["study"] == "first" and config["rounds"] == 40 and config["rounds_with_factor"] > 0
    cold, warm = (store.relaxation_rounds(n) for n in ("cold", "warm"))
    assert cold[0].omega == 1.0 and warm[0].omega > 1.0  # no Gauss–Seidel solve to start from
    assert sum(r.iterations for r in warm) < sum(r.iterations for r in cold)
    assert run(capsys, *base, "--seed", "1", "--study", "warm", "--warm-start", "first")[0] == 0  # resumes
    code, _, err = run(capsys, *base, "--seed", "1", "--study", "w2", "--warm-start", "nope")
    assert code == 2 and "--warm-start nope: no such study" in err
    code, _, err = run(capsys, "relax", "--problem", "laplace3d", "--m", "4", "--steps", "5", "--learner", "young",
                       "--db", db, "--study", "w3", "--warm-start", "first")
    assert code == 2 and "'log10_kappa'" in err and len(err.strip().splitlines()) == 1


def test_without_steps_a_short_sweep_has_its_300_systems_and_the_others_5000(tmp_path, capsys):
    from steptune.evaluators.linear import make_sequence

    db = f"sqlite:///{tmp_path / 'r.db'}"
    code, _, err = run(capsys, "relax", "--problem", "ninepoint", "--m", "3", "--learner", "fixed", "--omega", "1.5",
                       "--db", db, "--study", "short", "--json")
    assert code == 0, err
    with connect(db) as store:
        assert len(store.relaxation_rounds("short")) == 300
    assert len(make_sequence("shifted-laplacian", m=3)) == len(make_sequence("heat2d", nx=4)) == 5000
