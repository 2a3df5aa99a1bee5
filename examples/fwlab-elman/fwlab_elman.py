"""The Elman RNN (Elman 1990), as an fwlab plugin: h_t = tanh(W_x x_t + W_h h_{t-1} + b)."""

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from fwlab import Cell, CellConfig, bounded


class ElmanState(NamedTuple):
    h: torch.Tensor  # (B, H)


@dataclass
class ElmanConfig(CellConfig):  # hidden_size comes from CellConfig
    # W_h starts as this times an orthogonal matrix; model.recurrent_init_scale=0 is refused
    recurrent_init_scale: float = bounded(1.0, above=0.0)


class ElmanCell(Cell):
    """Elman (tanh) RNN: h_t = tanh(W_x x_t + W_h h_{t-1} + b)."""

    Config = ElmanConfig

    def __init__(self, input_size: int, config: ElmanConfig) -> None:
        super().__init__(input_size, config)
        self.input_weights = nn.Linear(input_size, config.hidden_size)  # W_x, b
        self.recurrent_weights = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        nn.init.orthogonal_(self.recurrent_weights.weight, gain=config.recurrent_init_scale)

    def initial_state(
        self, batch_size: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> ElmanState:
        return ElmanState(torch.zeros(batch_size, self.hidden_size, device=device, dtype=dtype))

    def step(self, x_t: torch.Tensor, state: ElmanState) -> tuple[torch.Tensor, ElmanState]:
        h = torch.tanh(self.input_weights(x_t) + self.recurrent_weights(state.h))  # (B, H)
        return h, ElmanState(h)
