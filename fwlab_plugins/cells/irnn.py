"""IRNN (Le, Jaitly & Hinton 2015, "A Simple Way to Initialize Recurrent Networks of Rectified
Linear Units", arXiv 1504.00941).

    h_t = ReLU( W_x x_t + W_h h_{t-1} + b )

with W_h initialised to the identity (optionally scaled), b to zero and W_x from a small Gaussian
(the paper: standard deviation 0.001). The paper trains it with gradient clipping; its preset
(configs/model/irnn.yaml) carries that.

On CUDA the time loop runs as one Triton kernel each way (:mod:`.kernels.irnn_triton`) where
the shape allows; ``model.kernel=torch`` keeps the plain loop below, which is the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from fwlab.bounds import bounded
from fwlab.cell import Cell, CellConfig
from fwlab_plugins.cells import kernels
from fwlab_plugins.cells.kernels import Kernel


class IRNNState(NamedTuple):
    h: torch.Tensor  # (B, H)


@dataclass
class IRNNConfig(CellConfig):
    recurrent_init_scale: float = 1.0  # W_h = scale · I (Le et al.: 1; < 1 for long tasks)
    input_init_std: float = bounded(0.001, at_least=0.0)  # W_x ~ N(0, std²)
    # auto (the Triton loop on CUDA where it pays off) | triton | torch (the plain loop)
    kernel: Kernel = Kernel.auto


class IRNNCell(Cell):
    """IRNN: ReLU RNN with identity recurrent init (Le et al. 2015)."""

    Config = IRNNConfig

    def __init__(self, input_size: int, config: IRNNConfig) -> None:
        super().__init__(input_size, config)
        kernels.check_kernel(config.kernel, "irnn", has=(Kernel.triton,))
        hidden = config.hidden_size
        self.input_weights = nn.Linear(input_size, hidden)  # W_x, b
        self.recurrent_weights = nn.Linear(hidden, hidden, bias=False)  # W_h
        with torch.no_grad():
            self.recurrent_weights.weight.copy_(config.recurrent_init_scale * torch.eye(hidden))
            self.input_weights.weight.normal_(0.0, config.input_init_std)
            self.input_weights.bias.zero_()

    def initial_state(
        self,
        batch_size: int,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> IRNNState:
        return IRNNState(torch.zeros(batch_size, self.hidden_size, device=device, dtype=dtype))

    def forward(
        self, x: torch.Tensor, state: IRNNState | None = None
    ) -> tuple[torch.Tensor, IRNNState]:
        if state is None:
            state = self.initial_state(x.shape[0], x.device, x.dtype)
        input_part = self.input_weights(x)  # (B, T, H): W_x x_t + b for all t at once
        if self._fused(input_part):
            from fwlab_plugins.cells.kernels.irnn_triton import irnn_sequence

            outputs = irnn_sequence(input_part, self.recurrent_weights.weight, state.h)
            return outputs, IRNNState(outputs[:, -1])
        h, outputs = state.h, []
        for input_t in input_part.unbind(1):  # unbind, not slices: an O(T) backward
            h = torch.relu(input_t + self.recurrent_weights(h))
            outputs.append(h)
        return torch.stack(outputs, dim=1), IRNNState(h)

    def _fused(self, input_part: torch.Tensor) -> bool:
        def fits_and_slower() -> tuple[bool, str | None]:
            from fwlab_plugins.cells.kernels import irnn_triton

            fits = irnn_triton.fits(input_part, self.hidden_size)
            return fits, irnn_triton.slower(input_part)

        return kernels.wants_triton(self.config.kernel, input_part, "irnn", fits_and_slower)

    def step(self, x_t: torch.Tensor, state: IRNNState) -> tuple[torch.Tensor, IRNNState]:
        h = torch.relu(self.input_weights(x_t) + self.recurrent_weights(state.h))
        return h, IRNNState(h)
