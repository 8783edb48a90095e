"""Evaluation throughput on gmm-digits: true evaluations per second in-process, and through the Ray
backend with 1 and 2 evaluator processes. Targets: 2 Ray evaluators >= 1.7x one; the Ray backend's
overhead against in-process with one worker <= 15%. Then whole S^3 searches the same three ways, with the
searcher's own time (ask and tell, and with the predictor fits of its background thread) per evaluation against
one evaluation's sampling time (target <= 10%) and two Ray evaluators against in-process (target >= 1.7x), each
the median of ``--job-repeats`` runs.

    python bench/scaling.py [--candidates 240] [--samples 64] [--repeats 3] [--job-evaluations 300] [--job-repeats 3]
        [--in-flight 2] [--jobs-only] [--job-backends in-process,ray-x1,ray-x2]
    python bench/scaling.py --searcher-only    # the S^3 searcher alone, no evaluations: CPU per evaluation

Candidates are random schedules at NFE 4-10 from the search space (the mix a search evaluates), each
scored on ``--samples`` states of the train bank; the references are computed and cached first.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, save_json  # noqa: E402

from steptune.backends import LocalBackend, RayBackend, Task  # noqa: E402
from steptune.jobs import BackendSpec, EvaluationSpec, ProblemSpec  # noqa: E402


class Sink:
    def __init__(self):
        self.count = 0
        self.failed = 0

    def start(self, dispatched):
        pass

    def flush(self):
        pass

    def done(self, finished):
        self.count += len(finished)
        self.failed += sum(result["status"] != "complete" for _, result in finished)

    def lost(self, task, worker, reason):
        return True

    def stopping(self):
        return False


def candidates(problem, n: int, seed: int = 0) -> list[dict]:
    from steptune.search import DecisionSpace

    space = DecisionSpace(problem.noise, problem.t_start, problem.t_end)
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        c = space.random(int(rng.integers(4, 11)), rng)
        if c is not None:
            out.append(c.to_dict())
    return out


def rate(backend, tasks) -> tuple[float, int]:
    sink = Sink()
    t0 = time.perf_counter()
    backend.run(tasks, sink)
    secs = time.perf_counter() - t0
    assert sink.count == len(tasks)
    return len(tasks) / secs, sink.failed


# option name -> the name its rows carry, backend kind, evaluators
JOB_BACKENDS = {"in-process": ("in-process", "local", None), "ray-x1": ("ray x1", "ray", 1),
                "ray-x2": ("ray x2", "ray", 2)}


def job_rates(problem: str, evaluations: int, db_path: Path, options: dict | None = None,
              in_flight: int = 2, backends: Sequence[str] = tuple(JOB_BACKENDS)) -> list[dict]:
    """Whole S^3 searches (5 NFEs, no baseline or confirmation) on each of ``backends`` (in-process, 1 and 2 Ray
    evaluators): evaluations per second including the searcher's own time between batches."""
    from steptune.jobs import job_from_dict
    from steptune.runner import Runner
    from steptune.storage import connect

    rows = []
    for key in backends:
        name, kind, workers = JOB_BACKENDS[key]
        job = job_from_dict({"study": name, "seed": 0, "problem": {"name": problem},
                             "search": {"method": "s3", "nfe": [4, 5, 6, 8, 10], "options": options or {}},
                             "evaluation": {"cheap_samples": 64, "confirm": 0, "baseline": False,
                                            "cache": "runs/cache"},
                             "budget": {"evaluations": evaluations},
                             "backend": {"kind": kind, "workers": workers, "num_cpus": 1, "in_flight": in_flight}})
        backend = (LocalBackend(job.problem, job.evaluation, job.backend) if kind == "local"
                   else RayBackend(job.problem, job.evaluation, job.backend))
        backend.start()
        with connect(f"sqlite:///{db_path}") as db:
            runner = Runner(job, db, backend)
            runner.prepare()  # builds the searcher
            searcher_s = time_searcher(runner.searcher)
            storage_s = time_calls(runner.storage, STORAGE_CALLS)
            worker_s = time_calls(backend.worker, ("evaluate",)) if kind == "local" else None
            t0 = time.perf_counter()
            res = runner.run()
            secs = time.perf_counter() - t0
            sampling = sum(t.seconds or 0 for t in db.trials(name))
            fits = getattr(runner.searcher, "background_fit_cpu_seconds", 0.0)
        per_call = backend.sent[1] / backend.sent[0] if kind == "ray" and backend.sent[0] else None
        backend.close()
        n = res.evaluations
        u = res.utilisation or {}
        # the evaluators' time with nothing dispatched to them: what the driver (searcher, storage, batch ends)
        # costs the evaluations, after what it did while they ran
        wait = u["evaluators"] * u["seconds"] - u["busy_seconds"] if u else None
        rows.append({"backend": name, "evaluations": n, "seconds": secs, "evals_per_s": n / secs,
                     "tasks_per_call": per_call, "sampling_seconds": sampling, "searcher_seconds": searcher_s[0],
                     "searcher_cpu_seconds": searcher_s[1], "searcher_ms_per_eval": 1000 * searcher_s[0] / n,
                     "searcher_cpu_ms_per_eval": 1000 * searcher_s[1] / n, "eval_ms": 1000 * sampling / n,
                     "searcher_vs_eval": searcher_s[0] / sampling, "fit_thread_cpu_ms_per_eval": 1000 * fits / n,
                     "searcher_and_fits_vs_eval": (searcher_s[0] + fits) / sampling,
                     "storage_ms_per_eval": 1000 * storage_s[0] / n, "storage_cpu_ms_per_eval": 1000 * storage_s[1] / n,
                     "all_vs_eval": (searcher_s[0] + fits + storage_s[0]) / sampling,
                     # in-process, the whole of each evaluation as its worker runs it: sampling and measuring
                     "evaluation_ms": 1000 * worker_s[0] / n if worker_s else None,
                     "all_vs_evaluation": (searcher_s[0] + fits + storage_s[0]) / worker_s[0] if worker_s else None,
                     "evaluators": u.get("evaluators"), "evaluators_busy": u.get("fraction"),
                     "wait_ms_per_eval": 1000 * wait / n if wait is not None else None,
                     "wait_vs_eval": wait / sampling if wait is not None else None})
    return rows


def median_row(runs: list[dict]) -> dict:
    """One backend's runs as one row: the median of each figure."""
    return {k: (statistics.median(r[k] for r in runs) if isinstance(v, float) else v) for k, v in runs[0].items()}


def warm_imports() -> float:
    """Import what the searcher's first fits import, and load (or compile) its compiled trees, once, before the
    timed searches (the first one would otherwise pay it alone); returns the seconds it took."""
    t0 = time.perf_counter()
    import scipy.stats  # noqa: F401

    from steptune.search.trees import BoostedTrees, RandomizedTrees

    X, y = np.random.default_rng(0).random((8, 2)), np.arange(8.0)
    BoostedTrees(n_estimators=2, subsample=0.8).fit(X, y).predict(X)
    RandomizedTrees(n_estimators=2).fit(X, y).predict_each(X)
    return time.perf_counter() - t0


def time_searcher(searcher) -> list[float]:
    """Wrap the searcher's ask and tell so the seconds spent in them add up in the returned list: [wall seconds,
    CPU seconds of the calling thread] (on a loaded machine the wall time includes waiting for a core)."""
    return time_calls(searcher, ("ask", "tell"))


STORAGE_CALLS = ("add_trials", "trials", "refresh", "record")  # what a search's driver writes and reads


def time_calls(obj, names) -> list[float]:
    """Wrap the methods ``names`` of ``obj`` so the seconds spent in them add up in the returned list: [wall
    seconds, CPU seconds of the calling thread]."""
    spent = [0.0, 0.0]

    def timed(method):
        def run(*a, **kw):
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                return method(*a, **kw)
            finally:
                spent[0] += time.perf_counter() - t0
                spent[1] += time.thread_time() - c0
        return run

    for name in names:
        setattr(obj, name, timed(getattr(obj, name)))
    return spent


def searcher_alone(problem: str, nfes: list[int], per_nfe: int, batch: int) -> dict:
    """The S^3 searcher driven alone, with a smooth score computed from each schedule instead of an evaluation
    (the spread of its lambda steps plus its first step's order): CPU seconds per evaluation in ask and tell (the
    asking thread's, which is what holds up a driver), making children within them, and the predictor fits, which
    run in the searcher's background thread. Timed by CPU, so a loaded machine moves it less than the wall-clock
    figures above."""
    from steptune.backends import build_problem
    from steptune.search import make_searcher, s3

    p = build_problem(ProblemSpec(name=problem))
    se = make_searcher("s3", p.noise, p.t_start, p.t_end, nfes, seed=0)
    children = [0.0]
    make = s3.S3Searcher._children

    def timed(*a, **kw):
        c0 = time.thread_time()
        try:
            return make(*a, **kw)
        finally:
            children[0] += time.thread_time() - c0

    s3.S3Searcher._children = timed
    gc.freeze()  # as a job's search sets the heap it starts with aside from the collector
    try:
        total, cpu = per_nfe * len(nfes), 0.0
        while len(se.trials) < total:
            c0 = time.thread_time()
            for c in se.ask(min(batch, total - len(se.trials))):
                se.tell(c, float(np.std(np.diff(se.space.lams(c.schedule)))) + 0.01 * c.schedule.steps[0].order)
            cpu += time.thread_time() - c0
    finally:
        s3.S3Searcher._children = make
        gc.unfreeze()
    n = len(se.trials)
    return {"nfes": nfes, "per_nfe": per_nfe, "batch": batch, "cpu_ms_per_eval": 1000 * cpu / n,
            "fits_ms_per_eval": 1000 * se.background_fit_cpu_seconds / n,
            "children_ms_per_eval": 1000 * children[0] / n, "predictor": se.state()["predictor"],
            "fit_ms": fit_times(se, nfes[0])}


def fit_times(se, nfe: int, repeats: int = 10) -> dict:
    """CPU ms per fit of each tree kind on the searcher's trials at ``nfe``, as S^3 fits it (its compiled trees)
    and with scikit-learn's estimators of the same settings; and how far apart their predictions are there."""
    from sklearn.ensemble import ExtraTreesRegressor, GradientBoostingRegressor

    from steptune.search import s3

    X, nfes, scores = se._data()
    rows = nfes == nfe
    X, y = X[rows], s3.rank_targets(nfes[rows], np.log(scores[rows]))
    X = X[:, X.min(axis=0) < X.max(axis=0)]
    et, gbr = s3.TREE_SETTINGS["extra-trees"], s3.TREE_SETTINGS["gbr"]
    makers = {"extra-trees": (lambda: s3.RandomizedTrees(**et),
                              lambda: ExtraTreesRegressor(**et, max_features=1.0, random_state=0, n_jobs=1)),
              "gbr": (lambda: s3.BoostedTrees(**gbr), lambda: GradientBoostingRegressor(**gbr, random_state=0))}
    out = {"rows": int(rows.sum()), "features": int(X.shape[1])}
    for kind, (ours, theirs) in makers.items():
        models = []
        for name, make in (("compiled", ours), ("sklearn", theirs)):
            models.append(make().fit(X, y))  # a first fit outside the timing: imports, compilation
            c0 = time.thread_time()
            for _ in range(repeats):
                make().fit(X, y)
            out[f"{kind}_{name}_ms"] = 1000 * (time.thread_time() - c0) / repeats
        out[f"{kind}_max_difference"] = float(np.abs(models[0].predict(X) - models[1].predict(X)).max())
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--candidates", type=int, default=240)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--problem", default="gmm-digits")
    ap.add_argument("--job-evaluations", type=int, default=300,
                    help="also run whole S^3 searches with this many evaluations per NFE (0: skip)")
    ap.add_argument("--job-repeats", type=int, default=3,
                    help="runs of each whole search (their medians are reported); the machine's load moves them")
    ap.add_argument("--options", default="{}", help="S^3 options for the whole searches, as JSON")
    ap.add_argument("--in-flight", type=int, default=2,
                    help="candidates per call to a Ray evaluator, two calls queued on each (backend.in_flight; "
                         "more where they are quick)")
    ap.add_argument("--searcher-only", action="store_true",
                    help="only time the S^3 searcher alone, without evaluations (CPU per evaluation)")
    ap.add_argument("--jobs-only", action="store_true",
                    help="only run the whole searches, not the evaluations alone before them")
    ap.add_argument("--job-backends", default=",".join(JOB_BACKENDS),
                    help=f"the backends the whole searches run on, comma-separated ({', '.join(JOB_BACKENDS)})")
    args = ap.parse_args()
    job_backends = [b for b in args.job_backends.split(",") if b]
    unknown = [b for b in job_backends if b not in JOB_BACKENDS]
    if unknown or not job_backends:
        ap.error(f"--job-backends {args.job_backends!r}: {unknown[0] if unknown else 'nothing'} is not a backend; "
                 f"give some of {', '.join(JOB_BACKENDS)}, comma-separated")
    if args.searcher_only:
        warm_imports()
        alone = [searcher_alone(args.problem, nfes, 300, batch) for nfes, batch in (([5], 4), ([4, 5, 6, 8, 10], 20))]
        for r in alone:
            print(f"S^3 searcher alone, NFE {','.join(map(str, r['nfes']))} x {r['per_nfe']}, batch {r['batch']}: "
                  f"{r['cpu_ms_per_eval']:.2f} ms CPU per evaluation in ask and tell (making children "
                  f"{r['children_ms_per_eval']:.2f}); predictor fits ({r['predictor']}) in the background thread "
                  f"{r['fits_ms_per_eval']:.2f}")
            f = r["fit_ms"]
            print(f"  one fit on its {f['rows']} trials at NFE {r['nfes'][0]} ({f['features']} features), CPU ms: "
                  f"extra-trees {f['extra-trees_compiled_ms']:.1f} (scikit-learn {f['extra-trees_sklearn_ms']:.1f}, "
                  f"predictions apart by at most {f['extra-trees_max_difference']:.1g}), gradient boosting "
                  f"{f['gbr_compiled_ms']:.1f} (scikit-learn {f['gbr_sklearn_ms']:.1f}, at most "
                  f"{f['gbr_max_difference']:.2g})")
        print(f"saved {save_json('scaling-searcher', {'problem': args.problem, 'searcher_alone': alone})}")
        return

    import ray

    from steptune.backends import build_problem

    # three logical CPU slots for the 1 + 2 actors held at once; only one backend runs at a time
    if not args.jobs_only or any(JOB_BACKENDS[b][1] == "ray" for b in job_backends):
        ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False)
    rows, speedup, overhead, tasks = [], None, None, []
    if not args.jobs_only:
        problem = ProblemSpec(name=args.problem)
        evaluation = EvaluationSpec(cheap_samples=args.samples, train_samples=256, heldout_samples=1024,
                                    cache="runs/cache")
        scheds = candidates(build_problem(problem), args.candidates)
        tasks = [Task(i, s, "train", args.samples) for i, s in enumerate(scheds)]
        local = LocalBackend(problem, evaluation, BackendSpec(kind="local", num_cpus=1))
        local.start()  # computes and caches the references
        backends = {"in-process": local}
        for n in (1, 2):
            b = RayBackend(problem, evaluation, BackendSpec(kind="ray", workers=n, num_cpus=1,
                                                            in_flight=args.in_flight))
            b.start()
            backends[f"ray x{n}"] = b
        rates = {name: [] for name in backends}
        failed = 0
        for b in backends.values():  # warm-up pass: first-call costs (imports, allocator) out of the timing
            rate(b, tasks[:8])
        for _ in range(args.repeats):  # interleaved, so a load change on the machine hits every backend alike
            for name, b in backends.items():
                r, f = rate(b, tasks)
                rates[name].append(r)
                failed += f
        for b in backends.values():
            b.close()
        med = {k: statistics.median(v) for k, v in rates.items()}
        rows = [{"backend": k, "evals_per_s": med[k], "runs": rates[k]} for k in rates]
        speedup = med["ray x2"] / med["ray x1"]
        overhead = med["in-process"] / med["ray x1"] - 1
        print(f"{'backend':<12} {'evals/s':>10}   (median of {args.repeats}; {len(tasks)} candidates, "
              f"{args.samples} samples each, {failed} failed runs)")
        for r in rows:
            print(f"{r['backend']:<12} {r['evals_per_s']:>10.1f}")
        print(f"2 Ray evaluators vs 1: {speedup:.2f}x (target >= 1.7x)")
        print(f"Ray backend overhead vs in-process, 1 worker: {100 * overhead:.1f}% (target <= 15%)")
    jobs, job_runs, import_s = [], [], 0.0
    if args.job_evaluations:
        import_s = warm_imports()
        for k in range(max(1, args.job_repeats)):  # each repeat runs the backends in turn, in a fresh db
            db_path = OUT / f"scaling-jobs-{k}.db"
            db_path.unlink(missing_ok=True)
            job_runs.append(job_rates(args.problem, args.job_evaluations, db_path, json.loads(args.options),
                                      args.in_flight, job_backends))
            db_path.unlink(missing_ok=True)
        jobs = [median_row([run[i] for run in job_runs]) for i in range(len(job_runs[0]))]
    if ray.is_initialized():
        ray.shutdown()

    if jobs:
        print(f"whole S^3 searches (medians of {len(job_runs)} runs of each backend):")
    for r in jobs:
        print(f"whole S^3 search, {r['backend']:<10}: {r['evals_per_s']:6.1f} evals/s ({r['evaluations']} in "
              f"{r['seconds']:.1f} s, of which sampling {r['sampling_seconds']:.1f} s); searcher "
              f"{r['searcher_ms_per_eval']:.1f} ms per evaluation ({r['searcher_cpu_ms_per_eval']:.1f} ms CPU) = "
              f"{100 * r['searcher_vs_eval']:.0f}% of one evaluation ({r['eval_ms']:.1f} ms; target <= 10%); predictor "
              f"fits in the background thread {r['fit_thread_cpu_ms_per_eval']:.1f} ms CPU per evaluation; both "
              f"together {100 * r['searcher_and_fits_vs_eval']:.0f}%; the driver's storage reads and writes "
              f"{r['storage_ms_per_eval']:.1f} ms per evaluation ({r['storage_cpu_ms_per_eval']:.1f} ms CPU); "
              f"all three {100 * r['all_vs_eval']:.0f}%"
              + (f", {100 * r['all_vs_evaluation']:.0f}% of a whole evaluation as the worker runs it (sampling and "
                 f"measuring, {r['evaluation_ms']:.1f} ms)" if r["evaluation_ms"] else "")
              + (f"; {r['tasks_per_call']:.1f} candidates per call" if r["tasks_per_call"] else "")
              + (f"; the evaluators busy {100 * r['evaluators_busy']:.1f}% of the run, waiting for the driver "
                 f"{r['wait_ms_per_eval']:.2f} ms per evaluation = {100 * r['wait_vs_eval']:.1f}% of one evaluation"
                 if r["evaluators_busy"] is not None else ""))
    ratios = []
    if jobs:
        print(f"(imports and compiled trees the searcher's first fits need, loaded once before the searches: "
              f"{import_s:.1f} s)")
    if jobs and {"in-process", "ray-x2"} <= set(job_backends):
        ratios = [by["ray x2"] / by["in-process"]
                  for by in ({r["backend"]: r["evals_per_s"] for r in run} for run in job_runs)]
        fastest = {name: min(r["seconds"] for run in job_runs for r in run if r["backend"] == name)
                   for name in ("in-process", "ray x2")}
        print(f"whole S^3 search, 2 Ray evaluators vs in-process: {statistics.median(ratios):.2f}x, median of "
              f"{', '.join(f'{x:.2f}' for x in ratios)}; the fastest run of each: "
              f"{fastest['in-process'] / fastest['ray x2']:.2f}x (target >= 1.7x)")
    path = save_json("scaling", {"problem": args.problem, "candidates": len(tasks), "samples": args.samples,
                                 "repeats": args.repeats, "rows": rows, "speedup_2_vs_1": speedup, "jobs": jobs,
                                 "job_evaluations_per_nfe": args.job_evaluations, "ray_overhead": overhead,
                                 "job_runs": job_runs, "ray_x2_vs_in_process": ratios,
                                 "options": json.loads(args.options), "in_flight": args.in_flight,
                                 "job_backends": job_backends})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
