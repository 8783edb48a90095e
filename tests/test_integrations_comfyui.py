"""The ComfyUI node pack (comfyui/steptune_nodes): its SAMPLER run the way ComfyUI runs a custom sampler.

ComfyUI cannot be installed here, so ``KSAMPLER`` and the model's ``model_sampling`` below restate, line for line in
behaviour, ComfyUI's source (comfyanonymous/ComfyUI): ``comfy/samplers.py`` ``KSAMPLER.sample`` (``max_denoise``:
sigmas[0] within 1e-5 of ``model_sampling.sigma_max`` or above; ``noise_scaling(sigmas[0], noise, latent_image,
max_denoise)``; ``k_callback = lambda x: callback(x["i"], x["denoised"], x["x"], total_steps)``;
``sampler_function(model_k, noise, sigmas, extra_args=extra_args, callback=k_callback, disable=disable_pbar,
**extra_options)``; ``inverse_noise_scaling(sigmas[-1], samples)``) and ``comfy/model_sampling.py`` (``EPS``:
noise * sqrt(1 + sigma^2) at max denoise, else noise * sigma, plus the latent, no inverse scaling; ``CONST``:
sigma * noise + (1 - sigma) * latent, inverse latent / (1 - sigma); ``ModelSamplingDiscrete.sigma_max`` the table's
largest sigma, ``ModelSamplingDiscreteFlow`` 1 at shift 1). The model that KSAMPLER wraps returns x0-hat, as
``KSamplerX0Inpaint`` around ComfyUI's CFG guider does; here it is a steptune model's exact denoiser."""

import importlib
import math
import sys
import types

import pytest
import torch

from steptune.evaluators.problems import get_problem
from steptune.integrations.kdiffusion import denoiser
from steptune.space import presets, sample

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


class EPS:
    def __init__(self, sigma_max):
        self.sigma_max = torch.tensor(sigma_max, dtype=torch.float64)

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        noise = noise * torch.sqrt(1.0 + sigma**2.0) if max_denoise else noise * sigma
        return noise + latent_image

    def inverse_noise_scaling(self, sigma, latent):
        return latent


class CONST:
    sigma_max = torch.tensor(1.0, dtype=torch.float64)

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        return sigma * noise + (1.0 - sigma) * latent_image

    def inverse_noise_scaling(self, sigma, latent):
        return latent / (1.0 - sigma)


class KSAMPLER:
    def __init__(self, sampler_function, extra_options={}, inpaint_options={}):  # noqa: B006 (ComfyUI's signature)
        self.sampler_function = sampler_function
        self.extra_options, self.inpaint_options = extra_options, inpaint_options

    def max_denoise(self, model_wrap, sigmas):
        max_sigma = float(model_wrap.inner_model.model_sampling.sigma_max)
        sigma = float(sigmas[0])
        return math.isclose(max_sigma, sigma, rel_tol=1e-05) or sigma > max_sigma

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        extra_args["denoise_mask"] = denoise_mask
        model_k = model_wrap  # KSamplerX0Inpaint: without a mask it passes x, sigma and extra_args through
        ms = model_wrap.inner_model.model_sampling
        noise = ms.noise_scaling(sigmas[0], noise, latent_image, self.max_denoise(model_wrap, sigmas))
        total_steps = len(sigmas) - 1
        k_callback = None if callback is None else (lambda x: callback(x["i"], x["denoised"], x["x"], total_steps))
        samples = self.sampler_function(model_k, noise, sigmas, extra_args=extra_args, callback=k_callback,
                                        disable=disable_pbar, **self.extra_options)
        return ms.inverse_noise_scaling(sigmas[-1], samples)


class ModelWrap:
    """x0-hat of a steptune model at (x, sigma) in the model's convention; ComfyUI's extra_args arrive as keywords."""

    def __init__(self, model, model_sampling):
        self.inner_model = types.SimpleNamespace(model_sampling=model_sampling)
        self.fn = denoiser(model)
        self.calls = 0

    def __call__(self, x, sigma, denoise_mask=None, model_options=None, seed=None):
        self.calls += 1
        return self.fn(x, sigma)


@pytest.fixture
def nodes(monkeypatch):
    """The node pack imported as ComfyUI imports a custom node folder, with ``comfy.samplers.KSAMPLER`` above."""
    comfy = types.ModuleType("comfy")
    comfy.samplers = types.SimpleNamespace(KSAMPLER=KSAMPLER)
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.samplers", comfy.samplers)
    monkeypatch.syspath_prepend(str(ROOT / "comfyui"))
    for name in ("steptune_nodes", "steptune_nodes.nodes"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return importlib.import_module("steptune_nodes")


def run_node(nodes, path, model, ms, noise, latent, denoise=1.0):
    node = nodes.NODE_CLASS_MAPPINGS["SteptuneSchedule"]()
    ksampler, sigmas = node.load(str(path), "", "", 0, 0, "auto", denoise)
    wrap = ModelWrap(model, ms)
    steps = []
    out = ksampler.sample(wrap, sigmas.double(), {"model_options": {}, "seed": 0}, lambda i, d, x, n: steps.append(i),
                          noise, latent)
    return out, wrap.calls, steps, ksampler.sampler_function, sigmas


@pytest.mark.usefixtures("float64")
def test_an_eps_model_runs_the_tuned_schedule_as_steptune_sample(nodes, tmp_path):
    problem = get_problem("gmm-digits", noise="ddpm-linear")
    ns = problem.noise
    s = presets.build("unipc-bh2", 6, ns, t_start=problem.t_start, t_end=problem.t_end)
    path = s.save(tmp_path / "s.json")
    noise = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    sigma_max = float(ns.edm_sigma(1.0))
    out, calls, steps, tuned, _ = run_node(nodes, path, problem.model, EPS(sigma_max), noise, torch.zeros_like(noise))
    ref = sample(problem.model, noise, s)  # alpha(t_start) sqrt(1 + sigma^2) = 1: ComfyUI's start is the VP noise
    assert float((out * float(ns.alpha(s.times[-1])) - ref).norm() / ref.norm()) < 1e-6
    assert calls == 6 and steps == list(range(len(s.steps)))


@pytest.mark.usefixtures("float64")
def test_a_flow_model_in_the_const_convention_runs_the_tuned_schedule_as_steptune_sample(nodes, tmp_path):
    problem = get_problem("gmm-digits", noise="flow")
    s = presets.build("dpm-solver++-3m", 7, problem.noise, t_start=problem.t_start, t_end=problem.t_end)
    path = s.save(tmp_path / "s.json")
    noise = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    latent = torch.zeros_like(noise)
    out, calls, _, tuned, sigmas = run_node(nodes, path, problem.model, CONST(), noise, latent)
    assert tuned.convention == "const" and float(sigmas[-1]) == 0.0
    ref = sample(problem.model, s.t_start * noise, s)
    assert float((out - ref).norm() / ref.norm()) < 1e-6 and calls == 7


@pytest.mark.usefixtures("float64")
def test_denoise_below_one_runs_the_retimed_schedule_from_the_noised_latent(nodes, tmp_path):
    problem = get_problem("gmm-digits", noise="ddpm-linear")
    ns = problem.noise
    s = presets.build("dpm-solver++-2m", 6, ns, t_start=problem.t_start, t_end=problem.t_end)
    path = s.save(tmp_path / "s.json")
    latent = problem.data_samples(5, torch.Generator().manual_seed(2))
    noise = torch.randn(5, 64, generator=torch.Generator().manual_seed(3))
    for denoise in (0.75, 0.5):
        out, calls, steps, tuned, sigmas = run_node(nodes, path, problem.model, EPS(float(ns.edm_sigma(1.0))), noise,
                                                    latent, denoise)
        assert float(sigmas[0]) < tuned.own_sigmas()[0] and torch.isfinite(out).all()
        assert calls == tuned.calls(sigmas.double()) == 6 and len(steps) == 6


def test_the_node_refuses_missing_input_in_one_sentence(nodes):
    with pytest.raises(ValueError, match="give a schedule JSON path, or a study"):
        nodes.nodes.load_sampler()
