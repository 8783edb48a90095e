"""Model plug-ins: module:factory through eval and search, diffusers UNet wrappers, converged references,
bad factories."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gaussian import eps_fn, exact_solution

from steptune.cli import main
from steptune.evaluators import Evaluator, Plug, PluginError, load_problem
from steptune.evaluators.neural_reference import ReferenceSettings, converged_states
from steptune.space import Model, presets, sample
from steptune.space import noise as noise_mod
from steptune.storage import connect

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


def nan_mid_factory():
    """Finite at the times the load check probes, NaN in between: only the reference solve meets it."""
    def eps(x, t):
        out = 0.1 * x
        out[(t > 0.6) & (t < 0.7)] = math.nan
        return out
    return Plug(network=eps, shape=(4,), noise="vp-linear", prediction="eps", time_input="continuous")


def raising_mid_factory():
    """Passes the load check; raises at times between the ones it probes."""
    def eps(x, t):
        if bool(((t > 0.6) & (t < 0.7)).any()):
            raise RuntimeError("no weights for this time")
        return 0.1 * x
    return Plug(network=eps, shape=(4,), noise="vp-linear", prediction="eps", time_input="continuous")


def guided_factory():
    return Plug(network=lambda x, t, e=None: eps_fn(NS, MU, VAR)(x, t) + 0.01 * e, shape=(4,), noise="vp-linear",
                prediction="eps", time_input="continuous", guidance_scale=2.0,
                cond_kwargs={"e": torch.ones(1, 4)}, uncond_kwargs={"e": torch.zeros(1, 4)})


class LabelledNet(torch.nn.Module):
    """A trainable-looking module (its parameters require grad) whose labels come from the sample index through
    ``sample_kwargs``; called without them it is unconditional."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.emb = torch.nn.Embedding(10, 4)

    @staticmethod
    def sample_kwargs(n):
        return {"labels": torch.arange(n) % 10}

    def forward(self, x, t, labels=None):
        label = 0.0 if labels is None else self.emb(labels)
        return 0.1 * torch.tanh(self.lin(x) + label + t[:, None])


def labelled_factory():
    torch.manual_seed(0)
    return Plug(network=LabelledNet().float(), shape=(4,), noise="vp-linear", prediction="eps",
                time_input="continuous")


SPEC = "test_plugins:gaussian_factory"


@pytest.mark.usefixtures("float64")  # compared with a reference to round-off
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


def test_sweep_runs_a_plugged_model_against_the_closed_form(tmp_path, capsys):
    """``sweep --model``: each preset's held-out RMSE is the one measured against the exact ODE solution, and the
    files are named without the factory's colon."""
    rc = main(["sweep", "--model", SPEC, "--nfe", "4,6", "--presets", "ddim,unipc-bh2", "--json",
               "--cache", str(tmp_path), "--out", str(tmp_path / "sw")])
    assert rc == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    prob = load_problem(SPEC)
    ev = Evaluator(prob, cache_dir=None, n_train=64, n_heldout=256)
    x_T = ev.x_T("heldout")
    exact = exact_solution(NS, MU, VAR, x_T, prob.t_start, prob.t_end)
    assert {(r["preset"], r["nfe"]) for r in rows} == {(p, n) for p in ("ddim", "unipc-bh2") for n in (4, 6)}
    for r in rows:
        sched = presets.build(r["preset"], r["nfe"], NS, t_start=prob.t_start, t_end=prob.t_end)
        x = sample(prob.model, x_T, sched)
        assert r["rmse"] == pytest.approx(float((x - exact).pow(2).mean().sqrt()), rel=1e-3), r
    assert sorted(p.name for p in (tmp_path / "sw").iterdir()) == ["test_plugins-gaussian_factory-vp-linear.json",
                                                                  "test_plugins-gaussian_factory-vp-linear.md"]


def retrained_factory():
    """The Gaussian's network with its mean moved by $STEPTUNE_TEST_SHIFT: the same model with other weights."""
    shift = float(os.environ.get("STEPTUNE_TEST_SHIFT", "0"))
    return Plug(network=eps_fn(NS, MU + shift, VAR), shape=(4,), noise="vp-linear", prediction="eps",
                time_input="continuous")


def test_a_study_scored_on_other_weights_takes_no_new_trials(tmp_path, capsys, monkeypatch):
    """A resume, a refinement or a sweep of a network whose weights changed since the study was scored would mix the
    scores of two models in one study: each is refused, naming the fingerprint that differs, and writes nothing."""
    from steptune.storage import connect

    url = f"sqlite:///{tmp_path / 'x.db'}"
    argv = ["search", "--model", "test_plugins:retrained_factory", "--nfe", "4", "--method", "random",
            "--cheap-samples", "16", "--heldout-samples", "32", "--confirm", "1", "--out", str(tmp_path), "--cache",
            str(tmp_path), "--study", "s", "--db", url, "--json"]
    sweep = ["sweep", "--model", "test_plugins:retrained_factory", "--nfe", "4", "--presets", "ddim", "--study", "p",
             "--db", url, "--out", str(tmp_path / "sw"), "--cache", str(tmp_path)]
    assert main([*argv, "--budget", "4"]) == 0 and main([*sweep, "--nfe", "3"]) == 0
    capsys.readouterr()
    with connect(url) as db:
        before = {study: [(t.id, t.status, t.score) for t in db.trials(study)] for study in ("s", "p")}
    monkeypatch.setenv("STEPTUNE_TEST_SHIFT", "0.1")
    for study, command in (("s", [*argv, "--budget", "8"]), ("s", ["refine", "--study", "s", "--db", url, "--iters",
                                                                  "2"]), ("p", sweep)):
        assert main(command) == 2, command[0]
        err = capsys.readouterr().err
        assert err.startswith(f"error: study '{study}' was scored with other network weights than the "
                              "test_plugins:retrained_factory built here (data.network_sha256 "), err
        assert "then, " in err and err.rstrip().endswith("give a new study name"), err
        with connect(url) as db:
            assert {s: [(t.id, t.status, t.score) for t in db.trials(s)] for s in ("s", "p")} == before
    monkeypatch.setenv("STEPTUNE_TEST_SHIFT", "0")  # the weights it was scored with: it resumes
    assert main([*argv, "--budget", "8"]) == 0
    with connect(url) as db:
        assert len(db.trials("s")) > len(before)


def unseeded_factory():
    """A network whose weights are drawn anew at every build: each process that builds it has another model."""
    return Plug(network=eps_fn(NS, MU + 0.01 * torch.randn(4), VAR), shape=(4,), noise="vp-linear", prediction="eps",
                time_input="continuous")


def test_a_run_whose_evaluator_built_other_weights_stops_before_scoring_anything(tmp_path, capsys):
    """The evaluators build the problem themselves (on Ray, on other machines): one that built another model than
    the driver, whose identity the study stores, is refused before anything is scored."""
    from steptune.storage import connect

    url = f"sqlite:///{tmp_path / 'x.db'}"
    code = main(["search", "--model", "test_plugins:unseeded_factory", "--nfe", "4", "--method", "random", "--budget",
                 "4", "--cheap-samples", "16", "--heldout-samples", "32", "--confirm", "1", "--out", str(tmp_path),
                 "--cache", str(tmp_path), "--study", "u", "--db", url])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(
        "error: the evaluator local@") and " built test_plugins:unseeded_factory with other network weights than this "\
        "driver (data.network_sha256: " in err and err.rstrip().endswith(
        "test_plugins:unseeded_factory returned other weights there: give every evaluator the same checkpoint (and "
        "seed a network it builds at random)"), err
    with connect(url) as db:  # nothing scored, and the study this run made is not left behind empty
        assert db.studies() == []


def test_settings_an_older_identity_does_not_hold_are_not_a_change():
    """Studies scored before an identity gained a key resume; a value that differs is named by its dotted key."""
    from steptune.study_problem import first_change

    stored = {"name": "p", "data": {"a": 1.5, "sha": "x"}}
    newer = {"name": "p", "data": {"a": 1.5, "sha": "x", "new": 2}, "reference": {"tol": 1}}
    assert first_change(stored, newer) is None
    assert first_change(stored, {"name": "p", "data": {"a": 1.5, "sha": "y"}}) == "data.sha"
    assert first_change(stored, {"name": "q", "data": {"a": 2.0}}) == "name"


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
    ("test_plugins:missing", ["test_plugins:missing", "'test_plugins' has no attribute 'missing'"]),
    ("test_plugins:wrong_shape_factory", ["test_plugins:wrong_shape_factory", "shape"]),
    ("test_plugins:nan_factory", ["test_plugins:nan_factory", "NaN"]),
    ("test_plugins:raising_factory", ["test_plugins:raising_factory", "checkpoint missing"]),
    ("test_plugins:nan_mid_factory", ["reference", "NaN", "near t = 0.6"]),
    ("test_plugins", ["module:factory"]),
    ("test_plugins:bare_network_factory", ["sample shape is unknown", "--shape 3,32,32", "shape = [3, 32, 32]"]),
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


MY_MODELS = """
from steptune.evaluators import Plug


def load():
    return Plug(network=lambda x, t: 0.1 * x, shape=(4,), noise="vp-linear", prediction="eps",
                time_input="continuous")
"""


def test_the_installed_command_imports_a_model_from_the_folder_it_runs_in(tmp_path):
    """A user's module beside them, as ``python -m`` would find it: the console script has no current folder on its
    path of its own. A module that is nowhere gets one line saying where it was looked for and what to do."""
    steptune = Path(sys.executable).with_name("steptune")
    assert steptune.is_file(), f"no console script at {steptune}: the package is not installed in this environment"
    (tmp_path / "my_models.py").write_text(MY_MODELS)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def run(spec):
        return subprocess.run([str(steptune), "eval", "--model", spec, "--schedule", "preset:ddim", "--nfe", "4",
                               "--json", "--cache", "cache"], cwd=tmp_path, env=env, capture_output=True, text=True)

    done = run("my_models:load")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["results"][0]["status"] == "complete"
    missing = run("their_models:load")
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        "error: model 'their_models:load': cannot import 'their_models': there is no 'their_models' in the current "
        f"folder ({tmp_path.resolve()}) or on the Python path; run steptune from the folder that holds "
        "their_models/ or their_models.py, or add that folder to PYTHONPATH"]


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


def test_a_module_that_requires_grad_runs_and_its_per_sample_labels_survive_batching(tmp_path, capsys):
    assert main(["eval", "--model", "test_plugins:labelled_factory", "--schedule", "preset:unipc-bh2", "--nfe", "5",
                 "--samples", "16", "--cache", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["status"] == "complete"
    prob = load_problem("test_plugins:labelled_factory")
    ev = Evaluator(prob, cache_dir=tmp_path, n_train=16)
    scheds = [presets.build(p, 6, prob.noise, t_start=prob.t_start, t_end=prob.t_end)
              for p in ("unipc-bh2", "dpm-solver++-2m", "ddim")]
    one_by_one = [ev.evaluate(s).metrics["rmse"] for s in scheds]
    batched = [r.metrics["rmse"] for r in ev.evaluate_many(scheds)]
    assert batched == pytest.approx(one_by_one, rel=1e-5)


def test_per_sample_labels_reach_every_call_of_the_network():
    prob = load_problem("test_plugins:labelled_factory")
    x_T = torch.randn(12, 4, generator=torch.Generator().manual_seed(0))
    sched = presets.build("unipc-bh2", 6, prob.noise, t_start=prob.t_start, t_end=prob.t_end)
    net = prob.model.fn.network
    labels = torch.arange(12) % 10
    explicit = Model(lambda x, t, **kw: net(x, t, **kw), prob.noise, prediction="eps", time_input="continuous",
                     cond_kwargs={"labels": labels})
    unlabelled = Model(lambda x, t: net(x, t), prob.noise, prediction="eps", time_input="continuous")
    with torch.no_grad():
        got = sample(prob.model, x_T, sched)
        assert torch.equal(got, sample(explicit, x_T, sched))
        assert not torch.allclose(got, sample(unlabelled, x_T, sched))


def test_the_identity_follows_conditioning_captured_modules_and_unsaved_buffers():
    from steptune.evaluators.plugins import network_fingerprint, plugin_problem

    def guided(value):
        return lambda: Plug(network=lambda x, t, e=None: 0.1 * x + e, shape=(4,), noise="vp-linear",
                            guidance_scale=2.0, cond_kwargs={"e": torch.full((1, 4), value)},
                            uncond_kwargs={"e": torch.zeros(1, 4)})

    import types
    mod = types.ModuleType("guided_plugs")
    mod.one, mod.two = guided(1.0), guided(-2.0)
    import sys
    sys.modules["guided_plugs"] = mod
    try:
        a, b = (plugin_problem(f"guided_plugs:{n}").identity() for n in ("one", "two"))
    finally:
        del sys.modules["guided_plugs"]
    assert a["data"]["conditioning_sha256"] != b["data"]["conditioning_sha256"]

    def closing_over(seed):
        torch.manual_seed(seed)
        net = torch.nn.Linear(4, 4)
        return lambda x, t: net(x)

    assert network_fingerprint(closing_over(0)) != network_fingerprint(closing_over(1))
    assert network_fingerprint(closing_over(0)) == network_fingerprint(closing_over(0))

    class Buffered(torch.nn.Module):
        def __init__(self, v):
            super().__init__()
            self.register_buffer("scale", torch.tensor([v]), persistent=False)

    assert network_fingerprint(Buffered(1.0)) != network_fingerprint(Buffered(2.0))


def test_torch_network_picks_the_modules_dtype_keeps_time_precise_and_unwraps_dicts():
    from steptune.evaluators.plugins import TorchNetwork

    class Probe(torch.nn.Module):
        def __init__(self, dtype, gain_first=False):
            super().__init__()
            if gain_first:
                self.gain = torch.nn.Parameter(torch.tensor(1.0, dtype=torch.float32))
            self.lin = torch.nn.Linear(4, 4).to(dtype)
            self.seen = None

        def forward(self, x, t):
            self.seen = (x.dtype, t.dtype, t.clone())
            return {"sample": self.lin(x)}

    for dtype in (torch.bfloat16, torch.float16):
        probe = Probe(dtype, gain_first=True)  # a 0-d float32 parameter first; most of the weights in dtype
        out = TorchNetwork(probe)(torch.ones(2, 4, dtype=torch.float64), torch.tensor([999.0, 332.3]))
        x_dtype, t_dtype, t = probe.seen
        assert x_dtype == dtype and t_dtype == torch.float32 and t.tolist() == pytest.approx([999.0, 332.3])
        assert out.dtype == torch.float64 and out.shape == (2, 4)
        assert not any(p.requires_grad for p in probe.parameters())

    class Buffers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("w", torch.full((4,), 2.0, dtype=torch.float32))

        def forward(self, x, t):
            return x * self.w

    x = torch.ones(2, 4, dtype=torch.float64)
    assert torch.equal(TorchNetwork(Buffers())(x, torch.zeros(2)), 2 * x)


def test_dc_fit_records_the_guidance_a_plugged_model_brings(tmp_path, capsys):
    assert main(["dc", "fit", "--problem", "test_plugins:guided_factory", "--nfe", "5", "--method", "greedy",
                 "--greedy-iters", "1", "--fit-samples", "2", "--cache", str(tmp_path), "--json"]) == 0
    assert [r["cfg"] for r in json.loads(capsys.readouterr().out)["rows"]] == [2.0]


def test_dc_predict_on_a_guided_study_asks_for_the_guidance(tmp_path, capsys):
    """Without --guidance it said the NFE lay outside the fitted configurations (it did not) and gave a fit command
    without the guidance."""
    db = f"sqlite:///{tmp_path / 'g.db'}"
    assert main(["dc", "fit", "--problem", "test_plugins:guided_factory", "--nfe", "5", "--guidance", "1.5,3",
                 "--method", "greedy", "--greedy-iters", "1", "--fit-samples", "2", "--cache", str(tmp_path),
                 "--study", "g", "--db", db]) == 0
    with connect(db) as store:
        fits = sum(1 for t in store.trials("g") if "dc_fit" in t.info)
        others = store.count_trials("g") - fits
    assert fits == 2 and others > 0  # a fit per guidance scale; the solver's baselines beside them
    assert (f"stored 2 fitted schedules and {others} of the solver's baselines in study 'g'"
            in capsys.readouterr().err)
    assert main(["dc", "predict", "--study", "g", "--nfe", "5", "--db", db]) == 2
    assert capsys.readouterr().err.strip() == ("error: study 'g' was fitted with guidance (CFG 1.5, 3); give the "
                                               "configuration's --guidance")
    assert main(["dc", "predict", "--study", "g", "--nfe", "5", "--guidance", "2", "--fit", "greedy", "--db", db,
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["between_cfg"] == [1.5, 3]


def rect_unet_factory():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=(8, 12), in_channels=2, out_channels=2, layers_per_block=1,
                                 block_out_channels=(8, 16), norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D")).float().eval()


def test_a_non_square_diffusers_unet_gets_its_height_and_width():
    assert load_problem("test_plugins:rect_unet_factory", time_input="discrete").shape == (2, 8, 12)


def test_eval_names_the_schedule_a_model_raised_on_in_one_line(tmp_path, capsys):
    rc = main(["eval", "--model", "test_plugins:raising_mid_factory", "--schedule", "preset:ddim", "--nfe", "20",
               "--cache", str(tmp_path)])
    msg = capsys.readouterr().err.strip()
    assert rc == 2 and len(msg.splitlines()) == 1
    assert msg.startswith("error: preset:ddim at NFE 20: the model raised RuntimeError: no weights for this time (at ")


def two_states_factory():
    """Passes the load check (two states); returns two predictions whatever the batch."""
    return Plug(network=lambda x, t: 0.1 * x[:2], shape=(4,), noise="vp-linear", prediction="eps",
                time_input="continuous")


@pytest.mark.parametrize("command", [["sweep", "--presets", "ddim", "--nfe", "4"],
                                     ["search", "--nfe", "4", "--budget", "2", "--method", "random", "--study", "r"]])
def test_a_network_that_raises_in_the_reference_solve_is_named_in_one_line(tmp_path, capsys, command):
    extra = ["--db", f"sqlite:///{tmp_path / 'x.db'}", "--out", str(tmp_path)] if command[0] == "search" else \
        ["--out", str(tmp_path)]
    rc = main([command[0], "--model", "test_plugins:raising_mid_factory", *command[1:], "--cache", str(tmp_path),
               *extra])
    msg = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2
    line = next(i for i, text in enumerate(Path(__file__).read_text().splitlines(), start=1)
                if 'raise RuntimeError("no weights for this time")' in text)  # the network's own line
    assert msg.startswith("error: reference: the model raised RuntimeError: no weights for this time (at "
                          f"test_plugins.py:{line}) near t = 0.")


def test_a_search_whose_reference_fails_leaves_no_study_it_made_and_keeps_one_it_resumed(tmp_path, capsys):
    """A run that made its study and failed before writing to it drops it (a later run starts afresh, as if the
    failed one had not run); a study that was there before is kept as it was."""
    db = f"sqlite:///{tmp_path / 'x.db'}"
    with connect(db) as store:
        store.create_study("before", kind="search", method="random")
    for name in ("new", "before"):
        rc = main(["search", "--model", "test_plugins:raising_mid_factory", "--nfe", "4", "--budget", "2", "--method",
                   "random", "--study", name, "--cache", str(tmp_path), "--db", db, "--out", str(tmp_path)])
        assert rc == 2 and "error: reference: the model raised" in capsys.readouterr().err
    with connect(db) as store:
        assert [s.name for s in store.studies()] == ["before"]
        assert store.trials("before") == [] and "driver" not in store.get_study("before").config


def test_a_network_that_returns_another_batch_is_named_in_one_line(tmp_path, capsys):
    rc = main(["eval", "--model", "test_plugins:two_states_factory", "--schedule", "preset:ddim", "--nfe", "4",
               "--cache", str(tmp_path)])
    assert rc == 2 and capsys.readouterr().err.strip() == (
        "error: preset:ddim at NFE 4: the network returned shape (2, 4) for states of shape (256, 4); it must return "
        "one prediction of the state's shape per state")


def test_a_cached_reference_is_solved_again_after_the_network_code_changes(tmp_path, monkeypatch, capsys):
    code = """import torch
from steptune.evaluators import Plug
SCALE = {scale}
class Net(torch.nn.Module):
    def forward(self, x, t):
        return SCALE * 0.5 * x
def load():
    return Plug(network=Net(), shape=(3,), noise="vp-linear", prediction="eps", time_input="continuous")
"""
    monkeypatch.syspath_prepend(str(tmp_path))

    def rmse(scale, cache):
        (tmp_path / "scaled_net.py").write_text(code.format(scale=scale))
        monkeypatch.delitem(sys.modules, "scaled_net", raising=False)
        assert main(["eval", "--model", "scaled_net:load", "--schedule", "preset:ddim", "--nfe", "4", "--samples",
                     "8", "--cache", str(tmp_path / cache), "--json"]) == 0
        return json.loads(capsys.readouterr().out)["results"][0]["rmse"]

    rmse(1.0, "shared")
    edited = rmse(1.3, "shared")
    assert edited == rmse(1.3, "fresh")  # solved again, as an empty cache solves it
    assert edited != rmse(1.0, "fresh")


def problem_factory():
    from steptune.evaluators import get_problem

    return get_problem("gmm-2d")


@pytest.mark.parametrize("spec, option, said", [
    ("test_plugins:gaussian_factory", ["--guidance", "3"],
     "error: model 'test_plugins:gaussian_factory': guidance 3 has nothing to guide between: the factory gives no "
     "cond_kwargs and uncond_kwargs (and the network no sample_kwargs), so both calls would be the same; return a "
     "Plug with them, or drop --guidance"),
    ("test_plugins:problem_factory", ["--noise", "vp-cosine"],
     "error: model 'test_plugins:problem_factory': the factory returns a Problem, which fixes its own conventions; "
     "drop --noise")])
def test_a_convention_that_would_change_nothing_is_refused(tmp_path, capsys, spec, option, said):
    rc = main(["eval", "--model", spec, *option, "--schedule", "preset:ddim", "--nfe", "4", "--cache", str(tmp_path)])
    assert rc == 2 and capsys.readouterr().err.strip() == said


def test_guidance_between_a_labelled_and_an_unlabelled_call_is_taken():
    prob = load_problem("test_plugins:labelled_factory", guidance_scale=2.0)
    x_T = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    sched = presets.build("ddim", 4, prob.noise, t_start=prob.t_start, t_end=prob.t_end)
    with torch.no_grad():
        assert not torch.allclose(sample(prob.model, x_T, sched), sample(load_problem(
            "test_plugins:labelled_factory").model, x_T, sched))


@pytest.mark.parametrize("spec, said", [
    ("test_plugins.py:gaussian_factory", "name the module, not its file: test_plugins:gaussian_factory, run from the "
     "folder that holds test_plugins.py (or with that folder on PYTHONPATH)"),
    ("./models/unet.py:load", "name the module, not its file: models.unet:load, run from the folder that holds "
     "models/ (or with that folder on PYTHONPATH)")])
def test_a_model_named_by_its_file_is_told_the_module_name(spec, said):
    with pytest.raises(PluginError) as e:
        load_problem(spec)
    assert str(e.value) == f"model {spec!r}: {said}"


def test_a_model_file_shadowed_by_a_library_module_is_said_so(tmp_path, monkeypatch):
    (tmp_path / "json.py").write_text("def my_net():\n    return None\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PluginError, match=r"'json' has no attribute 'my_net'; 'json' was imported from .*json.*, not "
                                          r"from your json.py here: .* so rename your file"):
        load_problem("json:my_net")


def test_a_time_scale_for_a_network_without_continuous_time_is_refused():
    with pytest.raises(PluginError, match="--time-scale scales a continuous time input, and this network takes "
                                          "'discrete' time"):
        load_problem("test_plugins:bare_network_factory", noise="ddpm-linear", time_input="discrete", time_scale=1e3,
                     shape=(4,))


def test_states_too_large_for_memory_end_in_one_line(tmp_path, capsys):
    rc = main(["eval", "--model", "test_plugins:gaussian_factory", "--shape", "10000000,10000000", "--schedule",
               "preset:ddim", "--nfe", "4", "--cache", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1 and err.startswith("error: out of memory (")
    assert err.endswith("); use fewer samples, a smaller --shape or batch, or a device with more memory")
