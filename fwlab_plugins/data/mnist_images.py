"""Static MNIST: each example is one 28×28 image (and its digit), not a sequence.

The images are binarised for a Bernoulli likelihood (``data.binarize``):

- ``static`` (default): every pixel is drawn once as Bernoulli(grey level), from ``data.seed``
  (the "stochastically binarised, then fixed" MNIST of Larochelle & Murray 2011), so every
  epoch and every evaluation sees the same binary images;
- ``threshold``: a pixel is 1 where its grey level exceeds 1/2;
- ``none``: the grey levels in [0, 1].
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch

from fwlab.errors import ConfigError
from fwlab.spec import DataSpec
from fwlab_plugins.data.mnist_base import MNISTConfig, MNISTDataModuleBase

BINARIZATIONS = ("static", "threshold", "none")


@dataclass
class MNISTImagesConfig(MNISTConfig):
    binarize: str = "static"  # static | threshold | none


class MNISTImagesDataModule(MNISTDataModuleBase):
    """Static MNIST images (28×28), binarised; for image models such as mixture_vae."""

    Config = MNISTImagesConfig

    def __init__(self, config: MNISTImagesConfig) -> None:
        if config.binarize not in BINARIZATIONS:
            raise ConfigError(
                f"data.binarize='{config.binarize}' is not one of {', '.join(BINARIZATIONS)}"
            )
        super().__init__(config)

    @property
    def spec(self) -> DataSpec:
        return DataSpec("images", 28 * 28, "class_per_sequence", num_classes=10)

    def to_inputs(self, images: np.ndarray) -> torch.Tensor:
        """uint8 images (N, 28, 28) -> float images (N, 28, 28) in [0, 1], binarised."""
        grey = images.astype(np.float32) / 255
        if self.config.binarize == "threshold":
            grey = (grey > 0.5).astype(np.float32)
        elif self.config.binarize == "static":
            # A split's own noise: seeded by data.seed and the split's images, so the same
            # image gets the same binary version in every process and every run.
            rng = np.random.default_rng([self.config.seed, zlib.crc32(images.tobytes())])
            grey = (rng.random(grey.shape, dtype=np.float32) < grey).astype(np.float32)
        return torch.from_numpy(grey)
