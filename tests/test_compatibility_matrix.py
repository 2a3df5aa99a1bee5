"""Every registered cell × every registered datamodule: a tiny CPU fit, driven by the registry.

Later cells and datamodules join the matrix by being registered; nothing here names them.
"""

from __future__ import annotations

import dataclasses
import math

import lightning as L
import pytest
import torch

from fwlab.config import compose
from fwlab.registry import Registry
from fwlab.training import build_model_and_data

from .test_cells import small_config

REGISTRY = Registry()
PAIRS = [(cell, data) for cell in REGISTRY.names("cell") for data in REGISTRY.names("data")]


def tiny_config(cell: str, data: str, directory):
    """The pair's config with a small cell and the datamodule's own tiny example."""
    config = compose(REGISTRY, model=cell, data=data, overrides=["logger=none"])
    example = REGISTRY.get("data", data).tiny_example(directory)
    overrides = {
        "model": dataclasses.asdict(small_config(REGISTRY.get("cell", cell), hidden_size=8)),
        "data": {"batch_size": 4, **example},
    }
    config.merge_with(overrides)
    return config


@pytest.mark.parametrize(("cell", "data"), PAIRS, ids=[f"{c}-{d}" for c, d in PAIRS])
def test_a_tiny_fit_runs_and_every_parameter_learns(cell, data, tmp_path):
    L.seed_everything(0, verbose=False)
    model, datamodule = build_model_and_data(tiny_config(cell, data, tmp_path), REGISTRY)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    loss = model.training_step(batch, 0)
    assert math.isfinite(loss.item())
    loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, f"{name} received no gradient"

    trainer = L.Trainer(
        max_steps=2,
        limit_val_batches=1,
        limit_test_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(model, datamodule=datamodule)
    assert trainer.global_step == 2
    assert math.isfinite(trainer.callback_metrics["train/loss"].item())
