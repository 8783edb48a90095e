"""Problems: every named noise schedule works, the model conventions agree with the exact posterior,
the noise bank is the exact marginal, identities are JSON-able and distinguish problems."""

import json
import time

import pytest
import torch

from steptune.evaluators import (
    Evaluator,
    Problem,
    default_t_start,
    get_problem,
    mixture_problem,
    reference_solution,
    ring_mixture,
)
from steptune.evaluators.problems import digits_data
from steptune.space import noise as noise_mod
from steptune.space import presets


@pytest.mark.parametrize("name", list(noise_mod.NAMED))
def test_every_noise_schedule_runs_and_converges(name):
    problem = get_problem("gmm-2d", name)
    ev = Evaluator(problem, n_train=64, n_heldout=8, cache_dir=None)
    errs = []
    for nfe in (10, 40):
        sched = presets.dpmpp_2m(nfe, problem.noise, t_start=problem.t_start, t_end=problem.t_end)
        res = ev.evaluate(sched)
        assert res.ok and res.nfe == nfe
        errs.append(res.metrics["median_err"])
    assert errs[1] < errs[0] / 4  # second order: about 16x from 10 to 40 steps
    assert errs[1] < 5e-3


def test_flow_default_start_mirrors_the_clean_end():
    ns = noise_mod.get("flow")
    t0 = default_t_start(ns)
    assert t0 == pytest.approx(0.999, abs=1e-12)
    assert float(ns.lam(t0)) == pytest.approx(-float(ns.lam(ns.t_min)), abs=1e-9)
    for name in noise_mod.NAMED:
        if name != "flow":
            ns = noise_mod.get(name)
            assert default_t_start(ns) == ns.T


@pytest.mark.parametrize("noise,prediction,time_input", [
    ("vp-linear", "eps", "continuous"), ("vp-linear", "x0", "continuous"), ("vp-linear", "v", "sigma"),
    ("vp-linear", "flow", "continuous"), ("ddpm-linear", "eps", "discrete"), ("sd-scaled-linear", "v", "discrete"),
    ("edm", "x0", "sigma"), ("edm", "eps", "continuous"), ("flow", "flow", "continuous"), ("flow", "x0", "sigma"),
])
def test_model_conventions_give_the_exact_posterior(noise, prediction, time_input):
    problem = get_problem("gmm-2d", noise, prediction=prediction, time_input=time_input, time_scale=1.0)
    assert problem.model.prediction == prediction and problem.model.time_input == time_input
    g = torch.Generator().manual_seed(41)
    for t in (problem.t_start, 0.5 * (problem.t_start + problem.t_end), 0.1 * problem.t_start, problem.t_end):
        a, s = problem.alpha_sigma(t)
        x = problem.marginal_samples(16, t, g)
        eps, x0 = problem.model.predict(x, t, a, s)
        eps_ref, x0_ref = problem.mixture.posterior(x, a, s)
        torch.testing.assert_close(x0, x0_ref, rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(eps, eps_ref, rtol=1e-8, atol=1e-8)


def test_prior_bank_is_the_exact_marginal():
    problem = get_problem("gmm-2d", "vp-cosine")
    x = problem.sample_prior(100_000, torch.Generator().manual_seed(42))
    a, s = problem.alpha_sigma(problem.t_start)
    cov = a * a * problem.mixture.covariance + s * s * torch.eye(2)
    torch.testing.assert_close(x.mean(0), a * problem.mixture.mean, rtol=0, atol=0.01)
    torch.testing.assert_close(torch.cov(x.T), cov, rtol=0, atol=0.015)
    edm = get_problem("gmm-2d", "edm")
    x = edm.sample_prior(100_000, torch.Generator().manual_seed(43))
    assert float(x.std()) == pytest.approx(80.0, rel=0.01)


def test_identity_is_json_and_tells_problems_apart():
    ids = [get_problem("gmm-2d", n).identity() for n in noise_mod.NAMED]
    ids.append(get_problem("gmm-2d", "vp-linear", prediction="x0").identity())
    ids.append(get_problem("gmm-2d", "vp-linear", t_end=0.01).identity())
    ids.append(mixture_problem(ring_mixture(radius=1.4), "vp-linear", name="gmm-2d",
                               source={"kind": "gmm", "data": "ring-8+centre"}).identity())
    texts = [json.dumps(i, sort_keys=True) for i in ids]
    assert len(set(texts)) == len(texts)
    assert json.loads(texts[0]) == ids[0]
    assert get_problem("gmm-2d").identity() == get_problem("gmm-2d").identity()


def test_model_data_mean_and_afs_mean():
    problem = get_problem("gmm-2d", "vp-linear")
    torch.testing.assert_close(problem.model.data_mean, problem.mixture.mean)
    ev = Evaluator(problem, n_train=32, n_heldout=8, cache_dir=None)
    sched = presets.ddim(10, problem.noise, t_start=problem.t_start, t_end=problem.t_end)
    from dataclasses import replace

    afs = replace(sched, afs="mean")
    res = ev.evaluate(afs)
    assert res.ok and res.nfe == 9
    # the analytical first step replaces a model call whose output is the prior mean up to alpha_T
    assert abs(res.metrics["rmse"] - ev.evaluate(sched).metrics["rmse"]) < 0.05


def test_gmm_digits_fit_is_fast_deterministic_and_cached(tmp_path):
    start = time.process_time()  # CPU time of this process: not inflated by other work on the machine
    problem = get_problem("gmm-digits", "ddpm-linear", cache_dir=tmp_path)
    assert time.process_time() - start < 10
    mix = problem.mixture
    assert problem.shape == (64,) and mix.dim == 64 and 10 <= mix.n_components <= 20
    assert float(mix.eigvals.min()) >= 0.9e-3  # reg_covar keeps it well conditioned
    assert list((tmp_path / "gmm").glob("*.pt"))
    again = get_problem("gmm-digits", "ddpm-linear", cache_dir=tmp_path)
    refit = get_problem("gmm-digits", "ddpm-linear", cache_dir=None)
    assert again.mixture.fingerprint() == mix.fingerprint() == refit.mixture.fingerprint()
    data = digits_data()
    assert float(data.min()) == -1.0 and float(data.max()) == 1.0
    torch.testing.assert_close(mix.mean, data.mean(0), rtol=0, atol=1e-6)  # EM keeps the data mean
    # the fitted mixture explains the digits far better than a single Gaussian
    single = torch.distributions.MultivariateNormal(data.mean(0), torch.cov(data.T) + 1e-3 * torch.eye(64))
    assert float(mix.log_prob(data).mean()) > float(single.log_prob(data).mean()) + 20
    x_T = problem.sample_prior(8, torch.Generator().manual_seed(44))
    assert x_T.shape == (8, 64)


def test_get_problem_errors():
    with pytest.raises(ValueError, match="unknown problem"):
        get_problem("nope")
    with pytest.raises(ValueError, match="unknown noise schedule"):
        get_problem("gmm-2d", "nope")
    with pytest.raises(ValueError, match="unexpected keyword"):
        get_problem("gmm-2d", "vp-linear", colour="red")
    with pytest.raises(ValueError, match="t_end"):
        get_problem("gmm-2d", "vp-linear", t_start=0.1, t_end=0.2)


@pytest.mark.parametrize("noise,t_end", [("vp-linear", None), ("ddpm-linear", None), ("flow", None), ("edm", 0.0)])
def test_problem_without_mixture_uses_the_model(noise, t_end):
    """A problem that only has a model (as a trained network would) gets its reference ODE from model
    calls on the model's own time axis; it must agree with the exact mixture reference."""
    exact = get_problem("gmm-2d", noise, t_end=t_end)
    net = Problem(name="net", noise=exact.noise, model=exact.model, shape=(2,), t_end=t_end)
    assert not net.has_data and not net.has_log_prob
    x_T = exact.sample_prior(16, torch.Generator().manual_seed(45))
    calls = exact.model.calls
    torch.testing.assert_close(reference_solution(net, x_T), reference_solution(exact, x_T), rtol=0, atol=1e-8)
    assert exact.model.calls == calls  # reference work is not counted as sampler NFE
    ev = Evaluator(net, n_train=16, n_heldout=4, cache_dir=None)
    final_zero = net.t_end == 0.0  # a spacing cannot place a step at lambda = inf; a final step to 0 can
    sched = presets.dpmpp_2m(10, net.noise, t_start=net.t_start, t_end=net.noise.t_min if final_zero else net.t_end,
                             final_zero=final_zero)
    res = ev.evaluate(sched)
    assert res.ok and set(res.metrics) == {"rmse", "median_err"} == set(ev.metric_names())
    a, s = net.alpha_sigma(net.t_start)
    x = net.sample_prior(20_000, torch.Generator().manual_seed(46))
    torch.testing.assert_close(x.mean(0), a * exact.mixture.mean, rtol=0, atol=0.05 * s)
    with pytest.raises(NotImplementedError):
        net.data_samples(3)


def test_mixture_denoiser_accepts_per_sample_times():
    problem = get_problem("gmm-2d", "ddpm-linear")
    fn = problem.model.fn
    x = problem.sample_prior(6, torch.Generator().manual_seed(47))
    steps = torch.tensor([999.0, 500.0, 10.0, 999.0, 0.0, 250.5])
    out = fn(x, steps)
    for i in range(6):
        torch.testing.assert_close(out[i : i + 1], fn(x[i : i + 1], steps[i : i + 1]), rtol=0, atol=0)
    t = float(problem.noise.t_of_timestep(250.5))
    a, s = problem.alpha_sigma(t)
    torch.testing.assert_close(out[5], problem.mixture.posterior(x[5:6], a, s)[0][0])
