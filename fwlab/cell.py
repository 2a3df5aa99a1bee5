"""The interface every recurrent cell implements.

A cell maps an input sequence ``x`` of shape ``(B, T, I)`` and an optional state to outputs
``(B, T, H_out)`` and the final state; ``step`` does one time step. State is a ``NamedTuple`` of
tensors whose first dimension is the batch. ``forward`` must compute exactly what calling
``step`` T times computes (tests check this for every registered cell); cells override it only
to do the same work faster (a fused kernel, a batched matrix product).

Writing a cell::

    @dataclass
    class MyConfig(CellConfig):
        leak: float = 0.5          # every field becomes a ``model.*`` config key

    class MyCell(Cell):
        \"\"\"One line that ``fwlab list`` shows.\"\"\"
        Config = MyConfig
        def __init__(self, input_size: int, config: MyConfig): ...
        def initial_state(self, batch_size, device=None, dtype=None): ...
        def step(self, x_t, state): ...
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from fwlab.bounds import bounded, check_bounds
from fwlab.errors import IncompatibleError
from fwlab.spec import DataSpec


@dataclass
class CellConfig:
    """Fields every cell has; a cell's own config subclasses this."""

    # number of recurrent units (R in Ba et al.'s Table 1)
    hidden_size: int = bounded(100, at_least=1)


class Cell(nn.Module, ABC):
    """A recurrent cell: ``(x (B,T,I), state) -> (outputs (B,T,H_out), state)``."""

    Config: ClassVar[type[CellConfig]] = CellConfig

    def __init__(self, input_size: int, config: CellConfig) -> None:
        super().__init__()
        check_bounds(config, "model.")
        self.input_size = input_size
        self.config = config
        self.hidden_size = config.hidden_size

    @property
    def output_size(self) -> int:
        """Width of the outputs; the hidden size unless the cell concatenates more (reads)."""
        return self.hidden_size

    @abstractmethod
    def initial_state(
        self,
        batch_size: int,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> NamedTuple:
        """The state at the start of a sequence."""

    @abstractmethod
    def step(self, x_t: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        """One time step: ``x_t (B, I)`` -> ``(output (B, H_out), next state)``."""

    def forward(self, x: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        """The whole sequence: ``x (B, T, I)`` -> ``(outputs (B, T, H_out), final state)``."""
        if state is None:
            state = self.initial_state(x.shape[0], x.device, x.dtype)
        outputs = []
        # unbind, not x[:, t]: the backward of T slices would write T full-size gradients
        for x_t in x.unbind(1):
            output, state = self.step(x_t, state)
            outputs.append(output)
        return torch.stack(outputs, dim=1), state

    @classmethod
    def check_compatible(cls, config: CellConfig, spec: DataSpec) -> None:
        """Raise :class:`fwlab.errors.IncompatibleError` if this cell cannot model ``spec``."""


def check_output_width(cell: Cell, name: str) -> None:
    """Raise :class:`~fwlab.errors.IncompatibleError` if one step of the cell (two zero inputs,
    from its initial state, in eval mode: no statistics or noise of training) returns outputs
    whose width is not its ``output_size``, the width the model's head is built for: a
    plugin's mismatch then stops the command as the model is built, naming the cell, not at
    the first batch as a shape error inside torch. An exception in ``step`` itself is left to
    show its traceback (it is the cell's own code)."""
    was_training = cell.training
    cell.eval()
    try:
        with torch.no_grad():
            output, _ = cell.step(torch.zeros(2, cell.input_size), cell.initial_state(2))
    finally:
        cell.train(was_training)
    if tuple(output.shape) != (2, cell.output_size):
        raise IncompatibleError(
            f"cell {name}: step() returned outputs of shape {tuple(output.shape)} for a batch "
            f"of 2, but its output_size is {cell.output_size}: the head reads (batch, "
            "output_size); override output_size if the outputs are wider than hidden_size"
        )
