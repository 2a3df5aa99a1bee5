"""The LRU-NTM's whole sequence as one autograd node on the CPU, its time loop in C
(``lru_ntm_cpu.c``, compiled by :mod:`.native`).

It computes what :class:`~fwlab_plugins.cells.lru_ntm.LRUNTMCell`'s step-by-step code computes
(the equations are in :mod:`~fwlab_plugins.cells.lru_ntm` and :mod:`~fwlab_plugins.cells.
lru_addressing`), which stays the reference. The input part u_t = W_x x_t + b comes in for all
steps (one product, torch's); per step the C code runs the two small products

    gates_t = u_t + [r_{t-1}, h_{t-1}] W_recᵀ
    [k̃_t, α_t] = h_t W_headᵀ + b_head

(``step_products.h``: at B = 16 much faster than a BLAS call per step), the LSTM update, then one
sequence at a time the LRU write, the content reads and the usage, with the sequence's memory in
L1. The backward pass runs the steps in reverse with the derivatives written out (the selections
of least-used slots carry no gradient, as in the reference); the weight gradients, sums over
steps, are one product each (torch's) at the end.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fwlab_plugins.cells.kernels import native

SOURCE = Path(__file__).with_name("lru_ntm_cpu.c")

_POINTERS = [
    "input_part", "recurrent_weights", "head_weights", "head_bias",
    "gates", "cells", "tanh_c", "z", "head", "memory", "cleared", "read_weights", "write_weights",
    "usage",
    "key_norms", "slot_norms", "scores", "least_used",
    "grad_z", "grad_c", "grad_memory", "grad_read_weights", "grad_usage", "grad_gates",
    "grad_head",
]  # fmt: skip
_UNSAVED = {"usage"}
_Buffers = native.structure(  # LRUNTMBuffers of the C file
    "LRUNTMBuffers",
    ["batch", "hidden", "heads", "slots", "width", "threads"],
    ["usage_decay"],
    _POINTERS,
)


def _slot_minor(memory: torch.Tensor) -> torch.Tensor:
    """A new contiguous tensor of ``memory`` with its last two axes swapped: (B, N, W) <->
    (B, W, N). Always a copy, which the kernel may write to (``contiguous()`` of a transpose
    is the tensor itself when N or W is 1)."""
    return memory.transpose(1, 2).clone(memory_format=torch.contiguous_format)


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the C node cannot run on ``device`` in ``dtype``, or ``None``."""
    return native.cannot_run(SOURCE, device, dtype)


class LRUNTMSequenceC(torch.autograd.Function):
    """``(u (T,B,4H), W_rec (4H, R·W+H), W_head (R·W+R, H), b_head, h_0, c_0, M_0, w^r_0, w^u_0,
    r_0, γ) -> (outputs (B,T,H+R·W), h_T, c_T, M_T, w^r_T, w^u_T, r_T)``, the state as
    :class:`~fwlab_plugins.cells.lru_ntm.LRUNTMState` holds it. ``u`` comes time-major, as the
    steps read it (a contiguous slice per step), and so does its gradient."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        input_part: torch.Tensor,
        recurrent_weights: torch.Tensor,
        head_weights: torch.Tensor,
        head_bias: torch.Tensor,
        h0: torch.Tensor,
        c0: torch.Tensor,
        memory0: torch.Tensor,
        read_weights0: torch.Tensor,
        usage0: torch.Tensor,
        reads0: torch.Tensor,
        usage_decay: float,
    ) -> tuple[torch.Tensor, ...]:
        suffix = native.dtype_suffix(input_part.dtype)
        steps, batch, four_hidden = input_part.shape
        hidden = four_hidden // 4
        _, heads, slots = read_weights0.shape
        width = memory0.shape[-1]
        reads_size = heads * width
        new = input_part.new_empty
        inputs = {
            "input_part": input_part.contiguous(),
            "recurrent_weights": recurrent_weights.contiguous(),
            "head_weights": head_weights.contiguous(),
            "head_bias": head_bias.contiguous(),
        }
        tensors = {
            "gates": new(steps, batch, four_hidden),
            "cells": new(steps + 1, batch, hidden),
            "tanh_c": new(steps, batch, hidden),
            "z": new(steps + 1, batch, reads_size + hidden),
            "head": new(steps, batch, reads_size + heads),
            "memory": _slot_minor(memory0),  # updated in place
            "cleared": new(steps, batch, width),
            "read_weights": new(steps + 1, batch, heads, slots),
            "write_weights": new(steps, batch, heads, slots),
            "usage": new(steps + 1, batch, slots),
            "key_norms": new(steps, batch, heads),
            "slot_norms": new(steps, batch, slots),
            "scores": new(steps, batch, heads, slots),
            "least_used": torch.empty(steps, batch, heads, dtype=torch.int64),
        }
        z = tensors["z"]
        tensors["cells"][0] = c0
        z[0, :, :reads_size] = reads0.flatten(1)
        z[0, :, reads_size:] = h0
        tensors["read_weights"][0] = read_weights0
        tensors["usage"][0] = usage0
        # the C pass runs on torch's intra-op threads (native.py), at most these
        settings = (batch, hidden, heads, slots, width, torch.get_num_threads(), usage_decay)
        buffers = native.fill(_Buffers, settings, inputs | tensors)
        native.run_pass(SOURCE, f"lru_ntm_forward_{suffix}", buffers, steps)
        # saved for backward (where a saved-tensors hook may move them: the backward pass takes
        # their addresses afresh); the usage is not needed there
        saved = {name: tensor for name, tensor in tensors.items() if name not in _UNSAVED}
        ctx.settings, ctx.names, ctx.suffix = settings, list(saved), suffix
        ctx.save_for_backward(recurrent_weights, head_weights, *saved.values())
        # an output the loss does not use (in training, the whole final state) gets None in the
        # backward pass, not a tensor of zeros, and then costs no copy there
        ctx.set_materialize_grads(False)
        hs, reads = z[1:, :, reads_size:], z[1:, :, :reads_size]
        outputs = torch.cat([hs, reads], dim=-1).transpose(0, 1)  # (B, T, H + R·W)
        return (
            outputs,
            z[steps, :, reads_size:].clone(),
            tensors["cells"][steps].clone(),
            tensors["memory"].transpose(1, 2),  # a view: M_T as (B, N, W), not a copy
            tensors["read_weights"][steps].clone(),
            tensors["usage"][steps].clone(),
            z[steps, :, :reads_size].reshape(batch, heads, width).clone(),
        )

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx: torch.autograd.function.FunctionCtx,
        grad_outputs: torch.Tensor | None,
        grad_h: torch.Tensor | None,
        grad_c: torch.Tensor | None,
        grad_memory: torch.Tensor | None,
        grad_read_weights: torch.Tensor | None,
        grad_usage: torch.Tensor | None,
        grad_reads: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, ...]:
        recurrent_weights, head_weights, *saved = ctx.saved_tensors
        tensors = dict(zip(ctx.names, saved))
        batch, hidden, heads, slots, width, _, _ = ctx.settings
        steps = tensors["gates"].shape[0]
        reads_size = heads * width
        # δ[r_t, h_t] for t = 0..T: the outputs' (and the final state's), the products' added
        grad_z = tensors["z"].new_zeros(steps + 1, batch, reads_size + hidden)
        if grad_outputs is not None:
            grad_outputs = grad_outputs.transpose(0, 1)
            grad_z[1:, :, :reads_size] = grad_outputs[..., hidden:]
            grad_z[1:, :, reads_size:] = grad_outputs[..., :hidden]
        if grad_reads is not None:
            grad_z[steps, :, :reads_size] += grad_reads.flatten(1)
        if grad_h is not None:
            grad_z[steps, :, reads_size:] += grad_h

        def carried(grad: torch.Tensor | None, *shape: int) -> torch.Tensor:
            """A final state's gradient as a new tensor the kernel updates in place."""
            return grad_z.new_zeros(shape) if grad is None else grad.contiguous().clone()

        grads = {
            "grad_z": grad_z,
            "grad_c": carried(grad_c, batch, hidden),
            "grad_memory": (
                grad_z.new_zeros(batch, width, slots)
                if grad_memory is None
                else _slot_minor(grad_memory)
            ),
            "grad_read_weights": carried(grad_read_weights, batch, heads, slots),
            "grad_usage": carried(grad_usage, batch, slots),
            "grad_gates": grad_z.new_empty(steps, batch, 4 * hidden),
            "grad_head": grad_z.new_empty(steps, batch, reads_size + heads),
        }
        # the backward pass undoes the steps' writes in a copy of M_T (it may run more than once)
        tensors["memory"] = tensors["memory"].clone()
        weights = {
            "recurrent_weights": recurrent_weights.contiguous(),
            "head_weights": head_weights.contiguous(),
        }
        buffers = native.fill(_Buffers, ctx.settings, weights | tensors | grads)
        native.run_pass(SOURCE, f"lru_ntm_backward_{ctx.suffix}", buffers, steps)
        grad_gates, grad_head = grads["grad_gates"], grads["grad_head"]
        z = tensors["z"]
        flat_gates = grad_gates.view(steps * batch, 4 * hidden)
        # (zᵀ δgates)ᵀ rather than δgatesᵀ z, the same product: ~15% faster through MKL here
        grad_recurrent = (z[:steps].reshape(steps * batch, -1).T @ flat_gates).T
        hs = z[1:, :, reads_size:].reshape(steps * batch, hidden)
        flat_head = grad_head.view(steps * batch, -1)
        grad_head_weights, grad_head_bias = flat_head.T @ hs, flat_head.sum(0)
        return (
            grad_gates,
            grad_recurrent,
            grad_head_weights,
            grad_head_bias,
            grad_z[0, :, reads_size:],
            grads["grad_c"],
            grads["grad_memory"].transpose(1, 2),
            grads["grad_read_weights"],
            grads["grad_usage"],
            grad_z[0, :, :reads_size].reshape(batch, heads, width),
            None,
        )
