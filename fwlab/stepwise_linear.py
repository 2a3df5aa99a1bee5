"""A linear layer applied at every step of a recurrence, its weight gradient formed in one product.

Autograd gives a weight used at T steps T gradient products ``g_tᵀ x_t``, each contracting over
the batch alone (16 rows at an Omniglot batch): on a CPU such thin products run several times
below the speed of one product over all T·B rows. :class:`StepwiseLinear` keeps the per-step
forward ``y_t = x_t Wᵀ + b`` and the per-step input gradient ``∂L/∂x_t = g_t W`` (the recurrence
needs it at once), and defers the parameter gradients to the end of the backward pass:

    ∂L/∂W = Σ_t g_tᵀ x_t = Gᵀ X,   ∂L/∂b = Σ_t g_t = 1ᵀ G,     X, G the T·B stacked rows

It pays where the weight is large beside the batch: the LRU-NTM controller's (800 × 765) at
batch 16 made the Omniglot-shape pass about 1.5x faster on a 2-core CPU. Each step adds a
Python-level autograd node, so for a small recurrent matrix (fast weights' or the IRNN's
200 × 200) it measured slower, and those cells keep plain autograd.

How: the parameters enter the graph once, through a node (:class:`_Gather`) that every step's
node feeds; autograd runs that node only after all of them, and by then each step has left its
``(x_t, g_t)`` pair behind. ::

    linear = StepwiseLinear(self.weight, self.bias)   # once per forward pass
    for x_t in inputs: h = torch.tanh(linear(h) + x_t)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_Pairs = list[tuple[torch.Tensor, torch.Tensor]]


class _Gather(torch.autograd.Function):
    """Identity on (W, b) forward; backward adds Gᵀ X and 1ᵀ G from the steps' pairs."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        pairs: _Pairs,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        ctx.pairs = pairs
        ctx.has_bias = bias is not None
        return weight.view_as(weight), (bias.view_as(bias) if bias is not None else None)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx: torch.autograd.function.FunctionCtx,
        grad_weight: torch.Tensor,
        grad_bias: torch.Tensor | None,
    ) -> tuple[None, torch.Tensor, torch.Tensor | None]:
        pairs: _Pairs = ctx.pairs
        if pairs:
            inputs = torch.cat([x for x, _ in pairs])
            grads = torch.cat([g for _, g in pairs])
            grad_weight = torch.addmm(grad_weight, grads.T, inputs)
            if ctx.has_bias:
                grad_bias = grad_bias + grads.sum(dim=0)
        pairs.clear()  # a second backward through the same graph would need them again: once
        return None, grad_weight, (grad_bias if ctx.has_bias else None)


class _Step(torch.autograd.Function):
    """y = x Wᵀ + b; backward: ∂L/∂x now, (x, g) left for :class:`_Gather`."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        pairs: _Pairs,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        ctx.pairs = pairs
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[None, torch.Tensor | None, None, None]:
        x, weight = ctx.saved_tensors
        # under autocast the forward product ran in bfloat16/float16; the gradients are formed
        # in the weight's dtype (autograd casts δx back to x's)
        x, grad = x.to(weight.dtype), grad.to(weight.dtype)
        needs_parameters = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
        if needs_parameters:
            ctx.pairs.append((x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])))
        grad_x = grad @ weight if ctx.needs_input_grad[1] else None
        # the parameters' gradients come from _Gather; a zero here would cost a full-size add
        return None, grad_x, None, None


class StepwiseLinear:
    """``F.linear(x, weight, bias)`` for the steps of one forward pass; see the module.

    Make one per forward pass (it holds that pass's pairs). Without gradients (evaluation,
    ``torch.no_grad``) it is plain ``F.linear``.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self._pairs: _Pairs = []
        self._deferred = torch.is_grad_enabled() and (
            weight.requires_grad or (bias is not None and bias.requires_grad)
        )
        if self._deferred:
            self.weight, self.bias = _Gather.apply(self._pairs, weight, bias)
        else:
            self.weight, self.bias = weight, bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._deferred and torch.is_grad_enabled():
            return _Step.apply(self._pairs, x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)
