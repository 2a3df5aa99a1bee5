"""Pixel-by-pixel MNIST (Le et al. 2015; Cooijmans et al. 2017): each 28×28 image is a sequence
of 784 grey levels in [0, 1], read row by row; the class is predicted after the last pixel.

``data.permute=true`` gives permuted MNIST: one fixed permutation of the 784 positions, drawn
from ``data.seed``, applied to every image. It is a true permutation (``randperm``); the
authors' code drew the positions with replacement, which repeats some pixels and drops others.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fwlab.spec import DataSpec
from fwlab_plugins.data.mnist_base import MNISTConfig, MNISTDataModuleBase

PIXELS = 28 * 28


@dataclass
class SequentialMNISTConfig(MNISTConfig):
    permute: bool = False  # permuted MNIST: a fixed, seeded permutation of the pixels


def pixel_permutation(seed: int) -> torch.Tensor:
    """The fixed permutation of the 784 pixel positions for ``seed``."""
    return torch.randperm(PIXELS, generator=torch.Generator().manual_seed(seed))


class SequentialMNISTDataModule(MNISTDataModuleBase):
    """Sequential (pixel-by-pixel) MNIST, 784 steps; data.permute=true for permuted MNIST."""

    Config = SequentialMNISTConfig

    @property
    def spec(self) -> DataSpec:
        return DataSpec("vectors", 1, "class_per_sequence", num_classes=10, seq_len=PIXELS)

    def to_inputs(self, images: np.ndarray) -> torch.Tensor:
        """uint8 images (N, 28, 28) -> float sequences (N, 784, 1)."""
        sequences = torch.from_numpy(images.reshape(len(images), PIXELS).astype(np.float32) / 255)
        if self.config.permute:
            sequences = sequences[:, pixel_permutation(self.config.seed)]
        return sequences.unsqueeze(-1)
