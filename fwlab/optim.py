"""Optimisers by name, configured by the ``optim.*`` keys."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from lightning.pytorch.utilities import rank_zero_info

from fwlab.bounds import bounded
from fwlab.cuda_graphs import graphed_steps_class
from fwlab.errors import ConfigError


@dataclass
class OptimConfig:
    name: str = "adam"  # adam | adamw | rmsprop | sgd
    lr: float = bounded(1e-3, above=0.0)
    weight_decay: float = bounded(0.0, at_least=0.0)
    momentum: float = bounded(0.0, at_least=0.0)  # rmsprop and sgd only


_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "rmsprop": torch.optim.RMSprop,
    "sgd": torch.optim.SGD,
}
_WITH_MOMENTUM = ("rmsprop", "sgd")


def make_optimizer(
    parameters: Iterable[torch.nn.Parameter], config: OptimConfig, graphed_steps: bool = False
) -> torch.optim.Optimizer:
    """The optimiser ``config`` names over ``parameters``. ``graphed_steps``: its update runs as
    a replayed CUDA graph (:class:`fwlab.cuda_graphs.GraphedSteps`; the parameters must be on
    one CUDA device) where the optimiser has a capturable mode, and eagerly, saying so, where it
    has none."""
    if config.name not in _OPTIMIZERS:
        *others, last = _OPTIMIZERS
        raise ConfigError(
            f"optim.name='{config.name}' is not known: expected {', '.join(others)} or {last}"
        )
    optimizer_class = _OPTIMIZERS[config.name]
    options = {"lr": config.lr, "weight_decay": config.weight_decay}
    if config.name in _WITH_MOMENTUM:
        options["momentum"] = config.momentum
    if graphed_steps:
        graphed = graphed_steps_class(optimizer_class)
        if graphed is None:
            rank_zero_info(
                f"fwlab: CUDA graphs: the optimiser step runs eagerly: optim.name={config.name} "
                "has no capturable mode"
            )
        else:
            optimizer_class, options = graphed, {**options, "capturable": True}
    return optimizer_class(parameters, **options)
