"""The BN-LSTM's time loop (Cooijmans et al. 2017) as one Triton kernel each way.

The same computation as :class:`~fwlab_plugins.cells.bn_lstm_sequence.BNLSTMSequence`, whose
docstring has the equations; that PyTorch node is the reference the tests hold this kernel to.
Per step t, gates ordered (f, i, o, g), u_t = BN(W_x x_t) + b computed before (in torch):

    forward:   r_t = W_h h_{t-1},   a_t = BN(r_t; γ_h) + u_t
               c_t = σ(a_f) c_{t-1} + σ(a_i) tanh(a_g),   h_t = σ(a_o) tanh(BN(c_t; γ_c, β_c))
    backward:  δa_t from δh_t and the carried δc through the cell update and BN(c_t),
               δr_t = BN'(γ_h δa_t),   δh_{t-1} = ∂L/∂h_{t-1} + δr_t W_h

A batch norm's statistics are sums over the batch, so one program owns the whole batch: every
step's statistics are reductions inside the program, and the sequences never need to meet
across programs (a grid-wide barrier per step). W_h is read from global memory (the L2 cache)
gate by gate at every step: four gates of 128² do not fit in one program's registers. The
batch statistics each step normalised with come out per step, (T, F), and the norms fold them
into their running averages after the kernel
(:meth:`~fwlab_plugins.cells.stepwise_batch_norm.StepwiseBatchNorm.fold_batch_statistics`).
In evaluation the kernel normalises with the population statistics it is given instead. The
weight gradient δW_h = Σ_t δr_tᵀ h_{t-1}, a sum over every step, is one product after the
backward loop, in torch.

Float32 products follow ``torch.get_float32_matmul_precision()`` as in :mod:`.irnn_triton`.
On an H200 it ran 2.8x slower than the graph-captured PyTorch node (see :func:`slower`), so
``model.kernel=auto`` leaves CUDA runs to that node and ``model.kernel=triton`` asks for this
kernel.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from fwlab_plugins.cells.kernels import on_device, scalar_argument
from fwlab_plugins.cells.kernels.activations_triton import sigmoid, tanh
from fwlab_plugins.cells.kernels.irnn_triton import PRECISIONS
from fwlab_plugins.cells.stepwise_batch_norm import StepwiseBatchNorm

MAX_BATCH = 128  # sequences: the whole batch is one program
# Units of the state a program holds: what fits in a multiprocessor's shared memory (227 KB on
# Hopper), where W_h's (H, H) gate tile meets tl.dot. At H = 128 the backward takes 128-224 KB
# with float32 products on tensor cores (compiled for sm_90 by Triton 3.9, B = 16-128; B = 64 ran
# on an H200 with Triton 3.6), but 288 KB with IEEE products on the H200 (float32 at
# float32_matmul_precision=highest, B = 64), and float64 256 KB at B = 16; at H = 64, 32-64 KB.
MAX_HIDDEN_TENSOR_CORES = 128
MAX_HIDDEN_IEEE = 64
NUM_WARPS = 8


def _native_precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision for ``dtype`` on a GPU: float32 follows
    ``torch.get_float32_matmul_precision()`` (tensor cores at high and medium), float64 IEEE."""
    if dtype == torch.float32:
        return PRECISIONS[torch.get_float32_matmul_precision()]
    return "ieee"


def max_hidden(dtype: torch.dtype) -> int:
    """The widest state the kernel takes in ``dtype`` at the current float32 precision."""
    if dtype not in (torch.float32, torch.float64):
        return 0
    return MAX_HIDDEN_IEEE if _native_precision(dtype) == "ieee" else MAX_HIDDEN_TENSOR_CORES


def fits(batch: int, steps: int, hidden_size: int, dtype: torch.dtype) -> bool:
    """Whether the kernel takes this batch and hidden size (one program holds them) in
    ``dtype``, the node's (the weights'), with the (B, T, 4H) buffers' offsets in int32 (as
    Triton computes them from int32 arguments)."""
    return (
        batch <= MAX_BATCH
        and hidden_size <= max_hidden(dtype)
        and batch * steps * 4 * hidden_size < 2**31
    )


def slower() -> str | None:
    """Why ``auto`` leaves CUDA runs to the PyTorch node: measured on an H200 at the shape that
    suits the kernel best, a long sequence (B = 64, T = 784, H = 100, float32, forward+backward,
    each in a CUDA graph), the kernel took 183 ms and the PyTorch node 66 ms. One program, on
    one multiprocessor, runs the whole batch's steps one after another."""
    return "measured slower than the captured PyTorch node on an H200 (183 ms against 66)"


@triton.jit
def _statistics(
    x, valid, B, pop_mean_ptr, pop_var_ptr, offset, cols, units, TRAINING: tl.constexpr
):
    """The mean and variance of x (BLOCK_B, BLOCK_H) over the batch's valid rows in training
    (the variance biased, as a batch norm normalises with), else the population's at
    ``offset`` (a row of (T, F) statistics, plus the first feature's index)."""
    if TRAINING:
        mean = tl.sum(tl.where(valid[:, None], x, 0.0), axis=0) / B
        centred = tl.where(valid[:, None], x - mean[None, :], 0.0)
        var = tl.sum(centred * centred, axis=0) / B
    else:
        mean = tl.load(pop_mean_ptr + offset + cols, mask=units, other=0.0)
        var = tl.load(pop_var_ptr + offset + cols, mask=units, other=1.0)
    return mean, var


@triton.jit
def _normalised_gate(
    h, w_ptr, u_ptr, gamma_ptr, pop_mean_ptr, pop_var_ptr,
    recurrent_ptr, mean_ptr, var_ptr,
    rows, cols, valid, units, t, gate, B, T, H, eps,
    TRAINING: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """BN(r_t; γ_h) + u_t for one gate's block of units, r_t = h_{t-1} W_gᵀ; stores r_t and the
    statistics it was normalised with."""
    square = units[:, None] & units[None, :]
    feature = gate * H + cols  # the gate's units among the 4H
    # W_gᵀ[k, j] = W_h[gate·H + j, k]
    w_t = tl.load(w_ptr + (gate * H + cols[None, :]) * H + cols[:, None], mask=square, other=0.0)
    r = tl.dot(h, w_t, input_precision=PRECISION)
    mask = valid[:, None] & units[None, :]
    step = rows[:, None] * T * 4 * H + t * 4 * H + feature[None, :]  # (b, t, feature) of (B,T,4H)
    tl.store(recurrent_ptr + step, r, mask=mask)
    mean, var = _statistics(
        r, valid, B, pop_mean_ptr, pop_var_ptr, t * 4 * H + gate * H, cols, units, TRAINING
    )
    tl.store(mean_ptr + t * 4 * H + feature, mean, mask=units)
    tl.store(var_ptr + t * 4 * H + feature, var, mask=units)
    gamma = tl.load(gamma_ptr + feature, mask=units, other=0.0)
    u = tl.load(u_ptr + step, mask=mask, other=0.0)
    return (r - mean[None, :]) * (gamma / tl.sqrt(var + eps))[None, :] + u


@triton.jit
def _forward_kernel(
    u_ptr, w_ptr, h0_ptr, c0_ptr, gamma_r_ptr, gamma_c_ptr, beta_c_ptr,
    pop_mean_r_ptr, pop_var_r_ptr, pop_mean_c_ptr, pop_var_c_ptr,
    recurrent_ptr, activations_ptr, cells_ptr, tanh_n_ptr, hiddens_ptr,
    mean_r_ptr, var_r_ptr, mean_c_ptr, var_c_ptr,
    B, T, H, eps_ptr,
    TRAINING: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    rows = tl.arange(0, BLOCK_B)
    cols = tl.arange(0, BLOCK_H)
    valid, units = rows < B, cols < H
    mask = valid[:, None] & units[None, :]
    state = rows[:, None] * H + cols[None, :]  # (b, unit) of (B, H)
    eps = tl.load(eps_ptr)  # the norms' ε, in the kernel's dtype
    # padded rows and units are kept at 0, so that they add nothing to products or statistics
    h = tl.load(h0_ptr + state, mask=mask, other=0.0)
    c = tl.load(c0_ptr + state, mask=mask, other=0.0)
    gamma_c = tl.load(gamma_c_ptr + cols, mask=units, other=0.0)
    beta_c = tl.load(beta_c_ptr + cols, mask=units, other=0.0)
    for t in range(T):
        a_f = _normalised_gate(
            h, w_ptr, u_ptr, gamma_r_ptr, pop_mean_r_ptr, pop_var_r_ptr, recurrent_ptr,
            mean_r_ptr, var_r_ptr, rows, cols, valid, units, t, 0, B, T, H, eps, TRAINING,
            PRECISION,
        )  # fmt: skip
        a_i = _normalised_gate(
            h, w_ptr, u_ptr, gamma_r_ptr, pop_mean_r_ptr, pop_var_r_ptr, recurrent_ptr,
            mean_r_ptr, var_r_ptr, rows, cols, valid, units, t, 1, B, T, H, eps, TRAINING,
            PRECISION,
        )  # fmt: skip
        a_o = _normalised_gate(
            h, w_ptr, u_ptr, gamma_r_ptr, pop_mean_r_ptr, pop_var_r_ptr, recurrent_ptr,
            mean_r_ptr, var_r_ptr, rows, cols, valid, units, t, 2, B, T, H, eps, TRAINING,
            PRECISION,
        )  # fmt: skip
        a_g = _normalised_gate(
            h, w_ptr, u_ptr, gamma_r_ptr, pop_mean_r_ptr, pop_var_r_ptr, recurrent_ptr,
            mean_r_ptr, var_r_ptr, rows, cols, valid, units, t, 3, B, T, H, eps, TRAINING,
            PRECISION,
        )  # fmt: skip
        f, i, o, g = sigmoid(a_f), sigmoid(a_i), sigmoid(a_o), tanh(a_g)
        step4 = rows[:, None] * T * 4 * H + t * 4 * H + cols[None, :]  # gate 0 of (B, T, 4H)
        tl.store(activations_ptr + step4, f, mask=mask)
        tl.store(activations_ptr + step4 + H, i, mask=mask)
        tl.store(activations_ptr + step4 + 2 * H, o, mask=mask)
        tl.store(activations_ptr + step4 + 3 * H, g, mask=mask)
        c = tl.where(mask, f * c + i * g, 0.0)
        step = rows[:, None] * T * H + t * H + cols[None, :]  # (b, t, unit) of (B, T, H)
        tl.store(cells_ptr + step, c, mask=mask)
        mean_c, var_c = _statistics(
            c, valid, B, pop_mean_c_ptr, pop_var_c_ptr, t * H, cols, units, TRAINING
        )
        tl.store(mean_c_ptr + t * H + cols, mean_c, mask=units)
        tl.store(var_c_ptr + t * H + cols, var_c, mask=units)
        scale = gamma_c / tl.sqrt(var_c + eps)
        tanh_n = tanh((c - mean_c[None, :]) * scale[None, :] + beta_c[None, :])
        h = tl.where(mask, o * tanh_n, 0.0)
        tl.store(tanh_n_ptr + step, tanh_n, mask=mask)
        tl.store(hiddens_ptr + step, h, mask=mask)


@triton.jit
def _batch_norm_backward(grad, x, mean, var, valid, B, eps, TRAINING: tl.constexpr):
    """For x̂ = (x − μ) ρ, ρ = 1/sqrt(σ² + ε), and its gradient ``grad`` (zero on padded rows):
    Σ_b grad and Σ_b grad·x̂ (the gradients of β and γ), and the gradient of x (BLOCK_B,
    BLOCK_H), through the batch's statistics in training: δx = ρ (δx̂ − mean_b δx̂ − x̂ mean_b
    (δx̂ x̂)); in evaluation δx = ρ δx̂."""
    rho = 1.0 / tl.sqrt(var + eps)
    x_hat = tl.where(valid[:, None], (x - mean[None, :]) * rho[None, :], 0.0)
    total = tl.sum(grad, axis=0)
    total_x = tl.sum(grad * x_hat, axis=0)
    if TRAINING:
        grad = grad - (total[None, :] + x_hat * total_x[None, :]) / B
    return total, total_x, tl.where(valid[:, None], grad * rho[None, :], 0.0)


@triton.jit
def _gate_backward(
    grad_a, w_ptr, gamma_ptr, recurrent_ptr, mean_ptr, var_ptr,
    grad_input_ptr, grad_recurrent_ptr,
    rows, cols, valid, units, t, gate, B, T, H, eps,
    TRAINING: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """One gate's δa_t (BLOCK_B, BLOCK_H) into δu_t, δr_t = BN'(γ_h δa_t); returns Σ_b δa r̂
    (its δγ_h) and δr_t W_g, the gate's share of δh_{t-1}."""
    mask = valid[:, None] & units[None, :]
    feature = gate * H + cols
    step = rows[:, None] * T * 4 * H + t * 4 * H + feature[None, :]
    tl.store(grad_input_ptr + step, grad_a, mask=mask)
    r = tl.load(recurrent_ptr + step, mask=mask, other=0.0)
    mean = tl.load(mean_ptr + t * 4 * H + feature, mask=units, other=0.0)
    var = tl.load(var_ptr + t * 4 * H + feature, mask=units, other=1.0)
    gamma = tl.load(gamma_ptr + feature, mask=units, other=0.0)
    _, grad_gamma, grad_r = _batch_norm_backward(grad_a, r, mean, var, valid, B, eps, TRAINING)
    grad_r = grad_r * gamma[None, :]
    tl.store(grad_recurrent_ptr + step, grad_r, mask=mask)
    # W_g[j, k] = W_h[gate·H + j, k]
    square = units[:, None] & units[None, :]
    w = tl.load(w_ptr + (gate * H + cols[:, None]) * H + cols[None, :], mask=square, other=0.0)
    return grad_gamma, tl.dot(grad_r, w, input_precision=PRECISION)


@triton.jit
def _backward_kernel(
    grad_out_ptr, grad_c_ptr, w_ptr, c0_ptr, gamma_r_ptr, gamma_c_ptr,
    recurrent_ptr, activations_ptr, cells_ptr, tanh_n_ptr,
    mean_r_ptr, var_r_ptr, mean_c_ptr, var_c_ptr,
    grad_input_ptr, grad_recurrent_ptr, grad_h0_ptr, grad_c0_ptr,
    grad_gamma_r_ptr, grad_gamma_c_ptr, grad_beta_c_ptr,
    B, T, H, eps_ptr,
    TRAINING: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    rows = tl.arange(0, BLOCK_B)
    cols = tl.arange(0, BLOCK_H)
    valid, units = rows < B, cols < H
    mask = valid[:, None] & units[None, :]
    state = rows[:, None] * H + cols[None, :]
    eps = tl.load(eps_ptr)
    grad_c = tl.load(grad_c_ptr + state, mask=mask, other=0.0)  # δc carried from t + 1
    gamma_c = tl.load(gamma_c_ptr + cols, mask=units, other=0.0)
    carried = tl.zeros((BLOCK_B, BLOCK_H), dtype=grad_c.dtype)  # δr_{t+1} W_h
    grad_gamma_f = tl.zeros((BLOCK_H,), dtype=grad_c.dtype)
    grad_gamma_i, grad_gamma_o = grad_gamma_f, grad_gamma_f
    grad_gamma_g, grad_gamma_c, grad_beta_c = grad_gamma_f, grad_gamma_f, grad_gamma_f
    for step_back in range(T):
        t = T - 1 - step_back
        step = rows[:, None] * T * H + t * H + cols[None, :]
        step4 = rows[:, None] * T * 4 * H + t * 4 * H + cols[None, :]
        grad_h = tl.load(grad_out_ptr + step, mask=mask, other=0.0) + carried
        f = tl.load(activations_ptr + step4, mask=mask, other=0.0)
        i = tl.load(activations_ptr + step4 + H, mask=mask, other=0.0)
        o = tl.load(activations_ptr + step4 + 2 * H, mask=mask, other=0.0)
        g = tl.load(activations_ptr + step4 + 3 * H, mask=mask, other=0.0)
        c = tl.load(cells_ptr + step, mask=mask, other=0.0)
        # c_{t-1}: the cells' previous step, or c_0 at t = 0
        first = tl.full((BLOCK_B, BLOCK_H), t, tl.int32) == 0
        c_before = tl.load(cells_ptr + step - H, mask=mask & ~first, other=0.0)
        c_before += tl.load(c0_ptr + state, mask=mask & first, other=0.0)
        tanh_n = tl.load(tanh_n_ptr + step, mask=mask, other=0.0)
        # h = σ(a_o) tanh(n), n = BN(c; γ_c, β_c)
        grad_o = grad_h * tanh_n * o * (1.0 - o)
        grad_n = tl.where(mask, grad_h * o * (1.0 - tanh_n * tanh_n), 0.0)
        mean_c = tl.load(mean_c_ptr + t * H + cols, mask=units, other=0.0)
        var_c = tl.load(var_c_ptr + t * H + cols, mask=units, other=1.0)
        total, total_x, grad_c_norm = _batch_norm_backward(
            grad_n, c, mean_c, var_c, valid, B, eps, TRAINING
        )
        grad_beta_c += total
        grad_gamma_c += total_x
        grad_c = grad_c + gamma_c[None, :] * grad_c_norm
        # c = σ(a_f) c_{t-1} + σ(a_i) tanh(a_g)
        grad_f = grad_c * c_before * f * (1.0 - f)
        grad_i = grad_c * g * i * (1.0 - i)
        grad_g = grad_c * i * (1.0 - g * g)
        grad_c = tl.where(mask, grad_c * f, 0.0)
        sums_f, part_f = _gate_backward(
            grad_f, w_ptr, gamma_r_ptr, recurrent_ptr, mean_r_ptr, var_r_ptr, grad_input_ptr,
            grad_recurrent_ptr, rows, cols, valid, units, t, 0, B, T, H, eps, TRAINING, PRECISION,
        )  # fmt: skip
        sums_i, part_i = _gate_backward(
            grad_i, w_ptr, gamma_r_ptr, recurrent_ptr, mean_r_ptr, var_r_ptr, grad_input_ptr,
            grad_recurrent_ptr, rows, cols, valid, units, t, 1, B, T, H, eps, TRAINING, PRECISION,
        )  # fmt: skip
        sums_o, part_o = _gate_backward(
            grad_o, w_ptr, gamma_r_ptr, recurrent_ptr, mean_r_ptr, var_r_ptr, grad_input_ptr,
            grad_recurrent_ptr, rows, cols, valid, units, t, 2, B, T, H, eps, TRAINING, PRECISION,
        )  # fmt: skip
        sums_g, part_g = _gate_backward(
            grad_g, w_ptr, gamma_r_ptr, recurrent_ptr, mean_r_ptr, var_r_ptr, grad_input_ptr,
            grad_recurrent_ptr, rows, cols, valid, units, t, 3, B, T, H, eps, TRAINING, PRECISION,
        )  # fmt: skip
        grad_gamma_f += sums_f
        grad_gamma_i += sums_i
        grad_gamma_o += sums_o
        grad_gamma_g += sums_g
        carried = part_f + part_i + part_o + part_g
    tl.store(grad_h0_ptr + state, carried, mask=mask)
    tl.store(grad_c0_ptr + state, grad_c, mask=mask)
    tl.store(grad_gamma_r_ptr + cols, grad_gamma_f, mask=units)
    tl.store(grad_gamma_r_ptr + H + cols, grad_gamma_i, mask=units)
    tl.store(grad_gamma_r_ptr + 2 * H + cols, grad_gamma_o, mask=units)
    tl.store(grad_gamma_r_ptr + 3 * H + cols, grad_gamma_g, mask=units)
    tl.store(grad_gamma_c_ptr + cols, grad_gamma_c, mask=units)
    tl.store(grad_beta_c_ptr + cols, grad_beta_c, mask=units)


def _launch_config(batch: int, hidden: int, tensor: torch.Tensor, training: bool) -> dict:
    # the interpreter computes in IEEE
    precision = _native_precision(tensor.dtype) if tensor.is_cuda else "ieee"
    return {
        "TRAINING": training,
        "BLOCK_B": max(16, triton.next_power_of_2(batch)),  # tl.dot's smallest tile is 16
        "BLOCK_H": max(16, triton.next_power_of_2(hidden)),
        "PRECISION": precision,
        "num_warps": NUM_WARPS,
        # no software pipelining of the time loop's loads: its staging buffers in shared
        # memory, for the four gates' W_h and (B, H) tiles, took 290-650 KB (an H200 has 227)
        "num_stages": 1,
    }


@contextlib.contextmanager
def _launching(device: torch.device, batch: int, hidden: int) -> Iterator[None]:
    """Launch on ``device``; a program that outgrows the multiprocessor (the limits above were
    read off compiles for sm_90, and B = 128 at H = 128 was not run on a GPU) fails naming the
    key, the shape and what ran out."""
    with on_device(device):
        try:
            yield
        except OutOfResources as error:
            raise ValueError(
                f"model.kernel=triton: the BN-LSTM kernel at B={batch}, H={hidden} needs more "
                f"than this GPU's multiprocessor has ({error}); use auto or torch"
            ) from error


def _population(norm: StepwiseBatchNorm, start: int, steps: int, device: torch.device):
    """Evaluation's (T, F) statistics, contiguous."""
    mean, var = norm.population_statistics(start, steps, device)
    return mean.contiguous(), var.contiguous()


class FusedBNLSTM(torch.autograd.Function):
    """``(u (B,T,4H), W_h, γ_h, γ_c, β_c, h_0, c_0, recurrent_norm, cell_norm, start) ->
    (h (B,T,H), c_T)``, the arguments of :class:`~fwlab_plugins.cells.bn_lstm_sequence.
    BNLSTMSequence`, through the Triton kernels."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        input_part: torch.Tensor,
        recurrent_weights: torch.Tensor,
        recurrent_gamma: torch.Tensor,
        cell_gamma: torch.Tensor,
        cell_beta: torch.Tensor,
        h0: torch.Tensor,
        c0: torch.Tensor,
        recurrent_norm: StepwiseBatchNorm,
        cell_norm: StepwiseBatchNorm,
        start: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch, steps, four_hidden = input_part.shape
        hidden = four_hidden // 4
        training = recurrent_norm.training
        new = input_part.new_empty
        saved = {
            "recurrent": new(batch, steps, four_hidden),
            "activations": new(batch, steps, four_hidden),
            "cells": new(batch, steps, hidden),
            "tanh_n": new(batch, steps, hidden),
            "hiddens": new(batch, steps, hidden),
            "mean_r": new(steps, four_hidden),
            "var_r": new(steps, four_hidden),
            "mean_c": new(steps, hidden),
            "var_c": new(steps, hidden),
        }
        if training:  # unused: the kernel normalises with the batch's statistics
            population = (saved["mean_r"], saved["var_r"], saved["mean_c"], saved["var_c"])
        else:
            population = (
                *_population(recurrent_norm, start, steps, input_part.device),
                *_population(cell_norm, start, steps, input_part.device),
            )
        h0, c0 = h0.contiguous(), c0.contiguous()
        meta = _launch_config(batch, hidden, input_part, training)
        with _launching(input_part.device, batch, hidden):
            _forward_kernel[(1,)](
                input_part.contiguous(), recurrent_weights.contiguous(), h0, c0,
                recurrent_gamma.contiguous(), cell_gamma.contiguous(), cell_beta.contiguous(),
                *population, *saved.values(), batch, steps, hidden,
                scalar_argument(recurrent_norm.eps, input_part), **meta,
            )  # fmt: skip
        if training:
            for norm, name in ((recurrent_norm, "r"), (cell_norm, "c")):
                norm.fold_batch_statistics(
                    start, saved[f"mean_{name}"], saved[f"var_{name}"], batch
                )
        ctx.training, ctx.eps, ctx.names = training, recurrent_norm.eps, list(saved)
        ctx.save_for_backward(
            recurrent_weights, recurrent_gamma, cell_gamma, h0, c0, *saved.values()
        )
        return saved["hiddens"], saved["cells"][:, -1].clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_hs: torch.Tensor, grad_c_last: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        recurrent_weights, recurrent_gamma, cell_gamma, h0, c0, *rest = ctx.saved_tensors
        saved = dict(zip(ctx.names, rest))
        hiddens = saved["hiddens"]
        batch, steps, hidden = hiddens.shape
        new = hiddens.new_empty
        grads = {
            "grad_input": new(batch, steps, 4 * hidden),
            "grad_recurrent": new(batch, steps, 4 * hidden),
            "grad_h0": new(batch, hidden),
            "grad_c0": new(batch, hidden),
            "grad_gamma_r": new(4 * hidden),
            "grad_gamma_c": new(hidden),
            "grad_beta_c": new(hidden),
        }
        meta = _launch_config(batch, hidden, hiddens, ctx.training)
        with _launching(hiddens.device, batch, hidden):
            _backward_kernel[(1,)](
                grad_hs.contiguous(), grad_c_last.contiguous(), recurrent_weights.contiguous(),
                c0, recurrent_gamma.contiguous(), cell_gamma.contiguous(),
                saved["recurrent"], saved["activations"], saved["cells"], saved["tanh_n"],
                saved["mean_r"], saved["var_r"], saved["mean_c"], saved["var_c"],
                *grads.values(), batch, steps, hidden, scalar_argument(ctx.eps, hiddens), **meta,
            )  # fmt: skip
        previous = torch.cat([h0.unsqueeze(1), hiddens[:, :-1]], dim=1)  # h_{t-1} for every t
        grad_w = grads["grad_recurrent"].reshape(-1, 4 * hidden).T @ previous.reshape(-1, hidden)
        return (
            grads["grad_input"], grad_w, grads["grad_gamma_r"], grads["grad_gamma_c"],
            grads["grad_beta_c"], grads["grad_h0"], grads["grad_c0"], None, None, None,
        )  # fmt: skip
