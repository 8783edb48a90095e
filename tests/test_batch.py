"""Batched evaluation: K schedules through one model call per round give what each gives alone."""

import dataclasses
import math

import torch

from steptune.space import Model, NonFiniteError, Schedule, Step, presets, sample
from steptune.space import noise as noise_mod
from steptune.space.batch import sample_batch

NS = noise_mod.VPLinear()
MU = torch.tensor([0.5, -1.0, 2.0])
VAR = torch.tensor([0.3, 1.5, 0.05])


def per_sample_eps(x, t, label=None, poison_t=None):
    """The exact eps of Gaussian data (class-dependent mean when labelled), every sample at its own t."""
    a, s = NS.alpha(t.to(torch.float64))[:, None], NS.sigma(t.to(torch.float64))[:, None]
    mu = MU if label is None else MU + label[:, None].to(x.dtype)
    out = s * (x - a * mu) / (a * a * VAR + s * s)
    if poison_t is not None:
        out[(t - poison_t).abs() < 1e-12] = math.nan
    return out


def _schedules():
    return [presets.build("ddim", 5, NS), presets.build("dpm-solver++-3m", 8, NS), presets.build("unipc-bh2", 6, NS),
            presets.build("dpm-solver-2", 6, NS), presets.build("heun", 7, NS),
            dataclasses.replace(presets.build("dpm-solver++-2m", 5, NS), afs="zero")]


def test_batched_schedules_match_each_schedule_alone():
    model = Model(per_sample_eps, NS, prediction="eps", time_input="continuous")
    x_T = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))
    scheds = _schedules()
    got = sample_batch(model, x_T, scheds)
    calls = model.calls
    for s, x in zip(scheds, got):
        assert torch.allclose(x, sample(model, x_T, s), rtol=0, atol=1e-13)
    assert calls == max(s.nfe for s in scheds)  # one model call per round, not per schedule


def test_a_schedule_without_model_calls_runs_beside_the_others():
    """An analytical first step straight to the end calls no model: its result is there before the first round."""
    model = Model(per_sample_eps, NS, prediction="eps", time_input="continuous")
    x_T = torch.randn(16, 3, generator=torch.Generator().manual_seed(3))
    direct = Schedule(t_start=1.0, steps=(Step(t=1e-3),), noise=NS.to_dict(), afs="zero")
    scheds = [direct, presets.build("ddim", 5, NS)]
    assert direct.nfe == 0
    got = sample_batch(model, x_T, scheds)
    assert model.calls == 5
    for s, x in zip(scheds, got):
        assert torch.allclose(x, sample(model, x_T, s), rtol=0, atol=1e-13)
    sigma = NS.sigma(torch.tensor([1.0, 1e-3], dtype=torch.float64)).tolist()
    assert torch.allclose(got[0], x_T * (sigma[1] / sigma[0]), rtol=1e-6, atol=0)  # a data step from x0 = 0


def test_conditioning_is_repeated_for_every_schedule_with_guidance():
    labels = torch.arange(16) % 3
    model = Model(per_sample_eps, NS, guidance_scale=2.5, cond_kwargs={"label": labels},
                  uncond_kwargs={"label": torch.zeros(16, dtype=torch.long)})
    x_T = torch.randn(16, 3, generator=torch.Generator().manual_seed(1))
    scheds = _schedules()[:3]
    for s, x in zip(scheds, sample_batch(model, x_T, scheds)):
        assert torch.allclose(x, sample(model, x_T, s), rtol=0, atol=1e-13)


def test_a_diverging_schedule_fails_alone():
    bad = presets.build("ddim", 6, NS)
    poison = bad.steps[2].t
    model = Model(lambda x, t: per_sample_eps(x, t, poison_t=poison), NS)
    x_T = torch.randn(8, 3, generator=torch.Generator().manual_seed(2))
    good = presets.build("dpm-solver++-2m", 7, NS)
    assert all(abs(t - poison) > 1e-9 for t in good.times)
    out = sample_batch(model, x_T, [good, bad, good])
    assert isinstance(out[1], NonFiniteError)
    ref = sample(model, x_T, good)
    assert torch.equal(out[0], ref) and torch.equal(out[2], ref)


def test_custom_steps_and_correctors_batch_too():
    sched = Schedule(t_start=1.0, steps=(Step(t=0.6), Step(t=0.3, order=2), Step(t=1e-3, order=2)),
                     noise=NS.to_dict())
    model = Model(per_sample_eps, NS)
    x_T = torch.randn(4, 3, generator=torch.Generator().manual_seed(3))
    [x] = sample_batch(model, x_T, [sched])
    assert torch.allclose(x, sample(model, x_T, sched), rtol=0, atol=1e-14)


def test_the_evaluator_scores_a_batch_as_it_scores_each_schedule(tmp_path):
    from steptune.evaluators import Evaluator, get_problem

    prob = get_problem("gmm-2d")
    ev = Evaluator(prob, n_train=48, n_heldout=16, cache_dir=tmp_path)
    scheds = [presets.build(name, nfe, prob.noise, t_start=prob.t_start, t_end=prob.t_end)
              for name, nfe in (("ddim", 4), ("unipc-bh2", 6), ("dpm-solver++-3m", 5), ("heun", 7))]
    wrong = presets.build("ddim", 4, prob.noise, t_start=0.5, t_end=prob.t_end)  # does not start at the bank
    many = ev.evaluate_many([*scheds, wrong], bank="train", n=40)
    assert many[-1].status == "failed" and "starts at t = 0.5" in many[-1].error
    for s, r in zip(scheds, many):
        one = ev.evaluate(s, bank="train", n=40)
        assert r.status == one.status == "complete" and (r.n, r.bank, r.nfe) == (40, "train", s.nfe)
        for k, v in one.metrics.items():
            assert math.isclose(r.metrics[k], v, rel_tol=1e-12, abs_tol=1e-15), k


def test_the_digits_labels_follow_each_sample_when_schedules_are_stacked():
    """Sample i of a bank has label i mod 10; stacking K runs of 16 samples must not relabel the K-th run's
    samples as (16 k + i) mod 10."""
    from steptune.evaluators.digits_cond import digits_problem

    prob = digits_problem(guidance_scale=3.0, models_dir=None, quality=False)
    x_T = prob.sample_prior(16, torch.Generator().manual_seed(0))
    scheds = [presets.build(p, 6, prob.noise, t_start=prob.t_start, t_end=prob.t_end)
              for p in ("unipc-bh2", "dpm-solver++-2m", "ddim")]
    for s, x in zip(scheds, sample_batch(prob.model, x_T, scheds)):
        assert torch.allclose(x, sample(prob.model, x_T, s), rtol=0, atol=1e-5)


def test_deferred_state_checks_report_the_first_diverged_step_at_the_end():
    """On an accelerator the per-step finiteness checks are read once, at the end; they must name the
    same step an immediate check would."""
    from steptune.space.sampler import _StateChecks

    checks = _StateChecks(torch.device("cpu"))
    checks.deferred = True
    for i, v in enumerate([1.0, 2.0, math.nan, math.inf, 3.0]):
        checks.after_step(torch.full((4,), v), i)
    try:
        checks.finish()
    except NonFiniteError as e:
        assert e.step == 2 and e.where == "state"
    else:
        raise AssertionError("a NaN state went unreported")
    clean = _StateChecks(torch.device("cpu"))
    clean.deferred = True
    clean.after_step(torch.ones(3), 0)
    clean.finish()
