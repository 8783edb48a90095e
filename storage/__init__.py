"""steptune.storage: what was tried and what is best (database, migrations, pandas frames).

Depends only on ``steptune.space``; schedules are stored as their versioned JSON form. pandas is
imported only by the functions that need it. Exports (JSON, diffusers, σ lists) live in
``steptune.exports``.
"""

from .db import (
    DEFAULT_URL,
    LeaseLost,
    ReapResult,
    RelaxationRound,
    Storage,
    StorageError,
    StudyRecord,
    TrialRecord,
    connect,
    resolve_url,
)
from .frames import best_frame, studies_frame, trials_frame
from .schema import STUDY_KINDS

__all__ = ["DEFAULT_URL", "STUDY_KINDS", "LeaseLost", "ReapResult", "RelaxationRound", "Storage", "StorageError",
           "StudyRecord", "TrialRecord", "best_frame", "connect", "resolve_url", "studies_frame", "trials_frame"]

# names that moved to steptune.exports; importing them from here still works for one release
MOVED_TO_EXPORTS = frozenset({
    "ExportError", "StockExport", "SteptuneScheduler", "comfyui_sigmas", "conventions_for", "export_dict",
    "import_schedule", "k_diffusion_sigmas", "parse_export", "read_export", "scheduler_for", "sigma_list_calls",
    "stock_diffusers_export"})


def _deprecated_export_alias(name: str):
    """The one import of the app layer from storage, made only when an old name is asked for."""
    import warnings

    from steptune import exports

    warnings.warn(f"steptune.storage.{name} moved: use 'from steptune.exports import {name}' (the old import "
                  "goes away in the next release)", DeprecationWarning, stacklevel=3)
    return getattr(exports, name)


def __getattr__(name):
    if name in MOVED_TO_EXPORTS:
        return _deprecated_export_alias(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
