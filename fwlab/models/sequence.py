"""The generic sequence model: input encoder -> recurrent cell -> output head.

``fwlab fit --model <cell>`` trains this model around that cell. The encoder follows the
datamodule's input kind (an embedding for tokens, a linear map for vectors); the head, the loss
and the metrics follow its target kind (:mod:`fwlab.targets`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig
from torch import nn
from torchmetrics import MeanMetric

from fwlab.bounds import bounded
from fwlab.cell import Cell, check_output_width
from fwlab.config import dataclass_from
from fwlab.cuda_graphs import GraphedNetwork
from fwlab.errors import ConfigError, IncompatibleError
from fwlab.optim import OptimConfig, make_optimizer
from fwlab.spec import DataSpec
from fwlab.targets import get_target

SPLITS = ("train", "val", "test")


@dataclass
class SequenceModelConfig:
    # Width of the learned token embedding or of the linear map of input vectors; 0 feeds
    # one-hot tokens or raw vectors to the cell. Ba et al. embed the 37 tokens in 100 dims.
    embedding_size: int = bounded(100, at_least=0)
    # ReLU layer between the cell and the softmax (Ba et al.: 100 units); 0 for none.
    head_hidden_size: int = bounded(100, at_least=0)
    # Regression targets only: gaussian_nll (the head predicts a mean and a variance) or mse.
    regression_loss: str = "gaussian_nll"
    # On one CUDA device, run training (forward and backward), the optimiser's update and
    # evaluation passes as captured CUDA graphs (fwlab/cuda_graphs.py); elsewhere, or if capture
    # fails, eagerly, saying why.
    cuda_graphs: bool = True


class SequenceModel(L.LightningModule):
    """A recurrent cell between an input encoder and an output head (use --model <cell>)."""

    Config = SequenceModelConfig

    def __init__(
        self, cell: Cell, spec: DataSpec, config: SequenceModelConfig, optim: OptimConfig
    ) -> None:
        super().__init__()
        self.spec = spec
        self.config = config
        self.optim_config = optim
        self.target = get_target(spec.target_kind, loss=config.regression_loss)
        self.objective = self.target  # checkpoints select on the target's metric
        self.encoder = _make_encoder(spec, config.embedding_size)
        self.cell = cell
        head_input = cell.output_size
        layers: list[nn.Module] = []
        if config.head_hidden_size > 0:
            layers += [nn.Linear(head_input, config.head_hidden_size), nn.ReLU()]
            head_input = config.head_hidden_size
        layers.append(nn.Linear(head_input, self.target.output_size(spec)))
        self.head = nn.Sequential(*layers)
        self.graphs = GraphedNetwork(
            self.network, [self.encoder, self.cell, self.head], enabled=config.cuda_graphs
        )
        # ModuleDict keys cannot be "train" (an nn.Module method), hence the suffix.
        self.metrics = nn.ModuleDict(
            {f"{split}_metrics": self.target.metrics(spec) for split in SPLITS}
        )
        self.mean_loss = nn.ModuleDict({f"{split}_loss": MeanMetric() for split in SPLITS})

    @staticmethod
    def encoder_output_size(spec: DataSpec, embedding_size: int) -> int:
        return embedding_size if embedding_size > 0 else spec.input_size

    @classmethod
    def build(cls, config: DictConfig, spec: DataSpec, registry: Any) -> SequenceModel:
        """Build from a resolved run config; ``config.model.name`` is the cell's name."""
        name = config.model.name
        if ("cell", name) not in registry:
            raise ConfigError(
                f"model.name='{name}' is not a cell; the generic sequence model is chosen by "
                f"naming its cell, e.g. --model lstm (cells: {', '.join(registry.names('cell'))})"
            )
        cell_cls = registry.get("cell", name)
        cell_config = dataclass_from(cell_cls.Config, config.model)
        model_config = dataclass_from(cls.Config, config.model)
        if spec.input_kind not in ("tokens", "vectors"):
            raise IncompatibleError(
                f"cell {name} runs in the sequence model, which reads token or vector "
                f"sequences; this datamodule gives '{spec.input_kind}' (its models: "
                f"`fwlab list model`)"
            )
        get_target(spec.target_kind, loss=model_config.regression_loss).output_size(spec)
        cell_cls.check_compatible(cell_config, spec)
        cell = cell_cls(cls.encoder_output_size(spec, model_config.embedding_size), cell_config)
        check_output_width(cell, name)
        return cls(cell, spec, model_config, dataclass_from(OptimConfig, config.optim))

    # -- computation ------------------------------------------------------------------------
    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """``inputs`` (B, T) tokens or (B, T, I) vectors -> head outputs; through CUDA graphs
        where they apply."""
        return self.graphs(inputs, training=self.training, world_size=self._world_size())

    def _world_size(self) -> int:
        return self._trainer.world_size if self._trainer is not None else 1

    def network(self, inputs: torch.Tensor) -> torch.Tensor:
        """The eager computation: encoder -> cell -> head."""
        outputs, _ = self.cell(self.encoder(inputs))  # (B, T, H_out)
        return self.head(self.target.select(outputs))

    def _shared_step(self, batch: Sequence[torch.Tensor], split: str) -> torch.Tensor:
        inputs, targets, *extras = batch  # extras: e.g. a baseline's predictions
        predictions = self(inputs)
        loss = self.target.loss(predictions, targets)
        metrics = self.metrics[f"{split}_metrics"]
        self.target.update_metrics(metrics, predictions.detach(), targets, extras)
        self.mean_loss[f"{split}_loss"].update(loss.detach(), weight=targets.shape[0])
        if split == "train":
            self.log("train/loss_step", loss, prog_bar=True, batch_size=targets.shape[0])
        return loss

    def _log_epoch_metrics(self, split: str) -> None:
        """Compute (synchronised across processes by torchmetrics), log and reset a split's
        metrics; a metric may return several values (a dict), each logged by its own name."""
        metrics = self.metrics[f"{split}_metrics"]
        # the mean loss over every example of every process (weighted, so exact for DDP shards)
        loss_name = "train/loss_epoch" if split == "train" else f"{split}/loss"
        values: dict[str, torch.Tensor] = {loss_name: self.mean_loss[f"{split}_loss"].compute()}
        self.mean_loss[f"{split}_loss"].reset()
        for name, value in metrics.compute().items():
            if isinstance(value, dict):
                values.update({f"{split}/{name}_{k}": v for k, v in value.items()})
            else:
                values[f"{split}/{name}"] = value
        self.log_dict(values, prog_bar=split != "test")
        metrics.reset()

    def on_train_epoch_end(self) -> None:
        self._log_epoch_metrics("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test")

    def training_step(self, batch: Sequence[torch.Tensor], _: int) -> torch.Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: Sequence[torch.Tensor], _: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: Sequence[torch.Tensor], _: int) -> None:
        self._shared_step(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        parameters = list(self.parameters())
        # the update as a CUDA graph too, where the passes are captured: one CUDA device, one
        # process (Lightning has moved the model to its device by now)
        graphed_steps = (
            self.config.cuda_graphs
            and self._world_size() == 1
            and all(parameter.is_cuda for parameter in parameters)
        )
        return make_optimizer(parameters, self.optim_config, graphed_steps=graphed_steps)


class _OneHot(nn.Module):
    def __init__(self, num_tokens: int) -> None:
        super().__init__()
        self.num_tokens = num_tokens

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(tokens, self.num_tokens).float()


def _make_encoder(spec: DataSpec, embedding_size: int) -> nn.Module:
    if spec.input_kind == "tokens":
        if embedding_size > 0:
            return nn.Embedding(spec.input_size, embedding_size)
        return _OneHot(spec.input_size)
    if embedding_size > 0:
        return nn.Linear(spec.input_size, embedding_size)
    return nn.Identity()
