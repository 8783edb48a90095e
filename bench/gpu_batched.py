"""Batched candidate evaluation on a GPU: NFE-10 candidates of 256 samples each through a ~1M-parameter
conv UNet on 16x16 inputs, K = 1, 8, 32 candidates per batched pass (space.batch.sample_batch), next to
the network's saturated forward throughput measured in the same run (the physical limit).

Targets: K = 32 at >= 80% of the limit and >= 2x the candidate evaluations per second of K = 1;
sampler overhead per step < 5% of a forward pass.

    python bench/gpu_batched.py               # on the GPU if there is one
    python bench/gpu_batched.py --quick       # tiny sizes, to check the script on a CPU
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_json  # noqa: E402

from steptune.search import DecisionSpace  # noqa: E402
from steptune.space import Model, sample  # noqa: E402
from steptune.space import noise as noise_mod  # noqa: E402
from steptune.space.batch import sample_batch  # noqa: E402


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb: int):
        super().__init__()
        self.n1, self.c1 = nn.GroupNorm(8, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.t = nn.Linear(temb, cout)
        self.n2, self.c2 = nn.GroupNorm(8, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, e):
        h = self.c1(torch.nn.functional.silu(self.n1(x))) + self.t(e)[:, :, None, None]
        return self.skip(x) + self.c2(torch.nn.functional.silu(self.n2(h)))


class SmallUNet(nn.Module):
    """Two resolutions (16x16, 8x8), 64 and 128 channels, sinusoidal time embedding."""

    def __init__(self, ch: int = 64, temb: int = 128):
        super().__init__()
        self.temb = temb
        self.emb = nn.Sequential(nn.Linear(temb, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.inp = nn.Conv2d(1, ch, 3, padding=1)
        self.d1 = ResBlock(ch, ch, temb)
        self.down = nn.Conv2d(ch, 2 * ch, 3, stride=2, padding=1)
        self.d2 = ResBlock(2 * ch, 2 * ch, temb)
        self.mid = ResBlock(2 * ch, 2 * ch, temb)
        self.up = nn.ConvTranspose2d(2 * ch, ch, 2, stride=2)
        self.u1 = ResBlock(2 * ch, ch, temb)
        self.out = nn.Sequential(nn.GroupNorm(8, ch), nn.SiLU(), nn.Conv2d(ch, 1, 3, padding=1))

    def forward(self, x, t):
        half = self.temb // 2
        f = torch.exp(-np.log(1e4) * torch.arange(half, device=x.device, dtype=x.dtype) / half)
        a = 1000 * t.to(x.dtype)[:, None] * f[None]
        e = self.emb(torch.cat([a.sin(), a.cos()], dim=1))
        h0 = self.inp(x)
        h1 = self.d1(h0, e)
        h2 = self.mid(self.d2(self.down(h1), e), e)
        return self.out(self.u1(torch.cat([self.up(h2), h1], dim=1), e))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int) -> float:
    fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / repeats


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--nfe", type=int, default=10)
    ap.add_argument("--candidates", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    if args.quick:
        args.samples, args.candidates, args.repeats = 16, 8, 1
    ks = [k for k in (1, 8, 32) if k <= args.candidates]
    torch.manual_seed(0)
    net = SmallUNet().to(device).eval()
    params = sum(p.numel() for p in net.parameters())
    ns = noise_mod.VPLinear()
    model = Model(net, ns, prediction="eps", time_input="continuous")

    # the physical limit: forward passes per second at growing batch sizes
    sizes = [args.samples * m for m in (1, 2, 4, 8, 16, 32, 64)]
    forward = []
    with torch.inference_mode():
        for b in sizes:
            x = torch.randn(b, 1, 16, 16, device=device)
            t = torch.rand(b, device=device)
            try:
                secs = timed(lambda x=x, t=t: net(x, t), device, args.repeats * 2)
            except torch.OutOfMemoryError:
                break
            forward.append({"batch": b, "seconds": secs, "samples_per_s": b / secs})
            print(f"forward batch {b:>6}: {b / secs:>12,.0f} samples/s")
    limit = max(r["samples_per_s"] for r in forward)
    fwd_at = {r["batch"]: r["seconds"] for r in forward}

    space = DecisionSpace(ns, 1.0, 1e-3)
    rng = np.random.default_rng(0)
    scheds = []
    while len(scheds) < args.candidates:
        s = space.random(args.nfe, rng)
        if s is not None:
            scheds.append(s)
    x_T = torch.randn(args.samples, 1, 16, 16, device=device, generator=None)
    rows = []
    with torch.inference_mode():
        for k in ks:
            groups = [scheds[i:i + k] for i in range(0, len(scheds) - len(scheds) % k or k, k)]

            def run_all(groups=groups, k=k):
                for g in groups:
                    if k == 1:
                        sample(model, x_T, g[0])
                    else:
                        sample_batch(model, x_T, g)

            secs = timed(run_all, device, args.repeats)
            n_cand = sum(len(g) for g in groups)
            per_s = n_cand / secs
            eff = per_s * args.samples * args.nfe
            batch = k * args.samples
            step = secs / len(groups) / args.nfe  # one round: one forward of k x samples plus the sampler
            fwd = fwd_at.get(batch)
            overhead = None if fwd is None else (step - fwd) / fwd
            rows.append({"K": k, "candidates_per_s": per_s, "samples_per_s": eff, "fraction_of_limit": eff / limit,
                         "seconds_per_round": step, "forward_seconds": fwd, "sampler_overhead_per_step": overhead})
            print(f"K = {k:>2}: {per_s:8.2f} candidates/s, {eff:>12,.0f} samples/s = {eff / limit:6.1%} of the "
                  f"limit; sampler overhead per step "
                  f"{'—' if overhead is None else f'{overhead:.1%}'} of a forward pass")
    by_k = {r["K"]: r for r in rows}
    speedup = by_k[max(ks)]["candidates_per_s"] / by_k[1]["candidates_per_s"]
    print(f"network: {params:,} parameters on {device}; limit {limit:,.0f} samples/s; "
          f"K = {max(ks)} vs K = 1: {speedup:.2f}x")
    path = save_json("gpu_batched" + ("_quick" if args.quick else ""),
                     {"device": str(device), "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
                      "parameters": params, "nfe": args.nfe, "samples": args.samples, "forward": forward,
                      "limit_samples_per_s": limit, "rows": rows, "speedup_kmax_vs_1": speedup})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
