"""The one generic step reproduces the published solvers: each test runs a schedule through the
sampler and compares it with an independent, formula-by-formula implementation written here from
the papers' update rules (reference/usf_s3.md section 5), or with a k-diffusion-style loop.
"""

import math

import numpy as np
import pytest
import torch
from gaussian import eps_fn, gaussian_model

from steptune.space import Corrector, Model, NonFiniteError, Schedule, ScheduleError, Step, presets, sample, spacing
from steptune.space import noise as noise_mod

TOL = 1e-10

MU = torch.tensor([0.6, -0.4, 1.1, 0.0, -1.3, 0.25], dtype=torch.float64)
VAR = torch.tensor([0.05, 0.4, 1.7, 0.01, 0.9, 2.5], dtype=torch.float64)

pytestmark = pytest.mark.usefixtures("float64")  # every test here compares with a reference to round-off


def x_T_for(ns, batch=5, seed=3):
    g = torch.Generator().manual_seed(seed)
    return float(ns.sigma(ns.T)) * torch.randn(batch, len(MU), generator=g, dtype=torch.float64)


class Exact:
    """The Gaussian model evaluated directly (eps and x0 at state x, time t), with the schedule's alpha/sigma."""

    def __init__(self, ns):
        self.ns = ns
        self.fn = eps_fn(ns, MU, VAR)
        self.calls = 0

    def coeffs(self, t):
        return float(self.ns.alpha(t)), float(self.ns.sigma(t)), float(self.ns.lam(t))

    def eps(self, x, t):
        self.calls += 1
        return self.fn(x, torch.tensor([float(t)]))

    def x0(self, x, t):
        a, s, _ = self.coeffs(t)
        return (x - s * self.eps(x, t)) / a


def ddim_step(m, x, s, t, out, prediction):
    """DDIM (section 5.2) from s to t given the model output at (x, s)."""
    a_s, s_s, _ = m.coeffs(s)
    a_t, s_t, _ = m.coeffs(t)
    if prediction == "noise":
        eps = out
        x0 = (x - s_s * eps) / a_s
    else:
        x0 = out
        eps = (x - a_s * x0) / s_s
    return a_t * x0 + s_t * eps


def schedule_of(ns, times, steps):
    return Schedule(t_start=float(times[0]), steps=tuple(steps), noise=ns.to_dict()).validate()


def run(ns, schedule, x_T):
    model = gaussian_model(ns, MU, VAR)
    x = sample(model, x_T, schedule)
    assert model.calls == schedule.nfe
    return x


def close(a, b, tol=TOL):
    err = (a - b).abs().max().item()
    assert err < tol, f"max abs difference {err:.3e}"


# ---------------------------------------------------------------- order 1 = DDIM


@pytest.mark.parametrize("final_zero", [False, True])
def test_order1_noise_and_data_equal_closed_form_ddim(final_zero):
    ns = noise_mod.VPLinear()
    times = spacing.make(ns, 9, "time-uniform").tolist() + ([0.0] if final_zero else [])
    x_T = x_T_for(ns)
    runs = {p: run(ns, schedule_of(ns, times, [Step(t=t, prediction=p) for t in times[1:]]), x_T)
            for p in ("noise", "data")}
    m = Exact(ns)
    x = x_T
    for s, t in zip(times[:-1], times[1:]):
        a_s, s_s, _ = m.coeffs(s)
        eps = m.eps(x, s)
        x0 = (x - s_s * eps) / a_s
        x = float(ns.alpha(t)) * x0 + float(ns.sigma(t)) * eps  # x_t = alpha_t x0_hat + sigma_t eps_hat
    close(runs["noise"], runs["data"])
    close(runs["data"], x)
    close(run(ns, presets.ddim(len(times) - 1, ns, spacing=times), x_T), x)
    assert (x - x_T).abs().max() > 0.5


def test_euler_and_deis1_are_ddim():
    ns = noise_mod.VPLinear()
    x_T = x_T_for(ns)
    ref = run(ns, presets.ddim(12, ns, spacing="karras"), x_T)
    close(run(ns, presets.euler(12, ns), x_T), ref)
    close(run(ns, presets.deis(12, ns, spacing="karras", order=1), x_T), ref)


# ---------------------------------------------------------------- DPM-Solver++(2M) and UniP-2


def dpmpp_2m(m, times, x):
    """DPM-Solver++(2M), section 5.4: first step DDIM, then the 2M update with D = (x0_{i-1} - x0_{i-2}) / r0."""
    x0_prev = None
    for i, (s, t) in enumerate(zip(times[:-1], times[1:])):
        x0 = m.x0(x, s)
        a_t, s_t, l_t = m.coeffs(t)
        _, s_s, l_s = m.coeffs(s)
        h = l_t - l_s
        if i == 0:
            x = (s_t / s_s) * x + a_t * (1 - math.exp(-h)) * x0
        else:
            h0 = l_s - m.coeffs(times[i - 1])[2]
            r0 = h0 / h
            D = (x0 - x0_prev) / r0
            x = (s_t / s_s) * x + a_t * (1 - math.exp(-h)) * (x0 + 0.5 * D)
        x0_prev = x0
    return x


def unipc(m, times, x, prediction, variant, order, corrector):
    """UniPC (section 5.5): UniP-p predictor, optional UniC-p corrector on every step but the last,
    warm-up orders min(order, i + 1); the model output at the uncorrected point is kept."""
    outs, lams = [], []
    out_new = m.eps(x, times[0]) if prediction == "noise" else m.x0(x, times[0])
    n = len(times) - 1
    for i, (s, t) in enumerate(zip(times[:-1], times[1:])):
        outs.append(out_new)
        lams.append(m.coeffs(s)[2])
        p = min(order, i + 1)
        a_s, s_s, l_s = m.coeffs(s)
        a_t, s_t, l_t = m.coeffs(t)
        h = l_t - l_s
        hh = h if prediction == "noise" else -h
        B = hh if variant == "bh1" else math.expm1(hh)
        c_t = s_t if prediction == "noise" else a_t
        if prediction == "noise":
            base = (a_t / a_s) * x - s_t * math.expm1(h) * outs[-1]
        else:
            base = (s_t / s_s) * x - a_t * math.expm1(-h) * outs[-1]
        rks = [(lams[-1 - k] - l_s) / h for k in range(1, p)] + [1.0]
        Ds = [(outs[-1 - k] - outs[-1]) / rks[k - 1] for k in range(1, p)]
        # b_q = hh phi_{q+1}(hh) q! / B(hh), q = 1..p
        b, h_phi_k, fact = [], math.expm1(hh) / hh - 1.0, 1
        for q in range(1, p + 1):
            b.append(h_phi_k * fact / B)
            fact *= q + 1
            h_phi_k = h_phi_k / hh - 1.0 / fact
        R = np.array([[r ** (q - 1) for r in rks] for q in range(1, p + 1)])
        b = np.array(b)
        if p == 1:
            x_pred = base
        else:
            rho_p = [0.5] if p == 2 else np.linalg.solve(R[:-1, :-1], b[:-1])
            x_pred = base - c_t * B * sum(float(r) * D for r, D in zip(rho_p, Ds))
        if i == n - 1:
            return x_pred
        out_new = m.eps(x_pred, t) if prediction == "noise" else m.x0(x_pred, t)
        if corrector:
            rho_c = [0.5] if p == 1 else np.linalg.solve(R, b)
            D_t = out_new - outs[-1]
            corr = sum(float(r) * D for r, D in zip(rho_c[:-1], Ds)) + float(rho_c[-1]) * D_t
            x = base - c_t * B * corr
        else:
            x = x_pred
    return x


def order2_schedule(ns, times, prediction, relaxation):
    steps = [Step(t=times[1], prediction=prediction)]
    steps += [Step(t=t, prediction=prediction, order=2, relaxation=relaxation) for t in times[2:]]
    return schedule_of(ns, times, steps)


def test_dpmsolver2_relaxation_is_dpmpp_2m():
    ns = noise_mod.VPLinear()
    times = spacing.make(ns, 11, "time-quadratic").tolist()  # non-uniform in lambda: r0 != 1
    x_T = x_T_for(ns)
    ref = dpmpp_2m(Exact(ns), times, x_T)
    close(run(ns, order2_schedule(ns, times, "data", "dpmsolver-2"), x_T), ref)
    close(run(ns, presets.dpmpp_2m(11, ns, spacing=times, lower_order_final=False), x_T), ref)
    # UniP-2 with B(h) = e^h - 1 is DPM-Solver++(2M)
    close(run(ns, order2_schedule(ns, times, "data", "unipc-bh2"), x_T), ref)
    close(unipc(Exact(ns), times, x_T, "data", "bh2", 2, corrector=False), ref)


@pytest.mark.parametrize("prediction", ["data", "noise"])
@pytest.mark.parametrize("variant", ["bh1", "bh2"])
def test_unip2_predictor(variant, prediction):
    ns = noise_mod.VPLinear()
    times = spacing.make(ns, 10, "time-uniform").tolist()
    x_T = x_T_for(ns)
    ref = unipc(Exact(ns), times, x_T, prediction, variant, 2, corrector=False)
    close(run(ns, order2_schedule(ns, times, prediction, f"unipc-{variant}"), x_T), ref)
    # bh1 and bh2 are different solvers (the comparison can tell them apart)
    other = "bh2" if variant == "bh1" else "bh1"
    assert (ref - unipc(Exact(ns), times, x_T, prediction, other, 2, corrector=False)).abs().max() > 1e-6


@pytest.mark.parametrize("prediction", ["data", "noise"])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("variant", ["bh1", "bh2"])
def test_unipc_presets_with_corrector(variant, order, prediction):
    ns = noise_mod.VPLinear()
    times = spacing.make(ns, 9, "logsnr").tolist()
    x_T = x_T_for(ns)
    ref = unipc(Exact(ns), times, x_T, prediction, variant, order, corrector=True)
    sched = presets.build(f"unipc-{variant}", 9, ns, spacing=times, order=order, prediction=prediction,
                          lower_order_final=False)
    close(run(ns, sched, x_T), ref)


# ---------------------------------------------------------------- DEIS tAB (Lagrange in t)


def deis_tab(ns, times, x, order):
    """tAB-DEIS, section 5.7, on the VP-linear schedule:
    x_{i+1} = Psi x_i + sum_j C_j eps_{i-j}, C_j = int_{t_i}^{t_{i+1}} Psi(t_{i+1}, tau) (-1/2 dlog abar/dtau)
    / sqrt(1 - abar_tau) l_j(tau) dtau, l_j the Lagrange basis in t over the current and previous times;
    integrated with adaptive quadrature in tau (warm-up orders min(order, i + 1))."""
    from scipy.integrate import quad

    b0, b1 = ns.beta_0, ns.beta_1

    def log_alpha(tau):
        return -0.25 * tau**2 * (b1 - b0) - 0.5 * tau * b0

    def kernel(tau, t_next):
        abar = math.exp(2 * log_alpha(tau))
        dlog_abar = -tau * (b1 - b0) - b0
        return math.exp(log_alpha(t_next) - log_alpha(tau)) * (-0.5 * dlog_abar) / math.sqrt(1 - abar)

    m = Exact(ns)
    eps_hist = []
    for i, (t_i, t_next) in enumerate(zip(times[:-1], times[1:])):
        eps_hist.append(m.eps(x, t_i))
        p = min(order, i + 1)
        nodes = times[i - p + 1:i + 1][::-1]  # t_i, t_{i-1}, ...
        new = math.exp(log_alpha(t_next) - log_alpha(t_i)) * x
        for j, tj in enumerate(nodes):
            def integrand(tau, j=j, tj=tj, nodes=nodes, t_next=t_next):
                lj = math.prod((tau - tk) / (tj - tk) for k, tk in enumerate(nodes) if k != j)
                return kernel(tau, t_next) * lj
            c, _ = quad(integrand, t_i, t_next, epsabs=1e-14, epsrel=1e-13, limit=200)
            new = new + c * eps_hist[-1 - j]
        x = new
    return x


@pytest.mark.parametrize("order", [1, 2, 3])
def test_deis_tab_is_lagrange_in_t(order):
    ns = noise_mod.VPLinear()
    times = spacing.make(ns, 8, "logsnr").tolist()
    x_T = x_T_for(ns)
    ref = deis_tab(ns, times, x_T, order)
    close(run(ns, presets.build("deis-tab", 8, ns, spacing=times, order=order, lower_order_final=False), x_T), ref)
    if order > 1:
        # interpolating in t is not interpolating in lambda
        lam_basis = run(ns, presets.build("deis", 8, ns, spacing=times, order=order, lower_order_final=False), x_T)
        assert (lam_basis - ref).abs().max() > 1e-5


# ---------------------------------------------------------------- singlestep DPM-Solver


def fast_orders(nfe, order):
    """DPM-Solver-fast order split (section 5.3)."""
    if order == 2:
        return [2] * (nfe // 2) + [1] * (nfe % 2)
    k, r = divmod(nfe, 3)
    if r == 0:
        return [3] * (k - 1) + [2, 1]
    return [3] * k + ([1] if r == 1 else [2])


def singlestep(m, ns, outer, orders, x, data):
    """DPM-Solver-1/2/3 (noise prediction) and DPM-Solver++(1S/2S) (data prediction), section 5.3."""
    for o, s, t in zip(orders, outer[:-1], outer[1:]):
        a_s, s_s, l_s = m.coeffs(s)
        a_t, s_t, l_t = m.coeffs(t)
        h = l_t - l_s

        def at(r, l_s=l_s, h=h):
            return float(ns.t_of_lambda(torch.tensor(l_s + r * h)))

        if not data:
            e_s = m.eps(x, s)
            if o == 1:
                x = (a_t / a_s) * x - s_t * math.expm1(h) * e_s
            elif o == 2:
                r1 = 0.5
                s1 = at(r1)
                a1, sg1, _ = m.coeffs(s1)
                u = (a1 / a_s) * x - sg1 * math.expm1(r1 * h) * e_s
                x = (a_t / a_s) * x - s_t * math.expm1(h) * e_s - s_t / (2 * r1) * math.expm1(h) * (m.eps(u, s1) - e_s)
            else:
                r1, r2 = 1 / 3, 2 / 3
                s1, s2 = at(r1), at(r2)
                a1, sg1, _ = m.coeffs(s1)
                a2, sg2, _ = m.coeffs(s2)
                u1 = (a1 / a_s) * x - sg1 * math.expm1(r1 * h) * e_s
                D1 = m.eps(u1, s1) - e_s
                u2 = ((a2 / a_s) * x - sg2 * math.expm1(r2 * h) * e_s
                      - sg2 * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1) * D1)
                D2 = m.eps(u2, s2) - e_s
                x = (a_t / a_s) * x - s_t * math.expm1(h) * e_s - (s_t / r2) * (math.expm1(h) / h - 1) * D2
        else:
            x0_s = m.x0(x, s)
            if o == 1:
                x = (s_t / s_s) * x - a_t * math.expm1(-h) * x0_s
            else:
                r1 = 0.5
                s1 = at(r1)
                a1, sg1, _ = m.coeffs(s1)
                u = (sg1 / s_s) * x - a1 * math.expm1(-r1 * h) * x0_s
                x = ((s_t / s_s) * x - a_t * math.expm1(-h) * x0_s
                     - a_t / (2 * r1) * math.expm1(-h) * (m.x0(u, s1) - x0_s))
    return x


@pytest.mark.parametrize("nfe", [6, 7, 8, 9, 10, 11])
@pytest.mark.parametrize("preset,order,data", [("dpm-solver-2", 2, False), ("dpm-solver-3", 3, False),
                                               ("dpm-solver++-2s", 2, True)])
def test_singlestep_dpm_solver(preset, order, data, nfe):
    ns = noise_mod.VPLinear()
    x_T = x_T_for(ns)
    orders = fast_orders(nfe, order)
    assert sum(orders) == nfe
    outer = spacing.make(ns, len(orders), "logsnr").tolist()
    m = Exact(ns)
    ref = singlestep(m, ns, outer, orders, x_T, data)
    assert m.calls == nfe
    sched = presets.build(preset, nfe, ns)
    assert sched.nfe == nfe
    close(run(ns, sched, x_T), ref)


# ---------------------------------------------------------------- Heun (EDM / k-diffusion)


def karras_sigmas(n, sigma_min, sigma_max, rho=7.0):
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return torch.cat([(hi + ramp * (lo - hi)) ** rho, torch.zeros(1, dtype=torch.float64)])


def denoiser(x, sigma):
    s = float(sigma.reshape(-1)[0]) if torch.is_tensor(sigma) else float(sigma)
    return MU + VAR / (VAR + s * s) * (x - MU)


def heun_kdiffusion(x, sigmas, n_heun):
    """k-diffusion's sample_heun without churn; steps past n_heun are Euler (as for sigma_next = 0)."""
    calls = 0
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        d = (x - denoiser(x, s)) / s
        calls += 1
        dt = s_next - s
        if s_next == 0 or i >= n_heun:
            x = x + d * dt
        else:
            x2 = x + d * dt
            d2 = (x2 - denoiser(x2, s_next)) / s_next
            calls += 1
            x = x + (d + d2) / 2 * dt
    return x, calls


@pytest.mark.parametrize("nfe", [5, 9, 15, 35, 6, 10, 20])
def test_heun_equals_kdiffusion_loop(nfe):
    ns = noise_mod.EDM()
    model = Model(denoiser, ns, prediction="x0", time_input="sigma")
    sched = presets.heun(nfe, ns, final_zero=True)
    assert sched.nfe == nfe
    n_sigmas = (nfe + 1) // 2 if nfe % 2 else nfe // 2 + 1  # karras points before the appended 0
    n_heun = nfe - n_sigmas
    sigmas = karras_sigmas(n_sigmas, ns.t_min, ns.T)
    x_T = x_T_for(ns)
    ref, calls = heun_kdiffusion(x_T, sigmas, n_heun)
    assert calls == nfe
    assert torch.allclose(torch.tensor(sched.times), sigmas, rtol=1e-13, atol=0)
    x = sample(model, x_T, sched)
    assert model.calls == nfe
    close(x, ref)


# ---------------------------------------------------------------- DC compensation


def lagrange(ts, tau):
    return [math.prod((tau - tj) / (tk - tj) for j, tj in enumerate(ts) if j != k) for k, tk in enumerate(ts)]


def dc_by_hand(m, times, x, ratio):
    """Three steps, data prediction: DDIM, then two order-2 Taylor steps (finite difference in lambda);
    before the third step the newest x0 is replaced by the Lagrange interpolation in t through the three
    stored outputs, evaluated at tau = t_1 + ratio (t_2 - t_1)."""
    T, t1, t2, t3 = times
    x0_T = m.x0(x, T)

    def taylor2(x, s, t, x0_s, x0_prev, t_prev):
        _, s_s, l_s = m.coeffs(s)
        a_t, s_t, l_t = m.coeffs(t)
        h = l_t - l_s
        deriv = (x0_prev - x0_s) / (m.coeffs(t_prev)[2] - l_s)
        return (s_t / s_s) * x + a_t * (1 - math.exp(-h)) * x0_s + a_t * (math.exp(-h) - 1 + h) * deriv

    _, s_T, _ = m.coeffs(T)
    a1, s1, _ = m.coeffs(t1)
    x1 = (s1 / s_T) * x + a1 * (1 - math.exp(-(m.coeffs(t1)[2] - m.coeffs(T)[2]))) * x0_T
    x0_1 = m.x0(x1, t1)
    x2 = taylor2(x1, t1, t2, x0_1, x0_T, T)
    x0_2 = m.x0(x2, t2)
    if ratio != 1.0:
        w = lagrange([T, t1, t2], t1 + ratio * (t2 - t1))
        x0_2 = w[0] * x0_T + w[1] * x0_1 + w[2] * x0_2
    return taylor2(x2, t2, t3, x0_2, x0_1, t1)


def dc_schedule(ns, times, ratio):
    return schedule_of(ns, times, [Step(t=times[1]), Step(t=times[2], order=2),
                                   Step(t=times[3], order=2, dc_ratio=ratio)])


@pytest.mark.parametrize("ratio", [0.8, 0.95, 1.07, 1.3])
def test_dc_compensation_is_lagrange_retiming(ratio):
    ns = noise_mod.VPLinear()
    times = [1.0, 0.55, 0.2, 0.04]
    x_T = x_T_for(ns)
    ref = dc_by_hand(Exact(ns), times, x_T, ratio)
    x = run(ns, dc_schedule(ns, times, ratio), x_T)
    close(x, ref)
    # and it does change the result
    assert (x - dc_by_hand(Exact(ns), times, x_T, 1.0)).abs().max() > 1e-4


def test_dc_ratio_one_changes_nothing():
    ns = noise_mod.VPLinear()
    times = [1.0, 0.55, 0.2, 0.04]
    x_T = x_T_for(ns)
    plain = run(ns, schedule_of(ns, times, [Step(t=times[1]), Step(t=times[2], order=2),
                                            Step(t=times[3], order=2)]), x_T)
    close(plain, dc_by_hand(Exact(ns), times, x_T, 1.0))
    assert torch.equal(run(ns, dc_schedule(ns, times, 1.0), x_T), plain)
    # the compensation path itself reduces to the identity as the ratio tends to 1
    close(run(ns, dc_schedule(ns, times, 1.0 + 1e-9), x_T), plain, tol=1e-8)


# ---------------------------------------------------------------- analytical first step, model conventions


def test_afs_zero_is_ddim_from_x0_zero():
    ns = noise_mod.VPLinear()
    times = spacing.make(ns, 6, "logsnr").tolist()
    x_T = x_T_for(ns)
    sched = Schedule(t_start=times[0], steps=tuple(Step(t=t) for t in times[1:]), noise=ns.to_dict(), afs="zero")
    m = Exact(ns)
    a_T, s_T, _ = m.coeffs(times[0])
    x = ddim_step(m, x_T, times[0], times[1], torch.zeros_like(x_T), "data")  # x0_hat = 0, eps_hat = x_T / sigma_T
    for s, t in zip(times[1:-1], times[2:]):
        x = ddim_step(m, x, s, t, m.x0(x, s), "data")
    model = gaussian_model(ns, MU, VAR)
    close(sample(model, x_T, sched), x)
    assert model.calls == len(times) - 2 == sched.nfe


def _outputs(ns, x, t):
    a, s = float(ns.alpha(t)), float(ns.sigma(t))
    x0 = MU + a * VAR * (x - a * MU) / (a * a * VAR + s * s)
    eps = (x - a * x0) / s
    return a, s, eps, x0


def test_prediction_types_and_time_inputs_agree():
    """The same Gaussian model presented as eps / x0 / v prediction with continuous, scaled, sigma or
    discrete time input gives the same samples."""
    ns = noise_mod.VPLinear()
    sched = presets.build("unipc-bh2", 8, ns, order=3)
    x_T = x_T_for(ns)

    def t_from(kind, tv):
        v = float(tv.reshape(-1)[0])
        return {"continuous": v, "scaled": v / 1000.0, "sigma": float(ns.t_of_edm_sigma(torch.tensor(v)))}[kind]

    def make(pred, kind):
        def fn(x, tv):
            a, s, eps, x0 = _outputs(ns, x, t_from(kind, tv))
            return {"eps": eps, "x0": x0, "v": a * eps - s * x0}[pred]
        time_input = "continuous" if kind == "scaled" else kind
        return Model(fn, ns, prediction=pred, time_input=time_input, time_scale=1000.0 if kind == "scaled" else 1.0)

    ref = sample(make("eps", "continuous"), x_T, sched)
    for pred in ("eps", "x0", "v"):
        for kind in ("continuous", "scaled", "sigma"):
            close(sample(make(pred, kind), x_T, sched), ref, tol=1e-9)


def test_flow_prediction_on_rectified_flow():
    ns = noise_mod.RectifiedFlow()
    sched = presets.build("dpm-solver++-2m", 10, ns, t_start=0.98)  # alpha > 0, so an eps model is defined
    x_T = x_T_for(ns)

    def make(pred):
        def fn(x, tv):
            _, _, eps, x0 = _outputs(ns, x, float(tv.reshape(-1)[0]))
            return eps - x0 if pred == "flow" else eps
        return Model(fn, ns, prediction=pred)

    close(sample(make("flow"), x_T, sched), sample(make("eps"), x_T, sched), tol=1e-9)


def test_discrete_time_input_is_training_step():
    """A discrete-time model is called with N t - 1 (diffusers' training timestep)."""
    ns = noise_mod.VPDiscrete.named("ddpm-linear")
    seen = []

    def fn(x, k):
        seen.append(float(k[0]))
        t = (float(k[0]) + 1.0) / 1000.0
        return _outputs(ns, x, t)[2]

    sched = presets.build("dpm-solver++-2m", 5, ns, spacing="diffusers-leading")
    sample(Model(fn, ns, prediction="eps", time_input="discrete"), x_T_for(ns), sched)
    assert np.allclose(seen, spacing.diffusers_timesteps(5, "leading"), atol=1e-9, rtol=0)


def test_implicit_corrector_is_heun_in_sigma():
    """A step with an implicit 'heun' corrector is the trapezoidal rule in sigma/alpha on a VP schedule too."""
    ns = noise_mod.VPLinear()
    times = [1.0, 0.5, 0.2, 0.05]
    x_T = x_T_for(ns)
    steps = [Step(t=times[1], corrector=Corrector("implicit", order=2, relaxation="heun")),
             Step(t=times[2], corrector=Corrector("implicit", order=2, relaxation="heun")), Step(t=times[3])]
    sched = schedule_of(ns, times, steps)
    # k-diffusion's Heun on the scaled variable y = x / alpha with sigma_e = sigma / alpha (VP -> VE)
    m = Exact(ns)
    a0 = float(ns.alpha(times[0]))
    y = x_T / a0
    for i, (s, t) in enumerate(zip(times[:-1], times[1:])):
        a_s, a_t = float(ns.alpha(s)), float(ns.alpha(t))
        se_s, se_t = float(ns.edm_sigma(s)), float(ns.edm_sigma(t))
        d = (y - m.x0(y * a_s, s)) / se_s
        y2 = y + d * (se_t - se_s)
        if i < 2:
            d2 = (y2 - m.x0(y2 * a_t, t)) / se_t
            y = y + (d + d2) / 2 * (se_t - se_s)
        else:
            y = y2
    close(run(ns, sched, x_T), y * float(ns.alpha(times[-1])))


@pytest.mark.parametrize("preset", ["dpm-solver++-2m", "dpm-solver++-3m", "unipc-bh2"])
def test_flow_from_pure_noise(preset):
    """Rectified flow from t = T = 1 (alpha = 0, lambda = -inf), as flow models are sampled, with a flow
    model (defined there): the run must be finite, or the schedule refused by validation before anything runs."""
    ns = noise_mod.RectifiedFlow()
    assert float(ns.alpha(ns.T)) == 0.0

    def fn(x, tv):
        _, _, eps, x0 = _outputs(ns, x, float(tv.reshape(-1)[0]))
        return eps - x0

    x_T = x_T_for(ns)
    model = Model(fn, ns, prediction="flow")
    try:
        x = sample(model, x_T, presets.build(preset, 10, ns, spacing="time-uniform"))
    except ScheduleError:
        assert model.calls == 0
        return
    except NonFiniteError as e:
        pytest.fail(f"{preset} from alpha = 0 produced NaN/inf ({e}): a finite difference or corrector in lambda "
                    "uses the lambda = -inf start point; validation should refuse it or the step should not use it")
    assert torch.isfinite(x).all()
