"""The BN-LSTM's sequence node on the CPU with its time loop in C (``bn_lstm_cpu.c``, compiled
by :mod:`.native`).

It computes what :class:`~fwlab_plugins.cells.bn_lstm_sequence.BNLSTMSequence` computes, with the
same equations (written out there), and that node stays the reference. Per step the C code runs
the recurrent product r_t = W_h h_{t-1} (backward: δh_{t-1} = δr_t W_h + ∂L/∂h_{t-1}) with its
own small-product kernel (``step_products.h``: at B = 16 faster than a BLAS call per step) and
the rest of the step in one pass: at B = 16 the Python node's twenty-odd ATen calls per step
cost more than the product itself. The weight gradient, a sum over steps, is one product
(torch's) at the end.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fwlab_plugins.cells.kernels import native
from fwlab_plugins.cells.stepwise_batch_norm import StepwiseBatchNorm

SOURCE = Path(__file__).with_name("bn_lstm_cpu.c")

_POINTERS = [
    "input_part", "recurrent_weights", "h0", "recurrent", "activations", "cells", "tanh_n",
    "hiddens", "c0", "gamma_r", "gamma_c", "beta_c", "mean_r", "rho_r", "mean_c", "rho_c",
    "stat_mean_r", "stat_var_r", "stat_mean_c", "stat_var_c",
    "grad_outputs", "grad_h", "grad_h0", "grad_c", "grad_input", "grad_recurrent",
    "grad_gamma_r", "grad_gamma_c", "grad_beta_c",
]  # fmt: skip


_SAVED = {
    "recurrent", "activations", "cells", "tanh_n", "hiddens", "c0", "gamma_r", "gamma_c",
    "mean_r", "rho_r", "mean_c", "rho_c",
}  # fmt: skip
_Buffers = native.structure(  # BNLSTMBuffers of the C file
    "BNLSTMBuffers",
    ["batch", "hidden", "training", "start", "slots", "threads"],
    ["momentum", "eps"],
    _POINTERS,
)


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the C node cannot run on ``device`` in ``dtype``, or ``None``."""
    return native.cannot_run(SOURCE, device, dtype)


def _statistics(
    norm: StepwiseBatchNorm, start: int, steps: int
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """The statistics the C code reads (and in training updates): the running buffers with the
    rows' start and count, or in evaluation the population's (T, F) with rows 0..T-1."""
    if norm.training:
        norm.trained_steps.clamp_(min=start + steps)
        return norm.running_mean, norm.running_var, start, norm.max_time_steps
    mean, var = norm.population_statistics(start, steps, norm.running_mean.device)
    return mean.contiguous(), var.contiguous(), 0, steps


class BNLSTMSequenceC(torch.autograd.Function):
    """``(u (B,T,4H), W_h, γ_h, γ_c, β_c, h_0, c_0) -> (h (B,T,H), c_T)``, the arguments of
    :class:`~fwlab_plugins.cells.bn_lstm_sequence.BNLSTMSequence`."""

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
        suffix = native.dtype_suffix(input_part.dtype)
        batch, steps, four_hidden = input_part.shape
        hidden = four_hidden // 4
        new = input_part.new_empty
        tensors = {
            "input_part": input_part.transpose(0, 1).contiguous(),  # time-major
            "recurrent_weights": recurrent_weights.contiguous(),
            "h0": h0.contiguous(),
            "recurrent": new(steps, batch, four_hidden),
            "activations": new(steps, batch, four_hidden),
            "cells": new(steps, batch, hidden),
            "tanh_n": new(steps, batch, hidden),
            "hiddens": new(steps, batch, hidden),
            "c0": c0.contiguous(),
            "gamma_r": recurrent_gamma.contiguous(),
            "gamma_c": cell_gamma.contiguous(),
            "beta_c": cell_beta.contiguous(),
            "mean_r": new(steps, four_hidden),
            "rho_r": new(steps, four_hidden),
            "mean_c": new(steps, hidden),
            "rho_c": new(steps, hidden),
        }
        mean_r, var_r, start_r, slots_r = _statistics(recurrent_norm, start, steps)
        mean_c, var_c, start_c, slots_c = _statistics(cell_norm, start, steps)
        # both norms see the same steps and have the same number of slots
        assert (start_r, slots_r) == (start_c, slots_c)
        tensors |= {
            "stat_mean_r": mean_r, "stat_var_r": var_r,
            "stat_mean_c": mean_c, "stat_var_c": var_c,
        }  # fmt: skip
        # the C pass runs on torch's intra-op threads (native.py), at most these
        settings = (
            batch, hidden, int(recurrent_norm.training), start_r, slots_r,
            torch.get_num_threads(), recurrent_norm.momentum, recurrent_norm.eps,
        )  # fmt: skip
        buffers = native.fill(_Buffers, settings, tensors)
        native.run_pass(SOURCE, f"bn_lstm_forward_{suffix}", buffers, steps)
        # saved for backward (where a saved-tensors hook may move them: the backward pass takes
        # their addresses afresh); the statistics are not needed there
        saved = {name: tensor for name, tensor in tensors.items() if name in _SAVED}
        ctx.settings, ctx.names, ctx.suffix = settings, list(saved), suffix
        ctx.save_for_backward(recurrent_weights, h0, *saved.values())
        hiddens = tensors["hiddens"]
        return hiddens.transpose(0, 1), tensors["cells"][-1].clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_hs: torch.Tensor, grad_c_last: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        recurrent_weights, h0, *saved = ctx.saved_tensors
        tensors = dict(zip(ctx.names, saved))
        hiddens = tensors["hiddens"]
        steps, batch, hidden = hiddens.shape
        new = hiddens.new_zeros
        grad_hs = grad_hs.transpose(0, 1).contiguous()
        grads = {
            "recurrent_weights": recurrent_weights.contiguous(),
            "grad_outputs": grad_hs,
            "grad_h": grad_hs[-1].clone(),
            "grad_h0": h0.new_empty(batch, hidden),
            "grad_c": grad_c_last.contiguous().clone(),
            # every step writes all of its δu_t and δr_t: no zeros needed
            "grad_input": hiddens.new_empty(steps, batch, 4 * hidden),
            "grad_recurrent": hiddens.new_empty(steps, batch, 4 * hidden),
            "grad_gamma_r": new(4 * hidden),
            "grad_gamma_c": new(hidden),
            "grad_beta_c": new(hidden),
        }
        buffers = native.fill(_Buffers, ctx.settings, tensors | grads)
        native.run_pass(SOURCE, f"bn_lstm_backward_{ctx.suffix}", buffers, steps)
        grad_r = grads["grad_recurrent"]
        previous = torch.cat([h0.unsqueeze(0), hiddens[:-1]], dim=0)  # h_{t-1} for every t
        grad_w = grad_r.reshape(-1, 4 * hidden).T @ previous.reshape(-1, hidden)
        grad_input = grads["grad_input"].transpose(0, 1).contiguous()
        return (
            grad_input, grad_w, grads["grad_gamma_r"], grads["grad_gamma_c"], grads["grad_beta_c"],
            grads["grad_h0"], grads["grad_c"], None, None, None,
        )  # fmt: skip
