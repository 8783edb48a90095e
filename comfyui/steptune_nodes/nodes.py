"""The ``SteptuneSchedule`` node. ComfyUI is imported only when the node runs inside ComfyUI."""

from __future__ import annotations


def load_sampler(schedule_json: str = "", database: str = "", study: str = "", nfe: int = 0, trial: int = 0,
                 convention: str = "auto"):
    """The steptune k-diffusion sampler for the node's inputs: a schedule JSON path, or a database URL (empty:
    runs/steptune.db) with a study and an NFE (interpolated if the study did not search it) or a trial id."""
    from steptune.integrations.kdiffusion import sampler

    conv = None if convention == "auto" else convention
    if schedule_json.strip():
        return sampler(schedule_json.strip(), convention=conv)
    if not study.strip():
        raise ValueError("SteptuneSchedule: give a schedule JSON path, or a study (with an NFE or a trial id)")
    return sampler(db=database.strip() or None, study=study.strip(), nfe=nfe or None, trial=trial or None,
                   convention=conv)


def sigmas_for(tuned, denoise: float):
    """The SIGMAS to run ``tuned`` with at ``denoise`` (the sampler re-times the schedule onto them below 1)."""
    import torch

    return torch.tensor(tuned.sigmas(denoise), dtype=torch.float32)


class SteptuneSchedule:
    """Load a tuned schedule: SAMPLER (comfy.samplers.KSAMPLER around steptune's k-diffusion sampler) and SIGMAS."""

    CATEGORY = "sampling/custom_sampling/steptune"
    RETURN_TYPES = ("SAMPLER", "SIGMAS")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 (ComfyUI's name)
        return {"required": {
            "schedule_json": ("STRING", {"default": ""}),
            "database": ("STRING", {"default": ""}),
            "study": ("STRING", {"default": ""}),
            "nfe": ("INT", {"default": 0, "min": 0, "max": 1000}),
            "trial": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
            "convention": (["auto", "ve", "const"],),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01}),
        }}

    def load(self, schedule_json, database, study, nfe, trial, convention, denoise):
        import comfy.samplers

        tuned = load_sampler(schedule_json, database, study, nfe, trial, convention)
        return comfy.samplers.KSAMPLER(tuned), sigmas_for(tuned, denoise)


NODE_CLASS_MAPPINGS = {"SteptuneSchedule": SteptuneSchedule}
NODE_DISPLAY_NAME_MAPPINGS = {"SteptuneSchedule": "steptune tuned schedule"}
