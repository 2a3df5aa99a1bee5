"""Fused recurrent kernels (Triton) for the built-in cells, with their availability checks.

A kernel runs the whole time loop of a cell in one launch, its recurrent weights loaded on chip
once, and a matching backward kernel runs the loop in reverse. The weight gradients, sums over
every step, are then one large matrix product outside the kernel. The cells' plain PyTorch code
stays the fallback and the reference the kernels are tested against; on the CPU, Triton's
interpreter (``TRITON_INTERPRET=1``) runs the same kernels, which is how the tests check them
without a GPU.
"""

from __future__ import annotations

import importlib.util
import os

import torch

KERNEL_CHOICES = ("auto", "triton", "torch")


def triton_installed() -> bool:
    """Whether the ``triton`` package can be imported (it ships with torch's CUDA wheels)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_kernel_choice(kernel: str, key: str = "model.kernel") -> None:
    """Fail early, at construction, on a kernel choice that is not one of :data:`KERNEL_CHOICES`."""
    if kernel not in KERNEL_CHOICES:
        raise ValueError(f"{key} must be one of {', '.join(KERNEL_CHOICES)}, got {kernel!r}")


def use_triton(kernel: str, tensor: torch.Tensor, fits: bool, key: str = "model.kernel") -> bool:
    """Whether a cell should run its Triton kernel on ``tensor``.

    ``kernel`` is the cell's config value: ``torch`` never, ``auto`` where it runs natively
    (a CUDA tensor, Triton installed, a shape the kernel takes: ``fits``), ``triton`` always,
    failing with the reason when it cannot.
    """
    check_kernel_choice(kernel, key)
    if kernel == "torch":
        return False
    if kernel == "auto":
        return tensor.is_cuda and fits and triton_installed()
    if not triton_installed():
        raise RuntimeError(f"{key}=triton needs the triton package (pip install triton)")
    if not fits:
        raise ValueError(f"{key}=triton: this shape is beyond the kernel; use auto or torch")
    if not tensor.is_cuda and not interpreting():
        raise RuntimeError(
            f"{key}=triton on {tensor.device} needs CUDA, or TRITON_INTERPRET=1 to run the "
            "kernel in Triton's CPU interpreter (slow: for tests)"
        )
    return True
