"""Target kinds: what a datamodule's targets are, and hence the head, the loss and the metrics.

A datamodule names its target kind in its :class:`~fwlab.spec.DataSpec`; the generic sequence
model looks it up here. New kinds (class per step, regression per step) are new entries.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from fwlab.errors import IncompatibleError
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

    def summary(self, results: dict[str, float], split: str) -> list[str]:
        """Lines for the end-of-run summary from the logged ``results``."""
        return [f"{key}: {value:.4g}" for key, value in sorted(results.items())]


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
        accuracy = results.get(f"{split}/acc")
        if accuracy is None:
            return super().summary(results, split)
        loss = results.get(f"{split}/loss", float("nan"))
        return [
            f"{split} error:      {100.0 * (1.0 - accuracy):.2f} %"
            f"   (accuracy {100.0 * accuracy:.2f} %, loss {loss:.4f})"
        ]


TARGETS: dict[str, Target] = {"class_per_sequence": ClassPerSequence()}


def get_target(kind: str) -> Target:
    try:
        return TARGETS[kind]
    except KeyError:
        raise IncompatibleError(
            f"unknown target kind '{kind}': the generic model handles {sorted(TARGETS)}"
        ) from None
