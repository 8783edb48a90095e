"""Refinement by gradient (steptune.search.refine, `steptune refine`, the job's [refine] stage): the
differentiable run is the sampler's own run, its gradient is the loss's, it lowers the train loss, never
raises the held-out RMSE, keeps the times ordered, finds the best interior time of a Gaussian problem's
two-step DDIM (known by a grid search against the closed-form solution), and its trials name their parents."""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from central_differences import check_gradient
from gaussian import eps_fn, eps_tensor_fn, exact_solution
from runner_jobs import job_text, run_cli

from steptune.cli.console import fmt
from steptune.cli.run import study_status
from steptune.evaluators import Evaluator, GaussianMixture, Plug, load_problem, mixture_problem
from steptune.exports import parse_export
from steptune.jobs import job_from_dict, load_job
from steptune.search.refine import (
    GATE,
    ITERS,
    STRUCTURES,
    TRIM,
    TRIMS,
    RefineError,
    final_state,
    loss_shares,
    parameters,
    refine,
    refine_best,
    refined_structure,
    screen_rounds,
)
from steptune.space import Corrector, Model, presets, sample
from steptune.space.noise import VPLinear
from steptune.storage import connect

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def gmm2d():
    p = load_problem("gmm-2d")
    return p, Evaluator(p, n_train=32, n_heldout=64, cache_dir=None)


def _preset(p, spec, nfe, **kw):
    return presets.build(spec, nfe, p.noise, t_start=p.t_start, t_end=p.t_end, **kw)


def test_the_differentiable_run_is_the_samplersrun_cli(gmm2d):
    p, ev = gmm2d
    s = _preset(p, "dpm-solver++-3m", 6)
    par = parameters(s, p.noise)
    assert par.counts() == {"times": 5, "dc_ratio": 4, "relaxation_coef": 4, "corrector_relaxation_coef": 0,
                            "second_scale": 2}
    back = par.to_schedule(p.noise)
    assert max(abs(a - b) for a, b in zip(back.times, s.times)) < 1e-12
    x = ev.x_T("train", 16)
    with torch.no_grad():
        torch.testing.assert_close(final_state(p.model, par, x), sample(p.model, x, s), rtol=1e-12, atol=1e-12)


def test_relaxation_coefficients_of_every_kind_and_of_correctors_are_fitted_as_the_sampler_runs_them(gmm2d):
    """UniPC's steps and correctors relax by B(h) kinds: each takes a coefficient as the factor 1 + coef h on its
    kind's; the schedule written back from moved coefficients samples as the differentiable run does."""
    p, ev = gmm2d
    s = _preset(p, "unipc-bh2", 6)
    par = parameters(s, p.noise)
    assert par.counts() == {"times": 5, "dc_ratio": 4, "relaxation_coef": 4, "corrector_relaxation_coef": 5,
                            "second_scale": 0}
    assert par.corrector_steps == [0, 1, 2, 3, 4]
    with torch.no_grad():
        par.theta["relax"].copy_(torch.tensor([0.3, -0.2, 0.1, 0.4], dtype=torch.float64))
        par.theta["corrector"].copy_(torch.tensor([-0.5, 0.25, 0.0, 0.6, -0.1], dtype=torch.float64))
    back = par.to_schedule(p.noise)
    assert [st.relaxation for st in back.steps[1:5]] == [st.relaxation for st in s.steps[1:5]] == ["unipc-bh2"] * 4
    assert [st.relaxation_coef for st in back.steps[1:5]] == pytest.approx([0.3, -0.2, 0.1, 0.4], abs=1e-15)
    kinds = [st.corrector.relaxation for st in s.steps[:5]]
    assert kinds == ["unipc-bh2", "none", "none", "none", "none"]  # UniC's B(h) enters at its first order-2 use
    assert [(c.relaxation, c.relaxation_coef) for c in (st.corrector for st in back.steps[:5])] == [
        ("unipc-bh2", -0.5), ("linear", 0.25), ("none", 0.0), ("linear", 0.6), ("linear", -0.1)]
    x = ev.x_T("train", 16)
    with torch.no_grad():
        moved = final_state(p.model, par, x)
        torch.testing.assert_close(moved, sample(p.model, x, back), rtol=1e-12, atol=1e-12)
        assert (moved - sample(p.model, x, s)).abs().max() > 1e-3
    assert refined_structure(back, p.noise) == refined_structure(s, p.noise)


def test_the_phi_terms_of_a_fitted_step_are_those_of_its_float(gmm2d):
    """Steps shorter than 0.5 in lambda take the series branch; with tensor times (being fitted) it must give the
    float values and their derivative (c_1' = e^z), and a run with such steps must be the sampler's."""
    from steptune.space.phi import phi_terms

    for z in (-0.45, -0.1, 0.02, 0.3, 0.49):
        zt = torch.tensor(z, dtype=torch.float64, requires_grad=True)
        got = phi_terms(zt, 3)
        assert [float(v.detach()) for v in got] == pytest.approx(phi_terms(z, 3), rel=1e-14)
        got[0].backward()
        assert float(zt.grad) == pytest.approx(math.exp(z), rel=1e-12)
    p, ev = gmm2d
    s = _preset(p, "dpm-solver++-3m", 30)  # 30 steps: every lambda step below 0.5
    lam = p.noise.lam(torch.tensor(s.times, dtype=torch.float64))
    assert float(lam.diff().max()) < 0.5
    x = ev.x_T("train", 16)
    with torch.no_grad():
        torch.testing.assert_close(final_state(p.model, parameters(s, p.noise), x), sample(p.model, x, s),
                                   rtol=1e-10, atol=1e-10)


def test_the_gradient_is_the_losss_derivative(gmm2d):
    """Autograd (through the exact mixture denoiser's time input too) against central differences of the loss in
    every parameter."""
    p, ev = gmm2d
    s = _preset(p, "dpm-solver++-3m", 6)
    s = s.with_steps([replace(st, corrector=Corrector("pseudo", relaxation=kind)) if i in (1, 3) else st
                      for i, (st, kind) in enumerate(zip(s.steps, ["none", "none", "none", "unipc-bh1", "none",
                                                                   "none"]))])
    par = parameters(s, p.noise)
    assert par.corrector_steps == [1, 3]
    x, ref = ev.x_T("train", 16), ev.reference("train")[:16]

    def loss():
        return (final_state(p.model, par, x) - ref).pow(2).mean()

    assert p.model.time_differentiable
    check_gradient(loss, par.theta, lambda kind: 1e-6)


def test_the_times_of_t_basis_steps_are_fitted_through_their_quadrature(gmm2d):
    """DEIS's tAB steps interpolate in t and integrate by quadrature: their times are fitted too, the differentiable
    run is the sampler's (moved times included), and its gradient in the times is the loss's (central
    differences)."""
    p, ev = gmm2d
    s = _preset(p, "deis-tab", 5)
    assert any(st.basis == "t" and st.order > 1 for st in s.steps)
    par = parameters(s, p.noise)
    assert par.counts()["times"] == 4
    x, ref = ev.x_T("train", 16), ev.reference("train")[:16]
    with torch.no_grad():
        torch.testing.assert_close(final_state(p.model, par, x), sample(p.model, x, s), rtol=1e-12, atol=1e-12)
        par.theta["times"].add_(torch.tensor([0.2, -0.1, 0.05, -0.15, 0.1], dtype=torch.float64))
        moved = par.to_schedule(p.noise)
        assert max(abs(a - b) for a, b in zip(moved.times, s.times)) > 1e-3
        torch.testing.assert_close(final_state(p.model, par, x), sample(p.model, x, moved), rtol=1e-12, atol=1e-12)
    check_gradient(lambda: (final_state(p.model, par, x) - ref).pow(2).mean(), {"times": par.theta["times"]},
                   lambda kind: 1e-6)


@pytest.mark.parametrize("differentiable", [True, False])
def test_a_model_differentiable_in_time_gives_the_exact_time_gradient_in_one_call_per_step(differentiable):
    """A model that says it is differentiable in its time input is differentiated through it: the times' gradient
    matches central differences of the loss to 1e-6 (the forward difference misses by O(FD_REL)) and each step
    calls the model once (the forward difference calls it twice at a fitted time)."""
    noise, mu, var = VPLinear(), torch.tensor([0.5, -1.0, 0.25]), torch.tensor([0.04, 0.25, 1.0])
    fn = (eps_tensor_fn if differentiable else eps_fn)(noise, mu.double(), var.double())
    model = Model(fn, noise, prediction="eps", time_input="continuous", time_differentiable=differentiable)
    s = presets.build("dpm-solver++-3m", 6, noise, t_start=1.0, t_end=1e-3)
    par = parameters(s, noise)
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = exact_solution(noise, mu.double(), var.double(), x, 1.0, 1e-3)

    def loss():
        return (final_state(model, par, x) - ref).pow(2).mean()

    calls = [0]
    final_state(model, par, x, calls)
    assert calls[0] == 16 * (6 + (0 if differentiable else len(par.fitted_times)))
    if differentiable:
        check_gradient(loss, par.theta, lambda kind: 1e-6)
    else:
        with pytest.raises(AssertionError, match="times"):
            check_gradient(loss, par.theta, lambda kind: 1e-6)


def test_the_outputs_no_parameter_moves_are_computed_once(gmm2d):
    """Kept across calls (``constant``), the model's outputs at x_T and a fixed start give the same final state and
    gradients as computed afresh, and later calls skip that model call."""
    p, ev = gmm2d
    s = _preset(p, "dpm-solver++-3m", 6)
    x, ref = ev.x_T("train", 16), ev.reference("train")[:16]
    kept, runs = {}, []
    for constant in (None, kept, kept):
        par, count = parameters(s, p.noise), [0]
        (final_state(p.model, par, x, count, constant) - ref).pow(2).mean().backward()
        runs.append((final_state(p.model, par, x, [0], constant).detach(), {k: v.grad for k, v in par.theta.items()},
                     count[0]))
    for state, grads, _ in runs[1:]:
        assert torch.equal(state, runs[0][0]) and all(torch.equal(grads[k], runs[0][1][k]) for k in grads)
    assert list(kept) == [(0, s.t_start)] and runs[2][2] == runs[1][2] - 16 == runs[0][2] - 16


def test_refinement_lowers_the_train_loss_and_never_raises_the_heldout_rmse(gmm2d):
    p, ev = gmm2d
    s = _preset(p, "unipc-bh2", 4)
    r = refine(ev, s, iters=30, samples=32)
    assert r.improved and r.loss < r.loss_start
    assert r.rmse < r.parent_rmse == pytest.approx(ev.evaluate(s, "heldout").metrics["rmse"], rel=1e-12)
    assert ev.evaluate(r.schedule, "heldout").metrics["rmse"] == pytest.approx(r.rmse, rel=1e-12)
    times = r.schedule.times
    assert times[0] == s.times[0] and times[-1] == s.times[-1]
    assert all(a > b for a, b in zip(times, times[1:]))
    assert r.fitted["times"] == 3 and r.candidate_result.metrics["rmse"] == r.rmse
    # every iteration runs the 3 calls after the first on the fit states (the mixture's time input goes through
    # autograd: no call more for a fitted time); the first call, at x_T and the fixed start, runs once; every check
    # (and the parent's) runs the schedule on the held-out bank
    checks = sum("heldout_rmse" in h for h in r.history) + 1
    assert r.model_calls == (r.iters * 3 + 1) * 32 + checks * 4 * 64 + 3 * 32


def test_a_trimmed_loss_leaves_out_the_states_of_largest_error(gmm2d):
    """``trim``: the loss is the mean squared error over the fit states but the round(trim x samples) whose error
    is largest, here checked on the parent (the first iteration's loss) against its final states computed apart."""
    p, ev = gmm2d
    s = _preset(p, "unipc-bh2", 4)
    with torch.no_grad():
        x, ref = ev.x_T("train", 32).to(torch.float32), ev.reference("train")[:32].to(torch.float32)  # as it fits
        err = (final_state(p.model, parameters(s, p.noise), x) - ref).pow(2).flatten(1).mean(1).sort().values
    assert err[-1] > 2 * err[-4]  # the states left out weigh on the loss
    for trim, dropped in ((0.0, 0), (0.03, 1), (0.1, 3)):
        r = refine(ev, s, iters=1, samples=32, trim=trim)
        assert r.dropped == r.info()["dropped"] == dropped
        assert r.loss_start == pytest.approx(float(err[:32 - dropped].mean()), rel=1e-5)
    trimmed = refine(ev, s, iters=30, samples=32, trim=0.1)
    assert trimmed.improved and trimmed.rmse < trimmed.parent_rmse  # never worse on the held-out bank
    assert refine(ev, s, iters=1, samples=1, trim=0.9).dropped == 0  # one state is always fitted
    for bad in (1.0, -0.1):
        with pytest.raises(RefineError, match="not a share of the fit states"):
            refine(ev, s, iters=1, samples=32, trim=bad)


def test_a_parents_heldout_evaluation_given_is_not_made_again(gmm2d):
    """Given the parent's evaluation on the whole held-out bank (a stored confirmation), a refinement runs exactly as
    one that evaluates it, without that evaluation's model calls; an evaluation of another bank, size or NFE is
    refused in one sentence."""
    p, ev = gmm2d
    s = _preset(p, "unipc-bh2", 4)
    held = ev.evaluate(s, "heldout")
    plain, given = refine(ev, s, iters=30, samples=32), refine(ev, s, iters=30, samples=32, parent=held)
    assert (given.rmse, given.parent_rmse, given.history) == (plain.rmse, plain.parent_rmse, plain.history)
    assert given.model_calls == plain.model_calls - held.model_calls == plain.model_calls - 4 * 64
    for wrong in (ev.evaluate(s, "train"), ev.evaluate(s, "heldout", 16), ev.evaluate(_preset(p, "unipc-bh2", 5),
                                                                                       "heldout")):
        with pytest.raises(RefineError, match="not of the whole held-out bank"):
            refine(ev, s, iters=2, samples=32, parent=wrong)
    sc = refine_best(ev, [s, _preset(p, "ddim", 4)], screen=4, iters=8, samples=32, check_every=2,
                     parents=[held, None])
    alone = refine_best(ev, [s, _preset(p, "ddim", 4)], screen=4, iters=8, samples=32, check_every=2)
    assert sc.entries == alone.entries and (0, 1) in sc.entries  # two trims of s: its parent evaluated once for both
    assert (sc.winner, sc.screened, sc.result.rmse) == (alone.winner, alone.screened, alone.result.rmse)
    assert sc.result.model_calls == alone.result.model_calls - held.model_calls


def test_a_refinement_that_does_not_beat_its_parent_keeps_the_parent(gmm2d):
    p, ev = gmm2d
    s = _preset(p, "dpm-solver++-2m", 5)
    r = refine(ev, s, iters=3, samples=32, check_every=1, lr=200.0)  # steps far too long: every iterate is worse
    assert not r.improved and r.schedule is s
    assert r.candidate_rmse >= r.parent_rmse and r.rmse == r.parent_rmse
    stopped = refine(ev, s, iters=3, samples=32, stop=lambda: True)  # an interrupt before the first iteration
    assert stopped.stopped and stopped.iters == 0 and stopped.schedule is s and not stopped.improved


def test_a_refinement_given_little_time_keeps_the_best_iterate_it_reached(gmm2d):
    """``seconds`` cuts a refinement short, nothing else: the iterations it ran are the first of the whole run's, its
    result the best held-out iterate among them (the parent where none beat it), and it says it ran out of time.
    Given less than a tenth of what the whole run took, it cannot have run every iteration on any machine that
    keeps its speed within 10x."""
    p, ev = gmm2d
    s = _preset(p, "unipc-bh2", 4)
    whole = refine(ev, s, iters=60, samples=32, check_every=2, patience=60)
    assert whole.iters == 60 and not whole.out_of_time
    cut = refine(ev, s, iters=60, samples=32, check_every=2, patience=60, seconds=whole.seconds / 10)
    assert cut.out_of_time and cut.iters < whole.iters
    assert cut.history == whole.history[: cut.iters]
    checks = [h["heldout_rmse"] for h in cut.history if "heldout_rmse" in h]
    assert cut.rmse == min([cut.parent_rmse, *checks]) <= cut.parent_rmse
    assert cut.info()["out_of_time"] and "out_of_time" not in whole.info()
    with pytest.raises(RefineError, match="above 0"):
        refine(ev, s, iters=2, samples=32, seconds=0)


def test_a_screening_out_of_time_screens_no_more_schedules(gmm2d):
    """Out of time before the first screening ends, ``refine_best`` starts no other: the first schedule is the
    winner, unrefined, and the only one screened."""
    p, ev = gmm2d
    scheds = [_preset(p, spec, 4) for spec in ("ddim", "dpm-solver++-2m", "unipc-bh2", "deis")]
    sc = refine_best(ev, scheds, screen=4, iters=30, samples=32, check_every=2, seconds=1e-9)
    assert sc.winner == 0 and len(sc.screened) == 1 and sc.screened[0][2] == 0
    assert sc.result.out_of_time and sc.result.iters == 0 and sc.result.schedule is scheds[0]


def test_refine_best_refines_on_the_schedule_best_after_its_screening(gmm2d):
    """Without halving, each schedule's screening is its own refinement of ``screen`` iterations; the one best on the
    held-out bank after it goes on to the end, and so ends exactly where ``refine`` of it alone does."""
    p, ev = gmm2d
    scheds = [_preset(p, spec, 4) for spec in ("ddim", "dpm-solver++-2m", "unipc-bh2", "deis")]
    alone = [refine(ev, s, iters=6, samples=32, check_every=2) for s in scheds]
    sc = refine_best(ev, scheds, screen=6, iters=30, samples=32, check_every=2, halving=False, trim=0.0)
    assert sc.screened == [(r.parent_rmse, r.rmse, 6) for r in alone]
    assert sc.winner == min(range(len(alone)), key=lambda i: alone[i].rmse)
    r = sc.result
    assert r.parent is scheds[sc.winner] and r.parent_rmse == alone[sc.winner].parent_rmse
    assert r.improved and r.rmse <= alone[sc.winner].rmse < r.parent_rmse
    assert ev.evaluate(r.schedule, "heldout").metrics["rmse"] == pytest.approx(r.rmse, rel=1e-12)
    whole = refine(ev, scheds[sc.winner], iters=30, samples=32, check_every=2)
    assert (r.rmse, r.iters, r.best_iter) == (whole.rmse, whole.iters, whole.best_iter) and r.iters > 6
    assert r.history == whole.history and r.loss == whole.loss
    assert r.model_calls == sum(a.model_calls for i, a in enumerate(alone) if i != sc.winner) + whole.model_calls
    one = refine_best(ev, scheds[2:3], screen=6, iters=30, samples=32, check_every=2, trim=0.0).result
    plain = refine(ev, scheds[2], iters=30, samples=32, check_every=2)
    assert (one.rmse, one.iters, one.model_calls) == (plain.rmse, plain.iters, plain.model_calls)


def test_each_trim_is_screened_with_every_schedule_and_the_best_refinement_kept(gmm2d):
    """Several trims: every schedule is screened with every trim, each pair exactly ``refine`` of that schedule with
    that trim, and the pair best on the held-out bank goes on to the end; one schedule with a screening of 0 is
    refined to the end with each trim, the better on the held-out bank kept. Bad trims are refused before anything
    runs."""
    p, ev = gmm2d
    scheds = [_preset(p, spec, 4) for spec in ("ddim", "unipc-bh2")]
    trims = (0.0, 0.1)
    pairs = [(i, k) for k in range(2) for i in range(2)]  # every schedule with the first trim first
    alone = [refine(ev, scheds[i], iters=6, samples=32, check_every=2, trim=trims[k]) for i, k in pairs]
    assert [r.dropped for r in alone] == [0, 0, 3, 3]
    sc = refine_best(ev, scheds, screen=6, iters=30, samples=32, check_every=2, halving=False, trim=trims, gate=0)
    assert sc.entries == pairs and sc.screened == [(r.parent_rmse, r.rmse, 6) for r in alone]
    w = min(range(4), key=lambda e: (alone[e].rmse, e))
    assert (sc.winner, sc.chosen) == pairs[w] and sc.result.dropped == alone[w].dropped
    whole = refine(ev, scheds[sc.winner], iters=30, samples=32, check_every=2, trim=trims[sc.chosen])
    assert (sc.result.rmse, sc.result.history) == (whole.rmse, whole.history)
    again = sum(ev.evaluate(scheds[i], "heldout").model_calls for i, k in pairs if k)  # a parent is evaluated once
    losers = sum(a.model_calls for e, a in enumerate(alone) if e != w)
    assert sc.result.model_calls == losers + whole.model_calls - again
    each = [refine(ev, scheds[1], iters=30, samples=32, check_every=2, trim=t) for t in trims]
    one = refine_best(ev, scheds[1:], screen=0, iters=30, samples=32, check_every=2, trim=trims, gate=0)
    best = min(range(2), key=lambda k: (each[k].candidate_rmse, k))
    assert (one.winner, one.chosen, one.screened) == (0, best, [])
    assert (one.result.candidate_rmse, one.result.history) == (each[best].candidate_rmse, each[best].history)
    assert one.result.rmse == min(r.rmse for r in each)
    for bad in ([], [0.0, 1.0]):
        with pytest.raises(RefineError, match="trim"):
            refine_best(ev, scheds, screen=6, iters=30, samples=32, check_every=2, trim=bad,
                        progress=lambda *a: pytest.fail("a refinement ran"))


def test_a_trim_is_screened_only_where_it_changes_the_loss_enough(gmm2d):
    """``gate``: a schedule is screened with a trim other than the first only where the shares of its loss at the
    start that the two leave out are at least ``gate`` apart, those shares here computed from its final states apart;
    ``plan`` is told the pairs and rounds before they run, and the shares' model calls count in the result's."""
    p, ev = gmm2d
    scheds = [_preset(p, spec, 4) for spec in ("ddim", "unipc-bh2")]
    shares = []
    with torch.no_grad():
        x, ref = ev.x_T("train", 32).to(torch.float32), ev.reference("train")[:32].to(torch.float32)
        for s in scheds:
            err = (final_state(p.model, parameters(s, p.noise), x) - ref).pow(2).flatten(1).mean(1)
            shares.append(float(err.sort(descending=True).values[:3].sum() / err.sum()))
    assert loss_shares(ev, scheds[1], (0.0, 0.1), 32) == pytest.approx([0.0, shares[1]], rel=1e-5)
    lo, hi = sorted(shares)
    assert hi - lo > 0.02, shares  # a gate between them tells them apart
    told = []
    sc = refine_best(ev, scheds, screen=6, iters=8, samples=32, check_every=2, trim=(0.0, 0.1), gate=(lo + hi) / 2,
                     plan=lambda *a: told.append(a))
    assert sc.entries == [(0, 0), (1, 0), (shares.index(hi), 1)] and told == [(sc.entries, screen_rounds(6, 2, 3))]
    ungated = refine_best(ev, scheds, screen=6, iters=8, samples=32, check_every=2, trim=(0.0, 0.1), gate=0,
                          plan=lambda *a: told.append(a))
    assert ungated.entries == [(0, 0), (1, 0), (0, 1), (1, 1)] and told[1] == (ungated.entries, screen_rounds(6, 2, 4))
    alone = refine_best(ev, scheds, screen=6, iters=8, samples=32, check_every=2, trim=0.0)
    for gate, calls in ((1.0, 2 * 4 * 32), (0, 0)):  # two schedules of NFE 4 on 32 states, run once each for shares
        first = refine_best(ev, scheds, screen=6, iters=8, samples=32, check_every=2, trim=(0.0, 0.1), gate=gate)
        assert first.entries == [(0, 0), (1, 0)] if gate else len(first.entries) == 4
        if gate:
            assert (first.result.rmse, first.result.history) == (alone.result.rmse, alone.result.history)
            assert first.result.model_calls == alone.result.model_calls + calls


def test_a_halving_screening_drops_the_worse_half_at_each_round(gmm2d):
    """With halving (the default) every schedule runs the first round; the better half on the held-out bank then
    runs to the next round, and so on until one is left at the end of the screening; that one goes on, again
    exactly as ``refine`` of it alone. Eight schedules and a screening of 8 iterations: 8 run 2, 4 to 4, 2 to 8."""
    p, ev = gmm2d
    scheds = [_preset(p, spec, 4) for spec in ("ddim", "dpm-solver++-2m", "unipc-bh1", "unipc-bh2", "deis", "deis-tab",
                                               "dpm-solver-2", "dpm-solver++-2s")]
    assert len({s.structure_key() for s in scheds}) == 8
    assert screen_rounds(8, 2, 8) == [2, 4, 8] and screen_rounds(6, 2, 4) == [2, 6]
    assert screen_rounds(40, 10, 8) == [10, 20, 40] and screen_rounds(40, 10, 16) == [10, 20, 40]
    assert screen_rounds(40, 10, 4) == [20, 40] and screen_rounds(40, 10, 2) == [40]
    assert screen_rounds(10, 10, 8) == [10]
    ran = {n: [refine(ev, s, iters=n, samples=32, check_every=2) for s in scheds] for n in (2, 4, 8)}
    four = sorted(range(8), key=lambda i: (ran[2][i].rmse, i))[:4]
    two = sorted(four, key=lambda i: (ran[4][i].rmse, i))[:2]
    winner = min(two, key=lambda i: (ran[8][i].rmse, i))
    sc = refine_best(ev, scheds, screen=8, iters=30, samples=32, check_every=2, trim=0.0)
    assert sc.winner == winner
    last = {i: 8 if i in two else 4 if i in four else 2 for i in range(8)}
    assert sc.screened == [(ran[last[i]][i].parent_rmse, ran[last[i]][i].rmse, last[i]) for i in range(8)]
    whole = refine(ev, scheds[winner], iters=30, samples=32, check_every=2)
    assert (sc.result.rmse, sc.result.history) == (whole.rmse, whole.history)
    losers = sum(ran[last[i]][i].model_calls for i in range(8) if i != winner)
    assert sc.result.model_calls == losers + whole.model_calls


def test_the_structure_refinement_sees_leaves_out_what_it_fits(gmm2d):
    p, ev = gmm2d
    s = _preset(p, "unipc-bh2", 5)
    key = refined_structure(s, p.noise)
    steps = list(s.steps)
    i = parameters(s, p.noise).dc_steps[0]
    steps[i] = replace(steps[i], dc_ratio=1.1)
    moved = [replace(st, t=0.5 * st.t + 0.5 * s.steps[i - 1].t) if 0 < i < len(steps) - 1 else st
             for i, st in enumerate(s.steps)]
    assert refined_structure(s.with_steps(steps), p.noise) == key
    assert refined_structure(s.with_steps(moved), p.noise) == key
    other = _preset(p, "dpm-solver++-2m", 5)
    assert other.structure_key() != s.structure_key() and refined_structure(other, p.noise) != key


def test_on_a_gaussian_the_refined_time_is_the_best_one():
    """Two DDIM steps on Gaussian data: the interior time that minimises the error against the closed-form
    solution (a grid search) is where refinement goes from a time-uniform start."""
    mu = torch.tensor([0.5, -1.0, 0.0, 0.3], dtype=torch.float64)
    var = torch.tensor([0.02, 0.1, 0.5, 1.5], dtype=torch.float64)
    p = mixture_problem(GaussianMixture([1.0], mu[None], torch.diag(var)[None]), "vp-linear", name="gaussian")
    ev = Evaluator(p, n_train=64, n_heldout=128, cache_dir=None)
    s = _preset(p, "ddim", 2, spacing="time-uniform")
    x = ev.x_T("heldout")
    exact = exact_solution(p.noise, mu, var, x, p.t_start, p.t_end)

    def err(t1):
        return float((sample(p.model, x, s.with_steps([replace(s.steps[0], t=t1), s.steps[1]])) - exact)
                     .pow(2).mean().sqrt())

    grid = [0.02 + 0.002 * k for k in range(481)]
    best = min(grid, key=err)
    r = refine(ev, s, iters=60, samples=64)
    start, got = s.times[1], r.schedule.times[1]
    assert abs(got - best) < 0.05 * abs(start - best), (start, got, best)
    assert r.rmse == pytest.approx(err(got), rel=1e-6) and err(got) < err(start)


def test_the_digits_unet_refines_on_a_tiny_bank():
    from steptune.evaluators.digits_cond import digits_problem

    p = digits_problem(guidance_scale=3.0, models_dir=None, bank_sizes=(4, 4), quality=False)
    ev = Evaluator(p, cache_dir=None)
    fine = _preset(p, "unipc-bh2", 12)  # the converged reference takes minutes on a CPU; the UNet path is tested here
    for bank in ("train", "heldout"):
        with torch.no_grad():
            ev.bank(bank).references[float(p.t_end)] = sample(p.model, ev.x_T(bank).float(), fine).double()
    s = _preset(p, "dpm-solver++-2m", 4)
    assert p.model.time_differentiable  # its time gradient is autograd's through the embedding: the difference's
    grads = []
    for model in (p.model, replace(p.model, time_differentiable=False)):
        par = parameters(s, p.noise)
        (final_state(model, par, ev.x_T("train").float()) - ev.reference("train").float()).pow(2).mean().backward()
        grads.append(par.theta["times"].grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0.02, atol=0.02 * float(grads[1].abs().max()))
    r = refine(ev, s, iters=2, samples=4, check_every=2)
    assert r.loss_start > 0 and r.history[1]["loss"] < r.loss_start
    assert r.rmse <= r.parent_rmse and all(a > b for a, b in zip(r.schedule.times, r.schedule.times[1:]))


MU = torch.tensor([0.5, -1.0, 0.25, 1.5])
VAR = torch.tensor([0.04, 0.25, 1.0, 0.09])


def gaussian_plug():
    """A plugged network that takes its time as a float (``eps_fn`` reads ``float(t[0])``): the exact noise
    predictor of N(MU, diag(VAR))."""
    from steptune.space.noise import VPLinear

    return Plug(network=eps_fn(VPLinear(), MU, VAR), shape=(4,), noise="vp-linear", prediction="eps",
                time_input="continuous")


def gaussian_plug_in_time():
    """The same network, differentiable in its time input and saying so."""
    from steptune.space.noise import VPLinear

    return Plug(network=eps_tensor_fn(VPLinear(), MU.double(), VAR.double()), shape=(4,), noise="vp-linear",
                prediction="eps", time_input="continuous", time_differentiable=True)


def test_a_plug_that_says_it_is_differentiable_in_time_is_differentiated_through_it():
    p = load_problem("test_refine:gaussian_plug_in_time")
    assert p.model.time_differentiable and not load_problem("test_refine:gaussian_plug").model.time_differentiable
    s = _preset(p, "dpm-solver++-3m", 5, spacing="time-uniform")
    par = parameters(s, p.noise)
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = exact_solution(p.noise, MU.double(), VAR.double(), x, p.t_start, p.t_end)
    check_gradient(lambda: (final_state(p.model, par, x) - ref).pow(2).mean(), par.theta, lambda kind: 1e-6)


def test_a_plugged_network_refines_towards_the_closed_form_solution(tmp_path, capsys):
    """Through a study whose job names the plug-in: the refined schedule is closer to the exact ODE solution."""
    url = f"sqlite:///{tmp_path / 'p.db'}"
    job = job_from_dict({"study": "plug", "problem": {"model": "test_refine:gaussian_plug"}, "search": {"nfe": [3]},
                         "evaluation": {"cheap_samples": 32, "train_samples": 64, "heldout_samples": 128,
                                        "cache": str(tmp_path / "cache")}})
    p = load_problem("test_refine:gaussian_plug")
    ev = Evaluator(p, n_train=64, n_heldout=128, cache_dir=tmp_path / "cache")
    s = _preset(p, "dpm-solver++-2m", 3, spacing="time-uniform")
    with connect(url, create=True) as db:
        db.create_study("plug", kind="search", config={"job": job.model_dump(), "fidelity": "heldout"})
        db.add_trials("plug", [{"schedule": s, "status": "complete", "fidelity": "heldout", "bank": "heldout",
                                "metrics": ev.evaluate(s, "heldout").metrics, "info": {"confirms": 0}}])
    code, out, err = run_cli(["refine", "--study", "plug", "--db", url, "--iters", "30"], capsys)
    assert code == 0, err
    with connect(url) as db:
        best = db.best("plug", 3)
    assert "refines" in best.info
    x = ev.x_T("heldout").float()
    exact = exact_solution(p.noise, MU, VAR, x, p.t_start, p.t_end)

    def err_of(sched):
        return float((sample(p.model, x, sched) - exact).pow(2).mean().sqrt())

    assert err_of(best.to_schedule()) < 0.3 * err_of(s)


# ---- the command and the job stage ----------------------------------------------------------------------


def _job(tmp_path, cache, study="tiny", refine="iters = 10\nsamples = 32\nneighbours = false\n", **kw):
    text = job_text(study, cache, **kw).replace("confirm = 2\n", "confirm = 2\nbaseline = false\n")
    path = tmp_path / f"{study}.toml"
    path.write_text(text + (f"\n[refine]\n{refine}" if refine is not None else ""))
    return path


def _ran(tmp_path, cache, study: str, refine: str, capsys) -> tuple:
    """``steptune run`` of a tiny job with this ``[refine]`` section into a new database: the job file, the database
    URL and the study's trials."""
    url = f"sqlite:///{tmp_path / f'{study}.db'}"
    job = _job(tmp_path, cache, study, refine=refine)
    code, _, err = run_cli(["run", str(job), "--db", url], capsys)
    assert code == 0, err
    with connect(url) as db:
        return job, url, db.trials(study)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def test_the_job_stage_stores_refinements_that_name_their_parents_and_resumes(tmp_path, cache, capsys):
    """Per NFE the stage refines the best searched schedule and the best preset at its best spacing; each
    refinement names its parent, and the NFE's best is the best of the four on the held-out bank."""
    url = f"sqlite:///{tmp_path / 'r.db'}"
    job = _job(tmp_path, cache)
    code, out, err = run_cli(["run", str(job), "--db", url], capsys)
    assert code == 0, err
    with connect(url) as db:
        trials = db.trials("tiny")
        refined = [t for t in trials if "refines" in t.info]
        # the table counts the confirmations alone, not the refinements also scored on the held-out bank
        assert f" search evaluations, {sum('confirms' in t.info for t in trials)} held-out confirmations," in out + err
        by_id = {t.id: t for t in trials}
        kinds = sorted((t.nfe, "confirms" in by_id[t.info["refines"]].info) for t in refined)
        assert kinds == [(3, False), (3, True), (4, False), (4, True)]
        for t in refined:
            parent = by_id[t.info["refines"]]
            assert parent.nfe == t.nfe and t.fidelity == parent.fidelity == "heldout"
            assert "confirms" in parent.info or parent.info["origin"].startswith("preset:")
            assert t.info["origin"] == f"refine:{parent.info.get('origin') or f'trial {parent.number}'}"
            assert t.info["refine"]["parent_rmse"] == pytest.approx(parent.score, rel=1e-12)
            assert (t.status == "complete") == t.info["refine"]["improved"] == (t.score < parent.score)
            # the log says how far each went of the job's limit (iters = 10), from the best of the parents screened
            start = min([x["parent_rmse"] for x in t.info["refine"].get("screened", [])] or [parent.score])
            assert f"refined NFE {t.nfe}: held-out RMSE {start:.4g} -> {t.score:.4g} (" in err
            assert f"{t.info['refine']['iters']} of at most 10 iterations)" in err
        for nfe in (3, 4):
            mine = [t for t in refined if t.nfe == nfe]
            kept = [t if t.status == "complete" else by_id[t.info["refines"]] for t in mine]
            assert db.best("tiny", nfe).score == pytest.approx(min(t.score for t in kept), rel=1e-12)
        assert any(t.status == "complete" for t in refined)
    for t in refined:  # the export of a refined schedule names the trial it was refined from
        if t.status == "complete" and db_best_id(url, t.nfe) == t.id:
            code, out, err = run_cli(["export", "--study", "tiny", "--nfe", str(t.nfe), "--db", url], capsys)
            prov = parse_export(out)[1]  # and it reads back in
            assert code == 0 and prov["trial"] == t.id and prov["origin"].startswith("refine:"), err
            assert prov["refined_from"] == {"trial": t.info["refines"], "trial_number": by_id[t.info["refines"]].number,
                                            "score": pytest.approx(by_id[t.info["refines"]].score, rel=1e-12)}
    code, _, err = run_cli(["run", str(job), "--db", url], capsys)  # resumed: nothing is refined or built twice
    assert code == 0, err
    with connect(url) as db:
        assert [t.id for t in db.trials("tiny")] == [t.id for t in trials]
    code, out, err = run_cli(["refine", "--study", "tiny", "--db", url, "--no-neighbours"], capsys)
    assert code == 0 and out.count("earlier") == 2, err
    with connect(url) as db:
        assert len([t for t in db.trials("tiny") if "refines" in t.info]) == 4


def test_a_trim_in_the_job_and_on_the_command_line_reaches_every_refinement(tmp_path, cache, capsys):
    """``[refine] trim`` and ``steptune refine --trim``: each refinement stored leaves round(trim x samples) states
    out of its loss; given several, each refinement is run with each and the one it keeps says which; a trim that is
    not a share of the states is refused in one line before anything is written."""
    _, url, trials = _ran(tmp_path, cache, "trim", "iters = 10\nsamples = 32\ntrim = 0.1\nneighbours = false\n",
                          capsys)
    refined = [t for t in trials if "refines" in t.info]
    assert refined and all(t.info["refine"]["dropped"] == 3 and t.info["refine"]["trim"] == 0.1 for t in refined)
    for bad in ("1.5", "0,x", ",", "nan"):
        code, _, err = run_cli(["refine", "--study", "trim", "--trim", bad, "--db", url], capsys)
        assert (code, err.count("\n")) == (2, 1) and f"--trim {bad}: give a share of the fit states" in err, err
    with connect(url) as db:
        assert [t.id for t in db.trials("trim")] == [t.id for t in trials]
    for text in ("trim = 1\n", "trim = [0, 1]\n", "trim = []\n"):
        bad = _job(tmp_path, cache, "bad", refine=text)
        code, _, err = run_cli(["run", str(bad), "--db", url], capsys)
        assert code == 2 and "trim" in err and err.count("\n") == 1, err
    url2 = f"sqlite:///{tmp_path / 'trims.db'}"
    job = _job(tmp_path, cache, "trims", refine=None)
    assert run_cli(["run", str(job), "--db", url2], capsys)[0] == 0
    code, _, err = run_cli(["refine", "--study", "trims", "--db", url2, "--iters", "10", "--samples", "32",
                            "--no-neighbours", "--trim", "0.1,0"], capsys)
    assert code == 0, err
    assert re.search(r"\), (also with trim 0: every one to its end, the best kept|not with trim 0 \(it would change "
                     r"the loss by under 25%\))\n", err), err
    with connect(url2) as db:
        refined = [t for t in db.trials("trims") if "refines" in t.info]
    assert refined and all(t.info["refine"]["dropped"] == round(32 * t.info["refine"]["trim"]) for t in refined)
    assert {t.info["refine"]["trim"] for t in refined} <= {0.0, 0.1}


def test_the_stage_screens_several_structures_and_refines_the_best_after_screening(tmp_path, cache, capsys):
    """With ``structures = 3`` each NFE's refinement screens the best searched schedule and the best cheap trials of
    the next two structures (as refinement sees them) in the search's order, each scored on the held-out bank, and
    refines on the one best after its screening."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    job = _job(tmp_path, cache, "many", refine="iters = 20\nsamples = 32\nstructures = 3\nneighbours = false\n")
    code, _, err = run_cli(["run", str(job), "--db", url], capsys)
    assert code == 0, err
    from steptune.refine import heldout_result, study_evaluator, study_job

    noise = load_problem("gmm-2d").noise
    with connect(url) as db:
        trials = db.trials("many")
        ev = study_evaluator(study_job(db, "many"), "cpu")
    by_id = {t.id: t for t in trials}
    for nfe in (3, 4):
        (t,) = [t for t in trials if t.nfe == nfe and len({s["trial"] for s in t.info.get("refine", {})
                                                            .get("screened", [])}) > 1]  # not the preset's
        screened = t.info["refine"]["screened"]
        parents = [by_id[s["trial"]] for s in screened[:3]]  # each structure with the first trim, some with the next
        assert [s["trim"] for s in screened] == [TRIMS[0]] * 3 + [TRIMS[1]] * (len(screened) - 3)
        also = {s["trial"] for s in screened[3:]}
        assert [s["trial"] for s in screened[3:]] == [p.id for p in parents if p.id in also]
        assert len(parents) == 3 and all(p.nfe == nfe and "confirms" in p.info and p.fidelity == "heldout"
                                         for p in parents)
        assert [s["parent_rmse"] for s in screened] == pytest.approx([by_id[s["trial"]].score for s in screened],
                                                                     rel=1e-12)
        structure = [refined_structure(p.to_schedule(), noise) for p in parents]
        cheap = sorted((c for c in trials if c.nfe == nfe and c.fidelity == "train" and c.status == "complete"),
                       key=lambda c: (c.score, c.number))
        firsts = {}
        for c in cheap:
            firsts.setdefault(refined_structure(c.to_schedule(), noise), c)
        assert list(firsts).index(structure[0]) < 3  # the best searched schedule is of one of the best structures
        rest = [k for k in firsts if k != structure[0]][:2]
        assert structure[1:] == rest and [p.key for p in parents[1:]] == [firsts[k].key for k in rest]
        best = min(range(len(screened)), key=lambda i: (screened[i]["rmse"], i))
        winner = parents.index(by_id[screened[best]["trial"]])
        assert t.info["refines"] == parents[winner].id and t.info["refine"]["trim"] == screened[best]["trim"]
        assert t.info["refine"]["dropped"] == round(screened[best]["trim"] * 32)
        assert t.score <= screened[best]["rmse"] <= parents[winner].score
        assert f"({parents[winner].score:.4g}), the best of 3 structures after 10 iterations, " in err
        for q in parents:  # their stored confirmations stand for an evaluation the refinement does not make again
            fresh, kept = ev.evaluate(q.to_schedule(), "heldout"), heldout_result(q, ev)
            assert (kept.metrics, kept.n, kept.nfe, kept.status) == (fresh.metrics, fresh.n, fresh.nfe, fresh.status)
            assert kept.model_calls == fresh.model_calls
    code, _, err = run_cli(["refine", "--study", "many", "--db", url, "--nfe", "4", "--structures", "3",
                            "--no-neighbours"], capsys)  # again: nothing refined twice, the others named
    assert code == 0
    said = re.search(rf"NFE 4: trial id {parents[winner].id} was refined before \(trial id {t.id}\); steptune "
                     r"refine --study many --trial (\d+) or (\d+) refines another of its structures", err)
    assert said and {int(i) for i in said.groups()} == {p.id for i, p in enumerate(parents) if i != winner}, err
    from steptune.refine import store_heldout

    with connect(url) as db:  # an evaluation of a part of the bank, or on another device, is made again
        q = parents[0]
        res = ev.evaluate(q.to_schedule(), "heldout")
        other = store_heldout(db, "many", q.to_schedule(), replace(res, device="cuda:0 (another)"), {})
        part = store_heldout(db, "many", q.to_schedule(), ev.evaluate(q.to_schedule(), "heldout", 16), {})
        mine = store_heldout(db, "many", q.to_schedule(), res, {})
        assert heldout_result(other, ev) is None and heldout_result(part, ev) is None
        assert heldout_result(mine, ev).metrics == res.metrics


def test_a_screening_stopped_midway_stores_no_refinement_and_the_next_run_does_it_whole(tmp_path, cache, capsys):
    from steptune.refine import parents, refine_trials, structure_parents, study_evaluator, study_job

    url = f"sqlite:///{tmp_path / 'x.db'}"
    code, _, err = run_cli(["run", str(_job(tmp_path, cache, "stop", refine=None)), "--db", url], capsys)
    assert code == 0, err
    with connect(url) as db:
        ev = study_evaluator(study_job(db, "stop"), "cpu")
        (best,) = parents(db.trials("stop"), "stop", [3])
        group = structure_parents(db, "stop", ev, best, 3)
        checks, said = [], []
        n = db.count_trials()
        out = refine_trials(db, "stop", ev, [group], iters=20, samples=32, say=said.append,
                            progress=lambda *a: checks.append(a), stop=lambda: len(checks) >= 2)
        assert out == [] and db.count_trials() == n and "stopped before its end" in said[-1]
        assert len(checks) == 2  # one held-out check per screening of 10 iterations: the third never ran one
        (r,) = refine_trials(db, "stop", ev, [structure_parents(db, "stop", ev, best, 3)], iters=20, samples=32)
        t = db.trial(r.trial)
        assert [x["trial"] for x in t.info["refine"]["screened"]][:3] == [g.id for g in group]
        assert db.count_trials() == n + 1


def test_under_a_time_budget_a_refinement_ends_in_time_to_be_stored_and_none_starts_without_room(tmp_path, cache,
                                                                                                    capsys,
                                                                                                    monkeypatch):
    """A run's time budget: each refinement is given the time left less ``reserve`` and ends there with its best so
    far, stored (cut off by the run's stop instead it stored nothing, so each run began that refinement again and a
    study whose budget was short never got past it); with less than ``reserve`` left none starts, and ``no_room``
    says so to the run."""
    import time
    import types

    import steptune.refine as stage
    from steptune.refine import parents, refine_trials, study_evaluator, study_job

    url = f"sqlite:///{tmp_path / 'x.db'}"
    code, _, err = run_cli(["run", str(_job(tmp_path, cache, "budget", refine=None)), "--db", url], capsys)
    assert code == 0, err
    clock = [1000.0]  # the time the stage reads the budget's deadline against
    monkeypatch.setattr(stage, "time", types.SimpleNamespace(monotonic=lambda: clock[0],
                                                             perf_counter=time.perf_counter))
    with connect(url) as db:
        ev = study_evaluator(study_job(db, "budget"), "cpu")
        best = parents(db.trials("budget"), "budget", None)
        n, full, said = db.count_trials(), [], []
        assert refine_trials(db, "budget", ev, best, iters=20, samples=32, deadline=1059.0, reserve=60.0,
                             no_room=lambda: full.append(1)) == []  # 59 s left, 60 kept: no room
        assert full == [1] and db.count_trials() == n
        out = refine_trials(db, "budget", ev, best[:1], iters=20, samples=32, say=said.append,
                            deadline=1060.0 + 1e-9, reserve=60.0)  # a nanosecond to refine in
    with connect(url) as db:
        (t,) = [db.trial(r.trial) for r in out]
        assert t.info["refines"] == best[0].id and t.info["refine"]["out_of_time"] and t.info["refine"]["iters"] == 0
        assert db.count_trials() == n + 1
    assert "the time budget ran out" in said[-1] and "stopped" not in " ".join(said)


def db_best_id(url, nfe):
    with connect(url) as db:
        return db.best("tiny", nfe).id


def test_the_stage_refines_the_best_preset_at_its_best_spacing(tmp_path, cache, capsys):
    """The preset parent is the preset and spacing with the lowest RMSE on the cheap fidelity, as a brute force over
    every default preset and spacing finds it; its held-out score is the evaluator's; and so the stage ends no worse
    than the best preset at each NFE, whatever the search found."""
    from steptune.search import DEFAULT_PRESETS
    from steptune.search.baselines import spacing_variants

    url = f"sqlite:///{tmp_path / 'p.db'}"
    job = _job(tmp_path, cache, "presets", refine="iters = 10\nsamples = 32\nneighbours = false\n")
    code, _, err = run_cli(["run", str(job), "--db", url], capsys)
    assert code == 0, err
    p = load_problem("gmm-2d")
    ev = Evaluator(p, n_train=64, n_heldout=128, cache_dir=cache)
    with connect(url) as db:
        trials = db.trials("presets")
        refined_presets = [t for t in trials if t.info.get("baseline") and "refines" not in t.info and
                           any(r.info.get("refines") == t.id for r in trials)]
        assert len(refined_presets) == 2
        for preset in refined_presets:  # the log names what it refines
            assert f"refining NFE {preset.nfe}: preset {preset.schedule['name']} (trial id {preset.id}," in err, err
        for nfe in (3, 4):
            scored = [(ev.evaluate(s, "train", n=32).metrics["rmse"], s.key(), s)
                      for spec in DEFAULT_PRESETS for _, s in spacing_variants(spec, nfe, p.noise, p.t_start, p.t_end)]
            _, key, sched = min(scored, key=lambda r: r[0])
            (preset,) = [t for t in trials if t.nfe == nfe and t.info.get("baseline")]
            assert preset.to_schedule().key() == key
            heldout = ev.evaluate(sched, "heldout").metrics["rmse"]
            assert preset.score == pytest.approx(heldout, rel=1e-9)
            assert [t.info["refines"] for t in trials if "refines" in t.info and t.nfe == nfe].count(preset.id) == 1
            assert db.best("presets", nfe).score <= heldout


def test_refine_command_and_the_not_improved_record(tmp_path, cache, capsys):
    """A study whose best searched schedule has nothing continuous to tune (one DDIM step): the refinement is
    stored pruned, and best() keeps the parent."""
    url = f"sqlite:///{tmp_path / 'n.db'}"
    job = load_job(_job(tmp_path, cache, "one", refine=None))
    p = load_problem("gmm-2d")
    ev = Evaluator(p, n_train=64, n_heldout=128, cache_dir=cache)
    s = _preset(p, "ddim", 1)
    res = ev.evaluate(s, "heldout")
    with connect(url, create=True) as db:
        db.create_study("one", kind="search", config={"job": job.model_dump(), "fidelity": "heldout"})
        (pid,) = db.add_trials("one", [{"schedule": s, "status": "complete", "fidelity": "heldout", "bank": "heldout",
                                        "metrics": res.metrics, "info": {"confirms": 0, "origin": "test"}}])
    code, out, err = run_cli(["refine", "--study", "one", "--db", url, "--iters", "5"], capsys)
    assert code == 0, err
    assert "not better" in out
    with connect(url) as db:
        (t,) = [t for t in db.trials("one") if "refines" in t.info]
        assert t.info["refines"] == pid and t.status == "pruned" and not t.info["refine"]["improved"]
        assert db.best("one", 1).id == pid
    code, out, _ = run_cli(["refine", "--study", "one", "--db", url, "--trial", str(pid), "--json"], capsys)
    assert code == 0 and '"skipped": "refined before"' in out


def test_a_refinement_better_than_its_parent_but_not_the_nfes_best_is_not_called_preferred(tmp_path, cache,
                                                                                          capsys):
    """``--trial`` on a trial other than the NFE's best: its refinement beats its parent and is stored complete, but
    the table names the NFE's best (what ``best`` and ``export`` give) rather than calling the refinement preferred."""
    url = f"sqlite:///{tmp_path / 'o.db'}"
    job = load_job(_job(tmp_path, cache, "other", refine=None))
    p = load_problem("gmm-2d")
    ev = Evaluator(p, n_train=64, n_heldout=128, cache_dir=cache)
    good, worse = _preset(p, "unipc-bh2", 5, order=3), _preset(p, "ddim", 5)
    with connect(url, create=True) as db:
        db.create_study("other", kind="search", config={"job": job.model_dump(), "fidelity": "heldout"})
        ig, iw = db.add_trials("other", [{"schedule": s, "status": "complete", "fidelity": "heldout",
                                          "bank": "heldout", "metrics": ev.evaluate(s, "heldout").metrics,
                                          "info": {"confirms": 0, "origin": "test"}} for s in (good, worse)])
    code, out, err = run_cli(["refine", "--study", "other", "--db", url, "--trial", str(iw), "--iters", "10"], capsys)
    assert code == 0, err
    with connect(url) as db:
        (r,) = [t for t in db.trials("other") if t.info.get("refines") == iw]
        best = db.best("other", 5)
    assert r.status == "complete" and r.info["refine"]["improved"]  # better than its parent
    assert best.id == ig != r.id  # yet the unrefined UniPC stays the NFE's best
    assert f"the NFE's best is trial {ig}" in out and "preferred" not in out, out


def test_refine_ends_with_the_nfes_best_against_the_best_preset(tmp_path, cache, capsys):
    """After its table, a line per NFE: the study's best there now (what ``best`` and ``export`` give) and how it
    compares with the best preset baseline's held-out score; or that the preset is still the best."""
    url = f"sqlite:///{tmp_path / 'v.db'}"
    job = load_job(_job(tmp_path, cache, "verdict", refine=None))
    p = load_problem("gmm-2d")
    ev = Evaluator(p, n_train=64, n_heldout=128, cache_dir=cache)
    good, mid, bad = _preset(p, "unipc-bh2", 5, order=3), _preset(p, "dpm-solver++-2m", 5), _preset(p, "ddim", 5)
    scores = {k: ev.evaluate(s, "heldout").metrics for k, s in (("good", good), ("mid", mid), ("bad", bad))}
    assert scores["good"]["rmse"] < scores["mid"]["rmse"] < scores["bad"]["rmse"]

    def study(name, searched, preset, preset_spec):
        with connect(url, create=True) as db:
            db.create_study(name, kind="search", config={"job": job.model_dump(), "fidelity": "heldout"})
            return db.add_trials(name, [
                {"schedule": searched[1], "status": "complete", "fidelity": "heldout", "bank": "heldout",
                 "metrics": scores[searched[0]], "info": {"confirms": 0, "origin": "test"}},
                {"schedule": preset[1], "status": "complete", "fidelity": "heldout", "bank": "heldout",
                 "metrics": scores[preset[0]], "info": {"baseline": True, "origin": f"preset:{preset_spec}@5"}}])

    ids = study("wins", ("good", good), ("mid", mid), "dpm-solver++-2m")
    code, out, err = run_cli(["refine", "--study", "wins", "--db", url, "--iters", "10"], capsys)
    with connect(url) as db:
        best = db.best("wins", 5)
    assert code == 0 and best.id not in ids[1:] and best.score <= scores["good"]["rmse"], err
    ratio = scores["mid"]["rmse"] / best.score
    assert out.splitlines()[-1] == (f"NFE 5: the best is trial {best.id}, {fmt(best.score)} held-out, {ratio:.2f}x "
                                    f"better than the best preset (dpm-solver++-2m, {fmt(scores['mid']['rmse'])}); "
                                    "best and export give it"), out

    ids = study("loses", ("bad", bad), ("good", good), "unipc-bh2:order=3")
    code, out, err = run_cli(["refine", "--study", "loses", "--db", url, "--iters", "10"], capsys)
    with connect(url) as db:
        assert db.best("loses", 5).id == ids[1]  # ten iterations do not take DDIM past UniPC of order 3
    assert code == 0 and out.splitlines()[-1] == (f"NFE 5: the best preset (unipc-bh2:order=3, "
                                                  f"{fmt(scores['good']['rmse'])}) is still the best held-out"), out


def test_the_refined_column_is_never_worse_than_the_best_searched_schedule(tmp_path):
    """A refinement screened with the best searched schedule may refine another one, which it beats while the
    best stays better: the NFE's refined score is the best searched one then, not the refinement's."""
    from steptune.runner import summarize

    p = load_problem("gmm-2d")
    a, b = _preset(p, "unipc-bh2", 4), _preset(p, "dpm-solver++-2m", 4)
    with connect(f"sqlite:///{tmp_path / 'v.db'}", create=True) as db:
        db.create_study("v", kind="search", config={})
        ia, ib = db.add_trials("v", [{"schedule": s, "status": "complete", "fidelity": "heldout", "bank": "heldout",
                                      "metrics": {"rmse": r}, "info": {"confirms": i, "origin": "test"}}
                                     for i, (s, r) in enumerate(((a, 0.05), (b, 0.06)))])
        db.add_trials("v", [{"schedule": b, "status": "complete", "fidelity": "heldout", "bank": "heldout",
                             "metrics": {"rmse": 0.055}, "info": {"refines": ib, "origin": "refine:test"}}])
        (row,) = summarize(db.trials("v"), [4])
    assert row.refined == 0.05


@pytest.mark.parametrize("preset_fit, refined", [("pruned", 0.06), ("complete", 0.045)])
def test_a_preset_whose_refinement_did_not_beat_it_is_no_refined_score(tmp_path, preset_fit, refined):
    """The refined column is what refinement gave: the searched schedule's (kept where its refinement lost) or a
    preset's refinement that beat the preset; a preset whose refinement lost is the preset column's score, not a
    refined one (status showed the unrefined preset's 0.048 as refined while the search table said the searched one
    was kept)."""
    from steptune.runner import summarize

    p = load_problem("gmm-2d")
    a, b = _preset(p, "unipc-bh2", 4), _preset(p, "dpm-solver++-2m", 4)
    with connect(f"sqlite:///{tmp_path / 'v.db'}", create=True) as db:
        db.create_study("v", kind="search", config={})
        ia, ib = db.add_trials("v", [
            {"schedule": a, "status": "complete", "fidelity": "heldout", "bank": "heldout", "metrics": {"rmse": 0.06},
             "info": {"confirms": 0, "origin": "test"}},
            {"schedule": b, "status": "complete", "fidelity": "heldout", "bank": "heldout", "metrics": {"rmse": 0.048},
             "info": {"baseline": True, "origin": "preset:dpm-solver++-2m"}}])
        db.add_trials("v", [
            {"schedule": a, "status": "pruned", "fidelity": "heldout", "bank": "heldout", "metrics": {"rmse": 0.061},
             "info": {"refines": ia, "origin": "refine:test"}},
            {"schedule": b, "status": preset_fit, "fidelity": "heldout", "bank": "heldout",
             "metrics": {"rmse": 0.049 if preset_fit == "pruned" else 0.045},
             "info": {"refines": ib, "origin": "refine:test"}}])
        (row,) = summarize(db.trials("v"), [4])
    assert (row.preset_score, row.searched_score, row.refined) == (0.048, 0.06, refined)


def _one_line_error(argv, capsys, words):
    code, out, err = run_cli(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and words in lines[0], err
    assert "Traceback" not in out + err


def test_refine_refuses_bad_input_in_one_sentence_and_writes_nothing(tmp_path, cache, capsys):
    url = f"sqlite:///{tmp_path / 'e.db'}"
    job = load_job(_job(tmp_path, cache, "e", refine=None))
    broken = job_from_dict({**job.model_dump(), "problem": {"model": "steptune_no_such_module:make"}})
    p = load_problem("gmm-2d")
    s = _preset(p, "ddim", 3)
    with connect(url, create=True) as db:
        db.create_study("empty", kind="search", config={"job": job.model_dump()})
        db.create_study("dc", kind="dc-fit", config={})
        db.create_study("broken", kind="search", config={"job": broken.model_dump()})
        db.add_trials("broken", [{"schedule": s, "status": "complete", "fidelity": "heldout", "metrics": {"rmse": 0.1},
                                  "info": {"confirms": 0}}])
    _one_line_error(["refine", "--study", "nope", "--db", url], capsys, "nope")
    _one_line_error(["refine", "--study", "empty", "--db", url], capsys, "has no trials yet")
    _one_line_error(["refine", "--study", "dc", "--db", url], capsys,
                    "is not a search (it was made by steptune dc fit)")
    _one_line_error(["refine", "--study", "broken", "--db", url, "--trial", "999"], capsys, "has no trial id 999")
    _one_line_error(["refine", "--study", "broken", "--db", url, "--nfe", "5"], capsys, "no searched schedule at NFE 5")
    _one_line_error(["refine", "--study", "broken", "--db", url], capsys, "cannot be rebuilt")
    _one_line_error(["refine", "--study", "broken", "--db", url, "--samples", "1000"], capsys, "larger than")
    _one_line_error(["refine", "--study", "broken", "--db", url, "--structures", "0"], capsys,
                    "--structures must be at least 1")
    _one_line_error(["refine", "--study", "broken", "--db", url, "--trial", "1", "--structures", "2"], capsys,
                    "--trial ID (that trial alone) or --structures K, not both")
    with connect(url) as db:
        assert db.count_trials() == 1


def test_a_refine_stage_must_refine_searched_nfes(tmp_path, cache, capsys):
    job = _job(tmp_path, cache, "bad", refine="nfe = [7]\n")
    _one_line_error(["run", str(job), "--db", f"sqlite:///{tmp_path / 'b.db'}"], capsys, "refine.nfe 7 is not searched")
    job = _job(tmp_path, cache, "bad", refine="nfe = []\n")
    _one_line_error(["run", str(job), "--db", f"sqlite:///{tmp_path / 'b.db'}"], capsys,
                    "refine.nfe is empty, so nothing would be refined; refine some of search.nfe")


def test_a_refine_stage_interpolates_nfes_it_did_not_search_and_refines_them(tmp_path, cache, capsys):
    """``[refine] interpolate``: the NFE is built by the interpolation rule from the best schedules of the searched
    NFEs (after their refinements) by each interpolation method, scored on the held-out bank as an evaluator scores
    it, the better one stored and refined as a parent; the export at that NFE is the stored trial, and a resumed job
    builds nothing again."""
    from steptune.refine import INTERPOLATED_METHODS
    from steptune.space.retime import interpolate

    refine = "iters = 10\nsamples = 32\ninterpolate = [5]\nneighbours = false\n"
    job, url, trials = _ran(tmp_path, cache, "interp", refine, capsys)
    with connect(url) as db:
        (built,) = [t for t in trials if "interpolated" in t.info]
        neighbours = {n: db.best("interp", n) for n in (3, 4)}
        assert built.nfe == 5 and built.fidelity == "heldout" and built.status == "complete"
        p = load_problem("gmm-2d")
        ev = Evaluator(p, n_train=64, n_heldout=128, cache_dir=cache)
        # each method's schedule scored on the held-out bank; the better one is stored
        made = {m: interpolate({n: t.to_schedule() for n, t in neighbours.items()}, 5, method=m)
                for m in INTERPOLATED_METHODS}
        scores = {m: ev.evaluate(sched, "heldout").metrics["rmse"] for m, sched in made.items()}
        assert built.info["interpolated"]["tried"] == pytest.approx(scores, rel=1e-9)
        assert built.schedule == made[min(scores, key=scores.get)].to_dict()
        assert built.info["interpolated"]["from_trials"] == {str(n): neighbours[n].id
                                                             for n in built.info["interpolated"]["between"]}
        assert built.score == pytest.approx(min(scores.values()), rel=1e-9)
        (kid,) = [t for t in trials if t.info.get("refines") == built.id]
        assert (kid.status == "complete") == (kid.score < built.score)
        # as at a searched NFE, the best preset there is refined too, and the NFE's best is the best of all four
        (preset,) = [t for t in trials if t.nfe == 5 and t.info.get("baseline") and "best_of" in t.info]
        (preset_kid,) = [t for t in trials if t.info.get("refines") == preset.id]
        assert (preset_kid.status == "complete") == (preset_kid.score < preset.score)
        best = db.best("interp", 5)
        done = [t for t in (built, kid, preset, preset_kid) if t.status == "complete"]
        assert best.id == min(done, key=lambda t: (t.score, t.number)).id
    code, out, err = run_cli(["export", "--study", "interp", "--nfe", "5", "--db", url], capsys)
    prov = parse_export(out)[1]
    assert code == 0 and prov["trial"] == best.id and prov["status"] == "complete", err
    # the built trial's refinement still says what it was built from, and which trial that was
    code, out, err = run_cli(["export", "--study", "interp", "--trial", str(kid.id), "--db", url], capsys)
    prov = parse_export(out)[1]
    assert code == 0 and prov["refined_from"]["trial"] == built.id, err
    assert prov["interpolated"]["trial"] == built.id and prov["interpolated"]["nfe"] == 5
    assert prov["interpolated"]["between_trials"] == built.info["interpolated"]["from_trials"]
    code, _, err = run_cli(["run", str(job), "--db", url], capsys)
    assert code == 0, err
    with connect(url) as db:
        assert len(db.trials("interp")) == len(trials)


def _check_builds(trials, built, ev=None) -> None:
    """Each of ``built`` (schedules the neighbour pass stored) was built from its source NFE's best when it was built
    (``best_found`` over the trials before it, interpolated NFEs included), is what ``retime.interpolate`` makes of
    that by its method, and scores what ``ev`` gives it on the held-out bank."""
    from steptune.refine import best_found
    from steptune.space.retime import interpolate

    by_id = {t.id: t for t in trials}
    for t in built:
        how = t.info["neighbour"]
        before = best_found([u for u in trials if u.id < t.id], interpolated=True)
        assert how["from_trial"] == before[how["from_nfe"]].id
        expect = interpolate({how["from_nfe"]: by_id[how["from_trial"]].to_schedule()}, t.nfe, method=how["method"])
        assert t.schedule == expect.to_dict()
        if ev is not None:
            assert t.score == pytest.approx(ev.evaluate(expect, "heldout").metrics["rmse"], rel=1e-9)


def test_the_neighbour_pass_builds_each_nfe_from_its_neighbours_best_until_nothing_is_new(tmp_path, cache, capsys):
    """Sweeps down and up: each NFE's schedules are built from an adjacent NFE's best at that moment by each
    interpolation method, scored on the held-out bank, stored and each refined; the pass ends
    with every NFE's final best tried at both its neighbours, no NFE's best is worse for it, and a resumed job or
    `steptune refine` builds and refines nothing again."""
    from steptune.refine import best_found

    url = f"sqlite:///{tmp_path / 'n.db'}"
    job = _job(tmp_path, cache, "nb", refine="iters = 20\nsamples = 32\nstructures = 2\n", nfe="[3, 4, 6]")
    code, _, err = run_cli(["run", str(job), "--db", url], capsys)
    assert code == 0, err
    with connect(url) as db:
        trials = db.trials("nb")
    by_id = {t.id: t for t in trials}
    built = [t for t in trials if "neighbour" in t.info]
    assert (built[0].nfe, built[0].info["neighbour"]["from_nfe"]) == (4, 6)  # the first sweep goes down
    assert all({t.nfe, t.info["neighbour"]["from_nfe"]} in ({3, 4}, {4, 6}) for t in built)
    _check_builds(trials, built, Evaluator(load_problem("gmm-2d"), n_train=64, n_heldout=128, cache_dir=cache))
    for t in built:  # each refined on its own, not screened, and the log says how it went
        (kid,) = [u for u in trials if u.info.get("refines") == t.id]
        fit = kid.info["refine"]["candidate_rmse"]
        assert f"refined NFE {t.nfe}: trial id {t.id} ({t.score:.4g}) -> {fit:.4g} (" in err
    groups = {(t.nfe, t.info["neighbour"]["from_trial"]) for t in built}
    seen = {}  # the NFE's best the log compares with never goes back up: each result counts for the next
    for m in re.finditer(r"refined NFE (\d+): trial id \d+ .*?; (?:the NFE's best ([\d.e-]+) -> ([\d.e-]+)|"
                         r"not better than the NFE's best \(([\d.e-]+)\))", err):
        nfe, was = int(m[1]), float(m[2] or m[4])
        assert was <= seen.get(nfe, math.inf)
        seen[nfe] = float(m[3]) if m[3] else was
    assert set(seen) == {3, 4, 6}
    final = best_found(trials)
    settled = {(n, final[m].id) for n, m in ((3, 4), (4, 3), (4, 6), (6, 4))}
    assert settled <= groups  # every final best was tried at both its neighbours: nothing is left new
    before = best_found([t for t in trials if "neighbour" not in t.info
                         and "neighbour" not in by_id.get(t.info.get("refines"), t).info])
    assert all(final[n].score <= before[n].score for n in (3, 4, 6))
    code, _, err = run_cli(["run", str(job), "--db", url], capsys)
    assert code == 0, err
    with connect(url) as db:
        assert len(db.trials("nb")) == len(trials)
    code, out, err = run_cli(["refine", "--study", "nb", "--db", url, "--iters", "20", "--structures", "2"], capsys)
    again = [t for t in built if (t.nfe, t.info["neighbour"]["from_trial"]) in settled]  # the sweeps meet those
    assert code == 0 and out.count("from NFE") == len(again), out + err
    assert out.count("earlier") == 3 + len(again)  # and each NFE's refinement of its searched schedules
    with connect(url) as db:
        assert len(db.trials("nb")) == len(trials)


def test_with_an_interpolated_nfe_the_neighbour_pass_sweeps_it_and_the_searched_ones(tmp_path, cache, capsys):
    """With the neighbour pass, the sweeps run again over the searched NFEs and the interpolated one: the interpolated
    NFE gets schedules built from the best of the NFE below by every method, pad included, and the NFE below gets
    schedules built from the interpolated NFE's best; each from its source NFE's best when it was built, scored on the
    held-out bank and refined once. The interpolated NFE's best is the best of all of it, so no worse than the padded
    one, which scores about what the NFE it was padded from does."""
    from steptune.refine import best_found

    job, url, trials = _ran(tmp_path, cache, "interp-nb", "iters = 10\nsamples = 32\ninterpolate = [5]\n", capsys)
    with connect(url) as db:
        best5 = db.best("interp-nb", 5)
    by_id = {t.id: t for t in trials}
    (interp,) = [t for t in trials if "interpolated" in t.info]
    assert set(interp.info["interpolated"]["tried"]) == {"split", "blend"}
    built = [t for t in trials if "neighbour" in t.info]
    assert {(5, 4), (4, 5)} <= {(t.nfe, t.info["neighbour"]["from_nfe"]) for t in built}
    _check_builds(trials, built, Evaluator(load_problem("gmm-2d"), n_train=64, n_heldout=128, cache_dir=cache))
    for t in built:
        assert t.key != interp.key  # the interpolated trial is not built twice
        assert len([k for k in trials if k.info.get("refines") == t.id]) == 1
    pads = [t for t in built if t.nfe == 5 and t.info["neighbour"]["method"] == "pad"]
    assert pads
    for pad in pads:
        assert pad.score == pytest.approx(by_id[pad.info["neighbour"]["from_trial"]].score, rel=0.05)
    at5 = [t for t in trials if t.nfe == 5 and t.status == "complete" and t.score is not None]
    assert best5.score == min(t.score for t in at5) <= min(pad.score for pad in pads)
    assert 5 not in best_found(trials) and best_found(trials, interpolated=True)[5].id == best5.id
    code, _, err = run_cli(["run", str(job), "--db", url], capsys)
    assert code == 0, err
    with connect(url) as db:
        assert len(db.trials("interp-nb")) == len(trials)


def test_the_refine_command_sweeps_the_nfes_a_job_interpolated_with_the_searched_ones(tmp_path, cache, capsys):
    """`steptune refine` on a study whose job interpolated an NFE (its stage's neighbour pass off): without --nfe its
    neighbour pass builds at the interpolated NFE from the searched NFE's best and at the searched NFE from the
    interpolated one's best, each from that NFE's best when it was built; with --nfe it keeps to the NFEs named."""
    job, url, trials = _ran(tmp_path, cache, "cli-interp", "iters = 10\nsamples = 32\ninterpolate = [5]\n"
                            "neighbours = false\n", capsys)
    assert not [t for t in trials if "neighbour" in t.info]
    args = ["refine", "--study", "cli-interp", "--db", url, "--iters", "10", "--samples", "32", "--structures", "2"]
    code, out, err = run_cli([*args, "--nfe", "3", "--nfe", "4"], capsys)
    assert code == 0, err
    with connect(url) as db:
        named = [t for t in db.trials("cli-interp") if "neighbour" in t.info]
    assert named and {(t.nfe, t.info["neighbour"]["from_nfe"]) for t in named} <= {(3, 4), (4, 3)}
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    with connect(url) as db:
        trials = db.trials("cli-interp")
    made = [t for t in trials if "neighbour" in t.info and t.id not in {u.id for u in named}]
    assert {(5, 4), (4, 5)} <= {(t.nfe, t.info["neighbour"]["from_nfe"]) for t in made}
    _check_builds(trials, made)
    for t in made:
        assert len([k for k in trials if k.info.get("refines") == t.id]) == 1
    assert "from NFE 5" in out


def test_a_refine_stage_interpolates_only_nfes_it_did_not_search(tmp_path, cache, capsys):
    job = _job(tmp_path, cache, "bad", refine="interpolate = [4]\n")
    _one_line_error(["run", str(job), "--db", f"sqlite:///{tmp_path / 'b.db'}"], capsys,
                    "refine.interpolate 4 is not an NFE the search leaves out")


def test_the_job_stage_and_the_command_default_to_the_same_iterations_as_refine_itself():
    import inspect

    import steptune.cli.refine
    from steptune.cli.refine import refine_cmd
    from steptune.jobs import RefineSpec

    assert RefineSpec().iters == ITERS == inspect.signature(refine).parameters["iters"].default
    assert inspect.signature(refine_cmd).parameters["iters"].default == ITERS
    assert RefineSpec().structures == STRUCTURES == steptune.cli.refine.STRUCTURES
    assert tuple(RefineSpec().trim) == TRIMS == steptune.cli.refine.TRIMS
    assert GATE == steptune.cli.refine.GATE == inspect.signature(refine_best).parameters["gate"].default
    assert inspect.signature(refine_best).parameters["trim"].default == TRIMS
    assert inspect.signature(refine_cmd).parameters["trim"].default == ",".join(f"{t:g}" for t in TRIMS)
    assert inspect.signature(refine).parameters["trim"].default == TRIM == 0  # one refinement: no state left out
    assert RefineSpec().neighbours is inspect.signature(refine_cmd).parameters["neighbours"].default is True


def test_a_stage_out_of_time_stores_each_refinement_as_far_as_it_got(tmp_path, cache, capsys):
    """``[refine] time``: a refinement that runs out stores what it reached, saying so in its record and in the log;
    here no time at all, so each keeps its parent (stored pruned); ``steptune refine --time`` does the same, and a
    time that is not one is refused in one sentence before anything is written."""
    url = f"sqlite:///{tmp_path / 'timed.db'}"
    job = _job(tmp_path, cache, "timed", refine="iters = 50\nsamples = 32\nneighbours = false\ntime = 1e-9\n")
    code, _, err = run_cli(["run", str(job), "--db", url], capsys)
    assert code == 0, err
    with connect(url) as db:
        trials = db.trials("timed")
    refined = [t for t in trials if "refines" in t.info]
    assert refined and all(t.status == "pruned" and t.info["refine"]["out_of_time"] for t in refined)
    assert all(t.info["refine"]["iters"] == 0 for t in refined)
    screened = [t for t in refined if "screened" in t.info["refine"]]  # a searched NFE's: one screened of several
    assert screened and all(len(t.info["refine"]["screened"]) == 1 for t in screened)
    assert re.search(r"the best of the 1 of \d+ structures screened in the time given, 0 s, 0 of at most 50 "
                     r"iterations, the 1e-09 s given ran out", err), err
    code, out, err = run_cli(["refine", "--study", "timed", "--db", url, "--time", "0.000001", "--trial",
                              str(trials[0].id)], capsys)
    assert code == 0 and "the 1e-06 s given ran out" in err, err
    for bad in ("0", "soon", "-5"):
        _one_line_error(["refine", "--study", "timed", "--db", url, "--time", bad], capsys, "--time")
    with connect(url) as db:
        assert len(db.trials("timed")) == len(trials) + 1
    assert load_job(job).refine.time == 1e-9 and job_from_dict(
        {**load_job(job).model_dump(), "refine": {"time": "1m30s"}}).refine.time == 90


def test_refine_waits_for_no_run_on_the_study_and_holds_it_while_it_works(tmp_path, cache, capsys, monkeypatch):
    """`steptune refine` on a study a live run holds is refused in one line, writing nothing (the job's own
    refinement and a second one would race over the same parents); once that run is gone it refines, holding the
    study as its driver in phase `refine`, and lets go at the end."""
    import socket
    import subprocess
    import sys

    _, url, before = _ran(tmp_path, cache, "held", None, capsys)
    run = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    other = f"{socket.gethostname()}:{run.pid}"
    try:
        with connect(url) as db:
            db.claim_driver("held", other, 120.0)
            db.beat_driver("held", other, phase="search")
        code, _, err = run_cli(["refine", "--study", "held", "--db", url, "--iters", "10", "--no-neighbours"],
                               capsys)
        assert code == 2 and re.fullmatch(re.escape(f"error: study 'held' is being run by another driver (host "
                                                    f"{socket.gethostname()}, process {run.pid}, heartbeat ")
                                          + r"\d+ s ago\); wait for it to finish or stop it first", err.strip()), err
        with connect(url) as db:
            assert len(db.trials("held")) == len(before)
    finally:
        run.stdin.close()
        run.wait(timeout=60)
    seen = []
    from steptune import refine as refine_mod

    refine_one = refine_mod.refine_best

    def watched(*a, **kw):  # while it refines, the study's lease is this process's, in phase refine
        with connect(url) as db:
            seen.append(db.get_study("held").config.get("driver"))
        return refine_one(*a, **kw)

    monkeypatch.setattr(refine_mod, "refine_best", watched)
    code, _, err = run_cli(["refine", "--study", "held", "--db", url, "--iters", "10", "--no-neighbours"], capsys)
    assert code == 0, err
    assert seen and all(d["id"] == f"{socket.gethostname()}:{os.getpid()}" and d["phase"] == "refine" for d in seen)
    with connect(url) as db:
        assert any("refines" in t.info for t in db.trials("held"))
        assert "driver" not in db.get_study("held").config  # let go


def test_the_refine_table_says_better_than_its_parent_only_of_a_refinement_stored_complete():
    from types import SimpleNamespace

    from steptune.cli.refine import _kept
    from steptune.refine import Refined

    best = SimpleNamespace(id=224, score=0.0351)
    built = dict(nfe=6, parent=220, parent_rmse=0.0358, seconds=1.0, trial=223, start_rmse=0.0400, built_from=5)
    pruned = Refined(rmse=0.0358, improved=False, **built)  # its refinement lost to the built parent, stored pruned
    assert _kept(pruned, best) == ("not better than its parent, which beats the NFE's previous best; the NFE's best is "
                                   "trial 224, 0.0351")
    kept = Refined(rmse=0.0351, improved=True, **{**built, "trial": 224})
    assert _kept(kept, best) == "better: preferred"
    lost = Refined(rmse=0.0420, improved=False, **built)
    assert _kept(lost, best) == "not better than the NFE's best, which stays"


def test_structures_too_short_to_screen_are_said_to_be_left_unscreened():
    from steptune.refine import structure_groups

    said = []
    todo = [object()]
    assert structure_groups(None, "s", None, todo, 3, 10, say=said.append) is todo
    assert said == ["3 structures are not screened: refinements of 10 iterations are too short to screen (it takes at "
                    "least 11); each NFE refines its best schedule alone"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_refine_stopped_by_a_signal_says_so_and_lets_go_of_the_study(tmp_path, cache, capsys, sig):
    """`kill` (SIGTERM) or `kill -INT` stops `steptune refine` as Ctrl-C does, also where it was started as a
    background job of a script (SIGINT ignored from the start): exit 130 with a line saying what was stored, and
    the study let go, so a run or another refine takes it at once."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    assert run_cli(["run", str(_job(tmp_path, cache, "sig", refine=None)), "--db", url], capsys)[0] == 0
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "STEPTUNE_LOG_INTERVAL": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "steptune", "refine", "--study", "sig", "--db", url, "--iters",
                             "100000", "--samples", "32", "--structures", "1", "--trim", "0", "--no-neighbours"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    said = []
    for line in proc.stderr:  # a progress line, as a run's refine stage writes it: the refinement is under way
        said.append(line)
        if "held-out RMSE" in line and "refining" not in line:
            assert re.fullmatch(r"\[\d+:\d\d:\d\d\] refine \d+/100000 \| NFE [34] \| held-out RMSE [\d.e-]+\n",
                                line), line
            break
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    err = "".join(said) + err
    assert proc.returncode == 130, err
    assert "interrupted: 0 of " in err and "refinements were stored" in err and "Traceback" not in err, err
    with connect(url) as db:
        assert study_status(db, "sig")["driver"] is None
        assert not [t for t in db.trials("sig") if "refines" in t.info]
