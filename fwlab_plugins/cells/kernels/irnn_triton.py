"""The IRNN's time loop as one Triton kernel each way (Le et al. 2015):

    forward:   h_t = ReLU(u_t + W_h h_{t-1}),        u_t = W_x x_t + b   (computed before, in torch)
    backward:  δ_t = (∂L/∂h_t + W_hᵀ δ_{t+1}) ⊙ [h_t > 0],   ∂L/∂h_0 = W_hᵀ δ_1
               ∂L/∂u_t = δ_t,   ∂L/∂W_h = Σ_t δ_t h_{t-1}ᵀ    (one matrix product, after the loop)

Each program owns ``BLOCK_B`` sequences and keeps W_h (padded to ``BLOCK_H``², at most 128²) in
registers for all T steps, so a step costs one on-chip matrix product and no launch. Float32
products follow ``torch.get_float32_matmul_precision()``, as torch's own matrix products do:
``highest`` (torch's default) IEEE float32, ``high`` (the default of fwlab's runs) three TF32
products (about float32's accuracy, on tensor cores), ``medium`` one TF32 product; float64 is
always IEEE.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fwlab_plugins.cells.kernels import on_device

MAX_HIDDEN = 128  # W_h lives in registers: 128² float32 per program
BLOCK_B = 16  # sequences per program (tl.dot's smallest tile)


def fits(batch_inputs: torch.Tensor, hidden_size: int) -> bool:
    """Whether the kernel takes this input (B, T, H): a hidden size it holds on chip,
    float32/64, and offsets in int32 (as Triton computes them from int32 arguments)."""
    return (
        hidden_size <= MAX_HIDDEN
        and batch_inputs.dtype in (torch.float32, torch.float64)
        and batch_inputs.numel() < 2**31
    )


def slower(batch_inputs: torch.Tensor) -> str | None:
    """Why the kernel would be slower than the captured PyTorch loop here, or ``None``: it pays
    off only on tensor cores. Measured on an H200 (B=64, T=784, H=100, forward+backward of the
    loop): IEEE float32 products in the kernel 30 ms, against 18 ms for the graph-captured loop;
    three TF32 products 3.8 ms; one 2.1 ms."""
    if batch_inputs.dtype != torch.float32:
        return "float64 products (the kernel pays off on float32 tensor cores)"
    if torch.get_float32_matmul_precision() not in ("high", "medium"):
        return "float32 products in IEEE precision (float32_matmul_precision=highest)"
    return None


@triton.jit
def _forward_kernel(
    u_ptr, w_ptr, h0_ptr, out_ptr,
    B, T, H,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.arange(0, BLOCK_H)
    mask = (rows < B)[:, None] & (cols < H)[None, :]
    square = (cols < H)[:, None] & (cols < H)[None, :]
    # W_hᵀ[k, j] = W_h[j, k]; the padding is zero, so padded units stay at ReLU(0) = 0
    w_t = tl.load(w_ptr + cols[None, :] * H + cols[:, None], mask=square, other=0.0)
    h = tl.load(h0_ptr + rows[:, None] * H + cols[None, :], mask=mask, other=0.0)
    sequence = rows[:, None] * T * H + cols[None, :]  # (b, t=0, j) of a contiguous (B, T, H)
    for t in range(T):
        u = tl.load(u_ptr + sequence + t * H, mask=mask, other=0.0)
        h = tl.maximum(u + tl.dot(h, w_t, input_precision=PRECISION), 0.0)
        tl.store(out_ptr + sequence + t * H, h, mask=mask)


@triton.jit
def _backward_kernel(
    grad_out_ptr, out_ptr, w_ptr, grad_pre_ptr, grad_h0_ptr,
    B, T, H,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.arange(0, BLOCK_H)
    mask = (rows < B)[:, None] & (cols < H)[None, :]
    square = (cols < H)[:, None] & (cols < H)[None, :]
    w = tl.load(w_ptr + cols[:, None] * H + cols[None, :], mask=square, other=0.0)
    sequence = rows[:, None] * T * H + cols[None, :]
    carried = tl.zeros((BLOCK_B, BLOCK_H), dtype=w.dtype)  # W_hᵀ δ_{t+1}, as rows: δ W_h
    for step in range(T):
        t = T - 1 - step
        h = tl.load(out_ptr + sequence + t * H, mask=mask, other=0.0)
        grad = tl.load(grad_out_ptr + sequence + t * H, mask=mask, other=0.0) + carried
        delta = tl.where(h > 0, grad, 0.0)
        tl.store(grad_pre_ptr + sequence + t * H, delta, mask=mask)
        carried = tl.dot(delta, w, input_precision=PRECISION)
    tl.store(grad_h0_ptr + rows[:, None] * H + cols[None, :], carried, mask=mask)


# torch.get_float32_matmul_precision() -> tl.dot's input_precision for float32
PRECISIONS = {"highest": "ieee", "high": "tf32x3", "medium": "tf32"}
# warps per program, for a 128-wide W_h: the fastest of 4, 8, 16 per precision on an H200
WARPS = {"ieee": 16, "tf32x3": 8, "tf32": 4}


def _launch_config(hidden_size: int, sequences: torch.Tensor) -> tuple[tuple[int], dict]:
    block_h = max(16, triton.next_power_of_2(hidden_size))
    grid = (triton.cdiv(sequences.shape[0], BLOCK_B),)
    precision = "ieee"
    if sequences.dtype == torch.float32 and sequences.is_cuda:  # the interpreter computes in IEEE
        precision = PRECISIONS[torch.get_float32_matmul_precision()]
    warps = WARPS[precision] if block_h > 64 else 4
    meta = {"BLOCK_B": BLOCK_B, "BLOCK_H": block_h, "PRECISION": precision, "num_warps": warps}
    return grid, meta


class FusedIRNN(torch.autograd.Function):
    """``(u (B, T, H), W_h (H, H), h_0 (B, H)) -> h (B, T, H)`` through the Triton kernels."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, u: torch.Tensor, w: torch.Tensor, h0: torch.Tensor
    ) -> torch.Tensor:
        u, w, h0 = u.contiguous(), w.contiguous(), h0.contiguous()
        batch, steps, hidden = u.shape
        out = torch.empty_like(u)
        grid, meta = _launch_config(hidden, u)
        with on_device(u.device):
            _forward_kernel[grid](u, w, h0, out, batch, steps, hidden, **meta)
        ctx.save_for_backward(out, w, h0)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out, w, h0 = ctx.saved_tensors
        batch, steps, hidden = out.shape
        grad_pre, grad_h0 = torch.empty_like(out), torch.empty_like(h0)
        grid, meta = _launch_config(hidden, out)
        with on_device(out.device):
            _backward_kernel[grid](
                grad_out.contiguous(), out, w, grad_pre, grad_h0, batch, steps, hidden, **meta
            )
        previous = torch.cat([h0.unsqueeze(1), out[:, :-1]], dim=1)  # h_{t-1} for every t
        grad_w = grad_pre.reshape(-1, hidden).T @ previous.reshape(-1, hidden)
        return grad_pre, grad_w, grad_h0


def irnn_sequence(u: torch.Tensor, w: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """h_t = ReLU(u_t + W_h h_{t-1}) for every t, fused; differentiable in all three inputs."""
    return FusedIRNN.apply(u, w, h0)
