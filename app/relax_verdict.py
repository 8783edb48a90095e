"""The verdict on a relaxation (SOR) study: totals of iterations and of seconds (solves + learner + probing) of
the study's own rounds beside Gauss–Seidel, the best fixed ω in hindsight, the instance-optimal ω and adaptive
SOR, each run online over the same sequence with the same solver, so their seconds are measured, not modelled.

``steptune relax-report`` runs the baselines and stores the verdict with the study (``config["verdict"]``); the
dashboard shows the stored one, or the study's own totals before any report."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

VERDICT = "verdict"  # the study config's key (not part of the setup a resumed study is checked against)
SECONDS = (("solve", "seconds"), ("learner", "learner_seconds"), ("probe", "probe_seconds"))


def _entry(policy: str, kind: str, iterations: Sequence[float], seconds: dict) -> dict:
    its = np.asarray(iterations, dtype=float)
    seconds = {**seconds, "total": sum(seconds.values())}
    return {"policy": policy, "kind": kind, "rounds": int(its.size), "iterations": float(its.sum()),
            "mean_iterations": float(its.mean()) if its.size else None, "seconds": seconds}


def study_totals(policy: str, rows) -> dict:
    """The study's own totals from its stored rounds (the seconds each round recorded in its context)."""
    its = [r.iterations if r.iterations is not None else r.cost for r in rows]
    seconds = {part: float(sum((r.context or {}).get(key, 0.0) or 0.0 for r in rows)) for part, key in SECONDS}
    return _entry(policy, "study", its, seconds)


def online_totals(policy: str, rounds) -> dict:
    """Totals of an online run (``run_sequence``'s round results)."""
    seconds = {"solve": float(sum(r.seconds for r in rounds)), "learner": float(sum(r.learner_seconds for r in rounds)),
               "probe": float(sum(r.probe_seconds for r in rounds))}
    return _entry(policy, "baseline", [r.iterations for r in rounds], seconds)


class Scripted:
    """A policy that plays a given ω per round (a fixed ω, or the instance-optimal one read off a cost table)."""

    context_key = None

    def __init__(self, omegas: Sequence[float], arms: Sequence[int | None]):
        self.omegas, self.arms, self.t = list(omegas), list(arms), 0

    def ask(self, context=None):
        from steptune.search.sor_learners import Arm

        return Arm(self.arms[self.t], float(self.omegas[self.t]))

    def tell(self, cost, **_) -> None:
        self.t += 1


def run_baselines(seq, setup: dict, table, *, kernel: str = "pyamg", progress=None) -> list[dict]:
    """Gauss–Seidel (ω = 1), the best fixed grid ω and the instance-optimal grid ω of ``table`` (a cost table of
    ``seq``), and adaptive SOR (plain SOR only; left out when it is the study's own policy), each run online
    over ``seq`` with the study's solver, tolerance and iteration cap."""
    from steptune.search.sor_driver import run_sequence
    from steptune.search.sor_learners import AdaptiveSOR

    n = len(table)
    arm, _ = table.best_fixed()
    best = table.iterations[:n].argmin(axis=1)
    ones = np.flatnonzero(np.isclose(table.omegas, 1.0))
    policies = [("gauss-seidel", Scripted([1.0] * n, [int(ones[0]) if ones.size else None] * n)),
                (f"best fixed ω = {table.omegas[arm]:.3f}", Scripted([table.omegas[arm]] * n, [arm] * n)),
                ("instance-optimal (grid)", Scripted(table.omegas[best], best.tolist()))]
    if setup["solver"] == "sor" and setup["policy"].get("learner") != "adaptive":
        policies.append(("adaptive SOR", AdaptiveSOR()))
    out = []
    for name, policy in policies:
        rounds = run_sequence(seq, policy, solver=setup["solver"], kernel=kernel, tol=setup["tol"],
                              maxiter=setup["maxiter"], stop=n, progress=progress)
        out.append(online_totals(name, rounds))
    return out


def verdict(own: dict, baselines: list[dict]) -> dict:
    """Every policy's totals and its ratio to the study's (iterations and seconds; above 1: the study does better)."""
    def ratio(a, b):
        return a / b if b else None

    rows = [own, *baselines]
    return {"policies": [{**r, "vs_study": {"iterations": ratio(r["iterations"], own["iterations"]),
                                            "seconds": ratio(r["seconds"]["total"], own["seconds"]["total"])}}
                         for r in rows]}


def stored_or_own(config: dict | None, policy: str, rows) -> dict:
    """The verdict ``relax-report`` stored for the study if it covers all of ``rows``, else the study's own totals
    (``from``: ``relax-report`` or ``rounds``)."""
    stored = (config or {}).get(VERDICT)
    if stored and stored.get("policies") and stored["policies"][0]["rounds"] == len(rows):
        return {**stored, "from": "relax-report"}
    return {**verdict(study_totals(policy, rows), []), "from": "rounds"}
