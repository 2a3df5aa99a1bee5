"""StepwiseLinear: a recurrence's linear layer with its weight gradient deferred to one product."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fwlab.stepwise_linear import StepwiseLinear


def recurrence(x, h, weight, bias, make_linear):
    """h_t = tanh(x_t + W h_{t-1} + b), with W also used once directly (a second route)."""
    linear = make_linear(weight, bias)
    outputs = []
    for x_t in x.unbind(1):
        h = torch.tanh(x_t + linear(h))
        outputs.append(h)
    return torch.stack(outputs, 1) + (h @ weight).sum()


def plain(weight, bias):
    return lambda h: F.linear(h, weight, bias)


@pytest.mark.parametrize("with_bias", [True, False])
def test_gradients_equal_autograd_through_f_linear_in_float64(with_bias):
    torch.manual_seed(0)
    x = torch.randn(3, 7, 5, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    weight = (0.5 * torch.randn(5, 5, dtype=torch.float64)).requires_grad_(True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True) if with_bias else None
    leaves = [x, h0, weight] + ([bias] if with_bias else [])
    results = []
    for make_linear in (plain, StepwiseLinear):
        outputs = recurrence(x, h0, weight, bias, make_linear)
        loss = (outputs * torch.linspace(-1, 1, 5, dtype=torch.float64)).pow(2).sum()
        results.append((outputs, torch.autograd.grad(loss, leaves)))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-12, atol=1e-12)
    for got, want in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_passes_a_float64_gradient_check():
    torch.manual_seed(0)
    inputs = (
        torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True),
        torch.randn(2, 4, dtype=torch.float64, requires_grad=True),
        torch.randn(4, 4, dtype=torch.float64, requires_grad=True),
        torch.randn(4, dtype=torch.float64, requires_grad=True),
    )
    assert torch.autograd.gradcheck(
        lambda x, h, w, b: recurrence(x, h, w, b, StepwiseLinear), inputs, eps=1e-6, atol=1e-6
    )


def test_without_gradients_it_is_f_linear_and_records_nothing():
    weight, bias = torch.randn(4, 3, requires_grad=True), torch.randn(4, requires_grad=True)
    x = torch.randn(2, 3)
    with torch.no_grad():
        y = StepwiseLinear(weight, bias)(x)
    assert y.grad_fn is None
    torch.testing.assert_close(y, F.linear(x, weight, bias))


def test_input_gradients_alone_need_no_weight_gradient():
    weight = torch.randn(4, 4, requires_grad=True)
    h = torch.randn(2, 4, requires_grad=True)
    linear = StepwiseLinear(weight)
    (grad_h,) = torch.autograd.grad(linear(linear(h)).sum(), [h])
    torch.testing.assert_close(grad_h, torch.ones(2, 4) @ weight @ weight)
