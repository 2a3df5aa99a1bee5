"""Every fused (Triton) path against the cell's PyTorch reference, in outputs and gradients.

On a GPU the kernels run natively; elsewhere in Triton's CPU interpreter (conftest sets
``TRITON_INTERPRET=1``), so the same kernel code is checked on every machine. A cell with a
fused path is one row of ``FUSED``; the tests below cover each row.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fwlab.errors import ConfigError
from fwlab.registry import Registry

from .conftest import autograd_node_names

pytest.importorskip("triton", reason="the fused kernels need the triton package")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (cell, config overrides, the widest hidden size its kernel takes in float64 and IEEE float32):
# the cells whose config has ``kernel`` with a Triton path
FUSED = [
    ("irnn", {"input_init_std": 0.5}, 128),
    ("fast_weights", {"form": "memory"}, 256),  # inner_steps > 1: test_fast_weights.py
    ("bn_lstm", {}, 64),  # in float64; evaluation, shared statistics slots: test_bn_lstm.py
    # a memory whose sizes are not powers of two (the paper's 128 x 40, R = 4: test_lru_ntm.py)
    ("lru_ntm", {"memory_slots": 12, "memory_width": 5, "read_heads": 3}, 100),
    # the same memory writing an add vector: a kernel of its own (ADD, a compile-time constant)
    (
        "lru_ntm",
        {"memory_slots": 12, "memory_width": 5, "read_heads": 3, "write_vector": "add"},
        100,
    ),
]
# (batch, steps, inputs, hidden): a batch that is not a whole number of tiles, a hidden size
# that is not a power of two, one step, and (hidden 0) the widest hidden size the kernel takes
SHAPES = [(19, 7, 3, 20), (2, 1, 2, 3), (5, 4, 6, 0)]


def label(name: str, overrides: dict, widest: int) -> str:
    """A row's name in test ids: the cell, and the written vector where the row sets one."""
    return "-".join([name, *([overrides["write_vector"]] if "write_vector" in overrides else [])])


@pytest.fixture
def ieee_float32():
    """IEEE float32 products in torch and the kernels for one test (a run sets ``high``)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


def pair(name: str, overrides: dict, inputs: int, hidden: int, dtype=torch.float64, spread=1.0):
    """The same cell twice: the PyTorch reference and the Triton path, equal weights."""
    cell_cls = Registry().get("cell", name)
    torch.manual_seed(0)
    config = cell_cls.Config(hidden_size=hidden, kernel="torch", **overrides)
    reference = cell_cls(inputs, config).to(DEVICE, dtype)
    with torch.no_grad():  # off the identity init, so every weight matters (but no blow-up)
        for parameter in reference.parameters():
            parameter.add_(spread * torch.randn_like(parameter) / hidden**0.5)
    fused = cell_cls(inputs, dataclasses.replace(config, kernel="triton")).to(DEVICE, dtype)
    fused.load_state_dict(reference.state_dict())
    return reference, fused


def made_by_a_fused_node(tensor: torch.Tensor) -> bool:
    """Whether a Triton node (``Fused…``) made ``tensor``."""
    return any("Fused" in name for name in autograd_node_names(tensor))


def outputs_and_gradients(cell, x, h0):
    state = cell.initial_state(x.shape[0], x.device, x.dtype)._replace(h=h0)
    outputs, final = cell(x, state)
    loss = (outputs * torch.linspace(-1, 1, outputs.shape[-1], device=x.device)).pow(2).sum()
    loss = loss + final.h.sum()  # the final state is differentiated too
    gradients = torch.autograd.grad(loss, [x, h0, *cell.parameters()])
    return outputs, gradients


# (cell, shape) cases that take over 10 s in Triton's interpreter: slow there. The LRU-NTM's
# kernel runs one program per sequence, so its 19-sequence case checks nothing that its
# 5-sequence one does not.
SLOW_IN_INTERPRETER = {("lru_ntm", (19, 7, 3, 20))} if DEVICE == "cpu" else set()


@pytest.mark.parametrize(
    "name, overrides, widest, shape",
    [
        pytest.param(
            *row,
            shape,
            id=f"{'x'.join(map(str, shape))}-{label(*row)}",
            marks=[pytest.mark.slow] if (row[0], shape) in SLOW_IN_INTERPRETER else [],
        )
        for row in FUSED
        for shape in SHAPES
    ],
)
def test_fused_path_matches_the_reference_in_float64(name, overrides, widest, shape):
    batch, steps, inputs, hidden = shape
    hidden = hidden or widest
    reference, fused = pair(name, overrides, inputs, hidden)
    x = torch.randn(batch, steps, inputs, device=DEVICE, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(batch, hidden, device=DEVICE, dtype=torch.float64, requires_grad=True)
    expected, expected_gradients = outputs_and_gradients(reference, x, h0)
    actual, actual_gradients = outputs_and_gradients(fused, x, h0)
    assert made_by_a_fused_node(actual)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)
    for got, want in zip(actual_gradients, expected_gradients):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


# rows whose gradient check takes tens of seconds in Triton's interpreter (BN-LSTM: 40 s, for
# its ~110 weights; LRU-NTM: ~170 s, ~400): slow there; the float64 comparison above holds them
# to their reference
SLOW_GRADIENT_CHECK = {"bn_lstm", "lru_ntm"} if DEVICE == "cpu" else set()


@pytest.mark.parametrize(
    "name, overrides, widest",
    [
        pytest.param(
            *row, id=label(*row), marks=[pytest.mark.slow] if row[0] in SLOW_GRADIENT_CHECK else []
        )
        for row in FUSED
    ],
)
def test_fused_path_passes_a_float64_gradient_check(name, overrides, widest):
    _, fused = pair(name, overrides, inputs=2, hidden=3)
    names = [n for n, _ in fused.named_parameters()]
    parameters = [p.detach().clone().requires_grad_(True) for p in fused.parameters()]
    x = torch.randn(2, 2, 2, device=DEVICE, dtype=torch.float64, requires_grad=True)

    def function(x, *values):
        return torch.func.functional_call(fused, dict(zip(names, values)), (x,))[0]

    assert torch.autograd.gradcheck(function, (x, *parameters), eps=1e-6, atol=1e-6)


@pytest.mark.skipif(DEVICE != "cuda", reason="float32 kernels are checked natively, on CUDA")
@pytest.mark.parametrize("name, overrides, widest", FUSED)
def test_fused_float32_is_as_accurate_as_the_pytorch_float32_loop(
    name, overrides, widest, ieee_float32
):
    """Over 200 steps float32 results drift from exact ones (rounding amplified through the
    recurrence, ReLUs flipping near 0), differently in any two summation orders; so each float32
    path is measured against the float64 reference, and the kernel's error must stay within a
    small multiple of the PyTorch loop's own."""
    hidden = min(100, widest)
    reference, fused = pair(name, overrides, 100, hidden, dtype=torch.float32, spread=0.05)
    exact = pair(name, overrides, 100, hidden, dtype=torch.float64, spread=0.05)[0]
    x = torch.randn(64, 200, 100, device=DEVICE, dtype=torch.float64, requires_grad=True)
    h0 = torch.zeros(64, hidden, device=DEVICE, dtype=torch.float64, requires_grad=True)
    x32, h32 = (t.detach().float().requires_grad_(True) for t in (x, h0))

    def flat(cell, *inputs):  # the outputs, then every gradient
        outputs, gradients = outputs_and_gradients(cell, *inputs)
        return [outputs, *gradients]

    exact_values = flat(exact, x, h0)
    errors = {
        path: [(got.double() - want).abs().max().item()
               for got, want in zip(flat(cell, x32, h32), exact_values)]
        for path, cell in (("torch", reference), ("fused", fused))
    }  # fmt: skip
    for index, (fused_error, torch_error) in enumerate(zip(errors["fused"], errors["torch"])):
        assert fused_error <= 10 * torch_error + 1e-5, index


@pytest.mark.parametrize("name, overrides, widest", FUSED)
def test_auto_uses_the_reference_on_the_cpu_and_forcing_says_what_is_missing(
    name, overrides, widest, monkeypatch
):
    cell_cls = Registry().get("cell", name)
    cell = cell_cls(3, cell_cls.Config(hidden_size=4, kernel="auto"))
    outputs, _ = cell(torch.randn(2, 3, 3))
    assert not made_by_a_fused_node(outputs)  # auto: natively only, on CUDA
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not torch.cuda.is_available():  # no kernel can run here: refused as the cell is built
        with pytest.raises(ConfigError, match="model.kernel=triton: needs (a CUDA GPU|the triton)"):
            cell_cls(3, cell_cls.Config(hidden_size=4, kernel="triton"))
        return
    forced = cell_cls(3, cell_cls.Config(hidden_size=4, kernel="triton"))
    with pytest.raises(RuntimeError, match="needs CUDA, or TRITON_INTERPRET=1"):
        forced(torch.randn(2, 3, 3))  # a CPU tensor on a machine with a GPU


def test_autos_choice_on_cuda_is_logged_once_with_its_reason(caplog):
    from types import SimpleNamespace

    from fwlab_plugins.cells import kernels

    on_cuda = SimpleNamespace(is_cuda=True, device="cuda:0")  # only where it lives is read
    kernels._reported.clear()
    with caplog.at_level("INFO"):
        ieee = "float32 products in IEEE precision (float32_matmul_precision=highest)"
        assert not kernels.use_triton("auto", on_cuda, fits=True, slower=ieee, cell="irnn")
        assert not kernels.use_triton("auto", on_cuda, fits=True, slower=ieee, cell="irnn")
        assert not kernels.use_triton("auto", on_cuda, fits=False, slower=None, cell="irnn")
        assert kernels.use_triton("auto", on_cuda, fits=True, slower=None, cell="irnn")
    messages = [r.getMessage() for r in caplog.records if "fwlab: kernels" in r.getMessage()]
    assert messages == [
        "fwlab: kernels: irnn: plain PyTorch loop (slower here: float32 products in IEEE "
        "precision (float32_matmul_precision=highest))",
        "fwlab: kernels: irnn: plain PyTorch loop (the shape or dtype is beyond the kernel)",
        "fwlab: kernels: irnn: Triton kernel",
    ]
