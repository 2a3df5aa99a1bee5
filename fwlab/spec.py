"""What a datamodule produces, declared so that models can check a pairing before training."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

InputKind = Literal["tokens", "vectors", "images", "category_pairs"]


@dataclass(frozen=True)
class DataSpec:
    """The contract between a datamodule and a model.

    Batches are ``(inputs, targets)``:

    - ``input_kind="tokens"``: inputs are int64 ``(B, T)`` in ``[0, input_size)``;
    - ``input_kind="vectors"``: inputs are float ``(B, T, input_size)``;
    - ``input_kind="images"``: inputs are float ``(B, H, W)`` in [0, 1], ``input_size = H·W``
      (static images, e.g. for a VAE; the sequence model refuses them);
    - ``input_kind="category_pairs"``: inputs are int64 ``(B, seq_len, 2)``, pairs of
      categories in ``[0, input_size)`` (the samples of a transfer episode, as in Bengio et al.);
    - ``target_kind`` names an entry of :data:`fwlab.targets.TARGETS`
      (``"class_per_sequence"``: targets are int64 ``(B,)`` in ``[0, num_classes)``;
      ``"class_per_step"``: ``(B, T)``, or ``(B, T, target_groups)``, with a third batch tensor
      ``(B, T)`` counting the presentations of the step's class for per-instance accuracy;
      ``"regression_per_step"``: float ``(B, T)``, optionally a baseline ``(B, T)`` third).
    """

    input_kind: InputKind
    input_size: int  # vocabulary size for tokens, feature size for vectors
    target_kind: str
    num_classes: int | None = None  # for class targets (per group)
    # class targets made of several symbols, e.g. Santoro's five-character string labels:
    # targets then have a last axis of this size, each entry in [0, num_classes)
    target_groups: int = 1
    seq_len: int | None = None  # None when sequences vary in length
