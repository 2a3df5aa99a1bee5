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
    # rmsprop only: the decay of its running average of squared gradients (torch's alpha;
    # TensorFlow's and Theano-era code's "decay", often 0.9 there)
    rmsprop_decay: float = bounded(0.99, at_least=0.0, below=1.0)


_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "rmsprop": torch.optim.RMSprop,
    "sgd": torch.optim.SGD,
}
# the option each optimiser-specific key is, and the optimisers that have it
_SPECIFIC: dict[str, tuple[str, tuple[str, ...]]] = {
    "momentum": ("momentum", ("rmsprop", "sgd")),
    "rmsprop_decay": ("alpha", ("rmsprop",)),
}


def check_optim_config(config: OptimConfig) -> None:
    """Raise :class:`ConfigError` for an optimiser name fwlab does not know, or for a key set
    away from its default for an optimiser that has no such option (``optim.momentum=0.9``
    with Adam would otherwise be ignored without a word)."""
    if config.name not in _OPTIMIZERS:
        *others, last = _OPTIMIZERS
        raise ConfigError(
            f"optim.name='{config.name}' is not known: expected {', '.join(others)} or {last}"
        )
    for key, (_, names) in _SPECIFIC.items():
        value, default = getattr(config, key), getattr(OptimConfig, key)
        if config.name not in names and value != default:
            raise ConfigError(
                f"optim.{key}={value} has no effect with optim.name={config.name}: it is an "
                f"option of {' and '.join(names)} only (leave it at {default})"
            )


def make_optimizer(
    parameters: Iterable[torch.nn.Parameter], config: OptimConfig, graphed_steps: bool = False
) -> torch.optim.Optimizer:
    """The optimiser ``config`` names over ``parameters``. ``graphed_steps``: its update runs as
    a replayed CUDA graph (:class:`fwlab.cuda_graphs.GraphedSteps`; the parameters must be on
    one CUDA device) where the optimiser has a capturable mode, and eagerly, saying so, where it
    has none."""
    check_optim_config(config)
    optimizer_class = _OPTIMIZERS[config.name]
    options = {"lr": config.lr, "weight_decay": config.weight_decay}
    for key, (option, names) in _SPECIFIC.items():
        if config.name in names:
            options[option] = getattr(config, key)
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
