"""The associative retrieval generator (Ba et al. 2016, section 4.1)."""

from __future__ import annotations

import re

import pytest
import torch
from torch.utils.data import DataLoader

from fwlab_plugins.data.retrieval import (
    AssociativeRetrievalDataModule,
    RetrievalConfig,
    decode,
    generate,
)


def test_the_target_is_the_value_of_the_query_key():
    inputs, targets = generate(2000, 4, seed=7, split="train")
    assert inputs.shape == (2000, 11) and targets.shape == (2000,)
    for sequence, target in zip(inputs, targets):
        text = decode(sequence)
        assert re.fullmatch(r"([a-z][0-9]){4}\?\?[a-z]", text), text
        pairs = dict(zip(text[0:8:2], text[1:8:2]))
        assert len(pairs) == 4  # keys distinct
        assert pairs[text[-1]] == str(int(target))  # the query is a key; target = its value


def test_values_are_drawn_with_replacement_and_cover_all_digits():
    inputs, targets = generate(5000, 4, seed=1, split="train")
    values = inputs[:, 1:8:2] - 26
    assert set(values.unique().tolist()) == set(range(10))
    has_repeat = [len(set(row.tolist())) < 4 for row in values]
    assert 0.3 < sum(has_repeat) / len(has_repeat) < 0.6  # 1 - 10·9·8·7/10⁴ = 0.496


def test_split_sizes_follow_the_config():
    module = AssociativeRetrievalDataModule(
        RetrievalConfig(train_size=300, val_size=20, test_size=50, num_pairs=6)
    )
    module.setup()
    assert {s: len(d) for s, d in module.datasets.items()} == {"train": 300, "val": 20, "test": 50}
    assert module.spec.seq_len == 15 and module.spec.input_size == 37
    assert module.spec.num_classes == 10


def test_default_split_sizes_are_the_papers():
    config = RetrievalConfig()
    assert (config.train_size, config.val_size, config.test_size) == (100_000, 10_000, 20_000)


def test_deterministic_by_seed_and_split():
    a = generate(100, 4, seed=3, split="test")
    b = generate(100, 4, seed=3, split="test")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], generate(100, 4, seed=3, split="val")[0])
    assert not torch.equal(a[0], generate(100, 4, seed=4, split="test")[0])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_the_same_batches_whatever_the_number_of_workers(num_workers):
    reference = AssociativeRetrievalDataModule(
        RetrievalConfig(train_size=10, val_size=300, test_size=10, batch_size=64)
    )
    reference.setup()
    module = AssociativeRetrievalDataModule(
        RetrievalConfig(
            train_size=10, val_size=300, test_size=10, batch_size=64, num_workers=num_workers
        )
    )
    module.setup()
    expected = torch.cat([x for x, _ in DataLoader(reference.datasets["val"], batch_size=64)])
    got = torch.cat([x for x, _ in module.val_dataloader()])
    assert torch.equal(got, expected)


def test_too_many_pairs_is_a_clear_error():
    with pytest.raises(ValueError, match="num_pairs must be between 1 and 26"):
        generate(1, 27, seed=0, split="train")


def test_the_same_data_in_another_process():
    import hashlib
    import subprocess
    import sys

    code = (
        "import hashlib; from fwlab_plugins.data.retrieval import generate; "
        "x, y = generate(1000, 4, seed=5, split='train'); "
        "print(hashlib.sha256(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest())"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    x, y = generate(1000, 4, seed=5, split="train")
    here = hashlib.sha256(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest()
    assert other.stdout.strip() == here
