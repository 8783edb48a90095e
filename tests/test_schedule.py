"""Schedules as data: JSON round trip, exact NFE accounting, and validation that names step and field."""

import dataclasses
import json
import re

import pytest
import torch
from gaussian import gaussian_model

from steptune.space import Corrector, Model, Schedule, ScheduleError, Step, load_schedule, presets, sample, spacing
from steptune.space import noise as noise_mod
from steptune.space.schedule import SCHEMA_VERSION, evolve

MU = torch.tensor([0.3, -0.7, 1.0], dtype=torch.float64)
VAR = torch.tensor([0.05, 0.6, 1.4], dtype=torch.float64)

PRESET_OPTIONS = {
    "ddim": [{}, {"prediction": "noise"}, {"final_zero": True}],
    "dpm-solver++-2m": [{}, {"lower_order_final": False}],
    "dpm-solver++-3m": [{}, {"second_scale": 1.0}],
    "unipc-bh1": [{}, {"order": 3}, {"order": 1, "prediction": "noise"}],
    "unipc-bh2": [{}, {"order": 3}, {"final_zero": True}],
    "deis": [{}, {"order": 2}, {"order": 1}],
    "deis-tab": [{}, {"order": 2}, {"final_zero": True}],
    "dpm-solver-2": [{}],
    "dpm-solver-3": [{}],
    "dpm-solver++-2s": [{}],
    "euler": [{}, {"spacing": "logsnr"}],
    "heun": [{}, {"final_zero": True}],
}


def noise_cases():
    g = torch.Generator().manual_seed(0)
    betas = torch.linspace(1e-4, 0.03, 50, dtype=torch.float64) * (1 + 0.1 * torch.rand(50, generator=g))
    return [noise_mod.VPLinear(), noise_mod.EDM(), noise_mod.VPDiscrete.named("ddpm-linear"),
            noise_mod.VPDiscrete.from_betas(betas)]


def counting(ns):
    return gaussian_model(ns, MU, VAR)


def x_T(ns, batch=3):
    g = torch.Generator().manual_seed(5)
    return float(ns.sigma(ns.T)) * torch.randn(batch, len(MU), generator=g, dtype=torch.float64)


def test_options_cover_every_preset():
    assert set(PRESET_OPTIONS) == set(presets.names())


# ---------------------------------------------------------------- JSON


@pytest.mark.parametrize("ns", noise_cases(), ids=["vp-linear", "edm", "ddpm", "custom-table"])
@pytest.mark.parametrize("name", sorted(PRESET_OPTIONS))
def test_json_round_trip(name, ns):
    for opts in PRESET_OPTIONS[name]:
        for nfe in (5, 8):
            s = presets.build(name, nfe, ns, **opts)
            text = s.to_json()
            back = Schedule.from_json(text)
            assert back == s, f"{name} {opts} NFE {nfe}"
            assert back.to_json() == text
            d = json.loads(text)
            assert d["schema"] == "steptune.schedule" and d["version"] == SCHEMA_VERSION and d["nfe"] == s.nfe == nfe
            # the schedule rebuilt from JSON runs and gives the same samples
            if nfe == 5 and opts == PRESET_OPTIONS[name][0]:
                assert torch.equal(sample(counting(ns), x_T(ns), back), sample(counting(ns), x_T(ns), s))


def test_json_keeps_every_field(tmp_path):
    ns = noise_mod.VPLinear()
    steps = (Step(t=0.8), Step(t=0.6, order=2, relaxation="linear", relaxation_coef=0.03),
             Step(t=0.4, prediction="noise", order=3, points=(-3, -2), first_points=1, second_scale=0.7,
                  corrector=Corrector("implicit", order=3, relaxation="unipc-bh1", relaxation_coef=0.0)),
             Step(t=0.2, order=2, start=-2, points=(-1,), dc_ratio=0.93,
                  corrector=Corrector("pseudo", relaxation="0.5exp")),
             Step(t=0.1, order=3, prediction="noise", basis="t"),
             Step(t=0.01))
    s = Schedule(t_start=1.0, steps=steps, noise=ns.to_dict(), afs="zero", name="hand", conventions={"x": 1},
                 meta={"note": "ok"}).validate()
    path = s.save(tmp_path / "s.json")
    assert load_schedule(path) == s
    # default-valued fields other than the step's identity (t, prediction, order) are left out of the JSON form
    assert json.loads(s.to_json())["steps"][0] == {"t": 0.8, "prediction": "data", "order": 1}


def test_an_unknown_preset_option_is_named_with_the_options_there_are():
    with pytest.raises(ScheduleError) as e:
        presets.build("unipc-bh2:afs=zero", 5, noise_mod.VPLinear())
    assert str(e.value) == ("preset 'unipc-bh2' has no option 'afs'; its options are spacing, t_start, t_end, "
                            "final_zero, order, prediction, lower_order_final")


# ---------------------------------------------------------------- NFE accounting


@pytest.mark.parametrize("name", sorted(PRESET_OPTIONS))
def test_preset_nfe_is_exact(name):
    ns = noise_mod.VPLinear()
    for nfe in range(2, 13):
        s = presets.build(name, nfe, ns)
        model = counting(ns)
        sample(model, x_T(ns), s)
        assert s.nfe == nfe == model.calls, f"{name} NFE {nfe}: schedule says {s.nfe}, model called {model.calls}"


@pytest.mark.parametrize("nfe,final_zero", [(n, fz) for n in range(1, 16) for fz in (False, True) if n > 1 or not fz])
def test_heun_nfe_odd_and_even(nfe, final_zero):
    ns = noise_mod.EDM()
    s = presets.heun(nfe, ns, final_zero=final_zero)
    model = counting(ns)
    sample(model, x_T(ns), s)
    assert s.nfe == nfe == model.calls
    n_implicit = sum(st.corrector is not None for st in s.steps)
    assert n_implicit == nfe - len(s.steps)  # every Heun step costs one extra call


def _base(ns, n=6, **kw):
    times = spacing.make(ns, n, "logsnr").tolist()
    steps = [Step(t=times[1])] + [Step(t=t, order=2) for t in times[2:]]
    return Schedule(t_start=times[0], steps=tuple(steps), noise=ns.to_dict(), **kw)


def test_afs_saves_one_call():
    ns = noise_mod.VPLinear()
    s = _base(ns)
    for afs in ("zero", "mean"):
        a = dataclasses.replace(s, afs=afs).validate()
        assert a.nfe == s.nfe - 1
        model = counting(ns)
        model.data_mean = MU
        sample(model, x_T(ns), a)
        assert model.calls == a.nfe


@pytest.mark.parametrize("kind,extra", [("implicit", 1), ("pseudo", 0)])
def test_corrector_cost(kind, extra):
    ns = noise_mod.VPLinear()
    s = _base(ns)
    steps = list(s.steps)
    steps[1] = dataclasses.replace(steps[1], corrector=Corrector(kind))
    steps[3] = dataclasses.replace(steps[3], corrector=Corrector(kind, order=2))
    c = s.with_steps(steps).validate()
    assert c.nfe == s.nfe + 2 * extra
    model = counting(ns)
    sample(model, x_T(ns), c)
    assert model.calls == c.nfe


# ---------------------------------------------------------------- validation


def _with_step(i, **changes):
    def mutate(s):
        steps = list(s.steps)
        steps[i] = dataclasses.replace(steps[i], **changes)
        return s.with_steps(steps)
    return mutate


INVALID = [
    # (id, mutation of a valid 6-step schedule, step index, field)
    ("non-monotone", _with_step(2, t=0.99), 2, "t"),
    ("equal-times", lambda s: _with_step(3, t=s.steps[2].t)(s), 3, "t"),
    ("negative-time", _with_step(5, t=-0.1), 5, "t"),
    ("order-above-history", _with_step(1, order=3), 1, "order"),
    ("order-2-first-step", _with_step(0, order=2), 0, "order"),
    ("order-too-high", _with_step(4, order=5), 4, "order"),
    ("unknown-prediction", _with_step(2, prediction="velocity"), 2, "prediction"),
    ("corrector-on-last-step", _with_step(5, corrector=Corrector()), 5, "corrector"),
    ("unknown-corrector-kind", _with_step(2, corrector=Corrector("magic")), 2, "kind"),
    ("corrector-order-too-high", _with_step(2, corrector=Corrector(order=4)), 2, "order"),
    ("corrector-coef-not-finite", _with_step(2, corrector=Corrector(relaxation_coef=float("inf"))), 2,
     "relaxation_coef"),
    ("unknown-relaxation", _with_step(3, relaxation="bh3"), 3, "relaxation"),
    ("relaxation-on-order-1", _with_step(0, relaxation="unipc-bh2"), 0, "relaxation"),
    ("second-scale-on-order-2", _with_step(3, second_scale=0.5), 3, "second_scale"),
    ("start-out-of-history", _with_step(1, start=-3), 1, "start"),
    ("points-out-of-history", _with_step(2, points=(-4,)), 2, "order"),
    ("duplicate-points", _with_step(3, order=3, points=(-2, -2)), 3, "points"),
    ("first-points", _with_step(3, first_points=2), 3, "first_points"),
    ("dc-too-early", _with_step(1, dc_ratio=0.9), 1, "dc_ratio"),
    ("dc-not-positive", _with_step(4, dc_ratio=0.0), 4, "dc_ratio"),
    ("nan-time", _with_step(2, t=float("nan")), 2, "t"),
    ("unknown-basis", _with_step(3, basis="rho"), 3, "basis"),
    ("t-basis-with-relaxation", _with_step(3, basis="t", relaxation="dpmsolver-2"), 3, "basis"),
]


@pytest.mark.parametrize("mutate,step,field", [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_step_is_named(mutate, step, field):
    ns = noise_mod.VPLinear()
    bad = mutate(_base(ns).validate())
    with pytest.raises(ScheduleError) as info:
        bad.validate()
    msg = str(info.value)
    assert re.search(rf"\bstep {step}\b", msg), msg
    assert f"'{field}'" in msg, msg
    # sample() validates first: the model is never called
    model = counting(ns)
    with pytest.raises(ScheduleError):
        sample(model, x_T(ns), bad)
    assert model.calls == 0


def test_invalid_global_fields():
    ns = noise_mod.VPLinear()
    s = _base(ns)
    with pytest.raises(ScheduleError, match="'afs'"):
        dataclasses.replace(s, afs="guess").validate()
    with pytest.raises(ScheduleError, match="at least one step"):
        s.with_steps([]).validate()


def test_nfe_mismatch():
    ns = noise_mod.VPLinear()
    s = _base(ns).validate(nfe=6)
    with pytest.raises(ScheduleError) as info:
        s.validate(nfe=7)
    msg = str(info.value)
    assert "NFE 7" in msg and "6 model calls" in msg, msg


def test_sample_runs_nothing_when_schedule_does_not_fit_model():
    ns = noise_mod.VPLinear()
    s = presets.ddim(5, ns)
    model = counting(noise_mod.VPCosine())
    with pytest.raises(ScheduleError, match="noise schedule"):
        sample(model, x_T(ns), s)
    assert model.calls == 0
    model = counting(ns)  # 'mean' analytical first step without a data mean
    with pytest.raises(ScheduleError, match="data_mean"):
        sample(model, x_T(ns), dataclasses.replace(s, afs="mean"))
    assert model.calls == 0


# ---------------------------------------------------------------- JSON input validation


def _json(**changes):
    ns = noise_mod.VPLinear()
    d = json.loads(_base(ns).to_json())
    d.update(changes)
    return d


def test_newer_schema_version_is_refused():
    d = _json(version=SCHEMA_VERSION + 1)
    with pytest.raises(ScheduleError) as info:
        Schedule.from_json(json.dumps(d), where="s.json")
    msg = str(info.value)
    assert "s.json" in msg and "newer" in msg and f"version {SCHEMA_VERSION + 1}" in msg and "upgrade" in msg, msg


def test_unknown_step_field_is_named():
    d = _json()
    d["steps"][2]["ordr"] = 2
    with pytest.raises(ScheduleError) as info:
        Schedule.from_json(json.dumps(d))
    assert re.search(r"\bstep 2\b", str(info.value)) and "'ordr'" in str(info.value)
    d = _json()
    d["steps"][1]["corrector"] = {"kind": "pseudo", "ordr": 3}
    with pytest.raises(ScheduleError) as info:
        Schedule.from_json(json.dumps(d))
    assert re.search(r"\bstep 1\b", str(info.value)) and "'ordr'" in str(info.value)


def test_bad_json_inputs():
    with pytest.raises(ScheduleError, match="not valid JSON"):
        Schedule.from_json("{", where="x.json")
    with pytest.raises(ScheduleError, match="not a steptune schedule"):
        Schedule.from_json(json.dumps({"t_start": 1.0, "steps": []}))
    with pytest.raises(ScheduleError, match="'nfe'"):
        Schedule.from_json(json.dumps(_json(nfe=99)))
    with pytest.raises(ScheduleError, match="'version'"):
        Schedule.from_json(json.dumps(_json(version="1")))


def test_load_schedule_names_file_step_and_field(tmp_path):
    """A user's invalid schedule file: the message says which file, which step and which field."""
    d = _json()
    d["steps"][3]["t"] = 5.0
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ScheduleError) as info:
        load_schedule(path)
    msg = str(info.value)
    assert re.search(r"\bstep 3\b", msg) and "'t'" in msg, msg
    assert str(path) in msg, f"the message does not name the file: {msg!r}"
    with pytest.raises(ScheduleError, match="no such schedule file"):
        load_schedule(tmp_path / "missing.json")


def test_model_rejects_unknown_conventions():
    ns = noise_mod.VPLinear()
    with pytest.raises(ValueError, match="prediction"):
        Model(lambda x, t: x, ns, prediction="score")
    with pytest.raises(ValueError, match="time_input"):
        Model(lambda x, t: x, ns, time_input="frames")


def test_presets_do_not_depend_on_torch_default_dtype():
    """A schedule built in a process with float32 as torch's default dtype is the same schedule (the
    timesteps are float64 throughout), so a job resumed in another process asks for the same trials."""
    ns = noise_mod.VPLinear()
    built = {}
    old = torch.get_default_dtype()
    try:
        for dtype in (torch.float32, torch.float64):
            torch.set_default_dtype(dtype)
            built[dtype] = [presets.build(name, nfe, ns).to_json() for name in presets.names() for nfe in (5, 8)]
    finally:
        torch.set_default_dtype(old)
    assert built[torch.float32] == built[torch.float64]


def test_a_schedule_changed_from_a_checked_one_is_checked_again():
    """A schedule keeps its verdict on its steps; a copy with other steps or times is checked anew, one with
    other labels keeps it."""
    s = presets.dpmpp_2m(6, noise_mod.VPLinear()).validate()
    third = evolve(s.steps[3], order=3, start=-4)  # history point -5 at step 3, where only 4 exist
    with pytest.raises(ScheduleError, match="step 3: field 'order' is 3 but the step needs history point -5"):
        evolve(s, steps=(*s.steps[:3], third, *s.steps[4:])).validate()
    with pytest.raises(ScheduleError, match="step 2: field 't'"):
        evolve(s, steps=(*s.steps[:2], s.steps[2].at(s.steps[1].t), *s.steps[3:])).validate()
    with pytest.raises(ScheduleError, match="step 3: field 'start' is -5"):
        evolve(s, steps=(*s.steps[:3], evolve(s.steps[3], start=-5), *s.steps[4:])).validate()
    assert evolve(s, name="renamed", meta={"note": 1}).validate(nfe=6).name == "renamed"
    with pytest.raises(ScheduleError, match="costs 6 model calls but NFE 5"):
        s.validate(nfe=5)


def test_a_pure_noise_start_is_checked_against_the_noise_dict_as_it_is_now():
    """The alpha(t_start) = 0 check is kept per noise dict; a dict changed in place is asked again."""
    shared = noise_mod.VPLinear().to_dict()
    s = Schedule(t_start=1.0, steps=(Step(t=0.5, prediction="noise"), Step(t=0.001)), noise=shared)
    s.validate()
    s.validate()  # asked twice: the same verdict
    shared.clear()
    shared.update(noise_mod.RectifiedFlow().to_dict())  # alpha(1) = 0 now: noise prediction from there is refused
    with pytest.raises(ScheduleError, match="alpha = 0"):
        s.validate()
