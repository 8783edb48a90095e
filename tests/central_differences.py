"""Autograd against central differences, shared by the refinement tests."""

from __future__ import annotations

from collections.abc import Callable

import torch


def check_gradient(loss: Callable[[], torch.Tensor], theta: dict[str, torch.Tensor],
                   tol: Callable[[str], float], h: float = 1e-5) -> None:
    """Back-propagates ``loss()`` and asserts each parameter's gradient equals the central difference of the loss to
    ``tol(kind)`` relative to the largest difference of that kind."""
    loss().backward()
    for kind, v in theta.items():
        fd = torch.zeros_like(v)
        for j in range(len(v)):
            with torch.no_grad():
                v[j] += h
                up = float(loss())
                v[j] -= 2 * h
                down = float(loss())
                v[j] += h
            fd[j] = (up - down) / (2 * h)
        assert float((v.grad - fd).abs().max()) <= tol(kind) * float(fd.abs().max()), (kind, v.grad, fd)
