"""Fused recurrent kernels for the built-in cells, with their availability checks.

On CUDA a Triton kernel runs the whole time loop of a cell in one launch, its recurrent weights
loaded on chip once, and a matching backward kernel runs the loop in reverse. The weight
gradients, sums over every step, are then one large matrix product outside the kernel. On the
CPU a C kernel (:mod:`.native`) runs the time loop, its per-step products included, in one call
each way. The cells' plain PyTorch code stays the fallback and the reference the kernels
are tested against; on the CPU, Triton's interpreter (``TRITON_INTERPRET=1``) runs the Triton
kernels, which is how the tests check them without a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from collections.abc import Callable
from enum import Enum

import torch

from fwlab.errors import ConfigError


class Kernel(str, Enum):
    """A cell's ``model.kernel``: which implementation runs its time loop."""

    auto = "auto"  # the cell's kernel for the device where it runs and pays off, else torch
    triton = "triton"  # the Triton kernel (CUDA, or Triton's CPU interpreter), or an error
    c = "c"  # the C kernel (CPU), or an error
    torch = "torch"  # the cell's plain PyTorch code, the reference


def check_kernel(kernel: Kernel, cell: str, has: tuple[Kernel, ...]) -> Kernel:
    """``model.kernel`` as a :class:`Kernel`, or a :class:`~fwlab.errors.ConfigError` if ``cell``
    has no such kernel (``has``: the kernels it has besides ``auto`` and ``torch``), if it is
    ``triton`` on a machine where no Triton kernel can run, or ``c`` on one without a C
    compiler. Checked as the cell is built, so that such a run stops before it writes anything
    instead of at its first batch."""
    kernel = Kernel(kernel)
    takes = (Kernel.auto, *has, Kernel.torch)
    if kernel not in takes:
        raise ConfigError(
            f"model.kernel={kernel.value}: {cell} has no {kernel.value} kernel; "
            f"it takes {', '.join(k.value for k in takes)}"
        )
    if kernel is Kernel.triton:
        reason = triton_unavailable()
        if reason:
            raise ConfigError(f"model.kernel=triton: {reason}; model.kernel=auto runs {cell}")
    if kernel is Kernel.c:
        from fwlab_plugins.cells.kernels import native

        reason = native.compiler_missing()  # a compiler that fails shows at the first batch
        if reason:
            raise ConfigError(f"model.kernel=c: {reason}; model.kernel=auto runs {cell}")
    return kernel


def triton_unavailable() -> str | None:
    """Why no Triton kernel can run on this machine, or ``None``. (A machine with a GPU can
    still be asked to run one on the CPU: :func:`use_triton` says so then.)"""
    if not triton_installed():
        return "needs the triton package (pip install triton)"
    if not torch.cuda.is_available() and not interpreting():
        return (
            "needs a CUDA GPU and this machine has none (TRITON_INTERPRET=1 runs the kernel in "
            "Triton's CPU interpreter, slowly: for tests)"
        )
    return None


@functools.cache  # asked at every forward pass; a search of sys.path each time is wasted
def triton_installed() -> bool:
    """Whether the ``triton`` package can be imported (it ships with torch's CUDA wheels)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Launch on ``device``'s GPU (Triton launches on the current one); the CPU interpreter
    needs no device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def scalar_argument(value: float, like: torch.Tensor) -> torch.Tensor:
    """``value`` as a one-element tensor of ``like``'s dtype and device, for a kernel to load.
    Triton types a Python float argument as float32 when it compiles natively (its interpreter
    keeps float64), so a constant such as a norm's ε would reach a float64 kernel rounded to
    float32: 1e-5 moves by 2.5e-14, and normalised values by ~1e-9 where the variance is small."""
    return torch.full((1,), value, dtype=like.dtype, device=like.device)


def wants_triton(
    kernel: Kernel,
    tensor: torch.Tensor,
    cell: str,
    fits_and_slower: Callable[[], tuple[bool, str | None]],
) -> bool:
    """Whether a cell runs its Triton kernel on ``tensor`` (B, T, …): :func:`use_triton`, with
    the cheap answers first. ``torch``, or an empty sequence: no; ``auto`` off CUDA: no, without
    importing Triton. Otherwise ``fits_and_slower()`` (which may import the kernel's module)
    is asked, where Triton is installed."""
    kernel = Kernel(kernel)
    if kernel not in (Kernel.auto, Kernel.triton) or tensor.shape[1] == 0:
        return False
    if kernel is Kernel.auto and not tensor.is_cuda:
        return False
    fits, slower = fits_and_slower() if triton_installed() else (False, None)
    return use_triton(kernel, tensor, fits, slower, cell=cell)


def use_triton(
    kernel: Kernel,
    tensor: torch.Tensor,
    fits: bool,
    slower: str | None,
    cell: str,
    key: str = "model.kernel",
) -> bool:
    """Whether a cell should run its Triton kernel on ``tensor``.

    ``kernel`` is the cell's config value: ``torch`` (or ``c``) never; ``auto`` where it runs
    natively (a CUDA tensor, Triton installed), takes the shape (``fits``) and is the faster
    choice by the kernel's measurements (``slower``: why it is not, or ``None``); ``triton`` always,
    failing with the reason when it cannot. On CUDA, ``auto``'s choice for ``cell`` is logged
    once, with the reason when it is the plain loop.
    """
    kernel = Kernel(kernel)
    if kernel not in (Kernel.auto, Kernel.triton):
        return False
    if kernel is Kernel.auto:
        if not tensor.is_cuda:  # the CPU always takes the plain loop: nothing to report
            return False
        reason = _auto_fallback_reason(fits, slower)
        if reason:
            report_fallback(cell, reason)
        else:
            _report_once(f"{cell}: Triton kernel")
        return reason is None
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


def wants_c(
    kernel: Kernel, tensor: torch.Tensor, cell: str, unavailable: Callable[[], str | None]
) -> bool:
    """Whether a cell runs its C kernel on ``tensor`` (B, T, …). ``auto``: on the CPU where it
    builds and takes the tensor (``unavailable()`` is why not, or ``None``; the choice is
    logged once); ``c``: always, failing with the reason when it cannot; otherwise not."""
    kernel = Kernel(kernel)
    if kernel not in (Kernel.auto, Kernel.c) or tensor.shape[1] == 0:
        return False
    if kernel is Kernel.auto:
        if tensor.device.type != "cpu":
            return False
        reason = unavailable()
        if reason:
            report_fallback(cell, reason)
        else:
            _report_once(f"{cell}: C kernel")
        return reason is None
    reason = unavailable()
    if reason:
        raise RuntimeError(f"model.kernel=c: {reason}")
    return True


def report_fallback(cell: str, reason: str) -> None:
    """Log once that ``cell``'s ``model.kernel=auto`` runs its plain PyTorch loop, and why."""
    _report_once(f"{cell}: plain PyTorch loop ({reason})")


_reported: set[str] = set()


def _auto_fallback_reason(fits: bool, slower: str | None) -> str | None:
    if not triton_installed():
        return "the triton package is not installed"
    if not fits:
        return "the shape or dtype is beyond the kernel"
    if slower:
        return f"slower here: {slower}"
    return None


def _report_once(message: str) -> None:
    # imported here: Lightning takes seconds to import, and a kernel's build needs none of it
    from lightning.pytorch.utilities import rank_zero_info

    if message not in _reported:
        _reported.add(message)
        rank_zero_info(f"fwlab: kernels: {message}")
