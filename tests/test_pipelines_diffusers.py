"""SteptuneScheduler inside real diffusers pipelines, end to end.

Every pipeline is built from small randomly initialised components (nothing is downloaded; the CLIP
tokenizer is made here from a tiny vocabulary): DDIMPipeline with a UNet2DModel, StableDiffusionPipeline
with UNet2DConditionModel / AutoencoderKL / CLIPTextModel and classifier-free guidance, and
StableDiffusion3Pipeline (rectified flow) with SD3Transformer2DModel and two CLIP text encoders. Each runs a
searched-style schedule (mixed orders, noise and data prediction, a UniC and an implicit corrector, a DC
ratio) and must give the latents steptune's own sampler gives with the same network and noise, where the
network is wrapped as a steptune ``Model`` that applies guidance itself (uncond and cond in two calls, not
the pipeline's batch of two). Also here: another ``num_inference_steps`` (re-timed, or refused), the
FlowMatch shift trap, the stock FlowMatch export, and steptune's gmm problems under flow noise through the
diffusers loop.

Tolerances: in float64, pipeline and reference agree to 1e-10 relative to the latents' size (measured
1e-15: float64 round-off, the batch of two included). In float32, as pipelines run, the same computation
differs by float32 round-off, which the float64 runs show is all there is: measured 5-7e-7 (about five
float32 eps, 1.2e-7); the bound 1e-5 leaves room for other CPUs' summation orders.
"""

import copy
import dataclasses
import json
import warnings

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMPipeline,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from steptune.evaluators.load import load_problem
from steptune.exports import SteptuneScheduler, scheduler_for, stock_diffusers_export
from steptune.space import Corrector, Model, Schedule, Step, presets, sample, spacing
from steptune.space.noise import RectifiedFlow, VPDiscrete
from steptune.space.retime import interpolate

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:__array_wrap__ must accept:DeprecationWarning")]

SD = VPDiscrete.named("sd-scaled-linear")
FLOW = RectifiedFlow()
PROMPT = "a cat"
GUIDANCE = 3.0
F64_TOL = 1e-10
F32_REL = 1e-5


def tuned(ns, t_start=None) -> Schedule:
    """A schedule as a search leaves it: irregular times, orders 1-3, noise and data prediction, a UniC
    (pseudo) corrector, an implicit corrector (one more model call: NFE 6 over 5 steps) and a DC ratio."""
    times = spacing.make(ns, 5, "logsnr", t_start, None).tolist()
    times[1:-1] = [t * f for t, f in zip(times[1:-1], (0.97, 1.06, 0.9, 1.1))]
    steps = (Step(t=times[1], prediction="data", order=1, corrector=Corrector("pseudo")),
             Step(t=times[2], prediction="noise", order=2, corrector=Corrector("implicit")),
             Step(t=times[3], prediction="data", order=3, dc_ratio=0.93),
             Step(t=times[4], prediction="data", order=2, relaxation="unipc-bh2",
                  corrector=Corrector("pseudo", order=3)),
             Step(t=times[5], prediction="noise", order=1))
    sched = Schedule(t_start=times[0], steps=steps, noise=ns.to_dict(), name="tuned")
    sched.validate()
    assert sched.nfe == 6
    return sched


def close(out: torch.Tensor, ref: torch.Tensor) -> float:
    """The largest difference relative to the size of the latents."""
    return (out - ref).abs().max().item() / ref.abs().max().item()


def tolerance(dtype) -> float:
    return F64_TOL if dtype == torch.float64 else F32_REL


# ---- components -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A CLIP BPE tokenizer over letters (no merges), written here: nothing is downloaded."""
    d = tmp_path_factory.mktemp("tokenizer")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), model_max_length=8)


def clip_config(tokenizer) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                          num_attention_heads=2, max_position_embeddings=8, projection_dim=8, bos_token_id=0,
                          eos_token_id=1, pad_token_id=1)


def tiny_vae(**kw) -> AutoencoderKL:
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                         down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                         norm_num_groups=4, sample_size=8, **kw).eval()


@pytest.fixture(scope="module")
def sd_parts(tokenizer):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
                                norm_num_groups=4, attention_head_dim=2).eval()
    return {"unet": unet, "vae": tiny_vae(), "text_encoder": CLIPTextModel(clip_config(tokenizer)).eval(),
            "tokenizer": tokenizer}


@pytest.fixture(scope="module")
def sd3_parts(tokenizer):
    torch.manual_seed(1)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=2, caption_projection_dim=16,
                                        joint_attention_dim=16, pooled_projection_dim=16, out_channels=4).eval()
    return {"transformer": transformer, "vae": tiny_vae(shift_factor=0.0609, scaling_factor=1.5035),
            "text_encoder": CLIPTextModelWithProjection(clip_config(tokenizer)).eval(), "tokenizer": tokenizer,
            "text_encoder_2": CLIPTextModelWithProjection(clip_config(tokenizer)).eval(), "tokenizer_2": tokenizer,
            "text_encoder_3": None, "tokenizer_3": None}


def sd_pipe(parts, scheduler, dtype) -> StableDiffusionPipeline:
    parts = {k: copy.deepcopy(v).to(dtype) if isinstance(v, torch.nn.Module) else v for k, v in parts.items()}
    pipe = StableDiffusionPipeline(**parts, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd3_pipe(parts, scheduler, dtype) -> StableDiffusion3Pipeline:
    parts = {k: copy.deepcopy(v).to(dtype) if isinstance(v, torch.nn.Module) else v for k, v in parts.items()}
    pipe = StableDiffusion3Pipeline(**parts, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def latents(dtype, seed=0) -> torch.Tensor:
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


# ---- unconditional: DDIMPipeline ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(2)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4).eval()


def test_ddim_pipeline_runs_a_tuned_schedule(unet):
    """DDIMPipeline (float32) with the scheduler set on the pipeline gives steptune's samples; its constructor
    turns any scheduler into a stock DDIMScheduler, so the scheduler is set after it (as the README says)."""
    ns = VPDiscrete.named("ddpm-linear")
    sched = tuned(ns)
    stock = DDIMPipeline(unet=unet, scheduler=SteptuneScheduler(schedule=sched.to_dict()))
    assert type(stock.scheduler) is DDIMScheduler  # the pipeline's own conversion: the trap the README names
    pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler())
    pipe.scheduler = SteptuneScheduler(schedule=sched.to_dict())
    pipe.set_progress_bar_config(disable=True)
    model = Model(lambda x, t: unet(x, t).sample, ns, prediction="eps", time_input="discrete")
    with torch.no_grad():
        images = pipe(batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=sched.nfe,
                      output_type="np").images
        x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
        ref = sample(model, x_T, sched)
    assert model.calls == sched.nfe == len(pipe.scheduler.timesteps)
    want = (ref / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert abs(images - want).max() <= F32_REL * ref.abs().max().item()
    assert (ref - x_T).abs().max().item() > 0.1  # the comparison is not vacuous
    with pytest.raises(ValueError, match=r"eta=0\.5 \(stochastic DDIM\) was asked for; pass eta=0"):
        pipe(batch_size=1, num_inference_steps=sched.nfe, eta=0.5)


# ---- text to image: StableDiffusionPipeline with classifier-free guidance ---------------------------------

def sd_reference(pipe, sched, x_T) -> tuple[torch.Tensor, Model]:
    """steptune's sampler on the pipeline's own UNet and prompt embeddings, guidance applied by ``Model``."""
    cond, uncond = pipe.encode_prompt(PROMPT, "cpu", 1, True, negative_prompt="")
    unet = pipe.unet
    model = Model(lambda x, t, e: unet(x, t, encoder_hidden_states=e).sample, SD, prediction="eps",
                  time_input="discrete", guidance_scale=GUIDANCE, cond_kwargs={"e": cond}, uncond_kwargs={"e": uncond})
    return sample(model, x_T.clone(), sched), model


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_stable_diffusion_pipeline_with_guidance(sd_parts, dtype):
    sched = tuned(SD)
    pipe = sd_pipe(sd_parts, SteptuneScheduler(schedule=sched.to_dict()), dtype)
    x_T = latents(dtype)
    with torch.no_grad():
        out = pipe(PROMPT, num_inference_steps=sched.nfe, guidance_scale=GUIDANCE, height=8, width=8,
                   latents=x_T.clone(), output_type="latent").images
        ref, model = sd_reference(pipe, sched, x_T * pipe.scheduler.init_noise_sigma)
    assert out.dtype == dtype and model.calls == sched.nfe
    assert close(out, ref) <= tolerance(dtype)
    assert (ref - x_T).abs().max().item() > 0.1
    with torch.no_grad():  # the same pipeline without guidance differs: guidance reached the scheduler's loop
        plain = pipe(PROMPT, num_inference_steps=sched.nfe, guidance_scale=1.0, height=8, width=8,
                     latents=x_T.clone(), output_type="latent").images
    assert close(plain, ref) > 100 * tolerance(dtype)


@pytest.mark.parametrize("steps", [4, 9])
def test_another_num_inference_steps_runs_the_retimed_schedule(sd_parts, steps):
    """``num_inference_steps`` other than the NFE runs steptune's own re-timing of the schedule
    (``steptune.space.retime.interpolate``), exactly ``steps`` model calls, with one warning saying so."""
    sched = tuned(SD)
    pipe = sd_pipe(sd_parts, SteptuneScheduler(schedule=sched.to_dict()), torch.float64)
    x_T = latents(torch.float64)
    with pytest.warns(UserWarning, match=f"re-times its tuned schedule of 6 model calls to num_inference_steps={steps}"
                      ), torch.no_grad():
        out = pipe(PROMPT, num_inference_steps=steps, guidance_scale=GUIDANCE, height=8, width=8,
                   latents=x_T.clone(), output_type="latent").images
    retimed = interpolate({sched.nfe: sched}, steps)
    assert retimed.nfe == steps == len(pipe.scheduler.timesteps)
    assert {st.order for st in retimed.steps} != {1} and any(st.corrector for st in retimed.steps)  # decisions kept
    with torch.no_grad():
        ref, model = sd_reference(pipe, retimed, x_T)
    assert model.calls == steps and close(out, ref) <= F64_TOL
    with torch.no_grad():  # back at the tuned NFE: the tuned schedule again
        out6 = pipe(PROMPT, num_inference_steps=sched.nfe, guidance_scale=GUIDANCE, height=8, width=8,
                    latents=x_T.clone(), output_type="latent").images
        ref6, _ = sd_reference(pipe, sched, x_T)
    assert close(out6, ref6) <= F64_TOL


def test_the_pipelines_default_step_count_is_reached_and_retime_false_refuses_it(sd_parts):
    """The re-timing builds the schedule at any step count (above the tuned one, its relative lambda profile over
    the new steps), so a pipeline's default 50 steps is reached (exactly 50 model calls); a scheduler built not to
    re-time refuses it in one sentence."""
    sched = tuned(SD)
    pipe = sd_pipe(sd_parts, SteptuneScheduler(schedule=sched.to_dict()), torch.float32)
    with pytest.warns(UserWarning, match="to num_inference_steps=50"), torch.no_grad():
        pipe(PROMPT, height=8, width=8, output_type="latent")  # the pipeline's default, 50 steps
    assert len(pipe.scheduler.timesteps) == 50 == interpolate({sched.nfe: sched}, 50).nfe
    pipe = sd_pipe(sd_parts, SteptuneScheduler(schedule=sched.to_dict(), retime=False), torch.float32)
    with pytest.raises(ValueError) as e:
        pipe(PROMPT, height=8, width=8, output_type="latent")  # the pipeline's default, 50 steps
    assert str(e.value) == ("SteptuneScheduler runs its tuned schedule of 6 model calls, but num_inference_steps=50 "
                            "was asked for; pass num_inference_steps=6 (or build the scheduler with retime=True to "
                            "re-time the schedule)")


# ---- rectified flow: StableDiffusion3Pipeline ------------------------------------------------------------

def sd3_model(pipe) -> Model:
    """The pipeline's transformer as a steptune flow model (velocity eps - x0, time input 1000 t), guided."""
    cond, uncond, pooled, pooled_uncond = pipe.encode_prompt(PROMPT, None, None, device="cpu",
                                                             do_classifier_free_guidance=True, negative_prompt="")
    tr = pipe.transformer

    def fn(x, t, e, p):
        return tr(hidden_states=x, timestep=t, encoder_hidden_states=e, pooled_projections=p).sample

    return Model(fn, FLOW, prediction="flow", time_input="continuous", time_scale=1000.0, guidance_scale=GUIDANCE,
                 cond_kwargs={"e": cond, "p": pooled}, uncond_kwargs={"e": uncond, "p": pooled_uncond})


def run_sd3(pipe, x_T, nfe, **kw) -> torch.Tensor:
    with torch.no_grad():
        return pipe(PROMPT, num_inference_steps=nfe, guidance_scale=GUIDANCE, height=8, width=8, latents=x_T.clone(),
                    output_type="latent", **kw).images


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sd3_flow_pipeline_runs_a_tuned_schedule(sd3_parts, dtype):
    sched = tuned(FLOW, t_start=0.999)
    s = SteptuneScheduler(schedule=sched.to_dict())
    assert s.config.prediction_type == "flow_prediction" and s.config.time_input == "continuous"
    assert s.config.time_scale == 1000.0  # diffusers' flow transformers take 1000 t, as FlowMatch schedulers
    pipe = sd3_pipe(sd3_parts, s, dtype)
    x_T = latents(dtype)
    out = run_sd3(pipe, x_T, sched.nfe)
    model = sd3_model(pipe)
    with torch.no_grad():
        ref = sample(model, x_T.clone(), sched)
    assert out.dtype == dtype and model.calls == sched.nfe
    assert close(out, ref) <= tolerance(dtype)
    assert (ref - x_T).abs().max().item() > 0.1


def test_flow_shift_is_not_applied_twice(sd3_parts):
    """The trap of diffusers' FlowMatch schedulers with custom sigmas: they shift them (``shift``, or ``mu`` under
    dynamic shifting). A tuned schedule's times are already the model's own t; SteptuneScheduler built from a
    shifting FlowMatch config keeps them, and the pipeline's ``mu`` changes nothing (one warning)."""
    sched = tuned(FLOW, t_start=0.999)
    calls = [sched.times[j] for j in (0, 1, 2, 2, 3, 4)]  # the implicit corrector calls again at times[2]
    stock = FlowMatchEulerDiscreteScheduler(shift=3.0)
    stock.set_timesteps(sigmas=calls)
    assert not torch.allclose(stock.sigmas[:-1].double(), torch.tensor(calls, dtype=torch.float64), atol=1e-3)
    unshifted = FlowMatchEulerDiscreteScheduler(shift=1.0)
    unshifted.set_timesteps(sigmas=calls)  # the stock convention at shift 1: sigma = t, timestep = 1000 t

    shifting = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    s = SteptuneScheduler.from_config(shifting.config, schedule=sched.to_dict())
    assert torch.allclose(s.timesteps.double(), unshifted.timesteps.double(), rtol=1e-6, atol=0)
    want = torch.tensor([*calls, sched.times[-1]], dtype=torch.float32)
    assert torch.allclose(unshifted.sigmas[:-1], want[:-1], rtol=1e-6, atol=0)
    assert torch.allclose(s.sigmas, want, rtol=1e-6, atol=0)
    pipe = sd3_pipe(sd3_parts, s, torch.float64)
    assert pipe.scheduler.config.get("use_dynamic_shifting")  # so the pipeline computes a mu and passes it
    x_T = latents(torch.float64)
    with pytest.warns(UserWarning, match=r"dynamic shift mu=\S+ is not applied") as told:
        out = run_sd3(pipe, x_T, sched.nfe)
    assert len([w for w in told if "mu=" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per scheduler: the second run is quiet
        again = run_sd3(pipe, x_T, sched.nfe, mu=2.0)
    with torch.no_grad():
        ref = sample(sd3_model(pipe), x_T.clone(), sched)
    assert close(out, ref) <= F64_TOL and torch.equal(out, again)


def test_flow_conventions_match_the_stock_flow_scheduler(sd3_parts):
    """An independent check of the flow conventions: a first-order schedule (DDIM, which is Euler in t on a
    rectified flow) through SteptuneScheduler equals diffusers' FlowMatchEulerDiscreteScheduler as the stock
    export configures it (the model's own t as sigmas, shift 1), in the same SD3 pipeline (the stock
    scheduler steps in float32)."""
    sched = presets.ddim(6, FLOW, t_start=0.999, final_zero=True)
    x_T = latents(torch.float64, seed=4)
    ours = run_sd3(sd3_pipe(sd3_parts, SteptuneScheduler(schedule=sched.to_dict()), torch.float64), x_T, sched.nfe)
    exp = stock_diffusers_export(sched, {"prediction": "flow", "time_input": "continuous", "time_scale": 1000.0})
    assert exp.class_name == "FlowMatchEulerDiscreteScheduler" and exp.config["shift"] == 1.0
    stock = exp.build()
    theirs = run_sd3(sd3_pipe(sd3_parts, stock, torch.float64), x_T, None, **exp.kwargs)
    assert stock.sigmas[-1] == 0.0 and sched.times[-1] == 0.0
    assert close(theirs, ours) <= F32_REL
    assert (ours - x_T).abs().max().item() > 0.1


def test_flow_pipeline_without_scale_model_input_refuses_an_analytical_first_step(sd3_parts):
    sched = dataclasses.replace(presets.unipc_bh2(5, FLOW, t_start=0.999), afs="zero")
    pipe = sd3_pipe(sd3_parts, SteptuneScheduler(schedule=sched.to_dict()), torch.float32)
    with pytest.raises(ValueError, match=r"which this pipeline did not call; use a schedule without one"):
        run_sd3(pipe, latents(torch.float32), sched.nfe)


# ---- the gmm problems under --noise flow through the diffusers path -----------------------------------------

@pytest.mark.parametrize("name", ["gmm-2d", "gmm-digits"])
@pytest.mark.parametrize("afs", ["none", "zero"])
def test_gmm_flow_problems_through_the_scheduler_equal_steptune(name, afs, tmp_path_factory):
    """steptune's own problems with ``--noise flow --prediction flow``: a tuned schedule exported with the
    problem's conventions (``scheduler_for``, as ``steptune export --format diffusers``) and driven by the
    diffusers denoising loop gives what ``steptune.sample`` gives, model calls included."""
    cache = {"cache_dir": tmp_path_factory.mktemp("gmm")} if name == "gmm-digits" else {}
    problem = load_problem(name, noise="flow", prediction="flow", **cache)
    sched = dataclasses.replace(tuned(FLOW, t_start=problem.t_start), afs=afs)
    s = scheduler_for(sched, problem.model.conventions())
    assert s.config.time_scale == problem.model.time_scale and s.config.tuned_for["sigma"] == "t"
    x_T = problem.sample_prior(8, torch.Generator().manual_seed(5))
    model = problem.model
    with torch.no_grad():
        x = x_T.clone()
        before = model.calls
        for t in s.timesteps:
            xin = s.scale_model_input(x, t)
            x = s.step(model.call(xin, t.expand(xin.shape[0]).to(xin)), t, x).prev_sample
        assert model.calls - before == sched.nfe == (6 if afs == "none" else 5)
        ref = sample(model, x_T.clone(), sched)
    assert close(x, ref) <= F64_TOL
    assert (ref - x_T).abs().max().item() > 0.1
