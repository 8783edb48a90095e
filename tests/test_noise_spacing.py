"""Noise schedules against their closed forms and DPM-Solver's NoiseScheduleVP; spacings against
the formulas of reference/usf_s3.md section 5.9."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from steptune.space import noise as noise_mod
from steptune.space import spacing

ALL = {
    "vp-linear": noise_mod.VPLinear(),
    "vp-linear-custom": noise_mod.VPLinear(beta_0=0.05, beta_1=12.0, T=0.9, t_min=1e-4),
    "vp-cosine": noise_mod.VPCosine(),
    "edm": noise_mod.EDM(),
    "flow": noise_mod.RectifiedFlow(),
    "ddpm-linear": noise_mod.VPDiscrete.named("ddpm-linear"),
    "sd-scaled-linear": noise_mod.VPDiscrete.named("sd-scaled-linear"),
    "cosine-discrete": noise_mod.VPDiscrete.named("cosine"),
}
VP = ("vp-linear", "vp-linear-custom", "vp-cosine", "ddpm-linear", "sd-scaled-linear", "cosine-discrete")
DISCRETE = ("ddpm-linear", "sd-scaled-linear", "cosine-discrete")


def finite_range(ns):
    """[t_lo, t_hi] where lambda is finite (rectified flow has alpha(1) = 0)."""
    hi = ns.T if math.isfinite(float(ns.lam(ns.T))) else 0.999 * ns.T
    return ns.t_min, hi


def random_times(ns, n=400, seed=0):
    lo, hi = finite_range(ns)
    g = torch.Generator().manual_seed(seed)
    t = lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)
    return torch.cat([t, torch.tensor([lo, hi], dtype=torch.float64)])


# ---------------------------------------------------------------- round trips and identities


@pytest.mark.parametrize("name", list(ALL))
def test_lambda_round_trip(name):
    ns = ALL[name]
    lo, hi = finite_range(ns)
    lam = torch.linspace(float(ns.lam(hi)), float(ns.lam(lo)), 301, dtype=torch.float64)
    back = ns.lam(ns.t_of_lambda(lam))
    assert torch.allclose(back, lam, rtol=0, atol=1e-9), (back - lam).abs().max()
    t = random_times(ns)
    assert torch.allclose(ns.t_of_lambda(ns.lam(t)), t, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", list(ALL))
def test_lambda_decreases_and_edm_sigma(name):
    ns = ALL[name]
    lo, hi = finite_range(ns)
    t = torch.linspace(lo, hi, 2001, dtype=torch.float64)
    lam = ns.lam(t)
    assert bool((lam[1:] < lam[:-1]).all())
    assert torch.allclose(ns.edm_sigma(t), ns.sigma(t) / ns.alpha(t), rtol=1e-12, atol=0)
    assert torch.allclose(ns.t_of_edm_sigma(ns.edm_sigma(t)), t, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", VP)
def test_vp_alpha2_plus_sigma2_is_one(name):
    ns = ALL[name]
    t = random_times(ns)
    assert torch.allclose(ns.alpha(t) ** 2 + ns.sigma(t) ** 2, torch.ones_like(t), rtol=0, atol=1e-14)


# ---------------------------------------------------------------- closed forms


def test_vp_linear_closed_form():
    for ns in (ALL["vp-linear"], ALL["vp-linear-custom"]):
        b0, b1 = ns.beta_0, ns.beta_1
        t = random_times(ns).numpy()
        log_alpha = -0.25 * t**2 * (b1 - b0) - 0.5 * t * b0
        alpha = np.exp(log_alpha)
        sigma = np.sqrt(-np.expm1(2.0 * log_alpha))  # sqrt(1 - alpha^2) without cancellation near t = 0
        assert np.allclose(ns.log_alpha(torch.from_numpy(t)).numpy(), log_alpha, rtol=1e-14, atol=0)
        assert np.allclose(ns.sigma(torch.from_numpy(t)).numpy(), sigma, rtol=1e-12, atol=0)
        assert np.allclose(ns.lam(torch.from_numpy(t)).numpy(), np.log(alpha) - np.log(sigma), rtol=1e-12, atol=1e-12)
        # inverse: solve (b1 - b0)/4 t^2 + b0/2 t + log alpha(lambda) = 0 for the positive root
        lam = np.linspace(float(ns.lam(ns.T)), float(ns.lam(ns.t_min)), 50)
        la = -0.5 * np.log1p(np.exp(-2.0 * lam))
        a, b = 0.25 * (b1 - b0), 0.5 * b0
        root = (-b + np.sqrt(b * b - 4 * a * la)) / (2 * a)
        assert np.allclose(ns.t_of_lambda(torch.from_numpy(lam)).numpy(), root, rtol=1e-10, atol=0)


def test_vp_cosine_closed_form():
    ns = ALL["vp-cosine"]
    s = ns.s
    t = random_times(ns).numpy()
    alpha = np.cos((t + s) / (1 + s) * np.pi / 2) / np.cos(s / (1 + s) * np.pi / 2)  # sqrt(f(t)/f(0))
    assert np.allclose(ns.alpha(torch.from_numpy(t)).numpy(), alpha, rtol=1e-13, atol=0)
    lam = np.log(alpha) - 0.5 * np.log(1 - alpha**2)
    assert np.allclose(ns.lam(torch.from_numpy(t)).numpy(), lam, rtol=1e-11, atol=1e-11)
    assert float(ns.alpha(0.0)) == pytest.approx(1.0, abs=1e-15)


def test_edm_and_flow_closed_forms():
    edm, flow = ALL["edm"], ALL["flow"]
    t = random_times(edm).numpy()
    assert np.allclose(edm.alpha(torch.from_numpy(t)).numpy(), 1.0)
    assert np.allclose(edm.sigma(torch.from_numpy(t)).numpy(), t, rtol=1e-15)
    assert np.allclose(edm.lam(torch.from_numpy(t)).numpy(), -np.log(t), rtol=1e-14, atol=1e-14)
    t = random_times(flow).numpy()
    assert np.allclose(flow.alpha(torch.from_numpy(t)).numpy(), 1 - t, rtol=1e-14)
    assert np.allclose(flow.sigma(torch.from_numpy(t)).numpy(), t, rtol=1e-14)
    assert np.allclose(flow.t_of_lambda(torch.from_numpy(np.log((1 - t) / t))).numpy(), t, rtol=1e-12)


# ---------------------------------------------------------------- discrete VP = DPM-Solver's NoiseScheduleVP


class DpmSolverDiscreteVP:
    """NoiseScheduleVP('discrete', alphas_cumprod=...) of DPM-Solver, in numpy."""

    def __init__(self, alphas_cumprod):
        ac = np.asarray(alphas_cumprod, dtype=np.float64)
        self.N = len(ac)
        self.t_array = np.linspace(0.0, 1.0, self.N + 1)[1:]
        self.log_alpha_array = 0.5 * np.log(ac)

    @staticmethod
    def interpolate(x, xp, fp):
        """Piecewise linear, extended linearly beyond both ends (DPM-Solver's interpolate_fn)."""
        y = np.interp(x, xp, fp)
        lo, hi = x < xp[0], x > xp[-1]
        y[lo] = fp[0] + (x[lo] - xp[0]) * (fp[1] - fp[0]) / (xp[1] - xp[0])
        y[hi] = fp[-1] + (x[hi] - xp[-1]) * (fp[-1] - fp[-2]) / (xp[-1] - xp[-2])
        return y

    def marginal_log_mean_coeff(self, t):
        return self.interpolate(t, self.t_array, self.log_alpha_array)

    def marginal_lambda(self, t):
        la = self.marginal_log_mean_coeff(t)
        return la - 0.5 * np.log(1.0 - np.exp(2.0 * la))

    def inverse_lambda(self, lam):
        la = -0.5 * np.logaddexp(0.0, -2.0 * lam)
        return self.interpolate(la, self.log_alpha_array[::-1], self.t_array[::-1])


@pytest.mark.parametrize("name", DISCRETE)
def test_vp_discrete_matches_dpm_solver(name):
    ns = ALL[name]
    ref = DpmSolverDiscreteVP(ns.alphas_cumprod)
    g = np.random.default_rng(1)
    t = np.concatenate([g.uniform(1.0 / ns.N, 1.0, 500), ref.t_array[::97], g.uniform(1e-4, 1.0 / ns.N, 20)])
    ours = ns.log_alpha(torch.from_numpy(t)).numpy()
    assert np.allclose(ours, ref.marginal_log_mean_coeff(t), rtol=1e-12, atol=1e-15)
    inside = t >= 1.0 / ns.N
    assert np.allclose(ns.lam(torch.from_numpy(t[inside])).numpy(), ref.marginal_lambda(t[inside]), rtol=1e-11,
                       atol=1e-11)
    lam = g.uniform(float(ns.lam(1.0)), float(ns.lam(1.0 / ns.N)), 300)
    assert np.allclose(ns.t_of_lambda(torch.from_numpy(lam)).numpy(), ref.inverse_lambda(lam), rtol=1e-11, atol=1e-13)
    # training step k sits at t = (k + 1)/N with alpha^2 = alphas_cumprod[k] exactly
    k = np.arange(0, ns.N, 37)
    assert np.allclose(ns.alpha(ns.t_of_timestep(torch.from_numpy(k).double())).numpy() ** 2,
                       np.asarray(ns.alphas_cumprod)[k], rtol=1e-13, atol=0)
    assert np.allclose(ns.timestep(ns.t_of_timestep(torch.from_numpy(k).double())).numpy(), k, atol=1e-9)


@pytest.mark.parametrize("name,cfg", [
    ("ddpm-linear", {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}),
    ("sd-scaled-linear", {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}),
    ("cosine-discrete", {"beta_schedule": "squaredcos_cap_v2"}),
])
def test_named_tables_equal_diffusers(name, cfg):
    ours = torch.tensor(ALL[name].alphas_cumprod, dtype=torch.float64)
    ref = DDPMScheduler(num_train_timesteps=1000, **cfg).alphas_cumprod.double()
    assert torch.equal(ours, ref)


def test_noise_from_dict_round_trip():
    for ns in [*ALL.values(), noise_mod.VPDiscrete((0.99, 0.9, 0.5, 0.1))]:
        assert noise_mod.from_dict(ns.to_dict()) == ns
    with pytest.raises(ValueError, match="unknown noise schedule"):
        noise_mod.get("vp-quadratic")


# ---------------------------------------------------------------- spacings


SPACED = ("vp-linear", "vp-cosine", "edm", "ddpm-linear", "cosine-discrete")


@pytest.mark.parametrize("n", [1, 2, 7, 25])
@pytest.mark.parametrize("name", SPACED)
def test_spacing_formulas(name, n):
    ns = ALL[name]
    T, eps = ns.T, ns.t_min
    checks = {
        "time-uniform": (lambda t: t, T, eps),
        "logsnr": (lambda t: ns.lam(t), float(ns.lam(T)), float(ns.lam(eps))),
        "time-quadratic": (lambda t: t.sqrt(), math.sqrt(T), math.sqrt(eps)),
        "karras": (lambda t: ns.edm_sigma(t) ** (1 / 7), float(ns.edm_sigma(T)) ** (1 / 7),
                   float(ns.edm_sigma(eps)) ** (1 / 7)),
    }
    for sp, (g, a, b) in checks.items():
        t = spacing.make(ns, n, sp)
        assert t.dtype == torch.float64 and t.shape == (n + 1,)
        assert bool((t[1:] < t[:-1]).all()), f"{sp}: not strictly decreasing"
        # uniform in the spacing's coordinate, from the coordinate of T to that of t_min
        assert torch.allclose(g(t), torch.linspace(a, b, n + 1, dtype=torch.float64), rtol=1e-10, atol=1e-12), sp


@pytest.mark.parametrize("sp", list(spacing.SPACINGS))
@pytest.mark.parametrize("name", SPACED)
def test_spacing_endpoints_are_exact(name, sp):
    """The first and last times are exactly t_start and t_end (default T and t_min), as given."""
    ns = ALL[name]
    for t_start, t_end in [(None, None), (0.5 * ns.T, 3 * ns.t_min)]:
        t = spacing.make(ns, 10, sp, t_start=t_start, t_end=t_end)
        want = (ns.T if t_start is None else t_start, ns.t_min if t_end is None else t_end)
        assert (float(t[0]), float(t[-1])) == want, f"{sp}: endpoints {float(t[0])!r}, {float(t[-1])!r}, want {want}"


def test_karras_on_edm_is_the_edm_formula():
    ns = ALL["edm"]
    n, rho = 18, 7.0
    i = np.arange(n + 1)
    ref = (80.0 ** (1 / rho) + i / n * (0.002 ** (1 / rho) - 80.0 ** (1 / rho))) ** rho
    assert np.allclose(spacing.make(ns, n, "karras").numpy(), ref, rtol=1e-13, atol=0)


def test_explicit_and_bad_spacings():
    ns = ALL["vp-linear"]
    t = spacing.make(ns, 3, [1.0, 0.5, 0.1, 0.01])
    assert t.tolist() == [1.0, 0.5, 0.1, 0.01]
    with pytest.raises(ValueError, match="need 4"):
        spacing.make(ns, 3, [1.0, 0.5, 0.1])
    with pytest.raises(ValueError, match="unknown spacing"):
        spacing.make(ns, 3, "cubic")
    with pytest.raises(ValueError, match="discrete"):
        spacing.make(ns, 3, "diffusers-linspace")


@pytest.mark.parametrize("name,ends", [("flow", {}), ("edm", {"t_end": 0.0}), ("vp-linear", {"t_end": 0.0})],
                         ids=["flow-from-1", "edm-to-0", "vp-linear-to-0"])
@pytest.mark.parametrize("sp", ["logsnr", "karras"])
def test_spacing_with_infinite_log_snr_end(sp, name, ends):
    """An end where lambda is infinite: rectified flow's default T = 1 (alpha = 0) or t_end = 0 (sigma = 0).
    The spacing must give finite, strictly decreasing times or refuse with a ValueError that says why."""
    ns = ALL[name]
    try:
        t = spacing.make(ns, 6, sp, **ends)
    except ValueError as e:
        assert "alpha" in str(e) or "sigma" in str(e) or "lambda" in str(e) or "log-SNR" in str(e), str(e)
        return
    assert bool(torch.isfinite(t).all()), f"{sp} spacing on {name} {ends} gave {t.tolist()}"
    assert bool((t[1:] < t[:-1]).all()), f"{sp} spacing on {name} {ends} gave {t.tolist()}"
