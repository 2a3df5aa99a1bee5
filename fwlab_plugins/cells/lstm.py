"""LSTM baseline (Hochreiter & Schmidhuber 1997), on ``torch.nn.LSTM`` so cuDNN/oneDNN kernels run.

i, f, g, o = σ(W_i x + U_i h + b_i), σ(W_f x + U_f h + b_f), tanh(W_g x + ...), σ(W_o x + ...)
c_t = f ⊙ c_{t-1} + i ⊙ g
h_t = o ⊙ tanh(c_t)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from fwlab.cell import Cell, CellConfig


class LSTMState(NamedTuple):
    h: torch.Tensor  # (B, H)
    c: torch.Tensor  # (B, H)


@dataclass
class LSTMConfig(CellConfig):
    forget_bias: float = 1.0  # added to the forget gate's bias at init (Gers et al. 2000)


class LSTMCell(Cell):
    """LSTM on torch.nn.LSTM (fused cuDNN/oneDNN kernels)."""

    Config = LSTMConfig

    def __init__(self, input_size: int, config: LSTMConfig) -> None:
        super().__init__(input_size, config)
        self.lstm = nn.LSTM(input_size, config.hidden_size, batch_first=True)
        with torch.no_grad():
            # PyTorch orders the gates (i, f, g, o); two bias vectors are summed, so set one.
            hidden = config.hidden_size
            self.lstm.bias_hh_l0[hidden : 2 * hidden].fill_(0.0)
            self.lstm.bias_ih_l0[hidden : 2 * hidden].fill_(config.forget_bias)

    def initial_state(
        self,
        batch_size: int,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> LSTMState:
        zeros = torch.zeros(batch_size, self.hidden_size, device=device, dtype=dtype)
        return LSTMState(zeros, zeros.clone())

    def forward(
        self, x: torch.Tensor, state: LSTMState | None = None
    ) -> tuple[torch.Tensor, LSTMState]:
        if state is None:
            state = self.initial_state(x.shape[0], x.device, x.dtype)
        outputs, (h, c) = self.lstm(x, (state.h.unsqueeze(0), state.c.unsqueeze(0)))
        return outputs, LSTMState(h.squeeze(0), c.squeeze(0))  # (B, T, H)

    def step(self, x_t: torch.Tensor, state: LSTMState) -> tuple[torch.Tensor, LSTMState]:
        outputs, state = self.forward(x_t.unsqueeze(1), state)
        return outputs.squeeze(1), state
