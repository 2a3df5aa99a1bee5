"""The Gaussian mixture's reparameterised samples (Graves 2016): the tests the reference
libraries use, on float64."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

from fwlab.distributions import DiagonalGaussianMixture

DOUBLE = torch.float64


def random_parameters(batch, components, dims, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(*batch, components, generator=generator, dtype=DOUBLE)
    loc = torch.randn(*batch, components, dims, generator=generator, dtype=DOUBLE)
    scale = 0.5 + torch.rand(*batch, components, dims, generator=generator, dtype=DOUBLE)
    return [p.requires_grad_() for p in (logits, loc, scale)]


def reference(logits, loc, scale):
    return MixtureSameFamily(Categorical(logits=logits), Independent(Normal(loc, scale), 1))


def test_density_and_moments_match_torch_mixture_same_family():
    logits, loc, scale = random_parameters((4,), 3, 2)
    mixture = DiagonalGaussianMixture(logits, loc, scale)
    torch_mixture = reference(logits, loc, scale)
    x = torch.randn(5, 4, 2, dtype=DOUBLE)
    torch.testing.assert_close(mixture.log_prob(x), torch_mixture.log_prob(x))
    torch.testing.assert_close(mixture.mean, torch_mixture.mean)
    torch.testing.assert_close(mixture.variance, torch_mixture.variance)
    assert mixture.batch_shape == (4,) and mixture.event_shape == (2,)
    assert mixture.rsample((7,)).shape == (7, 4, 2)
    assert mixture.sample().shape == (4, 2) and not mixture.sample().requires_grad


def test_one_component_is_the_gaussian_reparameterisation():
    logits, loc, scale = random_parameters((3,), 1, 4)
    torch.manual_seed(5)
    ours = DiagonalGaussianMixture(logits, loc, scale).rsample((6,))
    torch.manual_seed(5)
    gaussian = Normal(loc[:, 0], scale[:, 0]).rsample((6,))
    torch.testing.assert_close(ours, gaussian)
    weights = torch.randn_like(gaussian)  # a generic linear functional of the samples
    ours_grads = torch.autograd.grad((ours * weights).sum(), (loc, scale))
    gaussian_grads = torch.autograd.grad((gaussian * weights).sum(), (loc, scale))
    for got, expected in zip(ours_grads, gaussian_grads):
        torch.testing.assert_close(got, expected)


def _bisection_sample_sum(u, weights, logits, loc, scale):
    return (DiagonalGaussianMixture(logits, loc, scale).rsample_from_uniform(u) * weights).sum()


@pytest.mark.parametrize("dims", [1, 3])
def test_gradients_match_finite_differences_of_the_inverse_cdf(dims):
    """With u fixed, x(θ) comes from bisection on the conditional CDFs alone; its central
    differences check Graves' gradients, through the ancestral chain x_<d when D = 3."""
    parameters = random_parameters((2,), 3, dims, seed=dims)
    u = torch.rand(5, 2, dims, generator=torch.Generator().manual_seed(1), dtype=DOUBLE)
    u = u.clamp(0.02, 0.98)
    weights = torch.randn(5, 2, dims, generator=torch.Generator().manual_seed(2), dtype=DOUBLE)
    analytic = torch.autograd.grad(_bisection_sample_sum(u, weights, *parameters), parameters)
    step = 1e-6
    with torch.no_grad():
        for parameter, gradient in zip(parameters, analytic):
            numeric = torch.zeros_like(parameter)
            for i in range(parameter.numel()):
                parameter.view(-1)[i] += step
                plus = _bisection_sample_sum(u, weights, *parameters)
                parameter.view(-1)[i] -= 2 * step
                minus = _bisection_sample_sum(u, weights, *parameters)
                parameter.view(-1)[i] += step
                numeric.view(-1)[i] = (plus - minus) / (2 * step)
            torch.testing.assert_close(gradient, numeric, atol=1e-6, rtol=1e-5)
    if dims > 1:  # the chain matters: dropping it changes the gradient of x_2 and x_3
        assert analytic[0].abs().sum() > 0


def test_monte_carlo_gradients_of_the_first_two_moments_match_the_analytic_ones():
    """d/dθ E[x] and d/dθ E[x²] by averaging sample gradients (400k samples) against the
    gradients of Σπμ and Σπ(σ² + μ²). Tolerance 0.01 absolute: over seeds 0-2 the largest
    deviation was 0.007; without Graves' term the weights' gradient would be 0, not > 0.05."""
    parameters = random_parameters((), 3, 2, seed=7)
    mixture = DiagonalGaussianMixture(*parameters)
    torch.manual_seed(0)
    x = mixture.rsample((400_000,))
    for function, exact in (
        (lambda s: s.mean(0), mixture.mean),
        (lambda s: (s**2).mean(0), mixture.variance + mixture.mean**2),
    ):
        direction = torch.tensor([1.0, -0.7], dtype=DOUBLE)
        monte_carlo = torch.autograd.grad(
            (function(x) * direction).sum(), parameters, retain_graph=True
        )
        analytic = torch.autograd.grad(
            (exact * direction).sum(), parameters, retain_graph=True, allow_unused=True
        )  # E[x] does not depend on the scales
        for got, expected, parameter in zip(monte_carlo, analytic, parameters):
            expected = torch.zeros_like(parameter) if expected is None else expected
            torch.testing.assert_close(got, expected, atol=0.01, rtol=0)
        assert analytic[0].abs().max() > 0.05  # the mixture weights' gradient is not vacuous


def test_identical_components_give_zero_gradient_for_the_weights():
    logits = torch.randn(4, dtype=DOUBLE, requires_grad=True)
    loc = torch.randn(1, 3, dtype=DOUBLE).expand(4, 3).clone().requires_grad_()
    scale = torch.rand(1, 3, dtype=DOUBLE).add(0.5).expand(4, 3).clone().requires_grad_()
    x = DiagonalGaussianMixture(logits, loc, scale).rsample((50,))
    (gradient,) = torch.autograd.grad((x * torch.randn_like(x)).sum(), logits)
    assert gradient.abs().max() < 1e-10


@pytest.mark.parametrize(
    ("dtype", "tiny"), [(torch.float64, 1e-300), (torch.float32, 1e-30)], ids=["f64", "f32"]
)
def test_samples_far_in_the_tails_have_finite_gradients(dtype, tiny):
    logits = torch.tensor([0.0, 2.0, -1.0], dtype=dtype, requires_grad=True)
    loc = torch.tensor([[-3.0, 0.0], [0.0, 1.0], [4.0, -2.0]], dtype=dtype, requires_grad=True)
    scale = torch.tensor([[0.3, 1.0], [1.0, 0.2], [2.0, 0.5]], dtype=dtype, requires_grad=True)
    mixture = DiagonalGaussianMixture(logits, loc, scale)
    top = 1 - torch.finfo(dtype).eps
    u = torch.tensor([[tiny, tiny], [top, top], [tiny, top], [0.5, tiny]], dtype=dtype)
    x = mixture.rsample_from_uniform(u)
    assert x[0, 0] < -10 and x[1, 0] > 8  # really in the tails
    gradients = torch.autograd.grad(x.sum(), (logits, loc, scale))
    assert torch.isfinite(x).all()
    for gradient in gradients:
        assert torch.isfinite(gradient).all()
    # and ancestral samples of a mixture with one very narrow component
    narrow = DiagonalGaussianMixture(logits, loc, scale * torch.tensor([[1e-3], [1.0], [1.0]]))
    samples = narrow.rsample((20_000,))
    for gradient in torch.autograd.grad(samples.sum(), (logits, loc, scale)):
        assert torch.isfinite(gradient).all()


def test_mismatched_shapes_are_refused_clearly():
    with pytest.raises(ValueError, match="K components"):
        DiagonalGaussianMixture(torch.zeros(3), torch.zeros(2, 4), torch.ones(2, 4))
