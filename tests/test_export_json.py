"""JSON export/import with provenance, and the k-diffusion / ComfyUI sigma lists."""

import json

import pytest
import torch
from gaussian import gaussian_model

import steptune.exports
import steptune.storage
from steptune.exports import (
    DuplicateImport,
    comfyui_sigmas,
    export_dict,
    import_schedule,
    k_diffusion_sigmas,
    parse_export,
    sigma_list_calls,
)
from steptune.space import ScheduleError, load_schedule, noise, presets, sample
from steptune.storage import connect

NS = noise.VPDiscrete.named("ddpm-linear")
PROBLEM = {"name": "toy", "noise": NS.to_dict(), "model": {"prediction": "eps", "time_input": "discrete"}}


@pytest.fixture
def db(tmp_path):
    store = connect(f"sqlite:///{tmp_path / 'db.sqlite'}")
    store.create_study("src", method="s3", problem=PROBLEM)
    yield store
    store.close()


def _exported(db) -> dict:
    sched = presets.unipc_bh2(6, NS, spacing="diffusers-linspace")
    t = db.add_trial("src", sched, status="complete", metrics={"rmse": 0.125, "sw": 0.5}, fidelity="cheap",
                     bank="heldout", n_samples=256)
    return export_dict(t, db.get_study("src"))


def test_export_is_the_schedule_dict_plus_provenance(db, tmp_path):
    d = _exported(db)
    sched = presets.unipc_bh2(6, NS, spacing="diffusers-linspace")
    assert {k: v for k, v in d.items() if k != "provenance"} == sched.to_dict()
    p = d["provenance"]
    assert (p["version"], p["study"], p["method"], p["trial_number"], p["metric"]) == (3, "src", "s3", 0, "rmse")
    assert p["problem"]["identity"] == PROBLEM and p["problem"]["conventions"] == PROBLEM["model"]
    assert (p["score"], p["metrics"], p["fidelity"], p["bank"], p["n_samples"]) == (
        0.125, {"rmse": 0.125, "sw": 0.5}, "cheap", "heldout", 256)
    assert p["steptune"] and p["exported"]
    # the file is also a plain schedule file for the rest of steptune
    path = tmp_path / "e.json"
    path.write_text(json.dumps(d))
    assert load_schedule(path) == sched
    s2, prov = parse_export(json.dumps(d))
    assert s2 == sched and prov == p


def test_import_keeps_metrics_for_the_same_problem_and_queues_otherwise(db, tmp_path):
    path = tmp_path / "e.json"
    path.write_text(json.dumps(_exported(db)))
    t = import_schedule(db, path, "copy")  # new study: takes the problem and metrics from the provenance
    assert (t.status, t.score, t.metrics["sw"], t.fidelity, t.n_samples) == ("complete", 0.125, 0.5, "cheap", 256)
    assert db.get_study("copy").problem["identity"] == PROBLEM and db.get_study("copy").method == "import"
    assert db.get_study("copy").kind == "import"
    with pytest.raises(DuplicateImport, match="study 'src' already holds this schedule as trial id"):
        import_schedule(db, path, "src")  # where it came from
    assert import_schedule(db, path, "src", allow_duplicates=True).status == "complete"  # same problem
    db.create_study("other", problem={**PROBLEM, "name": "other-model"})
    assert import_schedule(db, path, "other").status == "queued"  # metrics of another problem are not kept
    assert import_schedule(db, path, "copy", queue=True, allow_duplicates=True).status == "queued"
    hand = tmp_path / "hand.json"
    presets.ddim(4, NS).save(hand)
    t = import_schedule(db, hand, "hand")
    assert (t.status, t.nfe, t.score) == ("queued", 4, None)
    assert db.best("copy", 6).id == db.trials("copy")[0].id


@pytest.mark.parametrize("kind", ["relaxation", "dc-fit"])
def test_import_refuses_a_study_of_a_kind_without_schedules(db, tmp_path, kind):
    path = tmp_path / "e.json"
    path.write_text(json.dumps(_exported(db)))
    db.create_study("made", kind=kind)
    with pytest.raises(ScheduleError, match=f"study 'made' is a {kind} study; import the schedule into another"):
        import_schedule(db, path, "made")
    assert db.count_trials("made") == 0


@pytest.mark.parametrize("name", sorted(steptune.storage.MOVED_TO_EXPORTS))
def test_the_old_storage_import_of_an_export_name_still_works_and_names_the_new_one(name):
    with pytest.warns(DeprecationWarning, match=f"use 'from steptune.exports import {name}'"):
        old = getattr(steptune.storage, name)
    assert old is getattr(steptune.exports, name)
    with pytest.raises(AttributeError):
        steptune.storage.no_such_name  # noqa: B018


def test_import_refuses_a_schedule_for_another_noise_schedule(db, tmp_path):
    path = tmp_path / "vp.json"
    presets.ddim(4, noise.VPLinear()).save(path)
    with pytest.raises(ScheduleError, match="import it into another study") as refused:
        import_schedule(db, path, "src")
    # and says how to write it for the study's own noise schedule, by the name the commands take
    assert "write it for ddpm-linear (a preset: steptune schedule preset:NAME --nfe N --noise ddpm-linear)" in str(
        refused.value)
    assert noise.get("ddpm-linear") == NS


def _bad_exports(d: dict) -> dict:
    cases = {}
    cases["malformed"] = (json.dumps(d)[:-3], ["not valid JSON", "line 1"])
    e = dict(d, version=2)
    cases["newer_version"] = (json.dumps(e), ["schema version 2", "upgrade steptune"])
    e = dict(d, version=0)
    cases["older_version"] = (json.dumps(e), ["schema version 0", "not supported"])
    e = dict(d, colour="red")
    cases["unknown_top_field"] = (json.dumps(e), ["unknown field 'colour' at the top level"])  # nothing near it
    e = json.loads(json.dumps(d))
    e["steps"][1]["ordr"] = 2
    cases["unknown_step_field"] = (json.dumps(e), ["step 1", "unknown field 'ordr'; did you mean 'order'?"])
    e = json.loads(json.dumps(d))
    e["provenance"]["sceore"] = 1
    cases["unknown_provenance_field"] = (json.dumps(e), ["unknown provenance field 'sceore'; did you mean 'score'?"])
    e = dict(d, nfe=d["nfe"] + 2)
    cases["nfe_mismatch"] = (json.dumps(e), ["'nfe' says 8", "6 model calls"])
    e = dict(d, schema="other")
    cases["not_a_schedule"] = (json.dumps(e), ["not a steptune schedule"])
    return cases


def test_parse_export_refuses_bad_files_with_one_sentence(db):
    d = _exported(db)
    for case, (text, words) in _bad_exports(d).items():
        with pytest.raises(ScheduleError) as e:
            parse_export(text, where="f.json")
        msg = str(e.value)
        assert msg.startswith("f.json: ") and "\n" not in msg, (case, msg)
        for w in words:
            assert w in msg, (case, w, msg)


def test_k_diffusion_and_comfyui_sigmas():
    s = presets.dpmpp_2m(8, NS, spacing="diffusers-linspace")  # ends at t = 0
    sig = k_diffusion_sigmas(s)
    want = NS.edm_sigma(torch.tensor(s.times, dtype=torch.float64)).tolist()
    assert len(sig) == len(s.times) and sig[-1] == 0.0
    assert sig[:-1] == want[:-1] and all(a > b for a, b in zip(sig, sig[1:]))
    s2 = presets.dpmpp_2m(8, NS)  # ends at t_min > 0: a trailing 0 is appended
    sig2 = k_diffusion_sigmas(s2)
    assert len(sig2) == len(s2.times) + 1 and sig2[-1] == 0.0 and sig2[-2] > 0
    text = comfyui_sigmas(s)
    assert [float(x) for x in text.split(",")] == sig
    assert "\n" not in text and text.count(",") == len(sig) - 1
    assert "e" not in comfyui_sigmas(presets.dpmpp_2m(8, noise.VPLinear(t_min=1e-9)))  # plain decimals, tiny ones too


@pytest.mark.parametrize("ns", [noise.VPLinear(), noise.RectifiedFlow()], ids=["vp", "flow"])
def test_a_sigma_list_sampler_on_the_exported_sigmas_follows_the_schedule(ns):
    """k-diffusion's Euler (as ComfyUI runs it) on the exported list is steptune's Euler on the same times:
    for a VP model on x / alpha with sigma / alpha, for a flow model (ComfyUI's CONST sampling) on x itself
    with sigma = t; then one more call, from the schedule's last time to 0."""
    mu, var = torch.tensor([0.5, -1.0]), torch.tensor([0.3, 2.0])
    model = gaussian_model(ns, mu, var)
    flow = ns.kind == "flow"
    if flow:  # a flow schedule may start at t = 1 (pure noise), where sigma/alpha would be infinite
        assert k_diffusion_sigmas(presets.euler(6, ns, spacing="time-uniform", t_start=1.0))[0] == 1.0
    s = presets.euler(6, ns, spacing="time-uniform", t_start=0.99)  # an eps model has no x0 at alpha = 0
    sig = k_diffusion_sigmas(s)
    assert sig[0] == (0.99 if flow else float(ns.edm_sigma(0.99)))
    calls, why = sigma_list_calls(s)
    assert calls == len(sig) - 1 == s.nfe + 1 and len(why) == 1

    def denoised(x, sigma):  # k-diffusion's D(x, sigma) for the model, in the list's variable
        t = sigma if flow else float(ns.t_of_edm_sigma(torch.tensor(sigma, dtype=torch.float64)))
        a, sd = float(ns.alpha(t)), float(ns.sigma(t))
        return model.predict(x if flow else a * x, t, a, sd)[1]

    x_T = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a0, a_end = (float(ns.alpha(s.times[k])) for k in (0, -1))
    x = x_T if flow else x_T / a0
    for i in range(s.nfe):  # k_diffusion.sampling.sample_euler
        x = x + (x - denoised(x, sig[i])) / sig[i] * (sig[i + 1] - sig[i])
    want = sample(model, x_T, s)
    torch.testing.assert_close(x, want if flow else want / a_end, rtol=1e-10, atol=1e-10)
