"""Whether a run is on a study, from the driver's lease in the study's config ({"id": "host:pid", "heartbeat": ISO
time, "phase": ...}, renewed by the running driver, removed when it ends): what `status` and the dashboard say."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime

LEASE_SECONDS = 120.0  # a running trial (or a driver) whose heartbeat is older than this belongs to a run that is gone

PHASES = {"start": "starting its evaluators", "import": "scoring imported schedules",
          "spacing": "choosing the presets' spacings",
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


def driver_id() -> str:
    """This process as a study's driver: host:pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


def driver_gone(worker: str | None) -> bool:
    """True when ``worker`` names a driver on this host whose process no longer exists, or this process (a run
    before this one in it stopped: nothing is in flight now)."""
    if process_gone(worker):
        return True
    host, _, rest = worker.partition(":")
    return host == socket.gethostname() and rest.partition("/")[0] == str(os.getpid())


def beating(beat: Callable[[], None]) -> Callable[[], None]:
    """Call ``beat`` from a background thread every quarter of the lease until the returned function is called
    (which waits for the thread to end). ``beat`` takes care of its own storage errors."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(LEASE_SECONDS / 4):
            beat()

    thread = threading.Thread(target=loop, name="steptune-lease", daemon=True)
    thread.start()

    def end() -> None:
        stop.set()
        thread.join()

    return end


@contextmanager
def holding(storage, study: str, phase: str) -> Iterator[str]:
    """Hold ``study`` as its one driver while the block runs, in ``phase``: the lease claimed (DriverBusy while a
    live run holds it), renewed from a background thread, and let go at the end; yields this driver's id. What
    a command other than a run (``steptune refine``) holds a study with, so that a run and it never work on one
    study at once, and ``status`` says what it does."""
    from steptune.storage import StorageError

    me = driver_id()
    storage.claim_driver(study, me, LEASE_SECONDS, gone=driver_gone)
    storage.beat_driver(study, me, phase=phase)

    def beat() -> None:
        try:
            storage.beat_driver(study, me, phase=phase)
        except StorageError:
            pass  # the database is away: the next beat tries again

    end = beating(beat)
    try:
        yield me
    finally:
        end()
        try:
            storage.release_driver(study, me)
        except StorageError:
            pass  # the lease runs out, or a driver on this host sees this process gone


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
            "alive": age <= LEASE_SECONDS and not process_gone(held["id"]), "busy": held.get("busy")}
