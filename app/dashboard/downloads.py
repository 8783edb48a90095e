"""Exports from the page, made by the same functions as ``steptune export``."""

from __future__ import annotations

import io
import json
import re
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from steptune.exports import comfyui_sigmas, conventions_for, export_dict, k_diffusion_sigmas, scheduler_for
from steptune.exports.json_export import built_from
from steptune.search_cost import cost_at
from steptune.storage import Storage, StorageError

from .queries import NotFound

FORMATS = ("json", "diffusers", "sigmas", "comfyui")


@dataclass
class Download:
    filename: str
    media_type: str
    content: bytes


def _stem(study: str, nfe: int, trial: int) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", study).strip("._") or "study"
    return f"{safe[:80]}-nfe{nfe}-trial{trial}"


def _zip_folder(folder: Path, root: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, f"{root}/{path.relative_to(folder).as_posix()}")
    return buf.getvalue()


def export(store: Storage, trial_id: int, fmt: str, memo: dict | None = None) -> Download:
    """The trial in ``fmt``: json (schedule plus provenance), diffusers (a zipped SteptuneScheduler folder),
    sigmas (k-diffusion list as JSON) or comfyui (comma-separated). Raises ExportError when the
    schedule cannot be exported in that format. ``memo``: ``cost_at``'s, for many exports of an unchanging store."""
    try:
        t = store.trial(trial_id)
    except StorageError:
        raise NotFound(f"no trial with id {trial_id}") from None
    study = store.get_study(t.study)
    stem = _stem(t.study, t.nfe, t.id)
    sched = t.to_schedule()
    if fmt == "json":
        text = json.dumps(export_dict(t, study, cost_at(store, t, memo), built_from(store, t)), indent=2) + "\n"
        return Download(f"{stem}.json", "application/json", text.encode())
    if fmt == "sigmas":
        return Download(f"{stem}-sigmas.json", "application/json", (json.dumps(k_diffusion_sigmas(sched)) + "\n")
                        .encode())
    if fmt == "comfyui":
        return Download(f"{stem}-comfyui.txt", "text/plain", (comfyui_sigmas(sched) + "\n").encode())
    if fmt == "diffusers":
        scheduler = scheduler_for(sched, conventions_for(sched, study))
        with tempfile.TemporaryDirectory(prefix="steptune-export-") as tmp:
            scheduler.save_pretrained(tmp)
            return Download(f"{stem}-scheduler.zip", "application/zip", _zip_folder(Path(tmp), f"{stem}-scheduler"))
    raise NotFound(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
