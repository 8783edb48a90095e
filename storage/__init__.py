"""steptune.storage: what was tried and what is best (database, pandas frames, export).

Depends only on ``steptune.space``; schedules are stored as their versioned JSON form. pandas and
diffusers are imported only by the functions that need them.
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
    schedule_key,
)
from .export import (
    ExportError,
    StockExport,
    comfyui_sigmas,
    conventions_for,
    export_dict,
    import_schedule,
    k_diffusion_sigmas,
    parse_export,
    read_export,
    scheduler_for,
    sigma_list_calls,
    stock_diffusers_export,
)
from .frames import best_frame, studies_frame, trials_frame

__all__ = ["DEFAULT_URL", "ExportError", "LeaseLost", "ReapResult", "RelaxationRound", "SteptuneScheduler",
           "StockExport", "Storage", "StorageError", "StudyRecord", "TrialRecord", "best_frame", "comfyui_sigmas",
           "connect", "conventions_for", "export_dict", "import_schedule", "k_diffusion_sigmas", "sigma_list_calls",
           "parse_export", "read_export", "resolve_url", "schedule_key", "scheduler_for",
           "stock_diffusers_export", "studies_frame", "trials_frame"]


def __getattr__(name):
    if name == "SteptuneScheduler":  # needs diffusers; imported on first use
        from steptune.exports.diffusers_scheduler import SteptuneScheduler

        return SteptuneScheduler
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
