"""Fast weights' memory form over a whole sequence as one autograd node with a hand-written
backward.

Autograd through the step-by-step memory form records about a dozen nodes per step and copies
the growing memory [h(0) … h(t)] at every step (O(T²) traffic). Here all states live in one
buffer, ``states = [memory_0, h(0), h(1), …, h(T)]`` (B, n_0+T+1, H), written as they are made;
the step at t attends over its prefix, entries e_0 … e_{n_t−1} (n_t = n_0+t+1, h(t) the last).

Forward, per step t (w_i = η λ^{n_t−1−i}, the decayed learning rate of entry i):

    p = W h(t) + u_t                           u_t = C x(t) + b, computed for all t beforehand
    q_0 = relu(p)
    c_s = (e_iᵀ q_s)_i,   a_s = Σ_i w_i c_s,i e_i  = A(t) q_s          s = 0 … S−1
    z_s = p + a_s,   y_s = LN(z_s),   q_{s+1} = relu(y_s)
    h(t+1) = q_S

Backward, with δx = ∂L/∂x, from δh(t+1) (complete once the later steps are done):

    δq_S = δh(t+1);  for s = S−1 … 0:
        δy = δq_{s+1} ⊙ [q_{s+1} > 0],   δz = LN'(δy),   δp += δz
        d_i = e_iᵀ δz,   δq_s = Σ_i w_i d_i e_i                 (A(t) is symmetric)
        δe_i += w_i (c_s,i δz + d_i q_s)                       two in-place rank-1 updates
    δp += δq_0 ⊙ [q_0 > 0];   δu_t = δp;   δh(t) += δp W;   δW = Σ_t δp_tᵀ h(t)  (one product)

LN' is ATen's layer-norm backward kernel; δγ = Σ δy ⊙ ẑ and δβ = Σ δy (ẑ the normalised z) are
summed over all steps at once after the loop. The scores c_s are recomputed in the backward
pass, in the same product as d, so what is kept grows as O(T·H), not O(T²). Per-step buffers
are time-major (T, S, B, H) and split into per-step views once, outside the loops.
"""

from __future__ import annotations

import torch

aten = torch.ops.aten


def start_states(
    input_part: torch.Tensor,
    h0: torch.Tensor,
    memory0: torch.Tensor,
    decay: float,
    learning_rate: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The states buffer (B, n_0+T+1, H) holding [memory_0, h(0)] so far, and the rates
    η λ^{last-1-i} of entry i at the last step (last = n_0+T; step t uses the final n_t)."""
    batch, steps, hidden = input_part.shape
    start = memory0.shape[1]
    last = start + steps
    states = input_part.new_empty(batch, last + 1, hidden)
    states[:, :start] = memory0
    states[:, start] = h0
    powers = torch.arange(last - 1, -1, -1, device=h0.device, dtype=h0.dtype)
    return states, learning_rate * decay**powers


class FastWeightsMemorySequence(torch.autograd.Function):
    """``(u (B,T,H), W, γ, β, h_0, memory_0 (B,n_0,H)) -> states (B, n_0+T+1, H)``: the buffer
    ``[memory_0, h(0), …, h(T)]``; the outputs are ``states[:, n_0+1:]``. γ, β are ``None``
    without layer norm. See the module for the equations."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        input_part: torch.Tensor,
        recurrent_weights: torch.Tensor,
        norm_weight: torch.Tensor | None,
        norm_bias: torch.Tensor | None,
        h0: torch.Tensor,
        memory0: torch.Tensor,
        decay: float,
        learning_rate: float,
        inner_steps: int,
        layer_norm: bool,
        eps: float,
    ) -> torch.Tensor:
        batch, steps, hidden = input_part.shape
        start = memory0.shape[1]  # n_0
        last = start + steps  # entries the last step attends over
        states, rates = start_states(input_part, h0, memory0, decay, learning_rate)
        new = input_part.new_empty
        queries = new(steps, inner_steps, batch, hidden)  # q_0 … q_{S-1}
        norm_inputs = new(steps, inner_steps, batch, hidden)  # z_s
        statistics = new(2, steps, inner_steps, batch, 1)  # LN's mean and 1/σ of each z_s
        # per-step views, made once: (t, s) is row t·S + s of each flattened buffer
        query_of, input_of, mean_of, rstd_of = (
            buffer.flatten(0, 1).unbind(0)
            for buffer in (queries, norm_inputs, statistics[0], statistics[1])
        )
        recurrent_t = recurrent_weights.t()
        for t, u in enumerate(input_part.unbind(1)):
            entries = states[:, : start + t + 1]  # e_0 … h(t)
            entries_t = entries.transpose(1, 2)
            rate = rates[last - start - t - 1 :]
            p = torch.addmm(u, states[:, start + t], recurrent_t)
            q = torch.clamp_min(p, 0.0, out=query_of[t * inner_steps])
            for s in range(inner_steps):
                row = t * inner_steps + s
                # row-vector products: bmm runs matrix-vector ones (entries q) several times slower
                c = torch.bmm(q.unsqueeze(1), entries_t)  # (B, 1, n_t)
                z = input_of[row]  # p + A(t) q_s
                torch.baddbmm(p.unsqueeze(1), c * rate, entries, out=z.unsqueeze(1))
                q = states[:, start + t + 1] if s == inner_steps - 1 else query_of[row + 1]
                if layer_norm:
                    aten.native_layer_norm.out(
                        z, [hidden], norm_weight, norm_bias, eps,
                        out0=q, out1=mean_of[row], out2=rstd_of[row],
                    )  # fmt: skip
                    q.clamp_min_(0.0)
                else:
                    torch.clamp_min(z, 0.0, out=q)
        ctx.start, ctx.rates, ctx.layer_norm = start, rates, layer_norm
        ctx.save_for_backward(
            states, queries, norm_inputs, statistics, recurrent_weights, norm_weight, norm_bias
        )
        return states

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_states: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        (states, queries, norm_inputs, statistics,
         recurrent_weights, norm_weight, norm_bias) = ctx.saved_tensors  # fmt: skip
        start, rates = ctx.start, ctx.rates
        steps, inner_steps, batch, hidden = queries.shape
        last = start + steps
        # δ of every entry, accumulated in place as later steps are undone
        grads = grad_states.clone(memory_format=torch.contiguous_format)
        grad_input = states.new_empty(steps, batch, hidden)  # δu_t = δp_t, time-major
        grad_outputs = torch.empty_like(queries)  # δy_s, for δγ and δβ after the loop
        query_of, input_of, mean_of, rstd_of, grad_y_of = (
            buffer.flatten(0, 1).unbind(0)
            for buffer in (queries, norm_inputs, statistics[0], statistics[1], grad_outputs)
        )
        input_only = [True, False, False]
        for t in reversed(range(steps)):
            entries = states[:, : start + t + 1]
            entries_t = entries.transpose(1, 2)
            entry_grads = grads[:, : start + t + 1]
            rate = rates[last - start - t - 1 :]
            grad_q = grads[:, start + t + 1]  # δh(t+1), complete
            grad_p = grad_input[t]
            for s in reversed(range(inner_steps)):
                row = t * inner_steps + s
                out = states[:, start + t + 1] if s == inner_steps - 1 else query_of[row + 1]
                grad_y = aten.threshold_backward.grad_input(
                    grad_q, out, 0.0, grad_input=grad_y_of[row]
                )
                if ctx.layer_norm:
                    grad_z = aten.native_layer_norm_backward(
                        grad_y, input_of[row], [hidden], mean_of[row], rstd_of[row],
                        norm_weight, norm_bias, input_only,
                    )[0]  # fmt: skip
                else:
                    grad_z = grad_y
                if s == inner_steps - 1:
                    grad_p.copy_(grad_z)
                else:
                    grad_p.add_(grad_z)
                # (w c_s, w d) in one product, d_i = e_iᵀ δz: c_s is recomputed, not kept
                query = query_of[row]
                pair = torch.stack([query, grad_z], dim=1)  # (B, 2, H)
                weighted = torch.bmm(pair, entries_t) * rate  # (B, 2, n_t)
                grad_q = torch.bmm(weighted[:, 1:], entries).squeeze(1)
                # δe_i += w_i c_i δz + w_i d_i q_s (two in-place updates: faster than baddbmm_)
                entry_grads.addcmul_(weighted[:, 0].unsqueeze(2), grad_z.unsqueeze(1))
                entry_grads.addcmul_(weighted[:, 1].unsqueeze(2), query.unsqueeze(1))
            grad_p.add_(aten.threshold_backward(grad_q, query_of[t * inner_steps], 0.0))
            grads[:, start + t].addmm_(grad_p, recurrent_weights)  # δh(t) += δp W
        previous = states[:, start:last].transpose(0, 1).reshape(-1, hidden)  # h(t), time-major
        grad_w = grad_input.reshape(-1, hidden).T @ previous
        grad_gamma = grad_beta = None
        if ctx.layer_norm:
            normalised = (norm_inputs - statistics[0]) * statistics[1]  # ẑ of every step
            every_step_and_sample = (0, 1, 2)  # (T, S, B) of the (T, S, B, H) buffers
            if norm_weight is not None and ctx.needs_input_grad[2]:
                grad_gamma = (grad_outputs * normalised).sum(every_step_and_sample)
            if norm_bias is not None and ctx.needs_input_grad[3]:
                grad_beta = grad_outputs.sum(every_step_and_sample)
        return (grad_input.transpose(0, 1), grad_w, grad_gamma, grad_beta,
                grads[:, start], grads[:, :start], None, None, None, None, None)  # fmt: skip
