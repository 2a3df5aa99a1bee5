"""CUDA-graph capture of the sequence model and of its optimiser's update: the same losses and
outputs as eager execution.

The capture needs a CUDA device; elsewhere those tests are skipped. What runs everywhere: the
switch leaves CPU runs eager and unchanged, and the guards of a captured update
(:class:`fwlab.cuda_graphs.GraphedSteps`) hold against a stand-in for the graph whose replay
reads what a graph's would: the tensors and settings as they were at capture.
"""

from __future__ import annotations

import copy
import dataclasses
import logging

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from fwlab.config import compose
from fwlab.cuda_graphs import (
    MAX_STEP_CAPTURES,
    GraphedSteps,
    buffers_kept,
    keep_gradients_out_of_graph_buffers,
)
from fwlab.optim import OptimConfig, make_optimizer
from fwlab.registry import Registry
from fwlab.training import build_model_and_data

from .test_cells import small_config

REGISTRY = Registry()
CELLS = REGISTRY.names("cell")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")


def build(cell: str, graphs: bool, device: str, **model_overrides):
    config = compose(REGISTRY, model=cell, data="retrieval",
                     overrides=["logger=none", f"model.cuda_graphs={graphs}"])  # fmt: skip
    small = dataclasses.asdict(small_config(REGISTRY.get("cell", cell), hidden_size=16))
    config.merge_with(
        {
            "model": {**small, **model_overrides},
            "data": {"train_size": 128, "val_size": 16, "test_size": 16, "batch_size": 16},
        }
    )
    torch.manual_seed(0)
    model, data = build_model_and_data(config, REGISTRY)
    data.setup("fit")
    return model.to(device), data


def train_losses(cell: str, graphs: bool, device: str, steps: int = 6, **model_overrides):
    model, data = build(cell, graphs, device, **model_overrides)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    batches = iter(data.train_dataloader())
    model.train()
    for _ in range(steps):
        inputs, targets = (t.to(device) for t in next(batches)[:2])
        optimizer.zero_grad()
        loss = model.target.loss(model(inputs), targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    return losses, model


@needs_cuda
@pytest.mark.parametrize("cell", CELLS)
def test_a_captured_training_step_gives_the_eager_loss_sequence(cell):
    eager, eager_model = train_losses(cell, graphs=False, device="cuda")
    graphed, model = train_losses(cell, graphs=True, device="cuda")
    assert model.graphs.training_graph is not None, f"not captured: {model.graphs.reported}"
    assert graphed == pytest.approx(eager, rel=1e-4, abs=1e-5)
    # and the state the passes update (bn_lstm's running statistics): capture's warm-up passes
    # are not steps
    buffers = zip(model.named_buffers(), eager_model.named_buffers(), strict=True)
    for (name, graphed_buffer), (_, eager_buffer) in buffers:
        torch.testing.assert_close(graphed_buffer, eager_buffer, rtol=1e-4, atol=1e-5, msg=name)


@needs_cuda
def test_the_fused_irnn_kernel_runs_inside_the_captured_step():
    eager, _ = train_losses("irnn", graphs=False, device="cuda", kernel="torch")
    graphed, model = train_losses("irnn", graphs=True, device="cuda", kernel="triton")
    assert model.graphs.training_graph is not None, f"not captured: {model.graphs.reported}"
    assert graphed == pytest.approx(eager, rel=1e-4, abs=1e-5)


@needs_cuda
@pytest.mark.parametrize("cell", CELLS)
def test_captured_evaluation_gives_the_eager_outputs_and_other_shapes_fall_back(cell):
    model, data = build(cell, graphs=True, device="cuda")
    model.eval()
    inputs = next(iter(data.val_dataloader()))[0].cuda()
    with torch.no_grad():
        eager = model.network(inputs)
        first, second = model(inputs), model(inputs)  # capture, then replay
        shorter = model(inputs[:5])  # another shape: eager
    assert model.graphs.eval_graph is not None, f"not captured: {model.graphs.reported}"
    torch.testing.assert_close(first, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shorter, eager[:5], rtol=1e-5, atol=1e-5)


@needs_cuda
def test_gradients_accumulate_over_batches_through_the_captured_pass():
    """As with ``trainer.accumulate_grad_batches``: backward passes without zeroing between."""
    grads = {}
    for graphs in (False, True):
        model, data = build("lstm", graphs, "cuda")
        model.train()
        batches = iter(data.train_dataloader())
        for _ in range(3):  # with graphs: the first captures, the others replay
            inputs, targets = (t.cuda() for t in next(batches)[:2])
            model.target.loss(model(inputs), targets).backward()
        grads[graphs] = [parameter.grad.clone() for parameter in model.parameters()]
    assert model.graphs.training_graph is not None, f"not captured: {model.graphs.reported}"
    for graphed, eager in zip(grads[True], grads[False], strict=True):
        torch.testing.assert_close(graphed, eager, rtol=1e-4, atol=1e-6)


def test_on_the_cpu_the_switch_changes_nothing():
    (on, model), (off, _) = (
        train_losses("lstm", True, "cpu", 3),
        train_losses("lstm", False, "cpu", 3),
    )
    assert on == off and model.graphs.training_graph is None


def test_passes_inside_buffers_kept_leave_bn_lstms_running_statistics_as_they_were():
    """What capture's warm-up passes run in: the network's own passes, in training."""
    model, data = build("bn_lstm", graphs=True, device="cpu")
    model.train()
    modules = model.graphs.modules
    before = [buffer.clone() for buffer in modules.buffers()]
    addresses = [buffer.data_ptr() for buffer in modules.buffers()]
    inputs = next(iter(data.train_dataloader()))[0]
    with buffers_kept(modules):
        for _ in range(3):
            model.graphs.function(inputs)
        moved = [not torch.equal(b, old) for b, old in zip(modules.buffers(), before, strict=True)]
    assert len(before) >= 3 and all(moved)  # running mean and variance, count of batches
    for buffer, old in zip(modules.buffers(), before, strict=True):
        assert torch.equal(buffer, old)
    assert [buffer.data_ptr() for buffer in modules.buffers()] == addresses  # in place


def test_buffers_kept_puts_them_back_when_the_capture_fails():
    norm = nn.BatchNorm1d(3)
    with pytest.raises(RuntimeError, match="capture failed"), buffers_kept(norm):
        norm(torch.randn(8, 3) + 5)
        raise RuntimeError("capture failed")
    assert torch.equal(norm.running_mean, torch.zeros(3)) and norm.num_batches_tracked == 0


@needs_cuda
def test_weights_replaced_by_new_tensors_are_captured_again():
    """Lightning may load a checkpoint by assigning new tensors: the graphs must not replay
    against the old (freed) ones."""
    model, data = build("lstm", graphs=True, device="cuda")
    model.eval()
    inputs = next(iter(data.val_dataloader()))[0].cuda()
    with torch.no_grad():
        model(inputs)  # captured with the first weights
        changed = {k: v + 0.1 if v.is_floating_point() else v for k, v in
                   model.state_dict().items()}  # fmt: skip
        model.load_state_dict(changed, assign=True)
        torch.testing.assert_close(model(inputs), model.network(inputs), rtol=1e-5, atol=1e-5)


# -- the optimiser's update as a graph -------------------------------------------------------------


class StandInGraphAdam(GraphedSteps, torch.optim.Adam):
    """Adam with :class:`GraphedSteps`' guards, on the CPU, where no graph can run: its "capture"
    keeps what a CUDA graph bakes in, the tensors (parameters, gradients, state) and the groups'
    settings as they are, and its replay runs the update on those, as a graph's would, whatever
    has changed since. A change that the guards let through then gives another update than an
    eager optimiser's."""

    replays = 0

    def _why_eager(self) -> str | None:
        return None  # the CPU stands in for the device

    def _capture(self, update):
        captured = self._everything()

        def replay() -> None:
            now = self._everything()
            self._restore(captured)
            update()
            self._restore(now)
            self.replays += 1

        return replay

    def _everything(self):
        groups = [dict(group) for group in self.param_groups]
        grads = {p: p.grad for group in self.param_groups for p in group["params"]}
        return groups, grads, {p: dict(entry) for p, entry in self.state.items()}

    def _restore(self, everything) -> None:
        groups, grads, state = everything
        for group, values in zip(self.param_groups, groups, strict=True):
            group.clear()
            group.update(values)
        for parameter, grad in grads.items():
            parameter.grad = grad
        self.state.clear()
        self.state.update({p: dict(entry) for p, entry in state.items()})


def fit_tiny_model(optimizer_class, steps: int = 8, between=None):
    """Losses and final parameters of a small regression trained by ``optimizer_class`` (lr
    0.05); ``between(step, model, optimizer)`` runs before each step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    inputs, targets = torch.randn(32, 4), torch.randn(32, 1)
    optimizer = optimizer_class(model.parameters(), lr=0.05)
    losses = []
    for step in range(steps):
        if between is not None:
            between(step, model, optimizer)

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(inputs), targets)
            loss.backward()
            return loss

        losses.append(optimizer.step(closure).item())
    return losses, [p.detach().clone() for p in model.parameters()], optimizer


def assert_follows_eager_adam(between=None, steps: int = 8) -> StandInGraphAdam:
    eager_losses, eager_parameters, _ = fit_tiny_model(torch.optim.Adam, steps, between)
    losses, parameters, optimizer = fit_tiny_model(StandInGraphAdam, steps, between)
    assert losses == eager_losses
    for parameter, eager in zip(parameters, eager_parameters, strict=True):
        assert torch.equal(parameter, eager)
    return optimizer


def test_the_update_is_captured_after_one_eager_step_and_replayed():
    optimizer = assert_follows_eager_adam(steps=8)
    # step 1 eager (it makes the state), step 2 captured and replayed, steps 3-8 replayed
    assert (optimizer.step_captures, optimizer.replays) == (1, 7)


def test_a_new_learning_rate_is_captured_again():
    def halve_the_rate_at_step_4(step, model, optimizer):
        if step == 4:
            for group in optimizer.param_groups:
                group["lr"] /= 2

    optimizer = assert_follows_eager_adam(halve_the_rate_at_step_4)
    assert optimizer.step_captures == 2


def test_gradients_set_to_none_are_captured_again():
    """New gradient tensors (from a zero_grad(set_to_none=True) elsewhere) live elsewhere."""

    def drop_the_gradients_at_step_4(step, model, optimizer):
        if step == 4:
            for parameter in model.parameters():
                parameter.grad = None

    optimizer = assert_follows_eager_adam(drop_the_gradients_at_step_4)
    assert optimizer.step_captures == 2


def test_state_loaded_from_a_checkpoint_is_captured_again():
    def reload_the_state_at_step_4(step, model, optimizer):
        if step == 4:
            optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))

    optimizer = assert_follows_eager_adam(reload_the_state_at_step_4)
    assert optimizer.step_captures == 2


@pytest.mark.parametrize("every", [1, 3])
def test_settings_that_keep_changing_leave_the_update_eager(caplog, every):
    def decay_the_rate(step, model, optimizer):
        if step % every == 0:
            for group in optimizer.param_groups:
                group["lr"] *= 0.9

    with caplog.at_level(logging.INFO):
        optimizer = assert_follows_eager_adam(decay_the_rate, steps=4 * MAX_STEP_CAPTURES)
    assert "tensors or settings changed" in caplog.text
    if every == 1:  # never the same twice: never captured
        assert optimizer.step_captures == 0
    else:  # captured, replayed, changed: at most so many times
        assert optimizer.step_captures == MAX_STEP_CAPTURES
        assert "changed after each of" in optimizer.eager_reason
        assert "the optimiser step runs eagerly" in caplog.text


def test_a_checkpoint_leaves_the_captured_update_as_it_was():
    """Lightning saves checkpoints mid-training: the state dict must not touch the live state."""
    _, _, optimizer = fit_tiny_model(StandInGraphAdam, steps=3)
    steps = [entry["step"] for entry in optimizer.state.values()]
    saved = optimizer.state_dict()
    assert all(group["capturable"] is False for group in saved["param_groups"])
    assert [entry["step"] for entry in optimizer.state.values()] == steps
    assert all(saved["state"][k]["step"] is not step for k, step in enumerate(steps))
    replays = optimizer.replays
    optimizer.step()  # the gradients of the last step, again
    assert optimizer.replays == replays + 1 and optimizer.step_captures == 1


class StaticGradient(torch.autograd.Function):
    """``x @ w``, whose backward pass hands out ``w``'s gradient as a captured backward graph
    (``torch.cuda.make_graphed_callables``) does: written into one static buffer and returned
    detached, which autograd takes as ``w.grad`` without a copy where ``w`` has none."""

    @staticmethod
    def forward(ctx, inputs, weight, buffer):
        ctx.save_for_backward(inputs)
        ctx.buffer = buffer
        return inputs @ weight

    @staticmethod
    def backward(ctx, grad):
        (inputs,) = ctx.saved_tensors
        torch.matmul(inputs.T, grad, out=ctx.buffer)
        return None, ctx.buffer.detach(), None


def accumulated_gradient(guarded: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``w``'s gradient over two batches without zeroing in between, through
    :class:`StaticGradient` (with the hooks of ``keep_gradients_out_of_graph_buffers`` where
    ``guarded``), and the sum of the two batches' gradients computed apart."""
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(4, 1))
    buffer = torch.empty(4, 1)
    batches = [torch.randn(8, 4) for _ in range(2)]
    if guarded:
        keep_gradients_out_of_graph_buffers([weight])
    for inputs in batches:
        StaticGradient.apply(inputs, weight, buffer).sum().backward()
    expected = sum(inputs.T @ torch.ones(8, 1) for inputs in batches)
    return weight.grad, expected


def test_gradients_accumulate_through_a_captured_backward_pass():
    grad, expected = accumulated_gradient(guarded=False)
    # what the hooks are for: without them the first batch's share is lost, the second doubled
    assert not torch.allclose(grad, expected)
    grad, expected = accumulated_gradient(guarded=True)
    torch.testing.assert_close(grad, expected)


def test_graphed_steps_take_each_gradient_of_a_captured_backward_pass_once():
    """Zeroed in place, a gradient that were the captured pass's buffer would double."""

    def fit(optimizer_class) -> list[torch.Tensor]:
        torch.manual_seed(0)
        weight = nn.Parameter(torch.randn(4, 1))
        keep_gradients_out_of_graph_buffers([weight])  # as GraphedNetwork does
        inputs, targets, buffer = torch.randn(32, 4), torch.randn(32, 1), torch.empty(4, 1)
        optimizer, grads = optimizer_class([weight], lr=0.05), []

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(StaticGradient.apply(inputs, weight, buffer), targets)
            loss.backward()
            grads.append(weight.grad.clone())
            return loss

        for _ in range(5):
            optimizer.step(closure)
        return grads

    eager, graphed = fit(torch.optim.Adam), fit(StandInGraphAdam)
    for step, (grad, eager_grad) in enumerate(zip(graphed, eager, strict=True)):
        torch.testing.assert_close(grad, eager_grad, rtol=0, atol=0, msg=f"step {step}")


def test_step_hooks_run_once_a_step():
    torch.optim.Adam([nn.Parameter(torch.zeros(1))]).step()  # wraps Adam.step in torch's hooks
    calls = []

    def count(optimizer, *_):
        calls.append(optimizer.step_captures)

    hook = register_optimizer_step_pre_hook(count)
    try:
        fit_tiny_model(StandInGraphAdam, steps=4)
    finally:
        hook.remove()
    assert calls == [0, 0, 1, 1]


def test_graphed_steps_zero_gradients_in_place():
    _, _, optimizer = fit_tiny_model(StandInGraphAdam, steps=2)
    grads = [p.grad for group in optimizer.param_groups for p in group["params"]]
    optimizer.zero_grad()  # set_to_none=True by default elsewhere
    assert all(grad is not None and not grad.any() for grad in grads)


def test_only_optimisers_with_a_capturable_mode_get_graphed_steps(caplog):
    parameters = list(nn.Linear(2, 2).parameters())
    for name in ("adam", "adamw", "rmsprop"):
        optimizer = make_optimizer(parameters, OptimConfig(name=name), graphed_steps=True)
        assert isinstance(optimizer, GraphedSteps) and optimizer.defaults["capturable"]
    with caplog.at_level(logging.INFO):
        sgd = make_optimizer(parameters, OptimConfig(name="sgd"), graphed_steps=True)
    assert type(sgd) is torch.optim.SGD
    assert "optim.name=sgd has no capturable mode" in caplog.text
    assert type(make_optimizer(parameters, OptimConfig())) is torch.optim.Adam


def test_on_the_cpu_the_sequence_model_steps_eagerly():
    model, _ = build("lstm", graphs=True, device="cpu")
    assert type(model.configure_optimizers()) is torch.optim.Adam


def train_with_the_models_optimizer(cell: str, graphs: bool, steps: int = 6):
    """Each step's gradient norm (before clipping: Adam's update would hide gradients off by a
    factor) and loss, and the optimiser."""
    model, data = build(cell, graphs, "cuda")
    optimizer = model.configure_optimizers()
    trace = []
    batches = iter(data.train_dataloader())
    model.train()
    for _ in range(steps):
        inputs, targets = (t.cuda() for t in next(batches)[:2])

        def closure(inputs=inputs, targets=targets) -> torch.Tensor:
            optimizer.zero_grad()
            loss = model.target.loss(model(inputs), targets)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            trace.append(norm.item())
            return loss

        trace.append(optimizer.step(closure).item())
    return trace, optimizer


@needs_cuda
@pytest.mark.parametrize("cell", CELLS)
def test_a_captured_update_gives_the_eager_gradients_and_losses(cell):
    eager, _ = train_with_the_models_optimizer(cell, graphs=False)
    graphed, optimizer = train_with_the_models_optimizer(cell, graphs=True)
    assert isinstance(optimizer, GraphedSteps)
    assert optimizer.step_graph is not None, f"not captured: {optimizer.eager_reason}"
    assert graphed == pytest.approx(eager, rel=1e-4, abs=1e-5)


def fit_with_lightning(
    graphs: bool, steps: int, device: str, optimizer_class=None, resume: str | None = None
):
    """Train losses of ``fwlab``'s LSTM sequence model fitted by Lightning for ``steps`` steps
    (``resume``: from that checkpoint), with gradient clipping, and the trainer; the model's own
    optimiser, or ``optimizer_class`` at lr 0.01."""
    import lightning as L

    class Losses(L.Callback):
        def __init__(self) -> None:
            self.values: list[float] = []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            self.values.append(outputs["loss"].item())

    model, data = build("lstm", graphs, "cpu")
    if optimizer_class is not None:
        model.configure_optimizers = lambda: optimizer_class(model.parameters(), lr=0.01)
    losses = Losses()
    trainer = L.Trainer(
        accelerator=device, devices=1, max_steps=steps, gradient_clip_val=1.0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=[losses],
    )  # fmt: skip
    torch.manual_seed(1)  # the data order
    trainer.fit(model, datamodule=data, ckpt_path=resume)
    return losses.values, trainer


def assert_lightning_follows_eager(tmp_path, device: str, graphed_class=None, eager_class=None):
    """Lightning's loop (its closure, zero_grad and gradient clipping) around a graphed update,
    and a resume from a checkpoint of it, give eager training's losses: each fitted for 6 steps,
    saved, and resumed to step 10."""

    def fit_save_resume(graphs: bool, optimizer_class) -> list[float]:
        before, trainer = fit_with_lightning(graphs, 6, device, optimizer_class)
        checkpoint = str(tmp_path / f"graphs={graphs}.ckpt")
        trainer.save_checkpoint(checkpoint)
        optimizers = [trainer.optimizers[0]]
        after, trainer = fit_with_lightning(graphs, 10, device, optimizer_class, checkpoint)
        for optimizer in [*optimizers, trainer.optimizers[0]] if graphs else []:
            assert optimizer.step_graph is not None, optimizer.eager_reason
        return before + after

    eager = fit_save_resume(False, eager_class)
    assert len(eager) == 10
    assert fit_save_resume(True, graphed_class) == pytest.approx(eager, rel=1e-4, abs=1e-5)


def test_lightning_training_and_resuming_with_a_stand_in_graph_follow_eager(tmp_path):
    assert_lightning_follows_eager(tmp_path, "cpu", StandInGraphAdam, torch.optim.Adam)


@needs_cuda
def test_lightning_training_and_resuming_with_graphs_follow_eager(tmp_path):
    assert_lightning_follows_eager(tmp_path, "gpu")
