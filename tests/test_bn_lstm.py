"""BN-LSTM (Cooijmans et al. 2017): the equations, per-step statistics, population statistics."""

from __future__ import annotations

import pytest
import torch

from fwlab_plugins.cells import kernels
from fwlab_plugins.cells.bn_lstm import BNLSTMCell, BNLSTMConfig
from fwlab_plugins.cells.kernels import bn_lstm_cpu
from fwlab_plugins.cells.stepwise_batch_norm import StepwiseBatchNorm

from .conftest import made_by, on_threads

CUDA = torch.cuda.is_available()


def make(hidden=4, inputs=3, **overrides) -> BNLSTMCell:
    torch.manual_seed(0)
    cell = BNLSTMCell(inputs, BNLSTMConfig(hidden_size=hidden, **overrides)).double()
    with torch.no_grad():  # move γ, β, b off their init so every term is exercised
        for name, parameter in cell.named_parameters():
            if "norm" in name or name == "bias":
                parameter.add_(0.3 * torch.randn_like(parameter))
    return cell


def batch_norm(x, gamma, beta, eps=1e-5):
    mean = x.mean(0)
    var = ((x - mean) ** 2).mean(0)
    return gamma * (x - mean) / torch.sqrt(var + eps) + beta


def test_training_mode_matches_the_papers_equations_in_float64():
    cell = make()
    x = torch.randn(5, 4, 3, dtype=torch.float64)
    outputs, _ = cell(x)
    W_x, W_h = cell.input_weights.detach(), cell.recurrent_weights.detach()
    b = cell.bias.detach()
    g_h, g_x = cell.recurrent_norm.weight.detach(), cell.input_norm.weight.detach()
    g_c, b_c = cell.cell_norm.weight.detach(), cell.cell_norm.bias.detach()
    h = torch.zeros(5, 4, dtype=torch.float64)
    c = torch.zeros(5, 4, dtype=torch.float64)
    for t in range(4):  # statistics over the batch at this step only
        gates = batch_norm(h @ W_h.T, g_h, 0.0) + batch_norm(x[:, t] @ W_x.T, g_x, 0.0) + b
        f, i, o, g = gates.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(batch_norm(c, g_c, b_c))
        torch.testing.assert_close(outputs[:, t], h, rtol=1e-10, atol=1e-10)


def test_initialisation():
    cell = BNLSTMCell(3, BNLSTMConfig(hidden_size=4))
    for norm in (cell.recurrent_norm, cell.input_norm, cell.cell_norm):
        torch.testing.assert_close(norm.weight, torch.full_like(norm.weight, 0.1))  # γ = 0.1
    assert cell.recurrent_norm.bias is None and cell.input_norm.bias is None  # β fixed at 0
    assert torch.count_nonzero(cell.cell_norm.bias) == 0
    torch.testing.assert_close(cell.recurrent_weights, torch.eye(4).repeat(4, 1))  # identity
    W_x = cell.input_weights  # (16, 3): orthonormal columns
    torch.testing.assert_close(W_x.T @ W_x, torch.eye(3), atol=1e-5, rtol=1e-5)


def zero_started(batch=8, zeros=40, steps=60) -> torch.Tensor:
    """Pixel-like inputs whose first ``zeros`` steps are 0 in every sequence, as at the top of
    every MNIST digit."""
    torch.manual_seed(1)
    x = torch.rand(batch, steps, 1)
    x[:, :zeros] = 0
    return x


@pytest.mark.parametrize("kernel", ["torch", "auto"])
def test_initial_noise_keeps_the_gradient_finite_when_a_batch_starts_identical(kernel):
    """Identical states make the recurrent BN's batch variance zero, and its derivative γ/√ε
    compounds over the identical steps: the float32 gradient is not finite from the first batch.
    Noise in h_0, as the authors' code has for unpermuted sequential MNIST, keeps it finite."""

    def gradients(noise: float) -> list[torch.Tensor]:
        torch.manual_seed(0)
        cell = BNLSTMCell(1, BNLSTMConfig(hidden_size=8, initial_noise=noise, kernel=kernel))
        outputs, _ = cell(zero_started())
        outputs[:, -1].square().sum().backward()
        return [parameter.grad for parameter in cell.parameters()]

    assert not all(torch.isfinite(grad).all() for grad in gradients(0.0))  # why the option is
    assert all(torch.isfinite(grad).all() for grad in gradients(0.1))


def test_initial_noise_is_training_only():
    cell = make(hidden=8, inputs=1, initial_noise=0.1).float()
    x = zero_started()
    first, _ = cell(x)
    second, _ = cell(x)
    assert first[:, 0].std(dim=0).min() > 0  # identical inputs, different starting states
    assert not torch.equal(first, second)  # fresh noise for every batch
    quiet = make(hidden=8, inputs=1).float()
    quiet.load_state_dict(cell.state_dict())
    cell.eval(), quiet.eval()
    torch.testing.assert_close(cell(x)[0], quiet(x)[0], rtol=0, atol=0)  # evaluation: h_0 = 0


def train(cell, batches):
    cell.train()
    for x in batches:
        cell(x)


def test_eval_uses_population_statistics_so_samples_do_not_interact():
    cell = make()
    train(cell, [torch.randn(16, 6, 3, dtype=torch.float64) for _ in range(20)])
    cell.eval()
    a = torch.randn(4, 6, 3, dtype=torch.float64)
    b = torch.randn(7, 6, 3, dtype=torch.float64)
    together_a, _ = cell(a)
    together_b, _ = cell(b)
    for batch, together in ((a, together_a), (b, together_b)):
        for n in range(batch.shape[0]):
            alone, _ = cell(batch[n : n + 1])
            torch.testing.assert_close(together[n : n + 1], alone, rtol=1e-12, atol=1e-12)


def test_steps_beyond_the_longest_training_length_use_its_statistics():
    cell = make()
    train(cell, [torch.randn(8, 5, 3, dtype=torch.float64) for _ in range(5)])
    norm = cell.input_norm
    assert int(norm.trained_steps) == 5
    cell.eval()
    assert [norm.statistics_index(t) for t in (0, 4, 5, 9, 500)] == [0, 4, 4, 4, 4]
    x = torch.randn(3, 16, dtype=torch.float64)  # 4H features
    direct = (x - norm.running_mean[4]) / torch.sqrt(norm.running_var[4] + norm.eps) * norm.weight
    torch.testing.assert_close(norm(x, 9), direct)
    assert not torch.allclose(norm(x, 9), norm(x, 3))  # and step 3 has statistics of its own


def test_statistics_differ_per_step_when_the_scale_changes_over_time():
    cell = make(inputs=1)
    scale = torch.linspace(0.1, 10.0, 6, dtype=torch.float64).view(1, 6, 1)
    train(cell, [scale * torch.randn(32, 6, 1, dtype=torch.float64) for _ in range(30)])
    variances = cell.input_norm.running_var[:6].mean(dim=1)  # mean over features, per step
    assert torch.all(variances[1:] > variances[:-1]), variances  # grows with the input scale
    assert variances[5] / variances[0] > 100


def test_training_beyond_max_time_steps_shares_the_last_slot():
    cell = make(max_time_steps=3)
    train(cell, [torch.randn(4, 7, 3, dtype=torch.float64)])
    assert int(cell.input_norm.trained_steps) == 7
    cell.eval()
    assert cell.input_norm.statistics_index(6) == 2


def run_both(x, mode, state_from=None, kernel="auto", **overrides):
    """Outputs, final state, gradients and running statistics of the fused recurrence (its steps
    in ``kernel``) and of the stepwise reference, from the same weights and statistics (on
    ``x``'s device)."""
    results = []
    for recurrence, cell_kernel in (("fused", kernel), ("stepwise", "torch")):
        cell = make(recurrence=recurrence, kernel=cell_kernel, **overrides).to(x.device)
        cell.train(mode == "train")
        if mode == "eval":  # population statistics that differ per step
            cell.train()
            batches = [torch.randn(8, 5, 3, dtype=torch.float64) for _ in range(3)]
            train(cell, [batch.to(x.device) for batch in batches])
            cell.eval()
        inputs = x.clone().requires_grad_(True)
        state = (
            state_from(cell) if state_from else cell.initial_state(x.shape[0], x.device, x.dtype)
        )
        state = state._replace(h=state.h.requires_grad_(True), c=state.c.requires_grad_(True))
        outputs, final = cell(inputs, state)
        if recurrence == "fused" and kernel != "auto" and not (mode == "train" and x.shape[0] < 2):
            assert made_by(outputs, NODES[kernel])
        weights = torch.linspace(-1, 2, outputs.shape[-1], dtype=x.dtype, device=x.device)
        loss = (outputs * weights).pow(2).sum()
        loss = loss + (final.c * final.c).sum()
        gradients = torch.autograd.grad(loss, [inputs, state.h, state.c, *cell.parameters()])
        buffers = [b.clone() for b in cell.buffers()]
        results.append((outputs, final, gradients, buffers))
    return results


NO_C_KERNEL = bn_lstm_cpu.unavailable_reason(torch.device("cpu"), torch.float64)
C_KERNEL = pytest.mark.skipif(NO_C_KERNEL is not None, reason=f"no C kernel here: {NO_C_KERNEL}")
# the Triton kernels: natively on CUDA, else in Triton's CPU interpreter (conftest sets it)
TRITON_KERNEL = pytest.mark.skipif(
    not kernels.triton_installed(), reason="the Triton kernels need the triton package"
)
NODES = {"torch": "BNLSTMSequence", "c": "BNLSTMSequenceC", "triton": "FusedBNLSTM"}


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize(
    "batch, steps, max_time_steps",
    [(5, 4, 1024), (1, 3, 1024), (6, 7, 3)],  # plain; one sample; steps sharing the last slot
)
@pytest.mark.parametrize(
    "device, kernel",
    [
        ("cpu", "torch"),
        pytest.param("cpu", "c", marks=C_KERNEL),
        pytest.param("cuda" if CUDA else "cpu", "triton", marks=TRITON_KERNEL),
        pytest.param("cuda", "torch", marks=pytest.mark.skipif(not CUDA, reason="needs CUDA")),
    ],
)
def test_fused_recurrence_matches_the_stepwise_reference(
    mode, batch, steps, max_time_steps, device, kernel
):
    x = torch.randn(batch, steps, 3, dtype=torch.float64).to(device)
    fused, stepwise = run_both(x, mode, kernel=kernel, max_time_steps=max_time_steps)
    torch.testing.assert_close(fused[0], stepwise[0], rtol=1e-10, atol=1e-10)
    for got, want in zip(fused[1], stepwise[1]):  # h, c, time
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for got, want in zip(fused[2], stepwise[2]):  # x, h_0, c_0 and every parameter
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    for got, want in zip(fused[3], stepwise[3]):  # running statistics and T_max
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@TRITON_KERNEL
def test_the_triton_kernel_takes_only_what_one_program_holds_and_int32_offsets_reach():
    from fwlab_plugins.cells.kernels import bn_lstm_triton

    before = torch.get_float32_matmul_precision()
    try:  # W_h's (H, H) tile meets tl.dot in shared memory: 128 wide on tensor cores, ...
        torch.set_float32_matmul_precision("high")
        assert bn_lstm_triton.fits(128, 784, 128, torch.float32)
        assert not bn_lstm_triton.fits(129, 784, 128, torch.float32)  # the batch is one program
        assert not bn_lstm_triton.fits(128, 784, 129, torch.float32)
        assert not bn_lstm_triton.fits(128, 784, 128, torch.float16)
        assert not bn_lstm_triton.fits(128, 2**15, 128, torch.float32)  # B·T·4H = 2^31
        torch.set_float32_matmul_precision("highest")  # ... 64 with IEEE products
        assert bn_lstm_triton.fits(128, 784, 64, torch.float32)
        assert not bn_lstm_triton.fits(16, 784, 65, torch.float32)
    finally:
        torch.set_float32_matmul_precision(before)
    assert bn_lstm_triton.fits(128, 784, 64, torch.float64)
    assert not bn_lstm_triton.fits(16, 784, 65, torch.float64)
    with pytest.raises(ValueError, match="beyond the kernel"):
        make(hidden=65, kernel="triton")(torch.randn(2, 3, 3, dtype=torch.float64))


@TRITON_KERNEL
def test_a_program_that_outgrows_the_multiprocessor_fails_naming_the_key_and_the_shape():
    from triton.runtime.errors import OutOfResources

    from fwlab_plugins.cells.kernels import bn_lstm_triton

    with pytest.raises(ValueError, match=r"model.kernel=triton: .* B=64, H=100 .*shared memory"):
        with bn_lstm_triton._launching(torch.device("cpu"), 64, 100):
            raise OutOfResources(294912, 232448, "shared memory")  # as an H200 said at B=64


@pytest.mark.parametrize("kernel", ["c", "triton"])
def test_a_kernel_with_the_stepwise_recurrence_is_refused_naming_both_keys(kernel):
    """A kernel runs the fused node's steps: asking for one and for autograd through every step
    is a contradiction, refused when the cell is built."""
    with pytest.raises(ValueError, match=rf"model.kernel={kernel} .* model.recurrence=stepwise"):
        make(kernel=kernel, recurrence="stepwise")


@pytest.mark.parametrize(
    "kernel",
    ["torch", pytest.param("c", marks=C_KERNEL), pytest.param("triton", marks=TRITON_KERNEL)],
)
def test_fused_recurrence_continues_a_sequence_from_its_state(kernel):
    device = "cuda" if CUDA and kernel == "triton" else "cpu"  # Triton: natively where it can
    x = torch.randn(4, 3, 3, dtype=torch.float64).to(device)

    def later_state(cell):  # two steps in: statistics of steps 2.. are used next
        state = cell.initial_state(4, device, dtype=torch.float64)
        seeded = torch.Generator().manual_seed(1)
        first = torch.randn(4, 2, 3, dtype=torch.float64, generator=seeded)
        _, state = cell(first.to(device), state)
        return state._replace(h=state.h.detach(), c=state.c.detach())

    for mode in ("train", "eval"):
        fused, stepwise = run_both(x, mode, state_from=later_state, kernel=kernel)
        torch.testing.assert_close(fused[0], stepwise[0], rtol=1e-10, atol=1e-10)
        for got, want in zip(fused[2], stepwise[2]):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("learn_beta", [False, True])
@pytest.mark.parametrize("steps, max_time_steps", [(5, 8), (5, 3)])  # 3: steps share a slot
def test_sequence_batch_norm_with_a_shift_is_stepwise_norm_plus_the_shift(
    learn_beta, steps, max_time_steps
):
    """forward_sequence(x, start, shift) = [BN_t(x_t) + shift]_t, in outputs, statistics and
    gradients, both on its vectorised path and where steps share the last slot."""
    results = []
    x = torch.randn(6, steps, 4, dtype=torch.float64)
    for whole in (True, False):
        torch.manual_seed(0)
        norm = StepwiseBatchNorm(4, max_time_steps, learn_beta=learn_beta).double()
        with torch.no_grad():
            norm.weight.uniform_(0.5, 2.0)
            if learn_beta:
                norm.bias.uniform_(-1.0, 1.0)
        shift = torch.randn(4, dtype=torch.float64, requires_grad=True)
        inputs = x.clone().requires_grad_(True)
        if whole:
            out = norm.forward_sequence(inputs, 1, shift)
        else:
            out = torch.stack(
                [norm(x_t, 1 + t) + shift for t, x_t in enumerate(inputs.unbind(1))], 1
            )
        loss = (out * torch.linspace(-1, 2, 4, dtype=torch.float64)).pow(2).sum()
        grads = torch.autograd.grad(loss, [inputs, shift, *norm.parameters()])
        results.append((out, grads, [b.clone() for b in norm.buffers()]))
    (out, grads, buffers), (ref_out, ref_grads, ref_buffers) = results
    torch.testing.assert_close(out, ref_out)
    for got, want in zip([*grads, *buffers], [*ref_grads, *ref_buffers], strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize(
    "kernel",
    [
        pytest.param("c", marks=C_KERNEL),
        # ~3 minutes in Triton's interpreter; the default suite holds the kernel to the fused
        # PyTorch node instead (test_fused_recurrence_matches_the_stepwise_reference)
        pytest.param("triton", marks=[TRITON_KERNEL, pytest.mark.slow]),
    ],
)
def test_kernel_passes_gradcheck_in_float64(mode, kernel):
    device = "cuda" if CUDA and kernel == "triton" else "cpu"  # Triton: natively where it can
    cell = make(kernel=kernel).to(device)
    cell.train()
    train(cell, [torch.randn(6, 4, 3, dtype=torch.float64, device=device) for _ in range(2)])
    cell.train(mode == "train")
    x = torch.randn(3, 4, 3, dtype=torch.float64, device=device, requires_grad=True)
    h0, c0 = (
        torch.randn(3, 4, dtype=torch.float64, device=device, requires_grad=True) for _ in range(2)
    )
    params = list(cell.parameters())

    def run(x, h0, c0, *weights):
        with torch.nn.utils.stateless._reparametrize_module(  # weights as gradcheck's inputs
            cell, dict(zip([n for n, _ in cell.named_parameters()], weights))
        ):
            state = cell.initial_state(3, x.device, torch.float64)._replace(h=h0, c=c0)
            outputs, final = cell(x, state)
        assert made_by(outputs, NODES[kernel])
        return outputs, final.c

    torch.autograd.gradcheck(run, (x, h0, c0, *[p.detach().requires_grad_() for p in params]))


def c_kernel_and_reference(x: torch.Tensor, hidden: int) -> list[list[torch.Tensor]]:
    """Outputs, c_T and the gradients of x and every parameter, of the C node and of the
    stepwise reference in training, from the same weights, in ``x``'s dtype."""
    results = []
    for recurrence, kernel in (("fused", "c"), ("stepwise", "torch")):
        cell = make(hidden, recurrence=recurrence, kernel=kernel).to(x.dtype)
        inputs = x.clone().requires_grad_(True)
        outputs, final = cell(inputs)
        assert made_by(outputs, "BNLSTMSequenceC") == (kernel == "c")
        weights = torch.linspace(-1, 2, hidden, dtype=x.dtype)
        loss = (outputs * weights).pow(2).sum() + final.c.pow(2).sum()
        gradients = torch.autograd.grad(loss, [inputs, *cell.parameters()])
        results.append([outputs, final.c, *gradients])
    return results


@C_KERNEL
@pytest.mark.parametrize(
    ("batch", "hidden", "dtype"),
    [
        (7, 13, torch.float64),
        (5, 25, torch.float64),
        (8, 25, torch.float32),
        (6, 3, torch.float32),
    ],
)
def test_c_kernel_matches_the_reference_for_any_batch_and_hidden_size(batch, hidden, dtype):
    """The C pass's recurrent products (step_products.h) take the result's columns by panels of
    three vectors (12 in float64, 24 in float32), the last one partial, and the batch by blocks
    of 4 rows, then 1 to 3 rows alone: between them these cases have whole and partial panels in
    both products (4H columns forward, H backward; H = 3 has no whole one) and 3, 1, 0 and 2
    rows left over."""
    torch.manual_seed(1)
    got, want = c_kernel_and_reference(torch.randn(batch, 5, 3, dtype=dtype), hidden)
    tolerance = 1e-9 if dtype == torch.float64 else 1e-4
    for got_part, want_part in zip(got, want, strict=True):
        torch.testing.assert_close(got_part, want_part, rtol=tolerance, atol=tolerance)


@C_KERNEL
@pytest.mark.parametrize("threads", [1, 2])
def test_c_kernel_gives_the_same_results_on_any_number_of_threads(threads):
    """The C pass shares each step's product out among torch's threads by blocks of the result
    (OpenMP, where the compiler has it), each block on one thread: one thread or two must give
    the node the same bits (at 25 units: several panels in both products; 7 sequences). The
    node alone, from a fixed input part: torch's batch norm of the input part reduces in an
    order that depends on its threads."""
    cell = make(25, kernel="c")
    generator = torch.Generator().manual_seed(3)
    input_part = torch.randn(7, 5, 100, dtype=torch.float64, generator=generator)
    h0, c0 = (torch.randn(7, 25, dtype=torch.float64, generator=generator) for _ in range(2))
    weights = [cell.recurrent_weights, cell.recurrent_norm.weight, *cell.cell_norm.parameters()]

    def run() -> list[torch.Tensor]:
        inputs = [t.detach().clone().requires_grad_(True) for t in (input_part, *weights, h0, c0)]
        norms = (cell.recurrent_norm, cell.cell_norm)
        outputs, c = bn_lstm_cpu.BNLSTMSequenceC.apply(*inputs, *norms, 0)
        loss = (outputs * torch.linspace(-1, 2, 25, dtype=torch.float64)).pow(2).sum()
        return [outputs, c, *torch.autograd.grad(loss + c.pow(2).sum(), inputs)]

    want, got = on_threads(1, run), on_threads(threads, run)
    for got_part, want_part in zip(got, want, strict=True):
        assert torch.equal(got_part, want_part)
