"""steptune.exports: tuned schedules in the formats generation stacks load, and back.

* JSON with provenance (``export_dict``, ``parse_export``, ``read_export``), ``import_schedule`` and
  ``scheduler_from_export`` (a diffusers scheduler running an exported file as it was tuned);
* diffusers: ``SteptuneScheduler`` runs the whole schedule (``scheduler_for``); ``stock_diffusers_export``
  gives a stock scheduler config only where it is exact;
* k-diffusion / ComfyUI σ lists (``k_diffusion_sigmas``, ``comfyui_sigmas``, ``sigma_list_calls``).

``SteptuneScheduler`` needs diffusers and is imported on first use; nothing else here does.
"""

from .conventions import ExportError, conventions_for, schedule_noise, scheduler_for
from .diffusers_stock import StockExport, stock_diffusers_export
from .json_export import export_dict, parse_export, read_export, scheduler_from_export
from .json_import import DuplicateImport, import_schedule
from .sigmas import comfyui_sigmas, k_diffusion_sigmas, sigma_list_calls

__all__ = ["DuplicateImport", "ExportError", "StockExport", "SteptuneScheduler", "comfyui_sigmas", "conventions_for",
           "export_dict", "import_schedule", "k_diffusion_sigmas", "parse_export", "read_export", "schedule_noise",
           "scheduler_for", "scheduler_from_export", "sigma_list_calls", "stock_diffusers_export"]


def __getattr__(name):
    if name == "SteptuneScheduler":  # needs diffusers
        from .diffusers_scheduler import SteptuneScheduler

        return SteptuneScheduler
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
