"""The Runner: drives a searcher's ask/tell across NFEs, hands evaluations to a backend, and writes every
trial to the database as it happens.

A job runs in three phases, each resumable from the database alone:

1. **baseline**: every preset solver at every NFE on the held-out bank (for the comparison table);
2. **search**: the searcher is asked for a batch of candidates, the batch is stored (``queued``),
   evaluated on the cheap fidelity (the first ``cheap_samples`` states of the train bank), and told to
   the searcher in the order it was asked, whatever order the results came back in. So the searcher's
   state depends on the stored rows only, and the same seed gives the same trials on any backend;
3. **confirm**: the best few per NFE are evaluated on the held-out bank; a result is always reported
   on the bank it was not selected on.

On resume the stored batches are replayed into a fresh searcher (re-asked and told their stored
results), and the rows a stopped run left ``queued`` or ``running`` are evaluated now, so a
killed run loses only what was in flight and the study ends with the same trials as an
uninterrupted one.
"""

from __future__ import annotations

import functools
import gc
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from datetime import timedelta

from steptune.backends import Backend, BackendError, Task, build_problem
from steptune.jobs import Job, JobError
from steptune.run_lease import LEASE_SECONDS, beating, driver_gone, driver_id
from steptune.search import CHEAP, CONFIRM
from steptune.slow_steps import said_if_slow
from steptune.storage import Storage, StorageError
from steptune.storage.db import DriverLost, Retrying
from steptune.study_problem import evaluator_refusal, first_change, mixing_refusal, value_at, weights_note


@dataclass
class NfeSummary:
    nfe: int
    preset: str | None
    preset_score: float | None
    searched_score: float | None
    trial: int | None  # id of the searched schedule's held-out trial, whose score is searched_score (export --trial)
    found_at: int | None  # cheap evaluations done when it was found
    preset_matches_at: int | None = None  # smallest NFE at which some preset does as well (None: none does)
    schedule: dict | None = None  # the searched schedule
    interpolated_from: list[int] | None = None  # an NFE not searched ([refine] interpolate): the NFEs it was built from
    refined: float | None = None  # best held-out score after its refinements (a parent's where none beat it)
    searched_train: float | None = None  # the searched schedule's score on the search's own (cheap) states

    @property
    def improvement(self) -> float | None:
        if self.preset_score is None or not self.searched_score:
            return None
        return self.preset_score / self.searched_score


CONFIRM_SLACK_SECONDS = 1.0  # kept free before the deadline besides twice the confirmations' estimated cost


@dataclass
class RunResult:
    study: str
    status: str  # complete | interrupted | time-budget
    evaluations: int  # cheap-fidelity evaluations stored for the study
    confirmations: int
    failed: int
    retried: int
    seconds: float
    per_nfe: list[NfeSummary] = field(default_factory=list)
    utilisation: dict | None = None  # this run's search: evaluators, fraction busy, evaluations per second
    baselines_queued: int = 0  # preset baselines a stopped run left unscored
    baselines_finished: bool = True  # False: the run stopped before every preset baseline was chosen and scored
    baselines_left: int = 0  # presets and NFEs (and diffusers' schedulers) it stopped before storing a baseline of
    search_exhausted: bool = False  # the method had no new schedule to try before its budget was spent
    imports: list[dict] = field(default_factory=list)  # the imported schedules this run was to score: each one's
    # trial id, NFE, status and score, and the best held-out trial at its NFE (id, score)


@contextmanager
def _heap_set_aside() -> Iterator[None]:
    """What the process holds when a search starts (modules, the problem, its reference states, the backend) is
    set aside from the garbage collector while the run goes on: its full passes would scan all of it again and
    again, for the few objects a search leaves behind (on gmm-digits 0.24 ms of the driver's time per evaluation,
    0.04 with it set aside; whatever of it is garbage goes at the first full pass after the run)."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class _Sink:
    """Receives the backend's events for one list of tasks. The starts and finishes are written together, with
    the times they happened: with the first event ``FLUSH_SECONDS`` or more after the oldest one held, when the
    backend asks (a quiet moment, a slow evaluation in this process), before a re-queue, and when the backend
    returns. So one write carries many evaluations when they come back fast."""

    FLUSH_SECONDS = 1.0

    def __init__(self, runner: Runner):
        self.runner = runner
        self.results: dict[int, dict] = {}
        self.in_flight: dict[int, str] = {}
        self.notes: dict[int, str] = {}  # why a trial was re-dispatched: kept on its row
        self.starts: list[tuple] = []  # (trial id, worker, when) not yet written
        self.finishes: list[dict] = []  # outcomes not yet written
        self.since: float | None = None  # when the oldest of them happened

    def flush(self) -> None:
        if self.starts or self.finishes:
            self.runner.storage.record(self.starts, self.finishes)
            self.starts, self.finishes = [], []
        self.since = None

    def _pending(self) -> None:
        now = time.monotonic()
        if self.since is None:
            self.since = now
        elif now - self.since >= self.FLUSH_SECONDS:
            self.flush()

    def start(self, dispatched) -> None:
        when = self.runner._db_now()
        for task, worker in dispatched:
            name = f"{self.runner.driver}/{worker}"
            self.starts.append((task.trial_id, name, when))
            self.in_flight[task.trial_id] = name
        self._pending()

    def done(self, finished) -> None:
        when = self.runner._db_now()
        for task, result in finished:
            status = result["status"] if result["status"] in ("complete", "failed") else "failed"
            self.finishes.append({"trial_id": task.trial_id, "status": status, "metrics": result.get("metrics") or {},
                                  "error": result.get("error") or self.notes.get(task.trial_id),
                                  "seconds": result.get("seconds"), "worker": self.in_flight.get(task.trial_id),
                                  "finished": when})
        self._pending()
        for task, result in finished:  # reported as the evaluators stood while these ran, then let go
            self.results[task.trial_id] = result
            self.runner._progress_event(task, result)
        for task, _ in finished:
            self.in_flight.pop(task.trial_id, None)

    def lost(self, task: Task, worker: str, reason: str, began: bool = True) -> bool:
        self.flush()  # its start is written before it is re-queued
        self.in_flight.pop(task.trial_id, None)
        row = self.runner.storage.requeue(task.trial_id, reason, began=began)
        self.notes[task.trial_id] = row.error
        self.runner.retried += began
        if row.status == "failed":
            self.results[task.trial_id] = {"status": "failed", "metrics": {}, "error": row.error}
            self.runner._progress_event(task, self.results[task.trial_id])
            return False
        return True

    def stopping(self) -> bool:
        return self.runner.should_stop()


class _Fenced:
    """The run's storage: once ``fence`` (the study, this run's driver) is set, its writes of trials and of the
    study's config are refused (DriverLost) where another run has taken the study over meanwhile."""

    WRITES = frozenset({"add_trials", "record", "update_study_config"})

    def __init__(self, storage):
        self.storage, self.fence = storage, None

    def __getattr__(self, name: str):
        attr = getattr(self.storage, name)
        return functools.partial(attr, fence=self.fence) if self.fence is not None and name in self.WRITES else attr


class Runner:
    """Runs ``job`` on ``backend``, storing into ``storage``. ``progress`` gets a dict after every result
    (phase, done, total, best per NFE, failures, eta); ``say`` gets one-line notices."""

    def __init__(self, job: Job, storage: Storage, backend: Backend,
                 progress: Callable[[dict], None] | None = None, say: Callable[[str], None] | None = None):
        self.say = say or (lambda msg: None)
        # every call waits out a database outage (up to [storage] retry); the heartbeats use the plain storage
        self.job, self.storage, self.backend = job, _Fenced(Retrying(storage, job.storage.retry, self.say)), backend
        self._plain_storage = storage
        self.progress = progress
        self.driver = driver_id()
        self._taken_over: list[str | None] = []  # [the driver that holds the study now], once another took it over
        self.interrupted = threading.Event()
        self.started = time.monotonic()
        self.started_at = self._db_now()
        self.deadline = None if job.budget.time is None else self.started + job.budget.time
        self.search_deadline = self.deadline
        self._phase = "baseline"
        self.retried = 0
        self.failed = 0  # failed evaluations in this run (diverged, or out of attempts)
        self.done = 0
        self._rate_from: tuple[float, int] | None = None  # (when, done) at this run's first search result
        self.total = job.budget.evaluations * len(job.search.nfe)
        self.phase_counts: dict[str, list[int]] = {}  # baseline and confirm: [evaluated, queued] in this run
        self.phase_detail: dict[str, str] = {}  # what a phase's count is of, where it says more (refine: its NFE)
        self.baselines_finished = not job.evaluation.baseline  # set as the baseline phase ends without a stop
        self.baselines_left = 0  # presets and NFEs (and diffusers' schedulers) a stop left without a stored baseline
        self.search_exhausted = False
        self.best: dict[int, float] = {}  # the best search score at each NFE so far, as each result comes back
        self._metric = "rmse"  # the study's, once it is open
        self.problem = None
        self.eval_seconds: list[float] = []  # cheap (train-bank) evaluations
        self.heldout_seconds: list[float] = []  # held-out evaluations: baseline presets and confirmations
        self.batch_seconds: float | None = None  # the last search batch, asked, evaluated and told
        self.time_up, self.time_up_phase = False, None
        self._imports: list[int] = []
        self._sink: _Sink | None = None
        self._submitted: set[int] = set()  # trial ids handed to the backend in this run
        self._batch_started: dict[int, float] = {}  # search batch -> when this run asked it

    # ---- control ---------------------------------------------------------------------------------

    def interrupt(self) -> None:
        """Finish what is in flight, start nothing new, and return (SIGINT)."""
        self.interrupted.set()

    def should_stop(self) -> bool:
        if self.interrupted.is_set():
            return True
        deadline = self.search_deadline if self.phase == "search" else self.deadline
        if deadline is not None and time.monotonic() >= deadline:
            self._out_of_time()
            return True
        return False

    def _out_of_time(self) -> None:
        """The time budget is spent; the phase it ran out in is kept for status (the confirmations after a search
        it cut short still run)."""
        if not self.time_up:
            self.time_up, self.time_up_phase = True, self.phase

    # ---- the job ---------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Everything that can fail on bad input, before any evaluation: the problem (the model factory is
        imported and called), the study (created, or checked against the job it was run with), and the
        trials a stopped run left running."""
        if getattr(self, "problem", None) is not None:
            return
        job = self.job
        try:
            self.problem = build_problem(job.problem)
        except (JobError, BackendError):
            raise
        except Exception as e:
            key = "problem.model" if job.problem.model else "problem.name"
            from steptune.evaluators.load import load_error_text

            raise JobError(f"{key} {job.problem.describe()!r}: {load_error_text(e)}") from None
        note = weights_note(self.problem)
        if note:
            self.say(note)
        from steptune.search import make_searcher

        try:
            self.searcher = make_searcher(job.search.method, self.problem.noise, self.problem.t_start,
                                          self.problem.t_end, job.search.nfe, seed=job.seed, **job.search.options)
        except (TypeError, ValueError) as e:  # an option the method does not take, or a value it refuses
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise JobError(f"search.options {job.search.options!r} for method {job.search.method!r}: {msg}") from None
        self.searcher.budget = self.total
        from steptune.evaluators.evaluator import metric_names

        told = metric_names(self.problem, bank="train")  # what a cheap evaluation reports, the searcher is told
        if self.searcher.metric not in told:
            raise JobError(f"search.options metric {self.searcher.metric!r}: the search is told what an evaluation of "
                           f"{self.problem.name} on the train bank reports ({', '.join(told)}); use one of them")
        space = self.searcher.space
        if max(job.search.nfe) > space.max_nfe:
            raise JobError(f"search.nfe {max(job.search.nfe)}: at most {space.max_nfe} steps fit between t_start and "
                           f"t_end {space.min_gap:g} apart in log-SNR; search at most NFE {space.max_nfe}")
        self.backend.check()  # e.g. an unreachable cluster, refused before the study is made
        self._open_study()
        try:
            self.storage.claim_driver(job.study, self.driver, LEASE_SECONDS, gone=driver_gone)
        except StorageError as e:  # DriverBusy: another live driver runs this study
            raise JobError(str(e)) from None
        self.storage.fence = (job.study, self.driver)
        self.storage.forget_requests(timedelta(days=1))
        self._recover()

    def run(self) -> RunResult:
        self.prepare()
        job = self.job
        self._beating = threading.Event()  # set once the run's lease is no longer renewed
        end_beats = beating(self._heartbeat)
        heap = ExitStack()
        # schedules ``steptune import`` queued for this run to score (a job's own trials say what made them)
        self._imports = [t.id for t in self.storage.trials(job.study, status="queued")
                         if t.fidelity != CHEAP and set(t.info) <= {"imported"}]
        try:
            self.phase = "start"
            self._start_backend()
            self.storage.update_study_config(job.study, {"evaluators": {
                "count": len(self.backend.workers), "backend": job.backend.kind, "driver": self.driver,
                "trial_timeout": job.backend.trial_timeout}})
            if job.backend.trial_timeout is not None and job.backend.kind == "local":
                self.say("backend.trial_timeout is not applied in-process (an evaluation cannot be cut off in the "
                         "driver itself); use kind = \"ray\" to have a hung evaluation's evaluator replaced")
            self._say_unused_keys()
            self._say_resumed_before_search()
            if self._imports and not self.should_stop():
                self.phase = "import"
                self._score_imports()
            if job.evaluation.baseline and not self.should_stop():
                self.phase = "baseline"
                self._baseline()
            elif job.evaluation.baseline:  # stopped before it began: what is not stored yet is said
                self.baselines_left = self._baselines_unstored()
            if not self.should_stop():
                self.phase = "search"
                # until the run ends: a full pass right after the search would scan everything at once, inside
                # the time kept for the confirmations
                heap.enter_context(_heap_set_aside())
                self._search()
            if not self.interrupted.is_set() and not (self.time_up and self.deadline_passed()):
                self.phase = "confirm"
                self._confirm()
            if job.refine is not None and not self.should_stop():
                from steptune.refine import refine_stage

                self.phase = "refine"
                refine_stage(self)
        except BaseException as e:
            ended = "interrupted" if isinstance(e, KeyboardInterrupt) else "error"
            raise
        else:
            ended = "interrupted" if self.interrupted.is_set() else "time budget" if self.time_up else "complete"
        finally:
            heap.close()
            self._beating.set()
            end_beats()
            try:  # how it ended, and where, for status; then the study is free (a run taken over writes neither)
                if ended == "error" and self.phase == "start" and self._made_study and \
                        self._plain_storage.drop_unused_study(job.study, self.driver):
                    pass  # the run made nothing else: as if it had not run
                else:
                    where = self.time_up_phase if ended == "time budget" and self.time_up_phase else self.phase
                    self._plain_storage.update_study_config(job.study, {"last_run": {
                        "driver": self.driver, "ended": ended, "phase": where}}, fence=self.storage.fence)
                    self._plain_storage.release_driver(job.study, self.driver)
                self.storage.fence = None  # let go: what the run writes of itself after its end is its own
            except StorageError:
                pass  # the database is away: the lease runs out, or a driver on this host sees this process gone
        if self._taken_over:
            raise DriverLost(job.study, self.driver, self._taken_over[0])
        with _heap_set_aside():  # reading every trial back would otherwise start that full pass (0.2 s on gmm-digits)
            return self._result()

    def _start_backend(self, slow: float = 3.0) -> None:
        """Start the evaluators; a start that takes longer than ``slow`` seconds (the problem built and its reference
        solutions computed, on a first run) says what it is doing while it does it, and how long it took."""
        with said_if_slow(self.say, "preparing the evaluators: the problem is built and its reference solutions on "
                          "the train and held-out banks computed (once; later runs read them from "
                          f"{self.job.evaluation.cache})", "evaluators ready", after=slow):
            self.backend.start()
        for worker, built in zip(self.backend.workers, getattr(self.backend, "identities", ())):
            refusal = evaluator_refusal(worker, built, self.problem)
            if refusal is not None:
                raise JobError(refusal)

    def deadline_passed(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def _open_study(self) -> None:
        job = self.job
        config = {"job": job.model_dump(), "identity": job.identity(), "fidelity": CONFIRM}
        identity = {"name": self.problem.name, **self.problem.identity()}
        try:
            existing = self.storage.get_study(job.study)
        except StorageError:
            existing = None
        self._made_study = False  # made by this run: dropped again if the run fails before writing to it
        if existing is not None and existing.kind not in ("search", ""):
            raise JobError(f"study {job.study!r} was made by {existing.made_by}, not by a search; give a new study "
                           "name")
        create = dict(kind="search", method=job.search.method, seed=job.seed, config=config, problem=identity,
                      exist_ok=True)
        try:
            try:
                st = self.storage.create_study(job.study, **create)
                self._made_study = existing is None
            except StorageError:  # another driver made it at the same moment: this one resumes it
                st = self.storage.create_study(job.study, **create)
        except StorageError as e:
            raise JobError(f"study {job.study!r}: {e}") from None
        self._metric = st.metric
        old = st.config.get("identity")
        if old is not None and old.get("bank_version") != job.identity()["bank_version"]:
            raise JobError(f"study {job.study!r} was scored on noise banks drawn by an earlier steptune (bank version "
                           f"{old.get('bank_version', 1)}, now {job.identity()['bank_version']}); its scores cannot be "
                           "mixed with new ones: give a new study name")
        if old is not None and old != job.identity() and st.n_trials == 0:  # nothing ran: the job may change
            self.storage.update_study_config(job.study, {"identity": job.identity()}, problem=identity)
            old = job.identity()
        then, now = (None, None) if old is None else (_as_built(old, self.problem),
                                                      _as_built(job.identity(), self.problem))
        if then != now:
            key = _first_difference(then, now)
            raise JobError(f"study {job.study!r} was run with a different job ({key} differs); resume it with the "
                           "same job or give a new study name")
        if old is None and st.n_trials:
            raise JobError(f"study {job.study!r} exists and was not made by a job file; give a new study name")
        stored = st.problem["identity"] if st.problem and st.n_trials else None  # what its trials were scored on
        refusal = mixing_refusal(job.study, stored, self.problem)
        if refusal is not None:
            raise JobError(refusal)
        if st.config.get("job") != config["job"]:  # a resume with a new budget (or cache): status shows this run's
            self.storage.update_study_config(job.study, {"job": config["job"]})

    def _say_unused_keys(self) -> None:
        """Keys the job sets that its other settings leave unused, each said once."""
        job = self.job
        if job.backend.kind == "local":
            fields = type(job.backend).model_fields
            ray_only = sorted(k for k in ("workers", "max_restarts", "num_cpus", "num_gpus", "address")
                              if getattr(job.backend, k) != fields[k].default)
            if ray_only:
                self.say(f"backend.{', backend.'.join(ray_only)} {'is' if len(ray_only) == 1 else 'are'} for "
                         "kind = \"ray\" only: in-process this run is the one evaluator")
        if not job.evaluation.baseline and job.evaluation.baseline_nfe:
            self.say("evaluation.baseline_nfe is not used: with baseline = false no presets are scored")

    def _say_resumed_before_search(self) -> None:
        """A resumed study whose search has not begun (a run stopped among its baselines) is said to be resumed here;
        one whose search has is said so as the search resumes, with its counts."""
        trials = self.storage.trials(self.job.study)
        if trials and not any(t.fidelity == CHEAP and "batch" in t.info for t in trials):
            queued = sum(t.status == "queued" for t in trials)
            self.say(f"resuming study {self.job.study!r}: {len(trials)} trials stored, {queued} of them queued; "
                     "nothing searched yet")

    def _recover(self) -> None:
        """Trials a stopped run left ``running``: re-queued (or failed when out of attempts)."""
        for t in self.storage.trials(self.job.study, status="running"):
            stale = t.heartbeat is None or (self._db_now() - t.heartbeat).total_seconds() > LEASE_SECONDS
            if driver_gone(t.worker) or stale:
                self.storage.requeue(t.id, f"the run that started it ({t.worker}) stopped")
                self.retried += 1
            else:
                raise JobError(f"study {self.job.study!r} is being run by another process (trial {t.number} is "
                               f"running under {t.worker}); wait for it to finish or stop it first")

    @staticmethod
    def _db_now():
        from steptune.storage.schema import utcnow

        return utcnow()

    @property
    def phase(self) -> str:
        return self._phase

    @phase.setter
    def phase(self, value: str) -> None:
        """The run's phase; a new one is written with the driver's lease at once, so ``status`` says what a run
        whose search has ended is still doing (confirming, refining)."""
        changed, self._phase = value != self._phase, value
        if changed and getattr(self, "_beating", None) is not None and not self._beating.is_set():
            try:
                self._plain_storage.beat_driver(self.job.study, self.driver, phase=value)
            except StorageError:
                pass  # the database is away: the next beat says it

    def _heartbeat(self) -> None:
        """One beat: the run's lease, with its phase, and the lease of each trial in flight."""
        storage = self._plain_storage
        sink = self._sink
        busy = len(set(list(sink.in_flight.values()))) if sink else 0  # in-process, starts are written with finishes
        try:
            if not storage.beat_driver(self.job.study, self.driver, phase=self.phase, busy=busy):
                holder = ((storage.get_study(self.job.study).config or {}).get("driver") or {}).get("id")
                self._taken_over = [holder]  # the run stops with DriverLost; its writes are refused meanwhile
                self.interrupt()
        except StorageError:
            pass  # the database is away: the writes wait for it, the next beat tries again
        for tid, worker in list(sink.in_flight.items()) if sink else []:
            try:
                storage.heartbeat(tid, worker)
            except StorageError:
                pass

    # ---- evaluation of stored trials ---------------------------------------------------------------

    def _submit(self, rows) -> list[int]:
        """Queue the stored ``queued`` rows on the backend; their trial ids."""
        if self._sink is None:
            self._sink = _Sink(self)
        tasks = []
        for t in rows:
            if t.status == "queued" and t.id not in self._submitted:
                tasks.append(Task(t.id, t.schedule, t.bank, t.n_samples))
                if t.error and t.error.startswith("re-queued"):  # a retry: keep the reason on the finished row
                    self._sink.notes.setdefault(t.id, t.error)
        self._submitted.update(t.trial_id for t in tasks)
        if self.phase != "search" and tasks:
            self.phase_counts.setdefault(self.phase, [0, 0])[1] += len(tasks)
        self.backend.submit(tasks)
        return [t.trial_id for t in tasks]

    def _evaluate(self, rows, ahead=()) -> None:
        """Evaluate the stored ``queued`` rows, and queue the ``ahead`` rows behind them; returns once the
        first are done (the others may still be in flight) or the run stops."""
        ids = [t.id for t in rows if t.status == "queued"]
        self._submit(rows)
        self._submit(ahead)
        sink = self._sink
        try:
            self.backend.pump(sink, until=lambda: all(i in sink.results for i in ids))
        except BaseException as e:  # what came back is still stored, unless the database is what failed
            if not isinstance(e, StorageError):
                sink.flush()
            raise
        sink.flush()

    def _progress_event(self, task: Task, result: dict) -> None:
        if result.get("seconds"):
            (self.eval_seconds if task.bank == CHEAP else self.heldout_seconds).append(float(result["seconds"]))
        if self.phase == "search":
            self.done += 1
            if self._rate_from is None:  # the rate is timed from this run's first search result: not its replay
                self._rate_from = (time.monotonic(), self.done)
            score = (result.get("metrics") or {}).get(self._metric) if result.get("status") == "complete" else None
            nfe = task.schedule.get("nfe")  # the schedule's dict, as stored
            if isinstance(score, (int, float)) and math.isfinite(score) and nfe is not None:  # as the stored score
                self.best[nfe] = min(self.best.get(nfe, math.inf), float(score))
        elif self.phase in self.phase_counts:
            self.phase_counts[self.phase][0] += 1
        self.failed += result.get("status") != "complete"
        if self.progress is not None:
            self.progress(self.status())

    def status(self) -> dict:
        elapsed = time.monotonic() - self.started
        rate = self._rate()
        eta = max(self.total - self.done, 0) / rate if rate and self.phase == "search" else None
        phase_done, phase_total = self.phase_counts.get(self.phase, (0, 0))
        sink = self._sink
        return {"phase": self.phase, "done": self.done, "total": self.total, "best": dict(self.best),
                "retried": self.retried, "failed": self.failed, "elapsed": elapsed, "eta": eta,
                "phase_done": phase_done, "phase_total": phase_total, "detail": self.phase_detail.get(self.phase, ""),
                "evaluators": len(self.backend.workers),
                "busy": len(set(sink.in_flight.values())) if sink is not None else 0}

    def _rate(self) -> float | None:
        """Search evaluations per second since this run's first search result (None before a second one): the
        searcher's replay of a resumed study and the first batch's start-up are not taken for the pace."""
        if self._rate_from is None:
            return None
        t0, done0 = self._rate_from
        elapsed = time.monotonic() - t0
        return (self.done - done0) / elapsed if elapsed > 0 and self.done > done0 else None

    # ---- phases ------------------------------------------------------------------------------------

    def _score_imports(self) -> None:
        """The schedules ``steptune import`` queued for this run, on the held-out bank, counted on their own (a job
        without baselines or confirmations scores them too)."""
        n = len(self._imports)
        self.say(f"scoring {n} imported schedule{'s' * (n != 1)} on the held-out bank")
        self._evaluate(self.storage.trials(self.job.study, ids=self._imports))

    def _baseline(self) -> None:
        """Every preset at every NFE on the held-out bank, at its default spacing and at the best of its spacings
        (chosen on the cheap fidelity of the train bank, the scores kept in the trial's ``info``), and what
        diffusers' stock schedulers do with their default config on the same noises."""
        have, nfes, pairs, variants, default = self._baseline_plan()
        items = []
        choose = {p for p, v in variants.items() if len(v) > 1}
        if choose:  # evaluated in this process, before the baselines are dispatched: counted on its own
            self.say(f"choosing the presets' spacings: {len(choose)} presets and NFEs, each at every spacing of the "
                     f"noise schedule on {self.job.evaluation.cheap_samples} train-bank states")
            self.phase = "spacing"
            self.phase_counts["spacing"] = [0, len(choose)]
        cut = False  # stopped before every preset and NFE was chosen and stored
        for i, (spec, nfe) in enumerate(pairs):
            if self.should_stop():  # what was chosen is stored below; a resume chooses the rest, in the same order
                cut, self.baselines_left = True, self._unstored(pairs[i:], have, variants, default)
                break
            items += self._preset_items(spec, nfe, default, have, variants.get((spec, nfe)))
            if (spec, nfe) in choose:
                self.phase_counts["spacing"][0] += 1
                if self.progress is not None:
                    self.progress(self.status())
        if not cut:  # a stop among the choices is said to have come there
            self.phase = "baseline"
        todo = self._diffusers_todo(have, nfes)
        if self.should_stop():
            cut, todo, self.baselines_left = cut or bool(todo), [], self.baselines_left + len(todo)
        self.phase_counts.setdefault("baseline", [0, 0])[1] += len(todo)  # run after the presets, counted with them
        if items and self.should_stop():
            self.say(f"stored {len(items)} preset schedules for the held-out bank; the next run scores them")
            self.storage.add_trials(self.job.study, items)
        elif items:
            then = f", then {len(todo)} of diffusers' schedulers at their default config" if todo else ""
            self.say(f"evaluating {len(items)} preset schedules on the held-out bank{then}")
            self.storage.add_trials(self.job.study, items)
        # the presets and imported schedules; queued search candidates are the search phase's, in their batches, and
        # queued confirmations the confirmation phase's
        self._evaluate([t for t in self.storage.trials(self.job.study, status="queued")
                        if not (t.fidelity == CHEAP and "batch" in t.info) and "confirms" not in t.info])
        skipped = self._diffusers_defaults(todo)
        cut, self.baselines_left = cut or bool(skipped), self.baselines_left + skipped
        self.baselines_finished = not cut and not any(
            t.info.get("baseline") for t in self.storage.trials(self.job.study, status="queued"))

    def _baseline_plan(self) -> tuple:
        """What the baseline phase has before it: the origins of the stored baselines, the NFEs, the (preset, NFE)
        pairs, the spacing variants of each pair whose best spacing is not chosen yet, and the default spacing."""
        from steptune.search import DEFAULT_PRESETS, baselines

        stored = [t for t in self.storage.trials(self.job.study) if t.info.get("baseline")]
        have = {t.info.get("origin") for t in stored}
        chosen = {t.info["best_of"] for t in stored if "best_of" in t.info}
        nfes = sorted(set(self.job.search.nfe) | set(self.job.evaluation.baseline_nfe or ()))
        pairs = [(spec, nfe) for spec in DEFAULT_PRESETS for nfe in nfes]
        variants = {p: self._spacing_variants(*p) for p in pairs if f"{p[0]}@{p[1]}" not in chosen}  # to choose
        return have, nfes, pairs, variants, baselines.default_spacing(self.problem)

    def _unstored(self, pairs, have: set, variants: dict, default: str | None) -> int:
        """How many of ``pairs`` lack a stored baseline: at the default spacing (where the preset has a schedule
        there) or at the best of its spacings (where there is one to choose)."""
        return sum(1 for spec, nfe in pairs if len(variants.get((spec, nfe)) or ()) > 1
                   or self._preset_items(spec, nfe, default, have, None))

    def _baselines_unstored(self) -> int:
        """Presets and NFEs, and diffusers' schedulers, without a stored baseline (a run stopped before its baseline
        phase began)."""
        have, nfes, pairs, variants, default = self._baseline_plan()
        return self._unstored(pairs, have, variants, default) + len(self._diffusers_todo(have, nfes))

    def _preset_items(self, spec: str, nfe: int, default: str | None, have: set, variants: list | None) -> list[dict]:
        """The baselines of preset ``spec`` at ``nfe`` not stored yet: at the default spacing (unless ``have`` holds
        its origin) and at the best of its spacing ``variants`` (None: chosen before), none where it has no
        schedule."""
        from steptune.search import baselines
        from steptune.space import ScheduleError, presets

        prob, items = self.problem, []
        try:
            sched = presets.build(spec, nfe, prob.noise, t_start=prob.t_start, t_end=prob.t_end,
                                  **({"spacing": default} if default else {}))
        except ScheduleError:
            return items  # this preset has no schedule at this NFE
        origin = baselines.origin(spec, nfe, default)
        info = {"baseline": True, "origin": origin}
        if origin not in have:  # named with its options, so preset:NAME rebuilds it
            items.append(self._item(replace(sched, name=baselines.with_spacing(spec, default)), CONFIRM, info))
        if variants is not None:
            best = self._best_spacing(spec, nfe, variants)
            if best is not None and best[0].key() == sched.key():  # the default spacing is the best one
                info.update({k: v for k, v in best[1].items() if k != "origin"})
            elif best is not None:
                items.append(self._item(best[0], CONFIRM, best[1]))
        return items

    def _driver_evaluator(self):
        """An evaluator of the job's problem in this process (the spacing choice and diffusers' own loops run here);
        the reference solutions come from the cache the workers share."""
        if getattr(self, "_local_evaluator", None) is None:
            import torch

            from steptune.evaluators import Evaluator

            ev = self.job.evaluation
            self._local_evaluator = Evaluator(self.problem, n_train=ev.train_samples, n_heldout=ev.heldout_samples,
                                              seed=ev.bank_seed, cache_dir=ev.cache,
                                              device="cuda" if torch.cuda.is_available() else "cpu")
        return self._local_evaluator

    def _spacing_variants(self, spec: str, nfe: int) -> list[tuple]:
        from steptune.search import baselines

        prob = self.problem
        return baselines.spacing_variants(spec, nfe, prob.noise, prob.t_start, prob.t_end)

    def _best_spacing(self, spec: str, nfe: int, variants: list[tuple]) -> tuple | None:
        """(schedule, info) of ``spec`` at ``nfe`` at its best spacing on the cheap fidelity (the scores of each of its
        spacing ``variants`` in ``info``), or None when it has fewer than two spacings or none scores."""
        from steptune.search import baselines

        if len(variants) < 2:
            return None
        n = self.job.evaluation.cheap_samples
        scores = baselines.spacing_scores(self._driver_evaluator(), variants, CHEAP, n)
        best = baselines.best_spacing(scores)
        sched = dict(variants).get(best)
        if sched is None:
            return None
        info = {"baseline": True, "origin": baselines.origin(spec, nfe, best), "best_of": f"{spec}@{nfe}",
                "spacing": best, "spacing_scores": scores, "spacing_bank": CHEAP, "spacing_samples": n}
        return sched, info

    def _diffusers_todo(self, have: set, nfes: list[int]) -> list[tuple[str, int]]:
        """(scheduler, NFE) of diffusers' stock schedulers not stored yet at ``nfes``: none where the model's
        conventions are not diffusers' (discrete VP) or diffusers is not installed (said)."""
        from steptune import diffusers_default as dd

        if dd.why_not(self.problem.model) is not None:
            return []
        import importlib.util

        if importlib.util.find_spec("diffusers") is None:
            self.say("diffusers is not installed: the baselines of its default schedulers are left out "
                     "(pip install 'steptune[diffusers]' adds them)")
            return []
        return [(name, nfe) for name in dd.SCHEDULERS for nfe in nfes if dd.origin(name, nfe) not in have]

    def _diffusers_defaults(self, todo: list[tuple[str, int]]) -> int:
        """diffusers' stock schedulers with their default config, each sampling the problem's model by its own
        step loop on the held-out noises, stored as complete trials; how many of them a stop left out."""
        from steptune import diffusers_default as dd

        items = []
        counts = self.phase_counts.setdefault("baseline", [0, 0])
        skipped = 0
        for i, (name, nfe) in enumerate(todo):
            if self.should_stop():
                skipped = len(todo) - i
                break
            origin = dd.origin(name, nfe)
            n = self.job.evaluation.heldout_samples
            try:
                res, sched = dd.evaluate(self._driver_evaluator(), name, nfe, CONFIRM, n)
            except Exception as e:  # a scheduler that cannot run this model: said, and left out
                self.say(f"{origin}: {type(e).__name__}: {e}")
                continue
            finally:
                counts[0] += 1
                if self.progress is not None:
                    self.progress(self.status())
            item = self._item(sched, CONFIRM, {"baseline": True, "origin": origin, "diffusers": name,
                                               "config": "default", "metrics_from": "diffusers step loop"})
            items.append({**item, "status": res.status, "metrics": {**res.metrics, **res.cost()},
                          "error": res.error, "seconds": res.seconds})
        if items:
            self.say(f"stored {len(items)} diffusers default-config baselines")
            self.storage.add_trials(self.job.study, items)
        return skipped

    def _item(self, schedule, bank: str, info: dict) -> dict:
        n = self.job.evaluation.cheap_samples if bank == CHEAP else self.job.evaluation.heldout_samples
        return {"schedule": schedule, "fidelity": bank, "bank": bank, "n_samples": n, "info": info,
                "max_attempts": self.job.backend.max_attempts}

    def _search(self) -> None:
        from steptune.search import Candidate
        from steptune.space import Schedule

        job, searcher = self.job, self.searcher
        batch_size = self._batch_size()
        rows = [t for t in self.storage.trials(job.study) if t.fidelity == CHEAP and "batch" in t.info]
        batches: dict[int, list] = {}
        for t in rows:
            batches.setdefault(int(t.info["batch"]), []).append(t)
        self.done = sum(1 for t in rows if t.status in ("complete", "failed", "pruned"))
        for t in rows:
            if t.status == "complete" and t.score is not None:
                self.best[t.nfe] = min(self.best.get(t.nfe, math.inf), t.score)
        if rows:
            left = len(rows) - self.done
            self.say(f"resuming study {job.study!r}: {self.done} search evaluations done"
                     + (f", {left} queued" if left else "")
                     + (f"; that is the whole budget ({self.total}) already: the queued ones are scored, and nothing "
                        "new is searched" if self.done >= self.total else ""))
        self._reserve_confirm_time()
        for c, score in self._spacing_results(started=bool(rows)):
            searcher.tell(c, score)
        lookahead = self._lookahead()
        asked: dict[int, dict] = {}  # batch -> {key: Candidate}, as the searcher asked it (or asks it again)
        exhausted: list[int] = []

        def ask(b: int) -> bool:
            """The searcher asks batch ``b``: a stored batch is asked again (the searcher rebuilds its state),
            a new one is stored. False when the search asks no more (budget, time, stop, nothing left)."""
            if b in batches:
                asked[b] = {c.key: c for c in searcher.ask(len(batches[b]))}
                return True
            left = self.total - sum(len(v) for v in batches.values())
            if left <= 0 or self.should_stop() or self._no_time_for_a_batch():
                return False
            self._batch_started.setdefault(b, time.monotonic())
            cands = searcher.ask(min(batch_size, left))
            if not cands:  # every schedule the method can make at these NFEs has been tried
                exhausted.append(b)
                return False
            batches[b] = self.storage.add_trials(job.study, [
                self._item(c.schedule, CHEAP, {"batch": b, "origin": c.origin, "params": _plain(c.params)})
                for c in cands], records=True)
            asked[b] = {c.key: c for c in cands}
            return True

        b, next_ask = 0, 0
        while True:
            # the searcher runs ``lookahead`` batches ahead of its results: batch b + lookahead is asked (and
            # evaluated) while batch b is, in the same order on every run, so a resume asks what the first did
            while next_ask <= b + lookahead and ask(next_ask):
                next_ask += 1
            if b >= next_ask:
                break
            stored = batches[b]
            if any(t.status in ("queued", "running") for t in stored):
                self._evaluate(stored, ahead=[t for k in range(b + 1, next_ask) for t in batches[k]])
                stored = batches[b] = self.storage.refresh(stored)
                if any(t.status in ("queued", "running") for t in stored):
                    return  # stopped (SIGINT or time budget) inside this batch; a resume finishes it
            for t in stored:
                c = asked[b].get(t.key) or Candidate(Schedule.from_dict(t.schedule), t.nfe, t.info.get("origin", ""),
                                                     dict(t.info.get("params") or {}))
                searcher.tell(c, t)
                if t.status == "complete" and t.score is not None:
                    self.best[t.nfe] = min(self.best.get(t.nfe, math.inf), t.score)
            if b in self._batch_started:
                self.batch_seconds = time.monotonic() - self._batch_started[b]
            del asked[b]
            b += 1
            self._reserve_confirm_time()
        if exhausted:
            self.say(f"the {job.search.method} search has no new schedule to try at NFE "
                     f"{', '.join(map(str, job.search.nfe))} after {self.done} evaluations: it has tried every one it "
                     f"can make there, so the budget's other {self.total - self.done} are not spent")
            self.storage.update_study_config(job.study, {"search_exhausted": self.done})
            self.search_exhausted = True

    def _spacing_results(self, started: bool) -> list[tuple]:
        """What choosing the presets' spacings measured, told to the searcher before its first batch: each preset
        at its best spacing (the default one included, where it won), with the cheap score it got there on the
        train bank at the search's sample count. The searcher then starts from the best a user could pick, not
        only from the presets at their default spacing, and pays nothing for it. Fixed for the study when its
        search starts (``search_told_spacings``): a study whose search began without it resumes without it."""
        from steptune.search import Candidate

        told = self.storage.get_study(self.job.study).config.get("search_told_spacings")
        if told is None:
            told = not started
            self.storage.update_study_config(self.job.study, {"search_told_spacings": told})
        if not told or self.searcher.metric != "rmse":
            return []
        out = []
        n, nfes = self.job.evaluation.cheap_samples, set(self.searcher.nfes)
        for t in self.storage.trials(self.job.study):
            info = t.info
            if not (info.get("baseline") and "best_of" in info and t.nfe in nfes and t.status != "failed"):
                continue
            score = (info.get("spacing_scores") or {}).get(info.get("spacing"))
            if info.get("spacing_bank") != CHEAP or info.get("spacing_samples") != n or score is None:
                continue
            out.append((Candidate(t.to_schedule(), t.nfe, info["origin"]), float(score)))
        return out

    def _lookahead(self) -> int:
        """Batches the searcher is asked ahead of its results: the job's ``search.lookahead``; else 1 on Ray
        (the next batch is asked and queued while this one is evaluated, so the evaluators do not wait for
        the searcher) and 0 in-process (where nothing runs meanwhile). Fixed for the study like the batch."""
        if self.job.search.lookahead is not None:
            return self.job.search.lookahead
        stored = self.storage.get_study(self.job.study).config.get("search_lookahead")
        if stored is not None:
            return int(stored)
        ahead = 1 if self.job.backend.kind == "ray" else 0
        self.storage.update_study_config(self.job.study, {"search_lookahead": ahead})
        return ahead

    def _batch_size(self) -> int:
        """Candidates asked at a time: the job's ``search.batch``; else enough to give every evaluator a full
        call (evaluators x in_flight, at least the searcher's own batch), fixed for the study when its search
        starts so that a resume on a different cluster asks what the first run would have."""
        if self.job.search.batch:
            return self.job.search.batch
        stored = self.storage.get_study(self.job.study).config.get("search_batch")
        if stored:
            return int(stored)
        searcher, spec = self.searcher, self.job.backend
        size = max(4, searcher.batch_per_nfe * len(searcher.nfes), len(self.backend.workers) * spec.in_flight)
        self.storage.update_study_config(self.job.study, {"search_batch": size})
        return size

    def _no_time_for_a_batch(self) -> bool:
        """True when the last batch (asking the searcher, evaluating, telling) took longer than the search has
        left, so one more would eat into the time reserved for confirmation."""
        if self.search_deadline is None or self.batch_seconds is None:
            return False
        if time.monotonic() + self.batch_seconds > self.search_deadline:
            self._out_of_time()
            return True
        return False

    def _reserve_confirm_time(self) -> None:
        """Stop searching early enough that confirmation still ends within the time budget."""
        if self.deadline is None:
            return
        n_confirm = self.job.evaluation.confirm * len(self.job.search.nfe)
        workers = max(1, len(self.backend.workers))
        needed = self._confirm_seconds() * math.ceil(n_confirm / workers)
        self.search_deadline = self.deadline - (2.0 * needed + CONFIRM_SLACK_SECONDS if n_confirm else 0.0)

    def _confirm_seconds(self) -> float:
        """What one held-out confirmation costs: measured on the held-out evaluations of this run (the baseline
        presets), else the cheap evaluations' cost scaled by the ratio of the banks' sizes."""
        def median(xs):
            xs = sorted(x for x in xs if x > 0)
            return xs[len(xs) // 2] if xs else None

        measured = median(self.heldout_seconds)
        if measured is not None:
            return measured
        scale = self.job.evaluation.heldout_samples / self.job.evaluation.cheap_samples
        return (median(self.eval_seconds) or 0.0) * scale

    def _confirm(self) -> None:
        job = self.job
        k = job.evaluation.confirm
        if k == 0:
            return
        trials = self.storage.trials(job.study)
        confirmed = {t.key for t in trials if t.fidelity == CONFIRM and not t.info.get("baseline")}
        items = []
        for nfe in job.search.nfe:
            rows = sorted((t for t in trials if t.fidelity == CHEAP and t.nfe == nfe and t.status == "complete"
                           and t.score is not None), key=lambda t: (t.score, t.number))
            picked = list(dict.fromkeys(t.key for t in rows))[:k]
            for key in picked:
                if key in confirmed:
                    continue
                t = next(r for r in rows if r.key == key)
                items.append(self._item(t.schedule, CONFIRM, {"confirms": t.number, "origin": t.info.get("origin")}))
        if items:
            self.storage.add_trials(job.study, items)
        self._evaluate([t for t in self.storage.trials(job.study, status="queued") if t.fidelity == CONFIRM])

    # ---- the outcome -----------------------------------------------------------------------------

    def _result(self) -> RunResult:
        trials = self.storage.trials(self.job.study)
        cheap = [t for t in trials if t.fidelity == CHEAP]
        status = "interrupted" if self.interrupted.is_set() else "time-budget" if self.time_up else "complete"
        if status == "complete" and any(t.status in ("queued", "running") for t in trials):
            status = "incomplete"
        finished = ("complete", "failed", "pruned")  # what a stopped run left queued is not counted as done
        return RunResult(self.job.study, status, sum(1 for t in cheap if t.status in finished),
                         sum(1 for t in trials if t.fidelity == CONFIRM and "confirms" in t.info
                             and t.status in finished),
                         sum(1 for t in trials if t.status == "failed"), self.retried,
                         time.monotonic() - self.started, summarize(trials, self.job.search.nfe),
                         self._utilisation(cheap),
                         sum(1 for t in trials if t.info.get("baseline") and t.status in ("queued", "running")),
                         self.baselines_finished, self.baselines_left, self.search_exhausted,
                         _imports_scored(trials, self._imports))

    def _utilisation(self, cheap) -> dict | None:
        """This run's search evaluations: how busy they kept the evaluators (stored with the study)."""
        from steptune.utilisation import utilisation

        mine = [t for t in cheap if t.worker and t.worker.startswith(self.driver + "/") and t.started is not None
                and t.started >= self.started_at]
        u = utilisation(mine, len(self.backend.workers))
        if u is None:
            return None
        record = {**u.as_dict(), "backend": self.job.backend.kind, "batch": self._batch_size()}
        self.storage.update_study_config(self.job.study, {"utilisation": record})
        return record


def _imports_scored(trials, ids: list[int]) -> list[dict]:
    """What became of the imported schedules ``ids``, each against the best held-out trial at its NFE."""
    out, wanted = [], set(ids)
    for t in (t for t in trials if t.id in wanted):
        best = min((b for b in trials if b.nfe == t.nfe and b.fidelity == CONFIRM and b.status == "complete"
                    and b.score is not None), key=lambda b: (b.score, b.number), default=None)
        others = sum(1 for b in trials if b.nfe == t.nfe and b.fidelity == CONFIRM and b.status == "complete"
                     and b.score is not None and b.id != t.id)
        out.append({"id": t.id, "nfe": t.nfe, "status": t.status, "score": t.score,
                    "best_id": best.id if best else None, "best_score": best.score if best else None,
                    "others": others})
    return out


def summarize(trials, nfes) -> list[NfeSummary]:
    """Per NFE: the best preset on the held-out bank, the searched schedule with the best held-out score and the
    best held-out score after refinement (of it, or a preset's refinement that beat the preset); an NFE interpolated
    from the searched ones (``info.interpolated``) is a row of its own, its interpolated schedule in the searched
    one's place."""
    by_number, by_id = {t.number: t for t in trials}, {t.id: t for t in trials}
    cheap_order = {t.number: i + 1 for i, t in enumerate(t for t in trials if t.fidelity == CHEAP)}
    between = {t.nfe: sorted(t.info["interpolated"]["between"]) for t in trials
               if t.fidelity == CONFIRM and "interpolated" in t.info and t.nfe not in nfes}
    out = []
    for nfe in sorted([*nfes, *between]):
        held = [t for t in trials if t.fidelity == CONFIRM and t.nfe == nfe and t.status == "complete"
                and t.score is not None]
        base = min((t for t in held if t.info.get("baseline")), key=lambda t: t.score, default=None)
        mine = "interpolated" if nfe in between else "confirms"
        found = min((t for t in held if mine in t.info), key=lambda t: (t.score, t.number), default=None)
        src = by_number.get(found.info["confirms"]) if found and mine == "confirms" else None
        fits = [t for t in trials if t.nfe == nfe and t.info.get("refines") in by_id
                and t.status in ("complete", "pruned") and t.score is not None]  # pruned: its parent stays
        refined = min(_refined_scores(fits, by_id), default=None)
        if refined is not None and found is not None:  # a refinement screened with it refines another schedule
            refined = min(refined, found.score)
        match = None
        if found is not None:
            match = min((t.nfe for t in trials if t.info.get("baseline") and t.status == "complete"
                         and t.score is not None and t.score <= found.score), default=None)
        out.append(NfeSummary(nfe, _baseline_name(base.info["origin"]) if base else None,
                              base.score if base else None, found.score if found else None,
                              found.id if found else None, cheap_order.get(src.number) if src else None, match,
                              found.schedule if found else None, between.get(nfe), refined,
                              src.score if src else None))
    return out


def _refined_scores(fits, by_id: dict):
    """What refinement left at an NFE: each refinement that beat its parent, and each searched parent whose
    refinement did not (it stays); a preset whose refinement lost is the preset column's score, not a refined one."""
    for t in fits:
        if t.status == "complete":
            yield t.score
        parent = by_id[t.info["refines"]]
        if not parent.info.get("baseline") and parent.score is not None:
            yield parent.score


def _baseline_name(origin: str) -> str:
    """What a baseline is called in summaries: its preset spec with the spacing chosen for it, as
    ``preset:SPEC`` rebuilds it (``ddim:spacing=diffusers-leading``), or ``diffusers-default:SCHEDULER``."""
    from steptune.search.baselines import with_spacing

    name, _, rest = origin.removeprefix("preset:").rpartition("@")
    spacing = rest.partition(" ")[2].removeprefix("spacing=")
    return with_spacing(name, spacing or None)


def _plain(params: dict) -> dict:
    out = {}
    for k, v in params.items():
        if hasattr(v, "item"):
            v = v.item()
        out[str(k)] = v if isinstance(v, (int, float, str, bool, type(None), list, dict)) else repr(v)
    return out


def _as_built(identity: dict, problem) -> dict:
    """A job's identity with the problem's conventions it leaves to their defaults (noise, prediction, time input,
    time scale, guidance) as ``problem`` resolved them, so a job that names a default (``--noise vp-linear``) is the
    job that left it out; a noise schedule is named as ``--noise`` names it."""
    from steptune.space import noise as noise_mod

    spec = dict(identity.get("problem") or {})
    model = problem.model
    built = {"noise": noise_mod.name_of(problem.noise), "prediction": model.prediction,
             "time_input": model.time_input, "time_scale": model.time_scale, "guidance_scale": model.guidance_scale}
    for key, value in built.items():
        if spec.get(key) is None and value is not None:
            spec[key] = value
    return {**identity, "problem": spec}


def _first_difference(a, b) -> str:
    key = first_change(a, b, every_key=True)
    return f"'{key}' ({value_at(a, key)!r} then, {value_at(b, key)!r} now)"


__all__ = ["BackendError", "NfeSummary", "RunResult", "Runner", "summarize"]
