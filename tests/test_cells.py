"""Every registered cell, driven by the registry: later cells are covered without new tests."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fwlab.cell import Cell, check_output_width
from fwlab.config import compose
from fwlab.errors import IncompatibleError
from fwlab.registry import Registry
from fwlab.training import build_model_and_data

REGISTRY = Registry()
CELL_NAMES = REGISTRY.names("cell")


def small_config(cell_cls: type[Cell], hidden_size: int, largest: int = 4):
    """The cell's default config with every integer size capped at ``largest`` (memories,
    heads, statistics slots), so the tests stay small for any future cell."""
    config = cell_cls.Config(hidden_size=hidden_size)
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if type(value) is int and field.name != "hidden_size" and value > largest:
            setattr(config, field.name, largest)
    return config


def make(name: str, input_size: int = 3, hidden_size: int = 4) -> Cell:
    torch.manual_seed(0)
    cell_cls = REGISTRY.get("cell", name)
    return cell_cls(input_size, small_config(cell_cls, hidden_size))


def test_the_built_in_cells_are_registered():
    assert {"lstm", "fast_weights"} <= set(CELL_NAMES)


@pytest.mark.parametrize("name", CELL_NAMES)
def test_config_is_a_dataclass_with_a_hidden_size(name):
    config_cls = REGISTRY.get("cell", name).Config
    assert dataclasses.is_dataclass(config_cls)
    assert "hidden_size" in {f.name for f in dataclasses.fields(config_cls)}


@pytest.mark.parametrize("name", CELL_NAMES)
def test_shapes_and_named_tuple_state(name):
    cell = make(name)
    outputs, state = cell(torch.randn(2, 5, 3))
    assert outputs.shape == (2, 5, cell.output_size)
    assert isinstance(state, tuple) and hasattr(state, "_fields")
    assert all(part.shape[0] == 2 for part in state)
    assert torch.isfinite(outputs).all()


@pytest.mark.parametrize("name", CELL_NAMES)
def test_whole_sequence_equals_step_by_step(name):
    cell = make(name).double()
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    whole, final = cell(x)
    state = cell.initial_state(2, dtype=torch.float64)
    steps = []
    for t in range(6):
        output, state = cell.step(x[:, t], state)
        steps.append(output)
    torch.testing.assert_close(whole, torch.stack(steps, 1), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final.h if hasattr(final, "h") else final[0], state[0])


@pytest.mark.parametrize("name", CELL_NAMES)
def test_every_parameter_gets_a_gradient(name):
    cell = make(name)
    outputs, _ = cell(torch.randn(3, 5, 3))
    outputs.pow(2).sum().backward()
    for parameter_name, parameter in cell.named_parameters():
        assert parameter.grad is not None, parameter_name
        assert parameter.grad.abs().sum() > 0, parameter_name


@pytest.mark.parametrize("name", CELL_NAMES)
def test_gradient_check_float64(name):
    cell = make(name, input_size=2, hidden_size=3).double()
    names = [n for n, _ in cell.named_parameters()]
    x = torch.randn(2, 3, 2, dtype=torch.float64, requires_grad=True)
    parameters = [p.detach().clone().requires_grad_(True) for p in cell.parameters()]

    def function(x, *values):
        return torch.func.functional_call(cell, dict(zip(names, values)), (x,))[0]

    assert torch.autograd.gradcheck(function, (x, *parameters), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", CELL_NAMES)
def test_mixed_precision_autocast_trains_and_stays_near_float32(name):
    """Under bfloat16 autocast (``trainer.precision=bf16-mixed``) a cell runs forward and
    backward, every parameter gets a finite gradient, and the outputs stay within bfloat16's
    precision of the float32 ones (also on CPUs whose oneDNN has no bfloat16 LSTM, where
    ``lstm`` falls back to float32)."""
    cell = make(name)
    x = torch.randn(3, 5, 3)
    reference, _ = cell(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs, _ = cell(x)
    outputs.float().pow(2).sum().backward()
    torch.testing.assert_close(outputs.float(), reference, rtol=0.05, atol=0.05)
    for parameter_name, parameter in cell.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), parameter_name


@pytest.mark.parametrize("name", CELL_NAMES)
def test_the_output_width_check_passes_and_leaves_the_cell_as_it_was(name):
    cell = make(name)
    before = {key: value.clone() for key, value in cell.state_dict().items()}
    check_output_width(cell, name)  # one eval-mode step: no statistics or noise of training
    assert cell.training
    for key, value in cell.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_a_cell_whose_outputs_are_not_output_size_wide_is_refused_as_the_model_is_built():
    class Wider(Cell):
        """A plugin's mistake: outputs 3 wider than hidden_size, output_size not overridden."""

        def __init__(self, input_size: int, config) -> None:
            super().__init__(input_size, config)
            self.weights = torch.nn.Linear(input_size, config.hidden_size + 3)

        def initial_state(self, batch_size, device=None, dtype=None):
            return (torch.zeros(batch_size, self.hidden_size, device=device, dtype=dtype),)

        def step(self, x_t, state):
            return self.weights(x_t), state

    registry = Registry()
    registry.add("cell", "wider", Wider, "this test")
    config = compose(registry, model="wider", data="retrieval", overrides=["model.hidden_size=5"])
    with pytest.raises(IncompatibleError, match=r"cell wider: step\(\) returned outputs of shape"):
        build_model_and_data(config, registry)
