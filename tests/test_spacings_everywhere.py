"""Every spacing on every problem kind with every preset, with and without a last step to sigma = 0: every
schedule scores finitely, and the network-style reference (the converged many-step solve) agrees with the
exact probability-flow ODE solution where one exists, including its data-space endpoint at t = 0."""

import dataclasses
import inspect
import math

import pytest
import torch

from steptune.evaluators import Evaluator, get_problem
from steptune.evaluators.digits_cond import digits_problem
from steptune.evaluators.neural_reference import ReferenceSettings, converged_states, finite_times
from steptune.evaluators.reference import ode_reference_states
from steptune.exports import SteptuneScheduler, k_diffusion_sigmas
from steptune.space import presets, sample
from steptune.space import spacing as spacing_mod
from steptune.space.noise import VPDiscrete

EXACT_NOISES = ("vp-linear", "ddpm-linear", "edm", "flow")
NFE = 6


def spacings(noise) -> list[str]:
    discrete = spacing_mod.DIFFUSERS_SPACINGS if isinstance(noise, VPDiscrete) else ()
    return [*spacing_mod.SPACINGS, *discrete]


def schedules(problem):
    """(label, schedule) for every preset x spacing x final_zero (where the preset takes it)."""
    for name, fn in presets.PRESETS.items():
        zeros = (False, True) if "final_zero" in inspect.signature(fn).parameters else (False,)
        for spacing in spacings(problem.noise):
            for final_zero in zeros:
                kw = {"final_zero": final_zero} if final_zero else {}
                yield f"{name}/{spacing}/zero={final_zero}", presets.build(
                    name, NFE, problem.noise, spacing=spacing, t_start=problem.t_start, t_end=problem.t_end, **kw)


def rel(a, b) -> float:
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt())


def assert_all_finite(problem, **bank):
    """diffusers' leading spacing starts below T: its schedules run on the problem with the bank at their start."""
    evaluators = {}
    results = {}
    for label, s in schedules(problem):
        if s.t_start not in evaluators:
            evaluators[s.t_start] = Evaluator(dataclasses.replace(problem, t_start=s.t_start), **bank)
        results[label] = evaluators[s.t_start].evaluate(s)
    bad = {k: (r.status, r.error) for k, r in results.items() if not (r.ok and math.isfinite(r.metrics["rmse"]))}
    assert not bad
    assert any(label.endswith("zero=True") for label in results)


@pytest.mark.parametrize("noise", EXACT_NOISES)
def test_every_schedule_scores_on_an_exact_mixture(noise):
    problem = get_problem("gmm-2d", noise)
    assert_all_finite(problem, n_train=4, n_heldout=4, cache_dir=None)


def test_every_schedule_scores_on_the_digits_network(tmp_path):
    problem = digits_problem(guidance_scale=5.0, models_dir=None, bank_sizes=(2, 2), quality=False)
    assert_all_finite(problem, n_train=2, n_heldout=2, cache_dir=tmp_path)


def exact_states(problem, x, times):
    """The exact ODE states at ``times[1:]``; on a discrete schedule, whose network stops at the smallest training
    time, the state at t = 0 is the exact x0 prediction there."""
    finite = finite_times(problem.noise, times)
    if not isinstance(problem.noise, VPDiscrete) or finite == times:
        return ode_reference_states(problem, x, times, cache_dir=None).states
    states = ode_reference_states(problem, x, finite, cache_dir=None).states
    last = states[-1] if len(finite) > 1 else x
    x0 = problem.predict(last, *problem.alpha_sigma(finite[-1]))[1]
    return states[:len(times) - 2] + [x0]


@pytest.mark.parametrize("noise", EXACT_NOISES)
def test_the_network_reference_agrees_with_the_exact_solution_for_every_spacing(noise):
    problem = get_problem("gmm-2d", noise)
    x = Evaluator(problem, n_train=4, n_heldout=4, cache_dir=None).x_T("train").double()
    settings = ReferenceSettings()
    for spacing in spacings(problem.noise):
        for final_zero in (False, True):
            times = presets.dpmpp_2m(NFE, problem.noise, spacing=spacing, t_start=problem.t_start,
                                     final_zero=final_zero).times
            got, _ = converged_states(problem.model, x, times, settings)
            want = exact_states(problem, x, times)
            errors = [rel(g, w) for g, w in zip(got, want, strict=True)]
            assert max(errors) < settings.tol, (spacing, final_zero, errors)


def test_every_schedule_on_a_discrete_schedule_exports():
    """The diffusers scheduler export samples as steptune does and the sigma list ends in 0, for every schedule."""
    problem = get_problem("gmm-2d", "ddpm-linear")
    model = problem.model
    assert (model.prediction, model.time_input) == ("eps", "discrete")
    x_T = torch.randn(4, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for label, s in schedules(problem):
        sigmas = k_diffusion_sigmas(s)
        assert sigmas[-1] == 0 and all(math.isfinite(v) for v in sigmas), label
        scheduler = SteptuneScheduler(schedule=s.to_dict())
        scheduler.set_timesteps(num_inference_steps=s.nfe)
        x = x_T.clone()
        with torch.no_grad():
            for t in scheduler.timesteps:
                x = scheduler.step(model.fn(scheduler.scale_model_input(x, t), t), t, x).prev_sample
            want = sample(model, x_T.clone(), s)
        assert torch.isfinite(x).all() and (x - want).abs().max().item() <= 1e-9, label
