"""MNIST seen as a fixed sequence of glimpses, coarse to fine (after Ba et al. 2016, section 4.3).

Ba et al. show each image as glimpses under a fixed hierarchical policy; their exact schedule is
not verified (shared/PAPERS.md), so fwlab's is this quad-tree, documented and configurable:

- Level l = 0 .. ``levels``−1 splits the 28×28 image into 2^l × 2^l equal regions (28/2^l
  pixels on a side); every region is average-pooled to ``glimpse_size`` × ``glimpse_size``.
- The sequence visits the levels coarse to fine and, within a level, the regions row by row:
  with the defaults (3 levels, 7×7 glimpses) 1 + 4 + 16 = 21 glimpses — the whole image at 1/4
  resolution, the four quadrants at 1/2, then the sixteen 7×7 blocks at full resolution.
- Each step's input is the glimpse's pixels (in [0, 1]) followed by where it is:
  ``location="coordinates"``: the region's centre (row, column) scaled to [−1, 1] and its
  level scaled to [0, 1] (3 numbers); ``location="onehot"``: a one-hot of the glimpse's index in
  the schedule.

The class is predicted after the last glimpse.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fwlab.bounds import bounded
from fwlab.errors import ConfigError
from fwlab.spec import DataSpec
from fwlab_plugins.data.mnist_base import MNISTConfig, MNISTDataModuleBase

IMAGE_SIZE = 28


@dataclass
class GlimpsesConfig(MNISTConfig):
    levels: int = bounded(3, at_least=1)  # quad-tree levels: 1, 4, 16, ... regions
    # each region is pooled to glimpse_size × glimpse_size
    glimpse_size: int = bounded(7, at_least=1)
    location: str = "coordinates"  # coordinates | onehot


def schedule(levels: int) -> list[tuple[int, int, int]]:
    """The glimpses in order: (level, region row, region column)."""
    return [
        (level, row, col)
        for level in range(levels)
        for row in range(2**level)
        for col in range(2**level)
    ]


def glimpse_sequences(images: torch.Tensor, config: GlimpsesConfig) -> torch.Tensor:
    """float images (N, 28, 28) -> glimpse sequences (N, T, g² + location width)."""
    count, size = images.shape[0], config.glimpse_size
    order = schedule(config.levels)
    pixels = []
    for level in range(config.levels):
        regions = 2**level
        if IMAGE_SIZE % regions:
            raise ConfigError(
                f"data.levels={config.levels}: 28 pixels do not split into {regions} equal regions"
            )
        side = IMAGE_SIZE // regions
        if size > side:  # pooling to more pixels than the region has would repeat them
            raise ConfigError(
                f"data.glimpse_size={size} is larger than the {side}×{side} regions of level "
                f"{level} (data.levels={config.levels}): at most {side}"
            )
        blocks = images.reshape(count, regions, side, regions, side).permute(0, 1, 3, 2, 4)
        pooled = F.adaptive_avg_pool2d(blocks.reshape(-1, 1, side, side), size)
        pixels.append(pooled.reshape(count, regions * regions, size * size))  # row-major
    glimpses = torch.cat(pixels, dim=1)  # (N, T, g²)
    if config.location == "onehot":
        where = torch.eye(len(order))
    elif config.location == "coordinates":
        where = torch.tensor(
            [
                [
                    (2 * (row + 0.5) / 2**level) - 1,
                    (2 * (col + 0.5) / 2**level) - 1,
                    level / max(config.levels - 1, 1),
                ]
                for level, row, col in order
            ]
        )
    else:
        raise ConfigError(f"data.location='{config.location}' is not coordinates or onehot")
    return torch.cat([glimpses, where.expand(count, -1, -1)], dim=-1)


class GlimpsesMNISTDataModule(MNISTDataModuleBase):
    """MNIST as a coarse-to-fine sequence of glimpses with their locations (Ba et al. 2016)."""

    Config = GlimpsesConfig

    @property
    def spec(self) -> DataSpec:
        steps = len(schedule(self.config.levels))
        location = steps if self.config.location == "onehot" else 3
        return DataSpec(
            "vectors",
            self.config.glimpse_size**2 + location,
            "class_per_sequence",
            num_classes=10,
            seq_len=steps,
        )

    def to_inputs(self, images: np.ndarray) -> torch.Tensor:
        return glimpse_sequences(torch.from_numpy(images.astype(np.float32) / 255), self.config)
