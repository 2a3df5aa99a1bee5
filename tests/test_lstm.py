"""The LSTM cell against the textbook equations."""

from __future__ import annotations

import torch

from fwlab_plugins.cells.lstm import LSTMCell, LSTMConfig


def test_matches_the_lstm_equations():
    torch.manual_seed(0)
    cell = LSTMCell(3, LSTMConfig(hidden_size=4, forget_bias=1.0)).double()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    outputs, state = cell(x)
    lstm = cell.lstm
    W, U = lstm.weight_ih_l0.detach(), lstm.weight_hh_l0.detach()
    b = (lstm.bias_ih_l0 + lstm.bias_hh_l0).detach()
    h = torch.zeros(2, 4, dtype=torch.float64)
    c = torch.zeros(2, 4, dtype=torch.float64)
    for t in range(5):
        i, f, g, o = (x[:, t] @ W.T + h @ U.T + b).chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        torch.testing.assert_close(outputs[:, t], h)
    torch.testing.assert_close(state.c, c)


def test_forget_gate_bias_starts_at_the_configured_value():
    cell = LSTMCell(3, LSTMConfig(hidden_size=4, forget_bias=1.0))
    total = (cell.lstm.bias_ih_l0 + cell.lstm.bias_hh_l0).detach()
    torch.testing.assert_close(total[4:8], torch.ones(4))
