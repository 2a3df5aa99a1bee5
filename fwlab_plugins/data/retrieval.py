"""Associative retrieval (Ba et al. 2016, section 4.1).

A sequence lists K key-value pairs, then ``??``, then one of the keys; the target is that key's
value. Keys are distinct letters a-z, values digits 0-9 drawn with replacement. For K = 4:

    c9k8j3f1??c  ->  9

Tokens: ``a``-``z`` are 0-25, ``0``-``9`` are 26-35, ``?`` is 36 (37 in all); length 2K + 3.
Splits of 100,000 / 10,000 / 20,000 sequences (Ba et al.), each drawn from its own stream
seeded by ``(data.seed, split)``: the same sequences in every process, worker and run.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fwlab.bounds import bounded
from fwlab.datamodule import DataConfig, DataModule
from fwlab.spec import DataSpec

ALPHABET = string.ascii_lowercase + string.digits + "?"
NUM_LETTERS, NUM_DIGITS = 26, 10
QUERY_MARK = ALPHABET.index("?")
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


@dataclass
class RetrievalConfig(DataConfig):
    # K key-value pairs per sequence (at most 26 distinct letter keys)
    num_pairs: int = bounded(4, at_least=1, at_most=NUM_LETTERS)
    train_size: int = bounded(100_000, at_least=1)
    val_size: int = bounded(10_000, at_least=1)
    test_size: int = bounded(20_000, at_least=1)


def generate(
    num_sequences: int, num_pairs: int, seed: int, split: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``num_sequences`` retrieval sequences ``(N, 2K+3)`` int64 and their targets ``(N,)``.

    Deterministic in ``(seed, split)``; targets are digits 0-9 (the value's class).
    """
    if not 1 <= num_pairs <= NUM_LETTERS:
        raise ValueError(f"data.num_pairs must be between 1 and 26, got {num_pairs}")
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, SPLIT_IDS[split]])))
    # Distinct keys: the first K of a random permutation of the 26 letters, per row.
    keys = np.argsort(rng.random((num_sequences, NUM_LETTERS)), axis=1)[:, :num_pairs]
    values = rng.integers(0, NUM_DIGITS, size=(num_sequences, num_pairs))
    query_slot = rng.integers(0, num_pairs, size=num_sequences)
    rows = np.arange(num_sequences)
    sequences = np.empty((num_sequences, 2 * num_pairs + 3), dtype=np.int64)
    sequences[:, 0 : 2 * num_pairs : 2] = keys
    sequences[:, 1 : 2 * num_pairs : 2] = NUM_LETTERS + values
    sequences[:, 2 * num_pairs : 2 * num_pairs + 2] = QUERY_MARK
    sequences[:, -1] = keys[rows, query_slot]
    targets = values[rows, query_slot]
    return torch.from_numpy(sequences), torch.from_numpy(targets.astype(np.int64))


def decode(sequence: torch.Tensor) -> str:
    """Tokens back to text, e.g. ``'c9k8j3f1??c'``."""
    return "".join(ALPHABET[int(token)] for token in sequence)


class AssociativeRetrievalDataModule(DataModule):
    """Associative retrieval: K key-value pairs, '??', a key; predict its value (Ba et al. 2016)."""

    Config = RetrievalConfig

    @property
    def spec(self) -> DataSpec:
        return DataSpec(
            input_kind="tokens",
            input_size=len(ALPHABET),
            target_kind="class_per_sequence",
            num_classes=NUM_DIGITS,
            seq_len=2 * self.config.num_pairs + 3,
        )

    @classmethod
    def tiny_example(cls, directory: Path) -> dict[str, Any]:
        return {"train_size": 64, "val_size": 16, "test_size": 16}

    def split_size(self, split: str) -> int:
        return getattr(self.config, f"{split}_size")

    def setup(self, stage: str | None = None) -> None:
        for split in SPLIT_IDS:
            if split not in self.datasets:
                inputs, targets = generate(
                    self.split_size(split), self.config.num_pairs, self.config.seed, split
                )
                self.datasets[split] = TensorDataset(inputs, targets)
