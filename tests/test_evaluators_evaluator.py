"""The Evaluator end to end: convergence order, failures as results, banks, fidelities, bad input."""

import math
from dataclasses import replace

import pytest
import torch

from steptune.evaluators import Evaluator, get_problem, load_problem
from steptune.space import Schedule, ScheduleError, Step, noise, presets, sample


@pytest.fixture(scope="module")
def problem():
    return get_problem("gmm-2d", "vp-linear")


@pytest.fixture(scope="module")
def ev(problem, tmp_path_factory):
    return Evaluator(problem, n_train=128, n_heldout=64, cache_dir=tmp_path_factory.mktemp("cache"))


def ddim(problem, nfe, **kw):
    return presets.ddim(nfe, problem.noise, t_start=problem.t_start, t_end=problem.t_end, **kw)


def test_ddim_error_falls_at_first_order(problem, ev):
    res = [ev.evaluate(ddim(problem, nfe)) for nfe in (5, 10, 20, 40)]
    assert all(r.ok for r in res) and [r.nfe for r in res] == [5, 10, 20, 40]
    rmse = [r.metrics["rmse"] for r in res]
    med = [r.metrics["median_err"] for r in res]
    assert all(a > b for a, b in zip(rmse, rmse[1:]))
    # The typical sample halves its error per doubling (first order) ...
    for a, b in zip(med[1:], med[2:]):
        assert 1.7 < a / b < 2.4
    # ... but the RMSE over samples also counts the few that end in another mode than the reference; their
    # share shrinks with the step size h while their error stays O(1), adding an O(sqrt(h)) part, so the
    # observed slope lies between 1/2 and 1 at these NFEs.
    slope = math.log(rmse[0] / rmse[-1]) / math.log(8)
    assert 0.5 < slope < 1.2
    assert res[-1].metrics["sw"] < res[0].metrics["sw"]


def test_higher_order_solver_beats_ddim(problem, ev):
    d = ev.evaluate(ddim(problem, 20)).metrics
    m = ev.evaluate(presets.dpmpp_2m(20, problem.noise, t_start=problem.t_start, t_end=problem.t_end)).metrics
    assert m["rmse"] < d["rmse"] / 3


def test_reference_solution_scores_like_true_data(problem, ev):
    """The exact ODE solution is distributed as the marginal at t_end: its sliced Wasserstein distance
    to the data set is at the sampling-noise floor, and its NLL matches the data's NLL."""
    ref, data = ev.reference("train"), ev.data("train")
    other = problem.marginal_samples(ref.shape[0], problem.t_end, torch.Generator().manual_seed(51))
    from steptune.evaluators import sliced_wasserstein

    floor = sliced_wasserstein(other, data)
    assert sliced_wasserstein(ref, data) < 2.5 * floor
    nll_ref = float(-problem.log_prob(ref, problem.t_end).mean() / 2)
    nll_data = float(-problem.log_prob(data, problem.t_end).mean() / 2)
    assert abs(nll_ref - nll_data) < 0.25


def test_diverging_schedule_is_a_failed_result(problem, ev):
    base = ddim(problem, 6)
    steps = [base.steps[0]] + [Step(t=s.t, order=2, relaxation="linear", relaxation_coef=1e300)
                               for s in base.steps[1:]]
    bad = Schedule(t_start=base.t_start, steps=tuple(steps), noise=base.noise, name="blows-up")
    res = ev.evaluate(bad)
    assert res.status == "failed" and not res.ok
    assert "non-finite" in res.error and res.error.startswith("step ")
    assert set(res.metrics) == {"rmse", "median_err", "sw", "nll"}
    assert all(math.isinf(v) for v in res.metrics.values())
    assert res.nfe == 6 and res.n == 128 and res.bank == "train"


def test_bad_schedules_raise(problem, ev):
    with pytest.raises(ScheduleError, match="noise schedule"):
        ev.evaluate(presets.ddim(10, noise.get("vp-cosine")))
    with pytest.raises(ScheduleError, match="t_start"):
        ev.evaluate(presets.ddim(10, problem.noise, t_start=0.8, t_end=problem.t_end))
    with pytest.raises(ScheduleError, match="t_end"):  # ending early would be compared to an easier target
        ev.evaluate(presets.ddim(10, problem.noise, t_start=problem.t_start, t_end=0.05))
    with pytest.raises(ScheduleError):
        ev.evaluate(Schedule(t_start=problem.t_start, steps=(), noise=problem.noise.to_dict()))
    with pytest.raises(ValueError, match="bank"):
        ev.evaluate(ddim(problem, 5), bank="test")
    with pytest.raises(ValueError, match="outside"):
        ev.evaluate(ddim(problem, 5), n=129)


def test_banks_are_fixed_and_independent(problem, ev, tmp_path):
    train, held = ev.x_T("train"), ev.x_T("heldout")
    assert train.shape == (128, 2) and held.shape == (64, 2)
    assert not torch.equal(train[:64], held)
    big = Evaluator(problem, n_train=4096, n_heldout=4096, cache_dir=None)  # a correlation's null sd: 1/64
    for d in range(2):
        corr = torch.corrcoef(torch.stack([big.x_T("train")[:, d], big.x_T("heldout")[:, d]]))[0, 1]
        assert abs(float(corr)) < 0.1
    other = Evaluator(problem, n_train=128, n_heldout=64, cache_dir=None)
    assert torch.equal(other.x_T("train"), train) and torch.equal(other.x_T("heldout"), held)
    assert not torch.equal(Evaluator(problem, n_train=128, seed=1, cache_dir=None).x_T("train"), train)
    s = ddim(problem, 10)
    r_train, r_held = ev.evaluate(s, "train"), ev.evaluate(s, "heldout")
    assert r_held.bank == "heldout" and r_held.n == 64
    assert r_train.metrics["rmse"] != r_held.metrics["rmse"]
    assert 0.3 < r_train.metrics["rmse"] / r_held.metrics["rmse"] < 3


@pytest.mark.parametrize("name", ["gmm-2d", "digits-cond"])
def test_a_smaller_bank_is_the_start_of_a_larger_one(name):
    """An evaluation on n samples sees the same noise (and data) whatever size the bank was given, so a
    job's held-out bank of 256 and `eval --samples 256` on the default 1024 score the same states."""
    problem = load_problem(name)
    small, large = (Evaluator(problem, n_heldout=n, cache_dir=None) for n in (100, 1024))
    assert torch.equal(small.x_T("heldout"), large.x_T("heldout", 100))
    assert not torch.equal(large.x_T("heldout")[:100], large.x_T("heldout")[100:200])
    if problem.has_data:
        assert torch.equal(small.data("heldout"), large.data("heldout")[:100])
    draws = large.x_T("heldout").flatten()  # still standard normal noise (or the exact marginal) overall
    assert abs(float(draws.mean())) < 0.1 and 0.85 < float(draws.std()) < 1.15


def test_subset_fidelity_uses_the_first_samples(problem, ev):
    s = presets.dpmpp_2m(8, problem.noise, t_start=problem.t_start, t_end=problem.t_end)
    part = ev.evaluate(s, n=32)
    assert part.n == 32
    x = sample(problem.model, ev.x_T("train"), s)
    expected = float(torch.sqrt(((x[:32] - ev.reference("train")[:32]) ** 2).mean()))
    assert part.metrics["rmse"] == pytest.approx(expected, rel=1e-12)


def test_references_are_cached_on_disk(problem, ev, monkeypatch):
    ev.reference("train")
    import steptune.evaluators.reference as reference

    monkeypatch.setattr(reference, "solve_pf_ode", lambda *a, **k: (_ for _ in ()).throw(AssertionError("solved")))
    fresh = Evaluator(problem, n_train=128, n_heldout=64, cache_dir=ev.cache_dir)
    assert torch.equal(fresh.reference("train"), ev.reference("train"))
    assert fresh.bank("train").loaded[problem.t_end]
    assert list((ev.cache_dir / "reference").glob("*.pt"))


def test_final_zero_schedule_is_scored_at_sigma_zero(problem, ev):
    s = presets.dpmpp_2m(30, problem.noise, t_start=problem.t_start, t_end=problem.t_end, final_zero=True)
    assert s.steps[-1].t == 0.0
    res = ev.evaluate(s)
    assert res.ok and res.metrics["median_err"] < 0.01
    t_ref = ev.reference("train", 0.0)
    assert not torch.equal(t_ref, ev.reference("train"))
    assert replace(res).to_dict()["status"] == "complete"
