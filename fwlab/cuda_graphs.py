"""CUDA-graph capture of a model's forward and backward passes and of its optimiser's update,
with an eager fallback.

A recurrent cell written as a Python loop over time launches a few kernels per step, and on a
GPU the launches, not the arithmetic, set the speed of short sequences. A CUDA graph records
every kernel of a pass once and replays them with one launch. :class:`GraphedNetwork` captures,
for the batch shape it meets first:

- in training, the forward and the backward pass (``torch.cuda.make_graphed_callables``: the
  backward graph runs when autograd reaches the output, so Lightning's loop, gradient clipping
  and the metrics are unchanged);
- in evaluation, the forward pass under ``torch.no_grad``.

Capture's warm-up passes leave the modules' buffers (a batch norm's running statistics) as they
found them (:func:`buffers_kept`), so the first replay is the first step.

Anything else runs eagerly: another batch shape (the short last batch of an epoch), the CPU,
several processes (DDP's gradient hooks are not captured), or a network whose capture fails
(e.g. one that reads a value back to the CPU mid-pass); the first fallback of each kind is
logged with its reason. Replays read the parameters in place, so optimiser steps are seen.

The optimiser's update is captured too, as a graph of its own (:class:`GraphedSteps`, which
:func:`fwlab.optim.make_optimizer` mixes into Adam, AdamW and RMSprop, the optimisers with a
``capturable`` mode; SGD steps eagerly): Lightning's closure (forward, backward, gradient
clipping) runs as above, then the update's few dozen kernels run as one replay. It too is
captured on one device in one process only.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn


def _report_once(reported: set[str], message: str) -> None:
    """Log ``message`` the first time it comes (``reported`` holds those already logged)."""
    if message not in reported:
        reported.add(message)
        rank_zero_info(f"fwlab: CUDA graphs: {message}")


def keep_gradients_out_of_graph_buffers(
    parameters: list[nn.Parameter],
) -> list[torch.utils.hooks.RemovableHandle]:
    """Hooks on ``parameters`` that copy a gradient autograd would otherwise take as it is.

    A captured backward pass (``torch.cuda.make_graphed_callables``) hands out each parameter's
    gradient as its graph's output buffer, detached; where the parameter has no gradient yet,
    autograd makes that tensor the gradient without a copy. The next replay then overwrites it,
    and autograd adds the buffer to itself: with gradients accumulated over several batches
    (``trainer.accumulate_grad_batches``) or zeroed in place (:class:`GraphedSteps`), the
    earlier batches' share is lost and the new one doubled. The copy is made only then (the
    parameter without a gradient); a gradient that exists is added to in place."""

    def copy_if_taken(parameter: nn.Parameter) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda grad: grad.clone() if parameter.grad is None else grad

    return [parameter.register_hook(copy_if_taken(parameter)) for parameter in parameters]


@contextlib.contextmanager
def buffers_kept(modules: nn.Module) -> Iterator[None]:
    """Puts ``modules``' buffers back, in place, to what they hold on entry.

    Capture runs the network a few times first: ``make_graphed_callables`` runs three warm-up
    passes in training, :class:`GraphedNetwork` two in evaluation. Each would count as a step
    for the state that a pass updates, such as a batch norm's running statistics and its count
    of batches (``bn_lstm``'s moved 27% of the way to the first batch's before its first step).
    Restored, the first replay is the first step, as it is eagerly. In place, because a graph
    reads the buffers where they are."""
    buffers = list(modules.buffers())
    saved = [buffer.clone() for buffer in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(buffers, saved, strict=True):
                buffer.copy_(value)


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
        self.gradient_hooks: list[torch.utils.hooks.RemovableHandle] = []

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
        _report_once(self.reported, f"running eagerly: {reason}")
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
                with buffers_kept(self.modules):
                    graphed = torch.cuda.make_graphed_callables(
                        _Pass(self.function, self.modules), (inputs.clone(),)
                    )
            except Exception as error:  # noqa: BLE001 - any capture failure means eager
                self.failed.add("train")
                return self._fallback(f"training capture failed ({error})", inputs)
            self.training_graph = (shape, graphed)
            self.captured_storage = self._storage()
            for handle in self.gradient_hooks:  # those of the weights captured before
                handle.remove()
            parameters = [p for p in self.modules.parameters() if p.requires_grad]
            self.gradient_hooks = keep_gradients_out_of_graph_buffers(parameters)
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
                with buffers_kept(self.modules):
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


# how often an optimiser's update is captured before it is left eager for good: more means its
# tensors or settings keep changing (e.g. a schedule that sets a new learning rate every epoch)
MAX_STEP_CAPTURES = 3
# what torch warns of once, at the eager update before capture, which is not the case here
_UNCAPTURED_WARNING = ".*capturable=True.*without CUDA graph capture.*"


class GraphedSteps:
    """Mixed into a torch optimiser constructed with ``capturable=True`` (see
    :func:`graphed_steps_class`): ``step(closure)`` runs the closure eagerly (in Lightning:
    forward, backward and gradient clipping), then the update as a replayed CUDA graph.

    A graph bakes in the addresses of the tensors it reads and the Python numbers it was
    captured with, so a replay is checked against both first: the parameters, their gradients
    and the optimiser's state, and every group's settings (the learning rate, betas, ...). If any
    changed (a checkpoint loaded by replacing tensors, a new learning rate), that step runs
    eagerly and the next is captured again; after :data:`MAX_STEP_CAPTURES` captures the update
    stays eager, and so it does if capture fails, each with its reason logged once. The first
    step is eager too: it makes the optimiser's state, which the graph then reads. Gradients are
    zeroed in place rather than set to ``None``, so that they keep their addresses (each in
    storage of its own: see :func:`keep_gradients_out_of_graph_buffers`).
    """

    step_graph: Callable[[], None] | None  # replays the captured update

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.step_graph = None
        self.step_captures = 0
        self.eager_reason: str | None = None  # set: the update stays eager, for this reason
        self._graph_key: tuple | None = None
        self._key_after_eager_step: tuple | None = None
        self._reported: set[str] = set()

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._update()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients in place whatever ``set_to_none`` says: the graph reads them where
        they are."""
        super().zero_grad(set_to_none=False)  # type: ignore[misc]

    def state_dict(self) -> dict[str, Any]:
        """The state as an eager optimiser's (``capturable`` off, step counts on the CPU), so a
        checkpoint resumes on any device, with or without graphs."""
        state = super().state_dict()  # type: ignore[misc]
        for group in state["param_groups"]:  # copies
            group["capturable"] = False
        state["state"] = {  # the live state's entries: new ones, not changed
            index: {**entry, "step": entry["step"].to("cpu", copy=True)}
            if isinstance(entry.get("step"), torch.Tensor)
            else entry
            for index, entry in state["state"].items()
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)  # type: ignore[misc]
        capturable = self.defaults.get("capturable", False)  # as constructed
        for group in self.param_groups:
            group["capturable"] = capturable
        if capturable:  # the capturable mode keeps step counts on the parameters' device
            for parameter, entry in self.state.items():
                if isinstance(entry.get("step"), torch.Tensor):
                    entry["step"] = entry["step"].to(parameter.device)

    # the update ---------------------------------------------------------------------------------
    def _own_update(self) -> Callable[[], Any]:
        """The optimiser's own step, without torch's wrapper of a class's step (profiling, step
        hooks), which already runs around :meth:`step`."""
        update = super().step  # type: ignore[misc]
        if getattr(update, "hooked", False):
            return functools.partial(update.__wrapped__, self)
        return update

    def _update(self) -> None:
        eager_step = self._own_update()
        reason = self.eager_reason or self._why_eager()
        if reason is not None:
            _report_once(self._reported, f"the optimiser step runs eagerly: {reason}")
            eager_step()
            return
        key = self._tensors_and_settings()
        if self.step_graph is not None and key == self._graph_key:
            self.step_graph()
            return
        if key != self._key_after_eager_step:  # no state yet, or something changed since
            if self._key_after_eager_step is not None:
                _report_once(
                    self._reported,
                    "the optimiser's tensors or settings changed: an eager step, then capture",
                )
            self.step_graph = None
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_UNCAPTURED_WARNING)
                eager_step()
            self._key_after_eager_step = self._tensors_and_settings()
            return
        if self.step_captures == MAX_STEP_CAPTURES:
            self.eager_reason = (
                f"its tensors or settings changed after each of {MAX_STEP_CAPTURES} captures "
                "(e.g. a learning-rate schedule)"
            )
            self._update()
            return
        try:
            self.step_graph = self._capture(eager_step)
        except Exception as error:  # noqa: BLE001 - any capture failure means eager
            self.eager_reason = f"capture failed ({error})"
            self._update()
            return
        self.step_captures += 1
        self._graph_key = key
        rank_zero_info("fwlab: CUDA graphs: captured the optimiser step")
        self.step_graph()  # capture records the update without running it

    def _why_eager(self) -> str | None:
        """Why the update cannot be captured now, or ``None``."""
        if not all(group.get("capturable") for group in self.param_groups):
            return "capturable is off in a parameter group"
        parameters = [p for group in self.param_groups for p in group["params"]]
        if not all(parameter.is_cuda for parameter in parameters):
            return "a parameter is not on a CUDA device"
        return None

    def _capture(self, update: Callable[[], Any]) -> Callable[[], None]:
        """``update`` captured as a CUDA graph; returns its replay."""
        graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA calls of other threads (a data loader's, a logger's) go on meanwhile
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            update()
        return graph.replay

    def _tensors_and_settings(self) -> tuple:
        """What a captured update depends on: the addresses of the parameters, their gradients
        and the state's tensors, and every group's settings."""

        def setting(value: Any) -> Any:
            if isinstance(value, torch.Tensor):  # a tensor setting is read in place
                return ("tensor", value.data_ptr())
            if isinstance(value, list | tuple):
                return tuple(setting(item) for item in value)
            return value

        settings = tuple(
            tuple((name, setting(value)) for name, value in group.items() if name != "params")
            for group in self.param_groups
        )
        tensors = tuple(
            (p.data_ptr(), None if p.grad is None else p.grad.data_ptr())
            for group in self.param_groups
            for p in group["params"]
        )
        state = tuple(
            value.data_ptr()
            for entry in self.state.values()
            for value in entry.values()
            if isinstance(value, torch.Tensor)
        )
        return settings, tensors, state


def graphed_steps_class(
    optimizer_class: type[torch.optim.Optimizer],
) -> type[torch.optim.Optimizer] | None:
    """``optimizer_class`` with :class:`GraphedSteps` mixed in, to be constructed with
    ``capturable=True``; ``None`` where the optimiser has no capturable mode (SGD)."""
    if "capturable" not in inspect.signature(optimizer_class).parameters:
        return None
    return type(f"Graphed{optimizer_class.__name__}", (GraphedSteps, optimizer_class), {})
