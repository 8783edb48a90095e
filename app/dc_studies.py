"""The studies `steptune dc fit` writes: their fits, their problem and solver, their CPR; checks that keep
later fits, CPR and predictions consistent with the earlier ones. Bad input raises DcStudyError."""

from __future__ import annotations

from pathlib import Path

from steptune.suggested import command


class DcStudyError(ValueError):
    """A DC study that cannot be used as asked: one sentence saying why and what to do."""


def study_problem(config: dict, cfg: float | None):
    """The problem `dc fit` fitted the study on, at guidance ``cfg`` (conventions it did not record take their
    defaults)."""
    from steptune.evaluators.load import load_error_text, load_problem, parse_shape

    conv = config.get("conventions") or {}
    try:
        return load_problem(config["problem"], noise=conv.get("noise"), prediction=conv.get("prediction"),
                            time_input=conv.get("time_input"), time_scale=conv.get("time_scale"),
                            guidance_scale=cfg, shape=parse_shape(conv.get("shape")))
    except (KeyError, ValueError, FileNotFoundError) as e:
        raise DcStudyError(load_error_text(e)) from None


def study_evaluator(config: dict, cfg: float | None, cache: Path, device: str = "cpu"):
    """The Evaluator `dc fit` built for the study at guidance ``cfg``."""
    from steptune.evaluators import Evaluator, evaluator_options

    prob = study_problem(config, cfg)
    return Evaluator(prob, cache_dir=cache, device=device, **evaluator_options(prob))


FITS = ("joint", "greedy")


def load_dc_study(db: str, study: str) -> tuple[dict, list]:
    """The config and complete trials of a study `dc fit` wrote."""
    from steptune.storage import StorageError, connect

    try:
        with connect(db, must_exist=True) as store:
            rec = store.get_study(study)
            trials = store.trials(study, status="complete")
    except StorageError as e:
        raise DcStudyError(str(e)) from None
    config = rec.config or {}
    if rec.kind != "dc-fit":
        raise DcStudyError(f"study {study!r} was not written by 'steptune dc fit'")
    return config, trials


FIT_KEYS = ("problem", "solver", "conventions", "fit_samples")


def check_bank_version(study: str, config: dict) -> None:
    """Refuse to add to, or refit from, a study whose fit noises came from an earlier drawing of the banks."""
    from steptune.evaluators.evaluator import BANK_VERSION

    if config.get("bank_version", 1) != BANK_VERSION:
        raise DcStudyError(f"study {study!r} was fitted on noise banks drawn by an earlier steptune (bank version "
                         f"{config.get('bank_version', 1)}, now {BANK_VERSION}); its fits cannot be mixed with new "
                         "ones: choose another --study")


def fit_command(study: str, config: dict, nfe: int, cfg: float | None) -> str:
    """The `dc fit` command that adds (``nfe``, ``cfg``) to ``study`` as its earlier fits were made."""
    conv = config.get("conventions") or {}
    words = ["steptune", "dc", "fit", "--problem", config["problem"], "--solver",
             config["solver"].removeprefix("preset:")]
    for k, v in conv.items():
        words += [f"--{k.replace('_', '-')}", str(v)] if v is not None else []
    if config.get("fit_samples", 10) != 10:
        words += ["--fit-samples", str(config["fit_samples"])]
    words += ["--nfe", str(nfe), *(() if cfg is None else ("--guidance", f"{cfg:g}")), "--study", study]
    return command(*words)



def check_same_fit(db: str, study: str, config: dict, problem=None) -> None:
    """Refuse to add fits to an existing study that was fitted on another problem, solver, conventions or
    number of fit noises (its CPR and interpolation would mix them), or on other weights than ``problem``'s."""
    from steptune.storage import StorageError, connect
    from steptune.study_problem import mixing_refusal

    try:
        with connect(db) as store:
            rec = store.get_study(study)
    except StorageError:
        return  # a new study
    old = rec.config or {}
    if rec.kind != "dc-fit":
        raise DcStudyError(f"study {study!r} was not written by 'steptune dc fit'; choose another --study")
    check_bank_version(study, old)
    for key in FIT_KEYS:
        if key in old and old[key] != config.get(key):
            raise DcStudyError(f"study {study!r} was fitted with {key} {old.get(key)!r}, not {config.get(key)!r}; use "
                             f"the same options (e.g. {fit_command(study, old, 5, None)}) or another --study")
    refusal = problem and rec.n_trials and mixing_refusal(study, (rec.problem or {}).get("identity"), problem,
                                                          weights_only=True)
    if refusal:
        raise DcStudyError(refusal)


def fit_rows(trials: list, fit: str) -> list[tuple[int, float | None, list[float]]]:
    """(NFE, CFG, ratios) of every ``fit`` trial."""
    return [(t.nfe, t.info.get("cfg"), [float(st.get("dc_ratio", 1.0)) for st in t.schedule["steps"]])
            for t in trials if t.info.get("dc_fit") == fit]


def fitted_rows(study: str, trials: list, fit: str) -> list[tuple[int, float | None, list[float]]]:
    """``fit_rows``, refusing an unknown fit or a study without such fits."""
    if fit not in FITS:
        raise DcStudyError(f"--fit {fit!r}: use joint or greedy")
    rows = fit_rows(trials, fit)
    if not rows:
        other = [f for f in FITS if any(t.info.get("dc_fit") == f for t in trials)]
        hint = f"use --fit {other[0]}" if other else f"run {command('steptune', 'dc', 'fit', '--study', study)} first"
        raise DcStudyError(f"study {study!r} has no '{fit}' fits; {hint}")
    return rows


def study_schedule(study: str, config: dict, nfe: int):
    """The study's solver preset at ``nfe``, uncompensated."""
    from steptune.space import ScheduleError, presets
    from steptune.space import noise as noise_mod

    spec = config["solver"]
    if not spec.startswith("preset:"):
        raise DcStudyError(f"study {study!r} fitted a schedule file ({spec}); CPR needs a preset solver")
    try:
        ns = noise_mod.from_dict(config["noise"])
        return presets.build(spec.removeprefix("preset:"), nfe, ns, t_start=config["t_start"], t_end=config["t_end"])
    except (ScheduleError, ValueError) as e:
        raise DcStudyError(str(e)) from None




def checked(ev, schedule):
    from steptune.space import ScheduleError

    try:
        ev.check(schedule)
    except ScheduleError as e:
        raise DcStudyError(str(e)) from None
    return schedule


def cpr_plan(study: str, config: dict, rows: list, cache: Path, device: str = "cpu") -> list[tuple]:
    """(evaluator, schedule, NFE, CFG) of each fitted configuration, rebuilt as `dc fit` built it."""
    evaluators, plan = {}, []
    for nfe, cfg in dict.fromkeys((nfe, cfg) for nfe, cfg, _ in rows):
        if cfg not in evaluators:
            evaluators[cfg] = study_evaluator(config, cfg, cache, device)
        ev = evaluators[cfg]
        plan.append((ev, checked(ev, study_schedule(study, config, nfe)), nfe, cfg))
    return plan


def store_cpr(db: str, study: str, record: dict) -> None:
    from steptune.storage import StorageError, connect

    try:
        with connect(db, must_exist=True) as store:
            store.update_study_config(study, {"cpr": record})
    except StorageError as e:
        raise DcStudyError(str(e)) from None


def stored_cpr(study: str, config: dict):
    from steptune.search.dc import CPR

    try:
        return CPR.from_dict(config["cpr"])
    except (KeyError, TypeError, ValueError):
        raise DcStudyError(f"study {study!r} holds an unreadable end-to-end CPR; rerun 'steptune dc cpr' or use "
                         "--regression") from None


def heldout_mse(ev, schedule) -> float:
    return ev.evaluate(checked(ev, schedule), "heldout").metrics["rmse"] ** 2


def interpolated(trials: list, fit: str, nfe: int, cfg: float | None, n_steps: int):
    """``dc.interpolate_ratios`` over the study's ``fit`` trials, or None."""
    from steptune.search.dc import interpolate_ratios

    got = interpolate_ratios(fit_rows(trials, fit), nfe, cfg)
    return got if got is not None and len(got[0]) == n_steps else None


def choose_cpr(study: str, config: dict, trials: list, fit: str, ridge: float, regression: bool, warn=print):
    """The study's stored end-to-end CPR (warning when it predates some fits) or, without one or with
    ``regression``, CPR fitted by regression: (cpr, kind, configurations, fit)."""
    from steptune.search.dc import CPR

    if regression or "cpr" not in config:
        rows = fitted_rows(study, trials, fit)
        return CPR.fit(rows, ridge=ridge), "regression", [[n, c] for n, c, _ in rows], fit
    configs = config["cpr"].get("configurations", [])
    if config["cpr"].get("fit", fit) != fit:
        warn(f"note: the stored CPR of {study!r} was fitted from its '{config['cpr']['fit']}' fits, so --fit {fit} "
             f"is not used (--regression regresses on the '{fit}' fits instead)")
    fit = config["cpr"].get("fit", fit)
    newer = sorted({(t.nfe, t.info.get("cfg")) for t in trials if t.info.get("dc_fit") == fit}
                   - {(n, c) for n, c in configs}, key=lambda nc: (nc[0], nc[1] or 0.0))
    if newer:
        nfe, cfg = newer[0]
        warn(f"warning: the stored CPR predates {len(newer)} '{fit}' fit(s) of {study!r} (e.g. NFE {nfe}"
             f"{'' if cfg is None else f', CFG {cfg:g}'}); rerun "
             f"{command('steptune', 'dc', 'cpr', '--study', study)} to include them")
    return stored_cpr(study, config), "end-to-end", configs, fit


_DIFFUSERS_OF = {"unipc-bh2": "UniPCMultistepScheduler", "dpm-solver++-2m": "DPMSolverMultistepScheduler",
                 "ddim": "DDIMScheduler"}


def solver_baselines(ev, spec: str, nfe: int) -> list[tuple[str, object, object, dict]]:
    """What a fit of preset ``spec`` at ``nfe`` is measured against on the held-out bank: the preset at the best of
    its spacings (chosen on the train bank) and, for a preset diffusers ships, that scheduler with its default
    config run by its own loop. (label, result, schedule, trial info) of each; none for a schedule file."""
    from dataclasses import replace

    from steptune import diffusers_default
    from steptune.search import baselines

    if not spec.startswith("preset:"):
        return []
    name = spec.removeprefix("preset:").partition(":")[0]
    p = ev.problem
    out = []
    variants = baselines.spacing_variants(name, nfe, p.noise, p.t_start, p.t_end)
    scores = {sp: ev.evaluate(s, "train").metrics["rmse"] for sp, s in variants}
    best = baselines.best_spacing(scores)
    if best is not None:
        sched = dict(variants)[best]
        info = {"baseline": True, "origin": baselines.origin(name, nfe, best), "spacing": best,
                "spacing_scores": scores, "spacing_bank": "train"}
        out.append(("best spacing", ev.evaluate(sched, "heldout"), sched, info))
    dname = _DIFFUSERS_OF.get(name)
    if dname is not None and diffusers_default.why_not(p.model) is None:
        res, sched = diffusers_default.evaluate(ev, dname, nfe, "heldout")
        info = {"baseline": True, "origin": diffusers_default.origin(dname, nfe), "diffusers": dname,
                "config": "default", "metrics_from": "diffusers step loop"}
        out.append(("diffusers default", res, replace(sched), info))
    return out
