"""Least-recently-used memory access (Santoro et al. 2016, section 3.2), one function per equation.

Shapes: B batch, N memory slots, W word size, R read heads. Memory ``M`` is ``(B, N, W)``;
per-head weightings are ``(B, R, N)``; usage is ``(B, N)``.

    w^r_t(i)  = softmax_i( K(k_t, M_t(i)) ),   K the cosine similarity        (content read)
    r_t       = Σ_i w^r_t(i) M_t(i)
    w^u_t     = γ w^u_{t-1} + Σ_heads (w^r_t + w^w_t)                          (usage)
    w^lu_t(i) = 1 if w^u_t(i) ≤ m(w^u_t, n) else 0,  m the n-th smallest       (least used)
    w^w_t     = σ(α) w^r_{t-1} + (1 − σ(α)) w^lu_{t-1}                        (write)
    M_t(i)    = M_{t-1}(i) + Σ_heads w^w_t(i) v_t,  after zeroing the least-used slot of w^u_{t-1}
                (v_t the key k_t, as the paper, or an add vector a_t: lru_ntm.WriteVector)

The selections (n smallest usages, the least-used slot) are not differentiable and carry no
gradient, as in the paper: gradients reach the controller through the keys, the gate and the
content reads.
"""

from __future__ import annotations

import torch

COSINE_EPS = 1e-8  # keeps K finite against an all-zero (freshly cleared) slot


class _RowNorm(torch.autograd.Function):
    """‖M(i)‖ over the last axis, with a one-pass backward: ∂/∂M = M ⊙ (g / ‖M(i)‖), 0 where
    ‖M(i)‖ = 0 (a cleared slot; the subgradient autograd's norm uses too). Autograd's own
    backward makes three passes over the memory (divide, multiply, mask) for this."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, memory: torch.Tensor) -> torch.Tensor:
        norms = torch.linalg.vector_norm(memory, dim=-1)
        ctx.save_for_backward(memory, norms)
        return norms

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        memory, norms = ctx.saved_tensors
        scale = torch.where(norms > 0, grad / norms, torch.zeros_like(grad))
        return memory * scale.unsqueeze(-1)


def row_norms(memory: torch.Tensor) -> torch.Tensor:
    """‖M(i)‖ for every slot: (B, N, W) -> (B, N)."""
    return _RowNorm.apply(memory)


class _SlotDot(torch.autograd.Function):
    """k·M(i) for every head and slot, (B, R, N); its memory gradient gᵀk comes out as a
    contiguous (B, N, W), not autograd's transposed (B, W, N) view, whose strided layout makes
    every later pass over the memory gradient several times slower."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, keys: torch.Tensor, memory: torch.Tensor
    ) -> torch.Tensor:
        ctx.save_for_backward(keys, memory)
        return torch.bmm(keys, memory.transpose(1, 2))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, memory = ctx.saved_tensors
        return torch.bmm(grad, memory), torch.bmm(grad.transpose(1, 2), keys)


def cosine_similarity(keys: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """K(k, M(i)) = k·M(i) / (‖k‖ ‖M(i)‖): keys (B, R, W), memory (B, N, W) -> (B, R, N)."""
    dot = _SlotDot.apply(keys, memory)
    norms = keys.norm(dim=-1).unsqueeze(-1) * row_norms(memory).unsqueeze(1)
    return dot / (norms + COSINE_EPS)


def content_read_weights(keys: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """w^r_t = softmax over slots of the cosine similarity: (B, R, N), each row sums to 1."""
    return torch.softmax(cosine_similarity(keys, memory), dim=-1)


def read(weights: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """r_t = Σ_i w^r_t(i) M_t(i): weights (B, R, N), memory (B, N, W) -> (B, R, W)."""
    return torch.bmm(weights, memory)


def least_used_weights(usage: torch.Tensor, count: int) -> torch.Tensor:
    """w^lu: 1 on the ``count`` least-used slots, 0 elsewhere: usage (B, N) -> (B, N).

    "≤ the n-th smallest" with ties broken by slot index, so exactly ``count`` slots are chosen
    (a freshly cleared memory has all usages equal).
    """
    # A stable sort keeps equal usages in slot order (topk does not promise that).
    smallest = torch.sort(usage.detach(), dim=-1, stable=True).indices[..., :count]
    return torch.zeros_like(usage).scatter_(-1, smallest, 1.0)


def write_weights(
    gate: torch.Tensor, previous_read: torch.Tensor, previous_least_used: torch.Tensor
) -> torch.Tensor:
    """w^w_t = σ(α) w^r_{t-1} + (1 − σ(α)) w^lu_{t-1}.

    gate α (B, R), previous_read (B, R, N), previous_least_used (B, N) -> (B, R, N).
    """
    mix = torch.sigmoid(gate).unsqueeze(-1)
    return mix * previous_read + (1 - mix) * previous_least_used.unsqueeze(1)


def zero_least_used_slot(memory: torch.Tensor, previous_usage: torch.Tensor) -> torch.Tensor:
    """M_{t-1} with its least-used slot (smallest w^u_{t-1}, first on ties) set to zero."""
    slot = previous_usage.detach().argmin(dim=-1)  # (B,)
    keep = torch.ones_like(previous_usage).scatter_(-1, slot.unsqueeze(-1), 0.0)
    return memory * keep.unsqueeze(-1)


def write(memory: torch.Tensor, weights: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """M_t(i) = M(i) + Σ_heads w^w_t(i) v_t: weights (B, R, N), the written vectors (B, R, W)."""
    return torch.baddbmm(memory, weights.transpose(1, 2), vectors)


def update_usage(
    previous_usage: torch.Tensor,
    read_weights: torch.Tensor,
    write_weights: torch.Tensor,
    decay: float,
) -> torch.Tensor:
    """w^u_t = γ w^u_{t-1} + w^r_t + w^w_t, the heads' weightings summed: -> (B, N)."""
    return decay * previous_usage + read_weights.sum(dim=1) + write_weights.sum(dim=1)
