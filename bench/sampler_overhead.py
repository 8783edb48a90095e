"""Sampler overhead: wall time of a 10-NFE sample of 1,024 points in 64-D (gmm-digits size), split into
model time and sampler time, with a 3-layer 256-wide MLP as the model. Target: sampler < 10% of total.

    python bench/sampler_overhead.py [--repeats 20] [--dtype float32]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_json  # noqa: E402

from steptune.space import Model, noise, presets, sample  # noqa: E402


class MLP(torch.nn.Module):
    def __init__(self, dim=64, width=256):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(dim + 1, width), torch.nn.SiLU(), torch.nn.Linear(width, width),
                                       torch.nn.SiLU(), torch.nn.Linear(width, dim))

    def forward(self, x, t):
        return self.net(torch.cat([x, t[:, None].to(x.dtype)], dim=1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--nfe", type=int, default=10)
    ap.add_argument("--batch", type=int, default=1024)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    net = MLP().to(device, dtype).eval()
    model_time = [0.0]

    def fn(x, t):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            y = net(x, t)
        if device == "cuda":
            torch.cuda.synchronize()
        model_time[0] += time.perf_counter() - t0
        return y

    ns = noise.VPLinear()
    model = Model(fn, ns, prediction="eps", time_input="continuous")
    x_T = torch.randn(args.batch, 64, device=device, dtype=dtype)
    rows = []
    for name in ("ddim", "dpm-solver++-2m", "unipc-bh2:order=3", "dpm-solver-3", "heun"):
        sched = presets.build(name, args.nfe, ns)
        with torch.no_grad():
            sample(model, x_T, sched)  # warm-up
        totals, models = [], []
        for _ in range(args.repeats):
            model_time[0] = 0.0
            t0 = time.perf_counter()
            with torch.no_grad():
                sample(model, x_T, sched)
            totals.append(time.perf_counter() - t0)
            models.append(model_time[0])
        total = sorted(totals)[len(totals) // 2]
        mod = sorted(models)[len(models) // 2]
        rows.append({"preset": name, "nfe": sched.nfe, "total_ms": 1e3 * total, "model_ms": 1e3 * mod,
                     "sampler_ms": 1e3 * (total - mod), "sampler_fraction": (total - mod) / total})
    print(f"{'preset':22s} {'NFE':>4s} {'total ms':>9s} {'model ms':>9s} {'sampler ms':>10s} {'sampler %':>9s}")
    for r in rows:
        print(f"{r['preset']:22s} {r['nfe']:4d} {r['total_ms']:9.2f} {r['model_ms']:9.2f} {r['sampler_ms']:10.2f} "
              f"{100 * r['sampler_fraction']:8.1f}%")
    worst = max(r["sampler_fraction"] for r in rows)
    print(f"worst sampler fraction {100 * worst:.1f}% (target < 10%): {'PASS' if worst < 0.10 else 'FAIL'}")
    path = save_json("sampler_overhead", {"device": device, "dtype": args.dtype, "batch": args.batch, "rows": rows,
                                          "target_fraction": 0.10, "worst_fraction": worst})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
