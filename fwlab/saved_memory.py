"""What autograd keeps for the backward pass: the memory a recurrent cell's training grows with."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def saved_for_backward_bytes(function: Callable[[], Any]) -> int:
    """Bytes of the distinct storages autograd saves while ``function()`` runs (each storage
    counted once, however many saved tensors view it). On a CPU, where the allocator keeps no
    peak count, this is the part of training memory that grows with batch and sequence length."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        function()
    return sum(storages.values())
