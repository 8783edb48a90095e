"""Searching the starts and ends users run: on a discrete VP schedule the decision space takes a start later than
the bank's (diffusers' ``leading`` timesteps) and a final step to t = 0 (sigma = 0), so every preset at every
spacing is a schedule the searchers can mutate; elsewhere it keeps the problem's start and end. Refinement works
on such schedules: its gradient is the loss's and it is never worse on the held-out bank."""

import json
import math

import numpy as np
import pytest
from central_differences import check_gradient
from runner_jobs import run_cli

from steptune.evaluators import Evaluator, get_problem
from steptune.search import DEFAULT_PRESETS, Candidate, DecisionSpace, S3Searcher, preset_candidates
from steptune.search.baselines import spacing_variants
from steptune.search.refine import final_state, parameters, refine
from steptune.space import noise, presets
from steptune.storage import connect

pytestmark = pytest.mark.usefixtures("one_thread")

DISCRETE = noise.VPDiscrete.named("ddpm-linear")
T0, T1 = 1.0, 1e-3
NFES = [3, 5, 8]


@pytest.fixture(scope="module")
def space():
    return DecisionSpace(DISCRETE, T0, T1)


@pytest.fixture(scope="module")
def problem():
    return get_problem("gmm-2d", noise="ddpm-linear")


@pytest.fixture(scope="module")
def evaluator(problem):
    return Evaluator(problem, n_train=32, n_heldout=64, cache_dir=None)


def every_spacing(nfe: int) -> list:
    """Every default preset at every spacing of the discrete schedule (what the best-spacing baselines try)."""
    return [s for spec in DEFAULT_PRESETS for _, s in spacing_variants(spec, nfe, DISCRETE, T0, T1)]


def leading(spec: str, nfe: int):
    return presets.build(spec, nfe, DISCRETE, spacing="diffusers-leading", t_start=T0, t_end=T1)


def _check(space, s, nfe):
    s.validate(nfe=nfe)
    assert space.fits(s) and space.finish(s, nfe) == s
    assert space.min_start <= s.t_start <= T0
    assert s.steps[-1].t == 0.0 or math.isclose(s.steps[-1].t, T1, rel_tol=1e-9)
    lam = space.lams(s)
    assert np.all(np.isfinite(lam)) and np.diff(lam).min() >= space.min_gap * 0.999


def test_every_preset_at_every_spacing_is_a_schedule_of_the_space(space):
    """A told best-spacing schedule (DDIM on leading timesteps: a later start, a final step to t = 0) is taken as it
    is, and its softmax logits give its times back."""
    late = zero = 0
    for nfe in NFES:
        for s in every_spacing(nfe):
            f = space.finish(s, s.nfe)  # (repair writes an implicit corrector's default order as None)
            assert f is not None and f.times == s.times, s.name
            late += s.t_start < T0
            zero += s.steps[-1].t == 0.0
            if len(s.steps) >= 2:
                back = space.with_logits(s, space.lams_to_logits(s))
                np.testing.assert_allclose(back.times, s.times, rtol=1e-6, atol=1e-9)
    assert late > 20 and zero > 40


def test_operators_keep_validity_and_reach_late_starts_and_zero_ends(space):
    """Property-style: thousands of mutations, crossovers, random draws, warm starts and timestep moves from the
    presets at every spacing, over several seeds, all valid at their NFE; starts move both ways and ends switch."""
    for seed in range(2):
        rng = np.random.default_rng(seed)
        pop = {n: every_spacing(n) for n in NFES}
        seen = {"late": 0, "start": 0, "zero": 0, "t_end": 0}
        for i in range(400):
            nfe = NFES[i % len(NFES)]
            par = pop[nfe]
            u = rng.random()
            a = par[int(rng.integers(len(par)))]
            if u < 0.1:
                s = space.random(nfe, rng)
            elif u < 0.6:
                s = space.mutate(a, rng)
            elif u < 0.8:
                s = space.crossover(a, par[int(rng.integers(len(par)))], rng)
            elif u < 0.9:
                s = space.mutate_times(a, rng)
            else:
                s = space.grow(pop[NFES[0]][int(rng.integers(len(pop[NFES[0]])))], nfe, rng) if nfe > NFES[0] else None
            if s is None:
                continue
            _check(space, s, nfe)
            seen["late" if s.t_start < T0 else "start"] += 1
            seen["zero" if s.steps[-1].t == 0 else "t_end"] += 1
            par.append(s)
            if len(par) > 80:
                del par[int(rng.integers(len(par)))]
        assert min(seen.values()) > 50, seen


def test_mutations_of_ddim_on_leading_timesteps_move_its_start_and_end(space):
    rng = np.random.default_rng(0)
    s = leading("ddim", 5)
    assert s.t_start < T0 and s.steps[-1].t == 0.0
    kids = [space.mutate(s, rng) for _ in range(300)]
    kids = [k for k in kids if k is not None]
    assert len(kids) > 250
    for k in kids:
        _check(space, k, 5)
    starts = {k.t_start for k in kids}
    assert len(starts) > 20 and T0 in starts and min(starts) < s.t_start < max(starts)
    assert any(k.steps[-1].t == T1 for k in kids) and sum(k.steps[-1].t == 0 for k in kids) > len(kids) / 2


def test_the_space_candidates_evaluate_on_a_discrete_problem(space, evaluator):
    """Late starts and zero ends drawn by the space run on the evaluator (small banks) and are scored against the
    reference from the bank's start at their own end."""
    rng = np.random.default_rng(4)
    kinds = set()
    while len(kinds) < 4:
        s = space.random(5, rng)
        if s is None:
            continue
        kind = (s.t_start < T0, s.steps[-1].t == 0)
        if kind in kinds:
            continue
        kinds.add(kind)
        evaluator.check(s)
        r = evaluator.evaluate(s, "train")
        assert r.ok and math.isfinite(r.metrics["rmse"]), (kind, r.error)


def test_s3_takes_a_told_leading_schedule_as_a_parent_and_mutates_it(space):
    """Told DDIM-leading as the best so far, S^3 keeps it as its best parent and its children include changes of it
    (same start or same decisions)."""
    se = S3Searcher(DISCRETE, T0, T1, [5], seed=0, pool=40)
    best = leading("ddim", 5)
    se.tell(Candidate(best, 5, "preset:ddim@5 spacing=diffusers-leading"), 0.01)
    for c in preset_candidates(se.space, [5]):
        se.tell(c, 1.0)
    assert se.parents(5, 1)[0][0].schedule.key() == best.key()
    kids = [c for _ in range(4) for c in se.ask(8)]
    for c in kids:
        _check(se.space, c.schedule, 5)
        se.tell(c, 1.0)
    related = [c for c in kids
               if c.schedule.t_start == best.t_start or c.schedule.structure_key() == best.structure_key()]
    assert len(related) >= 4


def test_without_a_discrete_schedule_the_space_keeps_the_problems_start_and_end():
    vp = noise.get("vp-linear")
    space = DecisionSpace(vp, T0, T1)
    assert not space.late_start and not space.zero_end
    rng = np.random.default_rng(0)
    pop = [c.schedule for c in preset_candidates(space, [5])]
    for _ in range(800):
        s = space.mutate(pop[int(rng.integers(len(pop)))], rng) if rng.random() < 0.8 else space.random(5, rng)
        if s is not None:
            assert s.t_start == T0 and math.isclose(s.steps[-1].t, T1, rel_tol=1e-9)
            pop.append(s)
    late = presets.build("ddim", 5, vp, t_start=0.8, t_end=T1)
    zero = presets.build("ddim", 5, vp, t_start=T0, t_end=T1, final_zero=True)
    assert space.finish(late, 5) is None and space.finish(zero, zero.nfe) is None
    with pytest.raises(Exception, match="min_start"):
        DecisionSpace(DISCRETE, T0, T1, min_start=2.0)


@pytest.mark.parametrize("spec", ["ddim", "dpm-solver++-3m"])
def test_refining_a_leading_schedule_is_never_worse_and_moves_its_start_not_its_end(evaluator, spec):
    """The start is refined (it stays below the bank's), the time before the final step to t = 0 is kept."""
    s = leading(spec, 5)
    r = refine(evaluator, s, iters=20, samples=32)
    assert r.fitted["times"] == 3 and r.fitted["start"] == 1
    assert r.rmse <= r.parent_rmse == pytest.approx(evaluator.evaluate(s, "heldout").metrics["rmse"], rel=1e-12)
    assert evaluator.evaluate(r.schedule, "heldout").metrics["rmse"] == pytest.approx(r.rmse, rel=1e-12)
    t = r.schedule.times
    assert t[0] < T0 and t[-1] == 0.0 and t[-2] == s.times[-2] and all(a > b for a, b in zip(t, t[1:]))
    assert r.improved and t[0] != s.t_start  # the leading times are far from the best ones on this problem


def test_a_schedule_at_the_banks_start_keeps_it(problem, evaluator):
    s = presets.build("dpm-solver++-2m", 5, DISCRETE, spacing="time-uniform", t_start=T0, t_end=T1)
    par = parameters(s, problem.noise, earliest=problem.t_start)
    assert "start" not in par.theta and "start" not in par.counts()
    r = refine(evaluator, s, iters=10, samples=32)
    assert r.schedule.t_start == T0 and r.rmse <= r.parent_rmse


def test_the_gradient_on_a_leading_schedule_is_the_losss_derivative(problem, evaluator):
    """Autograd against central differences of the loss in every fitted parameter, the start included, on a schedule
    that starts late and ends at t = 0 (the reference is the one at t = 0)."""
    s = leading("dpm-solver++-3m", 6)
    par = parameters(s, problem.noise, earliest=problem.t_start)
    assert par.ends == (0, len(s.steps) - 1) and set(par.theta) == {"times", "start", "dc", "relax", "second"}
    back = par.to_schedule(problem.noise)
    assert max(abs(a - b) for a, b in zip(back.times, s.times)) < 1e-12
    x, ref = evaluator.x_T("train", 16), evaluator.reference("train", 0.0)[:16]

    def loss():
        return (final_state(problem.model, par, x) - ref).pow(2).mean()

    # the mixture's time input goes through autograd, exact but at the start: a leading schedule starts on a
    # timestep, a knot of the discrete schedule's piecewise-linear tables, where autograd takes one segment's slope
    # for alpha(t) and another's for t(lambda) while their composite is smooth (7e-5 off)
    assert problem.model.time_differentiable
    check_gradient(loss, par.theta, lambda kind: 1e-3 if kind == "start" else 1e-6)


# ---- steptune search --refine -------------------------------------------------------------------------------------


def _search_refine(tmp_path, capsys, nfe: str, study: str):
    """A tiny `steptune search --refine 10` on gmm-2d: its database URL and the command's exit code, out and err."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    args = ["search", "--problem", "gmm-2d", "--nfe", nfe, "--budget", "8", "--study", study,
            "--out", str(tmp_path), "--cache", str(tmp_path / "cache"), "--cheap-samples", "16", "--confirm", "1",
            "--heldout-samples", "64", "--db", url, "--refine", "10"]
    return (url, *run_cli(args, capsys))


def test_search_refine_refines_the_best_searched_schedule_and_reports_it(tmp_path, capsys):
    """The refinement is stored naming the searched trial it refines, and the command's JSON and table give its
    held-out RMSE, never above the searched one."""
    url, code, out, err = _search_refine(tmp_path, capsys, "3", "r")
    assert code == 0, err
    assert "refined RMSE" in out
    row = json.loads((tmp_path / "r.json").read_text())["results"][0]
    ref = row["refined"]
    with connect(url) as db:
        trials = db.trials("r")
    baselines = {p.id for p in trials if p.info.get("baseline")}  # the stage refines the best preset too
    (t,) = [t for t in trials if "refines" in t.info and t.info["refines"] not in baselines]
    parent = next(p for p in trials if p.id == t.info["refines"])
    # the best searched schedule is the best of those screened with the parent (the search's and the screening's
    # confirmations)
    start = min([x["parent_rmse"] for x in t.info["refine"].get("screened", [])] or [parent.score])
    assert "confirms" in parent.info and start == pytest.approx(row["searched_rmse"], rel=1e-12)
    assert ref["candidate_trial"] == t.id and ref["improved"] == (t.status == "complete" and t.score < start)
    assert ref["candidate_rmse"] == t.score and ref["rmse"] <= row["searched_rmse"]
    assert ref["rmse"] == pytest.approx(t.score if ref["improved"] else start, rel=1e-12)
    assert ref["rmse"] == next(p.score for p in trials if p.id == ref["trial"])  # the trial that scored it
    # the same search run again without --refine searches nothing new and keeps the refinement in its summary
    code, out, err = run_cli(["search", "--problem", "gmm-2d", "--nfe", "3", "--budget", "8", "--study", "r",
                              "--out", str(tmp_path), "--cache", str(tmp_path / "cache"), "--cheap-samples", "16",
                              "--confirm", "1", "--heldout-samples", "64", "--db", url], capsys)
    assert code == 0 and "refined RMSE" in out, err
    assert json.loads((tmp_path / "r.json").read_text())["results"][0]["refined"] == ref


def test_search_refine_over_several_nfes_counts_the_schedules_built_from_neighbours(tmp_path, capsys):
    """Over several NFEs the refined column is the best of the searched schedules, those built from a neighbouring
    NFE's best and the refinements of either; the refined presets are not the search's."""
    url, code, out, err = _search_refine(tmp_path, capsys, "3,4", "n")
    assert code == 0, err
    rows = json.loads((tmp_path / "n.json").read_text())["results"]
    with connect(url) as db:
        trials = db.trials("n")
    by_id = {t.id: t for t in trials}
    assert any("neighbour" in t.info for t in trials)
    for row in rows:
        ok = [t.score for t in trials if t.nfe == row["nfe"] and t.fidelity == "heldout" and t.status == "complete"
              and not t.info.get("baseline") and not by_id.get(t.info.get("refines"), t).info.get("baseline")
              and "interpolated" not in t.info]
        assert row["refined"]["rmse"] == pytest.approx(min(ok), rel=1e-12)
        assert row["refined"]["rmse"] <= row["searched_rmse"]


def test_search_refine_refuses_a_negative_count_in_one_line(tmp_path, capsys):
    code, out, err = run_cli(["search", "--refine", "-1", "--out", str(tmp_path)], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "--refine -1" in lines[0] and "Traceback" not in out + err
