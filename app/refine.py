"""Refinement of a searched study's schedules (`steptune refine` and a job's ``[refine]`` stage).

The parents are the best searched schedules per NFE on the held-out bank (the confirmations; neither the
baselines nor earlier refinements), or one trial the user names. With ``structures`` above 1 an NFE's best searched
schedule is screened with the best searched schedules of other structures (``structure_parents``,
``steptune.search.refine.refine_best``) and the most promising is refined on. A job's stage also refines, per
NFE, the best preset at its best spacing (``preset_parents``): a searched schedule mostly of order 2 cannot be
refined into what a refined order-3 preset reaches at NFE 8 and more, so both are refined and the better one on the
held-out bank is the NFE's best. Each refinement is stored as a new trial
of the same study on the held-out bank, its ``info`` naming the parent (``refines``: the parent's trial
id) and what was fitted (``refine``). One that beats its parent there is ``complete`` and so competes in
``best()`` and exports; one that does not is stored ``pruned`` (kept for the record, never preferred). A
parent with a refinement is not refined again.

Then (``[refine] neighbours``, ``neighbour_pass``), in sweeps down and up the refined NFEs, each NFE's schedules
built from its neighbour's best by ``steptune.space.retime.interpolate`` are stored (``info.neighbour``) and
refined in the same way: the NFE's best is the best of all of it.

A job may also ask for NFEs it did not search (``[refine] interpolate``): each is built from the best schedules
of the searched NFEs (refined ones where they won) by ``steptune.space.retime.interpolate``, scored on the
held-out bank and stored as a trial of its own (``info.interpolated``), then refined like a searched parent, and the
best preset there with it; with ``neighbours``, the sweeps run again over the searched and the interpolated NFEs
together (``neighbour_pass``): each interpolated NFE gets schedules built from its neighbours'
best, and each searched NFE schedules built from the interpolated NFEs' best (on gmm-digits, one seed of three: NFE 8
built from the refined NFE 9 scored 0.0140 where the NFE had 0.0161), each refined on its own.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from shlex import quote as shell_quote

from steptune.evaluators import EvalResult
from steptune.evaluators.load import load_error_text
from steptune.search import CONFIRM
from steptune.search.refine import (
    GATE,
    TRIMS,
    RefineError,
    RefineResult,
    as_trims,
    refine_best,
    refined_structure,
    screen_length,
)
from steptune.suggested import command

ORIGIN = "refine"
SWEEPS = 6  # most sweeps of the neighbour pass (down, up, ...); most jobs settle in fewer


@dataclass
class Refined:
    """One refinement (``trial``: the stored refinement's id; None when skipped): of ``parent``, or of the most
    promising of ``structures`` parents after screening, ``parent`` being the one refined on. ``start_rmse`` is the
    best held-out RMSE among them (the parent's where it was alone): ``change`` is against it."""

    nfe: int
    parent: int  # trial id
    parent_rmse: float
    rmse: float | None
    seconds: float
    improved: bool | None  # better than its parent on the held-out bank (stored complete)
    trial: int | None
    skipped: str | None = None  # why the parent was not refined this time
    structures: int = 1
    start_rmse: float | None = None
    built_from: int | None = None  # the NFE whose best its parents were built from (``neighbour_pass``)

    def __post_init__(self):
        if self.start_rmse is None:
            self.start_rmse = self.parent_rmse

    @property
    def change(self) -> float | None:
        return None if self.rmse is None else self.rmse / self.start_rmse - 1.0

    def as_dict(self) -> dict:
        return {"nfe": self.nfe, "parent": self.parent, "parent_rmse": self.parent_rmse, "rmse": self.rmse,
                "change": self.change, "seconds": self.seconds, "improved": self.improved, "trial": self.trial,
                "skipped": self.skipped, "structures": self.structures, "start_rmse": self.start_rmse,
                "built_from": self.built_from}


def screened_start(rec: dict) -> float | None:
    """The best held-out RMSE before a stored refinement (its ``info.refine``): of the parents it was screened with,
    or of its parent alone (None when not recorded)."""
    screened = rec.get("screened")
    return min(x["parent_rmse"] for x in screened) if screened else rec.get("parent_rmse")


def is_refinement(t) -> bool:
    return "refines" in t.info


def searched(t) -> bool:
    """A searched schedule's held-out score: a confirmation, not a baseline, a refinement, an interpolation or a
    schedule built from another NFE's best."""
    return (t.fidelity == CONFIRM and t.status == "complete" and t.score is not None and not t.info.get("baseline")
            and not is_refinement(t) and "interpolated" not in t.info and "neighbour" not in t.info)


def study_job(store, study: str):
    """The job a searched study was run with (RefineError for a study not made by a search)."""
    from steptune.jobs import JobError, job_from_dict

    rec = store.get_study(study)
    if rec.kind not in ("search", "") or "job" not in (rec.config or {}):
        why = "it holds no job it was run with" if rec.kind == "search" else f"it was made by {rec.made_by}"
        raise RefineError(f"study {study!r} is not a search ({why}); refine a study made by 'steptune run' or "
                          "'steptune search'")
    try:
        return job_from_dict(rec.config["job"], where=f"study {study!r}")
    except JobError as e:
        raise RefineError(f"{e}; the study's job cannot be rebuilt by this steptune") from None


def study_evaluator(job, device: str | None = None, stored: dict | None = None):
    """The evaluator of the job's problem, with the job's banks (the search's references come from its cache).
    ``stored``: the study's problem (``StudyRecord.problem``); a problem built here with other weights or settings is
    refused, so refinements are never scored on another model than their parents."""
    import torch

    from steptune.backends import build_problem
    from steptune.evaluators import Evaluator

    try:
        problem = build_problem(job.problem)
    except Exception as e:  # an import error of a plugged model, a missing checkpoint, a refused option
        raise RefineError(f"study {job.study!r}: its problem {job.problem.describe()!r} cannot be rebuilt here "
                          f"({load_error_text(e)}); refine where the model is available") from None
    from steptune.study_problem import mixing_refusal

    refusal = mixing_refusal(job.study, (stored or {}).get("identity"), problem)
    if refusal is not None:
        raise RefineError(refusal)
    ev = job.evaluation
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return Evaluator(problem, n_train=ev.train_samples, n_heldout=ev.heldout_samples, seed=ev.bank_seed,
                     cache_dir=ev.cache, device=device)


def parents(trials: list, study: str, nfes: list[int] | None = None, trial: int | None = None) -> list:
    """The trials to refine: ``trial`` (an id) alone, else the best searched trial at each NFE (of ``nfes``)."""
    if trial is not None:
        t = next((t for t in trials if t.id == trial), None)
        if t is None:
            raise RefineError(f"study {study!r} has no trial id {trial}; "
                              f"{command('steptune', 'best', '--study', study)} lists its best trials")
        if t.status != "complete" or t.score is None:
            raise RefineError(f"trial id {trial} of study {study!r} is {t.status}, not a complete scored trial; "
                              "refine a complete one")
        return [t]
    if not trials:
        raise RefineError(f"study {study!r} has no trials yet; run its search first")
    best: dict[int, object] = {}
    for t in trials:
        if searched(t) and (t.nfe not in best or (t.score, t.number) < (best[t.nfe].score, best[t.nfe].number)):
            best[t.nfe] = t
    if not best:
        raise RefineError(f"study {study!r} has no searched schedule scored on the held-out bank yet; let its "
                          "search finish (the confirmation phase scores them)")
    if nfes is not None:
        missing = sorted(set(nfes) - set(best))
        if missing:
            raise RefineError(f"study {study!r} has no searched schedule at NFE {missing[0]}; it has NFE "
                              f"{', '.join(map(str, sorted(best)))}")
        return [best[n] for n in sorted(set(nfes))]
    return [best[n] for n in sorted(best)]


def trial_item(parent, result: RefineResult, screened: list[dict] | None = None, trim: float | None = None) -> dict:
    """The stored trial of one refinement: the best iterate on the held-out bank, ``pruned`` when it does not
    beat its parent there. Its metrics are the held-out evaluation's, with what the whole refinement cost
    (``model_calls``: the fit's and the checks', the screening's included) where an evaluation's cost goes.
    ``screened``: the parents screened with it (``refine_best``), each with its held-out RMSE before and after (and
    its trim, where several were screened); ``trim``: the share of the fit states the refinement left out."""
    res = result.candidate_result
    metrics = {**res.metrics, **res.cost(), "model_calls": result.model_calls}
    origin = parent.info.get("origin") or f"trial {parent.number}"
    info = result.info() | ({"screened": screened} if screened else {}) | ({} if trim is None else {"trim": trim})
    return {"schedule": result.candidate.to_dict(), "fidelity": CONFIRM, "bank": CONFIRM, "n_samples": res.n,
            "metrics": metrics, "status": "complete" if result.improved else "pruned", "seconds": result.seconds,
            "info": {"refines": parent.id, "refines_number": parent.number, "origin": f"{ORIGIN}:{origin}",
                     "refine": info}}


def structure_parents(store, study: str, evaluator, best, k: int,
                      say: Callable[[str], None] = lambda msg: None) -> list:
    """``best`` (an NFE's best searched trial) and the searched schedules of up to ``k - 1`` other structures at its
    NFE, as refinement sees structures (``refined_structure``): of each, the one the search scored best on the train
    bank, the structures in that order. Each is scored on the held-out bank: by its confirmation, stored here
    (``confirms``, as the search's own) where the search did not confirm it."""
    from steptune.search import CHEAP

    noise = evaluator.problem.noise
    trials = store.trials(study)
    confirmed = {t.key: t for t in trials if t.nfe == best.nfe and t.fidelity == CONFIRM and "confirms" in t.info
                 and (searched(t) or t.status == "failed")}  # a failed one is not evaluated again
    rows = sorted((t for t in trials if t.fidelity == CHEAP and t.nfe == best.nfe and t.status == "complete"
                   and t.score is not None and not t.info.get("baseline")), key=lambda t: (t.score, t.number))
    seen, out, keys = {refined_structure(best.to_schedule(), noise)}, [best], {best.key}
    for t in rows:
        if len(out) >= k:
            break
        if t.key in keys:
            continue
        keys.add(t.key)
        sched = t.to_schedule()
        structure = refined_structure(sched, noise)
        if structure in seen:
            continue
        seen.add(structure)
        held = confirmed.get(t.key)
        if held is None:
            res = evaluator.evaluate(sched, CONFIRM)
            held = store_heldout(store, study, sched, res, {"confirms": t.number, "origin": t.info.get("origin")})
        if searched(held):
            out.append(held)
    if len(out) > 1:
        say(f"NFE {best.nfe}: {len(out)} searched structures to screen (trial ids {', '.join(str(t.id) for t in out)})")
    return out


def structure_groups(store, study: str, evaluator, todo: list, k: int, iters: int,
                     say: Callable[[str], None] = lambda msg: None) -> list:
    """``todo`` (the best searched trial of each NFE) as groups of ``k`` structures to screen (``structure_parents``),
    or as it is when ``k`` is 1 or refinements of ``iters`` are too short to screen."""
    if k <= 1:
        return todo
    if not screen_length(iters):
        say(f"{k} structures are not screened: refinements of {iters} iterations are too short to screen (it takes "
            "at least 11); each NFE refines its best schedule alone")
        return todo
    return [structure_parents(store, study, evaluator, t, k, say=say) for t in todo]


def heldout_result(trial, evaluator) -> EvalResult | None:
    """``trial``'s stored evaluation on the whole held-out bank of ``evaluator``, on its device (a confirmation, a
    built or interpolated schedule's scoring), so a refinement does not evaluate its parent again and compares its
    iterates with a score of the same device; None for any other."""
    if (trial.bank != CONFIRM or trial.n_samples != evaluator.bank(CONFIRM).size
            or trial.status not in ("complete", "failed") or "rmse" not in trial.metrics
            or trial.metrics.get("device", evaluator.device_name) != evaluator.device_name):
        return None
    return EvalResult.stored(trial.nfe, trial.metrics, trial.status, trial.error, trial.seconds or 0.0, CONFIRM,
                             trial.n_samples)


def store_heldout(store, study: str, sched, res, info: dict):
    """A schedule's held-out evaluation ``res`` stored as a trial of ``study`` with ``info``; the stored trial."""
    (tid,) = store.add_trials(study, [{"schedule": sched.to_dict(), "fidelity": CONFIRM, "bank": CONFIRM,
                                       "n_samples": res.n, "metrics": {**res.metrics, **res.cost()},
                                       "status": res.status, "error": res.error, "seconds": res.seconds,
                                       "info": info}])
    return store.trial(tid)


def refine_trials(store, study: str, evaluator, todo: list, *, iters: int, samples: int | None,
                  say: Callable[[str], None] = lambda msg: None,
                  progress: Callable[[int, int, int, float], None] | None = None,
                  stop: Callable[[], bool] = lambda: False, before: float | None = None,
                  say_skipped: bool = True, seconds: float | None = None, deadline: float | None = None,
                  reserve: float = 0.0, no_room: Callable[[], None] = lambda: None,
                  trim: float | Sequence[float] = TRIMS) -> list[Refined]:
    """Refine each item of ``todo`` (skipping those refined before) and store the results as they come. An item is a
    trial, or a list of one NFE's trials of distinct structures (``structure_parents``), of which the most promising
    after a screening refinement of each is refined on (``refine_best``). ``before``: the NFE's best held-out RMSE
    before, where it is not one of the parents' (``neighbour_pass``): each result's ``start_rmse`` is then that, and
    its ``rmse`` what the item leaves (its refinement where that beat its parent, else the parent). ``seconds``: each
    item's refinement, screening included, ends after about this long with its best so far (None: no limit).
    ``deadline`` (``time.monotonic()``, a run's time budget): an item's refinement ends ``reserve`` seconds before it
    with its best so far, stored, so that a run the budget stops still stores what it refined and the next run goes on
    from there (cut off by ``stop`` instead, it would store nothing and each run would start that item again); with
    less than ``reserve`` seconds left it refines nothing more and calls ``no_room``."""
    done = {t.info["refines"]: t for t in store.trials(study) if is_refinement(t)}
    trims = as_trims(trim)
    out = []
    for item in todo:
        group = item if isinstance(item, list) else [item]
        prev = next((done[t.id] for t in group if t.id in done), None)
        if prev is not None:
            parent = next(t for t in group if t.id == prev.info["refines"])
            rec = prev.info.get("refine", {})
            screened = rec.get("screened", [])
            parent_rmse, improved = rec.get("parent_rmse", parent.score), prev.status == "complete"
            rmse = rec.get("candidate_rmse", prev.score) if improved or before is None else parent_rmse
            out.append(Refined(parent.nfe, parent.id, parent_rmse, rmse, rec.get("seconds", 0.0), improved, prev.id,
                               "refined before", max(len({x["trial"] for x in screened}), 1),
                               screened_start(rec) if before is None else before))
            if say_skipped:
                others = [str(t.id) for t in group if t.id not in done]
                another = (f"; steptune refine --study {shell_quote(study)} --trial {' or '.join(others)} refines "
                           "another of its structures" if others else "")
                say(f"NFE {parent.nfe}: trial id {parent.id} was refined before (trial id {prev.id}){another}")
            continue
        if stop():
            break
        limit, by_budget = seconds, False
        if deadline is not None:
            left = deadline - time.monotonic() - reserve
            if left <= 0:
                no_room()
                break
            limit, by_budget = (left, True) if limit is None or left < limit else (limit, False)
        screen = screen_length(iters)
        group, nfe = group if screen else group[:1], group[0].nfe
        if len(group) == 1:
            preset = f": preset {group[0].schedule.get('name')}" if group[0].info.get("baseline") else ""
            head = f"refining NFE {nfe}{preset} (trial id {group[0].id}, held-out RMSE {group[0].score:.4g})"
        else:
            head = (f"refining NFE {nfe}: {len(group)} structures (held-out RMSE {min(t.score for t in group):.4g} "
                    "at best)")

        def announce(entries: list, rounds: list, head=head, group=group) -> None:
            say(head + screening_plan(entries, rounds, trims, len(group), iters))
        start = time.perf_counter()
        report = None if progress is None else (lambda i, n, best, nfe=nfe: progress(nfe, i, n, best))
        held = [heldout_result(t, evaluator) for t in group]
        sc = refine_best(evaluator, [t.to_schedule() for t in group], parents=held, screen=screen, iters=iters,
                         samples=samples, trim=trims, progress=report, stop=stop, seconds=limit, plan=announce)
        result, parent = sc.result, group[sc.winner]
        if result.stopped:  # nothing stored: a later run refines it again
            say(f"refinement of NFE {nfe} stopped before its end; nothing was stored for it")
            break
        screened = [{"trial": group[i].id, "parent_rmse": a, "rmse": b, "iters": n}
                    | ({"trim": trims[k]} if len(trims) > 1 else {})
                    for (i, k), (a, b, n) in zip(sc.entries, sc.screened)]
        (tid,) = store.add_trials(study, [trial_item(parent, result, screened, trims[sc.chosen])])
        start_rmse = min([result.parent_rmse, *(a for a, _, _ in sc.screened)]) if before is None else before
        out.append(Refined(nfe, parent.id, result.parent_rmse,
                           result.candidate_rmse if before is None else result.rmse, time.perf_counter() - start,
                           result.improved, tid, structures=max(len({i for i, _ in sc.entries}), 1),
                           start_rmse=start_rmse))
        r, took = out[-1], f"{out[-1].seconds:.0f} s, {result.iters} of at most {iters} iterations"
        if result.out_of_time:
            took += ", the time budget ran out" if by_budget else f", the {seconds:g} s given ran out"
        if before is not None:
            verdict = (f"the NFE's best {before:.4g} -> {r.rmse:.4g} ({100 * r.change:+.1f}%)" if r.change < 0
                       else f"not better than the NFE's best ({before:.4g}), which stays the best")
            say(f"refined NFE {nfe}: trial id {parent.id} ({r.parent_rmse:.4g}) -> {result.candidate_rmse:.4g} "
                f"({took}); {verdict}")
            continue
        which = ""
        if len(group) > 1:
            which = f"; trial id {parent.id} ({r.parent_rmse:.4g}), " + (
                f"the best of the {r.structures} of {len(group)} structures screened in the time given"
                if result.out_of_time else f"the best of {len(group)} structures after {screen} iterations")
        say(f"refined NFE {r.nfe}: held-out RMSE {r.start_rmse:.4g} -> {r.rmse:.4g} ({100 * r.change:+.1f}%{which}, "
            f"{took})" + ("" if r.improved and r.change < 0 else "; not better, the parent stays the best"
                          if len(group) == 1 else "; not better than the best searched schedule, which stays the best"))
    return out


def screening_plan(entries: list[tuple[int, int]], rounds: list[int], trims: list[float], structures: int,
                   iters: int) -> str:
    """What a refinement's log line says of its screening (``refine_best``'s ``plan``): the trims each structure is
    screened with, and the rounds."""
    tried = ""
    for k, t in enumerate(trims[1:], 1):
        n = sum(1 for _, j in entries if j == k)
        if not n:
            tried += f", not with trim {t:g} (it would change the loss by under {GATE:.0%})"
        else:
            tried += f", also with trim {t:g}" + (f" ({n} of them)" if structures > 1 else "")
    if len(entries) == 1:
        return tried
    if not rounds:
        return f"{tried}: every one to its end, the best kept"
    halves = "".join(f", the better half to {n}" for n in rounds[1:])
    return f"{tried}: {rounds[0]} iterations each{halves}, then the best on up to {iters}"


def best_preset(t) -> bool:
    """A preset at its best spacing scored on the held-out bank (a baseline trial or a refine stage's preset
    parent), not one of diffusers' stock schedulers."""
    return (t.info.get("baseline") and "best_of" in t.info and "diffusers" not in t.info and t.fidelity == CONFIRM
            and t.status == "complete" and t.score is not None)


def preset_parents(store, study: str, evaluator, nfes: list[int], samples: int,
                   say: Callable[[str], None] = lambda msg: None) -> list:
    """Per NFE of ``nfes``, the trial of the best preset at its best spacing: the study's best such baseline there
    on the held-out bank, else the preset and spacing (of every default preset and every spacing) with the lowest
    RMSE on the first ``samples`` states of the train bank, scored on the held-out bank and stored as a baseline
    trial (``best_of``, ``spacing_scores`` as the runner's baselines)."""
    from steptune.search import DEFAULT_PRESETS, baselines
    from steptune.search.fidelities import CHEAP

    p = evaluator.problem
    trials = store.trials(study)
    out = []
    for nfe in nfes:
        stored = [t for t in trials if t.nfe == nfe and best_preset(t)]
        if stored:
            out.append(min(stored, key=lambda t: (t.score, t.number)))
            continue
        best = None  # (train RMSE, spec, spacing, schedule, that spec's scores)
        for spec in DEFAULT_PRESETS:
            variants = baselines.spacing_variants(spec, nfe, p.noise, p.t_start, p.t_end)
            scores = baselines.spacing_scores(evaluator, variants, CHEAP, samples)
            sp = baselines.best_spacing(scores)
            if sp is not None and (best is None or scores[sp] < best[0]):
                best = (scores[sp], spec, sp, dict(variants)[sp], scores)
        if best is None:
            continue
        _, spec, sp, sched, scores = best
        res = evaluator.evaluate(sched, CONFIRM)
        info = {"baseline": True, "origin": baselines.origin(spec, nfe, sp), "best_of": f"{spec}@{nfe}",
                "spacing": sp, "spacing_scores": scores, "spacing_bank": CHEAP, "spacing_samples": samples}
        t = store_heldout(store, study, sched, res, info)
        say(f"NFE {nfe}: best preset {spec} at {sp} spacing, held-out RMSE "
            + (f"{t.score:.4g}" if t.score is not None else t.status))
        if best_preset(t):
            out.append(t)
    return out


def neighbour(t) -> bool:
    """A schedule built from another searched NFE's best (``neighbour_parents``), scored on the held-out bank."""
    return built(t, "neighbour")


def built(t, kind: str) -> bool:
    """A schedule built by the refine stage (``kind``: ``neighbour`` or ``interpolated``), scored on the held-out
    bank."""
    return kind in t.info and t.fidelity == CONFIRM and t.status == "complete" and t.score is not None


def best_found(trials, interpolated: bool = False) -> dict[int, object]:
    """Per searched NFE, the best held-out trial the search and its refine stage gave: a confirmation, a
    schedule built from another NFE's best, or a refinement of one of them or of the best preset (an unrefined
    preset is not a find). ``interpolated``: per interpolated NFE too, its interpolated schedule one of them."""
    def found(t) -> bool:
        return searched(t) or neighbour(t) or (interpolated and built(t, "interpolated"))

    refined_from = {t.id for t in trials if found(t) or best_preset(t)}
    nfes = {t.nfe for t in trials if searched(t) or (interpolated and found(t))}  # not the builds at other NFEs
    best: dict[int, object] = {}
    for t in trials:
        if t.nfe not in nfes:
            continue
        ok = found(t) or (is_refinement(t) and t.status == "complete" and t.info["refines"] in refined_from)
        if ok and t.score is not None and (t.nfe not in best or (t.score, t.number) < (best[t.nfe].score,
                                                                                         best[t.nfe].number)):
            best[t.nfe] = t
    return best


# the methods an interpolated NFE's trial is chosen from by its held-out score: a padded schedule scores about what
# the NFE below scores, so it wins that choice most often, but its short steps sit where refinement does not move
# them (on gmm-digits NFE 7 padded stayed at 0.0283 where split and refined it reached 0.0201); it is built with
# the others from each neighbouring NFE afterwards (``neighbour_pass``), each refined on its own
INTERPOLATED_METHODS = ("split", "blend")


def interpolations(sources: dict, nfe: int, methods: tuple[str, ...] | None = None) -> tuple[list, Exception | None]:
    """The distinct schedules at ``nfe`` that each method of ``steptune.space.retime.interpolate`` (or of
    ``methods``) builds from ``sources`` (searched schedules by NFE), and the first error of a method that cannot."""
    from steptune.space import ScheduleError
    from steptune.space.retime import METHODS, interpolate

    out, error = [], None
    for method in METHODS if methods is None else methods:
        try:
            sched = interpolate(sources, nfe, method=method)
        except ScheduleError as e:
            error = error or e
            continue
        if all(sched.key() != other.key() for other in out):
            out.append(sched)
    return out, error


def interpolated_parents(store, study: str, evaluator, nfes: list[int],
                         say: Callable[[str], None] = lambda msg: None) -> list:
    """The stored trial of each of ``nfes`` (NFEs the study did not search) interpolated from the best schedules
    of the searched NFEs by each of ``INTERPOLATED_METHODS``, the one best on the held-out bank stored
    (``info.interpolated.tried``: each method's RMSE; its cost includes the others' evaluations); one stored before
    is reused. No method is best everywhere: in the quick example NFE 7 split from NFE 6 scores 0.038 and refines no
    further, blended 0.030 and refines to 0.022."""
    trials = store.trials(study)
    stored = {t.nfe: t for t in trials if "interpolated" in t.info and t.fidelity == CONFIRM}
    best = best_found(trials)
    sources = {n: t.to_schedule() for n, t in best.items()}
    out = []
    for nfe in nfes:
        if nfe in stored:
            out.append(stored[nfe])
            continue
        made, error = interpolations(sources, nfe, INTERPOLATED_METHODS)
        tried = [(sched, evaluator.evaluate(sched, CONFIRM)) for sched in made]
        if not tried:
            say(f"refine: NFE {nfe} cannot be interpolated ({error}); search it instead")
            continue
        sched, res = min(tried, key=lambda x: x[1].metrics["rmse"] if x[1].ok else math.inf)
        res = replace(res, model_calls=sum(r.model_calls or 0 for _, r in tried),
                      seconds=sum(r.seconds for _, r in tried))
        how = sched.meta["interpolated"]
        src = best[how["decisions_from"]]
        scores = {s.meta["interpolated"]["method"]: (r.metrics["rmse"] if r.ok else None) for s, r in tried}
        info = {"interpolated": {**how, "from_trials": {str(n): best[n].id for n in how["between"]}, "tried": scores},
                "origin": f"interpolated:{src.info.get('origin') or f'trial {src.number}'}"}
        t = store_heldout(store, study, sched, res, info)
        others = ", ".join(f"{m} {v:.4g}" for m, v in scores.items() if v is not None and m != how["method"])
        say(f"NFE {nfe} interpolated from NFE {how['decisions_from']} (trial id {src.id}) by {how['method']}"
            + (f" (better than {others})" if others else "") + ": held-out RMSE "
            + (f"{t.score:.4g}" if t.status == "complete" and t.score is not None else f"{t.status}"))
        if t.status == "complete" and t.score is not None:
            out.append(t)
    return out


def neighbour_parents(store, study: str, evaluator, nfe: int, source: int,
                      say: Callable[[str], None] = lambda msg: None) -> list:
    """Schedules at ``nfe`` built from the best schedule found at the searched or interpolated NFE ``source``
    (``best_found``) by each method of ``steptune.space.retime.interpolate``, each scored on the held-out bank and
    stored as a trial (``info.neighbour``); those stored before from the same trial are reused. A refined schedule
    of one NFE often carries over to another better than that NFE's own search found: on gmm-digits (one seed), NFE
    8 built from the refined NFE 10 and refined reached 0.0124 where the NFE-8 search and its refinement gave
    0.0231, and NFE 10 built back from that reached 0.0079 where it had 0.0147."""
    trials = store.trials(study)
    src = best_found(trials, interpolated=True).get(source)
    if src is None:
        return []
    stored = {t.info["neighbour"]["method"]: t for t in trials if t.nfe == nfe and t.fidelity == CONFIRM
              and t.info.get("neighbour", {}).get("from_trial") == src.id}
    there = {t.key for t in trials if t.nfe == nfe and t.fidelity == CONFIRM}  # e.g. the interpolated NFE's own
    out, built = [], False
    for sched in interpolations({source: src.to_schedule()}, nfe)[0]:
        method = sched.meta["interpolated"]["method"]
        t = stored.get(method)
        if t is None and sched.key() in there:
            continue
        if t is None:
            res = evaluator.evaluate(sched, CONFIRM)
            info = {"neighbour": {"method": method, "from_nfe": source, "from_trial": src.id},
                    "origin": f"{method}:{src.info.get('origin') or f'trial {src.number}'}"}
            t, built = store_heldout(store, study, sched, res, info), True
        if neighbour(t):
            out.append(t)
    if out and built:
        say(f"NFE {nfe}: {len(out)} schedule{'s' if len(out) > 1 else ''} built from NFE {source}'s best (trial id "
            f"{src.id}, held-out RMSE {src.score:.4g}), at {', '.join(f'{t.score:.4g}' for t in out)}")
    return out


def neighbour_pass(store, study: str, evaluator, nfes: list[int], *, iters: int, samples: int | None,
                   trim: float | Sequence[float] = TRIMS, say: Callable[[str], None] = lambda msg: None,
                   stop: Callable[[], bool] = lambda: False,
                   progress: Callable[[int, int, int, float], None] | None = None,
                   sweeps: int = SWEEPS, seconds: float | None = None, deadline: float | None = None,
                   reserve: float = 0.0, no_room: Callable[[], None] = lambda: None) -> list[Refined]:
    """Sweeps over ``nfes``, from the highest down, then from the lowest up, and so on: at each NFE the schedules
    built from the next one's best (``neighbour_parents``; the next one down on a sweep up) are each refined
    (``refine_trials``; not screened: of two, the one better after 40 iterations is not always the one that refines
    best), so each NFE builds on its neighbour's best after that one's turn.
    A schedule pair tried before is not tried again; the sweeps end when two in a row try nothing new (each NFE's
    best then came from the other's), or after ``sweeps``. ``nfes`` may include NFEs the study interpolated
    (``[refine] interpolate``): their best are sources like a searched NFE's. The refinements, each once."""
    nfes = sorted(set(nfes))
    down = list(reversed(list(zip(nfes, nfes[1:]))))
    up = [(b, a) for a, b in zip(nfes, nfes[1:])]
    out: dict[int | None, Refined] = {}
    quiet = 0
    for k in range(sweeps):
        new = False
        for nfe, source in down if k % 2 == 0 else up:
            if stop():
                return list(out.values())
            new |= refine_built(store, study, evaluator, nfe, source, out, iters=iters, samples=samples, trim=trim,
                                say=say, stop=stop, progress=progress, seconds=seconds, deadline=deadline,
                                reserve=reserve, no_room=no_room)
        quiet = 0 if new else quiet + 1
        if quiet == 2:
            break
    return list(out.values())


def refine_built(store, study: str, evaluator, nfe: int, source: int, out: dict, *, iters: int,
                 samples: int | None, trim: float | Sequence[float] = TRIMS,
                 say: Callable[[str], None] = lambda msg: None,
                 stop: Callable[[], bool] = lambda: False,
                 progress: Callable[[int, int, int, float], None] | None = None, seconds: float | None = None,
                 deadline: float | None = None, reserve: float = 0.0,
                 no_room: Callable[[], None] = lambda: None) -> bool:
    """The schedules at ``nfe`` built from ``source``'s best (``neighbour_parents``), each refined on its own and
    compared with the NFE's best before it (the best of what the NFE had when the group was built, then after each
    member); the results go into ``out`` by trial. Whether any refinement ran now."""
    group = neighbour_parents(store, study, evaluator, nfe, source, say=say)
    if not group:
        return False
    first = min(t.id for t in group)
    best = best_found([t for t in store.trials(study) if t.id < first], interpolated=True).get(nfe)
    before, new = (best.score if best else None), False
    for t in group:
        done = refine_trials(store, study, evaluator, [t], iters=iters, samples=samples, trim=trim, say=say,
                             progress=progress, stop=stop, before=before, say_skipped=False, seconds=seconds,
                             deadline=deadline, reserve=reserve, no_room=no_room)
        new |= any(r.skipped is None for r in done)
        for r in done:
            out.setdefault(r.trial, replace(r, built_from=source))
            before = r.rmse if before is None else min(before, r.rmse)
    return new


def refine_stage(runner) -> list[Refined]:
    """A job's ``[refine]`` stage, run after the search and its confirmations (resumable: a parent refined
    before is skipped)."""
    job, spec = runner.job, runner.job.refine
    trials = runner.storage.trials(job.study)
    nfes = None if spec.nfe == "all" else [n for n in spec.nfe if n in job.search.nfe]
    try:
        todo = parents(trials, job.study, nfes)
    except RefineError as e:
        runner.say(f"refine: {e}")
        return []
    evaluator = runner._driver_evaluator()
    full = []  # set once the time budget has no room for another refinement

    def no_room() -> None:
        full.append(True)
        runner._out_of_time()

    def ended() -> bool:
        return bool(full) or runner.should_stop()

    def progress(nfe: int, done: int, total: int, best: float) -> None:  # each refinement's count, as the run's
        runner.phase_counts["refine"] = [done, total]
        runner.phase_detail["refine"] = f"NFE {nfe} | held-out RMSE {best:.4g}"
        if runner.progress is not None:
            runner.progress(runner.status())

    # under a time budget, each refinement ends in time to be judged and stored (see refine_trials)
    limits = {"seconds": spec.time, "deadline": runner.deadline, "reserve": 2.0 * runner._confirm_seconds() + 1.0,
              "no_room": no_room, "progress": progress}
    nfes = sorted({t.nfe for t in todo})
    presets = preset_parents(runner.storage, job.study, evaluator, nfes, job.evaluation.cheap_samples,
                             say=runner.say)
    todo = structure_groups(runner.storage, job.study, evaluator, todo, spec.structures, spec.iters, say=runner.say)
    todo += presets
    out = refine_trials(runner.storage, job.study, evaluator, todo, iters=spec.iters, samples=spec.samples,
                        trim=spec.trim, say=runner.say, stop=runner.should_stop, **limits)
    if spec.neighbours and not ended():
        out += neighbour_pass(runner.storage, job.study, evaluator, nfes, iters=spec.iters,
                              samples=spec.samples, trim=spec.trim, say=runner.say, stop=runner.should_stop, **limits)
    if spec.interpolate and not ended():
        todo = interpolated_parents(runner.storage, job.study, evaluator, spec.interpolate, say=runner.say)
        built = [t.nfe for t in todo]
        # as at a searched NFE, the best preset is refined too: where refining it does better, that is the NFE's best
        todo += preset_parents(runner.storage, job.study, evaluator, built, job.evaluation.cheap_samples,
                               say=runner.say)
        out += refine_trials(runner.storage, job.study, evaluator, todo, iters=spec.iters, samples=spec.samples,
                             trim=spec.trim, say=runner.say, stop=runner.should_stop, **limits)
        if spec.neighbours and built and not ended():
            out += neighbour_pass(runner.storage, job.study, evaluator, [*nfes, *built],
                                  iters=spec.iters, samples=spec.samples, trim=spec.trim, say=runner.say,
                                  stop=runner.should_stop, **limits)
    return out

