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


def _job(study: str, cache, kind: str, lookahead: int | None = None, **backend):
    return job_from_dict({
        "study": study, "seed": 5,
        "problem": {"name": "gmm-2d"},
        "search": {"method": "s3", "nfe": [3, 4], "lookahead": lookahead},
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
    job = _job("same", d / "cache", "local", lookahead=1)  # what Ray does by default
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
            same = a == b if isinstance(a, str) else math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
            assert k == k2 and same, (k, a, b)  # the metrics, the model calls and the device


def test_by_default_the_batch_gives_every_evaluator_work_and_the_study_records_it(cluster, tmp_path):
    """Four evaluators (half a CPU each on the two nodes), four candidates per call: a batch of 16, each of the
    first batch's trials run on one of the four, and the run's utilisation stored with the study."""
    job = _job("wide", tmp_path / "cache", "ray", num_cpus=0.5, in_flight=4)
    backend = RayBackend(job.problem, job.evaluation, job.backend)
    res, _, trials, status = _run(job, f"sqlite:///{tmp_path / 'ray.db'}", backend)
    assert res.status == "complete" and len(backend.workers) == 4
    with connect(f"sqlite:///{tmp_path / 'ray.db'}") as db:
        config = db.get_study("wide").config
    assert config["search_batch"] == 16 and config["search_lookahead"] == 1 and config["evaluators"]["count"] == 4
    first = [t for t in trials if t.info.get("batch") == 0]
    assert len(first) == 16 and len({t.worker for t in first}) == 4
    u = res.utilisation
    assert u["evaluators"] == 4 and u["batch"] == 16 and u["evaluations"] == 24 and 0 < u["fraction"] <= 1
    assert status["utilisation"] == u
    # the next batch was queued behind this one: its first evaluation started before this one's last ended
    second = [t for t in trials if t.info.get("batch") == 1]
    assert min(t.started for t in second) < max(t.finished for t in first)


def test_a_fixed_batch_gives_the_same_trials_with_any_number_of_evaluators(cluster, local_result, tmp_path):
    """search.batch set: four evaluators store what one in-process evaluator stored with the same batch."""
    job = job_from_dict({**_job("same", tmp_path / "cache", "ray").model_dump(),
                         "search": {"method": "s3", "nfe": [3, 4], "batch": 8, "lookahead": 1},
                         "backend": {"kind": "ray", "num_cpus": 0.5, "in_flight": 1}})
    backend = RayBackend(job.problem, job.evaluation, job.backend)
    res, got, trials, _ = _run(job, f"sqlite:///{tmp_path / 'ray.db'}", backend)
    assert res.status == "complete" and len(backend.workers) == 4 and len({t.worker for t in trials}) == 4
    assert got == local_result[1]


def test_losing_a_node_requeues_its_trials_and_the_job_finishes(cluster, local_result, tmp_path):
    """A third node joins, one evaluator lands on each node; the third node goes away mid-run."""
    node = cluster.add_node(num_cpus=1, object_store_memory=80 * 2**20)
    cluster.wait_for_nodes()
    job = _job("same", tmp_path / "cache", "ray", workers=3, in_flight=2)
    backend = RayBackend(job.problem, job.evaluation, job.backend)
    removed = []

    def progress(st):
        if st["phase"] == "search" and st["done"] >= 6 and not removed:
            cluster.remove_node(node)
            removed.append(st["done"])

    res, got, trials, _ = _run(job, f"sqlite:///{tmp_path / 'ray.db'}", backend, progress)
    assert removed and res.status == "complete"
    assert len(set(backend.node_ids)) == 3
    assert got == local_result[1]
    retried = [t for t in trials if t.attempts > 1]
    assert retried and all(t.status == "complete" and "died" in t.error for t in retried)


def test_a_job_joins_a_cluster_by_address_and_survives_losing_a_worker_node(cluster, local_result, tmp_path):
    """backend.address names the cluster's head (host:port): the job connects itself, places an evaluator on each
    of three nodes, loses one node mid-run, re-queues what was in flight there, and ends with the same study as
    in-process; then it leaves the cluster, which runs on."""
    node = cluster.add_node(num_cpus=1, object_store_memory=80 * 2**20)
    cluster.wait_for_nodes()
    ray.shutdown()  # this process is not connected: the job joins by address
    try:
        job = _job("same", tmp_path / "cache", "ray", address=cluster.address, workers=3, in_flight=2)
        backend = RayBackend(job.problem, job.evaluation, job.backend)
        joined, removed = [], []

        def progress(st):
            if not joined:
                joined.append(ray.get_runtime_context().gcs_address)
            if st["phase"] == "search" and st["done"] >= 6 and not removed:
                cluster.remove_node(node)
                removed.append(st["done"])

        res, got, trials, _ = _run(job, f"sqlite:///{tmp_path / 'ray.db'}", backend, progress)
        assert joined == [cluster.address] and not ray.is_initialized()  # joined, and left when done
        assert removed and res.status == "complete"
        assert len(set(backend.node_ids)) == 3
        assert got == local_result[1]  # nothing lost, nothing evaluated twice
        retried = [t for t in trials if t.attempts > 1]
        assert retried and all(t.status == "complete" and "died" in t.error for t in retried)
    finally:
        if not ray.is_initialized():
            ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)


def test_quick_tasks_go_to_an_evaluator_several_at_a_time_and_shared_evenly(tmp_path):
    """A call carries in_flight tasks until their times are known; then, where they are quick, enough of them for
    about CALL_SECONDS of work (by the seconds per state the last results took, so larger tasks go fewer to a
    call), never more than the queued tasks shared evenly over the free call slots."""
    job = _job("sizes", tmp_path / "cache", "ray", in_flight=2)
    backend = RayBackend(job.problem, job.evaluation, job.backend)
    per_call = RayBackend.CALL_SECONDS
    assert backend.call_size(32, queued=40, free=4) == 2  # nothing measured yet
    backend.state_seconds = per_call / 8 / 32  # a task of 32 states takes 1/8 of a call's work
    assert backend.call_size(32, queued=40, free=4) == 8
    assert backend.call_size(32, queued=20, free=4) == 5  # 20 queued over 4 slots
    assert backend.call_size(32, queued=3, free=4) == 2  # never below in_flight
    assert backend.call_size(64, queued=40, free=4) == 4  # tasks of twice the states: half as many
    assert backend.call_size(32 * 8, queued=40, free=4) == 2  # a task as long as a call's work: in_flight
    backend.state_seconds = per_call / 7.5 / 32
    assert backend.call_size(32, queued=100, free=2) == 8  # at least a call's work, rounded up
