"""steptune's ComfyUI nodes: copy or link this folder into ComfyUI/custom_nodes/ (steptune installed in ComfyUI's
Python). ``SteptuneSchedule`` loads a tuned schedule and gives the SAMPLER that runs it whole and its SIGMAS, for
SamplerCustom / SamplerCustomAdvanced."""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
