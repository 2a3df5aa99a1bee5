"""A diagonal Gaussian mixture with reparameterised samples (Graves 2016, arXiv 1607.05690).

PyTorch's ``MixtureSameFamily`` has no ``rsample``: the reparameterisation trick moves the
means and scales but not the mixture weights. Graves' estimator differentiates the inverse CDF
implicitly instead. For a 1-D density f with CDF F, a sample x̂ = F⁻¹(u; θ) satisfies
F(x̂; θ) = u, so

    ∂x̂/∂θ = − (∂F(x̂; θ)/∂θ) / f(x̂; θ).

In D dimensions the sample is the sequential inverse of the conditional CDFs (the inverse
Rosenblatt transform): x_d = F_d⁻¹(u_d; θ, x_<d), where F_d is the CDF of the 1-D mixture

    f_d(x_d | x_<d) = Σ_k π_k^(d) N(x_d; μ_kd, σ_kd²),
    π_k^(d) ∝ π_k Π_{j<d} N(x_j; μ_kj, σ_kj²)        (posterior weights given x_<d),

and the total derivative also runs through the earlier coordinates:

    ∂x_d/∂θ = − [∂F_d/∂θ + Σ_{j<d} (∂F_d/∂x_j)(∂x_j/∂θ)] / f_d(x_d | x_<d).

:class:`DiagonalGaussianMixture` draws x̂ ancestrally (a component, then a Gaussian: the same
distribution as the sequential inverse CDF, and cheap) and attaches exactly these gradients with
a surrogate whose value is x̂ and whose derivative is the implicit one.
"""

from __future__ import annotations

import math

import torch
from torch.distributions import Distribution, constraints
from torch.distributions.utils import _standard_normal

HALF_LOG_TWO_PI = 0.5 * math.log(2 * math.pi)


class DiagonalGaussianMixture(Distribution):
    """p(x) = Σ_k π_k Π_d N(x_d; μ_kd, σ_kd²) over x ∈ R^D, with π = softmax(logits).

    Args:
        logits: ``(*batch, K)`` unnormalised log mixture weights.
        loc: ``(*batch, K, D)`` component means μ.
        scale: ``(*batch, K, D)`` component standard deviations σ > 0.

    ``rsample`` is differentiable in all three (Graves' estimator, see the module docstring);
    ``rsample_from_uniform(u)`` gives the sample that uniform noise ``u`` maps to.
    """

    arg_constraints = {
        "logits": constraints.real_vector,
        "loc": constraints.real,
        "scale": constraints.positive,
    }
    support = constraints.real_vector
    has_rsample = True

    def __init__(
        self,
        logits: torch.Tensor,
        loc: torch.Tensor,
        scale: torch.Tensor,
        validate_args: bool | None = None,
    ) -> None:
        if logits.dim() < 1 or loc.dim() < 2 or scale.dim() < 2:
            raise ValueError("logits need shape (*batch, K); loc and scale (*batch, K, D)")
        batch_shape = torch.broadcast_shapes(logits.shape[:-1], loc.shape[:-2], scale.shape[:-2])
        components = logits.shape[-1]
        dims = torch.broadcast_shapes(loc.shape[-1:], scale.shape[-1:])
        if loc.shape[-2] != components or scale.shape[-2] != components:
            raise ValueError(
                f"{components} mixture logits but loc {tuple(loc.shape)} and scale "
                f"{tuple(scale.shape)}: the second-last axis must be the K components"
            )
        self.logits = logits.expand(*batch_shape, components)
        self.loc = loc.expand(*batch_shape, components, dims[0])
        self.scale = scale.expand(*batch_shape, components, dims[0])
        super().__init__(batch_shape, torch.Size(dims), validate_args=validate_args)

    # -- moments and density --------------------------------------------------------------
    @property
    def num_components(self) -> int:
        return self.logits.shape[-1]

    @property
    def weights(self) -> torch.Tensor:
        """π, ``(*batch, K)``."""
        return self.logits.softmax(-1)

    @property
    def mean(self) -> torch.Tensor:
        """E[x] = Σ_k π_k μ_k."""
        return (self.weights.unsqueeze(-1) * self.loc).sum(-2)

    @property
    def variance(self) -> torch.Tensor:
        """Var[x_d] = Σ_k π_k (σ_kd² + μ_kd²) − E[x_d]²."""
        second_moment = (self.weights.unsqueeze(-1) * (self.scale**2 + self.loc**2)).sum(-2)
        return second_moment - self.mean**2

    def _component_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log N(x; μ_k, diag σ_k²) per component: ``(..., D)`` -> ``(..., K)``."""
        z = (x.unsqueeze(-2) - self.loc) / self.scale
        return (-0.5 * z**2 - self.scale.log() - HALF_LOG_TWO_PI).sum(-1)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        log_weights = self.logits.log_softmax(-1)
        return (log_weights + self._component_log_prob(value)).logsumexp(-1)

    # -- sampling ---------------------------------------------------------------------------
    def rsample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> torch.Tensor:
        """Ancestral samples x̂ ``(*sample_shape, *batch, D)`` carrying Graves' gradients.

        The Gaussian noise is drawn first, with the same call as ``Normal.rsample``, so with
        K = 1 and the same seed the samples are ``Normal(loc, scale).rsample``'s.
        """
        shape = self._extended_shape(torch.Size(sample_shape))
        with torch.no_grad():
            noise = _standard_normal(shape, dtype=self.loc.dtype, device=self.loc.device)
            component = torch.distributions.Categorical(logits=self.logits).sample(
                torch.Size(sample_shape)
            )  # (*sample, *batch)
            index = component[..., None, None].expand(*component.shape, 1, shape[-1])
            loc = self.loc.expand(*shape[:-1], *self.loc.shape[-2:]).gather(-2, index)
            scale = self.scale.expand(*shape[:-1], *self.scale.shape[-2:]).gather(-2, index)
            sample = loc.squeeze(-2) + scale.squeeze(-2) * noise
        return self.attach_implicit_gradient(sample)

    def rsample_from_uniform(self, u: torch.Tensor, iterations: int = 100) -> torch.Tensor:
        """The sample that uniform noise ``u`` ``(..., *batch, D)`` in (0, 1) maps to under the
        sequential inverse conditional CDFs, found by bisection, with Graves' gradients.

        Slow (bisection); for tests and for users who need the noise fixed (common random
        numbers). ``rsample`` draws from the same distribution cheaply.
        """
        if not ((u > 0) & (u < 1)).all():
            raise ValueError("uniform noise u must lie strictly between 0 and 1")
        with torch.no_grad():
            log_weights = self.logits.log_softmax(-1).expand(*u.shape[:-1], -1)
            low_side = u < 0.5  # solve log F = log u there, log(1 − F) = log(1 − u) elsewhere
            log_target = torch.where(low_side, u.log(), (-u).log1p())
            spread = (self.scale.amax(-2) * 40).expand(u.shape)
            lower = self.loc.amin(-2).expand(u.shape) - spread
            upper = self.loc.amax(-2).expand(u.shape) + spread
            coordinates = []
            for d in range(u.shape[-1]):
                loc, scale = self.loc[..., d], self.scale[..., d]
                lo, hi = lower[..., d].clone(), upper[..., d].clone()
                for _ in range(iterations):
                    middle = 0.5 * (lo + hi)
                    z = (middle.unsqueeze(-1) - loc) / scale
                    log_cdf = (log_weights + torch.special.log_ndtr(z)).logsumexp(-1)
                    log_sf = (log_weights + torch.special.log_ndtr(-z)).logsumexp(-1)
                    below = torch.where(
                        low_side[..., d], log_cdf < log_target[..., d], log_sf > log_target[..., d]
                    )
                    lo = torch.where(below, middle, lo)
                    hi = torch.where(below, hi, middle)
                x_d = 0.5 * (lo + hi)
                coordinates.append(x_d)
                z = (x_d.unsqueeze(-1) - loc) / scale
                log_weights = (log_weights - 0.5 * z**2 - scale.log()).log_softmax(-1)
            sample = torch.stack(coordinates, -1)
        return self.attach_implicit_gradient(sample)

    def attach_implicit_gradient(self, sample: torch.Tensor) -> torch.Tensor:
        """``sample``'s values, differentiable in (logits, loc, scale) by Graves' estimator.

        Per coordinate, x_d − (G − stop_grad(G)) with G = F_d(x̂_d; θ, x_<d) / stop_grad(f_d):
        its value is x̂_d and its derivative −(dF_d/dθ)/f_d, where x_<d are the earlier
        surrogates (so the chain through the conditional weights is kept). F_d is written as
        Σ π Φ(z) below the median and as 1 − Σ π Φ(−z) above it: both have the same derivative,
        and the chosen form stays small in its tail (Φ(z)/f is bounded there), so far-out samples
        give finite gradients.
        """
        sample = sample.detach()
        log_weights = self.logits.log_softmax(-1).expand(*sample.shape[:-1], -1)
        coordinates = []
        for d in range(sample.shape[-1]):
            loc, scale = self.loc[..., d], self.scale[..., d]
            x_hat = sample[..., d]
            z = (x_hat.unsqueeze(-1) - loc) / scale  # x̂_d fixed: only θ and x_<d vary
            log_density = -0.5 * z**2 - scale.log() - HALF_LOG_TWO_PI
            log_f = (log_weights + log_density).logsumexp(-1).detach()
            log_cdf = (log_weights + torch.special.log_ndtr(z)).logsumexp(-1)
            log_sf = (log_weights + torch.special.log_ndtr(-z)).logsumexp(-1)
            lower_half = (log_cdf < log_sf).detach()
            log_tail = torch.where(lower_half, log_cdf, log_sf)
            sign = torch.where(lower_half, 1.0, -1.0).to(sample.dtype)
            ratio = sign * (log_tail - log_f).exp()  # F/f, or −(1 − F)/f
            x_d = x_hat - (ratio - ratio.detach())
            coordinates.append(x_d)
            # the posterior weights for the next coordinate, as functions of this surrogate
            z_d = (x_d.unsqueeze(-1) - loc) / scale
            log_weights = (log_weights - 0.5 * z_d**2 - scale.log()).log_softmax(-1)
        return torch.stack(coordinates, -1)
