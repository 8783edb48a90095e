"""A small class-conditional diffusion model of scikit-learn's 8x8 digits, and a digit classifier.

``DigitsUNet`` predicts the noise of the ``ddpm-linear`` schedule from the training timestep
(0..999) and a class label (10 = no label, for classifier-free guidance); ``DigitsClassifier``
gives the penultimate features FD-digits is computed on. Both train deterministically in a few
minutes on two CPU cores (``train_unet``, ``train_classifier``); the trained weights ship with the
package (``data/``) and ``steptune train-digits`` retrains them into ``runs/models``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from steptune.space.noise import VPDiscrete

from .cache import atomic_torch_save, file_sha256

Tensor = torch.Tensor
NULL_CLASS = 10
SHIPPED = Path(__file__).parent / "data"
MODELS_DIR = Path("runs/models")
UNET_FILE, CLASSIFIER_FILE = "digits-unet.pt", "digits-classifier.pt"


def digits_images() -> tuple[Tensor, Tensor]:
    """(images, labels): the 1797 digits as (n, 1, 8, 8) float32 in [-1, 1], and their classes."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.as_tensor(d.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 8.0 - 1.0
    return x, torch.as_tensor(d.target, dtype=torch.long)


# ---- networks -------------------------------------------------------------------------------------

TIME_STRETCH = 16.0  # the embedding sees timestep / 16: its fastest wave is resolved by a few hundred solver steps


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal features of the (fractional) training timestep, slowed by ``TIME_STRETCH`` so the network is
    smooth in time (a converged reference then takes hundreds of steps, not thousands)."""
    t = t / TIME_STRETCH
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, emb: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb, c_out)
        self.norm2, self.conv2 = nn.GroupNorm(8, c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.emb(e)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


@dataclass(frozen=True)
class UNetConfig:
    channels: tuple[int, int] = (32, 48)
    emb: int = 64


class DigitsUNet(nn.Module):
    """8x8 -> 4x4 -> 8x8 conv UNet with time and class embeddings; ``forward(x, timestep, class_labels)``."""

    def __init__(self, config: UNetConfig = UNetConfig()):
        super().__init__()
        c1, c2 = config.channels
        e = config.emb
        self.config = config
        self.time_mlp = nn.Sequential(nn.Linear(e, e), nn.SiLU(), nn.Linear(e, e))
        self.label = nn.Embedding(NULL_CLASS + 1, e)
        self.inp = nn.Conv2d(1, c1, 3, padding=1)
        self.down1 = ResBlock(c1, c1, e)
        self.pool = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.mid = ResBlock(c2, c2, e)
        self.up = nn.ConvTranspose2d(c2, c1, 2, stride=2)
        self.up1 = ResBlock(2 * c1, c1, e)
        self.out = nn.Sequential(nn.GroupNorm(8, c1), nn.SiLU(), nn.Conv2d(c1, 1, 3, padding=1))

    def forward(self, x: Tensor, timestep: Tensor, class_labels: Tensor | None = None) -> Tensor:
        if class_labels is None:
            class_labels = torch.full((x.shape[0],), NULL_CLASS, dtype=torch.long, device=x.device)
        e = self.time_mlp(timestep_embedding(timestep.expand(x.shape[0]), self.config.emb))
        e = e + self.label(class_labels)
        h0 = self.down1(self.inp(x), e)
        h = self.mid(self.pool(h0), e)
        h = self.up1(torch.cat([self.up(h), h0], dim=1), e)
        return self.out(h)


class DigitsClassifier(nn.Module):
    """A small CNN; ``features`` is the 64-d penultimate layer FD-digits uses."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.SiLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.SiLU(),
            nn.Flatten(), nn.Linear(64 * 2 * 2, 64), nn.SiLU())
        self.head = nn.Linear(64, 10)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


# ---- deterministic training -----------------------------------------------------------------------

@contextlib.contextmanager
def deterministic(threads: int = 1):
    """Fixed thread count and deterministic kernels for the duration (restored afterwards)."""
    if threads < 1:
        raise ValueError(f"threads must be at least 1, not {threads}")
    old_threads, old_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 3000
    batch: int = 96
    lr: float = 2e-3
    label_dropout: float = 0.1
    ema: float = 0.999
    seed: int = 0
    channels: tuple[int, int] = (32, 48)


def ddpm_alphas_cumprod() -> Tensor:
    return torch.tensor(VPDiscrete.named("ddpm-linear").alphas_cumprod, dtype=torch.float32)


def train_unet(config: TrainConfig = TrainConfig(), progress: Callable[[int, float], None] | None = None,
               threads: int = 1) -> DigitsUNet:
    """Train the class-conditional eps-prediction UNet (label dropout for guidance); returns the EMA weights."""
    with deterministic(threads):
        g = torch.Generator().manual_seed(config.seed)
        torch.manual_seed(config.seed)
        x_all, y_all = digits_images()
        ac = ddpm_alphas_cumprod()
        net = DigitsUNet(UNetConfig(tuple(config.channels))).float()
        ema = DigitsUNet(UNetConfig(tuple(config.channels))).float()
        ema.load_state_dict(net.state_dict())
        opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=0.0)
        if config.steps >= 3:
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, config.lr, total_steps=config.steps,
                                                        pct_start=max(0.05, 2.5 / config.steps))
        else:  # too short for a warm-up and a decay: the peak learning rate throughout
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        for step in range(config.steps):
            idx = torch.randint(0, len(x_all), (config.batch,), generator=g)
            x0, y = x_all[idx], y_all[idx]
            y = torch.where(torch.rand(config.batch, generator=g, dtype=torch.float32) < config.label_dropout,
                            NULL_CLASS, y)
            k = torch.randint(0, len(ac), (config.batch,), generator=g)
            eps = torch.randn(x0.shape, generator=g, dtype=torch.float32)
            a = ac[k].sqrt()[:, None, None, None]
            xt = a * x0 + (1 - a * a).sqrt() * eps
            loss = F.mse_loss(net(xt, k.float(), y), eps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                for pe, pn in zip(ema.parameters(), net.parameters()):
                    pe.lerp_(pn, 1 - config.ema)
            if progress is not None:
                progress(step, float(loss.detach()))
    return ema.eval().requires_grad_(False)


def train_classifier(seed: int = 0, epochs: int = 60, threads: int = 1,
                     progress: Callable[[int, float], None] | None = None) -> tuple[DigitsClassifier, float]:
    """Train the classifier on 80% of the digits (light noise augmentation); returns it and its accuracy
    on the other 20%."""
    with deterministic(threads):
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        x_all, y_all = digits_images()
        perm = torch.randperm(len(x_all), generator=g)
        n_test = len(x_all) // 5
        te, tr = perm[:n_test], perm[n_test:]
        net = DigitsClassifier().float()
        opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
        for epoch in range(epochs):
            order = tr[torch.randperm(len(tr), generator=g)]
            for i in range(0, len(order), 64):
                idx = order[i:i + 64]
                x = x_all[idx] + 0.1 * torch.randn(x_all[idx].shape, generator=g, dtype=torch.float32)
                loss = F.cross_entropy(net(x), y_all[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            sched.step()
            if progress is not None:
                progress(epoch, float(loss.detach()))
        net.eval().requires_grad_(False)
        acc = float((net(x_all[te]).argmax(1) == y_all[te]).float().mean())
    return net, acc


# ---- checkpoints ----------------------------------------------------------------------------------

def save_checkpoint(net: nn.Module, path: Path, meta: dict) -> Path:
    """Weights stored as float16 (half the size; the rounded weights are the model from then on)."""
    state = {k: v.half() if v.is_floating_point() else v for k, v in net.state_dict().items()}
    return atomic_torch_save({"state": state, "meta": meta}, path)


def checkpoint_path(name: str, models_dir: str | Path | None = MODELS_DIR) -> Path:
    """``models_dir/name`` when it exists (a local retrain), else the checkpoint shipped with the package."""
    if models_dir is not None and (Path(models_dir) / name).is_file():
        return Path(models_dir) / name
    return SHIPPED / name


def retrained_unet(models_dir: str | Path | None = MODELS_DIR) -> dict | None:
    """The UNet checkpoint ``steptune train-digits`` wrote into ``models_dir`` (its path and training steps), which
    the digits problems load instead of the shipped one; None when there is none."""
    if models_dir is None or not (Path(models_dir) / UNET_FILE).is_file():
        return None
    path = Path(models_dir) / UNET_FILE
    try:
        meta = torch.load(path, map_location="cpu", weights_only=True).get("meta", {})
    except Exception:  # an unreadable file fails where it is loaded, with its own message
        meta = {}
    return {"path": str(path), "steps": (meta.get("train") or {}).get("steps")}


def load_unet(models_dir: str | Path | None = MODELS_DIR) -> tuple[DigitsUNet, dict]:
    path = checkpoint_path(UNET_FILE, models_dir)
    if not path.is_file():
        raise FileNotFoundError(f"no digits UNet checkpoint at {path}; run 'steptune train-digits'")
    ck = torch.load(path, map_location="cpu", weights_only=True)
    cfg = ck["meta"].get("train", {})
    net = DigitsUNet(UNetConfig(tuple(cfg.get("channels", (32, 48))))).float()
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ck["state"].items()})
    return net.eval().requires_grad_(False), {**ck["meta"], "path": str(path), "sha256": file_sha256(path)}


def load_classifier(models_dir: str | Path | None = MODELS_DIR) -> tuple[DigitsClassifier, dict]:
    path = checkpoint_path(CLASSIFIER_FILE, models_dir)
    if not path.is_file():
        raise FileNotFoundError(f"no digits classifier checkpoint at {path}; run 'steptune train-digits'")
    ck = torch.load(path, map_location="cpu", weights_only=True)
    net = DigitsClassifier().float()
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ck["state"].items()})
    return net.eval().requires_grad_(False), {**ck["meta"], "path": str(path), "sha256": file_sha256(path)}


def train_and_save(out_dir: str | Path = MODELS_DIR, config: TrainConfig = TrainConfig(), threads: int = 1,
                   unet_progress=None, classifier_progress=None) -> dict:
    """Train both networks and write them to ``out_dir``; returns what was written and measured."""
    import time

    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    clf, acc = train_classifier(config.seed, threads=threads, progress=classifier_progress)
    t1 = time.perf_counter()
    unet = train_unet(config, unet_progress, threads)
    t2 = time.perf_counter()
    save_checkpoint(clf, out_dir / CLASSIFIER_FILE, {"test_accuracy": acc, "seconds": t1 - t0, "seed": config.seed})
    save_checkpoint(unet, out_dir / UNET_FILE, {"train": asdict(config), "seconds": t2 - t1,
                                                "params": sum(p.numel() for p in unet.parameters())})
    return {"classifier": str(out_dir / CLASSIFIER_FILE), "classifier_accuracy": acc,
            "classifier_seconds": t1 - t0, "unet": str(out_dir / UNET_FILE), "unet_seconds": t2 - t1}
