"""The Python API as the README shows it, with ordinary torch modules: autograd on, diffusers-style outputs and
half-precision latents."""

import dataclasses
import json

import pytest
import torch

import steptune
from steptune.space import Schedule, ScheduleError
from steptune.space import noise as noise_mod

NS = noise_mod.VPDiscrete.named("sd-scaled-linear")
SCHED = steptune.presets.unipc_bh2(nfe=6, noise=NS, order=3)


def _conv():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(2, 2, 3, padding=1, dtype=torch.float64)
    return conv, torch.randn(3, 2, 5, 5, dtype=torch.float64)


def test_a_module_whose_parameters_track_gradients_samples_as_under_no_grad_and_is_differentiable():
    conv, x_T = _conv()
    for prediction in ("eps", "x0", "v", "flow"):
        model = steptune.Model(lambda x, t: 0.1 * conv(x), NS, prediction=prediction, time_input="discrete")
        with torch.no_grad():
            plain = steptune.sample(model, x_T, SCHED)
        x = steptune.sample(model, x_T, SCHED)
        assert torch.equal(x.detach(), plain)
        conv.zero_grad()
        x.square().sum().backward()
        grad = conv.bias.grad[0].item()
        h = 1e-6
        with torch.no_grad():
            conv.bias[0] += h
            up = steptune.sample(model, x_T, SCHED).square().sum().item()
            conv.bias[0] -= 2 * h
            down = steptune.sample(model, x_T, SCHED).square().sum().item()
            conv.bias[0] += h
        assert abs(grad - (up - down) / (2 * h)) <= 1e-6 * max(1.0, abs(grad)), prediction


class _Output:  # what diffusers' UNet2DModel returns
    def __init__(self, sample):
        self.sample = sample


def test_a_network_returning_a_diffusers_style_output_samples_as_one_returning_the_tensor():
    conv, x_T = _conv()
    with torch.no_grad():
        want = steptune.sample(steptune.Model(lambda x, t: conv(x), NS, time_input="discrete"), x_T, SCHED)
        for wrap in (_Output, lambda v: {"sample": v}, lambda v: (v,)):
            model = steptune.Model(lambda x, t, wrap=wrap: wrap(conv(x)), NS, time_input="discrete")
            assert torch.equal(steptune.sample(model, x_T, SCHED), want)
        guided = steptune.Model(lambda x, t, c: _Output(conv(x) * c), NS, time_input="discrete", guidance_scale=2.0,
                                cond_kwargs={"c": 1.0}, uncond_kwargs={"c": 0.5})
        plain = steptune.Model(lambda x, t, c: conv(x) * c, NS, time_input="discrete", guidance_scale=2.0,
                               cond_kwargs={"c": 1.0}, uncond_kwargs={"c": 0.5})
        assert torch.equal(steptune.sample(guided, x_T, SCHED), steptune.sample(plain, x_T, SCHED))


def test_half_precision_latents_give_the_network_its_timesteps_in_float32():
    seen = []

    def fn(x, t):
        seen.append(t)
        return torch.zeros_like(x)

    sched = steptune.presets.ddim(nfe=4, noise=NS, spacing="diffusers-trailing")
    want = NS.timestep(torch.tensor(sched.times[:-1], dtype=torch.float64)).float()
    for dtype in (torch.bfloat16, torch.float16):
        seen.clear()
        steptune.sample(steptune.Model(fn, NS, time_input="discrete"), torch.randn(2, 3, dtype=dtype), sched)
        assert [t.dtype for t in seen] == [torch.float32] * 4
        assert torch.equal(torch.stack([t[0] for t in seen]), want)  # 999 stays 999 (bfloat16 rounds it to 1000)


def test_load_schedule_reads_a_diffusers_export_folder_and_its_config(tmp_path):
    from steptune.exports import SteptuneScheduler

    SteptuneScheduler(schedule=SCHED.to_dict()).save_pretrained(tmp_path / "sched")
    for path in (tmp_path / "sched", tmp_path / "sched" / "scheduler_config.json"):
        assert steptune.load_schedule(path).key() == SCHED.key()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ScheduleError, match="a folder without a scheduler_config.json; give a schedule JSON file"):
        steptune.load_schedule(tmp_path / "empty")


def test_a_misspelled_top_level_field_is_refused_not_dropped(tmp_path):
    d = SCHED.to_dict()
    d["asf"] = d.pop("afs")
    (tmp_path / "s.json").write_text(json.dumps(d))
    with pytest.raises(ScheduleError, match="unknown field 'asf' at the top level; did you mean 'afs'"):
        steptune.load_schedule(tmp_path / "s.json")
    with pytest.raises(ScheduleError, match="unknown field 'colour' at the top level; remove it or check"):
        Schedule.from_dict({**SCHED.to_dict(), "colour": "red"})
    exported = {**SCHED.to_dict(), "provenance": {"study": "s"}}  # an export's provenance is read elsewhere
    assert Schedule.from_dict(exported).key() == SCHED.key()


def test_a_start_beyond_the_noise_schedules_last_time_is_refused():
    late = dataclasses.replace(SCHED, t_start=1.5)  # on a 1,000-step table: timestep 1499
    with pytest.raises(ScheduleError, match=r"'t_start' = 1.5 is beyond the last time of its discrete noise "
                                            r"schedule \(T = 1, its table's last timestep\)"):
        late.validate()
    assert dataclasses.replace(SCHED, t_start=1.0).validate().t_start == 1.0  # the last entry itself is a start
    for name in ("vp-linear", "edm"):  # a continuous schedule extends past its T (a rescaled sigma list)
        ns = noise_mod.get(name)
        s = steptune.presets.ddim(nfe=4, noise=ns, spacing="time-uniform", t_start=1.01 * ns.T, t_end=ns.t_min)
        assert s.validate().t_start == 1.01 * ns.T


@pytest.mark.parametrize("returned, said", [
    ({"pred": 1}, "the network returned a dict with keys 'pred' and no 'sample'"),
    ((None, 2), "the network returned a tuple whose first entry is no tensor"),
    (3.0, "the network returned a float")])
def test_a_network_output_that_holds_no_prediction_is_named(returned, said):
    from steptune.space.errors import NetworkOutputError
    from steptune.space.model import network_output

    with pytest.raises(NetworkOutputError) as e:
        network_output(returned)
    assert str(e.value).startswith(said + "; return the prediction as a tensor")
    x = torch.ones(2)
    assert network_output({"sample": x}) is x and network_output((x, None)) is x and network_output(x) is x
