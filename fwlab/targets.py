"""Target kinds: what a datamodule's targets are, and hence the head, the loss and the metrics.

A datamodule names its target kind in its :class:`~fwlab.spec.DataSpec`; the generic sequence
model looks it up here. New kinds (class per step, regression per step) are new entries.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric, MeanSquaredError, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from fwlab.errors import IncompatibleError
from fwlab.metrics import SANTORO_INSTANCES, PerInstanceAccuracy
from fwlab.spec import DataSpec


class Target(ABC):
    """How outputs of a sequence model are scored against one kind of target."""

    #: the validation metric checkpoints select on, and whether higher is better
    monitor: str
    monitor_mode: str

    @abstractmethod
    def output_size(self, spec: DataSpec) -> int:
        """Width of the head's output."""

    @abstractmethod
    def select(self, outputs: torch.Tensor) -> torch.Tensor:
        """The cell outputs ``(B, T, H)`` that the head reads."""

    @abstractmethod
    def loss(self, predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean loss over the batch."""

    @abstractmethod
    def metrics(self, spec: DataSpec) -> MetricCollection:
        """A fresh collection of torchmetrics for one split."""

    def update_metrics(
        self,
        metrics: MetricCollection,
        predictions: torch.Tensor,
        targets: torch.Tensor,
        extras: list[torch.Tensor],
    ) -> None:
        """Feed one batch to ``metrics``; ``extras`` are the batch's tensors after the targets."""
        metrics.update(predictions, targets)

    def summary(self, results: dict[str, float], split: str) -> list[str]:
        """Lines for the end-of-run summary from the logged ``results``."""
        return [f"{key}: {value:.4g}" for key, value in sorted(results.items())]


def _error_summary(results: dict[str, float], split: str) -> list[str]:
    """The error in % (the papers' unit) from a logged ``<split>/acc``; [] if none was."""
    accuracy = results.get(f"{split}/acc")
    if accuracy is None:
        return []
    loss = results.get(f"{split}/loss", float("nan"))
    return [
        f"{split} error:      {100.0 * (1.0 - accuracy):.2f} %"
        f"   (accuracy {100.0 * accuracy:.2f} %, loss {loss:.4f})"
    ]


class ClassPerSequence(Target):
    """One class label per sequence, read from the last step (associative retrieval)."""

    monitor = "acc"
    monitor_mode = "max"

    def output_size(self, spec: DataSpec) -> int:
        if not spec.num_classes or spec.num_classes < 2:
            raise IncompatibleError(
                f"target kind 'class_per_sequence' needs num_classes >= 2, got {spec.num_classes}"
            )
        return spec.num_classes

    def select(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs[:, -1]  # (B, H)

    def loss(self, predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(predictions, targets)

    def metrics(self, spec: DataSpec) -> MetricCollection:
        return MetricCollection({"acc": MulticlassAccuracy(spec.num_classes, average="micro")})

    def summary(self, results: dict[str, float], split: str) -> list[str]:
        return _error_summary(results, split) or super().summary(results, split)


class ClassPerStep(Target):
    """A class label at every step (episodic few-shot learning). Labels may be strings of
    ``spec.target_groups`` symbols, each over ``num_classes``; a step is correct when every
    symbol is. A third batch tensor, the presentation count of each step's class, feeds
    :class:`~fwlab.metrics.PerInstanceAccuracy`."""

    monitor = "acc"
    monitor_mode = "max"

    def output_size(self, spec: DataSpec) -> int:
        if not spec.num_classes or spec.num_classes < 2:
            raise IncompatibleError(
                f"target kind 'class_per_step' needs num_classes >= 2, got {spec.num_classes}"
            )
        self.groups, self.num_classes = spec.target_groups, spec.num_classes
        return spec.num_classes * spec.target_groups

    def select(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs  # (B, T, H): every step

    def _grouped(self, predictions: torch.Tensor) -> torch.Tensor:
        return predictions.unflatten(-1, (self.groups, self.num_classes))  # (B, T, G, C)

    def _targets(self, targets: torch.Tensor) -> torch.Tensor:
        return targets if targets.dim() == 3 else targets.unsqueeze(-1)  # (B, T, G)

    def loss(self, predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self._grouped(predictions)
        return F.cross_entropy(logits.flatten(0, -2), self._targets(targets).flatten())

    def metrics(self, spec: DataSpec) -> MetricCollection:
        return MetricCollection(
            {"acc": MeanMetric(), "per_instance": PerInstanceAccuracy()}, compute_groups=False
        )

    def update_metrics(
        self,
        metrics: MetricCollection,
        predictions: torch.Tensor,
        targets: torch.Tensor,
        extras: list[torch.Tensor],
    ) -> None:
        guesses = self._grouped(predictions).argmax(-1)  # (B, T, G)
        correct = (guesses == self._targets(targets)).all(-1)  # (B, T)
        metrics["acc"].update(correct.float())
        if extras:
            metrics["per_instance"].update(correct, extras[0])

    def summary(self, results: dict[str, float], split: str) -> list[str]:
        lines = _error_summary(results, split) or super().summary(results, split)
        per_instance = [
            f"{k}: {100 * results[f'{split}/instance_{k}']:.1f}"
            for k in SANTORO_INSTANCES
            if f"{split}/instance_{k}" in results
        ]
        if per_instance:
            lines.append(f"{split} accuracy % by instance   " + "   ".join(per_instance))
        return lines


class RegressionPerStep(Target):
    """A real target at every step, scored by Gaussian NLL (the head predicts a mean and a
    variance) or MSE; batches may carry a baseline prediction (e.g. a GP posterior mean) as a
    third tensor, whose error is logged beside the model's as ``baseline_mse``."""

    monitor = "mse"
    monitor_mode = "min"

    def __init__(self, loss: str = "gaussian_nll") -> None:
        if loss not in ("gaussian_nll", "mse"):
            raise IncompatibleError(f"model.regression_loss='{loss}' is not gaussian_nll or mse")
        self.loss_name = loss

    def output_size(self, spec: DataSpec) -> int:
        return 2 if self.loss_name == "gaussian_nll" else 1

    def select(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs  # (B, T, H): every step

    def mean_and_variance(self, predictions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = predictions[..., 0]
        if self.loss_name == "mse":
            return mean, torch.ones_like(mean)
        return mean, F.softplus(predictions[..., 1]) + 1e-6

    def loss(self, predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        mean, variance = self.mean_and_variance(predictions)
        if self.loss_name == "mse":
            return F.mse_loss(mean, targets)
        return F.gaussian_nll_loss(mean, targets, variance, full=True)

    def metrics(self, spec: DataSpec) -> MetricCollection:
        return MetricCollection({"mse": MeanSquaredError(), "baseline_mse": MeanSquaredError()})

    def update_metrics(
        self,
        metrics: MetricCollection,
        predictions: torch.Tensor,
        targets: torch.Tensor,
        extras: list[torch.Tensor],
    ) -> None:
        metrics["mse"].update(self.mean_and_variance(predictions)[0], targets)
        if extras:
            metrics["baseline_mse"].update(extras[0], targets)

    def summary(self, results: dict[str, float], split: str) -> list[str]:
        mse, baseline = results.get(f"{split}/mse"), results.get(f"{split}/baseline_mse")
        if mse is None:
            return super().summary(results, split)
        line = f"{split} MSE:        {mse:.4f}"
        if baseline is not None:
            line += f"   (baseline on the same episodes {baseline:.4f}, ratio {mse / baseline:.2f})"
        return [line]


TARGETS: dict[str, type[Target]] = {
    "class_per_sequence": ClassPerSequence,
    "class_per_step": ClassPerStep,
    "regression_per_step": RegressionPerStep,
}


def get_target(kind: str, **options: str) -> Target:
    """The target of ``kind``; ``options`` (e.g. ``loss``) go to the kinds that take them."""
    try:
        target_cls = TARGETS[kind]
    except KeyError:
        raise IncompatibleError(
            f"unknown target kind '{kind}': the generic model handles {sorted(TARGETS)}"
        ) from None
    parameters = inspect.signature(target_cls.__init__).parameters
    return target_cls(**{k: v for k, v in options.items() if k in parameters})
