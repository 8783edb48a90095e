"""Gaussian mixtures with full covariances: exact denoisers, marginal densities, sampling, fitting.

For data x0 ~ sum_k w_k N(mu_k, Sigma_k) and x_t = alpha x0 + sigma eps (eps ~ N(0, I)), every
component gives x_t | k ~ N(alpha mu_k, alpha^2 Sigma_k + sigma^2 I), and the posterior means are

    E[x0 | x_t, k]  = mu_k + alpha Sigma_k (alpha^2 Sigma_k + sigma^2 I)^-1 (x_t - alpha mu_k)
    E[eps | x_t, k] = sigma (alpha^2 Sigma_k + sigma^2 I)^-1 (x_t - alpha mu_k)

weighted by the responsibilities p(k | x_t). Each covariance is diagonalised once,
Sigma_k = U_k diag(d_k) U_k^T, so alpha^2 Sigma_k + sigma^2 I = U_k diag(alpha^2 d_k + sigma^2) U_k^T
and a call costs O(batch K D^2) with no matrix inverse. Both posterior means are computed directly
(no eps = (x - alpha x0) / sigma), so they stay accurate at alpha = 0 and at sigma -> 0.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .cache import float64_sha256

Tensor = torch.Tensor
_F64 = torch.float64


class GaussianMixture:
    """sum_k weights[k] N(means[k], covs[k]) in D dimensions, float64.

    ``weights`` (K,), ``means`` (K, D), ``covs`` (K, D, D) symmetric positive definite. Weights are
    normalised to sum to one. Inputs ``x`` to the methods are (batch, D) or (batch, *shape) with
    prod(shape) = D; results keep that shape.
    """

    def __init__(self, weights, means, covs):
        w = torch.as_tensor(weights, dtype=_F64).detach().cpu().clone()
        mu = torch.as_tensor(means, dtype=_F64).detach().cpu().clone()
        cov = torch.as_tensor(covs, dtype=_F64).detach().cpu().clone()
        if w.ndim != 1 or mu.ndim != 2 or cov.ndim != 3:
            raise ValueError("GaussianMixture needs weights (K,), means (K, D) and covs (K, D, D)")
        K, D = mu.shape
        if w.shape[0] != K or cov.shape != (K, D, D):
            raise ValueError(f"GaussianMixture: shapes disagree: weights {tuple(w.shape)}, means {tuple(mu.shape)}, "
                             f"covs {tuple(cov.shape)}")
        if not bool(torch.isfinite(w).all() & torch.isfinite(mu).all() & torch.isfinite(cov).all()):
            raise ValueError("GaussianMixture: parameters must be finite")
        if bool((w <= 0).any()):
            raise ValueError("GaussianMixture: weights must be positive")
        cov = 0.5 * (cov + cov.transpose(1, 2))
        d, U = torch.linalg.eigh(cov)
        if bool((d <= 0).any()):
            k = int((d <= 0).any(dim=1).nonzero()[0])
            raise ValueError(f"GaussianMixture: covariance {k} is not positive definite (smallest eigenvalue "
                             f"{float(d[k].min()):.3g}); add a ridge (reg_covar)")
        self.weights = w / w.sum()
        self.means = mu
        self.covs = cov
        self.eigvals = d  # (K, D)
        self.eigvecs = U  # (K, D, D), columns are eigenvectors
        self.log_weights = torch.log(self.weights)
        self._devices: dict[str, GaussianMixture] = {}
        self._fingerprint: str | None = None

    # ---- basic properties -------------------------------------------------------------------

    @property
    def n_components(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def device(self) -> torch.device:
        return self.means.device

    @property
    def mean(self) -> Tensor:
        """The mixture mean sum_k w_k mu_k, (D,)."""
        return self.weights @ self.means

    @property
    def covariance(self) -> Tensor:
        """The mixture covariance, (D, D)."""
        m = self.mean
        dm = self.means - m
        return torch.einsum("k,kij->ij", self.weights, self.covs) + torch.einsum("k,ki,kj->ij", self.weights, dm, dm)

    def to(self, device) -> GaussianMixture:
        """The same mixture with its tensors on ``device`` (copies are cached)."""
        device = torch.device(device)
        if device == self.device:
            return self
        key = str(device)
        if key not in self._devices:
            other = object.__new__(GaussianMixture)
            for name in ("weights", "means", "covs", "eigvals", "eigvecs", "log_weights"):
                setattr(other, name, getattr(self, name).to(device))
            other._devices = {}
            other._fingerprint = self.fingerprint()
            self._devices[key] = other
        return self._devices[key]

    def fingerprint(self) -> str:
        """sha256 (hex) of the parameters' float64 bytes: the mixture's identity for cache keys."""
        if self._fingerprint is None:
            self._fingerprint = float64_sha256(self.weights, self.means, self.covs)
        return self._fingerprint

    def state_dict(self) -> dict:
        return {"weights": self.weights.cpu(), "means": self.means.cpu(), "covs": self.covs.cpu()}

    @classmethod
    def from_state_dict(cls, d: dict) -> GaussianMixture:
        return cls(d["weights"], d["means"], d["covs"])

    # ---- posterior and density ---------------------------------------------------------------

    def _flat(self, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        x = torch.as_tensor(x)
        shape = tuple(x.shape)
        xf = x.reshape(shape[0], -1) if x.ndim != 1 else x.reshape(1, -1)
        if xf.shape[1] != self.dim:
            raise ValueError(f"GaussianMixture: input has {xf.shape[1]} values per sample, the mixture is {self.dim}-D")
        return xf.to(device=self.device, dtype=_F64), shape

    def _components(self, x: Tensor, alpha: float | Tensor,
                    sigma: float | Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(y, v, log p(x, k)): y = U_k^T (x - alpha mu_k) (B, K, D), v = alpha^2 d_k + sigma^2 (K, D)."""
        a, s = (float(v.detach()) if isinstance(v, Tensor) else float(v) for v in (alpha, sigma))
        if not (math.isfinite(a) and math.isfinite(s)) or a < 0 or s < 0 or a == s == 0:
            raise ValueError(f"GaussianMixture: need alpha >= 0, sigma >= 0, not both 0 (got {a}, {s})")
        if not isinstance(alpha, Tensor):
            alpha, sigma = a, s
        diff = x[:, None, :] - alpha * self.means[None]
        y = torch.einsum("bkd,kde->bke", diff, self.eigvecs)
        v = alpha * alpha * self.eigvals + sigma * sigma
        logp = (self.log_weights - 0.5 * torch.log(v).sum(-1) - 0.5 * self.dim * math.log(2 * math.pi)
                - 0.5 * (y * y / v).sum(-1))
        return y, v, logp

    def posterior(self, x: Tensor, alpha: float | Tensor, sigma: float | Tensor) -> tuple[Tensor, Tensor]:
        """(E[eps | x_t = x], E[x0 | x_t = x]) for x_t = alpha x0 + sigma eps; alpha, sigma >= 0 (floats, or 0-d
        tensors to differentiate in them).

        alpha = 0 gives the prior mean for x0 (and eps = x / sigma); sigma = 0 gives x0 = x / alpha
        and eps = 0.
        """
        xf, shape = self._flat(x)
        y, v, logp = self._components(xf, alpha, sigma)
        # responsibilities (B, K), written out: torch.softmax (like max with indices) hands even tiny inputs
        # to worker threads and stalls for milliseconds per call on a busy machine; amax does not
        r = torch.exp(logp - logp.amax(dim=1, keepdim=True))
        r = r / r.sum(dim=1, keepdim=True)
        g = r[..., None] * (y / v)  # (B, K, D), in each component's eigenbasis
        if not isinstance(alpha, Tensor):
            alpha, sigma = float(alpha), float(sigma)
        x0 = r @ self.means + alpha * torch.einsum("kde,bke->bd", self.eigvecs, g * self.eigvals)
        eps = sigma * torch.einsum("kde,bke->bd", self.eigvecs, g)
        return eps.reshape(shape), x0.reshape(shape)

    def denoise(self, x: Tensor, alpha: float, sigma: float) -> Tensor:
        """The posterior mean E[x0 | x_t = x] for x_t = alpha x0 + sigma eps."""
        return self.posterior(x, alpha, sigma)[1]

    def log_prob(self, x: Tensor, alpha: float = 1.0, sigma: float = 0.0) -> Tensor:
        """log density of x_t = alpha x0 + sigma eps at x (the data density for the defaults), (batch,)."""
        xf, _ = self._flat(x)
        return torch.logsumexp(self._components(xf, alpha, sigma)[2], dim=1)

    # ---- sampling and fitting ----------------------------------------------------------------

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n samples (n, D). The draws come from ``generator`` (a CPU generator) in a fixed order:
        component indices first, then standard normals; the result is moved to the mixture's device."""
        comp = torch.multinomial(self.weights.cpu(), n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=_F64)
        comp, z = comp.to(self.device), z.to(self.device)
        x = torch.empty(n, self.dim, dtype=_F64, device=self.device)
        scale = self.eigvecs * self.eigvals.sqrt()[:, None, :]  # U_k diag(sqrt d_k)
        for k in torch.unique(comp).tolist():
            idx = comp == k
            x[idx] = self.means[k] + z[idx] @ scale[k].T
        return x

    @classmethod
    def fit(cls, data, n_components: int, reg_covar: float = 1e-3, seed: int = 0, max_iter: int = 200,
            tol: float = 1e-3) -> GaussianMixture:
        """Fit with scikit-learn's EM (full covariances, k-means initialisation, fixed ``seed``)."""
        from sklearn.mixture import GaussianMixture as SkGaussianMixture
        from threadpoolctl import threadpool_limits

        X = np.asarray(data.detach().cpu().numpy() if isinstance(data, Tensor) else data, dtype=np.float64)
        X = X.reshape(X.shape[0], -1)
        sk = SkGaussianMixture(n_components=n_components, covariance_type="full", reg_covar=reg_covar,
                               random_state=seed, max_iter=max_iter, tol=tol, n_init=1)
        with threadpool_limits(1):  # a small fit: more threads only spin, and on a busy machine that costs
            sk.fit(X)
        return cls(sk.weights_, sk.means_, sk.covariances_)

    def __repr__(self) -> str:
        return f"GaussianMixture(K={self.n_components}, D={self.dim}, sha256={self.fingerprint()[:12]})"

