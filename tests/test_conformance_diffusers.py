"""Presets against diffusers' schedulers: same model, same noise, same timesteps, same samples.

The model is the exact noise predictor for Gaussian data, written as a diffusers UNet would see
it (an integer training timestep in, eps out), so both samplers call the very same function.
Our noise schedule is built from the scheduler's own ``alphas_cumprod`` and our spacing code
produces the times; nothing is copied from the scheduler's timestep list.

Where diffusers departs from the papers, the tests follow diffusers and say so:

* lower-order final steps: DPMSolverMultistep and DEIS lower the order of the last two steps only
  when there are fewer than 15 steps; DPMSolverMultistep with ``final_sigmas_type="zero"`` always
  makes the very last step first order; UniPC lowers the last steps always (order min(p, steps
  left)). Our presets encode the same rules (``lower_order_final``, ``lower_order_final_below``).
* final sigma: DDIM (``set_alpha_to_one``), DPMSolverMultistep and UniPC end at sigma = 0 (t = 0);
  DEIS always ends at the smallest training sigma, i.e. t = 1/N (training step 0), not at 0.
* DPM-Solver++(3M): DPM-Solver and diffusers put half the Taylor weight on the second derivative;
  our preset reproduces that with ``second_scale=0.5`` (its default).
* UniPC bh1 with ``final_sigmas_type="zero"`` returns NaN in diffusers: B(h) = h is infinite at
  sigma = 0 and multiplies a zero correction. The bh1 conformance runs use ``sigma_min`` and end our
  schedule at t = 1/N; a separate test documents the zero case.
"""

import contextlib

import pytest
import torch
from diffusers import DDIMScheduler, DEISMultistepScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

from steptune.space import Model, presets, sample, spacing
from steptune.space.noise import VPDiscrete

D, BATCH = 8, 16
NFES = (5, 10, 20)
SPACINGS = ("linspace", "leading", "trailing")

# float64-clean runs agree to round-off; DPMSolverMultistepScheduler.step casts the sample to
# float32 ("upcast") before every update, which limits agreement to float32 round-off (~1e-7).
TOL_F64 = 1e-11

# diffusers applies numpy functions to torch tensors (sigma table, DEIS coefficients); numpy 2 warns
pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:__array_wrap__ must accept:DeprecationWarning")]
TOL_DPM_F32 = 1e-5


def _data():
    g = torch.Generator().manual_seed(1234)
    mu = 0.7 * torch.randn(D, generator=g, dtype=torch.float64)
    var = torch.linspace(0.05, 2.0, D, dtype=torch.float64)[torch.randperm(D, generator=g)]
    x_T = torch.randn(BATCH, D, generator=g, dtype=torch.float64)
    return mu, var, x_T


MU, VAR, X_T = _data()


def timestep_eps_model(alphas_cumprod: torch.Tensor):
    """eps(x, k) for N(MU, diag(VAR)) data, looked up in the training table at integer step k."""
    table = alphas_cumprod.double()

    def fn(x, k):
        k = float(k.reshape(-1)[0]) if torch.is_tensor(k) else float(k)
        ki = round(k)
        assert abs(k - ki) < 1e-6, f"model called between training steps (k = {k!r})"
        a2 = float(table[ki])
        a, s = a2**0.5, (1.0 - a2) ** 0.5
        return s * (x - a * MU) / (a * a * VAR + s * s)

    return fn


BH1_SIGMA_MIN = {"solver_type": "bh1", "final_sigmas_type": "sigma_min"}

# (id, scheduler class, scheduler config, preset, preset options, diffusers' final point)
CASES = [
    ("ddim", DDIMScheduler, {"clip_sample": False}, "ddim", {}, "zero"),
    ("dpm++2m", DPMSolverMultistepScheduler, {"solver_order": 2}, "dpm-solver++-2m", {}, "zero"),
    ("dpm++3m", DPMSolverMultistepScheduler, {"solver_order": 3}, "dpm-solver++-3m", {}, "zero"),
    ("unipc-bh1-2", UniPCMultistepScheduler, {**BH1_SIGMA_MIN, "solver_order": 2}, "unipc-bh1", {"order": 2},
     "sigma_min"),
    ("unipc-bh1-3", UniPCMultistepScheduler, {**BH1_SIGMA_MIN, "solver_order": 3}, "unipc-bh1", {"order": 3},
     "sigma_min"),
    ("unipc-bh2-2", UniPCMultistepScheduler, {"solver_type": "bh2", "solver_order": 2}, "unipc-bh2", {"order": 2},
     "zero"),
    ("unipc-bh2-3", UniPCMultistepScheduler, {"solver_type": "bh2", "solver_order": 3}, "unipc-bh2", {"order": 3},
     "zero"),
    # DEIS: diffusers' default solver_order is 2 (the paper's and our preset's default is 3).
    ("deis-2", DEISMultistepScheduler, {"solver_order": 2}, "deis", {"order": 2}, "sigma_min"),
    ("deis-3", DEISMultistepScheduler, {"solver_order": 3}, "deis", {"order": 3}, "sigma_min"),
]


@contextlib.contextmanager
def no_float32_downcast():
    """Make ``Tensor.to(torch.float32)`` a no-op (used only around diffusers' step)."""
    orig = torch.Tensor.to

    def to(self, *args, **kwargs):
        if (args and args[0] is torch.float32) or kwargs.get("dtype") is torch.float32:
            return self
        return orig(self, *args, **kwargs)

    torch.Tensor.to = to
    try:
        yield
    finally:
        torch.Tensor.to = orig


def make_scheduler(cls, nfe, sp, cfg):
    s = cls(timestep_spacing=sp, **cfg)
    # Upcast the training table so diffusers computes in float64 ...
    s.alphas_cumprod = s.alphas_cumprod.double()
    s.set_timesteps(nfe)
    if cls is not DDIMScheduler:
        # ... and rebuild the sigma table set_timesteps stored as float32: diffusers' own formula
        # sqrt((1 - a)/a) at the integer timesteps (exact table entries), plus the final sigma.
        ac = s.alphas_cumprod
        table = ((1.0 - ac) / ac) ** 0.5
        final = getattr(s.config, "final_sigmas_type", "sigma_min")
        last = table[:1] if final == "sigma_min" else torch.zeros(1, dtype=torch.float64)
        s.sigmas = torch.cat([table[s.timesteps], last])
    return s


def run_diffusers(s, fn, downcast=True):
    x = X_T.clone()
    for k in s.timesteps:
        eps = fn(x, k)
        with contextlib.nullcontext() if downcast else no_float32_downcast():
            x = s.step(eps, k, x).prev_sample
    return x


def our_schedule(ns, preset, opts, nfe, sp, final):
    if preset == "ddim":
        # DDIMScheduler's own timesteps (set_timesteps of the DDIM family) with the final step to
        # alpha_cumprod = 1, i.e. t = 0.
        times = spacing.diffusers_times(ns, nfe, sp, scheduler="ddim").tolist()
        return presets.ddim(nfe, ns, spacing=times)
    if final == "zero":
        # DPMSolverMultistep / UniPC-bh2: last step to sigma = 0, always first order in diffusers (our
        # presets force order 1 on a step to t = 0); lower-order final steps follow the preset defaults.
        return presets.build(preset, nfe, ns, spacing=f"diffusers-{sp}", **opts)
    # DEIS (always) and UniPC-bh1 (final_sigmas_type="sigma_min", since bh1 to sigma = 0 is NaN in
    # diffusers) end at the smallest training sigma: training step 0, t = 1/N, not t = 0.
    times = spacing.make(ns, nfe, f"diffusers-{sp}", final_zero=False).tolist() + [ns.t_min]
    return presets.build(preset, nfe, ns, spacing=times, **opts)


def run_ours(ns, schedule, fn):
    model = Model(fn, ns, prediction="eps", time_input="discrete")
    x = sample(model, X_T.clone(), schedule)
    assert model.calls == schedule.nfe
    return x


def _conformance_params():
    out = []
    for case in CASES:
        for sp in SPACINGS:
            # DDIMScheduler steps from k to k - N//n; with 'linspace' that is not the next timestep, so the
            # model is evaluated at a time other than the state's (not an ODE discretization); not compared.
            if case[1] is DDIMScheduler and sp == "linspace":
                continue
            for nfe in NFES:
                out.append(pytest.param(case, sp, nfe, id=f"{case[0]}-{sp}-{nfe}"))
    return out


@pytest.mark.parametrize("case,sp,nfe", _conformance_params())
def test_final_samples_match_diffusers(case, sp, nfe):
    name, cls, cfg, preset, opts, final = case
    s = make_scheduler(cls, nfe, sp, cfg)
    if cls is not DDIMScheduler:
        assert s.sigmas.dtype == torch.float64
    ns = VPDiscrete(tuple(s.alphas_cumprod.double().tolist()))
    fn = timestep_eps_model(s.alphas_cumprod)
    sched = our_schedule(ns, preset, opts, nfe, sp, final)
    assert sched.nfe == nfe == len(s.timesteps)
    # the model is evaluated at exactly diffusers' timesteps
    family = "ddim" if cls is DDIMScheduler else "multistep"
    assert [round(float(ns.timestep(t))) for t in sched.times[:-1]] == s.timesteps.tolist()
    assert spacing.diffusers_timesteps(nfe, sp, scheduler=family) == s.timesteps.tolist()
    x_ours = run_ours(ns, sched, fn)
    x_diff = run_diffusers(s, fn)
    assert torch.isfinite(x_diff).all()
    err = (x_ours - x_diff).abs().max().item()
    if cls is DPMSolverMultistepScheduler:
        assert err < TOL_DPM_F32, f"{name} {sp} NFE {nfe}: max |ours - diffusers| = {err:.3e}"
        # with diffusers' float32 cast disabled the two agree to float64 round-off
        s = make_scheduler(cls, nfe, sp, cfg)
        err = (x_ours - run_diffusers(s, fn, downcast=False)).abs().max().item()
    assert err < TOL_F64, f"{name} {sp} NFE {nfe}: max |ours - diffusers| = {err:.3e}"
    # the comparison is not vacuous: the samples moved far from the initial noise
    assert (x_ours - X_T).abs().max().item() > 0.1


@pytest.mark.parametrize("nfe", NFES)
def test_dpmpp_3m_full_second_derivative_differs_from_diffusers(nfe):
    """diffusers' 3M is the half-weight variant: the full Taylor step (second_scale=1) is measurably different."""
    s = make_scheduler(DPMSolverMultistepScheduler, nfe, "linspace", {"solver_order": 3})
    ns = VPDiscrete(tuple(s.alphas_cumprod.double().tolist()))
    fn = timestep_eps_model(s.alphas_cumprod)
    x_diff = run_diffusers(s, fn, downcast=False)
    half = presets.build("dpm-solver++-3m", nfe, ns, spacing="diffusers-linspace")
    full = presets.build("dpm-solver++-3m", nfe, ns, spacing="diffusers-linspace", second_scale=1.0)
    assert (run_ours(ns, half, fn) - x_diff).abs().max().item() < TOL_F64
    assert (run_ours(ns, full, fn) - x_diff).abs().max().item() > 1e-3


@pytest.mark.parametrize("nfe", NFES)
@pytest.mark.parametrize("order", (1, 2, 3))
def test_dpmsolver_low_nfe_lower_order_rules(order, nfe):
    """diffusers' DPMSolverMultistep with order 1 is DDIM on the multistep timesteps; with orders 2/3 the
    step orders our preset chose are the ones diffusers uses (warm-up, lower-order final steps)."""
    s = make_scheduler(DPMSolverMultistepScheduler, nfe, "leading", {"solver_order": order})
    ns = VPDiscrete(tuple(s.alphas_cumprod.double().tolist()))
    fn = timestep_eps_model(s.alphas_cumprod)
    if order == 1:
        sched = presets.ddim(nfe, ns, spacing="diffusers-leading")
    else:
        sched = presets.build(f"dpm-solver++-{order}m", nfe, ns, spacing="diffusers-leading")
    expected = []
    for i in range(nfe):
        o = min(order, i + 1)
        if nfe < 15:
            o = min(o, nfe - i)
        expected.append(1 if i == nfe - 1 else o)  # final_sigmas_type="zero": last step first order
    assert [st.order for st in sched.steps] == expected
    x_diff = run_diffusers(make_scheduler(DPMSolverMultistepScheduler, nfe, "leading", {"solver_order": order}), fn,
                           downcast=False)
    assert (run_ours(ns, sched, fn) - x_diff).abs().max().item() < TOL_F64


@pytest.mark.parametrize("order", (2, 3))
def test_unipc_bh1_final_sigma_zero(order):
    """diffusers' UniPC bh1 to sigma = 0 yields NaN (B(h) = h = inf times a zero correction); ours is finite.
    Should diffusers start returning finite values, they must agree with ours."""
    nfe = 10
    cfg = {"solver_type": "bh1", "solver_order": order, "final_sigmas_type": "zero"}
    s = make_scheduler(UniPCMultistepScheduler, nfe, "linspace", cfg)
    ns = VPDiscrete(tuple(s.alphas_cumprod.double().tolist()))
    fn = timestep_eps_model(s.alphas_cumprod)
    sched = presets.build("unipc-bh1", nfe, ns, spacing="diffusers-linspace", order=order)
    assert sched.times[-1] == 0.0
    x_ours = run_ours(ns, sched, fn)
    assert torch.isfinite(x_ours).all()
    with torch.no_grad(), _ignore_numpy_warnings():
        x_diff = run_diffusers(s, fn)
    if torch.isfinite(x_diff).all():
        assert (x_ours - x_diff).abs().max().item() < TOL_F64
    else:
        assert torch.isnan(x_diff).any()


@contextlib.contextmanager
def _ignore_numpy_warnings():
    import numpy as np

    with np.errstate(all="ignore"):
        yield


FAMILIES = {
    "ddim": (DDIMScheduler, "ddim"),
    "dpmsolver-multistep": (DPMSolverMultistepScheduler, "multistep"),
    "unipc": (UniPCMultistepScheduler, "multistep"),
    "deis": (DEISMultistepScheduler, "multistep"),
}


@pytest.mark.parametrize("steps_offset", (0, 1))
@pytest.mark.parametrize("sp", SPACINGS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_diffusers_timesteps_match_set_timesteps(family, sp, steps_offset):
    cls, kind = FAMILIES[family]
    for n in (1, 2, 3, 5, 7, 10, 13, 20, 25, 33, 50, 100, 250):
        s = cls(timestep_spacing=sp, steps_offset=steps_offset)
        s.set_timesteps(n)
        ours = spacing.diffusers_timesteps(n, sp, steps_offset=steps_offset, scheduler=kind)
        assert ours == s.timesteps.tolist(), f"{family} {sp} n={n} offset={steps_offset}"


def test_discrete_times_map_to_training_steps():
    """diffusers_times puts training step k at t = (k + 1)/N and appends t = 0 (sigma = 0)."""
    s = DPMSolverMultistepScheduler()
    s.set_timesteps(10)
    ns = VPDiscrete(tuple(s.alphas_cumprod.double().tolist()))
    t = spacing.diffusers_times(ns, 10, "linspace")
    assert t[-1] == 0.0 and len(t) == 11
    ks = s.timesteps.double()
    assert torch.allclose(t[:-1], (ks + 1) / 1000, rtol=0, atol=1e-15)
    # alpha at those times is sqrt(alphas_cumprod[k]) exactly (table entries, no interpolation error)
    ac = s.alphas_cumprod.double()[s.timesteps]
    assert torch.allclose(ns.alpha(t[:-1]) ** 2, ac, rtol=1e-13, atol=0)
