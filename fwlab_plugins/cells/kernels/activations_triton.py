"""The recurrent cells' activations as Triton functions, for kernels to call (through ``exp``,
which every float type has on CUDA and in the interpreter; ``tanh`` written as the C kernels
write it)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def tanh(x):
    return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0
