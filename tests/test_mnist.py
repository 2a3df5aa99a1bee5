"""MNIST idx loading (gzipped and raw, torchvision's layout), pool splits, sequential MNIST."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from fwlab.errors import ConfigError
from fwlab_plugins.data.mnist_files import (
    load_mnist,
    mnist_splits,
    random_digits,
    read_idx,
    split_pool,
    write_idx,
    write_idx_set,
)
from fwlab_plugins.data.seqmnist import (
    SequentialMNISTConfig,
    SequentialMNISTDataModule,
    pixel_permutation,
)

from .conftest import SHARED_DATA


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path, suffix):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / f"images-idx3-ubyte{suffix}"
    write_idx(path, array)
    if suffix:  # really gzipped
        assert gzip.open(path).read(4) == bytes([0, 0, 8, 3])
    np.testing.assert_array_equal(read_idx(path), array)


def test_a_bad_idx_file_is_a_clear_error(tmp_path):
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(ConfigError, match=f"{path} is not an idx file"):
        read_idx(path)
    write_idx(path, np.zeros((4, 2, 2), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-3])  # truncated
    with pytest.raises(ConfigError, match="header says shape"):
        read_idx(path)


@pytest.mark.parametrize("layout", ["flat", "torchvision"])
@pytest.mark.parametrize("gzipped", [True, False])
def test_finds_both_sets_in_either_layout(tmp_path, layout, gzipped):
    folder = tmp_path if layout == "flat" else tmp_path / "MNIST" / "raw"
    write_idx_set(folder, "train", *random_digits(30, seed=1), gzipped=gzipped)
    write_idx_set(folder, "t10k", *random_digits(10, seed=2), gzipped=gzipped)
    sets = load_mnist(tmp_path)
    assert sets["train"][0].shape == (30, 28, 28) and sets["t10k"][1].shape == (10,)
    splits = mnist_splits(tmp_path, False, val_size=5, pool_fractions=(0.8, 0.1, 0.1), seed=0)
    assert [len(splits[s][0]) for s in ("train", "val", "test")] == [25, 5, 10]
    np.testing.assert_array_equal(splits["test"][0], sets["t10k"][0])


def test_missing_data_says_where_it_looked_and_how_to_get_it(tmp_path):
    with pytest.raises(ConfigError) as error:
        load_mnist(tmp_path / "empty")
    message = str(error.value)
    assert f"data.root={tmp_path / 'empty'}" in message and "data.download=true" in message
    assert "t10k-images-idx3-ubyte" in message


def test_a_single_set_is_split_as_a_seeded_pool(tmp_path):
    write_idx_set(tmp_path, "t10k", *random_digits(200, seed=3))
    splits = mnist_splits(tmp_path, False, val_size=5, pool_fractions=(0.8, 0.1, 0.1), seed=4)
    assert [len(splits[s][0]) for s in ("train", "val", "test")] == [160, 20, 20]
    train, val, test = split_pool(200, (0.8, 0.1, 0.1), seed=4)
    assert len(set(train) | set(val) | set(test)) == 200  # disjoint and complete
    again = split_pool(200, (0.8, 0.1, 0.1), seed=4)
    assert all(np.array_equal(a, b) for a, b in zip((train, val, test), again))
    with pytest.raises(ConfigError, match="sum to 1"):
        split_pool(10, (0.5, 0.1, 0.1), seed=0)


def make_seqmnist(tmp_path, **overrides):
    write_idx_set(tmp_path, "t10k", *random_digits(50, seed=5))
    module = SequentialMNISTDataModule(SequentialMNISTConfig(root=str(tmp_path), **overrides))
    module.setup()
    return module


def test_sequential_mnist_reads_pixels_row_by_row(tmp_path):
    module = make_seqmnist(tmp_path)
    inputs, labels = module.datasets["test"].tensors
    assert inputs.shape == (5, 784, 1) and inputs.dtype == torch.float32
    assert 0.0 <= inputs.min() and inputs.max() <= 1.0
    images, _ = load_mnist(tmp_path)["t10k"]
    _, _, test_index = split_pool(50, (0.8, 0.1, 0.1), seed=module.config.seed)
    expected = torch.from_numpy(images[test_index].reshape(5, 784) / 255.0).float()
    torch.testing.assert_close(inputs.squeeze(-1), expected)
    assert module.spec.seq_len == 784 and module.spec.input_size == 1


def test_permuted_mnist_uses_one_true_seeded_permutation(tmp_path):
    permutation = pixel_permutation(1234)
    assert torch.equal(permutation.sort().values, torch.arange(784))  # no repeats, none dropped
    assert torch.equal(permutation, pixel_permutation(1234))
    assert not torch.equal(permutation, pixel_permutation(1235))
    plain = make_seqmnist(tmp_path).datasets["train"].tensors[0]
    permuted = make_seqmnist(tmp_path, permute=True).datasets["train"].tensors[0]
    torch.testing.assert_close(permuted, plain[:, permutation])


@pytest.mark.skipif(
    not (SHARED_DATA / "mnist").is_dir(),
    reason="../shared/data/mnist is not here (a user's clone has no ../shared)",
)
def test_the_real_mnist_test_set_loads():
    sets = load_mnist(SHARED_DATA / "mnist")
    images, labels = sets["t10k"]
    assert set(sets) == {"t10k"} and images.shape == (10_000, 28, 28)
    assert np.bincount(labels).tolist()[:3] == [980, 1135, 1032]  # MNIST's known test counts
    splits = mnist_splits(SHARED_DATA / "mnist", False, 5000, (0.8, 0.1, 0.1), seed=1234)
    assert [len(splits[s][0]) for s in ("train", "val", "test")] == [8000, 1000, 1000]


def test_glimpse_schedule_is_coarse_to_fine_with_locations():
    from fwlab_plugins.data.glimpses import GlimpsesConfig, glimpse_sequences, schedule

    assert schedule(3)[:6] == [(0, 0, 0), (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1), (2, 0, 0)]
    images = torch.rand(2, 28, 28)
    sequences = glimpse_sequences(images, GlimpsesConfig())
    assert sequences.shape == (2, 21, 49 + 3)
    # Level 0: the whole image pooled 4×4; level 1, top-right quadrant pooled 2×2;
    # level 2: the 7×7 blocks at full resolution.
    whole = images.reshape(2, 7, 4, 7, 4).mean((2, 4)).reshape(2, 49)
    torch.testing.assert_close(sequences[:, 0, :49], whole)
    top_right = images[:, :14, 14:].reshape(2, 7, 2, 7, 2).mean((2, 4)).reshape(2, 49)
    torch.testing.assert_close(sequences[:, 2, :49], top_right)
    torch.testing.assert_close(sequences[:, 20, :49], images[:, 21:, 21:].reshape(2, 49))
    # Locations: centre (row, column) in [-1, 1] and level in [0, 1].
    assert sequences[0, 0, 49:].tolist() == [0.0, 0.0, 0.0]
    assert sequences[0, 2, 49:].tolist() == [-0.5, 0.5, 0.5]
    onehot = glimpse_sequences(images, GlimpsesConfig(location="onehot"))
    assert onehot.shape == (2, 21, 49 + 21) and torch.equal(onehot[0, :, 49:], torch.eye(21))


def test_glimpses_datamodule_reads_the_idx_files(tmp_path):
    from fwlab_plugins.data.glimpses import GlimpsesConfig, GlimpsesMNISTDataModule

    write_idx_set(tmp_path, "t10k", *random_digits(30, seed=9))
    module = GlimpsesMNISTDataModule(GlimpsesConfig(root=str(tmp_path), levels=2))
    module.setup()
    inputs, labels = module.datasets["train"].tensors
    assert inputs.shape == (24, 5, 52) and module.spec.seq_len == 5
    with pytest.raises(ConfigError, match="data.glimpse_size=8 is larger than the 7×7 regions"):
        GlimpsesMNISTDataModule(GlimpsesConfig(root=str(tmp_path), glimpse_size=8)).to_inputs(
            np.zeros((1, 28, 28), dtype=np.uint8)
        )
    with pytest.raises(ConfigError, match="data.levels=4"):
        GlimpsesMNISTDataModule(GlimpsesConfig(root=str(tmp_path), levels=4)).to_inputs(
            np.zeros((1, 28, 28), dtype=np.uint8)
        )


def test_a_missing_dataset_fails_before_a_run_directory_is_made(tmp_path):
    from .conftest import run_fwlab

    result = run_fwlab(
        "fit",
        "--model",
        "lstm",
        "--data",
        "seqmnist",
        f"data.root={tmp_path / 'nowhere'}",
        "logger=none",
        cwd=tmp_path,
    )
    assert result.returncode == 2 and "no MNIST idx files under data.root=" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_a_split_the_command_needs_left_empty_fails_before_a_run_directory_is_made(tmp_path):
    """The fit trained, then failed at its final test with an IndexError traceback."""
    from .conftest import run_fwlab

    write_idx_set(tmp_path, "t10k", *random_digits(40, seed=0))
    result = run_fwlab(
        "fit", "--model", "lstm", "--data", "seqmnist", f"data.root={tmp_path}",
        "data.pool_fractions=[1.0,0.0,0.0]", "logger=none", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert "the test split of data seqmnist holds no examples, and fwlab fit needs" in result.stderr
    assert not (tmp_path / "runs").exists()
