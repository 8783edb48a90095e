"""The k-diffusion sampler runs a whole schedule: equal to steptune.sample (every preset, searched-style schedules with
correctors, both prediction types, AFS and DC ratios) on gmm-digits and on the digits UNet, with NFE model calls; the
presets k-diffusion also implements equal k-diffusion's own functions (from its PyPI package) on the same sigmas;
img2img and other step counts follow the re-timing policy; the flow (CONST) convention equals steptune's sampler on
rectified flow."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from kdiffusion_lib import kdiffusion

from steptune.evaluators.digits_cond import digits_problem
from steptune.evaluators.problems import get_problem
from steptune.exports import k_diffusion_sigmas
from steptune.integrations.kdiffusion import denoiser, sampler
from steptune.search.space import DecisionSpace
from steptune.space import Corrector, Schedule, ScheduleError, Step, presets, sample
from steptune.space.noise import VPDiscrete

REL = 1e-6


def rel(a, b):
    return float((a - b).norm() / b.norm())


class Counted:
    """A k-diffusion denoiser that counts its calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, x, sigma, **kw):
        self.calls += 1
        return self.fn(x, sigma, **kw)


def run_both(problem, schedule, x_T, convention=None):
    """steptune.sample and the k-diffusion sampler on the schedule's own sigma list (the state given in the
    caller's scaling, the result brought back): (reference, result, model calls)."""
    ns, m = problem.noise, problem.model
    ref = sample(m, x_T, schedule)
    ks = sampler(schedule, convention=convention, data_mean=m.data_mean)
    den = Counted(denoiser(m, ks.convention))
    scale = (lambda t: 1.0) if ks.convention == "const" else (lambda t: float(ns.alpha(t)))
    sig = torch.tensor(ks.own_sigmas(), dtype=x_T.dtype)
    out = ks(den, x_T / scale(schedule.t_start), sig, disable=True) * scale(schedule.times[-1])
    return ref, out, den.calls


@pytest.fixture(scope="module")
def gmm():
    return get_problem("gmm-digits")


def bank(problem, n=6, seed=0, dtype=torch.float64):
    return problem.sample_prior(n, torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("name", presets.names())
def test_every_preset_equals_steptune_sample_on_gmm_digits(gmm, name):
    for nfe in (4, 7):
        s = presets.build(name, nfe, gmm.noise, t_start=gmm.t_start, t_end=gmm.t_end)
        ref, out, calls = run_both(gmm, s, bank(gmm))
        assert rel(out, ref) < REL and calls == s.nfe == nfe


def searched_style(problem, nfe, seed, afs=("none", "zero", "mean")):
    """Random schedules of the search space (orders 1-4, noise/data prediction, pseudo and implicit correctors,
    relaxations, AFS zero or mean) with DC ratios on every step that has three outputs behind it."""
    space = DecisionSpace(problem.noise, problem.t_start, problem.t_end, afs_kinds=afs)
    rng = np.random.default_rng(seed)
    s = None
    while s is None:
        s = space.random(nfe, rng)
    steps = [dataclasses.replace(st, dc_ratio=float(rng.uniform(0.9, 1.1))) if i >= 2 else st
             for i, st in enumerate(s.steps)]
    return s.with_steps(steps).validate(nfe)


@pytest.mark.usefixtures("float64")
def test_searched_style_schedules_equal_steptune_sample_on_gmm_digits(gmm):
    seen = set()
    for seed in range(12):
        s = searched_style(gmm, 5 + seed % 4, seed)
        ref, out, calls = run_both(gmm, s, bank(gmm, seed=seed))
        assert rel(out, ref) < REL and calls == s.nfe
        seen |= {s.afs} | {st.prediction for st in s.steps} | {st.corrector.kind for st in s.steps if st.corrector}
    assert {"zero", "mean", "noise", "data", "pseudo"} <= seen  # implicit correctors: the next test


@pytest.mark.usefixtures("float64")
def test_a_schedule_with_every_decision_equals_steptune_sample(gmm):
    ns = gmm.noise
    times = presets.build("ddim", 7, ns, t_start=gmm.t_start, t_end=gmm.t_end).times
    steps = (Step(times[1], "data"),
             Step(times[2], "noise", order=2, corrector=Corrector("implicit", relaxation="unipc-bh2")),
             Step(times[3], "data", order=2, relaxation="dpmsolver-2", dc_ratio=1.04,
                  corrector=Corrector("pseudo", order=3)),
             Step(times[4], "noise", order=3, second_scale=0.5, points=(-2, -3), first_points=1, dc_ratio=0.97),
             Step(times[5], "data", order=3, basis="t"),
             Step(times[6], "data", order=2, start=-2, points=(-1,)),
             Step(times[7], "data", order=4, relaxation="linear", relaxation_coef=0.1))
    s = Schedule(t_start=times[0], steps=steps, noise=ns.to_dict(), afs="mean").validate()
    ref, out, calls = run_both(gmm, s, bank(gmm))
    assert rel(out, ref) < REL and calls == s.nfe == 7


@pytest.fixture(scope="module")
def digits():
    return digits_problem(guidance_scale=3.0, quality=False)


@pytest.mark.usefixtures("float64")
def test_the_digits_unet_runs_every_preset_and_a_searched_schedule_as_steptune_sample_does(digits):
    """float64 states; the UNet runs in float32 as shipped (float32 states agree to 3e-6 only: the float32 round-off
    of the rescaled state x / alpha * alpha is amplified by the start's sigma/alpha = 157)."""
    problem = digits
    x = bank(digits, n=2)
    for name in presets.names():
        s = presets.build(name, 5, digits.noise, t_start=digits.t_start, t_end=digits.t_end)
        ref, out, calls = run_both(problem, s, x)
        assert rel(out, ref) < REL and calls == 5, name
    s = searched_style(digits, 6, 3, afs=("none", "zero"))
    ref, out, calls = run_both(problem, s, x)
    assert rel(out, ref) < REL and calls == 6


# ---- against k-diffusion's own samplers --------------------------------------------------------------------------


def kd_denoiser(problem):
    """k-diffusion's own wrapper of a discrete eps model (DiscreteEpsDDPMDenoiser: sigma -> fractional training
    timestep by its own log-sigma interpolation)."""
    ext = kdiffusion("external")
    ac = torch.tensor(problem.noise.alphas_cumprod, dtype=torch.float64)
    return ext.DiscreteEpsDDPMDenoiser(problem.model.fn, ac, quantize=False)


def kd_presets(ns):
    """(preset schedule, k-diffusion function, the sigma list k-diffusion gets, the list our sampler gets): Euler,
    Heun, DPM++ 2M on Karras or logSNR sigmas ending in 0, both given the same list; DPM-Solver-2 with k-diffusion
    given its outer sigmas, ours the schedule's own list, which also holds the midpoints where sample_dpm_2 puts them
    (the geometric mean in sigma, the lambda midpoint)."""
    ks = kdiffusion("sampling")
    out = []
    for name, fn, nfe in (("euler", ks.sample_euler, 6), ("heun", ks.sample_heun, 7),
                          ("dpm-solver++-2m", ks.sample_dpmpp_2m, 6)):
        spacing = "karras" if name != "dpm-solver++-2m" else "logsnr"
        s = presets.build(name, nfe, ns, spacing=spacing, final_zero=True)
        out.append((s, fn, k_diffusion_sigmas(s), k_diffusion_sigmas(s)))
    outer = presets.build("euler", 3, ns, spacing="karras", final_zero=True).times
    s = presets.build("dpm-solver-2", 5, ns, spacing=outer)
    kd = k_diffusion_sigmas(presets.build("euler", 3, ns, spacing="karras", final_zero=True))
    mids = [float(np.sqrt(a * b)) for a, b in zip(kd[:2], kd[1:3])]
    # the preset computes its midpoints from lambda(t) one time at a time; torch evaluates a discrete schedule's
    # lambda a few 1e-8 differently one value at a time and in a batch, so the midpoints are set exactly here
    steps = list(s.steps)
    for k, m in zip((0, 2), mids):
        steps[k] = dataclasses.replace(steps[k], t=float(ns.t_of_edm_sigma(torch.tensor(m, dtype=torch.float64))))
    s = s.with_steps(steps).validate()
    ours = [kd[0], mids[0], kd[1], mids[1], kd[2], 0.0]
    out.append((s, ks.sample_dpm_2, kd, ours))
    return out


def test_presets_equal_k_diffusions_own_samplers_on_the_same_sigmas(gmm):
    """On gmm-digits over ddpm-linear and the digits UNet (its network in float32, the states in float64), through
    k-diffusion's own denoiser wrapper: an independent check of the sigma, scaling and step conventions. (With float32
    states the two differ by 3e-6 to 2e-5: the same steps in another order of float32 operations.)"""
    gmm_ddpm = get_problem("gmm-digits", noise="ddpm-linear")
    for problem in (gmm_ddpm, digits_problem(guidance_scale=3.0, quality=False)):
        dtype, tol = torch.float64, 1e-10
        assert isinstance(problem.noise, VPDiscrete)
        for s, kd_fn, kd_sigmas, our_sigmas in kd_presets(problem.noise):
            x = torch.randn(3, *problem.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
            x = x * float(np.sqrt(1 + kd_sigmas[0] ** 2))
            den = Counted(kd_denoiser(problem))
            theirs = kd_fn(den, x, torch.tensor(kd_sigmas, dtype=dtype), disable=True)
            their_calls, den.calls = den.calls, 0
            ours = sampler(s)(den, x, torch.tensor(our_sigmas, dtype=dtype), disable=True)
            assert rel(ours, theirs) < tol, (s.name, rel(ours, theirs))
            assert den.calls == their_calls == s.nfe, s.name


@pytest.mark.usefixtures("float64")
def test_the_callback_gets_k_diffusions_dicts(gmm):
    ns = VPDiscrete.named("ddpm-linear")
    problem = get_problem("gmm-digits", noise=ns)
    s = presets.build("euler", 5, ns, spacing="karras", final_zero=True)
    sig = torch.tensor(k_diffusion_sigmas(s))
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(2)) * float(sig[0])
    got, want = [], []
    sampler(s)(kd_denoiser(problem), x, sig, callback=got.append, disable=True)
    kdiffusion("sampling").sample_euler(kd_denoiser(problem), x, sig, callback=want.append, disable=True)
    assert [d["i"] for d in got] == [d["i"] for d in want] == list(range(5))
    for g, w in zip(got, want):
        assert set(g) == set(w)
        assert float(g["sigma"]) == float(w["sigma"]) and float(g["sigma_hat"]) == float(w["sigma_hat"])
        assert rel(g["x"], w["x"]) < 1e-12 and rel(g["denoised"], w["denoised"]) < 1e-12


# ---- sigma lists that are not the schedule's own -----------------------------------------------------------------


@pytest.mark.usefixtures("float64")
def test_img2img_and_other_step_counts_follow_the_retiming_policy(gmm):
    s = searched_style(gmm, 6, 5)
    s = dataclasses.replace(s, afs="zero") if s.afs == "none" else s
    s = s.validate()
    ks = sampler(s, data_mean=gmm.model.data_mean)
    den = Counted(denoiser(gmm.model))
    x = bank(gmm)
    for denoise in (0.75, 0.5):
        sig = ks.sigmas(denoise)
        plan = ks.plan(sig)
        assert plan.retimed and plan.schedule.afs == "none"  # a partly noised start is not pure noise
        # the same steps at the same relative positions: the tuned NFE, plus the first call the AFS had saved
        assert len(plan.schedule.steps) == len(s.steps) and plan.calls == s.nfe + (s.afs != "none")
        den.calls = 0
        out = ks(den, x / float(gmm.noise.alpha(s.t_start)), torch.tensor(sig), disable=True)
        assert torch.isfinite(out).all() and den.calls == plan.calls
    kds = kdiffusion("sampling")
    for n in (4, 9):  # a front end's Karras list of another length: one step per interval, to sigma 0
        sig = kds.get_sigmas_karras(n, 0.02, ks.own_sigmas()[0]).double()
        plan = ks.plan(sig)
        assert plan.retimed and plan.schedule.times[-1] == 0.0 and len(plan.schedule.steps) == n
        assert plan.schedule.afs == s.afs  # it starts at the schedule's own first sigma: pure noise
        den.calls = 0
        out = ks(den, x / float(gmm.noise.alpha(s.t_start)), sig, disable=True)
        assert torch.isfinite(out).all() and den.calls == plan.calls


# ---- flow models (ComfyUI's CONST convention) ----------------------------------------------------------------------


@pytest.mark.usefixtures("float64")
def test_the_const_convention_equals_steptune_sample_on_rectified_flow():
    flow = get_problem("gmm-digits", noise="flow")
    assert flow.model.prediction == "flow"
    for name in ("dpm-solver++-2m", "unipc-bh2", "euler"):
        s = presets.build(name, 6, flow.noise, t_start=flow.t_start, t_end=flow.t_end)
        assert sampler(s).convention == "const"
        ref, out, calls = run_both(flow, s, bank(flow))
        assert rel(out, ref) < REL and calls == 6
    s = searched_style(flow, 6, 1)
    ref, out, calls = run_both(flow, s, bank(flow), convention="const")
    assert rel(out, ref) < REL and calls == 6


# ---- where the schedule comes from, and refusals ---------------------------------------------------------------


def test_a_schedule_file_and_a_study_give_the_same_sampler(gmm, tmp_path):
    from steptune.exports import import_schedule
    from steptune.storage import connect

    s = presets.build("unipc-bh2", 6, gmm.noise, t_start=gmm.t_start, t_end=gmm.t_end)
    path = s.save(tmp_path / "s.json")
    assert sampler(path).schedule.key() == s.key()
    doc = {**s.to_dict(), "provenance": {"metrics": {"rmse": 0.1}, "score": 0.1, "fidelity": "heldout"}}
    (tmp_path / "e.json").write_text(json.dumps(doc))
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    with connect(url, create=True) as store:
        t = import_schedule(store, tmp_path / "e.json", "st")
    assert sampler(db=url, study="st", nfe=6).schedule.key() == s.key()
    assert sampler(db=url, study="st", trial=t.id).schedule.key() == s.key()


def test_refusals_say_what_to_do(gmm):
    s = presets.build("ddim", 5, gmm.noise)
    with pytest.raises(ScheduleError, match="use 've'"):
        sampler(s, convention="const")
    with pytest.raises(ScheduleError, match="data_mean"):
        sampler(dataclasses.replace(s, afs="mean"))
    with pytest.raises(ScheduleError, match="nfe= .* or trial="):
        sampler(study="x")


def test_the_own_list_in_half_precision_still_runs_the_schedule_as_tuned(gmm):
    s = presets.build("unipc-bh2", 5, gmm.noise, t_start=gmm.t_start, t_end=gmm.t_end)
    s = dataclasses.replace(s, afs="zero").validate()  # an analytical first step: lost where the list is retimed
    ks = sampler(s)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        sig = torch.tensor(ks.own_sigmas(), dtype=dtype)
        plan = ks.plan(sig)
        assert not plan.retimed and plan.schedule is s and ks.calls(sig) == s.nfe, dtype
    other = torch.tensor(ks.own_sigmas(), dtype=torch.float64) * 1.02  # a rescaled list is still another list
    assert ks.plan(other).retimed
