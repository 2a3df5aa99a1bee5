"""The two factorisations of a joint over two categorical variables, their adaptation, and the
meta-transfer regret (Bengio et al. 2019, §3).

A factorisation over an ordered pair (x, y) is a pair of logit tables

    marginal (E, N):  P(x) = softmax(marginal)
    conditional (E, N, N):  P(y | x) = softmax(conditional[x])

batched over E episodes. A → B reads a pair (a, b) as (x, y); B → A reads it as (b, a).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Factorisation = tuple[torch.Tensor, torch.Tensor]  # (marginal logits, conditional logits)


def from_joint(joint: torch.Tensor) -> dict[str, Factorisation]:
    """Both factorisations of ``joint`` ``(N, N)`` (P(A=a, B=b) at [a, b]) as log-probability
    tables: A → B is log P(A), log P(B | A); B → A, by Bayes' rule, log P(B), log P(A | B)."""
    log_joint = joint.clamp_min(torch.finfo(joint.dtype).tiny).log()
    log_a, log_b = log_joint.logsumexp(1), log_joint.logsumexp(0)
    return {
        "a_to_b": (log_a, log_joint - log_a[:, None]),
        "b_to_a": (log_b, log_joint.T - log_b[:, None]),
    }


def ordered(pairs: torch.Tensor, direction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``pairs`` ``(E, M, 2)`` of (a, b) -> (x, y) in the order ``direction`` factorises."""
    a, b = pairs[..., 0], pairs[..., 1]
    return (a, b) if direction == "a_to_b" else (b, a)


def log_likelihood(params: Factorisation, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """log P(x) + log P(y | x) per pair: ``x``, ``y`` ``(E, M)`` -> ``(E, M)``."""
    marginal, conditional = params
    log_px = F.log_softmax(marginal, -1).gather(-1, x)
    rows = conditional.gather(1, x[..., None].expand(*x.shape, conditional.shape[-1]))
    log_py_given_x = F.log_softmax(rows, -1).gather(-1, y[..., None]).squeeze(-1)
    return log_px + log_py_given_x


def sgd_step(params: Factorisation, x: torch.Tensor, y: torch.Tensor, lr: float) -> Factorisation:
    """One SGD step on the mean negative log-likelihood of a batch, per episode (the episodes'
    losses are summed, so each episode's tables get their own gradient).

    Adaptation is part of evaluating a meta-learner, so this differentiates even where
    Lightning evaluates under ``torch.inference_mode`` (the clones make normal tensors)."""
    with torch.inference_mode(False), torch.enable_grad():
        live = tuple(p.detach().clone().requires_grad_() for p in params)
        loss = -log_likelihood(live, x.clone(), y.clone()).mean(-1).sum()
        gradients = torch.autograd.grad(loss, live)
        return tuple(p.detach() - lr * g for p, g in zip(live, gradients))  # type: ignore[return-value]


def online_log_likelihood(
    params: Factorisation,
    pairs: torch.Tensor,
    direction: str,
    lr: float,
    steps: int,
    batch_size: int,
) -> torch.Tensor:
    """log L = Σ_t log P(D_t; θ_t) ``(E,)``: each of ``steps`` batches of ``pairs`` is scored by
    the current tables, then used for one SGD step (the likelihood of the regret)."""
    x, y = ordered(pairs, direction)
    total = torch.zeros(pairs.shape[0], dtype=params[0].dtype, device=pairs.device)
    for step in range(steps):
        batch = slice(step * batch_size, (step + 1) * batch_size)
        total = total + log_likelihood(params, x[:, batch], y[:, batch]).sum(-1)
        params = sgd_step(params, x[:, batch], y[:, batch], lr)
    return total


def adaptation_curve(
    params: Factorisation,
    pairs: torch.Tensor,
    held_out: torch.Tensor,
    direction: str,
    lr: float,
    batch_size: int,
) -> torch.Tensor:
    """Mean held-out log-likelihood per pair after 0, b, 2b, ... transfer examples of SGD in
    batches of b: ``(E, 1 + M // b)``."""
    x, y = ordered(pairs, direction)
    x_out, y_out = ordered(held_out, direction)
    points = [log_likelihood(params, x_out, y_out).mean(-1)]
    for start in range(0, pairs.shape[1] - batch_size + 1, batch_size):
        batch = slice(start, start + batch_size)
        params = sgd_step(params, x[:, batch], y[:, batch], lr)
        points.append(log_likelihood(params, x_out, y_out).mean(-1))
    return torch.stack(points, -1)


def regret(
    structural_logit: torch.Tensor, log_l_a_to_b: torch.Tensor, log_l_b_to_a: torch.Tensor
) -> torch.Tensor:
    """R = −log[σ(γ) L_{A→B} + (1 − σ(γ)) L_{B→A}] per episode, computed in log space.

    Its derivative is ∂R/∂γ = σ(γ) − P(A→B | D), with the posterior
    P(A→B | D) = σ(γ) L_{A→B} / (σ(γ) L_{A→B} + (1 − σ(γ)) L_{B→A}).
    """
    return -torch.logaddexp(
        F.logsigmoid(structural_logit) + log_l_a_to_b,
        F.logsigmoid(-structural_logit) + log_l_b_to_a,
    )
