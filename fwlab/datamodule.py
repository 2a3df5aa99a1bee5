"""The interface every datamodule implements: a LightningDataModule that declares its spec.

Writing a datamodule::

    @dataclass
    class MyDataConfig(DataConfig):
        length: int = 20           # every field becomes a ``data.*`` config key

    class MyData(DataModule):
        \"\"\"One line that ``fwlab list`` shows.\"\"\"
        Config = MyDataConfig
        @property
        def spec(self) -> DataSpec: ...     # known from the config, before setup()
        def setup(self, stage=None):        # fill self.datasets["train" | "val" | "test"]
            ...                             # (fwlab calls it before Lightning does: make the
                                            #  second call cheap)

The loaders come from ``self.datasets`` (override them for anything else), and
:meth:`DataModule.tiny_example` lets tests, the compatibility matrix included, run the
datamodule on a few examples in its real on-disk format.

Whatever the number of workers or processes, the data must be the same: generate it from
``config.seed`` alone, never from the global random state.

Under DDP every process builds the same splits and reads its own shard (:func:`shard_sampler`).
"""

from __future__ import annotations

import os
from abc import abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from fwlab.bounds import bounded, check_bounds
from fwlab.spec import DataSpec


def shard_sampler(dataset: Dataset, split: str, trainer: L.Trainer | None) -> Sampler | None:
    """This process's shard of ``dataset`` when the trainer runs several; None when it runs one.

    Evaluation splits are cut exactly: process r of W reads examples r, r + W, r + 2W, ...,
    so every example is scored once and none twice (shards may differ in length by one).
    Training shards must be equally long, or the processes' gradient all-reduces would fall out
    of step: each epoch, a fresh permutation (seeded by the run's seed and the epoch) is cut into
    W equal shards; when W does not divide the split, the few examples left at the end of that
    epoch's permutation wait for a later epoch (no example is ever read twice in an epoch).
    """
    if trainer is None or trainer.world_size <= 1:
        return None
    replicas = trainer.world_size
    rank = trainer.global_rank
    if split == "train":
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        return DistributedSampler(dataset, replicas, rank, shuffle=True, seed=seed, drop_last=True)
    return UnrepeatedDistributedSampler(dataset, replicas, rank, shuffle=False)


@dataclass
class DataConfig:
    """Fields every datamodule has; a datamodule's own config subclasses this."""

    batch_size: int = bounded(128, at_least=1)
    num_workers: int = bounded(0, at_least=0)  # DataLoader worker processes
    seed: int = 1234  # the data's own seed: fixed splits, independent of the run's seed


class DataModule(L.LightningDataModule):
    """A LightningDataModule with a typed config and a declared :class:`DataSpec`."""

    Config: ClassVar[type[DataConfig]] = DataConfig

    def __init__(self, config: DataConfig) -> None:
        super().__init__()
        check_bounds(config, "data.")
        self.config = config
        self.datasets: dict[str, Dataset] = {}  # "train", "val", "test", filled by setup()

    @property
    @abstractmethod
    def spec(self) -> DataSpec:
        """What the batches hold; must not need :meth:`setup`."""

    @classmethod
    def tiny_example(cls, directory: Path) -> dict[str, Any]:
        """``data.*`` values for a tiny instance, writing any files it reads into ``directory``
        in the real on-disk format. Used by tests; the default suits generated data."""
        return {}

    def _loader(self, split: str) -> DataLoader:
        if split not in self.datasets:
            raise RuntimeError(f"{type(self).__name__}.setup() did not create a '{split}' split")
        dataset = self.datasets[split]
        sampler = shard_sampler(dataset, split, self.trainer)
        return DataLoader(
            dataset,
            batch_size=self.config.batch_size,
            shuffle=split == "train" and sampler is None,
            sampler=sampler,
            num_workers=self.config.num_workers,
            persistent_workers=self.config.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
