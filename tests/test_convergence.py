"""Every preset converges to the exact probability-flow ODE solution at its theoretical order.

Gaussian data N(mu, diag(var)) has a closed-form PF-ODE solution (tests/gaussian.py). The
measured order is the least-squares slope of log(error) against log(NFE), with logSNR-uniform
steps, NFE from 64 to 512.

How the problem is set up so that the slope is the nominal order and nothing else:

* The error is measured per coordinate in units of that coordinate's data standard deviation and
  maximised over coordinates and samples.
* Variances go down to 1e-4. Along the exact path x0_hat(lambda) - mu is a sigmoid in
  u = lambda + log(var)/2. The leading global error of an exponential-integrator multistep method of
  order 3 is proportional to the integral of s(u) s'''(u) over the path, which integrates by parts
  to boundary terms only ([s s'' - s'^2 / 2] at the ends). With every coordinate's transition far
  before lambda_end (var >> exp(-2 lambda_end) ~ 1e-4 for t_end = 1e-3) that constant is
  exponentially small and third-order methods look fourth order over any practical NFE range; tiny
  variances put a transition near lambda_end and make the constant O(1). (For orders 1, 2 and 4 the
  integrals of s s', s s'' and s s'''' do not vanish: s^2/2 at the end, -int s'^2 and +int s''^2.)
* Presets that lower the order of their final steps get ``lower_order_final=False``: a single
  first-order last step has local error O(h^2) and caps the global order at 2 (tested separately).
* The multistep warm-up (first step order 1, second order 2) sits at lambda_T, where the model's
  derivatives are O(exp(2 lambda_T)) ~ 1e-4 (VP-linear), so it stays below the nominal-order error
  over this NFE range; on EDM (lambda_T = -log 80) the warm-up of the noise-prediction third-order
  DEIS shows up at high NFE, so EDM runs only the orders it does not affect.
* The smallest errors are ~1e-8, far above float64 round-off.
* Singlestep presets get NFEs that avoid lower-order final steps: DPM-Solver-2 / ++(2S) even NFE,
  DPM-Solver-3 NFE = 2 mod 3 (orders [3, ..., 3, 2]); Heun odd NFE (one Euler step at the end,
  local error O(h^2), consistent with order 2).

Nominal orders: DDIM / Euler / DEIS-1: 1; DPM-Solver++(2M), (2S), DPM-Solver-2, Heun, DEIS-2: 2;
DEIS-3 (lambda or t basis), DPM-Solver-3, DPM-Solver++(3M) with the full second derivative: 3; UniPC with order-p
predictor and UniC corrector: p + 1.

DPM-Solver++(3M) as DPM-Solver and diffusers implement it (second_scale = 1/2): its first-derivative
estimate is second-order accurate, but only half the h^3 phi_3 x0'' term is taken, so the local error
is (1/2) h^3 phi_3(-h) x0'' ~ h^3 x0'' / 12 = O(h^3) and the method is globally second order. Measured:
slope 2.0 (the half-weight step is more accurate than 2M by a constant factor, not in order).
"""

import math

import numpy as np
import pytest
import torch
from gaussian import exact_solution, gaussian_model

from steptune.space import noise as noise_mod
from steptune.space import presets, sample

MU = torch.tensor([0.8, -0.5, 0.3, 1.2, -1.0], dtype=torch.float64)
VAR = torch.tensor([1e-4, 1e-3, 0.05, 0.3, 1.5], dtype=torch.float64)
NFES = sorted({int(round(x)) for x in np.geomspace(64, 512, 7)})
TOL = 0.3

NO_LOF = {"lower_order_final": False}

# (id, preset, options, nominal order)
VP_CASES = [
    ("ddim", "ddim", {}, 1),
    ("euler", "euler", {"spacing": "logsnr"}, 1),
    ("heun", "heun", {"spacing": "logsnr"}, 2),
    ("dpm-solver++-2m", "dpm-solver++-2m", NO_LOF, 2),
    ("dpm-solver++-3m", "dpm-solver++-3m", NO_LOF, 2),  # half second-derivative weight: order 2
    ("dpm-solver++-3m-full", "dpm-solver++-3m", {**NO_LOF, "second_scale": 1.0}, 3),
    ("unipc-bh1-1", "unipc-bh1", {**NO_LOF, "order": 1}, 2),
    ("unipc-bh1-2", "unipc-bh1", {**NO_LOF, "order": 2}, 3),
    ("unipc-bh1-3", "unipc-bh1", {**NO_LOF, "order": 3}, 4),
    ("unipc-bh2-1", "unipc-bh2", {**NO_LOF, "order": 1}, 2),
    ("unipc-bh2-2", "unipc-bh2", {**NO_LOF, "order": 2}, 3),
    ("unipc-bh2-3", "unipc-bh2", {**NO_LOF, "order": 3}, 4),
    ("deis-1", "deis", {**NO_LOF, "order": 1}, 1),
    ("deis-2", "deis", {**NO_LOF, "order": 2}, 2),
    ("deis-3", "deis", {**NO_LOF, "order": 3}, 3),
    ("deis-tab-1", "deis-tab", {**NO_LOF, "order": 1}, 1),
    ("deis-tab-2", "deis-tab", {**NO_LOF, "order": 2}, 2),
    ("deis-tab-3", "deis-tab", {**NO_LOF, "order": 3}, 3),
    ("dpm-solver-2", "dpm-solver-2", {}, 2),
    ("dpm-solver-3", "dpm-solver-3", {}, 3),
    ("dpm-solver++-2s", "dpm-solver++-2s", {}, 2),
]

EDM_CASES = [c for c in VP_CASES if c[0] in (
    "ddim", "heun", "dpm-solver++-2m", "dpm-solver++-3m", "unipc-bh1-2", "unipc-bh2-2", "deis-2", "deis-tab-2",
    "dpm-solver-2", "dpm-solver++-2s")]

# (deis-tab is left out on the discrete schedule: log alpha is piecewise linear in t there, so eps along the
# path has a kink at every training step in t, and Lagrange interpolation in t loses its nominal order.)

DDPM_CASES = [c for c in VP_CASES if c[0] in ("dpm-solver++-2m", "unipc-bh2-3", "deis-3", "dpm-solver-3")]


def adjust_nfe(preset: str, nfe: int) -> int:
    if preset in ("dpm-solver-2", "dpm-solver++-2s"):
        return 2 * (nfe // 2)
    if preset == "dpm-solver-3":
        return 3 * (nfe // 3) + 2
    if preset == "heun":
        return 2 * (nfe // 2) + 1
    return nfe


def errors(ns, preset, opts, nfes=NFES):
    g = torch.Generator().manual_seed(7)
    x_T = float(ns.sigma(ns.T)) * torch.randn(4, len(MU), generator=g, dtype=torch.float64)
    t_end = ns.t_min
    exact = exact_solution(ns, MU, VAR, x_T, ns.T, t_end)
    used, errs = [], []
    for nfe in nfes:
        nfe = adjust_nfe(preset, nfe)
        schedule = presets.build(preset, nfe, ns, **opts)
        assert schedule.times[0] == pytest.approx(ns.T) and schedule.times[-1] == pytest.approx(t_end)
        model = gaussian_model(ns, MU, VAR)
        x = sample(model, x_T, schedule)
        assert model.calls == nfe == schedule.nfe
        used.append(nfe)
        errs.append(((x - exact) / VAR.sqrt()).abs().max().item())
    return used, errs


def measured_order(nfes, errs) -> float:
    return -float(np.polyfit(np.log(nfes), np.log(errs), 1)[0])


def check(ns, case):
    name, preset, opts, nominal = case
    nfes, errs = errors(ns, preset, opts)
    order = measured_order(nfes, errs)
    msg = f"{name} on {ns!r}: errors {[f'{e:.2e}' for e in errs]} at NFE {nfes}, measured order {order:.2f}"
    assert all(math.isfinite(e) for e in errs), msg
    assert all(b < a for a, b in zip(errs, errs[1:])), "error does not decrease: " + msg
    assert abs(order - nominal) < TOL, f"nominal order {nominal}: " + msg
    return order


@pytest.mark.parametrize("case", VP_CASES, ids=[c[0] for c in VP_CASES])
def test_order_vp_linear(case):
    check(noise_mod.VPLinear(), case)


@pytest.mark.parametrize("case", EDM_CASES, ids=[c[0] for c in EDM_CASES])
def test_order_edm(case):
    check(noise_mod.EDM(), case)


@pytest.mark.parametrize("case", DDPM_CASES, ids=[c[0] for c in DDPM_CASES])
def test_order_discrete_ddpm(case):
    check(noise_mod.VPDiscrete.named("ddpm-linear"), case)


def test_every_preset_is_covered():
    assert set(presets.names()) <= {c[1] for c in VP_CASES}


def test_dpmpp_3m_half_weight_is_second_order_and_full_is_third():
    ns = noise_mod.VPLinear()
    nfes, half = errors(ns, "dpm-solver++-3m", NO_LOF)
    _, full = errors(ns, "dpm-solver++-3m", {**NO_LOF, "second_scale": 1.0})
    assert abs(measured_order(nfes, half) - 2) < TOL
    assert abs(measured_order(nfes, full) - 3) < TOL
    assert full[-1] < 0.1 * half[-1]


@pytest.mark.parametrize("preset,opts", [("unipc-bh2", {"order": 2}), ("unipc-bh1", {"order": 3}),
                                         ("dpm-solver++-3m", {"second_scale": 1.0, "lower_order_final_below": None})])
def test_first_order_final_step_caps_order_at_two(preset, opts):
    """With lower-order final steps (UniPC always, DPM-Solver++ below the threshold) the last step is order 1;
    its O(h^2) local error makes the whole run second order."""
    ns = noise_mod.VPLinear()
    nfes, errs = errors(ns, preset, opts)
    assert presets.build(preset, nfes[0], ns, **opts).steps[-1].order == 1
    assert abs(measured_order(nfes, errs) - 2) < TOL
