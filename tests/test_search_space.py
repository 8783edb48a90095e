"""Search space: every candidate any operator or searcher emits validates at exactly the NFE asked for."""

import numpy as np
import pytest

from steptune.search import DecisionSpace, make_searcher, preset_candidates
from steptune.space import Schedule, noise

NOISE = noise.get("vp-linear")
T0, T1 = 1.0, 1e-3
NFES = [2, 3, 4, 5, 6, 8, 10]


def _space():
    return DecisionSpace(NOISE, T0, T1)


def _check(s, nfe, space):
    assert s.nfe == nfe
    s.validate(nfe=nfe)
    assert s.t_start == T0 and abs(s.steps[-1].t - T1) < 1e-12
    lam = space.lams(s)
    assert np.all(np.diff(lam) > 0)
    assert s.steps[-1].corrector is None
    assert Schedule.from_dict(s.to_dict()).nfe == nfe  # the JSON form round-trips


def test_operators_keep_nfe_and_validity_over_thousands_of_operations():
    space = _space()
    rng = np.random.default_rng(123)
    pop = {n: [c.schedule for c in preset_candidates(space, [n])] for n in NFES}
    counts = {"random": 0, "mutate": 0, "crossover": 0, "grow": 0}
    for i in range(3000):
        nfe = NFES[i % len(NFES)]
        par = pop[nfe]
        u = rng.random()
        if u < 0.15:
            s, op = space.random(nfe, rng), "random"
        elif u < 0.7:
            s, op = space.mutate(par[int(rng.integers(len(par)))], rng), "mutate"
        elif u < 0.9:
            a, b = rng.choice(len(par), 2)
            s, op = space.crossover(par[a], par[b], rng), "crossover"
        else:
            lower = [n for n in NFES if n < nfe]
            if not lower:
                continue
            src = pop[lower[-1]][int(rng.integers(len(pop[lower[-1]])))]
            s, op = space.grow(src, nfe, rng), "grow"
        if s is None:
            continue
        _check(s, nfe, space)
        counts[op] += 1
        par.append(s)
        if len(par) > 60:
            del par[int(rng.integers(len(par)))]
    # the operators succeed most of the time (no silent collapse to "never changes anything")
    assert counts["mutate"] > 1400 and counts["crossover"] > 450 and counts["random"] > 350 and counts["grow"] > 200


def test_min_gap_is_kept_in_lambda():
    space = DecisionSpace(NOISE, T0, T1, min_gap=0.3)
    rng = np.random.default_rng(0)
    s = space.random(8, rng)
    for _ in range(500):
        s = space.mutate(s, rng) or s
        assert np.diff(space.lams(s)).min() >= 0.3 * 0.999
        assert s.nfe == 8


def test_softmax_parameterization_round_trips():
    space = _space()
    s = space.random(6, np.random.default_rng(1))
    z = space.lams_to_logits(s)
    times = space.times_from_lams(space.increments_to_lams(np.exp(z)))
    np.testing.assert_allclose(times, s.times, rtol=1e-6)


def _score(s):
    """A synthetic score with structure (so model-based searchers move): prefers order 2-3, no dc."""
    return float(1 + sum(abs(st.order - 2.5) for st in s.steps) + sum(abs(st.dc_ratio - 1) for st in s.steps))


@pytest.mark.parametrize("method", ["random", "s3", "tpe", "cmaes", "mo-tpe"])
def test_every_searcher_emits_valid_candidates_at_the_requested_nfe(method):
    nfes = [3, 5, 8]
    opts = {"pool": 40} if method == "s3" else {}
    se = make_searcher(method, NOISE, T0, T1, nfes, seed=0, **opts)
    space = se.space
    seen = set()
    n = 0
    for _ in range(8):
        cands = se.ask(10)
        assert len(cands) == 10
        for c in cands:
            assert c.nfe in nfes
            _check(c.schedule, c.nfe, space)
            assert c.key not in seen  # never proposes the same schedule twice
            seen.add(c.key)
            se.tell(c, _score(c.schedule))
            n += 1
    assert n == 80


def _time_score(space, s):
    """A synthetic score of the timesteps alone, with a known optimum: RMS distance (in lambda) of the
    interior times to those of increments growing linearly from 1 to 3 (any step count)."""
    lam = space.lams(s)[1:-1]
    target = np.array(space.increments_to_lams(np.linspace(1, 3, len(lam) + 1)))
    return 1e-3 + float(np.sqrt(np.mean((lam - target) ** 2)))


def _run_time_search(local, seed=0):
    se = make_searcher("s3", NOISE, T0, T1, [6], seed=seed, pool=40, predictor="extra-trees", local=local)
    local_cands = []
    while len(se.trials) < 120:
        for c in se.ask(4):
            if c.origin == "local":
                local_cands.append(c)
            se.tell(c, _time_score(se.space, c.schedule))
    presets = min(s for c, s in se.trials if c.origin.startswith("preset:"))
    return se, presets, min(s for _, s in se.trials), local_cands


def test_local_stage_moves_only_timesteps_and_closes_in_on_the_optimum():
    """Over eight seeds (one seed alone says little: with or without the local stage, single runs scatter by
    a factor of ten), the local stage beats the best preset at least twice over at every seed, and the
    search without it on average (geometric mean of the ratio of the two searches' best scores)."""
    ratios = []
    for seed in range(8):
        se, presets, best, local_cands = _run_time_search(0.6, seed)
        _, _, best_off, none = _run_time_search(0.0, seed)
        assert not none and len(local_cands) > 40
        told = {c.schedule.structure_key() for c, _ in se.trials}
        for c in local_cands:  # the local stage keeps every decision of an evaluated structure but the times
            _check(c.schedule, 6, se.space)
            assert c.schedule.structure_key() in told
        assert best < 0.5 * presets, (seed, best, presets)
        ratios.append(best / best_off)
    assert np.exp(np.mean(np.log(ratios))) < 1, ratios


def test_preset_seeds_keep_deis_tab_beside_deis():
    """DEIS's tAB interpolates in t where DEIS interpolates in lambda: the same times and orders, another basis
    in every step, so another schedule."""
    cands = preset_candidates(_space(), [4, 6], ["deis", "deis-tab"])
    by = {(c.origin, c.nfe): c.schedule for c in cands}
    assert set(by) == {(f"preset:{p}", n) for p in ("deis", "deis-tab") for n in (4, 6)}
    for n in (4, 6):
        deis, tab = by["preset:deis", n], by["preset:deis-tab", n]
        assert tab.times == deis.times and [st.order for st in tab.steps] == [st.order for st in deis.steps]
        assert {st.basis for st in tab.steps} == {"t"} and {st.basis for st in deis.steps} == {"lambda"}


def test_repair_gives_a_step_what_its_place_allows_whatever_the_space_repaired_before():
    """The space keeps what repair made of each step's decisions at each place: the same decisions at another place
    (another index, last or not, ending at t = 0 or not) are repaired for that place, as a fresh space repairs them."""
    shared = _space()
    rng = np.random.default_rng(7)
    kinds = [shared.sample_step(rng, 0.5) for _ in range(12)]  # few decisions, met again at many places
    changed = 0
    for _ in range(400):
        n = int(rng.integers(1, 7))
        times = np.sort(rng.uniform(T1, T0, n))[::-1].tolist()
        if rng.random() < 0.3:
            times[-1] = 0.0
        steps = tuple(kinds[int(rng.integers(len(kinds)))].at(t) for t in times)
        raw = Schedule(t_start=T0, steps=steps, noise=shared.noise_dict)
        got, fresh = shared.repair(raw), _space().repair(raw)
        assert got == fresh and got.key() == fresh.key()
        changed += got != raw
    assert changed > 100  # most needed repair: the check compares repairs, not schedules left as they were


def test_the_lambdas_a_space_keeps_on_a_schedule_are_its_own_and_follow_its_times():
    """What ``lams`` gives is the lambda of each time, as the noise schedule computes it, however often it is asked
    for, whatever a caller did to an earlier answer, on a schedule re-timed by ``evolve`` and for another space."""
    from steptune.space import presets
    from steptune.space.schedule import evolve

    ns = noise.VPLinear()
    space, other = DecisionSpace(ns, 1.0, 1e-3), DecisionSpace(noise.VPCosine(), 1.0, 1e-3)
    s = presets.ddim(5, ns)
    exact = ns.lam_array(np.array(s.times))
    first = space.lams(s)
    np.testing.assert_array_equal(first, exact)
    first[:] = 0.0  # a caller's copy
    np.testing.assert_array_equal(space.lams(s), exact)
    np.testing.assert_array_equal(other.lams(s), other.noise.lam_array(np.array(s.times)))
    np.testing.assert_array_equal(space.lams(s), exact)
    moved = evolve(s, steps=tuple(st.at(t) for st, t in zip(s.steps, [0.7, 0.4, 0.2, 0.05, 1e-3])))
    np.testing.assert_array_equal(space.lams(moved), ns.lam_array(np.array(moved.times)))
    renamed = evolve(s, name="again")
    np.testing.assert_array_equal(space.lams(renamed), exact)
    z = space.lams_to_logits(s)
    np.testing.assert_allclose(space.increments_to_lams(np.exp(z)), exact[1:-1], rtol=1e-12)
    assert space.lams_to_logits(s) is z and not z.flags.writeable  # kept, and no caller can change it
    import copy
    import pickle

    for twin in (pickle.loads(pickle.dumps(s)), copy.deepcopy(s)):  # the space stays behind
        assert twin == s and twin.key() == s.key() and not {"_lams", "_logits"} & set(vars(twin))
    np.testing.assert_allclose(space.increments_to_lams(np.exp(space.lams_to_logits(moved))),
                               ns.lam_array(np.array(moved.times))[1:-1], rtol=1e-12)


def test_a_space_that_forgets_the_lambdas_it_kept_still_knows_every_time_it_is_asked_for(monkeypatch):
    """A search of tens of thousands of evaluations fills the kept lambdas; forgetting them must not lose those of
    the schedule being converted (its start, known before, was lost and a long search ended on a KeyError)."""
    from steptune.search import space as space_module

    monkeypatch.setattr(space_module, "KEPT_LAMS", 3)
    space = DecisionSpace(NOISE, T0, T1)
    rng = np.random.default_rng(0)
    for _ in range(50):
        s = space.random(5, rng)
        if s is None:
            continue
        np.testing.assert_array_equal(space.lams(s)[:-1], NOISE.lam_array(np.array(s.times))[:-1])
        assert len(space._lam_cache) <= 3 + len(s.times)
