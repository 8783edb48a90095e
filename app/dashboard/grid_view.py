"""The sample grid of a stored trial of an image problem (``steptune.grids``): its schedule, the best preset at its
NFE and the reference, on the first held-out noises.

The best preset is the best preset baseline stored for the trial's problem at that NFE (sweeps, and the baselines
a search stores), at the trial's fidelity where the problem has baselines there; where none is stored, the best
default preset on the train bank. Problems are built again from their stored identity (refused when what is
built here differs), once each; grids are drawn on first request and kept.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from steptune import grids
from steptune.space import ScheduleError
from steptune.storage import Storage, StorageError

from . import queries
from .queries import NotFound


def grid_url(trial_id: int) -> str:
    return f"/api/trials/{trial_id}/grid.png"


def best_stored_preset(store: Storage, study: str, nfe: int, fidelity: str | None):
    """(name, schedule, trial id) of the best preset baseline stored for ``study``'s problem at ``nfe``, as the
    front shows them (at ``fidelity`` when the problem has baselines there); None when none is stored. The name is
    the stored schedule's (the preset with the spacing it was scored at, e.g. ``ddim:spacing=diffusers-leading``),
    not only the preset's curve on the front."""
    prob = next((p for p in queries.problems(store) if any(s["name"] == study for s in p["studies"])), None)
    if prob is None:
        return None
    points = [(p["score"], p["trial"], tr["preset"], tr["fidelity"])
              for tr in queries.front(store, prob["id"])["series"] if tr["kind"] == "preset"
              for p in tr["points"] if p["nfe"] == nfe]
    same = [p for p in points if p[3] == fidelity]
    if not (same or points):
        return None
    _, trial, spec, _ = min(same or points)
    schedule = store.trial(trial).to_schedule()
    return schedule.name or spec, schedule, trial


class Grids:
    """Sample grids of the trials in ``store``; references are cached under ``cache_dir`` (None: in memory)."""

    def __init__(self, store: Storage, cache_dir: str | Path | None = "runs/cache", device: str = "cpu"):
        self.store, self.cache_dir, self.device = store, cache_dir, device
        self._lock = threading.Lock()
        self._evaluators: dict[str, object] = {}
        self._defaults: dict[tuple[str, int], tuple | None] = {}
        self._png: dict[tuple, bytes] = {}

    def _evaluator(self, identity: dict):
        key = json.dumps(identity, sort_keys=True)
        if key not in self._evaluators:
            problem = grids.stored_problem(identity)
            self._evaluators[key] = grids.grid_evaluator(problem, self.cache_dir, self.device)
        return key, self._evaluators[key]

    def png(self, trial_id: int) -> bytes:
        """The PNG of the trial's grid. NotFound for an unknown trial or a problem without images; GridError
        when its problem cannot be built here."""
        try:
            t = self.store.trial(trial_id)
        except StorageError:
            raise NotFound(f"no trial with id {trial_id}") from None
        identity = (self.store.get_study(t.study).problem or {}).get("identity")
        if not grids.is_image_identity(identity):
            raise NotFound(f"trial {trial_id} is not of an image problem: sample grids are drawn for digits-cond and "
                           "for a plugged network whose Plug gives decode(x)")
        stored = best_stored_preset(self.store, t.study, t.nfe, t.fidelity)
        with self._lock:
            key, ev = self._evaluator(identity)
            cache_key = (trial_id, stored[2] if stored else None)
            if cache_key not in self._png:
                if stored is not None:
                    best, chosen = stored[:2], grids.CHOSEN_STORED
                else:
                    if (key, t.nfe) not in self._defaults:
                        self._defaults[(key, t.nfe)] = grids.best_default_preset(ev, t.nfe)
                    best, chosen = self._defaults[(key, t.nfe)], grids.CHOSEN_DEFAULT
                sched = t.to_schedule()
                try:
                    grid = grids.build_grid(ev, sched, best, sched.name or f"trial {trial_id}", chosen)
                except ScheduleError as e:
                    raise grids.GridError(f"trial {trial_id}: {e}") from None
                self._png[cache_key] = grid.png()
            return self._png[cache_key]
