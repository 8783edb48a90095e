"""The preset NFE sweep: every preset at every NFE on one problem, scored on one noise bank."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

from steptune.space import ScheduleError, presets

BEST = "best"  # the spacing option that sweeps each preset at the best of its spacings


def run_sweep(evaluator, preset_specs: Sequence[str], nfes: Sequence[int], spacing: str | None = None,
              bank: str = "heldout", on_result: Callable[[dict], None] | None = None) -> list[dict]:
    """One row per (preset, NFE): the metrics, or the reason it could not run at that NFE. ``spacing="best"``:
    each preset at the best of its spacings, chosen on the train bank (``spacing_scores`` in the row), and a row
    per diffusers stock scheduler with its default config (``diffusers-default:NAME``) where the model allows."""
    problem = evaluator.problem
    rows = []
    for spec in preset_specs:
        for nfe in nfes:
            row = {"preset": spec, "nfe": nfe, "spacing": spacing or "default"}
            try:
                sched = _schedule(evaluator, spec, nfe, spacing, row)
            except ScheduleError as e:
                row.update(status="n/a", error=str(e))
            else:
                res = evaluator.evaluate(sched, bank=bank)
                row.update(status=res.status, error=res.error, seconds=res.seconds, **res.metrics, **res.cost())
            rows.append(row)
            if on_result is not None:
                on_result(row)
    if spacing == BEST:
        from steptune import diffusers_default

        if diffusers_default.why_not(problem.model) is None:
            for name in diffusers_default.SCHEDULERS:
                for nfe in nfes:
                    res, _ = diffusers_default.evaluate(evaluator, name, nfe, bank)
                    row = {"preset": f"diffusers-default:{name}", "nfe": nfe, "spacing": "diffusers default",
                           "status": res.status, "error": res.error, "seconds": res.seconds, **res.metrics}
                    rows.append(row)
                    if on_result is not None:
                        on_result(row)
    return rows


def unbuildable(preset_specs: Sequence[str], nfes: Sequence[int], problem, spacing: str | None) -> str | None:
    """Why the first of ``preset_specs`` that builds at none of ``nfes`` cannot (an option out of range): a sweep of it
    would be a row of "n/a" only; None when each builds somewhere."""
    from steptune.search.baselines import unbuildable as why_not

    for spec in preset_specs:
        why = why_not(spec, nfes, problem.noise, problem.t_start, problem.t_end,
                      **({"spacing": spacing} if spacing and spacing != BEST else {}))
        if why:
            return f"preset {spec!r} cannot be built at any NFE of the sweep ({why})"
    return None


def _schedule(evaluator, spec: str, nfe: int, spacing: str | None, row: dict):
    """The preset's schedule at ``nfe`` with ``spacing`` (``best``: chosen on the train bank, recorded in ``row``)."""
    from steptune.search import baselines

    p = evaluator.problem
    if spacing != BEST:
        return presets.build(spec, nfe, p.noise, t_start=p.t_start, t_end=p.t_end,
                             **({"spacing": spacing} if spacing else {}))
    variants = baselines.spacing_variants(spec, nfe, p.noise, p.t_start, p.t_end)
    if not variants:
        raise ScheduleError(f"preset {spec!r} has no schedule at NFE {nfe} on any spacing")
    scores = {sp: evaluator.evaluate(s, bank="train").metrics["rmse"] for sp, s in variants}
    best = baselines.best_spacing(scores) or variants[0][0]
    row.update(spacing=best, spacing_scores=scores)
    return dict(variants)[best]


def size(preset_specs: Sequence[str], nfes: Sequence[int], spacing: str | None, evaluator) -> int:
    """How many rows ``run_sweep`` gives."""
    from steptune import diffusers_default

    extra = spacing == BEST and diffusers_default.why_not(evaluator.problem.model) is None
    return (len(preset_specs) + (len(diffusers_default.SCHEDULERS) if extra else 0)) * len(nfes)


def best_by_nfe(rows: list[dict], metric: str = "rmse") -> dict[int, dict]:
    best: dict[int, dict] = {}
    for r in rows:
        v = r.get(metric)
        if r.get("status") == "complete" and v is not None and math.isfinite(v):
            if r["nfe"] not in best or v < best[r["nfe"]][metric]:
                best[r["nfe"]] = r
    return best


def pivot(rows: list[dict], metric: str = "rmse") -> tuple[list[str], list[int], dict[tuple[str, int], float | None]]:
    specs = list(dict.fromkeys(r["preset"] for r in rows))
    nfes = sorted({r["nfe"] for r in rows})
    cells = {(r["preset"], r["nfe"]): (r.get(metric) if r.get("status") == "complete" else None) for r in rows}
    return specs, nfes, cells


def chosen_spacings(rows: list[dict]) -> dict[tuple[str, int], str]:
    """(preset, NFE) -> the spacing a ``best`` sweep chose for it."""
    return {(r["preset"], r["nfe"]): r["spacing"] for r in rows if "spacing_scores" in r}


def markdown_table(rows: list[dict], metric: str = "rmse") -> str:
    specs, nfes, cells = pivot(rows, metric)
    best = best_by_nfe(rows, metric)
    chosen = chosen_spacings(rows)
    head = "| preset | " + " | ".join(str(n) for n in nfes) + " |"
    lines = [head, "|---" * (len(nfes) + 1) + "|"]
    for s in specs:
        vals = []
        for n in nfes:
            v = cells.get((s, n))
            text = "—" if v is None else f"{v:.4g}" + (f" ({chosen[s, n]})" if (s, n) in chosen else "")
            if v is not None and best.get(n, {}).get("preset") == s:
                text = f"**{text}**"
            vals.append(text)
        lines.append(f"| {s} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def save(rows: list[dict], out_dir: Path, stem: str, meta: dict) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    jpath = out_dir / f"{stem}.json"
    jpath.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=float) + "\n")
    mpath = out_dir / f"{stem}.md"
    mpath.write_text(f"# {stem}: {meta.get('metric', 'rmse')} by preset and NFE\n\n{markdown_table(rows)}\n")
    return jpath, mpath


def study_problem_mismatch(store, study: str, problem, bank: str | None = None) -> str | None:
    """Why a sweep of ``problem`` on ``bank`` cannot be added to ``study`` (another kind of study, another problem, or
    sweeps of the other bank, whose scores its best would mix with these), or None when it can (also when the study
    does not exist yet)."""
    from steptune.storage import StorageError
    from steptune.study_problem import mixing_refusal

    try:
        st = store.get_study(study)
    except StorageError:
        return None
    if st.kind != "sweep":
        return f"study {study!r} was made by {st.made_by}, not by a sweep; give a new study name"
    if st.problem is not None and st.problem["name"] != problem.name:
        return f"study {study!r} holds a sweep of problem {st.problem['name']!r}; give a new study name"
    other = (st.config or {}).get("bank")
    if bank is not None and other is not None and other != bank:
        return (f"study {study!r} holds sweeps on the {other} bank, and its best would rank these {bank}-bank scores "
                "with them; give the study of each bank its own name")
    return mixing_refusal(study, st.problem and st.problem["identity"], problem)


def store_sweep(store, study: str, evaluator, rows: list[dict], spacing: str | None = None,
                bank: str = "heldout") -> list[int]:
    """Add the sweep's rows to ``study`` (method ``preset``, created if missing) as trials named by their
    preset spec, with the bank as their fidelity (as ``steptune run`` stores its baselines), so every
    preset shows up beside searched schedules; rows that could not run at their NFE are left out.
    Returns the new trial ids."""
    from dataclasses import replace

    from steptune import diffusers_default
    from steptune.search import baselines
    from steptune.storage import StorageError

    problem = evaluator.problem
    try:  # a sweep run again adds only what the study does not hold yet
        stored = {(t.key, t.fidelity, t.n_samples) for t in store.trials(study)}
    except StorageError:
        stored = set()
    items = []
    for r in rows:
        if r.get("status") not in ("complete", "failed"):
            continue
        info = {}
        if r["preset"].startswith("diffusers-default:"):
            name = r["preset"].removeprefix("diffusers-default:")
            sched = diffusers_default.equivalent(name, problem.model, r["nfe"])
            info = {"origin": diffusers_default.origin(name, r["nfe"]), "diffusers": name, "config": "default",
                    "metrics_from": "diffusers step loop"}
        else:
            sp = r["spacing"] if spacing == BEST else spacing
            sched = presets.build(r["preset"], r["nfe"], problem.noise, t_start=problem.t_start, t_end=problem.t_end,
                                  **({"spacing": sp} if sp else {}))
            sched = replace(sched, name=baselines.with_spacing(r["preset"], sp) if spacing == BEST else r["preset"])
            if spacing == BEST:
                info = {"origin": baselines.origin(r["preset"], r["nfe"], sp), "spacing": sp,
                        "spacing_scores": r["spacing_scores"], "spacing_bank": "train"}
        if (sched.key(), bank, evaluator.bank(bank).size) in stored:
            continue
        metrics = {k: r[k] for k in (*evaluator.metric_names(), "model_calls", "device") if k in r}
        items.append({"schedule": sched, "status": r["status"], "metrics": metrics, "error": r.get("error"),
                      "seconds": r.get("seconds"), "bank": bank, "n_samples": evaluator.bank(bank).size,
                      "fidelity": bank, **({"info": info} if info else {})})
    config = {"bank": bank, "spacing": spacing or "default", "presets": list(dict.fromkeys(r["preset"] for r in rows))}
    return store.add_trials(study, items, create={"method": "preset", "kind": "sweep", "problem": problem.identity(),
                                                  "config": config, "metric": "rmse"})
