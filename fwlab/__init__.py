"""fwlab: a PyTorch Lightning framework for fast-weights and memory-augmented recurrent networks.

The public pieces a plugin needs are importable from here.
"""

from fwlab.bounds import bounded
from fwlab.cell import Cell, CellConfig
from fwlab.datamodule import DataConfig, DataModule
from fwlab.errors import ConfigError, FwlabError, IncompatibleError, RegistryError
from fwlab.registry import Registry, default_registry, register
from fwlab.spec import DataSpec

__all__ = [
    "Cell",
    "CellConfig",
    "ConfigError",
    "DataConfig",
    "DataModule",
    "DataSpec",
    "FwlabError",
    "IncompatibleError",
    "Registry",
    "RegistryError",
    "bounded",
    "default_registry",
    "register",
]
__version__ = "0.1.0"
