"""Episodic Omniglot, the protocol of Santoro et al. 2016 (section 4.1).

Classes: the characters of every set under ``data.root`` (:mod:`.omniglot_files`), split by a
seeded draw into training classes and held-out classes (1200 / 423 on the full 1623); each
character rotated by 90°, 180° and 270° adds three more classes to its side of the split. The
split is written to the run directory as ``omniglot_split.json``.

An episode draws N classes (``data.classes_per_episode``, 5) and K drawings of each
(``data.instances_per_class``, 10), shows the N·K drawings in random order and gives the classes
labels for this episode only. The input at step t is (x_t, y_{t-1}) — the 20×20 image, flattened,
and the previous step's label (zeros at t = 0) — and the target is y_t. Labels are ``onehot``
(N-way) or ``string``: five symbols over five values (five 5-way one-hots in the input), distinct
per class, for 15-way and larger episodes. Training drawings get a small random rotation and
translation (``data.augment``).

Episode i of a split is a function of (data.seed, split, i) alone: the same for any number of
workers or DDP ranks, and Lightning's distributed sampler gives each rank different indices.
Validation and test episodes both draw from the held-out classes, with different seeds.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from fwlab.bounds import bounded
from fwlab.datamodule import DataConfig, DataModule
from fwlab.errors import ConfigError
from fwlab.spec import DataSpec
from fwlab_plugins.data.omniglot_files import (
    CharacterKey,
    load_omniglot,
    split_classes,
    write_example_omniglot,
)

SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
STRING_LENGTH, STRING_SYMBOLS = 5, 5  # Santoro et al.'s string labels
SPLIT_FILE = "omniglot_split.json"


@dataclass
class OmniglotConfig(DataConfig):
    batch_size: int = bounded(16, at_least=1)  # episodes per batch (Santoro et al.: 16)
    root: str = "data/omniglot"  # zips or extracted alphabet/character/*.png folders
    download: bool = False  # fetch with torchvision when nothing is found
    image_size: int = bounded(20, at_least=1)  # drawings are resized to image_size × image_size
    # 1200 / 1623: Santoro et al.'s split on the full set
    train_class_fraction: float = bounded(0.7394, above=0.0, below=1.0)
    rotation_classes: bool = True  # 90°, 180°, 270° rotations as new classes
    augment: bool = True  # small random rotations (±10°) and translations (±2 px) in training
    classes_per_episode: int = bounded(5, at_least=1)  # N
    instances_per_class: int = bounded(10, at_least=1)  # K; episode length N·K
    labels: str = "onehot"  # onehot | string
    train_episodes: int = bounded(100_000, at_least=1)  # episodes per training epoch
    val_episodes: int = bounded(1_000, at_least=1)
    test_episodes: int = bounded(1_000, at_least=1)


def rotate_quarter(images: np.ndarray, quarter_turns: int) -> np.ndarray:
    return np.rot90(images, k=quarter_turns, axes=(-2, -1)).copy()


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A small random rotation (±10°) and translation (±2 px) for each image (n, S, S)."""
    count, size = images.shape[0], images.shape[-1]
    angle = (torch.rand(count, generator=generator) * 2 - 1) * math.radians(10)
    shift = (torch.rand(count, 2, generator=generator) * 2 - 1) * (2 * 2 / size)  # ±2 px
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )  # (n, 2, 3)
    grid = F.affine_grid(theta, (count, 1, size, size), align_corners=False)
    return F.grid_sample(images.unsqueeze(1), grid, align_corners=False).squeeze(1)


class EpisodeDataset(Dataset):
    """Episode ``i`` -> (inputs (T, S·S + label width), targets (T,) or (T, 5), instance (T,))."""

    def __init__(
        self, classes: list[np.ndarray], config: OmniglotConfig, split: str, length: int
    ) -> None:
        self.classes = classes
        self.config = config
        self.split = split
        self.length = length
        if config.classes_per_episode > len(classes):
            raise ConfigError(
                f"data.classes_per_episode={config.classes_per_episode} but the {split} split has "
                f"only {len(classes)} classes"
            )

    def __len__(self) -> int:
        return self.length

    def label_width(self) -> int:
        if self.config.labels == "string":
            return STRING_LENGTH * STRING_SYMBOLS
        return self.config.classes_per_episode

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        config = self.config
        n, k = config.classes_per_episode, config.instances_per_class
        rng = np.random.Generator(np.random.PCG64([config.seed, SPLIT_IDS[self.split], index]))
        chosen = rng.choice(len(self.classes), size=n, replace=False)
        images, episode_class = [], []
        for slot, class_index in enumerate(chosen):
            drawings = self.classes[class_index]
            if k > len(drawings):
                raise ConfigError(
                    f"data.instances_per_class={k} but a class has {len(drawings)} drawings"
                )
            picks = rng.choice(len(drawings), size=k, replace=False)
            images.append(drawings[picks])
            episode_class += [slot] * k
        images = torch.from_numpy(np.concatenate(images))  # (N·K, S, S)
        order = torch.from_numpy(rng.permutation(n * k))
        images, episode_class = images[order], torch.tensor(episode_class)[order]
        if config.augment and self.split == "train":
            generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
            images = augment(images, generator)
        targets, label_inputs = self._labels(episode_class, rng)
        previous = torch.cat([torch.zeros(1, label_inputs.shape[1]), label_inputs[:-1]])
        inputs = torch.cat([images.flatten(1), previous], dim=1)  # (T, S·S + label width)
        instance = torch.zeros_like(episode_class)
        for slot in range(n):  # the 1-based presentation count of each step's class
            where = episode_class == slot
            instance[where] = torch.arange(1, int(where.sum()) + 1)
        return inputs, targets, instance

    def _labels(
        self, episode_class: torch.Tensor, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.config.classes_per_episode
        if self.config.labels == "onehot":
            labels = torch.from_numpy(rng.permutation(n))[episode_class]  # arbitrary per episode
            return labels, F.one_hot(labels, n).float()
        codes = rng.choice(STRING_SYMBOLS**STRING_LENGTH, size=n, replace=False)  # distinct
        digits = [(codes // STRING_SYMBOLS**p) % STRING_SYMBOLS for p in range(STRING_LENGTH)]
        strings = torch.from_numpy(np.stack(digits, axis=1))[episode_class]  # (T, 5)
        return strings, F.one_hot(strings, STRING_SYMBOLS).float().flatten(1)


class OmniglotDataModule(DataModule):
    """Episodic Omniglot (Santoro et al. 2016): N-way K-shot episodes, input (x_t, y_{t-1})."""

    Config = OmniglotConfig

    def __init__(self, config: OmniglotConfig) -> None:
        super().__init__(config)
        if config.labels not in ("onehot", "string"):
            raise ConfigError(f"data.labels='{config.labels}' is not onehot or string")
        self.class_split: dict[str, list[str]] = {}

    @property
    def spec(self) -> DataSpec:
        config = self.config
        string = config.labels == "string"
        label_width = STRING_LENGTH * STRING_SYMBOLS if string else config.classes_per_episode
        return DataSpec(
            input_kind="vectors",
            input_size=config.image_size**2 + label_width,
            target_kind="class_per_step",
            num_classes=STRING_SYMBOLS if string else config.classes_per_episode,
            seq_len=config.classes_per_episode * config.instances_per_class,
            target_groups=STRING_LENGTH if string else 1,
        )

    @classmethod
    def tiny_example(cls, directory: Path) -> dict[str, Any]:
        write_example_omniglot(directory, alphabets=2, characters=4, drawings=4)
        return {
            "root": str(directory),
            "instances_per_class": 2,
            "classes_per_episode": 2,
            "train_episodes": 8,
            "val_episodes": 4,
            "test_episodes": 4,
            "train_class_fraction": 0.5,
        }

    def setup(self, stage: str | None = None) -> None:
        if not self.datasets:
            self._load()
        self._save_split()  # once a trainer is attached (Lightning's own call of setup)

    def _load(self) -> None:
        config = self.config
        drawings = load_omniglot(config.root, config.image_size, config.download)
        keys = list(drawings)
        train_keys, held_out_keys = split_classes(keys, config.train_class_fraction, config.seed)
        self.class_split = {
            "train": ["/".join(k) for k in train_keys],
            "held_out": ["/".join(k) for k in held_out_keys],
        }
        sides = {
            "train": self._classes(drawings, train_keys),
            "held_out": self._classes(drawings, held_out_keys),
        }
        lengths = {
            "train": config.train_episodes,
            "val": config.val_episodes,
            "test": config.test_episodes,
        }
        for split, length in lengths.items():
            classes = sides["train" if split == "train" else "held_out"]
            self.datasets[split] = EpisodeDataset(classes, config, split, length)

    def _classes(
        self, drawings: dict[CharacterKey, np.ndarray], keys: list[CharacterKey]
    ) -> list[np.ndarray]:
        turns = range(4) if self.config.rotation_classes else range(1)
        return [rotate_quarter(drawings[key], q) for key in keys for q in turns]

    def _save_split(self) -> None:
        """Write the class split into the run directory, for audit (rank 0 only)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or not trainer.is_global_zero:
            return
        path = Path(trainer.default_root_dir) / SPLIT_FILE
        if not path.exists():
            path.write_text(json.dumps(self.class_split, indent=1) + "\n")
