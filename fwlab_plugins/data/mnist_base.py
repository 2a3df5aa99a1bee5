"""The shared part of the MNIST datamodules: where the images come from, and the splits.

A subclass turns uint8 images (N, 28, 28) into its inputs (:meth:`to_inputs`: sequences of
pixels or glimpses, or static images) and declares its spec; the targets are the digits.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fwlab.bounds import bounded
from fwlab.datamodule import DataConfig, DataModule
from fwlab_plugins.data.mnist_files import mnist_splits, random_digits, write_idx_set


@dataclass
class MNISTConfig(DataConfig):
    root: str = "data/mnist"  # folder of the idx files (or torchvision's MNIST/raw under it)
    download: bool = False  # fetch with torchvision when nothing is found
    # validation images taken from the 60,000 training images
    val_size: int = bounded(5000, at_least=1)
    # train/val/test fractions when the root holds one set only (e.g. the 10,000 test images)
    pool_fractions: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])


class MNISTDataModuleBase(DataModule):
    """MNIST from its idx files, split (a base: subclasses define the inputs)."""

    Config = MNISTConfig

    @classmethod
    def tiny_example(cls, directory: Path) -> dict[str, Any]:
        write_idx_set(directory, "t10k", *random_digits(40, seed=0))
        return {"root": str(directory), "val_size": 8}

    @abstractmethod
    def to_inputs(self, images: np.ndarray) -> torch.Tensor:
        """uint8 images (N, 28, 28) -> the inputs of the N examples."""

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        config = self.config
        splits = mnist_splits(
            config.root, config.download, config.val_size, tuple(config.pool_fractions), config.seed
        )
        for name, (images, labels) in splits.items():
            self.datasets[name] = TensorDataset(self.to_inputs(images), torch.from_numpy(labels))
