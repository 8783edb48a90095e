"""The noise schedules' numpy conversions (what the decision space converts times with) are the torch functions to
round-off, element by element, on every named schedule and a custom discrete table."""

import numpy as np
import pytest
import torch

from steptune.space import noise


def schedules():
    out = {name: noise.get(name) for name in noise.NAMED}
    ac = np.cumprod(1 - np.linspace(2e-4, 0.03, 50))
    out["custom-discrete"] = noise.VPDiscrete(tuple(ac.tolist()))
    return out


@pytest.mark.parametrize("name", list(schedules()))
def test_lambda_and_its_inverse_on_arrays_equal_the_torch_functions(name):
    ns = schedules()[name]
    t = np.concatenate([np.linspace(ns.t_min, ns.T, 997), np.geomspace(ns.t_min, ns.T, 101)])
    if isinstance(ns, noise.VPDiscrete):
        t = np.concatenate([t, [0.0]])  # sigma = 0 there: lambda = +inf
    ref = ns.lam(torch.from_numpy(t)).numpy()
    got = ns.lam_array(t)
    finite = np.isfinite(ref)
    np.testing.assert_allclose(got[finite], ref[finite], rtol=1e-14, atol=1e-14)
    assert np.array_equal(got[~finite], ref[~finite])
    lam = ref[finite]
    np.testing.assert_allclose(ns.t_of_lambda_array(lam), ns.t_of_lambda(torch.from_numpy(lam)).numpy(),
                               rtol=1e-13, atol=1e-15)
    # an array gives what its values give one at a time
    assert np.array_equal(got, np.array([ns.lam_array(np.array([x]))[0] for x in t]))
    back = ns.t_of_lambda_array(lam)
    assert np.array_equal(back, np.array([ns.t_of_lambda_array(np.array([x]))[0] for x in lam]))


def test_a_plugged_schedule_without_array_methods_converts_through_its_torch_functions():
    class Halved(noise.NoiseSchedule):  # a VP schedule a user defines with log_alpha and t_of_lambda only
        def log_alpha(self, t):
            return -0.5 * torch.as_tensor(t, dtype=torch.float64)

        def t_of_lambda(self, lam):
            la = noise.log_alpha_from_lambda(torch.as_tensor(lam, dtype=torch.float64))
            return -2.0 * la

    ns = Halved()
    t = np.linspace(0.01, 5.0, 50)
    np.testing.assert_allclose(ns.t_of_lambda_array(ns.lam_array(t)), t, rtol=1e-12)
