"""Whether the problem built here is the one a study's trials were scored on, and which weights a built-in network
loads. Scores of two models cannot share a study: a resume, a refinement or a sweep that would add to a study
scored on other weights (a retrained or edited network, another fitted mixture) is refused."""

from __future__ import annotations

import json
from collections.abc import Mapping

# identity keys that fingerprint what a problem's model computes, and how a sentence names them
FINGERPRINTS = {"unet_sha256": "digits UNet weights", "network_sha256": "network weights",
                "mixture_sha256": "fitted mixture"}


def first_change(stored, now, path: str = "", every_key: bool = False) -> str | None:
    """The dotted key of the first setting whose value differs between ``stored`` (a study's problem identity) and
    ``now``; keys ``stored`` lacks (identities written by an earlier steptune) are not compared, unless
    ``every_key``. None: they agree."""
    if isinstance(stored, Mapping) and isinstance(now, Mapping):
        keys = {*stored, *now} if every_key else stored
        # what says the most first: a problem's name, then its noise schedule (which sets the model's default
        # conventions: another noise is reported as such, not as the prediction it brought)
        for k in sorted(keys, key=lambda k: (k not in ("name", "kind"), k != "noise", str(k))):
            found = first_change(stored.get(k), now.get(k), f"{path}.{k}" if path else str(k), every_key)
            if found is not None:
                return found
        return None
    return None if stored == now else path


def difference(stored, now, every_key: bool = False) -> tuple[str, object, object] | None:
    """The first key whose value differs (:func:`first_change`) with its value in ``stored`` and in ``now``."""
    key = first_change(stored, now, every_key=every_key)
    return None if key is None else (key, value_at(stored, key), value_at(now, key))


def _against(stored: Mapping, problem) -> tuple[str, object, object, str | None] | None:
    """:func:`difference` of the identity ``stored`` from ``problem``'s, with what the key fingerprints (None: a
    setting)."""
    found = difference(stored, json.loads(json.dumps(problem.identity())))
    if found is None:
        return None
    key, old, new = found
    return key, old, new, FINGERPRINTS.get(key.rsplit(".", 1)[-1])


def value_at(identity: Mapping, key: str):
    """The value at a dotted key (None where there is none)."""
    for part in key.split("."):
        identity = identity.get(part) if isinstance(identity, Mapping) else None
    return identity


def mixing_refusal(study: str, stored: Mapping | None, problem, weights_only: bool = False) -> str | None:
    """The sentence refusing to add trials of ``problem`` to ``study``, whose trials were scored on the problem
    identity ``stored``; None when they are the same problem (or the study has no identity stored).
    ``weights_only``: compare the model's fingerprints alone (a study that spans settings, e.g. guidance scales)."""
    if stored and weights_only:
        stored = {"data": {k: v for k, v in (stored.get("data") or {}).items() if k in FINGERPRINTS}}
    if not stored:
        return None
    found = _against(stored, problem)
    if found is None:
        return None
    key, old, new, fingerprint = found
    if fingerprint:
        return (f"study {study!r} was scored with other {fingerprint} than the {problem.name} built here "
                f"({key} {str(old)[:12]}... then, {str(new)[:12]}... now); its scores cannot be mixed with new ones: "
                f"{weights_hint(problem, evaluators=False)}, or give a new study name")
    return (f"study {study!r} was scored on {problem.name} with other settings ({key}: {old!r} then, {new!r} now); "
            "its scores cannot be mixed with new ones: run it with the settings it was made with, or give a new "
            "study name")


def evaluator_refusal(worker: str, built: Mapping, problem) -> str | None:
    """The sentence refusing to run on an evaluator that built another problem (``built``, its identity) than the
    ``problem`` the driver built and scores the study on; None when they are the same."""
    found = difference(json.loads(json.dumps(problem.identity())), built, every_key=True)
    if found is None:
        return None
    key, here, there = found
    leaf = key.rsplit(".", 1)[-1]
    what = f"other {FINGERPRINTS[leaf]}" if leaf in FINGERPRINTS else "other settings"
    return (f"the evaluator {worker} built {problem.name} with {what} than this driver ({key}: {str(here)[:40]} here, "
            f"{str(there)[:40]} there); its scores would not be the study's: {weights_hint(problem, evaluators=True)}")


def weights_hint(problem, evaluators: bool) -> str:
    """Where the weights of the network ``problem`` runs come from, and how to get the right ones back: for a study
    (run where they are), or for a run's ``evaluators`` (give each the same)."""
    data = problem.source or {}
    if data.get("model") == "digits-unet":
        from steptune.evaluators.digits_networks import MODELS_DIR, UNET_FILE

        if evaluators:
            return (f"digits-cond loads {MODELS_DIR / UNET_FILE} of the folder each process runs in, else the shipped "
                    "checkpoint: give every evaluator the same weights")
        return (f"digits-cond loads {MODELS_DIR / UNET_FILE} (relative to the folder a command runs in) where that "
                "file exists, else the shipped checkpoint; run where the study's weights are")
    if "factory" in data:
        if evaluators:
            return (f"{data['factory']} returned other weights there: give every evaluator the same checkpoint (and "
                    "seed a network it builds at random)")
        return f"{data['factory']} returned other weights; run with the checkpoint the study was scored with"
    if evaluators:
        return "give every evaluator the same steptune and scikit-learn"
    return "run with the steptune and scikit-learn the study was scored with"


CONVENTIONS = ("prediction", "time_input", "time_scale")  # what a network takes and gives, a mixture simulates


def conventions_note(problem_name: str | None, given: dict[str, object]) -> str | None:
    """A line saying that model conventions given for an analytic problem (``given``: each as the user wrote it,
    ``--prediction x0`` or ``problem.prediction``, to its value) change none of its scores: its model is exact in
    every convention, which it only simulates for the exports; None for a network or where none is given."""
    from steptune.evaluators.problems import PROBLEMS

    named = [k for k, v in given.items() if v is not None]
    if problem_name not in PROBLEMS or not named:
        return None
    one = len(named) == 1
    it = "it" if one else "them"
    return (f"note: {' and '.join(named)} change{'s' if one else ''} no score on {problem_name}, whose exact model "
            f"answers alike in every convention; {'it is' if one else 'they are'} kept as the problem's (a study made "
            f"with {it} resumes only with {it}) and name{'s' if one else ''} the network its exports are written for")


def weights_note(problem) -> str | None:
    """A line saying that a built-in network loads weights retrained by ``steptune train-digits``, not the shipped
    ones (None for any other problem)."""
    if (problem.source or {}).get("model") != "digits-unet":
        return None
    from steptune.evaluators.digits_networks import retrained_unet

    local = retrained_unet()
    if local is None:
        return None
    steps = f", {local['steps']} training steps" if local.get("steps") else ""
    return (f"note: digits-cond runs the UNet retrained by 'steptune train-digits' ({local['path']}{steps}), not the "
            f"shipped one; delete that file to use the shipped weights")


def tuned_elsewhere(where: str, provenance: Mapping | None, problem) -> str | None:
    """A line saying that the schedule file ``where`` (with its export ``provenance``) was tuned on another problem
    than ``problem`` (other settings such as the guidance scale, or other weights), so a score here is not the one it
    was tuned for; None where its provenance names no problem identity or the same one."""
    problem_info = (provenance or {}).get("problem")
    stored = problem_info.get("identity") if isinstance(problem_info, Mapping) else None
    if not isinstance(stored, Mapping) or not stored:
        return None
    found = _against(stored, problem)
    if found is None:
        return None
    key, old, new, fingerprint = found
    what = (f"other {fingerprint} than here ({key} {str(old)[:12]}... there, {str(new)[:12]}... here)"
            if fingerprint else f"{key} {old!r}, not {new!r} as here")
    return f"note: {where} was tuned on {stored.get('name', 'another problem')} with {what}"
