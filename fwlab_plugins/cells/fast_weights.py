"""Fast weights (Ba, Hinton, Mnih, Leibo & Ionescu 2016, "Using Fast Weights to Attend to the
Recent Past", arXiv 1610.06258).

A ReLU RNN with slow weights W (recurrent), C (input) and a per-sequence fast-weight matrix A(t),
a Hebbian trace of the recent hidden states. Going from h(t) to h(t+1) (the paper's eqs. 1-2):

    A(t)         = λ A(t-1) + η h(t) h(t)ᵀ                                   (A(0) = 0)
    h_0(t+1)     = f( W h(t) + C x(t) )                                      boundary state
    h_{s+1}(t+1) = f( LN( W h(t) + C x(t) + A(t) h_s(t+1) ) )                s = 0 .. S-1
    h(t+1)       = h_S(t+1)

f is ReLU and LN layer normalisation over the hidden units of each sample (not over the
batch, a known bug in public TensorFlow ports). Note the paper's indexing: A(t) already holds
h(t), the state the step starts from. (shared/PAPERS.md writes the same recursion shifted by one
step, A(t+1) = λA(t) + η h(t)h(t)ᵀ with A(t) used for h(t+1); we follow the paper's eq. 1.)

Two forms compute the same function:

- **matrix**: keep A as a (B, H, H) tensor; O(H²) per step, whatever the length.
- **memory**: unroll A,  A(t) h = η Σ_{τ≤t} λ^{t-τ} h(τ) (h(τ)ᵀ h),  a decayed, un-normalised
  dot-product attention over past hidden states; O(T·H) state and O(t·H) per step.

``form="auto"`` picks the cheaper for the sequence. Per step the matrix form costs about
(S+1)·H² in arithmetic (one rank-1 update, S products) and the memory form about S·T·H (S
attentions over on average T/2 states, two products each): break-even at T = (S+1)/S · H. But
the matrix form runs step by step under autograd, which keeps every step's (B, H, H) matrix,
while the fused memory form (below) is one node that keeps O(T·H). Measured on 2 CPU cores
(forward+backward; matrix time / memory time), the fused memory form wins far past the
arithmetic break-even: 4.0 at T/H = 2, 2.3 at 4, 1.7 at 6, 1.25 at 7.8 (sequential MNIST, with
58 MiB kept for the backward pass against the matrix form's 1,972), 0.88 at 24.5. So ``auto``
takes the memory form while T < 8 (S+1)/S · H with ``recurrence=fused`` (16 H for S = 1), and
while T < (S+1)/S · H with ``recurrence=stepwise``, whose memory form keeps O(T²·H). With
``model.kernel=triton``, which runs only the memory form, ``auto`` takes the memory form.

The memory form of a whole sequence runs as one autograd node with a hand-written backward
(:mod:`.fast_weights_sequence`); ``model.recurrence=stepwise`` runs autograd through the
step-by-step code instead, the reference the tests hold it to. On CUDA that node's loops run as
one Triton kernel each way where the shape allows (:mod:`.kernels.fast_weights_triton`, chosen
by ``model.kernel``; ``torch`` keeps the PyTorch node, the kernel's reference). The matrix form
is always step-by-step.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from fwlab.bounds import bounded
from fwlab.cell import Cell, CellConfig
from fwlab.errors import ConfigError
from fwlab_plugins.cells import kernels
from fwlab_plugins.cells.fast_weights_sequence import FastWeightsMemorySequence
from fwlab_plugins.cells.kernels import Kernel
from fwlab_plugins.cells.recurrence import Recurrence, apply_in_full_precision

# How far past the arithmetic break-even (module docstring) the fused memory form stays faster
FUSED_MEMORY_REACH = 8


class FastWeightsForm(str, Enum):
    auto = "auto"
    matrix = "matrix"
    memory = "memory"


class FastWeightsMatrixState(NamedTuple):
    h: torch.Tensor  # (B, H) hidden state h(t)
    fast_weights: torch.Tensor  # (B, H, H) A(t-1): the trace before h(t) is added


class FastWeightsMemoryState(NamedTuple):
    h: torch.Tensor  # (B, H) hidden state h(t)
    memory: torch.Tensor  # (B, n, H) h(τ) for the n steps before t, oldest first


FastWeightsState = FastWeightsMatrixState | FastWeightsMemoryState


@dataclass
class FastWeightsConfig(CellConfig):
    inner_steps: int = bounded(1, at_least=1)  # S, iterations of the inner loop (the paper uses 1)
    # λ, decay of the fast weights (0.9-0.95 in the paper)
    decay: float = bounded(0.95, at_least=0.0, at_most=1.0)
    # η; 0 turns the fast weights off (the control run)
    fast_learning_rate: float = bounded(0.5, at_least=0.0)
    layer_norm: bool = True  # LN inside the inner loop
    recurrent_init_scale: float = 0.05  # W initialised to this times the identity
    form: FastWeightsForm = FastWeightsForm.auto  # matrix | memory | auto (cheaper for the shape)
    # Training memory: keep the state only every this many steps and recompute each chunk in the
    # backward pass (activation checkpointing); 0 keeps every step. About √T suits long inputs:
    # 28 for pixel-by-pixel MNIST stores 28 fast-weight matrices per sequence instead of 784.
    # (The fused memory form already keeps O(T·H); chunking it saves nothing.)
    checkpoint_every: int = bounded(0, at_least=0)
    # memory form: fused (one autograd node per sequence) | stepwise (autograd, the reference)
    recurrence: Recurrence = Recurrence.fused
    # fused memory form: auto (the Triton kernel on CUDA where it pays off) | triton (form=auto
    # then takes the memory form, the kernel's) | torch
    kernel: Kernel = Kernel.auto


class FastWeightsCell(Cell):
    """Fast-weights ReLU RNN with layer norm and an inner loop (Ba et al. 2016)."""

    Config = FastWeightsConfig

    def __init__(self, input_size: int, config: FastWeightsConfig) -> None:
        super().__init__(input_size, config)  # checks the config's bounds
        hidden = config.hidden_size
        self.form = FastWeightsForm(config.form)
        self.decay = config.decay
        self.fast_learning_rate = config.fast_learning_rate
        self.inner_steps = config.inner_steps
        self.checkpoint_every = config.checkpoint_every
        self.recurrence = Recurrence(config.recurrence)
        self.kernel = kernels.check_kernel(config.kernel, "fast_weights", has=(Kernel.triton,))
        if self.kernel is Kernel.triton and (
            self.form is FastWeightsForm.matrix or self.recurrence is Recurrence.stepwise
        ):
            raise ConfigError(
                "model.kernel=triton runs the fused memory form: it needs model.form=memory "
                f"(or auto) and model.recurrence=fused, got model.form={self.form.value} and "
                f"model.recurrence={self.recurrence.value}"
            )
        self._decay_cache: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}
        self.input_weights = nn.Linear(input_size, hidden)  # C (and the bias)
        self.recurrent_weights = nn.Linear(hidden, hidden, bias=False)  # W
        self.layer_norm = nn.LayerNorm(hidden) if config.layer_norm else nn.Identity()
        with torch.no_grad():
            self.recurrent_weights.weight.copy_(config.recurrent_init_scale * torch.eye(hidden))
            self.input_weights.bias.zero_()

    def resolve_form(self, seq_len: int | None) -> FastWeightsForm:
        """The form used for a sequence of ``seq_len`` steps (``None``: unknown length)."""
        if self.form is not FastWeightsForm.auto:
            return self.form
        if self.kernel is Kernel.triton:  # the kernel asked for runs only the memory form
            return FastWeightsForm.memory
        if seq_len is None:
            return FastWeightsForm.matrix  # constant cost per step, whatever comes
        reach = FUSED_MEMORY_REACH if self.recurrence is Recurrence.fused else 1
        threshold = reach * (self.inner_steps + 1) / self.inner_steps * self.hidden_size
        return FastWeightsForm.memory if seq_len < threshold else FastWeightsForm.matrix

    def initial_state(
        self,
        batch_size: int,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        seq_len: int | None = None,
    ) -> FastWeightsState:
        hidden = self.hidden_size
        h = torch.zeros(batch_size, hidden, device=device, dtype=dtype)
        if self.resolve_form(seq_len) is FastWeightsForm.memory:
            return FastWeightsMemoryState(h, h.new_zeros(batch_size, 0, hidden))
        return FastWeightsMatrixState(h, h.new_zeros(batch_size, hidden, hidden))

    def forward(
        self, x: torch.Tensor, state: FastWeightsState | None = None
    ) -> tuple[torch.Tensor, FastWeightsState]:
        if state is None:
            state = self.initial_state(x.shape[0], x.device, x.dtype, seq_len=x.shape[1])
        input_part = self.input_weights(x)  # (B, T, H): C x(t) + b for all t at once
        chunk = self.checkpoint_every
        if chunk > 0 and torch.is_grad_enabled() and x.shape[1] > chunk:
            outputs = []
            for part in input_part.split(chunk, dim=1):
                part_outputs, *state_tensors = checkpoint(
                    self._run, part, type(state), *state, use_reentrant=False
                )
                state = type(state)(*state_tensors)
                outputs.append(part_outputs)
            return torch.cat(outputs, dim=1), state
        outputs, *state_tensors = self._run(input_part, type(state), *state)
        return outputs, type(state)(*state_tensors)

    def _run(
        self, input_part: torch.Tensor, state_type: type, *state_tensors: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """The steps of ``input_part`` (B, T', H) from a state given as its tensors (so that
        activation checkpointing sees them): (outputs (B, T', H), *final state tensors)."""
        state = state_type(*state_tensors)
        if (
            state_type is FastWeightsMemoryState
            and self.recurrence is Recurrence.fused
            and input_part.shape[1]
        ):
            return self._run_fused(input_part, state)
        outputs = []
        for input_t in input_part.unbind(1):  # unbind, not slices: an O(T) backward
            state = self._advance(input_t, state)
            outputs.append(state.h)
        return (torch.stack(outputs, dim=1), *state)

    def _run_fused(
        self, input_part: torch.Tensor, state: FastWeightsMemoryState
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`_run` of the memory form as one node: the outputs and the final state are
        views of its buffer [memory, h(0), …, h(T)]."""
        norm = self.layer_norm if isinstance(self.layer_norm, nn.LayerNorm) else None
        node = FastWeightsMemorySequence
        if self._triton(input_part, state.memory.shape[1]):
            from fwlab_plugins.cells.kernels.fast_weights_triton import FusedFastWeightsMemory

            node = FusedFastWeightsMemory
        states = apply_in_full_precision(
            node,
            self.recurrent_weights.weight.dtype,
            input_part,
            self.recurrent_weights.weight,
            norm.weight if norm is not None else None,
            norm.bias if norm is not None else None,
            state.h,
            state.memory,
            self.decay,
            self.fast_learning_rate,
            self.inner_steps,
            norm is not None,
            norm.eps if norm is not None else 0.0,
        )
        start, last = state.memory.shape[1], state.memory.shape[1] + input_part.shape[1]
        return states[:, start + 1 :], states[:, last], states[:, :last]

    def _triton(self, input_part: torch.Tensor, memory_length: int) -> bool:
        """Whether the fused memory form runs as the Triton kernel (``model.kernel``) on
        ``input_part`` after ``memory_length`` stored states."""
        weights = self.recurrent_weights.weight  # the node runs in its dtype (autocast aside)

        def fits_and_slower() -> tuple[bool, str | None]:
            from fwlab_plugins.cells.kernels import fast_weights_triton

            batch, steps, hidden = input_part.shape
            elements = fast_weights_triton.buffer_elements(
                batch, steps, hidden, memory_length, self.inner_steps
            )
            fits = fast_weights_triton.fits(weights, self.hidden_size, elements)
            return fits, fast_weights_triton.slower(weights)

        return kernels.wants_triton(self.kernel, input_part, "fast_weights", fits_and_slower)

    def step(
        self, x_t: torch.Tensor, state: FastWeightsState
    ) -> tuple[torch.Tensor, FastWeightsState]:
        state = self._advance(self.input_weights(x_t), state)
        return state.h, state

    def _decay_weights(self, length: int, like: torch.Tensor) -> torch.Tensor:
        """η λ^k for k = length-1 .. 0 (the oldest memory first), cached per length and device:
        the memory form asks for them at every step."""
        key = (length, like.device, like.dtype)
        if key not in self._decay_cache:
            steps_ago = torch.arange(length - 1, -1, -1, device=like.device, dtype=like.dtype)
            self._decay_cache[key] = self.fast_learning_rate * self.decay**steps_ago
        return self._decay_cache[key]

    def _advance(self, input_part: torch.Tensor, state: FastWeightsState) -> FastWeightsState:
        """One step from h(t) given ``input_part`` = C x(t) + b, shape (B, H)."""
        h = state.h
        if isinstance(state, FastWeightsMatrixState):
            # A(t) = λ A(t-1) + η h(t) h(t)ᵀ
            fast = self.decay * state.fast_weights + self.fast_learning_rate * (
                h.unsqueeze(2) * h.unsqueeze(1)
            )  # (B, H, H)

            def attend(query: torch.Tensor) -> torch.Tensor:
                return torch.bmm(fast, query.unsqueeze(2)).squeeze(2)

            next_fast = fast
        else:
            memory = torch.cat([state.memory, h.unsqueeze(1)], dim=1)  # (B, n+1, H)
            weights = self._decay_weights(memory.shape[1], h)  # η λ^{t-τ}, oldest first

            def attend(query: torch.Tensor) -> torch.Tensor:
                # η Σ_τ λ^{t-τ} h(τ) (h(τ)ᵀ query). Broadcast products and sums, not bmm: for
                # these batches of tiny matrix-vector products they run 1.5-3x faster on a CPU
                # (forward+backward, measured at the retrieval and Omniglot shapes).
                scores = (memory * query.unsqueeze(1)).sum(-1) * weights  # (B, n+1)
                return (scores.unsqueeze(-1) * memory).sum(1)

            next_fast = memory

        preactivation = self.recurrent_weights(h) + input_part  # W h(t) + C x(t) + b
        h_inner = torch.relu(preactivation)  # h_0(t+1)
        for _ in range(self.inner_steps):
            h_inner = torch.relu(self.layer_norm(preactivation + attend(h_inner)))
        return type(state)(h_inner, next_fast)
