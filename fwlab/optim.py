"""Optimisers by name, configured by the ``optim.*`` keys."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from fwlab.errors import ConfigError


@dataclass
class OptimConfig:
    name: str = "adam"  # adam | adamw | rmsprop | sgd
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.0  # rmsprop and sgd only


def make_optimizer(
    parameters: Iterable[torch.nn.Parameter], config: OptimConfig
) -> torch.optim.Optimizer:
    common = {"lr": config.lr, "weight_decay": config.weight_decay}
    if config.name == "adam":
        return torch.optim.Adam(parameters, **common)
    if config.name == "adamw":
        return torch.optim.AdamW(parameters, **common)
    if config.name == "rmsprop":
        return torch.optim.RMSprop(parameters, momentum=config.momentum, **common)
    if config.name == "sgd":
        return torch.optim.SGD(parameters, momentum=config.momentum, **common)
    raise ConfigError(
        f"optim.name='{config.name}' is not known: expected adam, adamw, rmsprop or sgd"
    )
