"""The Optuna-backed searchers asked wide batches (as many Ray evaluators ask them). Told scores of a closed form of
their own parameters (no model runs), CMA-ES makes a wide batch one generation of its population, sampled around
the best preset's timesteps from the first batch on, and gets nearer the known optimum than when Optuna drops every
result past its default population. TPE asks no more random candidates than its random start, however wide the
batch, and a wide-batch job driven by the runner still spends its whole budget."""

from __future__ import annotations

import math

import numpy as np
import pytest
from runner_jobs import run_job

from steptune.evaluators import get_problem
from steptune.jobs import job_from_dict
from steptune.search import CHEAP, make_searcher
from steptune.search.optuna_search import CmaEsSearcher
from steptune.storage import connect

NFES = [4, 5]
TARGET = 0.7  # the optimum of every timestep logit (their sum is free: the softmax does not see it)


def sphere(candidate) -> float:
    """Squared distance of the candidate's logits to the optimum; presets (no logits) score 1."""
    z = [v for k, v in sorted(candidate.params.items()) if k.startswith("z")]
    return float(np.sum((np.array(z) - TARGET) ** 2)) if z else 1.0


def search(batch: int, evaluations: int, seed: int = 0, **options) -> CmaEsSearcher:
    p = get_problem("gmm-2d")
    se = make_searcher("cmaes", p.noise, p.t_start, p.t_end, NFES, seed=seed, **options)
    while len(se.trials) < evaluations:
        for c in se.ask(batch):
            se.tell(c, sphere(c))
    return se


def generations(se: CmaEsSearcher, nfe: int) -> list[int]:
    """The CMA-ES generation of each trial at ``nfe``, in order (-1: not sampled by CMA-ES)."""
    return [next((v for k, v in t.system_attrs.items() if k.endswith(":generation")), -1)
            for t in se.studies[nfe].trials]


def test_a_wide_batch_is_one_generation_sampled_around_the_best_preset_from_the_first_batch_on():
    se = search(64, 200)
    for nfe in NFES:
        d = len(se.structure[nfe].steps)
        assert se.popsize[nfe] == 32 > 4 + math.floor(3 * math.log(d))  # the NFE's share of the batch
        gens = generations(se, nfe)
        assert gens[0] == -1  # the preset's own timesteps, told with its score, not asked again
        asked = gens[1:]
        assert asked == sorted(asked) and all(asked.count(g) == 32 for g in set(asked))  # whole generations
        assert asked[0] == 0  # the first batch already comes from CMA-ES, not from a random start


def test_a_small_batch_keeps_the_default_population():
    se = search(4, 120)
    for nfe in NFES:
        assert se.popsize[nfe] == 4 + math.floor(3 * math.log(len(se.structure[nfe].steps)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_result_of_a_wide_batch_brings_cma_es_nearer_the_optimum(seed):
    """Against the same search with CMA-ES's own population of 8 (Optuna then updates each generation from its
    first 8 members and drops the other 24 of the NFE's batch): nearer the known optimum on the same evaluations."""
    best = {}
    for popsize in (None, 8):
        se = search(64, 400, seed, popsize=popsize)
        best[popsize] = np.mean([min(s for c, s in se.trials if c.nfe == nfe and c.params) for nfe in NFES])
    assert best[None] < 0.8 * best[8], best


def test_a_population_below_two_is_refused():
    with pytest.raises(ValueError, match="popsize 1: a CMA-ES generation needs at least 2 members"):
        search(4, 4, popsize=1)


def test_tpe_asks_only_its_random_start_until_it_is_told():
    p = get_problem("gmm-2d")
    se = make_searcher("tpe", p.noise, p.t_start, p.t_end, NFES, seed=0, n_startup=6)
    first = se.ask(64)
    assert sorted(c.nfe for c in first) == [4] * 6 + [5] * 6  # the random start at each NFE, not 64 random
    assert se.ask(64) == []  # nothing more until the random start is told
    for c in first:
        se.tell(c, 1.0 + c.nfe)
    second = se.ask(64)
    assert len(second) == 64 and len({c.key for c in second}) == 64


def test_a_wide_tpe_batch_one_ahead_spends_the_whole_budget(tmp_path):
    """Driven by the runner with the next batch asked before this one is told (as on Ray): the first two batches
    hold the random start (10 at each NFE), the model's first batch waits for their results, and the job still
    evaluates its whole budget at every NFE."""
    job = job_from_dict({"study": "wide", "seed": 0, "problem": {"name": "gmm-2d"},
                         "search": {"method": "tpe", "nfe": NFES, "batch": 16, "lookahead": 1},
                         "evaluation": {"cheap_samples": 16, "train_samples": 16, "heldout_samples": 32, "confirm": 1,
                                        "baseline": False, "cache": str(tmp_path / "cache")},
                         "budget": {"evaluations": 30}})
    url = f"sqlite:///{tmp_path / 's.db'}"
    res, _ = run_job(job, url)
    with connect(url) as db:
        trials = [t for t in db.trials("wide") if t.fidelity == CHEAP]
    assert res.status == "complete" and res.evaluations == 60
    assert all(sum(t.nfe == nfe for t in trials) == 30 for nfe in NFES)
    sizes = [sum(t.info["batch"] == b for t in trials) for b in range(5)]
    # 8 random at each NFE, the other 2 of the random start asked ahead, then full batches from the model
    assert sizes == [16, 4, 16, 16, 8] and sum(sizes) == 60


@pytest.mark.parametrize("method", ["cmaes", "tpe", "mo-tpe", "random"])
def test_an_ask_where_nothing_new_is_left_returns_what_there_is_and_then_nothing(method):
    """At NFE 1 these methods soon have no schedule they have not tried (S^3 has: its analytical first steps add a
    time); an ask then ends with what it found (CMA-ES's asked forever: a search and its Ctrl-C hung). Every schedule
    asked is new."""
    p = get_problem("gmm-2d")
    se = make_searcher(method, p.noise, p.t_start, p.t_end, [1], seed=0)
    keys = []
    for _ in range(60):
        batch = se.ask(4)
        if not batch:
            break
        for c in batch:
            keys.append(c.key)
            se.tell(c, float(len(keys)))
    assert not batch and len(keys) == len(set(keys)) > 0
