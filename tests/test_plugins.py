"""Model plug-ins: module:factory through eval and search, diffusers UNet wrappers, converged references,
bad factories."""

import json
import math

import pytest
import torch
from gaussian import eps_fn, exact_solution
from steptune.evaluators import Evaluator
from steptune.evaluators.neural_reference import ReferenceSettings, converged_states
from steptune.evaluators.plugins import Plug, PluginError, load_problem
from steptune.space import Model, presets, sample
from steptune.space import noise as noise_mod

from steptune.cli import main

NS = noise_mod.VPLinear()
MU = torch.tensor([0.5, -1.0, 0.25, 1.5])
VAR = torch.tensor([0.04, 0.25, 1.0, 0.09])


def gaussian_factory():
    """A network plug-in: the exact noise predictor of N(MU, diag(VAR)), taking continuous t."""
    return Plug(network=eps_fn(NS, MU, VAR), shape=(4,), noise="vp-linear", prediction="eps",
                time_input="continuous")


def bare_network_factory():
    """No conventions at all: they come from the command line."""
    return eps_fn(NS, MU, VAR)


def wrong_shape_factory():
    return Plug(network=lambda x, t: x[:, :2], shape=(4,), noise="vp-linear")


def nan_factory():
    return Plug(network=lambda x, t: torch.full_like(x, math.nan), shape=(4,), noise="vp-linear")


def raising_factory():
    raise RuntimeError("checkpoint missing")


SPEC = "test_plugins:gaussian_factory"


def test_converged_reference_matches_the_closed_form():
    model = Model(eps_fn(NS, MU, VAR), NS, prediction="eps", time_input="continuous")
    x_T = torch.randn(32, 4, generator=torch.Generator().manual_seed(1))
    times = [1.0, 0.5, 1e-3]
    states, report = converged_states(model, x_T, times, ReferenceSettings(tol=1e-6, steps=24))
    assert report["change"] < 1e-6
    for t, x in zip(times[1:], states):
        exact = exact_solution(NS, MU, VAR, x_T, 1.0, t)
        assert float((x - exact).pow(2).mean().sqrt() / exact.pow(2).mean().sqrt()) < 1e-6


def test_eval_runs_a_plugged_model_and_its_reference_is_right(tmp_path, capsys):
    rc = main(["eval", "--model", SPEC, "--schedule", "preset:unipc-bh2", "--nfe", "5", "--json",
               "--cache", str(tmp_path)])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)["results"][0]
    assert res["status"] == "complete" and res["nfe"] == 5
    # the same run measured against the closed-form ODE solution
    prob = load_problem(SPEC)
    ev = Evaluator(prob, cache_dir=None, n_train=64, n_heldout=256)
    x_T = ev.x_T("heldout")
    sched = presets.build("unipc-bh2", 5, NS, t_start=prob.t_start, t_end=prob.t_end)
    x = sample(prob.model, x_T, sched)
    exact = exact_solution(NS, MU, VAR, x_T, prob.t_start, prob.t_end)
    assert res["rmse"] == pytest.approx(float((x - exact).pow(2).mean().sqrt()), rel=1e-3)


def test_eval_takes_conventions_from_the_command_line(tmp_path, capsys):
    rc = main(["eval", "--model", "test_plugins:bare_network_factory", "--noise", "vp-linear", "--prediction", "eps",
               "--time-input", "continuous", "--shape", "4", "--schedule", "preset:ddim", "--nfe", "4", "--json",
               "--cache", str(tmp_path)])
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["status"] == "complete"


def test_search_runs_a_plugged_model(tmp_path, capsys):
    rc = main(["search", "--model", SPEC, "--nfe", "4", "--method", "random", "--budget", "4", "--cheap-samples",
               "16", "--heldout-samples", "32", "--confirm", "1", "--out", str(tmp_path), "--cache", str(tmp_path),
               "--json"])
    assert rc == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["n_evals"] >= 4
    assert payload["results"][0]["nfe"] == 4 and math.isfinite(payload["results"][0]["searched_rmse"])


@pytest.mark.parametrize("spec, words", [
    ("no_such_module_xyz:factory", ["no_such_module_xyz:factory", "cannot import"]),
    ("test_plugins:missing", ["test_plugins:missing", "no attribute"]),
    ("test_plugins:wrong_shape_factory", ["test_plugins:wrong_shape_factory", "shape"]),
    ("test_plugins:nan_factory", ["test_plugins:nan_factory", "NaN"]),
    ("test_plugins:raising_factory", ["test_plugins:raising_factory", "checkpoint missing"]),
    ("test_plugins", ["module:factory"]),
])
def test_bad_factories_give_one_line_naming_them(spec, words, tmp_path, capsys):
    for cmd in (["eval", "--schedule", "preset:ddim", "--nfe", "4"], ["search", "--nfe", "4", "--budget", "1"]):
        rc = main([*cmd, "--model", spec, "--cache", str(tmp_path)])
        assert rc == 2
        msg = capsys.readouterr().err.strip()
        assert len(msg.splitlines()) == 1 and msg.startswith("error:")
        for w in words:
            assert w in msg


def test_bad_factory_error_type():
    with pytest.raises(PluginError, match="wrong_shape_factory"):
        load_problem("test_plugins:wrong_shape_factory")


# ---- diffusers UNet wrappers ----------------------------------------------------------------------

diffusers = pytest.importorskip("diffusers")


def tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=2, out_channels=2, layers_per_block=1,
                                 block_out_channels=(8, 16), norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D")).float().eval()


def tiny_cond_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(sample_size=8, in_channels=2, out_channels=2, layers_per_block=1,
                                          block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=8,
                                          attention_head_dim=2,
                                          down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).float().eval()


def unet_factory():
    return tiny_unet()


def _diffusers_time(convention: str, k: int) -> float:
    """The time value diffusers-side code would give the UNet at training timestep k."""
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    ac = float(sched.alphas_cumprod[k])
    return {"discrete": float(k), "sigma": math.sqrt((1 - ac) / ac), "continuous": 1000.0 * (k + 1) / 1000}[convention]


@pytest.mark.parametrize("convention", ["discrete", "continuous", "sigma"])
@pytest.mark.parametrize("conditional", [False, True])
def test_unet_wrapper_equals_calling_the_unet(convention, conditional):
    from steptune.evaluators.plugins import DiffusersUNet

    ns = noise_mod.VPDiscrete.named("ddpm-linear")
    unet = tiny_cond_unet() if conditional else tiny_unet()
    extra = {"encoder_hidden_states": torch.randn(1, 3, 8, dtype=torch.float32)} if conditional else {}
    model = Model(DiffusersUNet(unet, **extra), ns, prediction="eps", time_input=convention,
                  time_scale=1000.0 if convention == "continuous" else 1.0)
    x = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    for k in (0, 499, 999):
        t = (k + 1) / 1000
        got = model.raw(x, t)
        tv = torch.full((3,), _diffusers_time(convention, k), dtype=torch.float32)
        kw = {"encoder_hidden_states": extra["encoder_hidden_states"].expand(3, 3, 8)} if conditional else {}
        with torch.no_grad():
            want = unet(x.float(), tv, **kw).sample
        assert got.dtype == x.dtype
        torch.testing.assert_close(got.float(), want, rtol=1e-5, atol=1e-5)


def test_a_diffusers_unet_factory_gets_its_shape_from_the_config():
    prob = load_problem("test_plugins:unet_factory", time_input="discrete")
    assert prob.shape == (2, 8, 8) and prob.noise.to_dict()["name"] == "ddpm-linear"
    assert prob.identity()["data"]["network_sha256"] == load_problem("test_plugins:unet_factory").identity()[
        "data"]["network_sha256"]


def test_a_network_with_a_scalar_parameter_is_fingerprinted_by_its_value():
    from steptune.evaluators.plugins import network_fingerprint

    class Temperature(torch.nn.Module):
        def __init__(self, value):
            super().__init__()
            self.tau = torch.nn.Parameter(torch.tensor(value))

        def forward(self, x, t):
            return self.tau * x

    a, b = network_fingerprint(Temperature(0.5)), network_fingerprint(Temperature(0.25))
    assert a == network_fingerprint(Temperature(0.5)) and a != b
