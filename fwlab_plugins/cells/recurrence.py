"""How a cell with a hand-written sequence node runs its time loop (``model.recurrence``)."""

from __future__ import annotations

from enum import Enum


class Recurrence(str, Enum):
    fused = "fused"  # one autograd node per sequence, hand-written backward
    stepwise = "stepwise"  # autograd through every step: the reference the tests hold it to
