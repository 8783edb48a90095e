"""Networks on a CUDA device: an Evaluator on the GPU places the network and the quality scorer there, and
its figures (evaluations, DC fits) equal the CPU's. Skipped where torch sees no CUDA device; the GPU
benchmark script runs them."""

import pytest
import torch

from steptune.evaluators import Evaluator, Plug, load_problem
from steptune.evaluators.digits_cond import digits_problem
from steptune.evaluators.plugins import TorchNetwork
from steptune.search import dc
from steptune.space import presets

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.usefixtures("no_tf32")]


def _pair(tmp_path, **opts):
    return [Evaluator(digits_problem(models_dir=None, **opts), cache_dir=tmp_path / d, device=d, n_train=10,
                      n_heldout=64) for d in ("cpu", "cuda")]


def test_an_evaluator_on_the_gpu_places_the_network_and_matches_the_cpu(tmp_path):
    cpu, gpu = _pair(tmp_path, guidance_scale=3.0)
    assert next(gpu.problem.model.fn.unet.parameters()).is_cuda
    assert next(gpu.problem.quality.classifier.parameters()).is_cuda
    assert gpu.x_T("heldout").is_cuda
    s = presets.build("unipc-bh2", 8, cpu.problem.noise, t_start=cpu.problem.t_start, t_end=cpu.problem.t_end)
    a, b = cpu.evaluate(s, "heldout"), gpu.evaluate(s, "heldout")
    assert a.ok and b.ok
    for key in ("rmse", "fd_digits", "fd_reference"):
        assert b.metrics[key] == pytest.approx(a.metrics[key], rel=1e-3), key
    assert b.metrics["accuracy"] == pytest.approx(a.metrics["accuracy"], abs=2 / 64)


def test_a_dc_fit_on_the_gpu_matches_the_cpu(tmp_path):
    cpu, gpu = _pair(tmp_path, guidance_scale=3.0)
    s = presets.build("unipc-bh2", 6, cpu.problem.noise, t_start=cpu.problem.t_start, t_end=cpu.problem.t_end)
    fits = [dc.fit_config(ev, s, fit_samples=10, greedy_iters=5, joint_iters=5) for ev in (cpu, gpu)]
    cf = fits[0]
    for m in ("greedy", "joint"):
        a, b = cf.fits[m], fits[1].fits[m]
        assert b.loss == pytest.approx(a.loss, rel=1e-3), m
        assert b.loss < b.loss_start
        # the GPU's ratios, scored on the CPU, do what the CPU's do (iterates that tie may differ)
        on_cpu = dc.run(cf.model, s, cf.x_T, b.ratios)[0]
        assert float((on_cpu - cf.target).pow(2).mean()) == pytest.approx(
            float((dc.run(cf.model, s, cf.x_T, a.ratios)[0] - cf.target).pow(2).mean()), rel=1e-3), m
    cpr = dc.CPR.fit([(6, 3.0, fits[0].fits["joint"].ratios), (6, 5.0, fits[0].fits["greedy"].ratios)])
    histories = [dc.refine_cpr(cpr, [dc.CPRCase(f.model, f.schedule, f.x_T, f.target, 6, 3.0)], iters=3)[1]
                 for f in fits]
    assert histories[1] == pytest.approx(histories[0], rel=1e-3)


class Scale(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.5, dtype=torch.float32))

    def forward(self, x, t, shift=None):
        out = self.w * x + t[:, None, None, None]
        return out if shift is None else out + shift


def conditioned_factory():
    return Plug(network=Scale(), shape=(1, 8, 8), noise="vp-linear", guidance_scale=2.0,
                cond_kwargs={"shift": torch.ones(1, 1, 8, 8)}, uncond_kwargs={"shift": torch.zeros(1, 1, 8, 8)})


def test_a_plugged_module_follows_the_evaluator_to_the_gpu():
    net = TorchNetwork(Scale())
    assert net.to("cuda") is net and next(net.network.parameters()).is_cuda
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    t = torch.arange(3, dtype=torch.float64)
    assert torch.equal(net(x, t), (0.5 * x.float() + t.float()[:, None, None, None]).double())
    prob = load_problem("digits-cond", guidance_scale=1.5)
    Evaluator(prob, cache_dir=None, device="cuda:0")
    assert next(prob.model.fn.unet.parameters()).device == torch.device("cuda:0")
    plugged = load_problem("test_gpu:conditioned_factory")
    on_cpu = plugged.model.raw(torch.ones(2, 1, 8, 8, dtype=torch.float64), 0.5)
    ev = Evaluator(plugged, cache_dir=None, device="cuda")
    assert plugged.model.cond_kwargs["shift"].is_cuda and plugged.model.uncond_kwargs["shift"].is_cuda
    x = torch.ones(2, 1, 8, 8, dtype=torch.float64, device="cuda")
    assert torch.equal(plugged.model.raw(x, 0.5).cpu(), on_cpu) and ev.x_T("train").is_cuda


def test_a_diverging_run_on_the_gpu_fails_at_the_step_the_cpu_names():
    from steptune.space import Model, NonFiniteError, sample
    from steptune.space import noise as noise_mod

    ns = noise_mod.VPLinear()
    bad = presets.build("ddim", 6, ns)
    poison = bad.steps[2].t

    def eps(x, t):
        out = 0.1 * x
        out[(t - poison).abs() < 1e-12] = float("nan")
        return out

    steps = []
    for device in ("cpu", "cuda"):
        x_T = torch.randn(8, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(device)
        with pytest.raises(NonFiniteError) as err:
            sample(Model(eps, ns), x_T, bad)
        steps.append(err.value.step)
    assert steps[0] == steps[1]
