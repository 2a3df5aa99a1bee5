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
