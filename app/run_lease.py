"""Whether a run is on a study, from the driver's lease in the study's config ({"id": "host:pid", "heartbeat": ISO
time, "phase": ...}, renewed by the running driver, removed when it ends): what `status` and the dashboard say."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from datetime import datetime

LEASE_SECONDS = 120.0  # a running trial (or a driver) whose heartbeat is older than this belongs to a run that is gone

PHASES = {"start": "starting its evaluators", "spacing": "choosing the presets' spacings",
          "baseline": "scoring the baselines", "search": "searching", "confirm": "confirming on the held-out bank",
          "refine": "refining"}


def process_gone(worker: str | None) -> bool:
    """True when ``worker`` ("host:pid[/...]") names a process on this host that no longer exists."""
    if not worker:
        return True
    host, _, rest = worker.partition(":")
    pid = rest.partition("/")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def lease(config: Mapping | None, now: datetime) -> dict | None:
    """The run that holds a study (its ``config``): its driver (host:pid), phase (and what it means), the
    heartbeat's age at ``now`` and whether it is alive (a heartbeat within the lease and, on this host, a process
    that still exists); None when no run holds it (none ran, or the last one let go as it ended)."""
    held = (config or {}).get("driver")
    if not held or not held.get("heartbeat"):
        return None
    age = (now - datetime.fromisoformat(held["heartbeat"])).total_seconds()
    phase = held.get("phase")
    return {"id": held["id"], "phase": phase, "doing": PHASES.get(phase, phase or "running"), "heartbeat_age": age,
            "alive": age <= LEASE_SECONDS and not process_gone(held["id"])}
