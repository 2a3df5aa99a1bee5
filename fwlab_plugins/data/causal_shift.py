"""Transfer episodes for causal meta-transfer (Bengio et al. 2019): two categorical variables.

The ground truth A → B is drawn once from ``data.seed``:

    π_A ~ Dir(c·1_N),   π_{B|A=a} ~ Dir(c·1_N) for every a        (c = data.concentration).

Each episode draws a transfer distribution by intervening on one variable, replacing its
mechanism with a fresh random marginal (``data.intervention``):

- ``cause`` (the paper): P'(A) = π_A' ~ Dir(c·1_N), P(B | A) unchanged;
- ``effect``: do(B): B ~ π_B' ~ Dir(c·1_N) whatever A is, P(A) unchanged. Le Priol et al.
  (AISTATS 2021) show the causal model's head start can vanish or reverse in such cases.

An episode holds ``transfer_samples`` pairs (a, b) to adapt on, then ``heldout_samples`` more
from the same transfer distribution to measure how well each model adapted. Batches are
``(transfer (E, transfer_samples, 2), held_out (E, heldout_samples, 2))``, int64.

:meth:`CausalShiftDataModule.observational_joint` gives P(A, B) = π_A(a) π_{B|A}(b | a): what a
model pre-trained on unlimited observational data knows before the first episode.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fwlab.bounds import bounded
from fwlab.datamodule import DataConfig, DataModule
from fwlab.errors import ConfigError
from fwlab.spec import DataSpec

INTERVENTIONS = ("cause", "effect")
SPLITS = ("train", "val", "test")


@dataclass
class CausalShiftConfig(DataConfig):
    # episodes per meta-step (the authors update γ after every episode)
    batch_size: int = bounded(1, at_least=1)
    categories: int = bounded(10, at_least=2)  # N, the values each of A and B takes
    intervention: str = "cause"  # cause | effect: the variable each episode intervenes on
    # c of the Dirichlet priors over every distribution
    concentration: float = bounded(1.0, above=0.0)
    transfer_samples: int = bounded(100, at_least=1)  # pairs per episode to adapt on
    # further pairs per episode to score the adapted models
    heldout_samples: int = bounded(1000, at_least=1)
    train_episodes: int = bounded(1000, at_least=1)
    val_episodes: int = bounded(50, at_least=1)
    test_episodes: int = bounded(200, at_least=1)


def sample_categorical(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """One draw from each row of ``probs`` ``(..., N)`` -> int ``(...)``."""
    u = rng.random(probs.shape[:-1])
    draws = (np.cumsum(probs, axis=-1) < u[..., None]).sum(-1)
    return np.minimum(draws, probs.shape[-1] - 1)  # the cumsum may round to just below 1


def _repeat(probs: np.ndarray, count: int) -> np.ndarray:
    """``(E, N)`` -> ``(E, count, N)``: the same distribution for each of ``count`` draws."""
    return np.broadcast_to(probs[:, None, :], (probs.shape[0], count, probs.shape[1]))


class CausalShiftDataModule(DataModule):
    """Transfer episodes (Bengio et al. 2019): A → B categorical, one intervention each."""

    Config = CausalShiftConfig

    def __init__(self, config: CausalShiftConfig) -> None:
        if config.intervention not in INTERVENTIONS:
            raise ConfigError(
                f"data.intervention='{config.intervention}' is not one of "
                f"{', '.join(INTERVENTIONS)}"
            )
        for key, least in (("categories", 2), ("transfer_samples", 1), ("heldout_samples", 1)):
            if getattr(config, key) < least:
                raise ConfigError(f"data.{key}={getattr(config, key)}: must be at least {least}")
        super().__init__(config)
        rng = np.random.default_rng([config.seed, 0])
        n, c = config.categories, config.concentration
        self.pi_a = rng.dirichlet(np.full(n, c))
        self.pi_b_given_a = rng.dirichlet(np.full(n, c), size=n)  # rows: a

    @property
    def spec(self) -> DataSpec:
        return DataSpec(
            "category_pairs",
            self.config.categories,
            "held_out_pairs",
            seq_len=self.config.transfer_samples,
        )

    @classmethod
    def tiny_example(cls, directory: Path) -> dict[str, Any]:
        return {
            "categories": 4,
            "transfer_samples": 20,
            "heldout_samples": 30,
            "train_episodes": 8,
            "val_episodes": 4,
            "test_episodes": 4,
        }

    def observational_joint(self) -> torch.Tensor:
        """P(A = a, B = b) of the ground truth, ``(N, N)`` float64."""
        return torch.from_numpy(self.pi_a[:, None] * self.pi_b_given_a)

    def episodes(self, split: str, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``count`` episodes of ``split``: (transfer, held-out) pairs, each its own draw."""
        config = self.config
        rng = np.random.default_rng([config.seed, 1 + SPLITS.index(split)])
        n, c = config.categories, config.concentration
        total = config.transfer_samples + config.heldout_samples
        new_marginal = rng.dirichlet(np.full(n, c), size=count)  # (E, N)
        if config.intervention == "cause":
            a = sample_categorical(rng, _repeat(new_marginal, total))
            b = sample_categorical(rng, self.pi_b_given_a[a])
        else:
            a = sample_categorical(rng, _repeat(np.tile(self.pi_a, (count, 1)), total))
            b = sample_categorical(rng, _repeat(new_marginal, total))
        pairs = torch.from_numpy(np.stack([a, b], axis=-1).astype(np.int64))
        return pairs[:, : config.transfer_samples], pairs[:, config.transfer_samples :]

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        config = self.config
        for split, count in zip(
            SPLITS, (config.train_episodes, config.val_episodes, config.test_episodes)
        ):
            self.datasets[split] = TensorDataset(*self.episodes(split, count))
