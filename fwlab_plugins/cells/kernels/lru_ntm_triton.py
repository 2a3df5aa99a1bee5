"""The LRU-NTM's time loop as one Triton kernel each way: the passes of :mod:`.lru_ntm_node`'s
autograd node, which holds the rest (buffers, outputs, weight gradients), as for the C kernel.

Each program owns one sequence and runs all T steps, as ``lru_ntm_cpu.c`` does for one sequence
(its comments give each buffer's meaning; the equations are in :mod:`~fwlab_plugins.cells.
lru_ntm` and :mod:`~fwlab_plugins.cells.lru_addressing`). Per step t:

    forward:   gates = u_t + W_rec [h_{t-1}, r_{t-1}],  the LSTM update,
               [k̃, (ã,) α] = W_head h_t + b,  v = a = tanh ã (write_vector=add) or v = k (key)
               M(least used of w^u_{t-1}) = 0,  M += Σ_r w^w_r v_rᵀ,  w^r = softmax(cos(k, M)),
               r_t = w^r M,  w^u_t = γ w^u_{t-1} + Σ_r w^r_r + w^w_r
    backward:  δM_t = δM + s ⊙ M_t + Σ_r w^r_r δr_rᵀ + δdot_r k_rᵀ   (s: the slot norms' share)
               δw^w_r(i) = δw^u(i) + v_r·δM_t(i)
               δv_r = Σ_i w^w_r(i) δM_t(i),  δk_r = s_r k_r + Σ_i δdot_r(i) M_t(i) (+ δv_r: key)
               M_{t-1} = M_t − Σ_r w^w_r v_rᵀ with the cleared slot put back (the write undone)

``ADD`` (a compile-time constant) picks the written vector v: the kernel of each form has no
code of the other's.

The memory (N × W), its gradient, the usage and the read weightings stay in registers for all
steps; the heads' work is one (R, N, W) tile. The two matrix-vector products per step read the
weights from global memory (the L2 cache) in (ROWS, COLS) tiles, broadcast multiply-and-sum on
CUDA cores in IEEE precision (one sequence is too few rows for tensor cores). Vectors that
another thread of the program reads next ([r, h], the gates, the heads' outputs and their
gradients) go through global memory, with a barrier (``tl.debug_barrier``) between writer and
reader.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fwlab_plugins.cells.kernels import lru_ntm_node, on_device, scalar_argument
from fwlab_plugins.cells.kernels.activations_triton import sigmoid, tanh

MAX_HEAD_TILE = 2**15  # R·N·W, padded to powers of two: the (R, N, W) tile of a program
ROWS, COLS = 32, 128  # the weights' tile in a matrix-vector product
NUM_WARPS = 8
COSINE_EPS = tl.constexpr(1e-8)  # lru_addressing.COSINE_EPS (a constexpr: kernels read it)


def fits(dtype: torch.dtype, heads: int, slots: int, width: int, elements: int) -> bool:
    """Whether the kernel takes the cell: float32/64, an (R, N, W) tile it holds, and buffers of
    at most ``elements`` whose offsets int32 reaches (Triton computes them from int32
    arguments)."""
    tile = triton.next_power_of_2(heads) * triton.next_power_of_2(slots)
    return (
        dtype in (torch.float32, torch.float64)
        and tile * triton.next_power_of_2(width) <= MAX_HEAD_TILE
        and elements < 2**31
    )


def buffer_elements(
    batch: int, steps: int, hidden: int, heads: int, slots: int, width: int, add_vector: bool
) -> int:
    """The elements of the largest buffer the kernels index (see :mod:`.lru_ntm_node`): the
    per-step ones, (T + 1) × B × the widest row (4H gates, [r, h], [k̃, (ã,) α], R × N
    weightings), or the memory, B × W × N."""
    reads_size = heads * width
    head_size = (2 if add_vector else 1) * reads_size + heads
    row = max(4 * hidden, reads_size + hidden, head_size, heads * slots)
    return max((steps + 1) * batch * row, batch * width * slots)


def slower() -> str | None:
    """Why ``auto`` leaves CUDA runs to the graph-captured PyTorch loop: the kernel is checked
    through Triton's interpreter but has not been timed on a GPU (``model.kernel=triton`` runs
    it; ``scripts/bench.py --device cuda`` times it as the ``fused`` path)."""
    return "not measured on a GPU yet"


@triton.jit
def _matvec(
    out,
    add,
    matrix,
    row_stride,
    column_stride,
    vector,
    rows,
    columns,
    HAS_ADD: tl.constexpr,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
):
    """out[i] = add[i] + Σ_j A(i, j) vector[j] for i < rows, j < columns, where A(i, j) is
    matrix[i·row_stride + j·column_stride] (a weight matrix or its transpose); add may be out
    (accumulate), or absent (HAS_ADD false)."""
    for start in range(0, rows, ROWS):
        i = start + tl.arange(0, ROWS)
        sums = tl.zeros([ROWS], dtype=matrix.dtype.element_ty)
        for first in range(0, columns, COLS):
            j = first + tl.arange(0, COLS)
            tile = tl.load(
                matrix + i[:, None] * row_stride + j[None, :] * column_stride,
                mask=(i[:, None] < rows) & (j[None, :] < columns),
                other=0.0,
            )
            x = tl.load(vector + j, mask=j < columns, other=0.0)
            sums += tl.sum(tile * x[None, :], axis=1)
        if HAS_ADD:
            sums += tl.load(add + i, mask=i < rows, other=0.0)
        tl.store(out + i, sums, mask=i < rows)


@triton.jit
def _head_size(reads_size, heads, ADD: tl.constexpr):
    """E, the head layer's outputs: [k̃, ã, α] (2·R·W + R) with an add vector, else [k̃, α]."""
    if ADD:
        size = 2 * reads_size + heads
    else:
        size = reads_size + heads
    return size


@triton.jit
def _tiles(
    hidden,
    heads,
    slots,
    width,
    BLOCK_H: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """A program's index vectors (units k_h, heads r, slots n, features w), their masks and
    those of the (R, N), (R, W) and (N, W) tiles, and the offsets of an (R, N) and an (R, W)
    tile in a row-major buffer and of the memory's (N, W) tile in its slot-minor (W, N) one."""
    k_h = tl.arange(0, BLOCK_H)
    r = tl.arange(0, BLOCK_R)
    n = tl.arange(0, BLOCK_N)
    w = tl.arange(0, BLOCK_W)
    h_mask, r_mask, n_mask = k_h < hidden, r < heads, n < slots
    rn_mask = r_mask[:, None] & n_mask[None, :]
    rw_mask = r_mask[:, None] & (w[None, :] < width)
    nw_mask = n_mask[:, None] & (w[None, :] < width)
    rn = r[:, None] * slots + n[None, :]
    rw = r[:, None] * width + w[None, :]
    nw = w[None, :] * slots + n[:, None]
    return k_h, r, n, w, h_mask, r_mask, n_mask, rn_mask, rw_mask, nw_mask, rn, rw, nw


@triton.jit
def _forward_kernel(
    input_part,
    recurrent_weights,
    head_weights,
    head_bias,
    gates,
    cells,
    tanh_c,
    z,
    head,
    memory,
    cleared,
    read_weights,
    write_weights,
    usage,
    key_norms,
    slot_norms,
    scores,
    least_used,
    usage_decay,
    steps,
    batch,
    hidden,
    heads,
    slots,
    width,
    BLOCK_H: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_W: tl.constexpr,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
    ADD: tl.constexpr,
):
    b = tl.program_id(0)
    reads_size = heads * width
    Z, E, G = reads_size + hidden, _head_size(reads_size, heads, ADD), 4 * hidden
    mix_at = E - heads  # σ(α) after [k̃, ã] or k̃
    gamma = tl.load(usage_decay)
    k_h, r, n, w, h_mask, r_mask, n_mask, rn_mask, rw_mask, nw_mask, rn, rw, nw = _tiles(
        hidden, heads, slots, width, BLOCK_H, BLOCK_R, BLOCK_N, BLOCK_W
    )
    memory_at = memory + b * width * slots + nw
    M = tl.load(memory_at, mask=nw_mask, other=0.0)
    used = tl.load(usage + b * slots + n, mask=n_mask, other=0.0)  # w^u_{t-1}
    read_before = tl.load(read_weights + b * heads * slots + rn, mask=rn_mask, other=0.0)
    for t in range(steps):
        row, next_row = t * batch + b, (t + 1) * batch + b
        # the controller: gates = u_t + W_rec z_t, then nn.LSTMCell's update
        _matvec(gates + row * G, input_part + row * G, recurrent_weights, Z, 1, z + row * Z,
                G, Z, True, ROWS, COLS)  # fmt: skip
        tl.debug_barrier()
        at = gates + row * G + k_h
        i_gate = sigmoid(tl.load(at, mask=h_mask, other=0.0))
        f_gate = sigmoid(tl.load(at + hidden, mask=h_mask, other=0.0))
        candidate = tanh(tl.load(at + 2 * hidden, mask=h_mask, other=0.0))
        o_gate = sigmoid(tl.load(at + 3 * hidden, mask=h_mask, other=0.0))
        c = f_gate * tl.load(cells + row * hidden + k_h, mask=h_mask, other=0.0)
        c += i_gate * candidate
        tc = tanh(c)
        tl.store(at, i_gate, mask=h_mask)
        tl.store(at + hidden, f_gate, mask=h_mask)
        tl.store(at + 2 * hidden, candidate, mask=h_mask)
        tl.store(at + 3 * hidden, o_gate, mask=h_mask)
        tl.store(cells + next_row * hidden + k_h, c, mask=h_mask)
        tl.store(tanh_c + row * hidden + k_h, tc, mask=h_mask)
        tl.store(z + next_row * Z + k_h, o_gate * tc, mask=h_mask)
        tl.debug_barrier()
        # the heads: [k̃, α] = W_head h_t + b, kept as [k = tanh k̃, σ(α)]
        _matvec(head + row * E, head_bias, head_weights, hidden, 1, z + next_row * Z,
                E, hidden, True, ROWS, COLS)  # fmt: skip
        tl.debug_barrier()
        keys = tanh(tl.load(head + row * E + rw, mask=rw_mask, other=0.0))
        mix = sigmoid(tl.load(head + row * E + mix_at + r, mask=r_mask, other=0.0))
        tl.store(head + row * E + rw, keys, mask=rw_mask)
        tl.store(head + row * E + mix_at + r, mix, mask=r_mask)
        if ADD:  # the add vector a_t = tanh(ã), kept for the backward pass as the keys are
            written = tanh(tl.load(head + row * E + reads_size + rw, mask=rw_mask, other=0.0))
            tl.store(head + row * E + reads_size + rw, written, mask=rw_mask)
        else:
            written = keys
        # the R least-used slots of w^u_{t-1}, least first, ties to the lower slot
        remaining = tl.where(n_mask, used, float("inf"))
        least = tl.zeros([BLOCK_N], dtype=M.dtype)
        first = tl.full([], 0, tl.int32)  # the least used, to be cleared: the first head's slot
        for h in range(heads):
            slot = tl.argmin(remaining, axis=0, tie_break_left=True)
            tl.store(least_used + row * heads + h, slot.to(tl.int64))
            least = tl.where(n == slot, 1.0, least)
            remaining = tl.where(n == slot, float("inf"), remaining)
            first = tl.where(h == 0, slot, first)
        # w^w = σ(α) w^r_{t-1} + (1 − σ(α)) w^lu_{t-1}
        write = mix[:, None] * read_before + (1.0 - mix[:, None]) * least[None, :]
        write = tl.where(rn_mask, write, 0.0)
        tl.store(write_weights + row * heads * slots + rn, write, mask=rn_mask)
        # the least-used slot cleared (its content kept for the backward pass), then written
        is_first = n[:, None] == first
        tl.store(cleared + row * width + w, tl.sum(tl.where(is_first, M, 0.0), axis=0),
                 mask=w < width)  # fmt: skip
        M = tl.where(is_first, 0.0, M)
        M += tl.sum(write[:, :, None] * written[:, None, :], axis=0)
        # content reads: w^r = softmax_i(k·M(i) / (‖k‖ ‖M(i)‖ + ε)), a cosine in [−1, 1]
        slot_norm = tl.sqrt(tl.sum(M * M, axis=1))
        key_norm = tl.sqrt(tl.sum(keys * keys, axis=1))
        dots = tl.sum(keys[:, None, :] * M[None, :, :], axis=2)
        tl.store(slot_norms + row * slots + n, slot_norm, mask=n_mask)
        tl.store(key_norms + row * heads + r, key_norm, mask=r_mask)
        tl.store(scores + row * heads * slots + rn, dots, mask=rn_mask)
        cosine = dots / (key_norm[:, None] * slot_norm[None, :] + COSINE_EPS)
        weights = tl.where(rn_mask, tl.exp(cosine), 0.0)
        total = tl.where(r_mask, tl.sum(weights, axis=1), 1.0)  # 1 for a padding head's 0
        read = weights / total[:, None]
        tl.store(read_weights + next_row * heads * slots + rn, read, mask=rn_mask)
        reads = tl.sum(read[:, :, None] * M[None, :, :], axis=1)
        tl.store(z + next_row * Z + hidden + rw, reads, mask=rw_mask)
        used = gamma * used + tl.sum(read, axis=0) + tl.sum(write, axis=0)
        tl.store(usage + next_row * slots + n, used, mask=n_mask)
        read_before = read
        tl.debug_barrier()
    tl.store(memory_at, M, mask=nw_mask)


@triton.jit
def _backward_kernel(
    recurrent_weights,
    head_weights,
    gates,
    cells,
    tanh_c,
    z,
    head,
    memory,
    cleared,
    read_weights,
    write_weights,
    key_norms,
    slot_norms,
    scores,
    least_used,
    grad_z,
    grad_c,
    grad_memory,
    grad_read_weights,
    grad_usage,
    grad_gates,
    grad_head,
    usage_decay,
    steps,
    batch,
    hidden,
    heads,
    slots,
    width,
    BLOCK_H: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_W: tl.constexpr,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
    ADD: tl.constexpr,
):
    b = tl.program_id(0)
    reads_size = heads * width
    Z, E, G = reads_size + hidden, _head_size(reads_size, heads, ADD), 4 * hidden
    mix_at = E - heads  # σ(α) after [k̃, ã] or k̃
    gamma = tl.load(usage_decay)
    k_h, r, n, w, h_mask, r_mask, n_mask, rn_mask, rw_mask, nw_mask, rn, rw, nw = _tiles(
        hidden, heads, slots, width, BLOCK_H, BLOCK_R, BLOCK_N, BLOCK_W
    )
    nw += b * width * slots
    M = tl.load(memory + nw, mask=nw_mask, other=0.0)  # M_t, then M_{t-1} once undone
    grad_M = tl.load(grad_memory + nw, mask=nw_mask, other=0.0)
    grad_read = tl.load(grad_read_weights + b * heads * slots + rn, mask=rn_mask, other=0.0)
    grad_used = tl.load(grad_usage + b * slots + n, mask=n_mask, other=0.0)
    grad_cell = tl.load(grad_c + b * hidden + k_h, mask=h_mask, other=0.0)
    for step in range(steps):
        t = steps - 1 - step
        row, next_row = t * batch + b, (t + 1) * batch + b
        keys = tl.load(head + row * E + rw, mask=rw_mask, other=0.0)
        mix = tl.load(head + row * E + mix_at + r, mask=r_mask, other=0.0)
        if ADD:
            written = tl.load(head + row * E + reads_size + rw, mask=rw_mask, other=0.0)
        else:
            written = keys
        read = tl.load(read_weights + next_row * heads * slots + rn, mask=rn_mask, other=0.0)
        read_before = tl.load(read_weights + row * heads * slots + rn, mask=rn_mask, other=0.0)
        write = tl.load(write_weights + row * heads * slots + rn, mask=rn_mask, other=0.0)
        key_norm = tl.load(key_norms + row * heads + r, mask=r_mask, other=0.0)
        slot_norm = tl.load(slot_norms + row * slots + n, mask=n_mask, other=0.0)
        dots = tl.load(scores + row * heads * slots + rn, mask=rn_mask, other=0.0)
        grad_reads = tl.load(grad_z + next_row * Z + hidden + rw, mask=rw_mask, other=0.0)  # δr_t
        # a slot the forward pass left at 0 is 0, not the rounding error of the undone writes,
        # which the cosine's gradient there (δdot = δK / ε) would multiply by 1e8
        M = tl.where(slot_norm[:, None] > 0, M, 0.0)
        least = tl.zeros([BLOCK_N], dtype=M.dtype)
        for h in range(heads):
            least = tl.where(n == tl.load(least_used + row * heads + h).to(tl.int32), 1.0, least)
        first = tl.load(least_used + row * heads).to(tl.int32)
        # usage: δw^r += δw^u; the reads: δw^r += δr·M(i)
        grad_read += tl.where(rn_mask, grad_used[None, :], 0.0)
        grad_read += tl.sum(grad_reads[:, None, :] * M[None, :, :], axis=2)
        # the softmax's and the cosine's backward: δdot, and the norms' shares as scales
        inner = tl.sum(read * grad_read, axis=1)
        grad_cosine = read * (grad_read - inner[:, None])
        denominator = key_norm[:, None] * slot_norm[None, :] + COSINE_EPS
        grad_dots = grad_cosine / denominator
        grad_denominator = -grad_cosine * dots / (denominator * denominator)
        grad_key_norm = tl.sum(grad_denominator * slot_norm[None, :], axis=1)
        grad_slot_norm = tl.sum(grad_denominator * key_norm[:, None], axis=0)
        # ∂‖x‖/∂x = x/‖x‖, and 0 at x = 0 (autograd's norm; a cleared slot)
        key_scale = grad_key_norm / tl.where(key_norm > 0, key_norm, 1.0)
        key_scale = tl.where(key_norm > 0, key_scale, 0.0)
        slot_scale = grad_slot_norm / tl.where(slot_norm > 0, slot_norm, 1.0)
        slot_scale = tl.where(slot_norm > 0, slot_scale, 0.0)
        # δM_t, the whole gradient of M_t
        grad_M += slot_scale[:, None] * M + tl.sum(
            read[:, :, None] * grad_reads[:, None, :] + grad_dots[:, :, None] * keys[:, None, :],
            axis=0,
        )
        # the write M_t = M + Σ_r w^w_r v_rᵀ: δw^w (with the usage's δw^u), δv and δk
        grad_write = tl.where(rn_mask, grad_used[None, :], 0.0)
        grad_write += tl.sum(written[:, None, :] * grad_M[None, :, :], axis=2)
        grad_written = tl.sum(write[:, :, None] * grad_M[None, :, :], axis=1)
        grad_keys = key_scale[:, None] * keys
        grad_keys += tl.sum(grad_dots[:, :, None] * M[None, :, :], axis=1)
        if ADD:
            grad_adds = grad_written * (1.0 - written * written)
            tl.store(grad_head + row * E + reads_size + rw, grad_adds, mask=rw_mask)
        else:
            grad_keys += grad_written
        # undone: M_{t-1} = M_t − Σ_r w^w_r v_rᵀ, the cleared slot put back (and its δ 0)
        is_first = n[:, None] == first
        M -= tl.sum(write[:, :, None] * written[:, None, :], axis=0)
        M = tl.where(is_first, tl.load(cleared + row * width + w, mask=w < width)[None, :], M)
        grad_M = tl.where(is_first, 0.0, grad_M)
        # w^w = σ(α) w^r_{t-1} + (1 − σ(α)) w^lu: δσ(α), and δw^r_{t-1}
        grad_mix = tl.sum(grad_write * (read_before - least[None, :]), axis=1)
        grad_read = tl.where(rn_mask, mix[:, None] * grad_write, 0.0)
        grad_used = gamma * grad_used
        tl.store(grad_head + row * E + rw, grad_keys * (1.0 - keys * keys), mask=rw_mask)
        tl.store(grad_head + row * E + mix_at + r, grad_mix * mix * (1.0 - mix), mask=r_mask)
        tl.debug_barrier()
        # δh_t += W_headᵀ δ[k̃, α]
        grad_h = grad_z + next_row * Z
        _matvec(grad_h, grad_h, head_weights, 1, hidden, grad_head + row * E, hidden, E,
                True, ROWS, COLS)  # fmt: skip
        tl.debug_barrier()
        # nn.LSTMCell's backward, from the activations the forward pass kept in gates
        at = gates + row * G + k_h
        i_gate = tl.load(at, mask=h_mask, other=0.0)
        f_gate = tl.load(at + hidden, mask=h_mask, other=0.0)
        candidate = tl.load(at + 2 * hidden, mask=h_mask, other=0.0)
        o_gate = tl.load(at + 3 * hidden, mask=h_mask, other=0.0)
        c_before = tl.load(cells + row * hidden + k_h, mask=h_mask, other=0.0)
        tc = tl.load(tanh_c + row * hidden + k_h, mask=h_mask, other=0.0)
        grad_hidden = tl.load(grad_h + k_h, mask=h_mask, other=0.0)
        grad_cell += grad_hidden * o_gate * (1.0 - tc * tc)
        out = grad_gates + row * G + k_h
        tl.store(out, grad_cell * candidate * i_gate * (1.0 - i_gate), mask=h_mask)
        tl.store(out + hidden, grad_cell * c_before * f_gate * (1.0 - f_gate), mask=h_mask)
        tl.store(out + 2 * hidden, grad_cell * i_gate * (1.0 - candidate * candidate), mask=h_mask)
        tl.store(out + 3 * hidden, grad_hidden * tc * o_gate * (1.0 - o_gate), mask=h_mask)
        grad_cell = grad_cell * f_gate
        tl.debug_barrier()
        # δz_t += W_recᵀ δgates_t
        _matvec(grad_z + row * Z, grad_z + row * Z, recurrent_weights, 1, Z, grad_gates + row * G,
                Z, G, True, ROWS, COLS)  # fmt: skip
        tl.debug_barrier()
    tl.store(memory + nw, M, mask=nw_mask)
    tl.store(grad_memory + nw, grad_M, mask=nw_mask)
    tl.store(grad_read_weights + b * heads * slots + rn, grad_read, mask=rn_mask)
    tl.store(grad_usage + b * slots + n, grad_used, mask=n_mask)
    tl.store(grad_c + b * hidden + k_h, grad_cell, mask=h_mask)


_FORWARD = [
    "input_part", "recurrent_weights", "head_weights", "head_bias",
    "gates", "cells", "tanh_c", "z", "head", "memory", "cleared", "read_weights", "write_weights",
    "usage", "key_norms", "slot_norms", "scores", "least_used",
]  # fmt: skip
_BACKWARD = [
    "recurrent_weights", "head_weights",
    "gates", "cells", "tanh_c", "z", "head", "memory", "cleared", "read_weights", "write_weights",
    "key_norms", "slot_norms", "scores", "least_used",
    "grad_z", "grad_c", "grad_memory", "grad_read_weights", "grad_usage", "grad_gates",
    "grad_head",
]  # fmt: skip


def _start_from(buffer: torch.Tensor, source: torch.Tensor | None) -> None:
    """A pass's start of its memory or δM: ``source``'s values, or zeros where it is None."""
    if source is None:
        buffer.zero_()
    else:
        buffer.copy_(source)


class _TritonPasses:
    @staticmethod
    def _launch(
        kernel,
        names: list[str],
        settings: lru_ntm_node.Settings,
        tensors: dict[str, torch.Tensor],
        steps: int,
    ) -> None:
        batch, hidden, heads, slots, width = settings[:5]
        z = tensors["z"]
        with on_device(z.device):
            kernel[(batch,)](
                *[tensors[name] for name in names],
                scalar_argument(settings.usage_decay, z),
                steps,
                batch,
                hidden,
                heads,
                slots,
                width,
                BLOCK_H=triton.next_power_of_2(hidden),
                BLOCK_R=triton.next_power_of_2(heads),
                BLOCK_N=triton.next_power_of_2(slots),
                BLOCK_W=triton.next_power_of_2(width),
                ROWS=ROWS,
                COLS=COLS,
                ADD=bool(settings.add_vector),
                num_warps=NUM_WARPS,
            )

    def forward(
        self, settings: lru_ntm_node.Settings, tensors: dict[str, torch.Tensor], steps: int
    ) -> None:
        _start_from(tensors["memory"], tensors["initial_memory"])
        self._launch(_forward_kernel, _FORWARD, settings, tensors, steps)

    def backward(
        self, settings: lru_ntm_node.Settings, tensors: dict[str, torch.Tensor], steps: int
    ) -> None:
        _start_from(tensors["memory"], tensors["final_memory"])
        _start_from(tensors["grad_memory"], tensors["final_grad_memory"])
        self._launch(_backward_kernel, _BACKWARD, settings, tensors, steps)


_PASSES = _TritonPasses()


FusedLRUNTMSequence = lru_ntm_node.node_class(
    "FusedLRUNTMSequence",
    _PASSES,
    ":func:`.lru_ntm_node.forward`'s node with the Triton passes (its docstring has the inputs "
    "and outputs).",
)
