"""Fast weights against a naive float64 reference of Ba et al. (2016), eqs. 1-2."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from fwlab.saved_memory import saved_for_backward_bytes
from fwlab_plugins.cells.fast_weights import (
    FastWeightsCell,
    FastWeightsConfig,
    FastWeightsForm,
    FastWeightsMatrixState,
    FastWeightsMemoryState,
)
from fwlab_plugins.cells.fast_weights_sequence import FastWeightsMemorySequence

CUDA = torch.cuda.is_available()
TRITON = importlib.util.find_spec("triton") is not None
# the fused memory form's two implementations: the PyTorch node and the Triton kernel (which
# runs in Triton's CPU interpreter off CUDA: conftest sets TRITON_INTERPRET=1)
KERNELS = [
    "torch",
    pytest.param("triton", marks=pytest.mark.skipif(not TRITON, reason="no triton")),
]


def make_cell(input_size=3, hidden_size=5, **overrides) -> FastWeightsCell:
    torch.manual_seed(0)
    cell = FastWeightsCell(input_size, FastWeightsConfig(hidden_size=hidden_size, **overrides))
    with torch.no_grad():  # move off the identity/zero init so every term matters
        for parameter in cell.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    return cell.double()


def naive_reference(cell: FastWeightsCell, x: torch.Tensor) -> torch.Tensor:
    """The paper's equations, one sample and one matrix product at a time, in float64."""
    config = cell.config
    W = cell.recurrent_weights.weight.detach()
    C = cell.input_weights.weight.detach()
    b = cell.input_weights.bias.detach()
    outputs = torch.zeros(x.shape[0], x.shape[1], config.hidden_size, dtype=torch.float64)
    for n in range(x.shape[0]):
        h = torch.zeros(config.hidden_size, dtype=torch.float64)
        A = torch.zeros(config.hidden_size, config.hidden_size, dtype=torch.float64)
        for t in range(x.shape[1]):
            A = config.decay * A + config.fast_learning_rate * torch.outer(h, h)  # eq. 1
            z = W @ h + C @ x[n, t] + b
            h_s = torch.relu(z)  # h_0(t+1)
            for _ in range(config.inner_steps):
                v = z + A @ h_s
                if config.layer_norm:  # over the hidden units of this one sample
                    ln = cell.layer_norm
                    mean, var = v.mean(), v.var(unbiased=False)
                    v = (v - mean) / torch.sqrt(
                        var + ln.eps
                    ) * ln.weight.detach() + ln.bias.detach()
                h_s = torch.relu(v)
            h = h_s
            outputs[n, t] = h
    return outputs


CASES = [
    dict(),
    dict(inner_steps=3),
    dict(layer_norm=False, decay=0.9),
    dict(fast_learning_rate=0.0),
]


@pytest.mark.parametrize("form", ["matrix", "memory"])
@pytest.mark.parametrize("overrides", CASES, ids=str)
def test_matches_naive_reference(form, overrides):
    cell = make_cell(form=form, **overrides)
    x = torch.randn(4, 7, 3, dtype=torch.float64)
    outputs, _ = cell(x)
    torch.testing.assert_close(outputs, naive_reference(cell, x), rtol=1e-10, atol=1e-10)


def test_hand_checked_first_steps():
    """H = 1, no LN, W = 0, C = 1, b = 0, λ = 0.5, η = 1, S = 1:
    h(1) = relu(x0) = 2;  A = 0.5·0 + 1·2·2 = 4;  z = 1,  h_0 = 1,  h(2) = relu(1 + 4·1) = 5."""
    cell = FastWeightsCell(
        1,
        FastWeightsConfig(
            hidden_size=1,
            layer_norm=False,
            decay=0.5,
            fast_learning_rate=1.0,
            recurrent_init_scale=0.0,
        ),
    )
    with torch.no_grad():
        cell.input_weights.weight.fill_(1.0)
    outputs, _ = cell(torch.tensor([[[2.0], [1.0]]]))
    assert outputs.flatten().tolist() == [2.0, 5.0]


@pytest.mark.parametrize("overrides", CASES, ids=str)
def test_matrix_form_equals_memory_form(overrides):
    matrix = make_cell(form="matrix", **overrides)
    memory = make_cell(form="memory", **overrides)
    x = 0.2 * torch.randn(3, 12, 3, dtype=torch.float64)  # small: without LN, A h grows fast
    out_matrix, state_matrix = matrix(x)
    out_memory, state_memory = memory(x)
    assert torch.isfinite(out_matrix).all() and out_matrix.abs().max() > 0
    torch.testing.assert_close(out_matrix, out_memory, rtol=1e-10, atol=1e-10)
    # The final fast weights agree too: A(T) = η Σ λ^{T-τ} h(τ)h(τ)ᵀ rebuilt from the memory,
    # plus h(T) itself, which the matrix adds on the next step.
    assert isinstance(state_matrix, FastWeightsMatrixState)
    assert isinstance(state_memory, FastWeightsMemoryState)
    cfg = matrix.config
    memory_states = torch.cat([state_memory.memory, state_memory.h.unsqueeze(1)], dim=1)
    powers = cfg.decay ** torch.arange(memory_states.shape[1] - 1, -1, -1, dtype=torch.float64)
    rebuilt = cfg.fast_learning_rate * torch.einsum(
        "n,bni,bnj->bij", powers, memory_states, memory_states
    )
    expected = cfg.decay * state_matrix.fast_weights + cfg.fast_learning_rate * torch.einsum(
        "bi,bj->bij", state_matrix.h, state_matrix.h
    )
    torch.testing.assert_close(rebuilt, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("form", ["matrix", "memory", "auto"])
def test_whole_sequence_equals_step_by_step(form):
    cell = make_cell(form=form, inner_steps=2)
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    whole, _ = cell(x)
    state = cell.initial_state(2, dtype=torch.float64, seq_len=6)
    steps = []
    for t in range(6):
        output, state = cell.step(x[:, t], state)
        steps.append(output)
    torch.testing.assert_close(whole, torch.stack(steps, dim=1), rtol=1e-12, atol=1e-12)


def test_continuing_from_a_state_equals_one_long_sequence():
    cell = make_cell(form="matrix")
    x = torch.randn(2, 8, 3, dtype=torch.float64)
    whole, _ = cell(x)
    first, state = cell(x[:, :5])
    second, _ = cell(x[:, 5:], state)
    torch.testing.assert_close(torch.cat([first, second], 1), whole, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("form", ["matrix", "memory"])
def test_gradient_check(form):
    cell = make_cell(input_size=2, hidden_size=3, form=form, inner_steps=2)
    x = torch.randn(2, 4, 2, dtype=torch.float64, requires_grad=True)
    params = tuple(cell.parameters())

    def function(x, *parameters):
        for parameter, value in zip(params, parameters):
            parameter.data = value
        return torch.func.functional_call(
            cell, {n: p for (n, _), p in zip(cell.named_parameters(), parameters)}, (x,)
        )[0]

    inputs = (x, *[p.detach().clone().requires_grad_(True) for p in params])
    assert torch.autograd.gradcheck(function, inputs, eps=1e-6, atol=1e-6)


def test_auto_picks_the_cheaper_form():
    cell = FastWeightsCell(4, FastWeightsConfig(hidden_size=100, form="auto"))
    assert cell.resolve_form(11).value == "memory"  # short sequence: attention over 11 states
    assert cell.resolve_form(784).value == "memory"  # fused: measured faster, and O(T·H)
    assert cell.resolve_form(2000).value == "matrix"  # long sequence: a 100×100 matrix
    assert cell.resolve_form(None).value == "matrix"  # any length: constant cost per step
    stepwise = FastWeightsCell(4, FastWeightsConfig(hidden_size=100, recurrence="stepwise"))
    assert stepwise.resolve_form(784).value == "matrix"  # its memory form keeps O(T²·H)
    assert isinstance(cell.initial_state(2, seq_len=11), FastWeightsMemoryState)
    assert isinstance(cell.initial_state(2, seq_len=2000), FastWeightsMatrixState)


def test_layer_norm_is_per_sample_not_over_the_batch():
    """A sample's output must not depend on the rest of its batch."""
    cell = make_cell()
    x = torch.randn(5, 6, 3, dtype=torch.float64)
    together, _ = cell(x)
    alone, _ = cell(x[2:3])
    torch.testing.assert_close(together[2:3], alone, rtol=1e-12, atol=1e-12)


def test_recurrent_weights_start_at_the_scaled_identity():
    cell = FastWeightsCell(3, FastWeightsConfig(hidden_size=4, recurrent_init_scale=0.05))
    torch.testing.assert_close(cell.recurrent_weights.weight, 0.05 * torch.eye(4))


# (form, recurrence): the memory form has a fused node and its stepwise autograd reference
FORMS = [("matrix", "fused"), ("memory", "stepwise"), ("memory", "fused")]


@pytest.mark.parametrize("form, recurrence", FORMS)
def test_checkpointed_chunks_give_the_same_outputs_and_gradients(form, recurrence):
    """Recomputing each chunk of 4 steps in the backward pass: float64 outputs, input and
    parameter gradients equal to the plain unroll's."""
    x = torch.randn(2, 13, 3, dtype=torch.float64, requires_grad=True)  # 13: a ragged last chunk
    results = []
    for every in (0, 4):
        cell = make_cell(form=form, recurrence=recurrence, checkpoint_every=every)
        outputs, state = cell(x)
        weights = torch.randn_like(outputs, generator=torch.Generator().manual_seed(0))
        gradients = torch.autograd.grad((outputs * weights).sum(), [x, *cell.parameters()])
        results.append((outputs.detach(), state.h.detach(), gradients))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])
    for plain, chunked in zip(results[0][2], results[1][2]):
        torch.testing.assert_close(plain, chunked)


@pytest.mark.parametrize("form, recurrence", FORMS[:2])
def test_checkpointed_chunks_keep_less_for_backward(form, recurrence):
    x = torch.randn(4, 64, 3, dtype=torch.float64)
    plain_bytes = saved_for_backward_bytes(lambda: make_cell(form=form, recurrence=recurrence)(x))
    chunked_bytes = saved_for_backward_bytes(
        lambda: make_cell(form=form, recurrence=recurrence, checkpoint_every=8)(x)
    )
    assert chunked_bytes < plain_bytes / 2


def test_fused_memory_form_keeps_storage_linear_in_the_length():
    """The fused memory form keeps the states and per-step activations, O(T·H), where autograd
    through the steps keeps every step's copy of the growing memory, O(T²·H)."""

    def kept(steps: int, recurrence: str) -> int:
        x = torch.randn(4, steps, 3, dtype=torch.float64)
        cell = make_cell(hidden_size=8, form="memory", recurrence=recurrence)
        return saved_for_backward_bytes(lambda: cell(x))

    assert kept(64, "fused") < 2.1 * kept(32, "fused")  # linear (plus the fixed weights)
    assert kept(64, "stepwise") > 3 * kept(32, "stepwise")  # quadratic
    assert kept(64, "fused") < kept(64, "stepwise") / 5


def run_memory_form(recurrence: str, x: torch.Tensor, continued: bool, **overrides):
    """Outputs, final state and the gradients of x, h_0, the memory and every parameter, for a
    sequence started fresh or continued from the state an earlier sequence left."""
    cell = make_cell(form="memory", recurrence=recurrence, **overrides).to(x.device)
    state = cell.initial_state(x.shape[0], x.device, x.dtype, seq_len=x.shape[1])
    if continued:
        torch.manual_seed(1)
        earlier = torch.randn(x.shape[0], 3, x.shape[2], dtype=x.dtype, device=x.device)
        _, state = cell(earlier, state)
    h0 = state.h.detach().requires_grad_(True)
    memory0 = state.memory.detach().requires_grad_(True)
    inputs = x.clone().requires_grad_(True)
    outputs, final = cell(inputs, type(state)(h0, memory0))
    weights = torch.linspace(-1, 2, outputs.shape[-1], dtype=x.dtype, device=x.device)
    loss = (outputs * weights).pow(2).sum() + final.memory.pow(3).sum() + final.h.sum()
    gradients = torch.autograd.grad(loss, [inputs, h0, memory0, *cell.parameters()])
    return outputs, final, gradients


@pytest.mark.parametrize("overrides", CASES, ids=str)
@pytest.mark.parametrize("continued", [False, True], ids=["fresh", "continued"])
@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs CUDA"))],
)
@pytest.mark.parametrize("kernel", KERNELS)
def test_fused_memory_form_matches_the_stepwise_reference(overrides, continued, device, kernel):
    """Float64: outputs, the final state (h and the memory) and every gradient, including those
    of the starting state, equal autograd through the step-by-step memory form, for the PyTorch
    node and the Triton kernel alike."""
    if kernel == "triton" and device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("off CUDA the kernel runs in Triton's interpreter, set only without a GPU")
    x = torch.randn(3, 6, 3, dtype=torch.float64).to(device)
    fused = run_memory_form("fused", x, continued, kernel=kernel, **overrides)
    stepwise = run_memory_form("stepwise", x, continued, **overrides)
    torch.testing.assert_close(fused[0], stepwise[0], rtol=1e-10, atol=1e-10)
    for got, want in zip(fused[1], stepwise[1], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for got, want in zip(fused[2], stepwise[2], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    "overrides, key",
    [
        (dict(form="matrix"), "model.form=matrix"),
        (dict(recurrence="stepwise"), "model.recurrence=stepwise"),
    ],
    ids=["matrix", "stepwise"],
)
def test_forcing_the_kernel_outside_the_fused_memory_form_names_the_setting(overrides, key):
    with pytest.raises(ValueError, match=key):
        make_cell(kernel="triton", **overrides)


def test_forcing_the_kernel_makes_auto_take_the_memory_form_at_any_length():
    """auto alone takes the matrix form from 32 steps here; the kernel runs only the memory
    form, so asking for the kernel makes auto take that form."""
    assert make_cell(hidden_size=2).resolve_form(40) is FastWeightsForm.matrix
    assert make_cell(hidden_size=2, kernel="triton").resolve_form(40) is FastWeightsForm.memory


@pytest.mark.skipif(not TRITON, reason="no triton")
def test_the_forced_kernel_runs_a_sequence_auto_alone_would_run_in_the_matrix_form():
    """It used to fail at the first batch ("auto takes the matrix form"); it now runs the
    kernel, whose outputs and final state are the PyTorch node's."""
    device = "cuda" if CUDA else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("off CUDA the kernel runs in Triton's interpreter, set only without a GPU")
    forced = make_cell(hidden_size=2, kernel="triton").to(device)
    reference = make_cell(hidden_size=2, kernel="torch", form="memory").to(device)
    x = torch.randn(2, 40, 3, dtype=torch.float64, device=device)
    outputs, state = forced(x)
    assert isinstance(state, FastWeightsMemoryState) and state.memory.shape == (2, 40, 2)
    want_outputs, want_state = reference(x)
    torch.testing.assert_close(outputs, want_outputs, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state.memory, want_state.memory, rtol=1e-10, atol=1e-10)


def test_fused_memory_form_gradient_check_through_the_starting_state():
    """gradcheck of the node itself: input part, W, γ, β, h_0 and a non-empty memory."""
    torch.manual_seed(0)
    hidden = 3

    def tensor(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    inputs = (tensor(2, 3, hidden), tensor(hidden, hidden), tensor(hidden), tensor(hidden),
              tensor(2, hidden), tensor(2, 2, hidden))  # fmt: skip

    def node(*tensors: torch.Tensor) -> torch.Tensor:
        return FastWeightsMemorySequence.apply(*tensors, 0.9, 0.5, 2, True, 1e-5)

    assert torch.autograd.gradcheck(node, inputs, eps=1e-6, atol=1e-6)


def test_the_triton_kernel_takes_only_buffers_whose_offsets_int32_reaches():
    fast_weights_triton = pytest.importorskip("fwlab_plugins.cells.kernels.fast_weights_triton")
    weights = torch.empty(100, 100)
    # (B, M+T+1, H) states or (T, S, B, H) queries, whichever is larger
    assert fast_weights_triton.buffer_elements(2, 5, 3, memory=4, inner_steps=1) == 2 * 3 * 10
    assert fast_weights_triton.buffer_elements(2, 5, 3, memory=0, inner_steps=3) == 2 * 3 * 15
    assert fast_weights_triton.fits(weights, 100, 64 * 785 * 100)
    assert not fast_weights_triton.fits(weights, 100, 2**31)
    assert not fast_weights_triton.fits(weights, 257, 1)  # the state on chip
    assert not fast_weights_triton.fits(weights.half(), 100, 1)
