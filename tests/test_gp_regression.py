"""Few-shot GP regression episodes and the regression-per-step target."""

from __future__ import annotations

import math

import pytest
import torch

from fwlab.errors import ConfigError
from fwlab.targets import get_target
from fwlab_plugins.data.gp_regression import (
    GPRegressionConfig,
    GPRegressionDataModule,
    generate,
    posterior_means,
    rbf_kernel,
)


def test_inputs_are_x_and_the_previous_target():
    config = GPRegressionConfig(episode_length=7)
    inputs, targets, _ = generate(5, config, "train")
    assert inputs.shape == (5, 7, 2) and targets.shape == (5, 7)
    assert torch.all(inputs[:, 0, 1] == 0)  # no label before the first step
    torch.testing.assert_close(inputs[:, 1:, 1], targets[:, :-1])
    assert inputs[..., 0].min() >= config.x_low and inputs[..., 0].max() <= config.x_high


def test_posterior_mean_against_a_hand_checked_case():
    """One past point: μ = k(x1, x0) / (k(x0, x0) + σ_n²) · y0."""
    config = GPRegressionConfig(lengthscale=1.0, signal_std=1.0, noise_std=0.5)
    x = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    y = torch.tensor([[2.0, 0.0]], dtype=torch.float64)
    means = posterior_means(x, y, config)
    expected = math.exp(-0.5) / (1.0 + 0.25) * 2.0
    assert means[0, 0] == 0.0 and abs(means[0, 1].item() - expected) < 1e-12


def _posterior_means_by_solves(x: torch.Tensor, y: torch.Tensor, config) -> torch.Tensor:
    """The definition, a solve per episode and step: μ_t = k(x_t, X_<t) (K_<t + σ_n² I)⁻¹ y_<t."""
    means = torch.zeros_like(y)
    for n in range(x.shape[0]):
        for t in range(1, x.shape[1]):
            past = x[n, :t].unsqueeze(0)
            gram = rbf_kernel(past, past, config.lengthscale, config.signal_std)[0]
            point = x[n, t : t + 1].unsqueeze(0)
            cross = rbf_kernel(point, past, config.lengthscale, config.signal_std)[0, 0]
            noisy = gram + config.noise_std**2 * torch.eye(t, dtype=x.dtype)
            means[n, t] = cross @ torch.linalg.solve(noisy, y[n, :t])
    return means


def test_posterior_means_from_one_factorisation_agree_with_a_solve_per_step():
    torch.manual_seed(0)
    config = GPRegressionConfig(lengthscale=0.8, signal_std=1.3, noise_std=0.2)
    x = 10 * torch.rand(6, 12, dtype=torch.float64) - 5
    y = torch.randn(6, 12, dtype=torch.float64)
    means = posterior_means(x, y, config)
    torch.testing.assert_close(means, _posterior_means_by_solves(x, y, config), rtol=0, atol=1e-10)
    assert torch.all(means[:, 0] == 0)  # the prior mean before any point


def test_noiseless_episodes_have_finite_baselines():
    # σ_n = 0: the kernel of 50 points in [−5, 5] at ℓ = 1 alone is numerically singular
    inputs, targets, baseline = generate(50, GPRegressionConfig(noise_std=0.0), "train")
    assert torch.isfinite(baseline).all()


def test_generate_gives_every_episode_its_own_baseline_across_chunks():
    """More episodes than one chunk: the baselines line up with their episodes."""
    config = GPRegressionConfig(episode_length=4)
    inputs, targets, baseline = generate(2500, config, "val")
    x, y = inputs[..., 0].double(), targets.double()
    torch.testing.assert_close(baseline, posterior_means(x, y, config).float())


def test_samples_have_the_kernels_covariance():
    config = GPRegressionConfig(episode_length=3, noise_std=0.0, lengthscale=0.7, signal_std=1.5)
    inputs, targets, _ = generate(20_000, config, "train")
    x, y = inputs[..., 0].double(), targets.double()
    # Empirical E[y_0 y_1] against E[k(x_0, x_1)] over the same x's.
    empirical = (y[:, 0] * y[:, 1]).mean()
    expected = rbf_kernel(x[:, :1], x[:, 1:2], 0.7, 1.5).mean()
    assert abs(empirical - expected) < 0.05
    assert abs(y.var() - 1.5**2) < 0.1


def test_the_baseline_improves_with_more_points():
    inputs, targets, baseline = generate(500, GPRegressionConfig(episode_length=20), "val")
    error = (baseline - targets).square().mean(0)
    assert error[15:].mean() < 0.25 * error[0]


def test_deterministic_per_split_and_seed():
    config = GPRegressionConfig(episode_length=5)
    a, b = generate(10, config, "test"), generate(10, config, "test")
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not torch.equal(a[0], generate(10, config, "val")[0])
    module = GPRegressionDataModule(GPRegressionConfig(**GPRegressionDataModule.tiny_example(None)))
    module.setup()
    assert len(module.datasets["train"]) == 16 and module.spec.target_kind == "regression_per_step"


def test_regression_target_losses_and_baseline_metric():
    nll = get_target("regression_per_step", loss="gaussian_nll")
    predictions = torch.zeros(2, 3, 2)  # mean 0, softplus(0) variance
    targets = torch.ones(2, 3)
    variance = torch.nn.functional.softplus(torch.tensor(0.0)) + 1e-6
    expected = 0.5 * (math.log(2 * math.pi) + math.log(variance) + 1 / variance)
    assert abs(nll.loss(predictions, targets).item() - expected) < 1e-5
    mse = get_target("regression_per_step", loss="mse")
    assert mse.output_size(None) == 1 and mse.loss(torch.zeros(2, 3, 1), targets).item() == 1.0
    metrics = nll.metrics(None)
    nll.update_metrics(metrics, predictions, targets, [torch.full((2, 3), 0.5)])
    values = metrics.compute()
    assert values["mse"].item() == 1.0 and abs(values["baseline_mse"].item() - 0.25) < 1e-7


def test_an_empty_or_reversed_range_of_x_is_a_clear_error():
    for low, high in ((5.0, 5.0), (5.0, -5.0)):
        with pytest.raises(ConfigError, match=f"data.x_low={low}, data.x_high={high}: x_low must"):
            GPRegressionDataModule(GPRegressionConfig(x_low=low, x_high=high))
    GPRegressionDataModule(GPRegressionConfig(x_low=-1.0, x_high=1.0))
