"""The diffusers exports: SteptuneScheduler in a real pipeline, and the stock-scheduler exports.

The network is a small randomly initialised UNet2DModel (nothing is downloaded). A pipeline driving
SteptuneScheduler must produce what steptune's own sampler produces for the same schedule, noise and
network; stock exports must make the stock scheduler use exactly the intended timesteps / sigmas.
"""

import copy
import dataclasses
import inspect
import json

import pytest
import torch
from diffusers import (
    DDPMPipeline,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UNet2DModel,
)

from steptune.exports import ExportError, SteptuneScheduler, stock_diffusers_export
from steptune.space import Model, ScheduleError, Step, noise, presets, sample, spacing
from steptune.space.noise import VPDiscrete

# diffusers applies numpy functions to torch tensors; numpy 2 warns
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:__array_wrap__ must accept:DeprecationWarning")]

NS = VPDiscrete.named("ddpm-linear")
CONV = {"prediction": "eps", "time_input": "discrete"}


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4).double().eval()


def _model(net) -> Model:
    return Model(lambda x, t: net(x, t).sample, NS, prediction="eps", time_input="discrete")


SCHEDULES = {
    "ddim": lambda: presets.ddim(6, NS),
    "dpm-solver++-2m": lambda: presets.dpmpp_2m(6, NS),
    "unipc-bh2": lambda: presets.unipc_bh2(6, NS),  # pseudo corrector: no extra model call
    "heun": lambda: presets.heun(7, NS),  # implicit corrector: a second model call at the same time
    "dpm-solver-2": lambda: presets.dpm_solver_2(6, NS),  # singlestep: midpoints as their own steps
    "unipc-bh2-afs": lambda: dataclasses.replace(presets.unipc_bh2(6, NS), afs="zero"),
}


def pipeline_loop(scheduler, net, x):
    """The denoising loop of diffusers' pipelines."""
    for t in scheduler.timesteps:
        model_output = net(scheduler.scale_model_input(x, t), t).sample
        x = scheduler.step(model_output, t, x).prev_sample
    return x


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_pipeline_loop_matches_steptune_sample(name, unet):
    sched = SCHEDULES[name]()
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    model = _model(unet)
    with torch.no_grad():
        ref = sample(model, x_T.clone(), sched)
        s = SteptuneScheduler(schedule=sched.to_dict())
        s.set_timesteps(num_inference_steps=sched.nfe)
        out = pipeline_loop(s, unet, x_T.clone())
    assert model.calls == sched.nfe == len(s.timesteps)
    assert (out - ref).abs().max().item() <= 1e-5
    assert (ref - x_T).abs().max().item() > 0.1  # the comparison is not vacuous
    if name == "heun":  # the implicit corrector evaluates twice at each corrected time
        ts = s.timesteps.tolist()
        assert ts[1] == ts[2] and ts[3] == ts[4]
    if name == "unipc-bh2-afs":  # the analytical first step saves the call at t_start
        assert s.timesteps[0].item() == pytest.approx(float(NS.timestep(sched.times[1])))


@pytest.mark.parametrize("name", ["unipc-bh2", "heun", "dpm-solver-2", "unipc-bh2-afs"])
def test_a_loop_can_differentiate_through_the_scheduler(name, unet):
    """With autograd on (e.g. gradient guidance), the steps are differentiable: the gradient of the final
    state's mean square in a scale g on the network output equals steptune's own sampler's finite difference."""
    sched = SCHEDULES[name]()
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def loss_of(g: float) -> float:
        model = Model(lambda x, t: g * unet(x, t).sample, NS, prediction="eps", time_input="discrete")
        with torch.no_grad():
            return sample(model, x_T.clone(), sched).pow(2).mean().item()

    g = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    s = SteptuneScheduler(schedule=sched.to_dict())
    s.set_timesteps(num_inference_steps=sched.nfe)
    x = x_T.clone()
    for t in s.timesteps:
        x = s.step(g * unet(s.scale_model_input(x, t), t).sample, t, x).prev_sample
    loss = x.pow(2).mean()
    loss.backward()
    h = 1e-5
    assert loss.item() == pytest.approx(loss_of(1.0), rel=1e-12)
    assert g.grad.item() == pytest.approx((loss_of(1 + h) - loss_of(1 - h)) / (2 * h), rel=1e-6)


def test_ddpm_pipeline_with_steptune_scheduler(unet, tmp_path):
    """A stock DDPMPipeline (float32) with the scheduler swapped in gives steptune's samples."""

    class Recording(SteptuneScheduler):
        def step(self, *args, **kwargs):
            res = super().step(*args, **kwargs)
            self.last = res.prev_sample
            return res

    net = copy.deepcopy(unet).float()
    sched = presets.dpmpp_2m(6, NS)
    pipe = DDPMPipeline(unet=net, scheduler=Recording(schedule=sched.to_dict()))
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        images = pipe(batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=sched.nfe,
                      output_type="pt").images
        x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float32)
        ref = sample(Model(lambda x, t: net(x, t).sample, NS, prediction="eps", time_input="discrete"), x_T, sched)
    assert pipe.scheduler.last.dtype == torch.float32
    assert (pipe.scheduler.last - ref).abs().max().item() <= 1e-5
    assert torch.allclose(images, (ref / 2 + 0.5).clamp(0, 1), atol=1e-6, rtol=0)
    pipe.scheduler = SteptuneScheduler(schedule=sched.to_dict(), retime=False)
    with pytest.raises(ValueError, match=f"pass num_inference_steps={sched.nfe}"):
        pipe(batch_size=1, num_inference_steps=50)
    # the whole pipeline saves and loads with the scheduler (model_index.json names its module)
    pipe.scheduler = SteptuneScheduler(schedule=sched.to_dict())
    pipe.save_pretrained(str(tmp_path))
    assert json.loads((tmp_path / "model_index.json").read_text())["scheduler"] == [
        "steptune.exports.diffusers_scheduler", "SteptuneScheduler"]
    again = DiffusionPipeline.from_pretrained(str(tmp_path))
    again.unet.float()
    assert type(again.scheduler) is SteptuneScheduler and again.scheduler.schedule == sched
    again.set_progress_bar_config(disable=True)
    with torch.no_grad():
        images2 = again(batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=sched.nfe,
                        output_type="pt").images
    assert torch.equal(images2, images)


def test_save_load_round_trip(unet, tmp_path):
    sched = presets.heun(9, NS)
    s = SteptuneScheduler(schedule=sched.to_dict(), prediction_type="eps", time_input="discrete")
    s.save_pretrained(str(tmp_path))
    loaded = SteptuneScheduler.from_pretrained(str(tmp_path))
    assert loaded.schedule == sched
    public = {k: v for k, v in s.config.items() if not k.startswith("_")}
    assert {k: v for k, v in loaded.config.items() if not k.startswith("_")} == public
    assert json.loads((tmp_path / "scheduler_config.json").read_text())["schedule"] == sched.to_dict()
    assert torch.equal(loaded.timesteps, s.timesteps)
    x = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        for sch in (s, loaded):
            sch.set_timesteps()
        assert torch.equal(pipeline_loop(s, unet, x.clone()), pipeline_loop(loaded, unet, x.clone()))


def test_set_timesteps_and_step_are_validated():
    sched = presets.unipc_bh2(5, NS)
    s = SteptuneScheduler(schedule=sched.to_dict())
    params = inspect.signature(s.set_timesteps).parameters
    assert "timesteps" in params and "sigmas" in params  # what pipelines probe for
    strict = SteptuneScheduler(schedule=sched.to_dict(), retime=False)
    with pytest.raises(ValueError, match="tuned schedule of 5 model calls, but num_inference_steps=50"):
        strict.set_timesteps(50)
    with pytest.raises(ValueError, match="got 3 sigmas"):
        strict.set_timesteps(sigmas=[3.0, 2.0, 1.0])
    s.set_timesteps(timesteps=s.timesteps.tolist())
    with pytest.raises(ValueError, match="got 4 timesteps but the tuned schedule makes 5 model calls"):
        s.set_timesteps(timesteps=s.timesteps.tolist()[:4])
    with pytest.raises(ValueError, match="differ from the tuned schedule"):
        s.set_timesteps(timesteps=[999, 800, 600, 400, 200])
    with pytest.warns(UserWarning, match="ignores the sigmas"):
        s.set_timesteps(sigmas=[1.0, 0.8, 0.6, 0.4, 0.2])  # e.g. a flow pipeline's default sigmas
    s.set_timesteps(sigmas=s.sigmas.tolist())
    x = torch.zeros(1, 4)
    with pytest.raises(ValueError, match="model call 0 of the schedule is at 999"):
        s.step(torch.zeros(1, 4), s.timesteps[1], x)
    for t in s.timesteps:
        x = s.step(torch.zeros(1, 4), t, x).prev_sample
    with pytest.raises(ValueError, match="call set_timesteps"):
        s.step(torch.zeros(1, 4), s.timesteps[0], x)
    afs = SteptuneScheduler(schedule=dataclasses.replace(sched, afs="zero").to_dict())
    afs.set_timesteps()
    with pytest.raises(ValueError, match="scale_model_input"):
        afs.step(torch.zeros(1, 4), afs.timesteps[0], torch.zeros(1, 4))
    with pytest.raises(ValueError, match="img2img"):
        s.set_begin_index(2)


def test_from_a_stock_scheduler_config():
    # as loaded from a pipeline folder: the beta config is explicit (ddpm-linear)
    stock = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    s = SteptuneScheduler.from_config(stock.config, schedule=presets.ddim(5, NS).to_dict())
    assert s.noise_schedule == NS and s.config.prediction_type == "epsilon" and s.config.num_train_timesteps == 1000
    bare = dataclasses.replace(presets.ddim(5, NS), noise={})
    assert SteptuneScheduler.from_config(stock.config, schedule=bare.to_dict()).noise_schedule == NS
    sd = presets.ddim(5, VPDiscrete.named("sd-scaled-linear"))
    with pytest.raises(ScheduleError, match="tuned for noise schedule"):
        SteptuneScheduler.from_config(stock.config, schedule=sd.to_dict())


# ---- stock schedulers ------------------------------------------------------------------------------

MU = 0.3
VAR = 0.5


def _gaussian_eps(x, k):
    """Exact eps for N(MU, VAR) data at training timestep k (fractional k interpolated as steptune does)."""
    k = float(k.reshape(-1)[0]) if torch.is_tensor(k) else float(k)
    t = torch.tensor((k + 1) / NS.N, dtype=torch.float64)
    a, s = float(NS.alpha(t)), float(NS.sigma(t))
    return s * (x - a * MU) / (a * a * VAR + s * s)


def _searched_integer_dpm(nfe):
    """A DPM-Solver++(2M) schedule on irregular integer timesteps (what a timestep search produces)."""
    ks = sorted({999, *torch.randint(1, 999, (nfe + 6,), generator=torch.Generator().manual_seed(nfe)).tolist()},
                reverse=True)[:nfe]
    times = [float(NS.t_of_timestep(k)) for k in ks] + [0.0]
    return presets.dpmpp_2m(nfe, NS, spacing=times)


def _to_sigma_min(nfe):
    """diffusers' linspace timesteps ending at the smallest training sigma (final_sigmas_type="sigma_min")."""
    return spacing.make(NS, nfe, "diffusers-linspace", final_zero=False).tolist() + [NS.t_min]


DPM_CASES = {
    "ddim-5": lambda: presets.ddim(5, NS, spacing="diffusers-linspace"),
    "dpm++2m-5": lambda: presets.dpmpp_2m(5, NS, spacing="diffusers-linspace"),
    "dpm++2m-20": lambda: presets.dpmpp_2m(20, NS, spacing="diffusers-leading"),
    "dpm++3m-8": lambda: presets.dpmpp_3m(8, NS, spacing="diffusers-trailing"),
    "dpm++2m-searched-7": lambda: _searched_integer_dpm(7),
    "dpm++2m-sigma-min": lambda: presets.dpmpp_2m(6, NS, spacing=_to_sigma_min(6)),
}


@pytest.mark.parametrize("case", list(DPM_CASES))
def test_dpmsolver_export_is_exact(case):
    sched = DPM_CASES[case]()
    exp = stock_diffusers_export(sched, CONV)
    assert exp.class_name == "DPMSolverMultistepScheduler"
    s = exp.build()
    assert s.timesteps.tolist() == [round(float(NS.timestep(t))) for t in sched.times[:-1]]
    want = NS.edm_sigma(torch.tensor(sched.times, dtype=torch.float64))
    if sched.times[-1] == 0.0:
        want[-1] = 0.0
    assert torch.allclose(s.sigmas.double(), want, rtol=1e-6, atol=0)
    assert s.config.final_sigmas_type == ("zero" if sched.times[-1] == 0.0 else "sigma_min")
    x_T = torch.randn(16, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = x_T.clone()
    for k in s.timesteps:
        x = s.step(_gaussian_eps(x, k), k, x).prev_sample
    ours = sample(Model(_gaussian_eps, NS, prediction="eps", time_input="discrete"), x_T.clone(), sched)
    assert (x - ours).abs().max().item() < 1e-5  # diffusers computes each update in float32
    assert (ours - x_T).abs().max().item() > 0.1


def test_euler_export_is_exact():
    sched = presets.ddim(10, NS, spacing="diffusers-trailing")  # first order, integer timesteps, ends at sigma 0
    exp = stock_diffusers_export(sched, CONV, "euler")
    assert exp.class_name == "EulerDiscreteScheduler"
    s = exp.build()
    want = NS.edm_sigma(torch.tensor(sched.times, dtype=torch.float64))
    want[-1] = 0.0
    assert torch.equal(s.sigmas, want.float())
    assert torch.allclose(s.timesteps.double(), NS.timestep(torch.tensor(sched.times[:-1])), atol=1e-3, rtol=0)
    x_T = torch.randn(16, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # Euler works on x/alpha: its initial latents are unit noise times init_noise_sigma = 1/alpha(t_start)
    x = x_T * s.init_noise_sigma
    for t in s.timesteps:
        x = s.step(_gaussian_eps(s.scale_model_input(x, t), t), t, x).prev_sample
    ours = sample(Model(_gaussian_eps, NS, prediction="eps", time_input="discrete"), x_T.clone(), sched)
    assert (x - ours).abs().max().item() < 1e-5
    assert isinstance(EulerDiscreteScheduler.from_config(s.config), EulerDiscreteScheduler)


def _mixed_orders():
    s = presets.dpmpp_2m(6, NS, spacing="diffusers-linspace")
    steps = list(s.steps)
    steps[2] = Step(t=steps[2].t, prediction="data", order=1)  # order 1 in the middle: searched, not diffusers
    return s.with_steps(steps)


REFUSALS = {
    "unipc": (lambda: presets.unipc_bh2(6, NS, spacing="diffusers-linspace"), "auto", "corrector"),
    "heun": (lambda: presets.heun(7, NS), "dpmsolver", "corrector"),
    "mixed-orders": (_mixed_orders, "dpmsolver", "step orders [1, 2, 1, 2, 2, 1]"),
    "fractional-timesteps": (lambda: presets.dpmpp_2m(6, NS), "dpmsolver", "not an integer training timestep"),
    "euler-karras": (lambda: presets.euler(6, NS, final_zero=True), "euler", "training timesteps away"),
    "euler-not-to-zero": (lambda: presets.ddim(6, NS, spacing=_to_sigma_min(6)), "euler", "x/alpha"),
    "custom-table": (lambda: presets.ddim(5, VPDiscrete(tuple(x * 0.999 for x in NS.alphas_cumprod)),
                                          spacing="diffusers-linspace"), "dpmsolver", "custom alphas_cumprod"),
    "continuous-noise": (lambda: presets.ddim(5, noise.VPLinear()), "euler", "vp-linear"),
    "flow-second-order": (lambda: presets.dpmpp_2m(5, noise.RectifiedFlow(), t_start=0.999, final_zero=True),
                          "flowmatch", "only takes first-order schedules"),
    "flow-not-to-zero": (lambda: presets.ddim(5, noise.RectifiedFlow(), t_start=0.999), "flowmatch",
                         "end the schedule at t = 0"),
    "flow-on-vp": (lambda: presets.ddim(5, NS), "flowmatch", "needs a rectified-flow model"),
}


FLOW_CONV = {"prediction": "flow", "time_input": "continuous", "time_scale": 1000.0}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_stock_export_refuses_with_a_reason(case):
    make, kind, words = REFUSALS[case]
    with pytest.raises(ExportError) as e:
        stock_diffusers_export(make(), FLOW_CONV if case.startswith("flow") else CONV, kind)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_flowmatch_export_is_exact_and_unshifted():
    """A first-order flow schedule ending at t = 0 as FlowMatchEulerDiscreteScheduler (auto picks it) with the
    model's own t as sigmas and shift 1: its steps equal steptune's on the exact velocity of Gaussian data."""
    fl = noise.RectifiedFlow()
    sched = presets.ddim(7, fl, spacing="time-uniform", t_start=0.999, final_zero=True)
    exp = stock_diffusers_export(sched, FLOW_CONV)
    assert exp.class_name == "FlowMatchEulerDiscreteScheduler"
    assert (exp.config["shift"], exp.config["use_dynamic_shifting"]) == (1.0, False)
    s = exp.build()
    assert torch.allclose(s.timesteps.double(), 1000 * torch.tensor(sched.times[:-1], dtype=torch.float64), rtol=1e-6)

    def velocity(x, timestep):  # eps - x0 for N(MU, VAR) data, x = (1 - t) x0 + t eps
        t = float(timestep.reshape(-1)[0]) / 1000 if torch.is_tensor(timestep) else float(timestep) / 1000
        a, sd = 1 - t, t
        x0 = MU + a * VAR * (x - a * MU) / (a * a * VAR + sd * sd)
        return (x - a * x0) / sd - x0

    x_T = torch.randn(16, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = x_T.clone()
    for t in s.timesteps:
        x = s.step(velocity(x, t), t, x).prev_sample
    ours = sample(Model(lambda x, t: velocity(x, t), fl, prediction="flow", time_input="continuous",
                        time_scale=1000.0), x_T.clone(), sched)
    assert (x - ours).abs().max().item() < 1e-5  # diffusers steps in float32
    assert (ours - x_T).abs().max().item() > 0.1


def test_stock_export_needs_stock_conventions():
    sched = presets.ddim(5, NS, spacing="diffusers-linspace")
    with pytest.raises(ExportError, match="predicts 'flow'"):
        stock_diffusers_export(sched, {"prediction": "flow", "time_input": "discrete"})
    exp = stock_diffusers_export(sched, {"prediction": "v", "time_input": "discrete"})
    assert exp.config["prediction_type"] == "v_prediction"
    assert isinstance(exp.build(), DPMSolverMultistepScheduler)
