"""What a run is judged by: the validation metric its checkpoints select, and its summary lines.

A model exposes one as ``model.objective``. The generic sequence model's objective is its target
kind (:mod:`fwlab.targets`); a registered model (a VAE, a meta-learner) states its own. A model
without one is judged by ``val/loss``, lower being better.
"""

from __future__ import annotations

from typing import Protocol


class Objective(Protocol):
    #: the metric logged as ``val/<monitor>`` that selects the best checkpoint
    monitor: str
    #: "min" or "max"
    monitor_mode: str

    def summary(self, results: dict[str, float], split: str) -> list[str]:
        """Lines for the end-of-run summary from the logged ``results``."""
        ...


class LowestLoss:
    """The default objective: the lowest ``val/loss``; the summary lists every result."""

    monitor = "loss"
    monitor_mode = "min"

    def summary(self, results: dict[str, float], split: str) -> list[str]:
        return [f"{key}: {value:.4g}" for key, value in sorted(results.items())]


def objective_of(model: object) -> Objective:
    """``model.objective`` if the model states one, else :class:`LowestLoss`."""
    return getattr(model, "objective", None) or LowestLoss()
