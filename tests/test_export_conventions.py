"""One σ convention everywhere, the final σ stated, and what a schedule was tuned for.

Every export writes and reads σ in the model's own convention (σ/α for VP and EDM models, t for rectified
flow), checked against the closed forms of each noise schedule and against diffusers' own schedulers (a VP
multistep scheduler keeps σ/α, FlowMatch keeps t); the JSON provenance records the sampler and model
conventions a schedule was tuned for; a scheduler running it under other conventions warns once.
"""

import json
import warnings

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

from steptune.exports import (
    SteptuneScheduler,
    export_dict,
    k_diffusion_sigmas,
    parse_export,
    scheduler_from_export,
    sigma_list_calls,
)
from steptune.exports.conventions import scheduler_for
from steptune.exports.tuning import (
    convention_mismatch,
    final_sigma,
    model_sigmas,
    times_from_model_sigmas,
    tuned_model_conventions,
    warn_other_conventions,
)
from steptune.space import ScheduleError, noise, presets
from steptune.storage import connect

pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:__array_wrap__ must accept:DeprecationWarning")]

NS = noise.VPDiscrete.named("ddpm-linear")
FLOW = noise.RectifiedFlow()
NOISES = {"vp-discrete": NS, "vp-linear": noise.VPLinear(), "edm": noise.EDM(), "flow": FLOW}
EPS = {"prediction": "eps", "time_input": "discrete"}


@pytest.mark.parametrize("name", list(NOISES))
def test_model_sigmas_are_the_models_own_and_read_back(name):
    ns = NOISES[name]
    t = torch.tensor([0.99 * ns.T, 0.5 * ns.T, float(ns.t_min), 0.0], dtype=torch.float64)
    sig = model_sigmas(ns, t)
    a, s = ns.alpha(t[:-1]), ns.sigma(t[:-1])
    want = t[:-1] if name == "flow" else s / a  # flow: x = (1 - t) x0 + t eps has sigma = t
    torch.testing.assert_close(sig[:-1], want, rtol=1e-12, atol=0)
    assert sig[-1].item() == 0.0
    torch.testing.assert_close(times_from_model_sigmas(ns, sig), t, rtol=1e-9, atol=1e-15)


def test_the_scheduler_and_the_sigma_lists_share_the_convention_and_the_stock_schedulers_agree():
    vp = presets.dpmpp_2m(6, NS, spacing="diffusers-linspace")  # ends at 0, integer timesteps
    s = SteptuneScheduler(schedule=vp.to_dict())
    listed = torch.tensor(k_diffusion_sigmas(vp), dtype=torch.float64)
    assert torch.allclose(s.sigmas.double(), listed, rtol=1e-6, atol=0)
    stock = DPMSolverMultistepScheduler(final_sigmas_type="zero")
    stock.set_timesteps(timesteps=s.timesteps.tolist())
    assert torch.allclose(stock.sigmas.double(), s.sigmas.double(), rtol=1e-5, atol=0)
    s.set_timesteps(sigmas=k_diffusion_sigmas(vp))  # reading them back: no complaint
    fl = presets.ddim(6, FLOW, t_start=0.999, final_zero=True)
    f = SteptuneScheduler(schedule=fl.to_dict())
    assert k_diffusion_sigmas(fl) == fl.times and torch.equal(f.sigmas, torch.tensor(fl.times, dtype=torch.float32))
    fm = FlowMatchEulerDiscreteScheduler(shift=1.0)
    fm.set_timesteps(sigmas=fl.times[:-1])
    assert torch.equal(fm.sigmas, f.sigmas) and torch.allclose(fm.timesteps.double(), f.timesteps.double(), rtol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f.set_timesteps(sigmas=fl.times)


def test_the_final_sigma_is_stated():
    to_zero = presets.dpmpp_2m(6, NS, final_zero=True)
    to_min = presets.dpmpp_2m(6, NS)
    elsewhere = presets.dpmpp_2m(6, NS, t_end=0.01)
    assert final_sigma(to_zero, NS) == (0.0, "zero")
    value, kind = final_sigma(to_min, NS)
    assert kind == "smallest training sigma" and value == pytest.approx(((1 - NS.alphas_cumprod[0])
                                                                          / NS.alphas_cumprod[0]) ** 0.5, rel=1e-9)
    assert final_sigma(elsewhere, NS)[1] == "other"
    assert final_sigma(presets.ddim(5, FLOW, t_start=0.999), FLOW) == (FLOW.t_min, "smallest training sigma")
    _, why = sigma_list_calls(to_min)
    assert f"ends at the smallest training sigma {value:.4g}" in why[0]
    assert sigma_list_calls(to_zero)[1] == []


@pytest.fixture
def db(tmp_path):
    store = connect(f"sqlite:///{tmp_path / 'db.sqlite'}")
    yield store
    store.close()


def test_the_json_provenance_says_what_the_schedule_was_tuned_for(db):
    problem = {"name": "toy", "noise": FLOW.to_dict(),
               "model": {"prediction": "flow", "time_input": "continuous", "time_scale": 1000.0}}
    db.create_study("src", method="s3", problem=problem)
    sched = presets.unipc_bh2(5, FLOW, t_start=0.999)
    t = db.add_trial("src", sched, status="complete", metrics={"rmse": 0.1})
    d = export_dict(t, db.get_study("src"))
    tuned = d["provenance"]["tuned_for"]
    assert d["provenance"]["version"] == 3
    assert tuned == {"sampler": "steptune", "state": "x = alpha(t) x0 + sigma(t) eps",
                     "model": {"prediction": "flow", "time_input": "continuous", "time_scale": 1000.0},
                     "noise": FLOW.to_dict(), "sigma": "t", "final_sigma": FLOW.t_min,
                     "final": "smallest training sigma"}
    again, prov = parse_export(json.dumps(d))
    assert tuned_model_conventions(again, prov) == problem["model"]
    # a version-1 file (no tuned_for) still reads; its problem's conventions are what it was tuned for
    old = json.loads(json.dumps(d))
    old["provenance"]["version"] = 1
    del old["provenance"]["tuned_for"]
    _, prov1 = parse_export(json.dumps(old))
    assert tuned_model_conventions(sched, prov1) == problem["model"]
    newer = json.loads(json.dumps(d))
    newer["provenance"]["version"] = 4
    with pytest.raises(ScheduleError, match="provenance version 4 is not supported"):
        parse_export(json.dumps(newer))
    bad = json.loads(json.dumps(d))
    bad["provenance"]["tuned_for"] = "flow"
    with pytest.raises(ScheduleError, match="provenance field 'tuned_for' must be an object"):
        parse_export(json.dumps(bad))
    db.create_study("bare", method="import")  # no problem stored: the model's conventions are unknown
    d2 = export_dict(db.add_trial("bare", sched, status="queued"), db.get_study("bare"))
    assert d2["provenance"]["tuned_for"]["model"] is None and d2["provenance"]["tuned_for"]["sigma"] == "t"


def test_a_scheduler_under_other_conventions_warns_once(tmp_path):
    sched = presets.unipc_bh2(5, NS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same = scheduler_for(sched, EPS)  # the conventions it was tuned for: quiet
    assert same.config.tuned_for["model"] == EPS and same.config.tuned_for["sigma"] == "sigma/alpha"
    same.save_pretrained(str(tmp_path))
    assert SteptuneScheduler.from_pretrained(str(tmp_path)).config.tuned_for == same.config.tuned_for
    tuned = same.config.tuned_for
    with pytest.warns(UserWarning, match=r"tuned for other model conventions \(prediction 'eps' -> 'v'\)") as w:
        SteptuneScheduler(schedule=sched.to_dict(), tuned_for=tuned, prediction_type="v_prediction")
    assert len(w) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same difference again: already said
        SteptuneScheduler(schedule=sched.to_dict(), tuned_for=tuned, prediction_type="v_prediction")
        # not given: the conventions it was tuned for
        assert SteptuneScheduler(schedule=sched.to_dict(), tuned_for=tuned).config.prediction_type == "epsilon"


def test_a_json_export_runs_in_diffusers_with_the_conventions_it_was_tuned_for(db, tmp_path):
    problem = {"name": "toy", "noise": FLOW.to_dict(),
               "model": {"prediction": "x0", "time_input": "continuous", "time_scale": 1.0}}
    db.create_study("src", method="s3", problem=problem)
    sched = presets.dpmpp_2m(5, FLOW, t_start=0.999)
    d = export_dict(db.add_trial("src", sched, status="complete"), db.get_study("src"))
    path = tmp_path / "e.json"
    path.write_text(json.dumps(d))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = scheduler_from_export(path)
    # not the flow defaults (velocity, 1000 t): the x0 model with t in [0, 1] it was tuned on
    assert (s.config.prediction_type, s.config.time_input, s.config.time_scale) == ("sample", "continuous", 1.0)
    assert s.config.tuned_for == d["provenance"]["tuned_for"] and s.schedule == sched
    old = json.loads(json.dumps(d))  # a version-1 export: the problem's conventions
    old["provenance"]["version"] = 1
    del old["provenance"]["tuned_for"]
    path.write_text(json.dumps(old))
    assert scheduler_from_export(path).config.tuned_for == d["provenance"]["tuned_for"]
    with pytest.warns(UserWarning, match=r"prediction 'x0' -> 'flow', time_scale 1.0 -> 1000.0"):
        scheduler_from_export(path, prediction_type="flow_prediction", time_scale=1000.0)


def test_convention_differences_are_named():
    tuned = {"prediction": "flow", "time_input": "continuous", "time_scale": 1.0, "sampler": "steptune"}
    assert convention_mismatch(tuned, dict(tuned)) == []
    assert convention_mismatch(tuned, {**tuned, "time_scale": 1000.0, "sampler": "k-diffusion"}) == [
        "time_scale 1.0 -> 1000.0", "sampler 'steptune' -> 'k-diffusion'"]
    assert convention_mismatch(None, tuned) == []  # unknown: nothing to compare
    assert convention_mismatch({"prediction": "eps", "time_input": "discrete", "time_scale": 1.0},
                               {"prediction": "eps", "time_input": "discrete", "time_scale": 7.0}) == []
    with pytest.warns(UserWarning, match="k-sampler: the schedule was tuned for other model conventions"):
        assert warn_other_conventions(tuned, {**tuned, "prediction": "x0"}, "k-sampler")
    assert not warn_other_conventions(tuned, tuned, "k-sampler")
