"""Batch-normalised LSTM (Cooijmans, Ballas, Laurent, Gülçehre & Courville 2017, "Recurrent Batch
Normalization", arXiv 1603.09025), eqs. 6-8:

    (f̃, ĩ, õ, g̃) = BN(W_h h_{t-1}; γ_h, β_h) + BN(W_x x_t; γ_x, β_x) + b      β_h = β_x = 0, fixed
    c_t = σ(f̃) ⊙ c_{t-1} + σ(ĩ) ⊙ tanh(g̃)
    h_t = σ(õ) ⊙ tanh( BN(c_t; γ_c, β_c) )

Two separate BNs for the recurrent and the input contributions (none inside the cell update),
statistics per time step with γ, β shared across time (:mod:`.stepwise_batch_norm`); γ starts
at 0.1 (1.0 vanishes the gradient through time), β at 0. W_h starts as the identity in each
gate's block, W_x orthogonal. The forget bias starts at ``forget_bias`` (fwlab's choice, as for
``lstm``; the paper does not state one).

When every sequence of a batch starts with the same inputs (the zero pixels at the top of every
MNIST digit), the states of the batch stay identical: BN(W_h h) then normalises a batch whose
variance is zero, its derivative is γ/√ε (32 at γ = 0.1) per step, and the gradient through a
hundred such steps overflows float32 from the first batch on. The authors' code for unpermuted
sequential MNIST primes h_0 with white noise of std 0.1 (``--noise 0.1``); ``initial_noise``
does so in training (evaluation starts from h_0 = 0 and stays deterministic).

The whole-sequence forward runs the recurrence as one autograd node with a hand-written backward
(:mod:`.bn_lstm_sequence`); ``model.recurrence=stepwise`` runs autograd through :meth:`step`'s
code instead, the reference the tests hold it to. On the CPU that node runs its time loop, the
recurrent products included, in C (:mod:`.kernels.bn_lstm_cpu`, ``model.kernel=auto|c``), where a
C compiler is available; ``model.kernel=triton`` runs it as one Triton kernel each way
(:mod:`.kernels.bn_lstm_triton`: on CUDA, or in Triton's CPU interpreter for tests; not
``auto``'s choice, as it measured slower on an H200 than the graph-captured PyTorch node);
``model.kernel=torch`` keeps its PyTorch code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from fwlab.bounds import bounded
from fwlab.cell import Cell, CellConfig
from fwlab.errors import ConfigError
from fwlab_plugins.cells import kernels
from fwlab_plugins.cells.bn_lstm_sequence import BNLSTMSequence
from fwlab_plugins.cells.kernels import Kernel, bn_lstm_cpu
from fwlab_plugins.cells.recurrence import Recurrence, apply_in_full_precision
from fwlab_plugins.cells.stepwise_batch_norm import StepwiseBatchNorm


class BNLSTMState(NamedTuple):
    h: torch.Tensor  # (B, H)
    c: torch.Tensor  # (B, H)
    time: torch.Tensor  # (B,) int64: the time step of the next input (selects BN statistics)


@dataclass
class BNLSTMConfig(CellConfig):
    gamma_init: float = 0.1  # initial γ of all three BNs (Cooijmans et al.)
    # per-step statistics kept; >= the longest training sequence
    max_time_steps: int = bounded(1024, at_least=1)
    # running-average weight of each training batch's statistics
    momentum: float = bounded(0.1, at_least=0.0, at_most=1.0)
    forget_bias: float = 1.0  # initial b of the forget gate
    # std of white noise in the initial hidden state h_0 in training; 0: h_0 = 0 (see the module
    # docstring: Cooijmans et al.'s code uses 0.1 on unpermuted sequential MNIST)
    initial_noise: float = bounded(0.0, at_least=0.0)
    recurrence: Recurrence = Recurrence.fused  # fused | stepwise (the autograd reference)
    # the fused node's steps: auto (the C kernel on the CPU where it builds) | c | triton | torch
    kernel: Kernel = Kernel.auto


class BNLSTMCell(Cell):
    """BN-LSTM: per-step batch norm of recurrent, input and cell terms (Cooijmans et al. 2017)."""

    Config = BNLSTMConfig

    def __init__(self, input_size: int, config: BNLSTMConfig) -> None:
        super().__init__(input_size, config)
        self.kernel = kernels.check_kernel(config.kernel, "bn_lstm", has=(Kernel.c, Kernel.triton))
        if self.kernel in (Kernel.c, Kernel.triton) and (
            Recurrence(config.recurrence) is Recurrence.stepwise
        ):
            raise ConfigError(
                f"model.kernel={self.kernel.value} runs the fused node's steps: it needs "
                "model.recurrence=fused, got model.recurrence=stepwise"
            )
        hidden = config.hidden_size
        self.input_weights = nn.Parameter(torch.empty(4 * hidden, input_size))  # W_x
        self.recurrent_weights = nn.Parameter(torch.eye(hidden).repeat(4, 1))  # W_h, (4H, H)
        self.bias = nn.Parameter(torch.zeros(4 * hidden))  # b; gates ordered (f, i, o, g)
        nn.init.orthogonal_(self.input_weights)
        with torch.no_grad():
            self.bias[:hidden].fill_(config.forget_bias)

        def batch_norm(features: int, learn_beta: bool) -> StepwiseBatchNorm:
            return StepwiseBatchNorm(
                features, config.max_time_steps, config.gamma_init, learn_beta, config.momentum
            )

        self.recurrent_norm = batch_norm(4 * hidden, learn_beta=False)
        self.input_norm = batch_norm(4 * hidden, learn_beta=False)
        self.cell_norm = batch_norm(hidden, learn_beta=True)

    def initial_state(
        self,
        batch_size: int,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> BNLSTMState:
        zeros = torch.zeros(batch_size, self.hidden_size, device=device, dtype=dtype)
        time = torch.zeros(batch_size, dtype=torch.long, device=device)
        return BNLSTMState(zeros, zeros.clone(), time)

    def forward(
        self, x: torch.Tensor, state: BNLSTMState | None = None
    ) -> tuple[torch.Tensor, BNLSTMState]:
        if state is None:  # a fresh sequence starts at step 0 (no read-back of state.time)
            state, start = self.initial_state(x.shape[0], x.device, x.dtype), 0
            if self.training and self.config.initial_noise > 0:
                state = state._replace(h=self.config.initial_noise * torch.randn_like(state.h))
        else:
            start = int(state.time[0]) if state.time.numel() else 0
        # BN(W_x x_t) + b for all t at once: the input term does not depend on the recurrence
        input_part = self.input_norm.forward_sequence(x @ self.input_weights.T, start, self.bias)
        time = state.time + x.shape[1]
        # batch statistics need two sequences: a single one takes the stepwise code
        one_sample = self.training and x.shape[0] < 2
        if Recurrence(self.config.recurrence) is Recurrence.fused and x.shape[1] and not one_sample:
            dtype = self.recurrent_weights.dtype
            outputs, c = apply_in_full_precision(
                self._sequence_node(input_part, dtype),
                dtype,
                input_part,
                self.recurrent_weights,
                self.recurrent_norm.weight,
                self.cell_norm.weight,
                self.cell_norm.bias,
                state.h,
                state.c,
                self.recurrent_norm,
                self.cell_norm,
                start,
            )
            return outputs, BNLSTMState(outputs[:, -1], c, time)
        h, c, outputs = state.h, state.c, []
        for offset, input_t in enumerate(input_part.unbind(1)):  # unbind: O(T) backward
            h, c = self._recur(input_t, h, c, start + offset)
            outputs.append(h)
        return torch.stack(outputs, dim=1), BNLSTMState(h, c, time)

    def _sequence_node(
        self, input_part: torch.Tensor, dtype: torch.dtype
    ) -> type[torch.autograd.Function]:
        """The node that runs the fused recurrence on ``input_part``: the Triton kernels, the C
        kernel or the PyTorch reference, as ``model.kernel`` and the device allow."""

        def fits_and_slower() -> tuple[bool, str | None]:
            from fwlab_plugins.cells.kernels import bn_lstm_triton

            batch, steps, _ = input_part.shape
            fits = bn_lstm_triton.fits(batch, steps, self.hidden_size, dtype)
            return fits, bn_lstm_triton.slower()

        if kernels.wants_triton(self.kernel, input_part, "bn_lstm", fits_and_slower):
            from fwlab_plugins.cells.kernels.bn_lstm_triton import FusedBNLSTM

            return FusedBNLSTM

        def unavailable() -> str | None:
            return bn_lstm_cpu.unavailable_reason(input_part.device, dtype)

        if kernels.wants_c(self.kernel, input_part, "bn_lstm", unavailable):
            return bn_lstm_cpu.BNLSTMSequenceC
        return BNLSTMSequence

    def step(self, x_t: torch.Tensor, state: BNLSTMState) -> tuple[torch.Tensor, BNLSTMState]:
        t = int(state.time[0]) if state.time.numel() else 0
        input_part = self.input_norm(x_t @ self.input_weights.T, t) + self.bias
        h, c = self._recur(input_part, state.h, state.c, t)
        return h, BNLSTMState(h, c, state.time + 1)

    def _recur(
        self, input_part: torch.Tensor, h: torch.Tensor, c: torch.Tensor, t: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One step given ``input_part`` = BN(W_x x_t) + b, the (B, 4H) input term."""
        gates = self.recurrent_norm(h @ self.recurrent_weights.T, t) + input_part  # (B, 4H)
        hidden = self.hidden_size
        # one sigmoid over the three contiguous gates (f, i, o), one tanh over g
        forget, input_gate, output = torch.sigmoid(gates[:, : 3 * hidden]).chunk(3, dim=1)
        candidate = torch.tanh(gates[:, 3 * hidden :])
        c = forget * c + input_gate * candidate
        h = output * torch.tanh(self.cell_norm(c, t))
        return h, c
