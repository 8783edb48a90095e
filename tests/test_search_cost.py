"""What a search costs: the evaluator's model-call count against the rows its network saw, a real job's cost per
NFE against its configuration, repeats and reused results left out of the evaluations, the cost in `run`, `search`,
`status` and in an exported schedule's provenance."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from runner_jobs import write_job

from steptune.cli import main
from steptune.evaluators import Evaluator, get_problem
from steptune.evaluators.evaluator import device_name
from steptune.exports import import_schedule
from steptune.search_cost import cost_at, study_cost
from steptune.space import Schedule, Step, presets
from steptune.storage import connect

CHEAP, HELDOUT, CONFIRM = 32, 128, 2  # runner_jobs.job_text's sample counts and confirmations
NFES = [3, 4]
BUDGET = 6  # search evaluations per NFE


@pytest.fixture(scope="module")
def problem():
    return get_problem("gmm-2d", "vp-linear")


@pytest.fixture(scope="module")
def ev(problem, tmp_path_factory):
    return Evaluator(problem, n_train=64, n_heldout=64, cache_dir=tmp_path_factory.mktemp("cache"))


def _preset(problem, name: str, nfe: int) -> Schedule:
    return presets.build(name, nfe, problem.noise, t_start=problem.t_start, t_end=problem.t_end)


class RowCounter:
    """Wraps a model's network: the sample rows it was given, counted once per model call (a guided model
    calls its network twice for one model call)."""

    def __init__(self, model):
        self.model, self.fn, self.rows = model, model.fn, 0

    def __enter__(self):
        def counted(x, t, **kw):
            self.rows += x.shape[0]
            return self.fn(x, t, **kw)

        self.model.fn = counted
        return self

    def __exit__(self, *exc):
        self.model.fn = self.fn


def test_an_evaluation_counts_the_rows_its_network_saw(problem, ev):
    assert problem.model.guidance_scale is None
    for name, nfe, n in (("ddim", 5, 40), ("dpm-solver++-2m", 4, 64), ("unipc-bh2", 6, 7)):
        ev.reference("train")  # solved outside the count
        with RowCounter(ev.problem.model) as seen:
            res = ev.evaluate(_preset(problem, name, nfe), "train", n=n)
        assert res.ok and res.model_calls == seen.rows == nfe * n
        assert res.device == device_name(ev.device) == "cpu"
        assert res.cost() == {"model_calls": nfe * n, "device": "cpu"}


def test_a_batched_pass_counts_each_schedule_and_none_for_one_refused(problem, ev):
    scheds = [_preset(problem, "ddim", 5), _preset(problem, "dpm-solver++-2m", 3),
              replace(_preset(problem, "ddim", 4), t_start=0.5)]  # does not fit the bank: refused
    with RowCounter(ev.problem.model) as seen:
        res = ev.evaluate_many(scheds, "train", n=16)
    assert [r.status for r in res] == ["complete", "complete", "failed"]
    assert [r.model_calls for r in res] == [5 * 16, 3 * 16, 0]
    assert sum(r.model_calls for r in res) == seen.rows


def test_a_diverging_schedule_counts_the_calls_it_made(problem, ev):
    base = _preset(problem, "ddim", 6)
    steps = [base.steps[0]] + [Step(t=s.t, order=2, relaxation="linear", relaxation_coef=1e300)
                               for s in base.steps[1:]]
    bad = Schedule(t_start=base.t_start, steps=tuple(steps), noise=base.noise, name="blows-up")
    with RowCounter(ev.problem.model) as seen:
        res = ev.evaluate(bad, "train", n=10)
    assert res.status == "failed" and res.model_calls == seen.rows and 0 < res.model_calls < 6 * 10


@pytest.fixture(scope="module")
def job_run(tmp_path_factory):
    """A real job (`steptune run --json`): S^3 over NFE 3 and 4, BUDGET evaluations each, CONFIRM confirmations."""
    folder = tmp_path_factory.mktemp("job")
    url = f"sqlite:///{folder / 't.db'}"
    job = write_job(folder / "job.toml", "cost", folder / "cache", evaluations=BUDGET, nfe=str(NFES))
    return url, job, folder


def _run_json(capsys, argv) -> dict:
    capsys.readouterr()
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_a_jobs_cost_per_nfe_is_what_its_configuration_spends(job_run, capsys):
    url, job, _ = job_run
    payload = _run_json(capsys, ["run", str(job), "--db", url, "--json"])
    cost = payload["cost"]
    with connect(url) as store:
        trials = store.trials("cost")
    own = [t for t in trials if not t.info.get("baseline")]
    assert sum(t.fidelity == "train" for t in own) == BUDGET * len(NFES)
    assert sum(t.fidelity == "heldout" for t in own) == CONFIRM * len(NFES)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for c in cost["per_nfe"]:
        cheap = sum(t.fidelity == "train" and t.nfe == c["nfe"] for t in own)
        assert c["evaluations"] == cheap + CONFIRM
        assert c["model_calls"] == c["nfe"] * (CHEAP * cheap + HELDOUT * CONFIRM)
        assert c["devices"] and all(d.startswith(device) for d in c["devices"]) and c["repeats"] == c["reused"] == 0
        mine = [t for t in own if t.nfe == c["nfe"]]
        assert c["device_seconds"] == pytest.approx(sum(t.seconds for t in mine))
        # the wall time while they ran: at least the longest one, at most first dispatch to last finish
        longest = max((t.finished - t.started).total_seconds() for t in mine)
        span = (max(t.finished for t in mine) - min(t.started for t in mine)).total_seconds()
        assert longest - 1e-6 <= c["wall_seconds"] <= span + 1e-6
    assert [c["nfe"] for c in cost["per_nfe"]] == NFES
    assert cost["total"]["evaluations"] == (BUDGET + CONFIRM) * len(NFES)
    assert cost["total"]["model_calls"] == sum(c["model_calls"] for c in cost["per_nfe"])
    base = [t for t in trials if t.info.get("baseline")]
    assert cost["baselines"]["model_calls"] == sum(t.nfe * t.n_samples for t in base)
    assert cost["baselines"]["evaluations"] + cost["baselines"]["repeats"] == len(base)


def test_status_shows_the_cost_it_reads_from_the_database(job_run, capsys):
    url, job, _ = job_run
    assert main(["run", str(job), "--db", url, "--json"]) == 0  # the finished study: nothing more runs
    with connect(url) as store:
        want = study_cost(store.trials("cost")).as_dict()
    assert _run_json(capsys, ["status", "--study", "cost", "--db", url, "--json"])["cost"] == want
    capsys.readouterr()
    assert main(["status", "--study", "cost", "--db", url]) == 0
    text = capsys.readouterr().out
    for c in want["per_nfe"]:
        assert f"{c['model_calls']:,}" in text
    total = want["total"]
    assert (f"cost: {total['evaluations']} evaluations, {total['model_calls']:,} model calls" in text
            and f"on {total['device']}; baselines: {want['baselines']['evaluations']} evaluations" in text), text


def test_a_repeat_and_a_reused_result_are_not_evaluations(job_run, capsys):
    url, job, folder = job_run
    assert main(["run", str(job), "--db", url, "--json"]) == 0
    with connect(url) as store:
        t = next(t for t in store.trials("cost", nfe=3) if t.fidelity == "train" and t.status == "complete")
        before = study_cost(store.trials("cost")).at(3)
        # the same schedule evaluated again on the same bank and samples: paid for, but no new evaluation
        store.add_trials("cost", [{"schedule": t.schedule, "status": "complete", "metrics": t.metrics,
                                   "seconds": 0.25, "fidelity": t.fidelity, "bank": t.bank,
                                   "n_samples": t.n_samples}])
        # a result carried in with an export: not computed here
        exported = _run_json(capsys, ["best", "--study", "cost", "--nfe", "3", "--db", url, "--json"])
        import_schedule(store, json.dumps(exported), "cost", allow_duplicates=True)
        after = study_cost(store.trials("cost")).at(3)
    assert after.evaluations == before.evaluations
    assert (after.repeats, after.reused) == (1, 1)
    assert after.model_calls == before.model_calls + 3 * CHEAP
    assert after.device_seconds == pytest.approx(before.device_seconds + 0.25)


def test_an_export_carries_the_cost_at_its_nfe_and_imports_back(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'e.db'}"
    job = write_job(tmp_path / "job.toml", "exp", tmp_path / "cache", evaluations=4, nfe="[3]")
    assert main(["run", str(job), "--db", url, "--json"]) == 0
    with connect(url) as store:
        searched = min((t for t in store.trials("exp", nfe=3) if t.fidelity == "heldout" and t.status == "complete"
                        and not t.info.get("baseline")), key=lambda t: (t.score, t.id))
        own = study_cost(store.trials("exp")).at(3)
        want = cost_at(store, searched)
    assert want == {**own.as_dict(), "of": "study"}
    capsys.readouterr()
    assert main(["export", "--study", "exp", "--trial", str(searched.id), "--db", url, "-o",
                 str(tmp_path / "s.json")]) == 0
    prov = json.loads((tmp_path / "s.json").read_text())["provenance"]
    assert prov["cost"] == json.loads(json.dumps(want))
    assert prov["cost"]["model_calls"] == 3 * (CHEAP * 4 + HELDOUT * CONFIRM)
    with connect(f"sqlite:///{tmp_path / 'other.db'}") as other:
        back = import_schedule(other, tmp_path / "s.json", "back")
        assert back.status == "complete"
        # it keeps where it was found, and its export names that and what it cost there, not the new study's spend
        assert back.info["imported"] == {"file": "s.json", "study": "exp", "trial": searched.id, "method": "s3",
                                         "origin": searched.info["origin"], "exported": prov["exported"],
                                         "cost": prov["cost"]}
        assert cost_at(other, back) == {**prov["cost"], "of": "source"}
    assert main(["export", "--study", "back", "--nfe", "3", "--db", f"sqlite:///{tmp_path / 'other.db'}", "-o",
                 str(tmp_path / "again.json")]) == 0
    again = json.loads((tmp_path / "again.json").read_text())["provenance"]
    assert again["study"] == "back" and again["imported"] == back.info["imported"]
    assert again["method"] == "s3"  # what found it, not the importing study's method
    assert again["cost"] == {**prov["cost"], "of": "source"}
    # a hand-written schedule carries no cost: once a run scores it, its export's cost is that evaluation's
    with connect(url) as store:
        written = presets.ddim(3, noise_of(store, "exp")).to_dict()
        written["steps"][0]["t"], written["steps"][1]["t"] = 0.5, 0.1  # times no preset has
        hand = import_schedule(store, json.dumps(written), "exp")
        assert hand.info == {"imported": {"file": "JSON text"}} and hand.status == "queued"
    assert main(["run", str(job), "--db", url, "--json"]) == 0
    with connect(url) as store:
        scored = store.trial(hand.id)
        assert scored.status == "complete" and cost_at(store, scored) == {**study_cost([scored]).at(3).as_dict(),
                                                                            "of": "trial"}
        assert cost_at(store, scored)["evaluations"] == 1
    assert main(["export", "--trial", str(hand.id), "--study", "exp", "--db", url, "-o", str(tmp_path / "h.json")]) == 0
    hand_prov = json.loads((tmp_path / "h.json").read_text())["provenance"]
    assert hand_prov["method"] == "import" and hand_prov["imported"] == {"file": "JSON text"}  # not the study's s3
    # a preset baseline's export says what the baselines at its NFE cost
    with connect(url) as store:
        base = next(t for t in store.trials("exp", nfe=3) if t.info.get("baseline") and t.status == "complete")
        assert cost_at(store, base)["of"] == "baselines"


def test_search_prints_and_saves_its_cost(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 's.db'}"
    argv = ["search", "--problem", "gmm-2d", "--nfe", "3", "--budget", "3", "--cheap-samples", "16",
            "--heldout-samples", "64", "--confirm", "1", "--db", url, "--out", str(tmp_path / "out"), "--cache",
            str(tmp_path / "cache"), "--study", "srch"]
    payload = _run_json(capsys, [*argv, "--json"])
    assert payload["cost"]["per_nfe"][0]["model_calls"] == 3 * (16 * 3 + 64 * 1)
    saved = json.loads((tmp_path / "out" / "srch.json").read_text())
    assert saved["cost"] == payload["cost"]


def test_a_refinement_back_to_its_parent_is_an_evaluation_of_its_own(job_run):
    """A refinement by gradient that does not beat its parent is stored with the parent's schedule, bank and
    samples; it is a fit of its own (its model calls and seconds are the fit's), not a repeat."""
    url, job, _ = job_run
    assert main(["run", str(job), "--db", url, "--json"]) == 0
    with connect(url) as store:
        parent = next(t for t in store.trials("cost", nfe=4) if "confirms" in t.info and t.status == "complete")
        before = study_cost(store.trials("cost")).at(4)
        fit_calls = 4 * HELDOUT * 7  # e.g. the fit's calls and its held-out checks
        store.add_trials("cost", [{"schedule": parent.schedule, "status": "pruned", "seconds": 0.5,
                                   "metrics": {**parent.metrics, "model_calls": fit_calls}, "fidelity": parent.fidelity,
                                   "bank": parent.bank, "n_samples": parent.n_samples,
                                   "info": {"refines": parent.id, "origin": "refine:test"}}])
        after = study_cost(store.trials("cost")).at(4)
    assert (after.evaluations, after.repeats) == (before.evaluations + 1, before.repeats)
    assert after.model_calls == before.model_calls + fit_calls
    assert after.device_seconds == pytest.approx(before.device_seconds + 0.5)
    assert after.interpolated_from is None


def noise_of(store, study: str):
    from steptune.space import noise

    return noise.from_dict(store.get_study(study).problem["identity"]["noise"])
