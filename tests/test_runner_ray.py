"""The Ray backend, on a two-node cluster simulated on this machine (one Ray instance for the module):
the same job gives the same stored results as in-process, evaluators run on both nodes, and a killed
evaluator actor loses no trial."""

from __future__ import annotations

import pytest
from runner_jobs import outcome, run_job

from steptune.backends import LocalBackend, RayBackend
from steptune.cli.run import study_status
from steptune.jobs import job_from_dict
from steptune.storage import connect

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 80 * 2**20,
                                                       "include_dashboard": False})
    c.add_node(num_cpus=1, object_store_memory=80 * 2**20)
    c.wait_for_nodes()
    ray.init(address=c.address, include_dashboard=False, log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


def _job(study: str, cache, kind: str, **backend):
    return job_from_dict({
        "study": study, "seed": 5,
        "problem": {"name": "gmm-2d"},
        "search": {"method": "s3", "nfe": [3, 4]},
        "evaluation": {"cheap_samples": 32, "train_samples": 64, "heldout_samples": 128, "confirm": 2,
                       "cache": str(cache)},
        "budget": {"evaluations": 12},
        "backend": {"kind": kind, **backend},
    })


def _run(job, url, backend, progress=None):
    res, _ = run_job(job, url, backend, progress)
    with connect(url) as db:
        return res, outcome(db, job.study), db.trials(job.study), study_status(db, job.study)


@pytest.fixture(scope="module")
def local_result(tmp_path_factory):
    d = tmp_path_factory.mktemp("local")
    job = _job("same", d / "cache", "local")
    return _run(job, f"sqlite:///{d / 'local.db'}", LocalBackend(job.problem, job.evaluation, job.backend))


def test_ray_and_in_process_store_identical_results_with_evaluators_on_both_nodes(cluster, local_result, tmp_path):
    job = _job("same", tmp_path / "cache", "ray", in_flight=2)
    backend = RayBackend(job.problem, job.evaluation, job.backend)
    res, got, trials, _ = _run(job, f"sqlite:///{tmp_path / 'ray.db'}", backend)
    assert res.status == "complete"
    assert got == local_result[1]
    assert len(set(backend.node_ids)) == 2 == len(ray.nodes())  # one evaluator per node's CPU slot
    assert len({t.worker.rsplit("/", 1)[1] for t in trials}) == 2  # both evaluated trials


def test_a_killed_evaluator_actor_loses_no_trial(cluster, local_result, tmp_path):
    job = _job("same", tmp_path / "cache", "ray", in_flight=2, max_restarts=2)
    backend = RayBackend(job.problem, job.evaluation, job.backend)
    killed = []

    def progress(st):
        if st["phase"] == "search" and st["done"] == 6 and not killed:
            backend.kill_actor(0)
            killed.append(st["done"])

    res, got, trials, status = _run(job, f"sqlite:///{tmp_path / 'ray.db'}", backend, progress)
    assert killed and res.status == "complete" and res.retried >= 1
    assert got == local_result[1]  # nothing lost, nothing duplicated, the same results
    retried = [t for t in trials if t.attempts > 1]
    assert retried and all(t.status == "complete" and "died" in t.error for t in retried)
    assert status["retried"] == len(retried) and status["failed"] == 0
    assert any("died" in e["error"] for e in status["recent_errors"])


def test_batched_evaluation_on_ray_gives_the_same_study(cluster, local_result, tmp_path):
    """Each actor gets its queued candidates as one batched pass through the model."""
    import math

    job = _job("same", tmp_path / "cache", "ray", in_flight=4, batched=True)
    backend = RayBackend(job.problem, job.evaluation, job.backend)
    res, got, _, _ = _run(job, f"sqlite:///{tmp_path / 'ray.db'}", backend)
    want = local_result[1]
    assert res.status == "complete" and len(got) == len(want)
    for g, w in zip(got, want):
        assert g[:4] == w[:4] and g[5] == w[5]  # same trials, in the same order, with the same status
        for (k, a), (k2, b) in zip(g[4], w[4]):
            assert k == k2 and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12), (k, a, b)
