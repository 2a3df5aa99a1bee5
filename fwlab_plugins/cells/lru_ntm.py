"""LRU-NTM, the memory-augmented network of Santoro, Bartunov, Botvinick, Wierstra & Lillicrap
2016, "Meta-Learning with Memory-Augmented Neural Networks" (arXiv 1605.06065).

An LSTM controller reads [x_t, r_{t-1}] and emits, per read head, a key k_t and a write gate α_t.
Each step (addressing in :mod:`.lru_addressing`):

    w^w_t = σ(α_t) w^r_{t-1} + (1 − σ(α_t)) w^lu_{t-1}       write to the last read or least used
    M_{t-1}(argmin w^u_{t-1}) = 0                              clear the least-used slot
    M_t   = M_{t-1} + Σ_heads w^w_t k_tᵀ                        (model.write_vector=key)
    M_t   = M_{t-1} + Σ_heads w^w_t a_tᵀ,  a_t = tanh(W_a h_t + b_a)   (model.write_vector=add)
    w^r_t = softmax(cos(k_t, M_t)),   r_t = w^r_t M_t          content reads
    w^u_t = γ w^u_{t-1} + w^r_t + w^w_t                        usage

The output is [h_t, r_t] (controller state and the R read vectors). Memory, usage and weightings
start at zero with every sequence (an episode); weights persist across episodes, which is the
meta-learning. Keys pass through tanh (as in public implementations), bounding what is written.
α_t comes from the controller (a learned linear map of h_t, one scalar per head).

**What is written.** The paper writes the key itself (``write_vector=key``, the default). The query
and the stored content are then one vector, and a read returns the keys it matched: to retrieve a
label the stored key must carry it, while the key that looks for it cannot yet know it. Public
reproductions of the paper's Omniglot results (Theano and TensorFlow ports) write a separate add
vector a_t, as the NTM of Graves et al. 2014 does: ``write_vector=add``. On synthetic episodes (5
classes of random ±1 codes with 10 % of the signs flipped, 10 instances each; batch 16, Adam 1e-3),
after 1,000 steps the add vector gave 80 % on 2nd-and-later instances and the key 27 %, the plateau
of predicting from the labels alone (~31 %), where an LSTM of the same size still was at 3,000 steps
(``test_with_an_add_vector_it_learns_to_bind_labels_through_its_memory``, marked slow). On Omniglot
(the two shared background subsets, the paper's network: raw input, softmax on [h, r]; validation
accuracy at the 2nd / 5th instance) the add vector reached 41 / 58 % at 1,000 steps and 70 / 84 % at
4,000; writing the key, the network stayed on the plateau (2nd instance 31–34 %) to step 6,000 and
reached 47 / 54 % (test) at 8,000, about the paper's LSTM row. The Omniglot preset,
``experiment=omniglot_lru_ntm``, writes an add vector.

The controller is ``nn.LSTMCell``'s parameters with its equations written out: the input part of
the gates, W_x x_t + b, is one product over all steps, and the per-step products (of [h_{t-1},
r_{t-1}] and of h_t for the keys and gates) are :class:`fwlab.stepwise_linear.StepwiseLinear`,
whose weight gradients are one product over all steps too.

The whole sequence can run as one autograd node (:mod:`.kernels.lru_ntm_node`) whose time loop,
the two per-step products included, is a kernel's: C code on the CPU (:mod:`.kernels.
lru_ntm_cpu`; ``model.kernel=auto|c``, ``auto`` where a C compiler is available), or a Triton
kernel, one program per sequence (:mod:`.kernels.lru_ntm_triton`; ``model.kernel=triton``: on
CUDA, or in Triton's CPU interpreter; ``auto`` does not choose it until it has been timed on a
GPU). ``model.kernel=torch`` keeps the code below, the reference the tests hold both to.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fwlab.bounds import bounded
from fwlab.cell import Cell, CellConfig
from fwlab.errors import ConfigError
from fwlab.stepwise_linear import StepwiseLinear
from fwlab_plugins.cells import kernels
from fwlab_plugins.cells import lru_addressing as addressing
from fwlab_plugins.cells.kernels import Kernel, lru_ntm_cpu
from fwlab_plugins.cells.recurrence import apply_in_full_precision


class LRUNTMState(NamedTuple):
    h: torch.Tensor  # (B, H) controller hidden state
    c: torch.Tensor  # (B, H) controller cell state
    memory: torch.Tensor  # (B, N, W) M_t
    read_weights: torch.Tensor  # (B, R, N) w^r_t
    usage: torch.Tensor  # (B, N) w^u_t
    reads: torch.Tensor  # (B, R, W) r_t


class WriteVector(str, Enum):
    """``model.write_vector``: what a head adds to the slots it writes."""

    key = "key"  # its key k_t, as the paper's equation
    add = "add"  # a separate add vector a_t = tanh(W_a h_t + b_a), as public reproductions
    # (the C and Triton kernels run both)


@dataclass
class LRUNTMConfig(CellConfig):
    hidden_size: int = bounded(200, at_least=1)  # controller LSTM units (Santoro et al.: 200)
    memory_slots: int = bounded(128, at_least=1)  # N
    memory_width: int = bounded(40, at_least=1)  # W
    read_heads: int = bounded(4, at_least=1)  # R; also n, the number of least-used slots
    usage_decay: float = bounded(0.95, at_least=0.0, at_most=1.0)  # γ
    write_vector: WriteVector = WriteVector.key  # key (the paper) | add (see the docstring)
    # the time loop: auto (the C kernel on the CPU where it builds) | c | triton | torch (the
    # reference)
    kernel: Kernel = Kernel.auto


class LRUNTMCell(Cell):
    """LRU-NTM / MANN: LSTM controller, least-recently-used memory access (Santoro et al. 2016)."""

    Config = LRUNTMConfig

    def __init__(self, input_size: int, config: LRUNTMConfig) -> None:
        super().__init__(input_size, config)
        self.kernel = kernels.check_kernel(config.kernel, "lru_ntm", has=(Kernel.c, Kernel.triton))
        heads, width = config.read_heads, config.memory_width
        if heads > config.memory_slots:  # (both are at least 1: their bounds)
            raise ConfigError(
                f"model.read_heads must be at most model.memory_slots ({config.memory_slots}), "
                f"got {heads}"
            )
        self.writes_add_vector = WriteVector(config.write_vector) is WriteVector.add
        self.controller = nn.LSTMCell(input_size + heads * width, config.hidden_size)
        self.key_layer = nn.Linear(config.hidden_size, heads * width)
        # a_t's layer only where it is used: a write_vector=key cell keeps its parameters (and
        # the checkpoints made before the option)
        self.add_layer = (
            nn.Linear(config.hidden_size, heads * width) if self.writes_add_vector else None
        )
        self.gate_layer = nn.Linear(config.hidden_size, heads)

    @property
    def output_size(self) -> int:
        return self.hidden_size + self.config.read_heads * self.config.memory_width

    def _shapes(self) -> LRUNTMState:
        """The shape of each part of one sequence's state."""
        config = self.config
        heads, slots, width = config.read_heads, config.memory_slots, config.memory_width
        hidden = (self.hidden_size,)
        return LRUNTMState(hidden, hidden, (slots, width), (heads, slots), (slots,), (heads, width))

    def initial_state(
        self,
        batch_size: int,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> LRUNTMState:
        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(batch_size, *shape, device=device, dtype=dtype)

        h, c, memory, read_weights, usage, reads = self._shapes()
        return LRUNTMState(
            h=zeros(*h),
            c=zeros(*c),
            # (B, N, W) over slot-minor storage, the layout the kernels work in: a state one
            # returns, and a fresh one, go in as they are instead of through a transposing copy
            memory=zeros(*reversed(memory)).transpose(1, 2),
            read_weights=zeros(*read_weights),
            usage=zeros(*usage),
            reads=zeros(*reads),
        )

    def forward(
        self, x: torch.Tensor, state: LRUNTMState | None = None
    ) -> tuple[torch.Tensor, LRUNTMState]:
        dtype = self.controller.weight_hh.dtype
        node = self._sequence_node(x, dtype)
        if node is not None:
            zero_start = state is None
            if zero_start:
                # zeros the node starts from without reading them: broadcast views, no memory
                # of their own (in the node's dtype, which a cast would copy them into)
                zero = torch.zeros((), device=x.device, dtype=dtype)
                state = LRUNTMState(*[zero.expand(x.shape[0], *shape) for shape in self._shapes()])
            outputs, *final = apply_in_full_precision(
                node,
                dtype,
                self._input_part(x.transpose(0, 1)),  # time-major, as the node's steps read it
                *self._step_weights(),
                *state,
                self.config.usage_decay,
                zero_start,
            )
            return outputs, LRUNTMState(*final)
        if state is None:
            state = self.initial_state(x.shape[0], x.device, x.dtype)
        input_part, products = self._input_part(x), self._step_products()
        outputs = []
        for input_t in input_part.unbind(1):  # unbind, not slices: O(T) backward
            output, state = self._advance(input_t, state, products)
            outputs.append(output)
        return torch.stack(outputs, dim=1), state

    def _sequence_node(
        self, x: torch.Tensor, dtype: torch.dtype
    ) -> type[torch.autograd.Function] | None:
        """The autograd node whose kernel runs the whole sequence (:mod:`.kernels.lru_ntm_node`),
        Triton's or C's, as ``model.kernel`` asks and the device allows; ``None``: the
        step-by-step reference code."""
        config = self.config

        def fits_and_slower() -> tuple[bool, str | None]:
            from fwlab_plugins.cells.kernels import lru_ntm_triton  # imports triton

            heads, slots, width = config.read_heads, config.memory_slots, config.memory_width
            batch, steps = x.shape[:2]
            sizes = (self.hidden_size, heads, slots, width, self.writes_add_vector)
            elements = lru_ntm_triton.buffer_elements(batch, steps, *sizes)
            fits = lru_ntm_triton.fits(dtype, heads, slots, width, elements)
            return fits, lru_ntm_triton.slower()

        if kernels.wants_triton(self.kernel, x, "lru_ntm", fits_and_slower):
            from fwlab_plugins.cells.kernels import lru_ntm_triton

            return lru_ntm_triton.FusedLRUNTMSequence

        def unavailable() -> str | None:
            return lru_ntm_cpu.unavailable_reason(x.device, dtype)

        if kernels.wants_c(self.kernel, x, "lru_ntm", unavailable):
            return lru_ntm_cpu.LRUNTMSequenceC
        return None

    def step(self, x_t: torch.Tensor, state: LRUNTMState) -> tuple[torch.Tensor, LRUNTMState]:
        return self._advance(self._input_part(x_t), state, self._step_products())

    def _input_part(self, x: torch.Tensor) -> torch.Tensor:
        """W_x x + b of the controller's gates, for any leading shape of ``x``."""
        controller = self.controller
        weight = controller.weight_ih[:, : self.input_size]
        return F.linear(x, weight, controller.bias_ih + controller.bias_hh)

    def _step_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The weights of the per-step products: [h_{t-1}, r_{t-1}] -> gates (W_rec), and
        h_t -> (k̃, [ã,] α) (W_head, b_head)."""
        controller = self.controller
        recurrent = torch.cat([controller.weight_hh, controller.weight_ih[:, self.input_size :]], 1)
        layers = [self.key_layer, *([self.add_layer] if self.add_layer else []), self.gate_layer]
        heads = torch.cat([layer.weight for layer in layers])
        head_bias = torch.cat([layer.bias for layer in layers])
        return recurrent, heads, head_bias

    def _step_products(self) -> tuple[StepwiseLinear, StepwiseLinear]:
        """The per-step linear maps of one pass: [h_{t-1}, r_{t-1}] -> gates, and
        h_t -> (k̃, [ã,] α)."""
        recurrent, heads, head_bias = self._step_weights()
        return StepwiseLinear(recurrent), StepwiseLinear(heads, head_bias)

    def _advance(
        self,
        input_part: torch.Tensor,
        state: LRUNTMState,
        products: tuple[StepwiseLinear, StepwiseLinear],
    ) -> tuple[torch.Tensor, LRUNTMState]:
        config = self.config
        batch, heads, width = input_part.shape[0], config.read_heads, config.memory_width
        recurrent, head_layer = products
        # the controller: nn.LSTMCell on [x_t, r_{t-1}], gates in PyTorch's order (i, f, g, o)
        gates = input_part + recurrent(torch.cat([state.h, state.reads.flatten(1)], dim=-1))
        input_gate, forget, candidate, output_gate = gates.chunk(4, dim=1)
        c = torch.sigmoid(forget) * state.c + torch.sigmoid(input_gate) * torch.tanh(candidate)
        h = torch.sigmoid(output_gate) * torch.tanh(c)
        written_width = heads * width if self.writes_add_vector else 0
        key_part, add_part, gate = head_layer(h).split(
            [heads * width, written_width, heads], dim=-1
        )
        keys = torch.tanh(key_part).view(batch, heads, width)  # k_t, (B, R, W); α_t, (B, R)
        # what the heads add to memory: a_t, or the keys themselves
        written = torch.tanh(add_part).view(batch, heads, width) if written_width else keys

        least_used = addressing.least_used_weights(state.usage, heads)  # w^lu_{t-1}
        write_weights = addressing.write_weights(gate, state.read_weights, least_used)
        memory = addressing.zero_least_used_slot(state.memory, state.usage)
        memory = addressing.write(memory, write_weights, written)  # M_t
        read_weights = addressing.content_read_weights(keys, memory)  # w^r_t
        reads = addressing.read(read_weights, memory)  # r_t, (B, R, W)
        usage = addressing.update_usage(
            state.usage, read_weights, write_weights, config.usage_decay
        )
        output = torch.cat([h, reads.flatten(1)], dim=-1)  # (B, H + R·W)
        return output, LRUNTMState(h, c, memory, read_weights, usage, reads)
