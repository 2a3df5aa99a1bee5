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
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
from torch.utils.data import DataLoader, Dataset

from fwlab.spec import DataSpec


@dataclass
class DataConfig:
    """Fields every datamodule has; a datamodule's own config subclasses this."""

    batch_size: int = 128
    num_workers: int = 0  # DataLoader worker processes
    seed: int = 1234  # the data's own seed: fixed splits, independent of the run's seed


class DataModule(L.LightningDataModule):
    """A LightningDataModule with a typed config and a declared :class:`DataSpec`."""

    Config: ClassVar[type[DataConfig]] = DataConfig

    def __init__(self, config: DataConfig) -> None:
        super().__init__()
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
        return DataLoader(
            self.datasets[split],
            batch_size=self.config.batch_size,
            shuffle=split == "train",
            num_workers=self.config.num_workers,
            persistent_workers=self.config.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
