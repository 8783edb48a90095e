"""The database the dashboard tests read: a real short search (``steptune run``, with its preset
baselines), a real preset sweep stored as a study (``steptune sweep --study``), a hand-made schedule
imported from an export, and SOR relaxation rounds from real SOR solves. Built once per test session."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from steptune.cli import main
from steptune.exports import export_dict, import_schedule
from steptune.storage import connect

SEARCH_STUDY = "gmm2d-s3"
PRESET_STUDY = "gmm2d-presets"
HAND_STUDY = "gmm2d-hand"
BANDIT_STUDY = "sor-bandit"
FIXED_STUDY = "sor-fixed-1.0"
OTHER_SEQUENCE_STUDY = "sor-fixed-loose-tol"
SEARCH_NFES = [3, 4, 5]
EVALUATIONS = 8  # per NFE
PRESETS = ["ddim", "dpm-solver++-2m", "unipc-bh2", "heun"]
PRESET_NFES = [3, 4, 5, 6]
OMEGAS = [1.0, 1.3, 1.6, 1.9]


def job_file(path: Path, cache: Path) -> Path:
    path.write_text(f"""
study = "{SEARCH_STUDY}"
seed = 0

[problem]
name = "gmm-2d"

[search]
method = "s3"
nfe = {SEARCH_NFES}

[evaluation]
cheap_samples = 32
train_samples = 64
heldout_samples = 1024
confirm = 2
cache = "{cache}"

[budget]
evaluations = {EVALUATIONS}

[backend]
kind = "local"
""")
    return path


def sor_iterations(omega: float, n: int, rhs_seed: int, tol: float = 1e-6, max_iter: int = 5000) -> int:
    """Iterations SOR needs on the 1-D Poisson system of size n (a real solve)."""
    b = np.random.default_rng(rhs_seed).standard_normal(n)
    x = np.zeros(n)
    norm_b = np.linalg.norm(b)
    for k in range(1, max_iter + 1):
        for i in range(n):
            left = x[i - 1] if i > 0 else 0.0
            right = x[i + 1] if i < n - 1 else 0.0
            x[i] = (1 - omega) * x[i] + omega * (b[i] + left + right) / 2.0
        r = b - (2 * x - np.r_[0.0, x[:-1]] - np.r_[x[1:], 0.0])
        if np.linalg.norm(r) <= tol * norm_b:
            return k
    return max_iter


def fill(url: str, folder: Path) -> dict:
    """Fill the database at ``url``: a real short search (``steptune run``), a real preset sweep
    (``steptune sweep --study``), a hand-made schedule imported from an export, and SOR rounds."""
    cache = folder / "cache"
    assert main(["run", str(job_file(folder / "job.toml", cache)), "--db", url, "--json"]) == 0
    assert main(["sweep", "--problem", "gmm-2d", "--nfe", ",".join(map(str, PRESET_NFES)), "--presets",
                 ",".join(PRESETS), "--out", str(folder / "sweep"), "--cache", str(cache), "--study", PRESET_STUDY,
                 "--db", url, "--json"]) == 0
    with connect(url) as store:
        searched = [t for t in store.trials(SEARCH_STUDY, status="complete", nfe=4)
                    if t.fidelity == "heldout" and not t.info.get("baseline")]
        best = min(searched, key=lambda t: (t.score, t.id))
        exported = export_dict(best, store.get_study(SEARCH_STUDY))
        exported["name"] = "hand-tuned"
        hand = import_schedule(store, json.dumps(exported), HAND_STUDY)
        sequence = {"kind": "relaxation", "problem": {"problem": "poisson-1d", "n": "12..15"}, "solver": "sor",
                    "tol": 1e-6, "maxiter": 5000}
        store.create_study(BANDIT_STUDY, method="epsilon-greedy", metric="iterations",
                           config={**sequence, "policy": {"learner": "epsilon-greedy", "omegas": OMEGAS}})
        store.create_study(FIXED_STUDY, method="fixed", metric="iterations",
                           config={**sequence, "policy": {"learner": "fixed", "omega": 1.0}})
        store.create_study(OTHER_SEQUENCE_STUDY, method="fixed", metric="iterations",
                           config={**sequence, "tol": 1e-3, "policy": {"learner": "fixed", "omega": 1.0}})
        store.add_relaxation(OTHER_SEQUENCE_STUDY, 0, 1.0, arm=0, iterations=sor_iterations(1.0, 12, 0, tol=1e-3))
        rng = np.random.default_rng(0)
        for rnd in range(12):
            n = 12 + rnd % 4
            arm = int(rng.integers(len(OMEGAS))) if rnd < 4 or rng.random() < 0.2 else 2
            store.add_relaxation(BANDIT_STUDY, rnd, OMEGAS[arm], arm=arm, context={"n": n},
                                 iterations=sor_iterations(OMEGAS[arm], n, rnd), converged=True)
            store.add_relaxation(FIXED_STUDY, rnd, 1.0, arm=0, context={"n": n},
                                 iterations=sor_iterations(1.0, n, rnd), converged=True)
    sweep = json.loads(next((folder / "sweep").glob("*.json")).read_text())
    return {"sweep_rows": sweep["rows"], "hand": hand, "hand_source": best}


_BUILT: dict[str, tuple[str, dict]] = {}


@pytest.fixture(scope="session")
def dashboard_db(tmp_path_factory):
    """(url, what was stored). Modules import this fixture, which gives each its own copy of it; the
    database itself is built once per session (nobody writes to it)."""
    if "db" not in _BUILT:
        folder = tmp_path_factory.mktemp("dashboard")
        url = f"sqlite:///{folder / 'steptune.db'}"
        _BUILT["db"] = (url, fill(url, folder))
    return _BUILT["db"]


def test_filled_database_holds_a_real_search_presets_and_relaxation(dashboard_db):
    url, info = dashboard_db
    with connect(url, create=False) as store:
        trials = store.trials(SEARCH_STUDY)
        cheap = [t for t in trials if t.fidelity == "train"]
        baselines = [t for t in trials if t.info.get("baseline")]
        assert len(cheap) == EVALUATIONS * len(SEARCH_NFES) and all(t.n_samples == 32 for t in cheap)
        assert {t.fidelity for t in baselines} == {"heldout"} and len(baselines) > len(PRESETS)
        assert all(t.status in ("complete", "failed") for t in trials)
        ran = [r for r in info["sweep_rows"] if r["status"] in ("complete", "failed")]
        presets = store.trials(PRESET_STUDY)
        assert sorted((t.schedule["name"], t.nfe) for t in presets) == sorted((r["preset"], r["nfe"]) for r in ran)
        assert store.get_study(PRESET_STUDY).method == "preset"
        # the sweep and the search's baselines ran the same preset on the same held-out noise
        ddim3 = next(t for t in baselines if t.info["origin"] == "preset:ddim@3")
        assert math.isclose(ddim3.score, next(r["rmse"] for r in ran if r["preset"] == "ddim" and r["nfe"] == 3),
                            rel_tol=1e-9)
        assert info["hand"].status == "complete" and info["hand"].schedule["name"] == "hand-tuned"
        assert math.isclose(info["hand"].score, info["hand_source"].score)
        assert len(store.relaxation_rounds(BANDIT_STUDY)) == 12
    # the SOR solves are real: over-relaxation beats Gauss-Seidel on the Poisson system
    assert sor_iterations(1.6, 14, 0) < sor_iterations(1.0, 14, 0)
