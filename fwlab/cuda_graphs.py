"""CUDA-graph capture of a model's forward and backward passes, with an eager fallback.

A recurrent cell written as a Python loop over time launches a few kernels per step, and on a
GPU the launches, not the arithmetic, set the speed of short sequences. A CUDA graph records
every kernel of a pass once and replays them with one launch. :class:`GraphedNetwork` captures,
for the batch shape it meets first:

- in training, the forward and the backward pass (``torch.cuda.make_graphed_callables``: the
  backward graph runs when autograd reaches the output, so Lightning's loop, gradient clipping,
  DDP-free optimiser steps and the metrics are unchanged);
- in evaluation, the forward pass under ``torch.no_grad``.

Anything else runs eagerly: another batch shape (the short last batch of an epoch), the CPU,
several processes (DDP's gradient hooks are not captured), or a network whose capture fails
(e.g. one that reads a value back to the CPU mid-pass); the first fallback of each kind is
logged with its reason. Replays read the parameters in place, so optimiser steps are seen.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn


class _Pass(nn.Module):
    """The network as one module for capture: ``forward`` is ``function`` over ``modules``'
    parameters (registered here, so capture sees them; this wrapper is never a submodule of the
    model, so the model's state dict is unchanged)."""

    def __init__(self, function: Callable[[torch.Tensor], torch.Tensor], modules: nn.ModuleList):
        super().__init__()
        self.function = function
        self.modules_ = modules

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.function(inputs)


class GraphedNetwork:
    """Calls ``function(inputs)`` through CUDA graphs where it can (see the module docstring)."""

    def __init__(
        self,
        function: Callable[[torch.Tensor], torch.Tensor],
        modules: list[nn.Module],
        enabled: bool = True,
    ) -> None:
        self.function = function
        self.modules = nn.ModuleList(modules)
        self.enabled = enabled
        self.training_graph: tuple[tuple[int, ...], Callable] | None = None
        self.eval_graph: tuple[tuple[int, ...], Any, torch.Tensor, torch.Tensor] | None = None
        self.reported: set[str] = set()
        self.failed: set[str] = set()  # "train" / "eval": capture failed, stay eager
        self.captured_storage: tuple[int, ...] | None = None

    def _storage(self) -> tuple[int, ...]:
        """Where the parameters and buffers live: a graph reads them there."""
        tensors = [*self.modules.parameters(), *self.modules.buffers()]
        return tuple(tensor.data_ptr() for tensor in tensors)

    def _drop_stale_graphs(self) -> None:
        """Forget the graphs if a parameter or buffer was replaced rather than updated in place
        (Lightning loading a checkpoint may assign new tensors): replaying them would read
        freed memory."""
        if self.captured_storage is None:  # nothing captured yet
            return
        if self._storage() != self.captured_storage:
            self.training_graph = None
            self.eval_graph = None
            self.captured_storage = None
            rank_zero_info("fwlab: CUDA graphs: the weights were replaced; capturing again")

    def _fallback(self, reason: str, inputs: torch.Tensor) -> torch.Tensor:
        if reason not in self.reported:
            self.reported.add(reason)
            rank_zero_info(f"fwlab: CUDA graphs: running eagerly: {reason}")
        return self.function(inputs)

    def __call__(self, inputs: torch.Tensor, *, training: bool, world_size: int) -> torch.Tensor:
        if not self.enabled:
            return self.function(inputs)
        if not inputs.is_cuda:  # graphs are a CUDA feature: nothing to report elsewhere
            return self.function(inputs)
        if world_size > 1:
            return self._fallback("several processes (DDP)", inputs)
        kind = "train" if training and torch.is_grad_enabled() else "eval"
        if kind in self.failed:
            return self.function(inputs)
        self._drop_stale_graphs()
        if kind == "train":
            return self._train(inputs)
        if torch.is_grad_enabled():
            return self._fallback("evaluation with gradients enabled", inputs)
        return self._eval(inputs)

    def _train(self, inputs: torch.Tensor) -> torch.Tensor:
        shape = tuple(inputs.shape)
        if self.training_graph is None:
            try:
                graphed = torch.cuda.make_graphed_callables(
                    _Pass(self.function, self.modules), (inputs.clone(),)
                )
            except Exception as error:  # noqa: BLE001 - any capture failure means eager
                self.failed.add("train")
                return self._fallback(f"training capture failed ({error})", inputs)
            self.training_graph = (shape, graphed)
            self.captured_storage = self._storage()
            rank_zero_info(f"fwlab: CUDA graphs: captured forward+backward for inputs {shape}")
        captured_shape, graphed = self.training_graph
        if shape != captured_shape:
            return self._fallback(f"input shape {shape} differs from the captured one", inputs)
        return graphed(inputs)

    def _eval(self, inputs: torch.Tensor) -> torch.Tensor:
        shape = tuple(inputs.shape)
        if self.eval_graph is None:
            try:
                static_inputs = inputs.clone()
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(2):  # warm-up outside the graph, as capture requires
                        self.function(static_inputs)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    static_outputs = self.function(static_inputs)
            except Exception as error:  # noqa: BLE001
                self.failed.add("eval")
                return self._fallback(f"evaluation capture failed ({error})", inputs)
            self.eval_graph = (shape, graph, static_inputs, static_outputs)
            self.captured_storage = self._storage()
        captured_shape, graph, static_inputs, static_outputs = self.eval_graph
        if shape != captured_shape:
            return self._fallback(f"input shape {shape} differs from the captured one", inputs)
        static_inputs.copy_(inputs)
        graph.replay()
        return static_outputs.clone()  # the next replay overwrites the static outputs
