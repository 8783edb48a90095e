"""Feature-space quality of digit samples: FD-digits and the classifier's accuracy on guided labels.

FD-digits is the Fréchet distance between Gaussians fitted to the digit classifier's 64-d
penultimate features of the samples and of all 1797 digits (the FID recipe with a small in-domain
network instead of Inception). Like FID it is biased upward for few samples, so compare values
computed on the same number of samples. The evaluator also reports ``fd_reference``, the same
distance to the reference solutions from the same noises (see ``Evaluator._fd_to_reference``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from scipy import linalg

from .digits import MODELS_DIR, bank_labels, digits_images, load_classifier

Tensor = torch.Tensor


def gaussian_stats(features: Tensor) -> tuple[np.ndarray, np.ndarray]:
    f = features.detach().to("cpu", torch.float64).numpy()
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(C1 + C2 - 2 (C1 C2)^(1/2))."""
    covmean = linalg.sqrtm(cov1 @ cov2)
    if not np.isfinite(covmean).all():  # singular product: regularise, as the FID reference code does
        eps = 1e-6 * np.eye(len(mu1))
        covmean = linalg.sqrtm((cov1 + eps) @ (cov2 + eps))
    covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * np.trace(covmean))


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
