"""LSTM baseline (Hochreiter & Schmidhuber 1997), on ``torch.nn.LSTM`` so cuDNN/oneDNN kernels run.

i, f, g, o = σ(W_i x + U_i h + b_i), σ(W_f x + U_f h + b_f), tanh(W_g x + ...), σ(W_o x + ...)
c_t = f ⊙ c_{t-1} + i ⊙ g
h_t = o ⊙ tanh(c_t)

Under CPU autocast (``trainer.precision=bf16-mixed`` on a CPU) ``nn.LSTM`` calls oneDNN's
low-precision LSTM, which CPUs without bfloat16 instructions (AVX2 machines, most laptops) lack:
oneDNN fails with "could not create a primitive descriptor". There the LSTM runs in float32
instead, as autocast itself runs the operations it has no low-precision kernel for, and says so
once.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch
from lightning.pytorch.utilities import rank_zero_info
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
        h0, c0 = state.h.unsqueeze(0), state.c.unsqueeze(0)
        if _cpu_autocast_without_onednn_kernel(x):
            with torch.autocast("cpu", enabled=False):
                dtype = self.lstm.weight_hh_l0.dtype
                outputs, (h, c) = self.lstm(x.to(dtype), (h0.to(dtype), c0.to(dtype)))
        else:
            outputs, (h, c) = self.lstm(x, (h0, c0))
        return outputs, LSTMState(h.squeeze(0), c.squeeze(0))  # (B, T, H)

    def step(self, x_t: torch.Tensor, state: LSTMState) -> tuple[torch.Tensor, LSTMState]:
        outputs, state = self.forward(x_t.unsqueeze(1), state)
        return outputs.squeeze(1), state


_ONEDNN_LOW_PRECISION = {
    torch.bfloat16: torch.ops.mkldnn._is_mkldnn_bf16_supported,
    torch.float16: torch.ops.mkldnn._is_mkldnn_fp16_supported,
}


def _cpu_autocast_without_onednn_kernel(x: torch.Tensor) -> bool:
    """Whether ``x`` is on the CPU under an autocast whose dtype this CPU's oneDNN has no LSTM
    kernel for."""
    if x.device.type != "cpu" or not torch.is_autocast_enabled("cpu"):
        return False
    return _onednn_lacks_lstm_kernel(torch.get_autocast_dtype("cpu"))


@functools.cache  # asked at every forward pass under autocast; the answer and its report, once
def _onednn_lacks_lstm_kernel(dtype: torch.dtype) -> bool:
    supported = _ONEDNN_LOW_PRECISION.get(dtype)
    if supported is None or supported():
        return False
    rank_zero_info(
        f"fwlab: lstm: this CPU's oneDNN has no {dtype} LSTM kernel; "
        "the LSTM runs in float32 under autocast"
    )
    return True
