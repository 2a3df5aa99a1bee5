"""IRNN (Le et al. 2015) against its equation and its initialisation."""

from __future__ import annotations

import pytest
import torch

from fwlab_plugins.cells.irnn import IRNNCell, IRNNConfig


def test_matches_the_naive_recursion_in_float64():
    torch.manual_seed(0)
    cell = IRNNCell(3, IRNNConfig(hidden_size=4, input_init_std=0.5)).double()
    with torch.no_grad():
        cell.recurrent_weights.weight.add_(0.2 * torch.randn(4, 4, dtype=torch.float64))
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    outputs, state = cell(x)
    W_x, b = cell.input_weights.weight.detach(), cell.input_weights.bias.detach()
    W_h = cell.recurrent_weights.weight.detach()
    for n in range(2):
        h = torch.zeros(4, dtype=torch.float64)
        for t in range(6):
            h = torch.relu(W_x @ x[n, t] + W_h @ h + b)
            torch.testing.assert_close(outputs[n, t], h, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state.h, outputs[:, -1])


def test_initialisation_identity_zero_bias_small_gaussian_inputs():
    torch.manual_seed(0)
    cell = IRNNCell(
        200, IRNNConfig(hidden_size=100, recurrent_init_scale=0.5, input_init_std=0.001)
    )
    torch.testing.assert_close(cell.recurrent_weights.weight, 0.5 * torch.eye(100))
    assert torch.count_nonzero(cell.input_weights.bias) == 0
    std = cell.input_weights.weight.std().item()
    assert 0.0009 < std < 0.0011 and abs(cell.input_weights.weight.mean().item()) < 1e-4


def test_identity_recurrence_carries_the_state_unchanged_without_input():
    cell = IRNNCell(2, IRNNConfig(hidden_size=3, recurrent_init_scale=1.0))
    state = cell.initial_state(1)._replace(h=torch.tensor([[1.0, 2.0, 3.0]]))
    outputs, _ = cell(torch.zeros(1, 5, 2), state)
    torch.testing.assert_close(outputs[0], torch.tensor([[1.0, 2.0, 3.0]]).repeat(5, 1))


def test_the_triton_kernel_takes_only_inputs_whose_offsets_int32_reaches():
    irnn_triton = pytest.importorskip("fwlab_plugins.cells.kernels.irnn_triton")
    inputs = torch.empty(64, 784, 100, device="meta")  # shapes only: nothing is allocated
    assert irnn_triton.fits(inputs, 100)
    assert not irnn_triton.fits(inputs, 129)  # W_h on chip
    assert not irnn_triton.fits(inputs.half(), 100)
    assert not irnn_triton.fits(torch.empty(2**16, 2**8, 128, device="meta"), 128)  # 2^31
