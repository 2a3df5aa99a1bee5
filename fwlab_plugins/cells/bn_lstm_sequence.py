"""The BN-LSTM's recurrence over a whole sequence as one autograd node with a hand-written backward.

Autograd through the step-by-step code records some thirty nodes per step; on a CPU their
bookkeeping, and the T small weight-gradient products, cost more than the arithmetic. Here the
forward pass runs the loop without recording, and the backward pass runs it in reverse with the
derivatives written out; the gradient of W_h, a sum over steps, is one matrix product at the end.

Forward, per step (u_t = BN(W_x x_t) + b, computed for all t beforehand):

    r_t = W_h h_{t-1},   r̂_t = (r_t − μ_t) ρ_t               ρ = 1/sqrt(σ² + ε), statistics of r_t
    (f, i, o) = σ(γ_h r̂_t + u_t)[:3H],   g = tanh(γ_h r̂_t + u_t)[3H:]
    c_t = f c_{t-1} + i g,   ĉ_t = (c_t − μ'_t) ρ'_t,   n_t = γ_c ĉ_t + β_c
    h_t = o tanh(n_t)

Backward, with δx = ∂L/∂x:

    δo = δh tanh(n),   δn = δh o (1 − tanh²(n)),   δγ_c += Σ_b δn ĉ,   δβ_c += Σ_b δn
    δc = δc_carried + BN'(γ_c δn; ĉ, ρ')
    δf, δi, δg = δc c_{t-1}, δc g, δc i;     δc_carried = δc f
    δa = (δf f(1−f), δi i(1−i), δo o(1−o), δg (1−g²))  = δu_t
    δγ_h += Σ_b δa r̂,   δr = BN'(γ_h δa; r̂, ρ),   δh_carried = δr W_h,   δW_h = Σ_t δr_tᵀ h_{t-1}

where, in training (batch statistics), BN'(d; x̂, ρ) = ρ (d − mean_b d − x̂ mean_b(d x̂)), and in
evaluation (population statistics) BN'(d; x̂, ρ) = ρ d, both computed by ATen's batch-norm
backward kernel (with δγ). Running statistics are updated exactly as
:class:`.stepwise_batch_norm.StepwiseBatchNorm` updates them, step by step. Per-step buffers are
time-major (T, B, ...), so each step reads and writes contiguous blocks.
"""

from __future__ import annotations

import torch

from fwlab_plugins.cells.stepwise_batch_norm import StepwiseBatchNorm

aten = torch.ops.aten


class _Norm:
    """One StepwiseBatchNorm's statistics for each step of a sequence: in training the batch's
    (F.batch_norm's update of the step's running averages included), in evaluation the
    population's. Views per step are made once, outside the time loop."""

    def __init__(self, norm: StepwiseBatchNorm, start: int, steps: int, device: torch.device):
        self.norm, self.training = norm, norm.training
        if self.training:
            norm.trained_steps.clamp_(min=start + steps)
            # steps from max_time_steps on share the last slot
            first, last = min(start, norm.max_time_steps - 1), norm.max_time_steps
            means = norm.running_mean[first:last][:steps].unbind(0)
            variances = norm.running_var[first:last][:steps].unbind(0)
            extra = steps - len(means)
            self.means = [*means, *[means[-1]] * extra]
            self.variances = [*variances, *[variances[-1]] * extra]
        else:
            mean, var = norm.population_statistics(start, steps, device)
            self.means, self.variances = mean.unbind(0), var.unbind(0)

    def forward(
        self,
        x: torch.Tensor,
        t: int,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        out: torch.Tensor,
        saved_mean: torch.Tensor,
        saved_rho: torch.Tensor,
    ) -> torch.Tensor:
        """BN(x) into ``out``; in training the batch mean and ρ into ``saved_*``."""
        norm = self.norm
        aten.native_batch_norm.out(
            x, weight, bias, self.means[t], self.variances[t], self.training, norm.momentum,
            norm.eps, out=out, save_mean=saved_mean, save_invstd=saved_rho,
        )  # fmt: skip
        return out

    def backward(
        self,
        grad: torch.Tensor,
        x: torch.Tensor,
        t: int,
        weight: torch.Tensor,
        saved_mean: torch.Tensor,
        saved_rho: torch.Tensor,
        out: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """δx, δγ and δβ of step t into ``out``; returns δx."""
        # the population statistics are read in evaluation only (unchanged since forward)
        aten.native_batch_norm_backward.out(
            grad, x, weight, self.means[t], self.variances[t], saved_mean, saved_rho,
            self.training, self.norm.eps, [True, True, True], out0=out[0], out1=out[1],
            out2=out[2],
        )  # fmt: skip
        return out[0]


class BNLSTMSequence(torch.autograd.Function):
    """``(u (B,T,4H), W_h, γ_h, γ_c, β_c, h_0, c_0) -> (h (B,T,H), c_T)``; see the module.

    A training batch needs at least two sequences (batch statistics); the cell runs a single
    sequence through the stepwise code, which keeps the statistics as they are."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        input_part: torch.Tensor,
        recurrent_weights: torch.Tensor,
        recurrent_gamma: torch.Tensor,
        cell_gamma: torch.Tensor,
        cell_beta: torch.Tensor,
        h0: torch.Tensor,
        c0: torch.Tensor,
        recurrent_norm: StepwiseBatchNorm,
        cell_norm: StepwiseBatchNorm,
        start: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch, steps, four_hidden = input_part.shape
        hidden = four_hidden // 4
        norm_r = _Norm(recurrent_norm, start, steps, input_part.device)
        norm_c = _Norm(cell_norm, start, steps, input_part.device)
        # time-major (T, B, ...) buffers, split into per-step views once: every step reads and
        # writes contiguous blocks, with few Python-level operations
        inputs = input_part.transpose(0, 1).contiguous().unbind(0)
        new = input_part.new_empty
        hs, cs, tanh_n = (
            new(steps, batch, hidden),
            new(steps, batch, hidden),
            new(steps, batch, hidden),
        )
        rs, gates = new(steps, batch, four_hidden), new(steps, batch, four_hidden)
        activations = new(steps, batch, four_hidden)  # σ(f), σ(i), σ(o), tanh(g)
        saved_r = new(2, steps, four_hidden)  # batch mean and ρ of r_t (training)
        saved_c = new(2, steps, hidden)
        tanhs, gate_tanhs = activations[..., 3 * hidden :], gates[..., 3 * hidden :]
        per_step = zip(
            inputs, rs.unbind(0), gates.unbind(0), gate_tanhs.unbind(0),
            tanhs.unbind(0), activations.unbind(0), cs.unbind(0),
            tanh_n.unbind(0), hs.unbind(0), saved_r[0].unbind(0), saved_r[1].unbind(0),
            saved_c[0].unbind(0), saved_c[1].unbind(0),
        )  # fmt: skip
        # W_hᵀ stored row-major: MKL's small products run about twice as fast as on the
        # transposed view (forward h W_hᵀ, backward δr W_h = δr (W_hᵀ)ᵀ)
        recurrent_weights_t = recurrent_weights.T.contiguous()
        h, c = h0, c0
        for t, (u, r, gate, gate_tanh, tanh, act, c_t, tanh_t, h_t,
                mean_r, rho_r, mean_c, rho_c) in enumerate(per_step):  # fmt: skip
            torch.mm(h, recurrent_weights_t, out=r)
            norm_r.forward(r, t, recurrent_gamma, None, gate, mean_r, rho_r).add_(u)
            # σ over the whole contiguous row (its g part then overwritten): faster than σ of
            # the strided (f, i, o) block alone
            torch.sigmoid(gate, out=act)
            torch.tanh(gate_tanh, out=tanh)
            forget, input_gate, output, candidate = act.chunk(4, dim=1)
            c = torch.addcmul(torch.mul(forget, c, out=c_t), input_gate, candidate, out=c_t)
            n = norm_c.forward(c, t, cell_gamma, cell_beta, tanh_t, mean_c, rho_c)
            torch.tanh(n, out=tanh_t)
            h = torch.mul(output, tanh_t, out=h_t)
        ctx.norms = (norm_r, norm_c)
        ctx.save_for_backward(
            hs, cs, rs, activations, tanh_n, saved_r, saved_c,
            recurrent_weights_t, recurrent_gamma, cell_gamma, h0, c0,
        )  # fmt: skip
        return hs.transpose(0, 1), c.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_hs: torch.Tensor, grad_c_last: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        (hs, cs, rs, activations, tanh_n, saved_r, saved_c,
         recurrent_weights_t, recurrent_gamma, cell_gamma, h0, c0) = ctx.saved_tensors  # fmt: skip
        recurrent_weights = recurrent_weights_t.T
        norm_r, norm_c = ctx.norms
        steps, batch, hidden = hs.shape
        new = hs.new_empty
        grad_input = torch.empty_like(activations)  # δu_t = δa_t, time-major
        grad_r = torch.empty_like(activations)  # δr_t, for δW_h after the loop
        grad_act = new(batch, 4 * hidden)  # ∂L/∂(σ(f), σ(i), σ(o), tanh(g)) of the step
        grad_c_bn = new(batch, hidden)
        # per-step δγ, δβ, summed after the loop (δβ_h is not used: β_h is fixed at 0)
        grad_gamma_r, grad_beta_r = new(steps, 4 * hidden), new(steps, 4 * hidden)
        grad_gamma_c, grad_beta_c = new(steps, hidden), new(steps, hidden)
        grad_h = torch.zeros_like(h0)
        grad_c = grad_c_last.clone()
        grad_hs = grad_hs.transpose(0, 1).contiguous()
        sigmoids, tanhs = slice(0, 3 * hidden), slice(3 * hidden, 4 * hidden)
        act_f, act_i, act_o, act_g = grad_act.chunk(4, dim=1)
        c_previous = [c0, *cs.unbind(0)[:-1]]
        per_step = zip(
            grad_hs.unbind(0), activations.unbind(0), tanh_n.unbind(0), cs.unbind(0),
            c_previous, grad_input.unbind(0), grad_r.unbind(0), grad_gamma_r.unbind(0),
            grad_beta_r.unbind(0), grad_gamma_c.unbind(0), grad_beta_c.unbind(0),
            rs.unbind(0), saved_r[0].unbind(0), saved_r[1].unbind(0), saved_c[0].unbind(0),
            saved_c[1].unbind(0),
        )  # fmt: skip
        for t, (grad_out, act, tanh_t, c_t, c_before, grad_a, grad_r_t, grad_gamma_r_t,
                grad_beta_r_t, grad_gamma_c_t, grad_beta_c_t, r_t, mean_r, rho_r, mean_c,
                rho_c) in reversed(list(enumerate(per_step))):  # fmt: skip
            grad_h = grad_h + grad_out
            forget, input_gate, output, candidate = act.chunk(4, dim=1)
            grad_n = aten.tanh_backward(grad_h * output, tanh_t)
            norm_c.backward(
                grad_n, c_t, t, cell_gamma, mean_c, rho_c,
                (grad_c_bn, grad_gamma_c_t, grad_beta_c_t),
            )  # fmt: skip
            grad_c = grad_c + grad_c_bn
            torch.mul(grad_c, c_before, out=act_f)
            torch.mul(grad_c, candidate, out=act_i)
            torch.mul(grad_h, tanh_t, out=act_o)
            torch.mul(grad_c, input_gate, out=act_g)
            aten.sigmoid_backward.grad_input(
                grad_act[:, sigmoids], act[:, sigmoids], grad_input=grad_a[:, sigmoids]
            )
            aten.tanh_backward.grad_input(
                grad_act[:, tanhs], act[:, tanhs], grad_input=grad_a[:, tanhs]
            )
            grad_c = grad_c * forget
            norm_r.backward(
                grad_a, r_t, t, recurrent_gamma, mean_r, rho_r,
                (grad_r_t, grad_gamma_r_t, grad_beta_r_t),
            )  # fmt: skip
            grad_h = grad_r_t @ recurrent_weights
        previous = torch.cat([h0.unsqueeze(0), hs[:-1]], dim=0)  # h_{t-1} for every t
        grad_w = grad_r.reshape(-1, 4 * hidden).T @ previous.reshape(-1, hidden)
        # batch-major and contiguous: batch_norm's backward (the input term's) is several
        # times slower on strided gradients
        grad_input = grad_input.transpose(0, 1).contiguous()
        return (grad_input, grad_w, grad_gamma_r.sum(0), grad_gamma_c.sum(0), grad_beta_c.sum(0),
                grad_h, grad_c, None, None, None)  # fmt: skip
