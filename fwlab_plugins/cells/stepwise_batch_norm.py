"""Batch normalisation with statistics per time step (Cooijmans et al. 2017, section 3).

    BN(x_t; γ, β) = γ ⊙ (x_t − E[x_t]) / sqrt(Var[x_t] + ε) + β

The statistics E[x_t], Var[x_t] are estimated per time step t (over the batch in training,
from population averages in evaluation); γ and β are shared across time. Evaluation at steps
beyond the longest length seen in training, T_max, uses T_max's statistics. The population
statistics are running averages of the training batches' estimates, as in the authors' code;
a known bug of public ports, batch statistics at test time, is what ``eval()`` avoids here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class StepwiseBatchNorm(nn.Module):
    """BN over ``features`` with one set of running statistics per time step.

    Args:
        features: size of the normalised axis.
        max_time_steps: number of per-step statistics kept; training steps at or beyond it share
            the last slot (set it to at least the longest training sequence).
        gamma_init: initial γ (Cooijmans et al.: 0.1).
        learn_beta: whether β is a parameter; if not it is fixed at 0.
        momentum: weight of the newest batch in the running averages.
    """

    def __init__(
        self,
        features: int,
        max_time_steps: int,
        gamma_init: float = 0.1,
        learn_beta: bool = True,
        momentum: float = 0.1,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.momentum = momentum
        self.eps = eps
        self.max_time_steps = max_time_steps
        self.weight = nn.Parameter(torch.full((features,), gamma_init))  # γ
        self.bias = nn.Parameter(torch.zeros(features)) if learn_beta else None  # β
        self.register_buffer("running_mean", torch.zeros(max_time_steps, features))
        self.register_buffer("running_var", torch.ones(max_time_steps, features))
        # T_max: the longest sequence seen in training (0: none yet)
        self.register_buffer("trained_steps", torch.zeros((), dtype=torch.long))

    def statistics_index(self, t: int) -> int:
        """The slot of statistics that time step ``t`` uses."""
        return int(self._slot(t))

    def _slot(self, t: int) -> int | torch.Tensor:
        """:meth:`statistics_index` without reading a buffer back to the CPU (in evaluation the
        slot depends on T_max, a buffer: it stays a tensor, so a CUDA graph can capture it)."""
        slot = min(t, self.max_time_steps - 1)
        if self.training:
            return slot
        return (self.trained_steps.clamp(min=1) - 1).clamp(max=slot)

    def population_statistics(
        self, start: int, steps: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The population mean and variance that evaluation uses at steps start..start+T-1,
        (T, F) each: step t's slot, or T_max's beyond T_max (no read-back of T_max)."""
        times = torch.arange(start, start + steps, device=device)
        slots = torch.minimum(times, self.trained_steps.clamp(min=1) - 1)
        slots = slots.clamp(max=self.max_time_steps - 1)
        return self.running_mean[slots], self.running_var[slots]

    @torch.no_grad()
    def fold_batch_statistics(
        self, start: int, mean: torch.Tensor, var: torch.Tensor, batch: int
    ) -> None:
        """Fold the statistics a kernel normalised steps start..start+T-1 with in training
        (``mean`` and the biased ``var``, (T, F), of a batch of ``batch`` ≥ 2) into the running
        averages, as :meth:`forward` would at each step in order: running ← (1 − momentum)·running
        + momentum·batch, the variance unbiased; steps past the last slot each update that slot."""
        steps, momentum = mean.shape[0], self.momentum
        last = self.max_time_steps - 1
        own = max(0, min(steps, last - start))  # steps with a slot of their own
        unbiased = var * (batch / (batch - 1))
        for running, new in ((self.running_mean, mean), (self.running_var, unbiased)):
            if own:
                rows = running[start : start + own]
                rows.copy_(rows * (1 - momentum) + new[:own] * momentum)
            for t in range(own, steps):
                running[last] = running[last] * (1 - momentum) + new[t] * momentum
        self.trained_steps.clamp_(min=start + steps)

    def forward(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """Normalise ``x (B, F)``, the features at time step ``t``.

        One fused ``batch_norm`` call on the slot's rows of the running statistics: in training
        it normalises with the batch's statistics and updates that slot in place
        (running ← (1 − momentum)·running + momentum·batch, the variance unbiased), in
        evaluation it uses the slot's population statistics."""
        index = self._slot(t)
        if self.training:
            self.trained_steps.clamp_(min=t + 1)  # T_max, with no read-back to the CPU
            if x.shape[0] == 1:  # one sample: no variance to estimate, statistics kept as are
                normalised = (x - x.mean(dim=0)) * torch.rsqrt(x.new_tensor(self.eps))
                normalised = normalised * self.weight
                return normalised + self.bias if self.bias is not None else normalised
        return F.batch_norm(
            x,
            self.running_mean[index],
            self.running_var[index],
            self.weight,
            self.bias,
            training=self.training,
            momentum=self.momentum,
            eps=self.eps,
        )

    def forward_sequence(
        self, x: torch.Tensor, start: int = 0, shift: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Normalise ``x (B, T, F)``, steps ``start .. start+T-1``, all at once; ``BN(x) + shift``
        if a ``shift (F,)`` is given (a bias that follows the norm, added in its affine step
        rather than by a pass of its own).

        The same as calling :meth:`forward` on every step in order, when the steps are
        independent of each other (an input-side term, computed for every t before the loop);
        in training each step's statistics are its own, so the T normalisations and the T
        running-average updates are one vectorised computation instead of T small ones."""
        steps = x.shape[1]
        if self.training and (start + steps > self.max_time_steps or x.shape[0] == 1):
            # steps sharing the last slot update it one after another; a one-sample batch keeps
            # the statistics as they are: the step-by-step path says exactly what happens
            steps_normalised = [self(x_t, start + i) for i, x_t in enumerate(x.unbind(1))]
            normalised = torch.stack(steps_normalised, 1)
            return normalised + shift if shift is not None else normalised
        batch, _, features = x.shape
        if self.training:
            self.trained_steps.clamp_(min=start + steps)
            # steps start..start+T-1 are rows of the statistics: one row of T·F features
            mean = self.running_mean[start : start + steps].view(-1)
            var = self.running_var[start : start + steps].view(-1)
        else:
            mean, var = (s.view(-1) for s in self.population_statistics(start, steps, x.device))
        bias = self.bias
        if shift is not None:
            bias = shift if bias is None else bias + shift
        # one batch_norm over (B, T·F): each (step, feature) pair has statistics of its own
        normalised = F.batch_norm(
            x.reshape(batch, steps * features),
            mean,
            var,
            self.weight.repeat(steps),
            bias.repeat(steps) if bias is not None else None,
            training=self.training,
            momentum=self.momentum,
            eps=self.eps,
        )
        return normalised.view(batch, steps, features)
