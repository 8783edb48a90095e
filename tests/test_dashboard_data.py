"""The database the dashboard tests read: a real short search, a real preset sweep, a hand-made schedule
imported from an export, and SOR relaxation rounds from real SOR solves. Built once per test session."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from steptune.evaluators import Evaluator, get_problem
from steptune.search import make_searcher, run_search
from steptune.storage import connect, export_dict, import_schedule

from steptune.sweep import run_sweep, store_sweep

SEARCH_STUDY = "gmm2d-random"
PRESET_STUDY = "gmm2d-presets"
HAND_STUDY = "gmm2d-hand"
BANDIT_STUDY = "sor-bandit"
FIXED_STUDY = "sor-fixed-1.0"
SEARCH_NFES = [3, 4, 5]
PRESETS = ["ddim", "dpm-solver++-2m", "unipc-bh2", "heun"]
PRESET_NFES = [3, 4, 5, 6]
OMEGAS = [1.0, 1.3, 1.6, 1.9]


def fidelity_of(bank: str) -> str:
    return "full" if bank == "heldout" else "cheap"


def store_search(store, study: str, result, problem, method: str, seed: int) -> list[int]:
    items = [{"schedule": r.schedule, "status": r.status, "metrics": r.metrics, "error": r.error,
              "seconds": r.seconds, "bank": r.bank, "n_samples": r.n_samples, "fidelity": fidelity_of(r.bank)}
             for r in result.log]
    return store.add_trials(study, items, create={"method": method, "seed": seed, "problem": problem.identity(),
                                                  "metric": "rmse"})


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


def fill(url: str, cache_dir) -> dict:
    """Fill the database at ``url``; returns what was stored, for the tests to compare against."""
    problem = get_problem("gmm-2d")
    ev = Evaluator(problem, n_train=64, n_heldout=128, cache_dir=cache_dir)
    searcher = make_searcher("random", problem.noise, problem.t_start, problem.t_end, SEARCH_NFES, seed=0)
    result = run_search(searcher, ev, budget=24, cheap_n=32, confirm_k=2)
    rows = run_sweep(ev, PRESETS, PRESET_NFES)
    with connect(url) as store:
        search_ids = store_search(store, SEARCH_STUDY, result, problem, "random", 0)
        preset_ids = store_sweep(store, PRESET_STUDY, ev, rows)
        best = store.best(SEARCH_STUDY, 4, fidelity="full")
        exported = export_dict(best, store.get_study(SEARCH_STUDY))
        exported["name"] = "hand-tuned"


        hand = import_schedule(store, json.dumps(exported), HAND_STUDY)
        store.create_study(BANDIT_STUDY, method="epsilon-greedy", config={"omegas": OMEGAS})
        store.create_study(FIXED_STUDY, method="fixed", config={"omega": 1.0})
        rng = np.random.default_rng(0)
        for rnd in range(12):
            n = 12 + rnd % 4
            arm = int(rng.integers(len(OMEGAS))) if rnd < 4 or rng.random() < 0.2 else 2
            store.add_relaxation(BANDIT_STUDY, rnd, OMEGAS[arm], arm=arm, context={"n": n},
                                 iterations=sor_iterations(OMEGAS[arm], n, rnd), converged=True)
            store.add_relaxation(FIXED_STUDY, rnd, 1.0, arm=0, context={"n": n},
                                 iterations=sor_iterations(1.0, n, rnd), converged=True)
    return {"search": result, "search_ids": search_ids, "preset_ids": preset_ids, "sweep_rows": rows,
            "hand": hand, "problem": problem}


@pytest.fixture(scope="session")
def dashboard_db(tmp_path_factory):
    path = tmp_path_factory.mktemp("dashboard") / "steptune.db"
    url = f"sqlite:///{path}"
    info = fill(url, tmp_path_factory.mktemp("cache"))
    return url, info


def test_filled_database_holds_every_evaluation(dashboard_db):
    url, info = dashboard_db
    with connect(url, create=False) as store:
        trials = store.trials(SEARCH_STUDY)
        assert len(trials) == len(info["search"].log) == len(info["search_ids"])
        for t, r in zip(trials, info["search"].log):
            assert t.nfe == r.nfe and t.fidelity == fidelity_of(r.bank) and t.status == r.status
            if r.status == "complete":
                assert math.isclose(t.score, r.metrics["rmse"])
        ran = [r for r in info["sweep_rows"] if r["status"] in ("complete", "failed")]
        presets = store.trials(PRESET_STUDY)
        assert sorted((t.schedule["name"], t.nfe) for t in presets) == sorted((r["preset"], r["nfe"]) for r in ran)
        assert store.get_study(PRESET_STUDY).method == "preset"
        assert info["hand"].status == "complete" and info["hand"].schedule["name"] == "hand-tuned"
        assert len(store.relaxation_rounds(BANDIT_STUDY)) == 12
    # the SOR solves are real: over-relaxation beats Gauss-Seidel on the Poisson system
    assert sor_iterations(1.6, 14, 0) < sor_iterations(1.0, 14, 0)
