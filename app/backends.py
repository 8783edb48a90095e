"""Backends: where evaluations run. The Runner hands a backend a list of tasks and a sink for the
outcomes; the in-process backend evaluates them one after another, the Ray backend keeps long-lived
evaluator actors busy (several tasks queued on each) and re-dispatches the tasks of an actor that dies.

Both evaluate through the same ``EvalWorker``, built from the job's problem and evaluation settings,
so the same job gives the same numbers on either backend.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from steptune.jobs import BackendSpec, EvaluationSpec, ProblemSpec


class BackendError(RuntimeError):
    """The backend cannot go on (no evaluator left, Ray not reachable)."""


@dataclass(frozen=True)
class Task:
    """One evaluation: a stored trial's schedule on ``n`` states of ``bank``."""

    trial_id: int
    schedule: dict
    bank: str
    n: int


class Sink(Protocol):
    def start(self, dispatched: Sequence[tuple[Task, str]]) -> None:
        """These tasks are about to go to these workers (called before they are sent, all at once)."""

    def done(self, finished: Sequence[tuple[Task, dict]]) -> None:
        """These tasks finished with these results (all that came back together)."""

    def lost(self, task: Task, worker: str, reason: str, began: bool = True) -> bool:
        """The worker died with the task in flight (``began``: it may have started; False: it was still queued
        behind another): True to dispatch it again, False if it is given up."""

    def stopping(self) -> bool: ...

    def flush(self) -> None:
        """Write what it holds now (called before a slow evaluation that blocks, and when nothing came back for a
        while)."""


def build_problem(spec: ProblemSpec):
    """The Problem a job names: a built-in problem, or a user model given as module:factory."""
    from steptune.evaluators import load_problem

    conv = {k: v for k, v in spec.model_dump(exclude={"name", "model", "options"}).items() if v is not None}
    if "shape" in conv:
        conv["shape"] = tuple(conv["shape"])
    return load_problem(spec.name or spec.model, **conv, **spec.options)


class EvalWorker:
    """Builds the problem and its evaluator once; evaluates tasks. Any error a schedule provokes is a
    failed result, never an exception."""

    def __init__(self, problem: ProblemSpec, evaluation: EvaluationSpec, threads: int = 1, device: str | None = None):
        import torch

        from steptune.evaluators import Evaluator

        self.threads = max(1, int(threads))
        torch.set_num_threads(self.threads)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.problem = build_problem(problem)
        self.evaluator = Evaluator(self.problem, n_train=evaluation.train_samples,
                                   n_heldout=evaluation.heldout_samples, seed=evaluation.bank_seed,
                                   cache_dir=evaluation.cache, device=device)

    def warm(self) -> dict:
        """Load (or compute and cache) the reference solutions of both banks; with them, the identity of the problem
        this evaluator built (the driver checks it is the one its study is scored on)."""
        start = time.perf_counter()
        for bank in ("train", "heldout"):
            self.evaluator.reference(bank)
        return {"seconds": time.perf_counter() - start, "host": socket.gethostname(), "pid": os.getpid(),
                "identity": json.loads(json.dumps(self.problem.identity()))}

    def evaluate(self, task: Task) -> dict:
        from steptune.space import Schedule, ScheduleError

        try:
            return _as_dict(self.evaluator.evaluate(Schedule.from_dict(task.schedule), bank=task.bank, n=task.n))
        except ScheduleError as e:
            return _failed(str(e), task.n)
        except Exception as e:  # a model that raises on this schedule: a failed trial with the reason
            last = traceback.extract_tb(e.__traceback__)[-1]
            return _failed(f"{type(e).__name__}: {e} (at {os.path.basename(last.filename)}:{last.lineno})", task.n)

    def evaluate_each(self, tasks: Sequence[Task]) -> list[dict]:
        """Several tasks in one call, one after another (fewer round trips than one call per task)."""
        return [self.evaluate(t) for t in tasks]

    def evaluate_many(self, tasks: Sequence[Task]) -> list[dict]:
        """Tasks on the same bank and sample count go through the model together (one batched pass)."""
        from steptune.space import Schedule, ScheduleError

        out: list[dict | None] = [None] * len(tasks)
        groups: dict[tuple[str, int], list[int]] = {}
        for i, t in enumerate(tasks):
            groups.setdefault((t.bank, t.n), []).append(i)
        for (bank, n), idx in groups.items():
            scheds = []
            for i in idx:
                try:
                    scheds.append(Schedule.from_dict(tasks[i].schedule))
                except ScheduleError as e:
                    out[i] = _failed(str(e), n)
            live = [i for i in idx if out[i] is None]
            try:
                results = self.evaluator.evaluate_many(scheds, bank=bank, n=n)
            except Exception:  # the batched pass itself failed: each task alone says which one and why
                results = None
            for j, i in enumerate(live):
                if results is None:
                    out[i] = self.evaluate(tasks[i])
                else:
                    out[i] = _as_dict(results[j])
        return out


def _as_dict(res) -> dict:
    """An EvalResult as the plain dict that travels back from a worker."""
    return {"metrics": {**res.metrics, **res.cost()}, "status": res.status, "error": res.error, "seconds": res.seconds,
            "n": res.n}


def _failed(error: str, n: int) -> dict:
    return {"metrics": {}, "status": "failed", "error": error, "seconds": 0.0, "n": n}


class Backend:
    """Tasks are queued with ``submit`` and evaluated by ``pump``, which returns as soon as ``until()`` holds
    (work submitted later may still be in flight then: the runner asks for the next batch meanwhile), or when
    nothing is queued or in flight, or when the sink is stopping and what was in flight has come back (what is
    still queued is then dropped: it stays queued in the database)."""

    name = "backend"
    workers: list[str]
    identities: list[dict]  # the problem each evaluator built (``Problem.identity()``), once started

    def check(self) -> None:
        """Refuse, before any work is stored, what would make ``start`` fail (e.g. an unreachable cluster)."""

    def start(self) -> None: ...

    def submit(self, tasks: Sequence[Task]) -> None:
        self.todo.extend(tasks)

    def pump(self, sink: Sink, until: Callable[[], bool] = lambda: False) -> None:
        raise NotImplementedError

    def run(self, tasks: Sequence[Task], sink: Sink) -> None:
        """Evaluate ``tasks`` (and anything submitted before them) to the end."""
        self.submit(tasks)
        self.pump(sink)

    def close(self) -> None: ...


class LocalBackend(Backend):
    """Evaluates in this process, one task at a time. What the sink holds is written before an evaluation only when
    the one before took ``SLOW_SECONDS`` or more (or none has run yet): a slow evaluation is stored as running while
    it runs and leaves nothing unwritten behind it, and fast ones do not pay two database writes each (the sink
    writes them together, as the results of a Ray backend)."""

    name = "local"
    SLOW_SECONDS = 0.25

    def __init__(self, problem: ProblemSpec, evaluation: EvaluationSpec, spec: BackendSpec):
        self.args = (problem, evaluation, int(max(1, spec.num_cpus)))
        self.batched, self.in_flight = spec.batched, spec.in_flight
        self.worker: EvalWorker | None = None
        self.workers = [f"local@{socket.gethostname()}:{os.getpid()}"]
        self.todo: deque[Task] = deque()
        self.last_seconds: float | None = None  # how long the last evaluation took

    def start(self) -> None:
        if self.worker is None:
            import torch

            self._threads = torch.get_num_threads()
            self.worker = EvalWorker(*self.args)
            self.identities = [self.worker.warm()["identity"]]

    def close(self) -> None:
        if self.worker is not None:
            import torch

            torch.set_num_threads(self._threads)
            self.worker = None
        self.todo.clear()

    def pump(self, sink: Sink, until: Callable[[], bool] = lambda: False) -> None:
        self.start()
        group = self.in_flight if self.batched else 1
        while self.todo and not until():
            if sink.stopping():
                self.todo.clear()
                return
            chunk = [self.todo.popleft() for _ in range(min(group, len(self.todo)))]
            sink.start([(task, self.workers[0]) for task in chunk])
            if self.last_seconds is None or self.last_seconds >= self.SLOW_SECONDS:
                sink.flush()
            began = time.perf_counter()
            results = self.worker.evaluate_many(chunk) if self.batched else [self.worker.evaluate(chunk[0])]
            self.last_seconds = time.perf_counter() - began
            sink.done(list(zip(chunk, results)))


class RayBackend(Backend):
    """Long-lived evaluator actors on a local Ray instance or an existing cluster (``address``)."""

    name = "ray"
    CALL_SECONDS = 0.1  # work per call where the tasks are quick: Ray's own cost, 1-3 ms a call here, stays small

    def __init__(self, problem: ProblemSpec, evaluation: EvaluationSpec, spec: BackendSpec,
                 on_event: Callable[[str], None] | None = None):
        # actors may start in another working directory: they get the cache folder as an absolute path
        evaluation = evaluation.model_copy(update={"cache": str(Path(evaluation.cache).resolve())})
        self.problem, self.evaluation, self.spec = problem, evaluation, spec
        self.on_event = on_event or (lambda msg: None)
        self.actors: list = []
        self.workers: list[str] = []
        self.failures: dict[int, int] = {}
        self.started_ray = False
        self.todo: deque[Task] = deque()
        self.busy: dict = {}  # ObjectRef -> (tasks, actor index)
        self.calls: list[deque] = []  # per actor, its calls in flight in the order it runs them
        self.began: dict = {}  # ObjectRef -> when the call began to run (the call before it came back)
        self.warming: dict = {}  # ObjectRef of a replacement actor's warm-up -> actor index
        self.orphans: set = set()  # calls that were queued behind a call whose actor died: they never began
        self.parked: set = set()  # calls whose actor died while the call ahead of them has not come back yet
        self.state_seconds: float | None = None  # what the last calls' tasks took per state evaluated
        self.sent = [0, 0]  # calls sent to the actors and the tasks they carried
        self.alone: set[int] = set()  # trials of a call that timed out: each is sent in a call of its own

    def check(self) -> None:
        """Reach Ray (start the local instance, or join the cluster) and check the evaluators fit on it, so a
        wrong address or an impossible size is refused before anything is written. A cluster address where
        nothing listens is refused at once (Ray itself retries for minutes)."""
        m = re.fullmatch(r"(?:ray://)?\[?([^\]/]+?)\]?:(\d+)", self.spec.address or "")
        if m is not None:
            try:
                with socket.create_connection((m[1], int(m[2])), timeout=5):
                    pass
            except OSError as e:
                raise BackendError(f"backend.address {self.spec.address}: nothing answers there "
                                   f"({e.strerror or e}); start the cluster (ray start --head) or fix the "
                                   "address") from None
        ray = self._init_ray()
        n = self.spec.workers or self.default_workers()
        res = ray.cluster_resources()
        for kind, per in (("CPU", self.spec.num_cpus), ("GPU", self.spec.num_gpus)):
            if n * per > res.get(kind, 0) + 1e-9:
                raise BackendError(f"backend.workers: {n} evaluators x {per:g} {kind}s need {n * per:g} {kind}s but "
                                   f"the Ray cluster has {res.get(kind, 0):g}; lower workers or num_{kind.lower()}s")

    def _init_ray(self):
        import ray

        from steptune.evaluators.ray_start import init_ray

        if not ray.is_initialized():
            try:
                init_ray(self.spec.address)  # no address: a private local instance
            except (ConnectionError, RuntimeError, ValueError) as e:
                where = self.spec.address or "a local instance"
                raise BackendError(f"backend.address: cannot start or reach Ray at {where} ({e})") from None
            self.started_ray = True
        return ray

    def default_workers(self) -> int:
        import ray

        res = ray.cluster_resources()
        if self.spec.num_gpus > 0:
            n = int(res.get("GPU", 0) // self.spec.num_gpus)
            if n < 1:
                raise BackendError(f"backend.num_gpus = {self.spec.num_gpus:g} but the Ray cluster has "
                                   f"{res.get('GPU', 0):g} GPUs; lower it or set num_gpus = 0")
            return n
        return max(1, int(res.get("CPU", 1) // self.spec.num_cpus))

    def start(self) -> None:
        if self.actors:
            return
        self.check()
        ray = self._init_ray()
        n = self.spec.workers or self.default_workers()
        self.actors = [self._new_actor() for _ in range(n)]
        # the first actor computes and caches the references; the others then read the cache
        try:
            infos = [ray.get(self.actors[0].warm.remote())]
            infos += ray.get([a.warm.remote() for a in self.actors[1:]])
        except ray.exceptions.RayTaskError as e:
            raise BackendError(f"the evaluator could not start: {e.cause if hasattr(e, 'cause') else e}") from None
        except ray.exceptions.RayActorError as e:  # its process or node died (a cluster going down) before it was ready
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BackendError(f"the evaluator could not start: {first} ({type(e).__name__}); check the Ray cluster "
                               "(ray status) and run the same command again") from None
        self.workers = [_worker_name(i, info) for i, info in enumerate(infos)]
        self.identities = [info["identity"] for info in infos]
        self.node_ids = [info["node"] for info in infos]
        self.load, self.alive = [0] * n, [True] * n
        self.calls = [deque() for _ in range(n)]

    def _new_actor(self):
        import ray

        return ray.remote(_RayEvalWorker).options(
            num_cpus=self.spec.num_cpus, num_gpus=self.spec.num_gpus, max_restarts=self.spec.max_restarts,
            max_task_retries=0, name=None).remote(self.problem, self.evaluation, int(max(1, self.spec.num_cpus)))

    def _time_limit(self, chunk: Sequence[Task]) -> float:
        """How long a call may run: ``trial_timeout`` per task on ``cheap_samples`` states, scaled up for more."""
        per, cheap = self.spec.trial_timeout, self.evaluation.cheap_samples
        return sum(per * max(1.0, task.n / cheap) for task in chunk)

    def _overdue(self, now: float) -> list[int]:
        """Actors whose running call has gone past its time limit."""
        if self.spec.trial_timeout is None:
            return []
        return [i for i, calls in enumerate(self.calls)
                if calls and now - self.began[calls[0]] > self._time_limit(self.busy[calls[0]][0])]

    def _next_deadline(self) -> float | None:
        if self.spec.trial_timeout is None:
            return None
        return min((self.began[c[0]] + self._time_limit(self.busy[c[0]][0]) for c in self.calls if c), default=None)

    def _replace(self, i: int, sink: Sink) -> None:
        """Actor ``i`` overran its time limit: its calls' tasks go back to the queue (the running one's with the
        timeout as the reason), it is killed, and a new actor takes its place once warm."""
        import ray

        calls, worker = list(self.calls[i]), self.workers[i]
        limit = self._time_limit(self.busy[calls[0]][0])
        self.calls[i].clear()
        self.load[i], self.alive[i] = 0, False
        chunks = [self.busy.pop(ref)[0] for ref in calls]
        for ref in calls:
            self._forget(ref)
        ray.kill(self.actors[i], no_restart=True)
        self.on_event(f"evaluator {worker} ran past backend.trial_timeout ({limit:g} s); replacing it")
        shared = len(chunks[0]) > 1  # which of the call's candidates hung is unknown: none of them is charged
        if shared:
            self.alone.update(task.trial_id for task in chunks[0])
        for k in reversed(range(len(chunks))):
            reason = (f"in a call of {len(chunks[0])} that timed out after {limit:g} s on evaluator {worker} "
                      "(backend.trial_timeout); sent again alone" if k == 0 and shared else
                      f"timed out after {limit:g} s on evaluator {worker} (backend.trial_timeout)" if k == 0 else
                      f"queued on evaluator {worker}, which was replaced after a timeout")
            for task in reversed(chunks[k]):
                if sink.lost(task, worker, reason, began=k == 0 and not shared):
                    self.todo.appendleft(task)
        self.actors[i] = self._new_actor()
        self.failures[i] = 0
        self.warming[self.actors[i].warm.remote()] = i

    def _warmed(self, ref) -> None:
        import ray

        i = self.warming.pop(ref)
        try:
            info = ray.get(ref)
        except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as e:
            self.on_event(f"the evaluator replacing {self.workers[i]} could not start ({type(e).__name__})")
            return
        self.workers[i], self.node_ids[i], self.alive[i] = _worker_name(i, info), info["node"], True

    def pump(self, sink: Sink, until: Callable[[], bool] = lambda: False) -> None:
        ray = self._init_ray()
        self.start()
        todo, busy = self.todo, self.busy
        # each call carries in_flight tasks or more (call_size; batched: one pass through the model, otherwise one
        # after another), and two calls are queued per actor so it never waits for the next one
        slots = 2
        load, alive = self.load, self.alive
        calls, began = self.calls, self.began
        while (todo or busy) and not until():
            if sink.stopping():
                todo.clear()
            group = self.call_size(todo[0].n if todo else 0, len(todo),
                                   sum(slots - load[i] for i in range(len(self.actors)) if alive[i]))
            planned = []  # (chunk, actor): told to the sink as started, all together, then sent
            while todo:
                free = [i for i in range(len(self.actors)) if alive[i] and load[i] < slots]
                if not free:
                    break
                i = min(free, key=lambda k: (load[k], k))
                planned.append((self._next_call(group), i))
                load[i] += 1
            if planned:
                sink.start([(task, self.workers[i]) for chunk, i in planned for task in chunk])
            now = time.monotonic()
            for chunk, i in planned:
                actor = self.actors[i]
                ref = (actor.evaluate_many if self.spec.batched else actor.evaluate_each).remote(chunk)
                busy[ref] = (chunk, i)
                calls[i].append(ref)
                self.sent[0] += 1
                self.sent[1] += len(chunk)
                if len(calls[i]) == 1:
                    began[ref] = now
            if not busy and not (todo and self.warming):
                if todo and not any(alive):
                    raise BackendError("every evaluator actor died and none could be restarted")
                break  # stopping: the rest stays queued
            deadline = self._next_deadline()
            wait = 1.0 if deadline is None else min(1.0, max(0.0, deadline - now))
            waiting = [r for r in busy if r not in self.parked]
            ready, _ = ray.wait(waiting + list(self.warming), num_returns=1, timeout=wait)
            if not ready:  # a quiet moment: what the sink holds is written now
                sink.flush()
            if ready and len(waiting) > 1:  # and whatever else has come back meanwhile, stored together
                rest = [r for r in waiting if r not in ready]
                ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
            for ref in ready:
                if ref in self.warming:
                    self._warmed(ref)
            order = {ref: k for k, ref in enumerate(busy)}  # the order the calls were sent in
            finished = self._collect(sorted((r for r in ready if r in busy), key=order.get), sink)
            if finished:
                took = [(result["seconds"], task.n) for task, result in finished if result.get("seconds")]
                if took:
                    self.state_seconds = sum(secs for secs, _ in took) / sum(n for _, n in took)
                sink.done(finished)
            for i in self._overdue(time.monotonic()):
                if not ray.wait([calls[i][0]], timeout=0)[0]:  # not just come back: it is overdue
                    self._replace(i, sink)

    def _next_call(self, group: int) -> list[Task]:
        """The next ``group`` queued tasks, or fewer: one of ``alone`` goes in a call of its own."""
        todo, chunk = self.todo, []
        while todo and len(chunk) < group and not (chunk and todo[0].trial_id in self.alone):
            chunk.append(todo.popleft())
            if chunk[-1].trial_id in self.alone:
                break
        return chunk

    def call_size(self, n: int, queued: int, free: int) -> int:
        """Tasks of ``n`` states each per call: ``in_flight``, or more where they are quick (by the last calls'
        seconds per state), so that a call carries about ``CALL_SECONDS`` of work and what Ray spends on each call
        stays small beside it; never more than the ``queued`` tasks shared evenly over the ``free`` call slots, so
        every evaluator gets its part."""
        group = self.spec.in_flight
        if self.state_seconds and n and free:
            quick = math.ceil(self.CALL_SECONDS / (self.state_seconds * n))
            group = max(group, min(quick, -(-queued // free)))
        return group

    def _collect(self, ready: list, sink: Sink) -> list[tuple[Task, dict]]:
        """The results of the calls in ``ready`` (in the order they were sent), and the tasks of calls whose actor
        died re-queued: the call the actor was running spends an attempt, those queued behind it do not."""
        import ray

        finished, now = [], time.monotonic()
        while ready:
            for ref in ready:
                chunk, i = self.busy[ref]
                try:
                    results = ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    if not self._running(ref) and ref not in self.orphans:
                        self.parked.add(ref)  # whether it was running depends on the call ahead: wait for it
                        continue
                    self._died(ref, e, sink)
                    continue
                self._done(ref, now)
                finished += zip(chunk, results)
            # a parked call whose call ahead has now come back (or died) can be settled
            ready = [r for r in self.busy if r in self.parked and (r in self.orphans or self._running(r))]
        return finished

    def _running(self, ref) -> bool:
        """Call ``ref`` is the first on its actor: the one it runs (or ran last, if it died)."""
        return self.calls[self.busy[ref][1]][0] == ref

    def _done(self, ref, now: float) -> None:
        """Call ``ref`` came back: the next call on its actor begins."""
        _, i = self.busy.pop(ref)
        self.load[i] -= 1
        self.calls[i].remove(ref)
        self._forget(ref)
        if self.calls[i]:
            self.began.setdefault(self.calls[i][0], now)

    def _forget(self, ref) -> None:
        self.began.pop(ref, None)
        self.orphans.discard(ref)
        self.parked.discard(ref)

    def _died(self, ref, error: Exception, sink: Sink) -> None:
        """The actor of call ``ref`` died. The call it was running (the first on it) spends an attempt for each of its
        tasks; the calls queued behind it never began, so theirs go back to the queue without spending one, as after
        a timeout. The actor is used again once it has restarted and warmed up (if it has restarts left)."""
        chunk, i = self.busy[ref]
        ran = ref not in self.orphans
        worker = self.workers[i]
        if ran:
            self.orphans.update(r for r in self.calls[i] if r != ref)
            self.failures[i] = self.failures.get(i, 0) + 1
            self.alive[i] = False
            self.on_event(f"evaluator {worker} died ({type(error).__name__})")
            if self.failures[i] <= self.spec.max_restarts:
                self.warming[self.actors[i].warm.remote()] = i
        self._done(ref, time.monotonic())
        reason = (f"evaluator {worker} died ({type(error).__name__})" if ran else
                  f"queued on evaluator {worker}, which died ({type(error).__name__})")
        for task in reversed(chunk):
            if sink.lost(task, worker, reason, began=ran):
                self.todo.appendleft(task)

    def kill_actor(self, i: int) -> None:
        """Kill one evaluator actor (it restarts if restarts are left): what a lost node does to a job."""
        import ray

        ray.kill(self.actors[i], no_restart=False)

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors, self.busy, self.calls, self.began, self.warming = [], {}, [], {}, {}
        self.orphans, self.parked = set(), set()
        self.todo.clear()
        if self.started_ray:
            ray.shutdown()
            self.started_ray = False


class _RayEvalWorker(EvalWorker):
    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def warm(self) -> dict:
        return {**super().warm(), "node": self.node_id()}


def _worker_name(i: int, info: dict) -> str:
    return f"ray-{i}@{info['host']}:{info['pid']}"


def make_backend(job, on_event: Callable[[str], None] | None = None) -> Backend:
    if job.backend.kind == "ray":
        return RayBackend(job.problem, job.evaluation, job.backend, on_event)
    return LocalBackend(job.problem, job.evaluation, job.backend)
