"""The LRU-NTM's whole sequence as one autograd node whose time loop is a kernel's: the buffers
a pass reads and writes, the node's outputs and gradients, and the weight gradients, shared by
the C kernel (:mod:`.lru_ntm_cpu`, CPU) and the Triton kernel (:mod:`.lru_ntm_triton`, CUDA).

It computes what :class:`~fwlab_plugins.cells.lru_ntm.LRUNTMCell`'s step-by-step code computes
(the equations are in :mod:`~fwlab_plugins.cells.lru_ntm` and :mod:`~fwlab_plugins.cells.
lru_addressing`), which stays the reference. The input part u_t = W_x x_t + b comes in for all
steps (one product, torch's); per step a kernel runs the two small products

    gates_t = u_t + [h_{t-1}, r_{t-1}] W_recᵀ
    [k̃_t, (ã_t,) α_t] = h_t W_headᵀ + b_head      (ã_t: with model.write_vector=add)

the LSTM update, the LRU write, the content reads and the usage. Its backward pass runs the
steps in reverse with the derivatives written out (the selections of least-used slots carry no
gradient, as in the reference), undoing each step's write in a copy of the final memory
instead of keeping the memory of every step; the weight gradients, sums over steps, are one
product each (torch's) at the end.

A kernel is a :class:`Passes`: its forward and backward pass over every step, on the buffers
named in ``lru_ntm_cpu.c``'s ``LRUNTMBuffers`` (whose comments give their shapes and meaning).
A pass starts its own memory (and δM) from ``initial_memory`` (forward), ``final_memory`` and
``final_grad_memory`` (backward), which it only reads (``None``: zeros).
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch


class Settings(NamedTuple):
    batch: int
    hidden: int
    heads: int
    slots: int
    width: int
    threads: int  # the most threads a C pass may use (torch's intra-op threads)
    # 1: the state before step 0 is the cell's fresh one, all zeros: a pass starts from zeros
    # without reading it, and may skip the first step's recurrent product (z_0 W_recᵀ = 0) and
    # its share of δW_rec
    zero_start: int
    # 1: δh_0 and δr_0 are wanted (by the backward pass: the last step's δz_0 = δgates_0 W_rec)
    start_gradient: int
    # 1: the heads write an add vector a_t = tanh(ã_t), the head layer's outputs being [k̃, ã, α]
    # (model.write_vector=add); 0: they write their keys, the outputs [k̃, α]
    add_vector: int
    usage_decay: float  # γ


class Passes(Protocol):
    """A kernel's two passes over ``steps`` steps, on the buffers by name."""

    def forward(self, settings: Settings, tensors: dict[str, torch.Tensor], steps: int) -> None: ...

    def backward(
        self, settings: Settings, tensors: dict[str, torch.Tensor], steps: int
    ) -> None: ...


# not saved for the backward pass, which needs neither the inputs that only the forward pass
# reads nor the usage
_UNSAVED = {"input_part", "head_bias", "usage", "initial_memory"}


def slot_minor(memory: torch.Tensor) -> torch.Tensor:
    """``memory`` with its last two axes swapped, (B, N, W) <-> (B, W, N), contiguous: the
    kernels' layout of the memory. A view where ``memory`` is stored that way (the cell's fresh
    state and the memory a kernel returns are), else a copy; a kernel only reads it."""
    return memory.transpose(1, 2).contiguous()


def forward(
    ctx: torch.autograd.function.FunctionCtx,
    passes: Passes,
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
    zero_start: bool,
) -> tuple[torch.Tensor, ...]:
    """The node's forward: ``(u (T,B,4H), W_rec (4H, H+R·W), W_head (E, H), b_head, h_0,
    c_0, M_0, w^r_0, w^u_0, r_0, γ, zero_start) -> (outputs (B,T,H+R·W), h_T, c_T, M_T, w^r_T,
    w^u_T, r_T)``, the state as :class:`~fwlab_plugins.cells.lru_ntm.LRUNTMState` holds it.
    E = R·W + R, the keys and gates, or 2·R·W + R with an add vector between them.
    ``u`` comes time-major, as the steps read it (a contiguous slice per step), and so does its
    gradient. ``zero_start``: the state is the fresh one, all zeros, and its tensors are not read
    (they may be broadcast views)."""
    steps, batch, four_hidden = input_part.shape
    hidden = four_hidden // 4
    _, heads, slots = read_weights0.shape
    width = memory0.shape[-1]
    reads_size = heads * width
    head_size = head_weights.shape[0]
    if head_size not in (reads_size + heads, 2 * reads_size + heads):
        raise ValueError(f"W_head has {head_size} rows: expected R·W + R or 2·R·W + R")
    new = input_part.new_empty
    tensors = {
        "input_part": input_part.contiguous(),
        "recurrent_weights": recurrent_weights.contiguous(),
        "head_weights": head_weights.contiguous(),
        "head_bias": head_bias.contiguous(),
        "gates": new(steps, batch, four_hidden),
        "cells": new(steps + 1, batch, hidden),
        "tanh_c": new(steps, batch, hidden),
        "z": new(steps + 1, batch, hidden + reads_size),  # [h_t, r_t]: from t = 1 the outputs
        "head": new(steps, batch, head_size),
        "memory": new(batch, width, slots),  # M_t, the pass's own, updated in place
        "initial_memory": None if zero_start else slot_minor(memory0),
        "cleared": new(steps, batch, width),
        "read_weights": new(steps + 1, batch, heads, slots),
        "write_weights": new(steps, batch, heads, slots),
        "usage": new(steps + 1, batch, slots),
        "key_norms": new(steps, batch, heads),
        "slot_norms": new(steps, batch, slots),
        "scores": new(steps, batch, heads, slots),
        "least_used": new(steps, batch, heads, dtype=torch.int64),
    }
    z = tensors["z"]
    if zero_start:
        starts = (tensors["cells"][0], z[0], tensors["read_weights"][0], tensors["usage"][0])
        for start in starts:
            start.zero_()
    else:
        tensors["cells"][0] = c0
        z[0, :, :hidden] = h0
        z[0, :, hidden:] = reads0.flatten(1)
        tensors["read_weights"][0] = read_weights0
        tensors["usage"][0] = usage0
    settings = Settings(
        batch,
        hidden,
        heads,
        slots,
        width,
        threads=torch.get_num_threads(),
        zero_start=int(zero_start),
        start_gradient=0,  # the backward pass sets it, from what wants a gradient
        add_vector=int(head_size > reads_size + heads),
        usage_decay=usage_decay,
    )
    passes.forward(settings, tensors, steps)
    # saved for backward (where a saved-tensors hook may move them: the backward pass takes
    # their addresses afresh)
    saved = {name: tensor for name, tensor in tensors.items() if name not in _UNSAVED}
    ctx.settings, ctx.names = settings, list(saved)
    ctx.save_for_backward(*saved.values())
    # an output the loss does not use (in training, the whole final state) gets None in the
    # backward pass, not a tensor of zeros, and then costs no copy there
    ctx.set_materialize_grads(False)
    return (
        z[1:].transpose(0, 1),  # the outputs [h_t, r_t], (B, T, H + R·W): a view, not a copy
        z[steps, :, :hidden].clone(),
        tensors["cells"][steps].clone(),
        tensors["memory"].transpose(1, 2),  # a view: M_T as (B, N, W), not a copy
        tensors["read_weights"][steps].clone(),
        tensors["usage"][steps].clone(),
        z[steps, :, hidden:].reshape(batch, heads, width).clone(),
    )


def backward(
    ctx: torch.autograd.function.FunctionCtx,
    passes: Passes,
    grad_outputs: torch.Tensor | None,
    grad_h: torch.Tensor | None,
    grad_c: torch.Tensor | None,
    grad_memory: torch.Tensor | None,
    grad_read_weights: torch.Tensor | None,
    grad_usage: torch.Tensor | None,
    grad_reads: torch.Tensor | None,
) -> tuple[torch.Tensor | None, ...]:
    """The node's backward: the gradients of :func:`forward`'s tensor inputs, in order."""
    tensors = dict(zip(ctx.names, ctx.saved_tensors))
    h0_index, reads0_index = 4, 9  # of forward's inputs
    start_gradient = ctx.needs_input_grad[h0_index] or ctx.needs_input_grad[reads0_index]
    settings = ctx.settings._replace(start_gradient=int(start_gradient))
    batch, hidden, heads, slots, width = settings[:5]
    steps = tensors["gates"].shape[0]
    reads_size = heads * width
    # δ[h_t, r_t] for t = 0..T: the outputs' (and the final state's), the products' added
    if grad_outputs is None:
        grad_z = tensors["z"].new_zeros(steps + 1, batch, hidden + reads_size)
    else:
        grad_z = tensors["z"].new_empty(steps + 1, batch, hidden + reads_size)
        grad_z[0] = 0
        grad_z[1:] = grad_outputs.transpose(0, 1)
    if grad_h is not None:
        grad_z[steps, :, :hidden] += grad_h
    if grad_reads is not None:
        grad_z[steps, :, hidden:] += grad_reads.flatten(1)

    def carried(grad: torch.Tensor | None, *shape: int) -> torch.Tensor:
        """A final state's gradient as a new tensor the kernel updates in place."""
        return grad_z.new_zeros(shape) if grad is None else grad.contiguous().clone()

    grads = {
        "grad_z": grad_z,
        "grad_c": carried(grad_c, batch, hidden),
        "grad_memory": grad_z.new_empty(batch, width, slots),
        "final_grad_memory": None if grad_memory is None else slot_minor(grad_memory),
        "grad_read_weights": carried(grad_read_weights, batch, heads, slots),
        "grad_usage": carried(grad_usage, batch, slots),
        "grad_gates": grad_z.new_empty(steps, batch, 4 * hidden),
        "grad_head": grad_z.new_empty(steps, batch, tensors["head"].shape[-1]),
    }
    # the backward pass undoes the steps' writes in its own memory, starting from M_T (which it
    # leaves as it is: the node's output, and a backward pass may run more than once)
    tensors["final_memory"] = tensors["memory"]
    tensors["memory"] = torch.empty_like(tensors["memory"])
    passes.backward(settings, tensors | grads, steps)
    grad_gates, grad_head = grads["grad_gates"], grads["grad_head"]
    z = tensors["z"]
    first = settings.zero_start  # z_0 = 0 adds nothing to δW_rec = Σ_t δgates_tᵀ z_t
    flat_gates = grad_gates[first:].view((steps - first) * batch, 4 * hidden)
    flat_z = z[first:steps].reshape((steps - first) * batch, hidden + reads_size)
    # (zᵀ δgates)ᵀ rather than δgatesᵀ z, the same product: ~15% faster through MKL here
    grad_recurrent = (flat_z.T @ flat_gates).T
    hs = z[1:, :, :hidden].reshape(steps * batch, hidden)
    flat_head = grad_head.view(steps * batch, -1)
    grad_head_weights, grad_head_bias = flat_head.T @ hs, flat_head.sum(0)
    return (
        grad_gates,
        grad_recurrent,
        grad_head_weights,
        grad_head_bias,
        grad_z[0, :, :hidden] if start_gradient else None,
        grads["grad_c"],
        grads["grad_memory"].transpose(1, 2),
        grads["grad_read_weights"],
        grads["grad_usage"],
        grad_z[0, :, hidden:].reshape(batch, heads, width) if start_gradient else None,
        None,
        None,
    )


def node_class(name: str, passes: Passes, doc: str) -> type[torch.autograd.Function]:
    """The autograd node class ``name`` whose forward and backward are :func:`forward` and
    :func:`backward` with ``passes`` (the class's name is the node's name in autograd graphs)."""

    def node_forward(ctx: torch.autograd.function.FunctionCtx, *inputs: object) -> tuple:
        return forward(ctx, passes, *inputs)

    @torch.autograd.function.once_differentiable
    def node_backward(ctx: torch.autograd.function.FunctionCtx, *grads: object) -> tuple:
        return backward(ctx, passes, *grads)

    members = {"forward": staticmethod(node_forward), "backward": staticmethod(node_backward)}
    return type(name, (torch.autograd.Function,), {**members, "__doc__": doc})
