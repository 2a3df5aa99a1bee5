"""The static-MNIST datamodule and the mixture-posterior VAE."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch

from fwlab.config import compose
from fwlab.errors import ConfigError
from fwlab.registry import Registry
from fwlab.training import build_model_and_data
from fwlab_plugins.data.mnist_files import random_digits, write_idx_set
from fwlab_plugins.data.mnist_images import MNISTImagesConfig, MNISTImagesDataModule

from .conftest import only_run_dir, read_results, run_fwlab

REGISTRY = Registry()


def images_datamodule(root, **values) -> MNISTImagesDataModule:
    data = MNISTImagesDataModule(MNISTImagesConfig(root=str(root), val_size=8, **values))
    data.setup("fit")
    return data


@pytest.fixture
def mnist_root(tmp_path):
    write_idx_set(tmp_path, "t10k", *random_digits(40, seed=0))
    return tmp_path


@pytest.fixture
def prototype_root(tmp_path):
    """80 'digits' in the idx format: 4 random black-and-white prototypes with 3 % of the
    pixels flipped, so there is structure for a VAE to learn (uniform noise has none)."""
    rng = np.random.default_rng(0)
    prototypes = rng.random((4, 28, 28)) < 0.3
    labels = np.arange(80) % 4
    flips = rng.random((80, 28, 28)) < 0.03
    images = ((prototypes[labels] ^ flips) * 255).astype(np.uint8)
    write_idx_set(tmp_path / "prototypes", "t10k", images, labels.astype(np.uint8))
    return tmp_path / "prototypes"


def test_static_binarisation_is_binary_fixed_by_the_seed_and_follows_the_grey_levels(mnist_root):
    images = images_datamodule(mnist_root).datasets["train"].tensors[0]
    assert images.shape[1:] == (28, 28)
    assert set(images.unique().tolist()) <= {0.0, 1.0}
    again = images_datamodule(mnist_root).datasets["train"].tensors[0]
    assert torch.equal(images, again)
    other_seed = images_datamodule(mnist_root, seed=7).datasets["train"]
    assert other_seed.tensors[0].shape != images.shape or not torch.equal(
        other_seed.tensors[0], images
    )
    grey = images_datamodule(mnist_root, binarize="none").datasets["train"].tensors[0]
    assert 0 <= grey.min() and grey.max() <= 1 and len(grey.unique()) > 2
    assert images[grey == 0].sum() == 0 and images[grey == 1].min() == 1  # P(1) = grey level
    threshold = images_datamodule(mnist_root, binarize="threshold").datasets["train"]
    assert torch.equal(threshold.tensors[0], (grey > 0.5).float())


def test_an_unknown_binarisation_is_a_clear_error(mnist_root):
    with pytest.raises(ConfigError, match="data.binarize='otsu'"):
        images_datamodule(mnist_root, binarize="otsu")


def build_vae(mnist_root, components: int):
    config = compose(
        REGISTRY,
        model="mixture_vae",
        data="mnist",
        overrides=[
            f"data.root={mnist_root}",
            "data.val_size=8",
            f"model.components={components}",
            "model.hidden_size=32",
            "model.latent_size=3",
        ],
    )
    torch.manual_seed(0)
    model, data = build_model_and_data(config, REGISTRY)
    data.setup("fit")
    return model, data.datasets["train"].tensors[0][:16]


def test_the_mixture_weights_learn_through_the_sample(mnist_root):
    """The posterior's logits get a gradient from the reconstruction term: only the sample
    carries it there, so this is Graves' estimator at work inside the ELBO."""
    model, images = build_vae(mnist_root, components=4)
    q = model.posterior(images)
    z = q.rsample()
    reconstruction = model.log_joint(images, z) - (-0.5 * z**2 - 0.5 * math.log(2 * math.pi)).sum(
        -1
    )
    gradient = torch.autograd.grad(reconstruction.sum(), model.posterior_head.weight)[0]
    assert gradient[:4].abs().sum() > 0  # the first K rows produce the mixture logits


def test_the_importance_weighted_bound_is_at_least_the_elbo(mnist_root):
    model, images = build_vae(mnist_root, components=2)
    torch.manual_seed(1)
    elbo = torch.stack([model.elbo_estimate(images).detach() for _ in range(200)]).mean()
    bound = model.importance_weighted_bound(images, samples=200).mean()
    assert bound >= elbo
    # and with one sample it is an unbiased estimate of the ELBO itself
    single = torch.stack([model.importance_weighted_bound(images, 1) for _ in range(400)]).mean()
    assert single.item() == pytest.approx(elbo.item(), rel=0.01)


def test_fit_improves_the_elbo_and_reports_both_bounds(tmp_path, prototype_root):
    result = run_fwlab(
        "fit",
        "--model",
        "mixture_vae",
        "--data",
        "mnist",
        f"data.root={prototype_root}",
        "data.batch_size=8",
        "model.hidden_size=64",
        "model.components=2",
        "model.importance_samples=10",
        "trainer.max_epochs=15",
        "logger=csv",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    metrics = read_results(run_dir)["metrics"]
    assert metrics["test/iw_bound"] > metrics["test/elbo"] - 1.0  # noisy on 8 images
    with open(next(run_dir.glob("csv/version_0/metrics.csv"))) as file:
        elbos = [float(r["val/elbo"]) for r in csv.DictReader(file) if r.get("val/elbo")]
    assert elbos[-1] > elbos[0] + 50  # from about −543 (784 coin flips) upwards
    assert "test ELBO:" in result.stdout and "importance-weighted bound" in result.stdout
