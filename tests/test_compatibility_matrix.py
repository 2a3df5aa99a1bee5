"""Every registered cell and model × every registered datamodule, driven by the registry.

A pair either trains (a tiny CPU fit in which every parameter gets a gradient) or is refused
before training with an IncompatibleError. Refusals are allowed only where the kinds differ:
every cell must pair with every sequence datamodule (tokens or vectors), and every registered
model must pair with at least one datamodule. Later plugins join by being registered.
"""

from __future__ import annotations

import dataclasses
import math

import lightning as L
import pytest
import torch

from fwlab.config import GENERIC_MODEL, compose
from fwlab.errors import IncompatibleError
from fwlab.registry import Registry
from fwlab.training import build_datamodule, build_model_and_data

from .test_cells import small_config

REGISTRY = Registry()
CELLS = REGISTRY.names("cell")
MODELS = [m for m in REGISTRY.names("model") if m != GENERIC_MODEL]
DATA = REGISTRY.names("data")
PAIRS = [(model, data) for model in CELLS + MODELS for data in DATA]
SEQUENCE_KINDS = ("tokens", "vectors")


def tiny_config(model: str, data: str, directory):
    """The pair's config with a small cell (if it is one) and the datamodule's tiny example."""
    config = compose(REGISTRY, model=model, data=data, overrides=["logger=none"])
    example = REGISTRY.get("data", data).tiny_example(directory)
    overrides: dict = {"data": {"batch_size": 4, **example}}
    if model in CELLS:
        cell_config = small_config(REGISTRY.get("cell", model), hidden_size=8)
        overrides["model"] = dataclasses.asdict(cell_config)
    config.merge_with(overrides)
    return config


@pytest.mark.parametrize(("model", "data"), PAIRS, ids=[f"{m}-{d}" for m, d in PAIRS])
def test_a_pair_trains_or_is_refused_before_training(model, data, tmp_path):
    L.seed_everything(0, verbose=False)
    config = tiny_config(model, data, tmp_path)
    try:
        built, datamodule = build_model_and_data(config, REGISTRY)
    except IncompatibleError as error:
        assert str(error), "a refusal must say why"
        kind = build_datamodule(config, REGISTRY).spec.input_kind
        assert model not in CELLS or kind not in SEQUENCE_KINDS, (
            f"cell {model} refused the sequence datamodule {data}: {error}"
        )
        return
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    loss = built.training_step(batch, 0)
    assert math.isfinite(loss.item())
    loss.backward()
    for name, parameter in built.named_parameters():
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
        default_root_dir=tmp_path,  # where plugins write run files (omniglot's class split)
    )
    trainer.fit(built, datamodule=datamodule)
    assert trainer.global_step == 2


@pytest.mark.parametrize("model", MODELS)
def test_every_registered_model_pairs_with_some_datamodule(model, tmp_path):
    partners = []
    for data in DATA:
        try:
            build_model_and_data(tiny_config(model, data, tmp_path / data), REGISTRY)
        except IncompatibleError:
            continue
        partners.append(data)
    assert partners, f"model {model} pairs with no registered datamodule"
