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
        def setup(self, stage=None): ...
        def train_dataloader(self): ...

Whatever the number of workers or processes, the data must be the same: generate it from
``config.seed`` alone, never from the global random state.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import lightning as L

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

    @property
    @abstractmethod
    def spec(self) -> DataSpec:
        """What the batches hold; must not need :meth:`setup`."""
