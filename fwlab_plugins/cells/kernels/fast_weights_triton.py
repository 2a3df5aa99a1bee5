"""Fast weights' memory form (Ba et al. 2016) as one Triton kernel each way.

The same computation as :class:`~fwlab_plugins.cells.fast_weights_sequence.
FastWeightsMemorySequence`, whose docstring has the equations; that PyTorch node is the
reference the tests hold this kernel to. Per step t, with entries e_i the states
[memory_0, h(0) … h(t)] and w_i = η λ^{n_t−1−i}:

    forward:   p = W h(t) + u_t,   q_0 = relu(p)
               z_s = p + Σ_i w_i (e_iᵀ q_s) e_i,   q_{s+1} = relu(LN(z_s)),   h(t+1) = q_S
    backward:  δz = LN'(δq_{s+1} ⊙ [q_{s+1} > 0]),   δq_s = Σ_i w_i (e_iᵀ δz) e_i
               δe_i += w_i ((e_iᵀ q_s) δz + (e_iᵀ δz) q_s),   δh(t) += δp W

Each program owns one sequence and runs the time loop and the inner loop inside the kernel, so
a step costs no launch, and a batch of B sequences keeps B multiprocessors busy. Products are
broadcast multiply-and-sum on CUDA cores, in IEEE precision whatever torch's float32 matmul
setting (one sequence is too few rows for tensor cores). W (padded to ``BLOCK_H``²) stays in
registers for all T steps up to H = 128; up to H = 256 it is read from global memory (the L2
cache) in slices at every step, with h(t) and δp read back in matching slices. The attention
reads the entries ``BLOCK_N`` at a time, as one (entries, units) tile; the entries and their
gradients stay in global memory (the L2 cache at these sizes), because their number grows with
t. δW, δγ and δβ, sums over every step, are one product or reduction each after the backward
loop, in torch.

A layout of 16 sequences per program (``tl.dot``'s smallest tile, on tensor cores) measured
2-5x slower on an H200: at B = 128 it keeps only 8 multiprocessors busy, at B = 16 one.

A program's threads share entries through global memory: a state written at one step is read
back by other threads at the next, so each step ends with a barrier (``tl.debug_barrier``, a
``__syncthreads``, which also orders the block's global-memory accesses).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fwlab_plugins.cells.fast_weights_sequence import start_states
from fwlab_plugins.cells.kernels import on_device, scalar_argument

MAX_HIDDEN = 256  # the widest state a program holds
ON_CHIP_HIDDEN = 128  # up to this, W stays in registers; wider, it is read in slices each step
BLOCK_K = 32  # the slice, in rows of W, of a wider W's product
TILE = 4096  # elements of one (entries, units) tile of the attention
NUM_WARPS = 8  # per program: 2x faster than 4 at both measured shapes (H200)


def fits(weights: torch.Tensor, hidden_size: int, buffer_elements: int) -> bool:
    """Whether the kernel takes the cell: a hidden size it holds on chip, float32/64 weights
    (the node runs in the weights' dtype), and buffers of at most ``buffer_elements`` (see
    :func:`buffer_elements`) whose offsets int32 reaches, as Triton computes them from int32
    arguments."""
    return (
        hidden_size <= MAX_HIDDEN
        and weights.dtype in (torch.float32, torch.float64)
        and buffer_elements < 2**31
    )


def buffer_elements(batch: int, steps: int, hidden: int, memory: int, inner_steps: int) -> int:
    """Elements of the node's largest buffer: the states [memory, h(0), …, h(T)] (B, M+T+1, H)
    or the queries (T, S, B, H)."""
    return batch * hidden * max(memory + steps + 1, steps * inner_steps)


def slower(weights: torch.Tensor) -> str | None:
    """Why the kernel would be slower than the captured PyTorch node here, or ``None``. It was
    measured faster in float32 on an H200 (forward+backward in a CUDA graph: 0.165 ms against
    0.643 at B=128, T=11, H=100; 1.38 against 2.63 at B=16, T=50, H=200); float64 was not
    measured, so ``auto`` leaves it to PyTorch."""
    if weights.dtype != torch.float32:
        return "not measured beyond float32"
    return None


@triton.jit
def _forward_kernel(
    u_ptr, w_ptr, gamma_ptr, beta_ptr, rates_ptr,
    states_ptr, queries_ptr, normed_ptr, rstd_ptr,
    B, T, H, START, eps_ptr,
    INNER: tl.constexpr, LAYER_NORM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, W_ON_CHIP: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)  # one sequence per program; products on CUDA cores, IEEE float32
    cols = tl.arange(0, BLOCK_H)
    units = cols < H
    chunk = tl.arange(0, BLOCK_N)
    length = START + T + 1
    last = START + T
    sequence = states_ptr + b * length * H  # this sequence's (length, H) entries
    if W_ON_CHIP:  # w[j, k] = W[j, k]
        w = tl.load(
            w_ptr + cols[:, None] * H + cols[None, :],
            mask=units[:, None] & units[None, :],
            other=0.0,
        )
    gamma = tl.load(gamma_ptr + cols, mask=units, other=0.0)
    beta = tl.load(beta_ptr + cols, mask=units, other=0.0)
    eps = tl.load(eps_ptr)  # the layer norm's ε, in the kernel's dtype
    h = tl.load(sequence + START * H + cols, mask=units, other=0.0)  # h(0)
    for t in range(T):
        n = START + t + 1  # entries e_0 … h(t)
        p = tl.load(u_ptr + b * T * H + t * H + cols, mask=units, other=0.0)
        if W_ON_CHIP:  # zero padding keeps padded units 0 through every step
            p += tl.sum(w * h[None, :], axis=1)
        else:  # W h(t) in slices of BLOCK_K inputs, h(t) read back from the states buffer
            for k in tl.static_range(0, BLOCK_H, BLOCK_K):
                inputs = k + tl.arange(0, BLOCK_K)
                h_part = tl.load(sequence + (n - 1) * H + inputs, mask=inputs < H, other=0.0)
                w_part = tl.load(  # Wᵀ[inputs, :]
                    w_ptr + cols[None, :] * H + inputs[:, None],
                    mask=(inputs < H)[:, None] & units[None, :],
                    other=0.0,
                )
                p += tl.sum(w_part * h_part[:, None], axis=0)
        q = tl.maximum(p, 0.0)
        for s in tl.static_range(INNER):
            row = t * INNER + s
            tl.store(queries_ptr + row * B * H + b * H + cols, q, mask=units)
            attended = tl.zeros((BLOCK_H,), dtype=p.dtype)  # A(t) q_s
            for first in range(0, n, BLOCK_N):
                present = first + chunk < n
                e = tl.load(
                    sequence + (first + chunk)[:, None] * H + cols[None, :],
                    mask=present[:, None] & units[None, :],
                    other=0.0,
                )
                rate = tl.load(rates_ptr + first + chunk + last - n, mask=present, other=0.0)
                scores = tl.sum(e * q[None, :], axis=1) * rate  # w_i e_iᵀ q_s
                attended += tl.sum(scores[:, None] * e, axis=0)
            z = p + attended
            if LAYER_NORM:
                mean = tl.sum(z, axis=0) / H
                centred = tl.where(units, z - mean, 0.0)
                rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / H + eps)
                normed = centred * rstd
                tl.store(normed_ptr + row * B * H + b * H + cols, normed, mask=units)
                tl.store(rstd_ptr + row * B + b, rstd)
                z = normed * gamma + beta
            q = tl.maximum(z, 0.0)
        tl.store(sequence + n * H + cols, q, mask=units)  # h(t+1)
        h = q
        tl.debug_barrier()  # h(t+1) is an entry of the next step, read by other threads


@triton.jit
def _backward_kernel(
    grads_ptr, states_ptr, queries_ptr, normed_ptr, rstd_ptr, w_ptr, gamma_ptr, rates_ptr,
    grad_input_ptr, grad_y_ptr,
    B, T, H, START,
    INNER: tl.constexpr, LAYER_NORM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, W_ON_CHIP: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    units = cols < H
    chunk = tl.arange(0, BLOCK_N)
    length = START + T + 1
    last = START + T
    sequence = states_ptr + b * length * H
    sequence_grads = grads_ptr + b * length * H
    if W_ON_CHIP:
        w = tl.load(
            w_ptr + cols[:, None] * H + cols[None, :],
            mask=units[:, None] & units[None, :],
            other=0.0,
        )
    gamma = tl.load(gamma_ptr + cols, mask=units, other=0.0)
    for step in range(T):
        t = T - 1 - step
        n = START + t + 1
        grad_q = tl.load(sequence_grads + n * H + cols, mask=units, other=0.0)  # δh(t+1), complete
        grad_p = tl.zeros((BLOCK_H,), dtype=grad_q.dtype)
        for inner in tl.static_range(INNER):
            s = INNER - 1 - inner
            row = t * INNER + s
            if s == INNER - 1:  # q_S = h(t+1)
                out = tl.load(sequence + n * H + cols, mask=units, other=0.0)
            else:
                out = tl.load(queries_ptr + (row + 1) * B * H + b * H + cols, mask=units, other=0.0)
            grad_y = tl.where(out > 0, grad_q, 0.0)
            tl.store(grad_y_ptr + row * B * H + b * H + cols, grad_y, mask=units)
            if LAYER_NORM:  # δz = (1/σ)(δẑ − mean(δẑ) − ẑ mean(δẑ ⊙ ẑ)),  δẑ = γ ⊙ δy
                normed = tl.load(normed_ptr + row * B * H + b * H + cols, mask=units, other=0.0)
                rstd = tl.load(rstd_ptr + row * B + b)
                grad_normed = grad_y * gamma
                mean_grad = tl.sum(grad_normed, axis=0) / H
                mean_projection = tl.sum(grad_normed * normed, axis=0) / H
                grad_z = rstd * (grad_normed - mean_grad - normed * mean_projection)
                grad_z = tl.where(units, grad_z, 0.0)
            else:
                grad_z = grad_y
            grad_p += grad_z
            q = tl.load(queries_ptr + row * B * H + b * H + cols, mask=units, other=0.0)
            grad_q = tl.zeros((BLOCK_H,), dtype=grad_p.dtype)
            for first in range(0, n, BLOCK_N):
                present = first + chunk < n
                entry_mask = present[:, None] & units[None, :]
                offsets = (first + chunk)[:, None] * H + cols[None, :]
                e = tl.load(sequence + offsets, mask=entry_mask, other=0.0)
                rate = tl.load(rates_ptr + first + chunk + last - n, mask=present, other=0.0)
                scores = tl.sum(e * q[None, :], axis=1) * rate
                grad_scores = tl.sum(e * grad_z[None, :], axis=1) * rate  # w_i e_iᵀ δz
                grad_q += tl.sum(grad_scores[:, None] * e, axis=0)  # A(t) δz: A(t) is symmetric
                grad_e = tl.load(sequence_grads + offsets, mask=entry_mask, other=0.0)
                grad_e += scores[:, None] * grad_z[None, :] + grad_scores[:, None] * q[None, :]
                tl.store(sequence_grads + offsets, grad_e, mask=entry_mask)
            tl.debug_barrier()  # the entries' gradients are read again, by other threads
        q0 = tl.load(queries_ptr + t * INNER * B * H + b * H + cols, mask=units, other=0.0)
        grad_p += tl.where(q0 > 0, grad_q, 0.0)
        grad_input = grad_input_ptr + b * T * H + t * H  # δu_t = δp
        tl.store(grad_input + cols, grad_p, mask=units)
        grad_h = tl.load(sequence_grads + (n - 1) * H + cols, mask=units, other=0.0)
        if W_ON_CHIP:
            grad_h += tl.sum(w * grad_p[:, None], axis=0)  # δh(t) += δp W
        else:  # in slices of BLOCK_K units of δp, read back from where it was just stored
            tl.debug_barrier()
            for k in tl.static_range(0, BLOCK_H, BLOCK_K):
                rows = k + tl.arange(0, BLOCK_K)
                grad_p_part = tl.load(grad_input + rows, mask=rows < H, other=0.0)
                w_part = tl.load(
                    w_ptr + rows[:, None] * H + cols[None, :],
                    mask=(rows < H)[:, None] & units[None, :],
                    other=0.0,
                )
                grad_h += tl.sum(w_part * grad_p_part[:, None], axis=0)
        tl.store(sequence_grads + (n - 1) * H + cols, grad_h, mask=units)
        tl.debug_barrier()  # δh(t) is read back at the next (earlier) step


def _launch_config(hidden_size: int, batch: int, entries: int) -> tuple[tuple[int], dict]:
    block_h = max(16, triton.next_power_of_2(hidden_size))
    block_n = max(2, min(TILE // block_h, triton.next_power_of_2(entries)))
    meta = {
        "BLOCK_H": block_h,
        "BLOCK_N": block_n,
        "W_ON_CHIP": block_h <= ON_CHIP_HIDDEN,
        "BLOCK_K": BLOCK_K,
        "num_warps": NUM_WARPS,
    }
    return (batch,), meta


class FusedFastWeightsMemory(torch.autograd.Function):
    """The Triton twin of ``FastWeightsMemorySequence``: same arguments, same buffer
    ``[memory_0, h(0), …, h(T)]`` (B, n_0+T+1, H) returned."""

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
        input_part = input_part.contiguous()
        weights = recurrent_weights.contiguous()
        batch, steps, hidden = input_part.shape
        start = memory0.shape[1]
        last = start + steps
        states, rates = start_states(input_part, h0, memory0, decay, learning_rate)
        new = input_part.new_empty
        queries = new(steps, inner_steps, batch, hidden)
        normed = new(steps, inner_steps, batch, hidden) if layer_norm else new(0)
        rstd = new(steps, inner_steps, batch) if layer_norm else new(0)
        gamma = _affine(norm_weight, hidden, input_part, 1.0)
        beta = _affine(norm_bias, hidden, input_part, 0.0)
        grid, meta = _launch_config(hidden, batch, last)
        with on_device(input_part.device):
            _forward_kernel[grid](
                input_part, weights, gamma, beta, rates, states, queries, normed, rstd,
                batch, steps, hidden, start, scalar_argument(eps, input_part),
                INNER=inner_steps, LAYER_NORM=layer_norm, **meta,
            )  # fmt: skip
        ctx.start, ctx.layer_norm = start, layer_norm
        ctx.has_affine = (norm_weight is not None, norm_bias is not None)
        ctx.save_for_backward(states, queries, normed, rstd, weights, gamma, rates)
        return states

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_states: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        states, queries, normed, rstd, weights, gamma, rates = ctx.saved_tensors
        start = ctx.start
        steps, inner_steps, batch, hidden = queries.shape
        last = start + steps
        grads = grad_states.clone(memory_format=torch.contiguous_format)  # δ of every entry
        grad_input = states.new_empty(batch, steps, hidden)  # δu_t = δp_t
        grad_outputs = torch.empty_like(queries)  # δy_s, for δγ and δβ after the loop
        grid, meta = _launch_config(hidden, batch, last)
        with on_device(states.device):
            _backward_kernel[grid](
                grads, states, queries, normed, rstd, weights, gamma, rates,
                grad_input, grad_outputs,
                batch, steps, hidden, start,
                INNER=inner_steps, LAYER_NORM=ctx.layer_norm, **meta,
            )  # fmt: skip
        previous = states[:, start:last].flatten(0, 1)  # h(t) of every (b, t)
        grad_w = grad_input.flatten(0, 1).T @ previous
        grad_gamma = grad_beta = None
        every_step_and_sample = (0, 1, 2)  # (T, S, B) of the (T, S, B, H) buffers
        if ctx.has_affine[0] and ctx.needs_input_grad[2]:
            grad_gamma = (grad_outputs * normed).sum(every_step_and_sample)
        if ctx.has_affine[1] and ctx.needs_input_grad[3]:
            grad_beta = grad_outputs.sum(every_step_and_sample)
        return (grad_input, grad_w, grad_gamma, grad_beta,
                grads[:, start], grads[:, :start], None, None, None, None, None)  # fmt: skip


def _affine(parameter: torch.Tensor | None, hidden: int, like: torch.Tensor, fill: float):
    """γ or β for the kernel: the parameter, or its neutral value where layer norm has none."""
    if parameter is not None:
        return parameter.contiguous()
    return torch.full((hidden,), fill, dtype=like.dtype, device=like.device)
