"""Metrics the papers report that torchmetrics does not have."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric

SANTORO_INSTANCES = (1, 2, 3, 4, 5, 10)


class PerInstanceAccuracy(Metric):
    """Accuracy at the k-th presentation of a class within an episode (Santoro et al. 2016,
    Table 1): the 1st presentation is a guess, the 2nd tests one-shot learning, and so on.

    ``update(correct, instance)`` takes per-step correctness (B, T) and the 1-based count of how
    often the step's class has been shown in its episode so far, including this step (B, T).
    The counts are sums, so the result is exact across DDP processes.
    """

    full_state_update = False

    def __init__(self, instances: Sequence[int] = SANTORO_INSTANCES) -> None:
        super().__init__()
        self.instances = tuple(instances)
        self.add_state("correct", torch.zeros(len(self.instances)), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(len(self.instances)), dist_reduce_fx="sum")

    def update(self, correct: torch.Tensor, instance: torch.Tensor) -> None:
        for index, k in enumerate(self.instances):
            shown = instance == k
            self.correct[index] += (correct & shown).sum()
            self.total[index] += shown.sum()

    def compute(self) -> dict[str, torch.Tensor]:
        accuracy = self.correct / self.total.clamp(min=1)
        return {f"instance_{k}": accuracy[i] for i, k in enumerate(self.instances)}


class MeanCurve(Metric):
    """The mean of curves sampled at fixed points, e.g. a held-out log-likelihood after
    0, 10, 20, ... examples of adaptation: ``update(curves)`` takes ``(B, P)``; ``compute()``
    gives the ``mean`` ``(P,)`` and its standard error ``stderr``. Sums, so exact across DDP
    processes."""

    full_state_update = False

    def __init__(self, points: int) -> None:
        super().__init__()
        self.add_state("total", torch.zeros(points, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("squares", torch.zeros(points, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, curves: torch.Tensor) -> None:
        curves = curves.detach().to(torch.float64)
        self.total += curves.sum(0)
        self.squares += (curves**2).sum(0)
        self.count += curves.shape[0]

    def compute(self) -> dict[str, torch.Tensor]:
        count = self.count.clamp(min=1)
        mean = self.total / count
        variance = (self.squares / count - mean**2).clamp(min=0)
        return {"mean": mean, "stderr": (variance / (self.count - 1).clamp(min=1)).sqrt()}
