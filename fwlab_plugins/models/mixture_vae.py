"""A VAE whose approximate posterior is a K-component diagonal Gaussian mixture (Graves 2016).

    q(z | x) = Σ_k π_k(x) N(z; μ_k(x), diag σ_k(x)²),   p(z) = N(0, I),
    p(x | z) = Π_i Bernoulli(x_i; sigmoid(decoder(z)_i)),

trained on the ELBO  L(x) = E_q[log p(x | z) + log p(z) − log q(z | x)]  with one sample
z ~ q drawn by :class:`fwlab.distributions.DiagonalGaussianMixture`'s ``rsample``: Graves'
estimator carries the gradient to π as well as to μ and σ. There is no closed-form KL for a
mixture, so log q(z | x) is evaluated at the sample. K = 1 is the ordinary VAE (Kingma & Welling
2014). Validation and test also report the importance-weighted bound (Burda et al. 2016)

    log p(x) ≥ log (1/S) Σ_s p(x, z_s) / q(z_s | x),   z_s ~ q,

which tightens with S and is the fairer comparison between posteriors of different families.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn
from torchmetrics import MeanMetric

from fwlab.bounds import bounded
from fwlab.config import dataclass_from
from fwlab.distributions import DiagonalGaussianMixture
from fwlab.errors import IncompatibleError
from fwlab.optim import OptimConfig, make_optimizer
from fwlab.spec import DataSpec

SPLITS = ("train", "val", "test")


@dataclass
class MixtureVAEConfig:
    latent_size: int = bounded(20, at_least=1)  # D, the dimension of z
    # K, the posterior's mixture components; 1 is the ordinary VAE
    components: int = bounded(4, at_least=1)
    # units in each of the encoder's and decoder's two ReLU layers
    hidden_size: int = bounded(400, at_least=1)
    # samples of the importance-weighted bound at validation and test; 0 to skip it
    importance_samples: int = bounded(100, at_least=0)


class ELBOObjective:
    """Checkpoints keep the highest validation ELBO; the summary gives both bounds in nats."""

    monitor = "elbo"
    monitor_mode = "max"

    def summary(self, results: dict[str, float], split: str) -> list[str]:
        lines = []
        if f"{split}/elbo" in results:
            lines.append(f"{split} ELBO:       {results[f'{split}/elbo']:.2f} nats per image")
        if f"{split}/iw_bound" in results:
            lines.append(
                f"{split} log p(x) ≥ {results[f'{split}/iw_bound']:.2f} nats "
                "(importance-weighted bound)"
            )
        return lines


class MixtureVAE(L.LightningModule):
    """VAE with a K-component Gaussian-mixture posterior, reparameterised (Graves 2016)."""

    Config = MixtureVAEConfig

    def __init__(self, spec: DataSpec, config: MixtureVAEConfig, optim: OptimConfig) -> None:
        super().__init__()
        self.config = config
        self.optim_config = optim
        self.objective = ELBOObjective()
        pixels, hidden = spec.input_size, config.hidden_size
        k, d = config.components, config.latent_size
        self.encoder = nn.Sequential(
            nn.Linear(pixels, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
        )
        self.posterior_head = nn.Linear(hidden, k + 2 * k * d)  # logits, μ, σ (pre-softplus)
        self.decoder = nn.Sequential(
            nn.Linear(d, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, pixels),
        )
        self.elbo = nn.ModuleDict({f"{s}_elbo": MeanMetric() for s in SPLITS})
        self.iw_bound = nn.ModuleDict({f"{s}_iw": MeanMetric() for s in SPLITS[1:]})

    @classmethod
    def build(cls, config: DictConfig, spec: DataSpec, registry: Any) -> MixtureVAE:
        if spec.input_kind != "images":
            raise IncompatibleError(
                f"mixture_vae models static images (input kind 'images', e.g. --data mnist); "
                f"this datamodule gives '{spec.input_kind}'"
            )
        model_config = dataclass_from(cls.Config, config.model)
        if model_config.components < 1 or model_config.latent_size < 1:
            raise IncompatibleError("model.components and model.latent_size must be at least 1")
        return cls(spec, model_config, dataclass_from(OptimConfig, config.optim))

    # -- the model ----------------------------------------------------------------------------
    def posterior(self, images: torch.Tensor) -> DiagonalGaussianMixture:
        """q(z | x) for images ``(B, H, W)``."""
        k, d = self.config.components, self.config.latent_size
        out = self.posterior_head(self.encoder(images.flatten(1)))
        logits, loc, scale = out.split([k, k * d, k * d], dim=-1)
        scale = F.softplus(scale) + 1e-4  # keeps σ > 0 and log q finite
        return DiagonalGaussianMixture(logits, loc.view(-1, k, d), scale.view(-1, k, d))

    def log_joint(self, images: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p(x, z) = log p(x | z) + log p(z), for z ``(..., B, D)`` -> ``(..., B)``."""
        logits = self.decoder(z)
        pixels = images.flatten(1).expand_as(logits)
        log_likelihood = -F.binary_cross_entropy_with_logits(logits, pixels, reduction="none").sum(
            -1
        )
        log_prior = (-0.5 * z**2 - 0.5 * math.log(2 * math.pi)).sum(-1)
        return log_likelihood + log_prior

    def elbo_estimate(self, images: torch.Tensor) -> torch.Tensor:
        """One-sample ELBO per image, differentiable through the mixture sample."""
        q = self.posterior(images)
        z = q.rsample()
        return self.log_joint(images, z) - q.log_prob(z)

    @torch.no_grad()
    def importance_weighted_bound(self, images: torch.Tensor, samples: int) -> torch.Tensor:
        q = self.posterior(images)
        z = q.sample((samples,))  # (S, B, D)
        log_weights = self.log_joint(images, z) - q.log_prob(z)
        return log_weights.logsumexp(0) - math.log(samples)

    # -- Lightning ------------------------------------------------------------------------------
    def _step(self, batch: Sequence[torch.Tensor], split: str) -> torch.Tensor:
        images = batch[0]
        elbo = self.elbo_estimate(images)
        loss = -elbo.mean()
        if split == "train":
            self.log("train/loss", loss, prog_bar=True, batch_size=len(images))
        metric = self.elbo[f"{split}_elbo"]  # torchmetrics: exact over every DDP process
        metric.update(elbo.detach())
        self.log(f"{split}/elbo", metric, on_step=False, on_epoch=True, prog_bar=split != "train")
        if split != "train" and self.config.importance_samples > 0:
            bound = self.iw_bound[f"{split}_iw"]
            bound.update(self.importance_weighted_bound(images, self.config.importance_samples))
            self.log(f"{split}/iw_bound", bound, on_step=False, on_epoch=True)
        return loss

    def training_step(self, batch: Sequence[torch.Tensor], _: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Sequence[torch.Tensor], _: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: Sequence[torch.Tensor], _: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return make_optimizer(self.parameters(), self.optim_config)
