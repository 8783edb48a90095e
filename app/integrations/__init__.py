"""steptune.integrations: tuned schedules run whole inside other samplers' loops.

* ``kdiffusion.sampler(schedule)``: a function with k-diffusion's sampler signature that executes every per-step
  decision of a schedule on any k-diffusion denoiser (also what the ComfyUI node pack in ``comfyui/`` wraps);
* ``source.load``: a schedule from a Schedule, a JSON file, or a study in a database (interpolated for an NFE the
  study did not search).
"""
