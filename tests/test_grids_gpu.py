"""Sample grids drawn on a CUDA device equal the CPU's: the same best preset (up to a tie within float32
round-off), the same errors and the same pixels up to a grey level. Skipped where torch sees no CUDA device."""

import numpy as np
import pytest
import torch

from steptune import grids
from steptune.evaluators.digits_cond import digits_problem
from steptune.space import presets

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.usefixtures("no_tf32")]


def test_a_grid_drawn_on_the_gpu_matches_the_cpu(tmp_path):
    drawn = {}
    for device in ("cpu", "cuda"):
        prob = digits_problem(guidance_scale=3.0, models_dir=None)
        s = presets.build("unipc-bh2", 5, prob.noise, t_start=prob.t_start, t_end=prob.t_end)
        drawn[device] = grids.schedule_grid(prob, s, "preset:unipc-bh2", tmp_path / device, device)
    cpu, gpu = drawn["cpu"], drawn["cuda"]
    ev = grids.grid_evaluator(digits_problem(guidance_scale=3.0, models_dir=None), None)
    a, b = (ev.evaluate(g.columns[1].schedule, "train").metrics["rmse"] for g in (cpu, gpu))
    assert b == pytest.approx(a, rel=1e-3)  # the same best preset, or one as good on the CPU's train bank
    for k in (0, 2):
        assert gpu.columns[k].errors == pytest.approx(cpu.columns[k].errors, rel=1e-3, abs=1e-6)
        diff = np.abs(gpu.pixels[k].astype(int) - cpu.pixels[k].astype(int))
        assert diff.max() <= 1, k
    assert len(gpu.png()) > 0 and gpu.layout() == cpu.layout()

