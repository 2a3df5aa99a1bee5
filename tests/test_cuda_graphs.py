"""CUDA-graph capture of the sequence model: the same losses and outputs as eager execution.

The capture needs a CUDA device; elsewhere these tests are skipped, except the check that the
switch leaves CPU runs eager and unchanged.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fwlab.config import compose
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
    eager, _ = train_losses(cell, graphs=False, device="cuda")
    graphed, model = train_losses(cell, graphs=True, device="cuda")
    assert model.graphs.training_graph is not None, f"not captured: {model.graphs.reported}"
    assert graphed == pytest.approx(eager, rel=1e-4, abs=1e-5)


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


def test_on_the_cpu_the_switch_changes_nothing():
    (on, model), (off, _) = (
        train_losses("lstm", True, "cpu", 3),
        train_losses("lstm", False, "cpu", 3),
    )
    assert on == off and model.graphs.training_graph is None


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
