"""Pixel-by-pixel MNIST (Le et al. 2015; Cooijmans et al. 2017): each 28×28 image is a sequence
of 784 grey levels in [0, 1], read row by row; the class is predicted after the last pixel.

``data.permute=true`` gives permuted MNIST: one fixed permutation of the 784 positions, drawn
from ``data.seed``, applied to every image. It is a true permutation (``randperm``); the
authors' code drew the positions with replacement, which repeats some pixels and drops others.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fwlab.datamodule import DataConfig, DataModule
from fwlab.spec import DataSpec
from fwlab_plugins.data.mnist_files import mnist_splits, random_digits, write_idx_set

PIXELS = 28 * 28


@dataclass
class SequentialMNISTConfig(DataConfig):
    root: str = "data/mnist"  # folder of the idx files (or torchvision's MNIST/raw under it)
    download: bool = False  # fetch with torchvision when nothing is found
    permute: bool = False  # permuted MNIST: a fixed, seeded permutation of the pixels
    val_size: int = 5000  # validation images taken from the 60,000 training images
    # train/val/test fractions when the root holds one set only (e.g. the 10,000 test images)
    pool_fractions: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])


def pixel_permutation(seed: int) -> torch.Tensor:
    """The fixed permutation of the 784 pixel positions for ``seed``."""
    return torch.randperm(PIXELS, generator=torch.Generator().manual_seed(seed))


class SequentialMNISTDataModule(DataModule):
    """Sequential (pixel-by-pixel) MNIST, 784 steps; data.permute=true for permuted MNIST."""

    Config = SequentialMNISTConfig

    @property
    def spec(self) -> DataSpec:
        return DataSpec("vectors", 1, "class_per_sequence", num_classes=10, seq_len=PIXELS)

    @classmethod
    def tiny_example(cls, directory: Path) -> dict[str, Any]:
        write_idx_set(directory, "t10k", *random_digits(40, seed=0))
        return {"root": str(directory), "val_size": 8}

    def to_sequences(self, images: np.ndarray) -> torch.Tensor:
        """uint8 images (N, 28, 28) -> float sequences (N, 784, 1)."""
        sequences = torch.from_numpy(images.reshape(len(images), PIXELS).astype(np.float32) / 255)
        if self.config.permute:
            sequences = sequences[:, pixel_permutation(self.config.seed)]
        return sequences.unsqueeze(-1)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        splits = mnist_splits(
            self.config.root,
            self.config.download,
            self.config.val_size,
            tuple(self.config.pool_fractions),
            self.config.seed,
        )
        for name, (images, labels) in splits.items():
            self.datasets[name] = TensorDataset(self.to_sequences(images), torch.from_numpy(labels))
