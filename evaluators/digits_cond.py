"""``digits-cond``: the shipped class-conditional digits UNet as a problem, with FD-digits as its expensive metric.

Sample i of every noise bank gets the label i mod 10 (``bank_labels``); the UNet runs with classifier-free
guidance (``GuidedDigits``). FD-digits is the Fréchet distance between Gaussians fitted to the digit
classifier's 64-d penultimate features of the samples and of all 1797 digits (the FID recipe with a small
in-domain network instead of Inception). Like FID it is biased upward for few samples, so compare values
computed on the same number of samples. The evaluator also reports ``fd_reference``, the same distance to
the reference solutions from the same noises (see ``Evaluator._fd_to_reference``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from steptune.space import Model
from steptune.space.noise import VPDiscrete

from .digits_networks import MODELS_DIR, NULL_CLASS, DigitsUNet, digits_images, load_classifier, load_unet
from .metrics import frechet_distance, gaussian_stats
from .neural_reference import ReferenceSettings
from .problems import NeuralProblem

Tensor = torch.Tensor


def bank_labels(n: int, device=None) -> Tensor:
    """The class of sample i of any noise bank: i mod 10 (fixed, so a bank's labels never change)."""
    return torch.arange(n, device=device) % 10


class GuidedDigits:
    """``fn(x, timestep)`` of the digits UNet with classifier-free guidance: uncond + s (cond - uncond),
    one batched forward for both; the labels are ``bank_labels``. ``guidance_scale=None`` is unguided
    conditional sampling (the same as 1)."""

    def __init__(self, unet: DigitsUNet, guidance_scale: float | None):
        self.unet, self.guidance_scale = unet, guidance_scale

    def to(self, device) -> GuidedDigits:
        """The UNet on ``device``, in place; inputs from any device are moved to it and back."""
        self.unet.to(device)
        return self

    @staticmethod
    def sample_kwargs(n: int) -> dict:
        """The labels of n bank samples, for calls that stack several runs' samples (``sample_batch``)."""
        return {"class_labels": bank_labels(n)}

    def __call__(self, x: Tensor, timestep: Tensor, class_labels: Tensor | None = None) -> Tensor:
        n = x.shape[0]
        device = next(self.unet.parameters()).device
        xin, t = x.to(device, torch.float32), timestep.to(device, torch.float32).expand(n)
        y = bank_labels(n, device) if class_labels is None else class_labels.to(device)
        s = self.guidance_scale
        if s is None or s == 1.0:
            return self.unet(xin, t, y).to(x.device, x.dtype)
        null = torch.full_like(y, NULL_CLASS)
        out = self.unet(torch.cat([xin, xin]), torch.cat([t, t]), torch.cat([y, null]))
        cond, uncond = out[:n], out[n:]
        return (uncond + s * (cond - uncond)).to(x.device, x.dtype)


class DigitsQuality:
    """``quality(x) -> {"fd_digits", "accuracy"}`` for samples x (n, 1, 8, 8) whose labels are
    ``bank_labels(n)``; samples are clipped to the data range [-1, 1] first."""

    def __init__(self, models_dir: str | Path | None = MODELS_DIR):
        self.classifier, self.meta = load_classifier(models_dir)
        images, _ = digits_images()
        with torch.no_grad():
            self.data_stats = gaussian_stats(self.classifier.features(images))

    @property
    def device(self) -> torch.device:
        return next(self.classifier.parameters()).device

    def to(self, device) -> DigitsQuality:
        """The classifier on ``device``, in place; samples from any device are moved to it."""
        self.classifier.to(device)
        return self

    def features(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self.classifier.features(x.to(self.device).float().clamp(-1, 1))

    def fd(self, x: Tensor) -> float:
        return frechet_distance(*gaussian_stats(self.features(x)), *self.data_stats)

    def accuracy(self, x: Tensor, labels: Tensor | None = None) -> float:
        labels = bank_labels(x.shape[0]) if labels is None else labels
        with torch.no_grad():
            pred = self.classifier(x.to(self.device).float().clamp(-1, 1)).argmax(1)
        return float((pred.cpu() == labels.cpu()).float().mean())

    def __call__(self, x: Tensor) -> dict:
        return {"fd_digits": self.fd(x), "accuracy": self.accuracy(x)}


def digits_decode(x: Tensor) -> Tensor:
    """Images in [0, 1] (1 channel, 8 x 8) of digit states in the data range [-1, 1] (clipped, as the classifier
    sees them)."""
    return (x.float().clamp(-1, 1) + 1) / 2


def digits_problem(guidance_scale: float = 3.0, models_dir: str | Path | None = MODELS_DIR,
                   reference_tol: float | None = None, bank_sizes: tuple[int, int] = (64, 256),
                   quality: bool = True) -> NeuralProblem:
    """``digits-cond``: the class-conditional digits UNet on ``ddpm-linear`` (eps prediction, training
    timesteps) with guidance ``guidance_scale``; FD-digits and the classifier's accuracy on the guided
    labels are its expensive metrics (held-out evaluations)."""
    unet, meta = load_unet(models_dir)
    ns = VPDiscrete.named("ddpm-linear")
    model = Model(GuidedDigits(unet, guidance_scale), ns, prediction="eps", time_input="discrete",
                  time_differentiable=True)
    settings = ReferenceSettings() if reference_tol is None else ReferenceSettings(tol=float(reference_tol))
    source = {"kind": "network", "model": "digits-unet", "unet_sha256": meta["sha256"],
              "guidance_scale": guidance_scale, "labels": "i mod 10"}
    return NeuralProblem(name="digits-cond", noise=ns, model=model, shape=(1, 8, 8), source=source,
                         reference_settings=settings, bank_sizes=tuple(bank_sizes),
                         quality=DigitsQuality(models_dir) if quality else None,
                         quality_metrics=("fd_digits", "accuracy") if quality else (), decode=digits_decode)
