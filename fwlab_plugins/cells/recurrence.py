"""How a cell with a hand-written sequence node runs its time loop (``model.recurrence``)."""

from __future__ import annotations

from enum import Enum
from typing import Any

import torch


class Recurrence(str, Enum):
    fused = "fused"  # one autograd node per sequence, hand-written backward
    stepwise = "stepwise"  # autograd through every step: the reference the tests hold it to


def apply_in_full_precision(
    node: type[torch.autograd.Function], dtype: torch.dtype, *args: Any
) -> Any:
    """``node.apply(*args)`` with autocast off and every floating-point tensor in ``dtype`` (the
    cell's parameters'). A sequence node's buffers and ``out=`` kernels take one dtype; under
    mixed precision (``trainer.precision=bf16-mixed``) autocast would hand it bfloat16 products
    beside float32 states, so the recurrence runs in full precision, as autocast itself runs
    normalisations and reductions."""
    cast = [
        arg.to(dtype) if isinstance(arg, torch.Tensor) and arg.is_floating_point() else arg
        for arg in args
    ]
    device = next(arg.device for arg in cast if isinstance(arg, torch.Tensor))
    with torch.autocast(device.type, enabled=False):
        return node.apply(*cast)
