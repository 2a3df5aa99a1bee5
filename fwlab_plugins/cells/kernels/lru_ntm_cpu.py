"""The LRU-NTM's time loop in C on the CPU (``lru_ntm_cpu.c``, compiled by :mod:`.native`): the
passes of :mod:`.lru_ntm_node`'s autograd node, which holds the rest.

Per step the C code runs the controller's two small products (``step_products.h``: at B = 16
much faster than a BLAS call per step), the LSTM update, then one sequence at a time the LRU
write, the content reads and the usage, with the sequence's memory in L1.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fwlab_plugins.cells.kernels import lru_ntm_node, native

SOURCE = Path(__file__).with_name("lru_ntm_cpu.c")

_POINTERS = [
    "input_part", "recurrent_weights", "head_weights", "head_bias",
    "gates", "cells", "tanh_c", "z", "head", "memory",
    "initial_memory", "final_memory", "final_grad_memory",
    "cleared", "read_weights", "write_weights", "usage",
    "key_norms", "slot_norms", "scores", "least_used",
    "grad_z", "grad_c", "grad_memory", "grad_read_weights", "grad_usage", "grad_gates",
    "grad_head",
]  # fmt: skip
_Buffers = native.structure(  # LRUNTMBuffers of the C file
    "LRUNTMBuffers", list(lru_ntm_node.Settings._fields[:-1]), ["usage_decay"], _POINTERS
)


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the C node cannot run on ``device`` in ``dtype``, or ``None``."""
    return native.cannot_run(SOURCE, device, dtype)


class _CPasses:
    """The C file's two passes, on torch's intra-op threads (native.py), at most
    ``settings.threads`` of them."""

    @staticmethod
    def _run(
        direction: str,
        settings: lru_ntm_node.Settings,
        tensors: dict[str, torch.Tensor],
        steps: int,
    ) -> None:
        suffix = native.dtype_suffix(tensors["z"].dtype)
        buffers = native.fill(_Buffers, settings, tensors)
        native.run_pass(SOURCE, f"lru_ntm_{direction}_{suffix}", buffers, steps)

    def forward(
        self, settings: lru_ntm_node.Settings, tensors: dict[str, torch.Tensor], steps: int
    ) -> None:
        self._run("forward", settings, tensors, steps)

    def backward(
        self, settings: lru_ntm_node.Settings, tensors: dict[str, torch.Tensor], steps: int
    ) -> None:
        self._run("backward", settings, tensors, steps)


_PASSES = _CPasses()


LRUNTMSequenceC = lru_ntm_node.node_class(
    "LRUNTMSequenceC",
    _PASSES,
    ":func:`.lru_ntm_node.forward`'s node with the C passes (its docstring has the inputs "
    "and outputs).",
)
