"""Few-shot regression episodes from a Gaussian process (Santoro et al. 2016, section 4.4).

Each episode draws a function f ~ GP(0, k) and T points x_t ~ U(x_low, x_high); the targets are
y_t = f(x_t) + ε_t with ε_t ~ N(0, σ_n²). The model sees (x_t, y_{t-1}) at step t (y_{-1} = 0)
and predicts y_t before seeing it. The kernel is RBF by default,

    k(x, x') = σ_f² exp( −(x − x')² / (2 ℓ²) ),

with σ_f, ℓ, σ_n configurable. The baseline is the GP posterior mean under the true kernel,
given the earlier points of the same episode,

    μ_t = k(x_t, X_<t) (K_<t + σ_n² I)⁻¹ y_<t          (μ_0 = 0, the prior mean),

shipped with every batch so that the model's error is logged beside the baseline's
(``baseline_mse``) on the very same episodes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

from fwlab.bounds import bounded
from fwlab.datamodule import DataConfig, DataModule
from fwlab.errors import ConfigError
from fwlab.spec import DataSpec

SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
SAMPLING_JITTER = 1e-6  # added to the kernel's diagonal so that its Cholesky factor exists
_EPISODES_PER_CHUNK = 1024


@dataclass
class GPRegressionConfig(DataConfig):
    episode_length: int = bounded(50, at_least=1)  # T points per episode
    lengthscale: float = bounded(1.0, above=0.0)  # ℓ
    signal_std: float = bounded(1.0, at_least=0.0)  # σ_f
    noise_std: float = bounded(0.1, at_least=0.0)  # σ_n
    x_low: float = -5.0
    x_high: float = 5.0
    train_size: int = bounded(20_000, at_least=1)  # episodes
    val_size: int = bounded(1_000, at_least=1)
    test_size: int = bounded(2_000, at_least=1)


def rbf_kernel(
    a: torch.Tensor, b: torch.Tensor, lengthscale: float, signal_std: float
) -> torch.Tensor:
    """k(a_i, b_j) for a (N, P), b (N, Q) -> (N, P, Q)."""
    squared = (a.unsqueeze(-1) - b.unsqueeze(-2)).square()
    return signal_std**2 * torch.exp(-squared / (2 * lengthscale**2))


def posterior_means(x: torch.Tensor, y: torch.Tensor, config: GPRegressionConfig) -> torch.Tensor:
    """μ_t for every step: the GP posterior mean at x_t given (x_<t, y_<t), (N, T) float64."""
    gram = rbf_kernel(x, x, config.lengthscale, config.signal_std)
    return _posterior_means_from_kernel(gram, y, config)


def _posterior_means_from_kernel(
    gram: torch.Tensor, y: torch.Tensor, config: GPRegressionConfig
) -> torch.Tensor:
    """:func:`posterior_means` from the episodes' kernel matrices K (N, T, T).

    All steps from one Cholesky factorisation per episode, L Lᵀ = K + σ_n² I over the whole
    episode, and z = L⁻¹ y. L's leading t×t block is the factor of K_<t + σ_n² I, so z's first t
    entries are that block's L_<t⁻¹ y_<t; and L's row t gives k(x_t, X_<t) = L[t, <t] L_<tᵀ (the
    noise is on the diagonal only). Hence

        μ_t = L[t, <t] L_<tᵀ (L_<t L_<tᵀ)⁻¹ y_<t = L[t, <t] z_<t,

    the strictly lower part of L times z: O(T³) per episode, where a solve per step is O(T⁴)
    (at the default sizes the datamodule's setup took 62 s on 2 CPU cores that way, 1.0-1.2 s
    this way). A noise below the sampler's jitter is taken as the jitter, the smallest noise the
    draws have, so that σ_n = 0 stays defined."""
    noise = max(config.noise_std**2, SAMPLING_JITTER)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype)
    cholesky = torch.linalg.cholesky(gram + noise * eye)
    z = torch.linalg.solve_triangular(cholesky, y.unsqueeze(-1), upper=False)
    return (cholesky.tril(-1) @ z).squeeze(-1)  # row 0 is empty: μ_0 = 0, the prior mean


def generate(
    count: int, config: GPRegressionConfig, split: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs (N, T, 2) = (x_t, y_{t-1}), targets y (N, T), GP posterior means (N, T)."""
    generator = torch.Generator().manual_seed(config.seed * 3 + SPLIT_IDS[split])
    steps = config.episode_length
    x = torch.rand(count, steps, generator=generator, dtype=torch.float64)
    x = config.x_low + (config.x_high - config.x_low) * x
    normals = torch.randn(count, steps, 1, generator=generator, dtype=torch.float64)
    noise = torch.randn(count, steps, generator=generator, dtype=torch.float64)
    jitter = SAMPLING_JITTER * torch.eye(steps, dtype=torch.float64)

    def episodes(
        x: torch.Tensor, normals: torch.Tensor, noise: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Targets y = f(x) + σ_n ε with f drawn from the GP, and their baselines: one kernel
        matrix per episode for both."""
        gram = rbf_kernel(x, x, config.lengthscale, config.signal_std)
        function = (torch.linalg.cholesky(gram + jitter) @ normals).squeeze(-1)
        y = function + config.noise_std * noise
        return y, _posterior_means_from_kernel(gram, y, config)

    y, means = _by_episode_chunks(episodes, x, normals, noise)
    previous_y = torch.cat([torch.zeros(count, 1, dtype=torch.float64), y[:, :-1]], dim=1)
    inputs = torch.stack([x, previous_y], dim=-1)
    return inputs.float(), y.float(), means.float()


def _by_episode_chunks(
    function: Callable[..., tuple[torch.Tensor, ...]], *tensors: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """``function`` of the tensors' episodes (their first axis) a chunk at a time, each of its
    outputs concatenated: a chunk's (n, T, T) temporaries take 20 MB each at T = 50, those of
    20,000 episodes at once 400 MB, and generating those episodes took 6.5 s at once against
    1.3 s by chunks (measured while the kernel was still computed twice)."""
    chunks = zip(*(tensor.split(_EPISODES_PER_CHUNK) for tensor in tensors))
    return tuple(torch.cat(parts) for parts in zip(*(function(*chunk) for chunk in chunks)))


class GPRegressionDataModule(DataModule):
    """Few-shot GP regression episodes: input (x_t, y_{t-1}), target y_t (Santoro et al. 2016)."""

    Config = GPRegressionConfig

    def __init__(self, config: GPRegressionConfig) -> None:
        if not config.x_low < config.x_high:  # x_t ~ U(x_low, x_high)
            raise ConfigError(
                f"data.x_low={config.x_low}, data.x_high={config.x_high}: x_low must be below "
                "x_high (the points are drawn uniformly between them)"
            )
        super().__init__(config)

    @property
    def spec(self) -> DataSpec:
        return DataSpec("vectors", 2, "regression_per_step", seq_len=self.config.episode_length)

    @classmethod
    def tiny_example(cls, directory: Path) -> dict[str, Any]:
        return {"train_size": 16, "val_size": 8, "test_size": 8, "episode_length": 6}

    def setup(self, stage: str | None = None) -> None:
        for split in SPLIT_IDS:
            if split not in self.datasets:
                count = getattr(self.config, f"{split}_size")
                inputs, targets, baseline = generate(count, self.config, split)
                self.datasets[split] = TensorDataset(inputs, targets, baseline)
