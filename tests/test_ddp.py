"""DDP on CPU (gloo): two processes give the metrics of one, each reading its own shard."""

from __future__ import annotations

import csv
import json
import textwrap
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import TensorDataset

from fwlab.datamodule import shard_sampler
from fwlab.errors import IncompatibleError
from fwlab.training import build_model_and_data

from .conftest import read_results, run_fwlab
from .test_compatibility_matrix import PAIRS, REGISTRY, tiny_config

# A datamodule plugin that records, per process, the examples its real loaders read, and
# whether the process group is still alive as the process exits.
RECORDING_PLUGIN = textwrap.dedent(
    """
    import atexit, json, os
    from pathlib import Path

    import torch.distributed as dist

    from fwlab import register
    from fwlab_plugins.data.retrieval import AssociativeRetrievalDataModule


    @register("data", "recorded_retrieval")
    class RecordedRetrieval(AssociativeRetrievalDataModule):
        \"\"\"Retrieval that writes the indices each process reads.\"\"\"

        def setup(self, stage=None):
            super().setup(stage)
            if self.trainer is not None and dist.is_initialized():  # once, in Lightning's call
                out = Path(os.environ["FWLAB_RUN_DIR"]) / f"group-at-exit-{dist.get_rank()}"
                atexit.register(lambda: out.write_text(str(dist.is_initialized())))

        def _loader(self, split):
            loader = super()._loader(split)
            if self.trainer is not None and hasattr(loader.sampler, "set_epoch"):
                loader.sampler.set_epoch(0)
            indices = list(loader.sampler) if loader.sampler is not None else []
            rank = self.trainer.global_rank
            out = Path(os.environ["FWLAB_RUN_DIR"]) / f"shard-{split}-{rank}.json"
            out.write_text(json.dumps([int(i) for i in indices]))
            return loader
    """
)

COMMON = [
    "data.train_size=128",
    "data.val_size=101",  # odd: the two evaluation shards differ in length
    "data.test_size=99",
    "trainer.max_epochs=4",
    "trainer.accelerator=cpu",
    "logger=csv",
]


def epoch_metrics(run_dir):
    path = next(run_dir.glob("csv/version_0/metrics.csv"))
    with open(path) as file:
        rows = list(csv.DictReader(file))
    return {
        (row["epoch"], key): float(value)
        for row in rows
        for key, value in row.items()
        if value and key not in ("epoch", "step") and not key.endswith("_step")
    }


def test_two_ddp_processes_log_the_metrics_of_one_on_disjoint_shards(tmp_path):
    """Full-batch training (2 × 64 against 1 × 128 examples) makes every step's gradient the
    same whatever the order, so every logged metric must agree; tolerance 1e-5 (float32 sums
    in a different order). The loaders' own samplers are recorded in each process."""
    plugin = tmp_path / "recorded.py"
    plugin.write_text(RECORDING_PLUGIN)
    args = ["fit", "--plugin", str(plugin), "--model", "fast_weights", "--data"]
    ddp_args = ["data.batch_size=64", "trainer.devices=2", "trainer.strategy=ddp"]
    ddp = run_fwlab(*args, "recorded_retrieval", *COMMON, *ddp_args, "output_dir=ddp",
                    cwd=tmp_path)  # fmt: skip
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = run_fwlab(*args, "retrieval", *COMMON, "data.batch_size=128", "output_dir=single",
                       cwd=tmp_path)  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]
    (ddp_dir,) = (tmp_path / "ddp").iterdir()
    (single_dir,) = (tmp_path / "single").iterdir()

    ddp_metrics, single_metrics = epoch_metrics(ddp_dir), epoch_metrics(single_dir)
    assert ddp_metrics.keys() == single_metrics.keys()
    assert {key for _, key in ddp_metrics} >= {"val/loss", "val/acc", "train/loss_epoch"}
    for key, value in single_metrics.items():
        assert ddp_metrics[key] == pytest.approx(value, abs=1e-5), key
    for key, value in read_results(single_dir)["metrics"].items():
        assert read_results(ddp_dir)["metrics"][key] == pytest.approx(value, abs=1e-5), key

    for split, size in (("train", 128), ("val", 101), ("test", 99)):
        shards = [json.loads((ddp_dir / f"shard-{split}-{r}.json").read_text()) for r in (0, 1)]
        assert not set(shards[0]) & set(shards[1]), f"{split} shards overlap"
        assert sorted(shards[0] + shards[1]) == list(range(size)), f"{split} lost examples"
    assert len(list(ddp_dir.glob("results*.json"))) == 1  # written once, by rank zero
    assert len(list(ddp_dir.glob("config*.yaml"))) == 1
    # each process released its group before exiting (release_process_group)
    assert [(ddp_dir / f"group-at-exit-{r}").read_text() for r in (0, 1)] == ["False", "False"]


def fake_trainer(world_size: int, rank: int) -> SimpleNamespace:
    """What shard_sampler reads of a Lightning Trainer."""
    return SimpleNamespace(world_size=world_size, global_rank=rank)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_evaluation_shards_partition_the_split_exactly(world_size):
    dataset = TensorDataset(torch.arange(103))
    shards = [list(shard_sampler(dataset, "val", fake_trainer(world_size, r))) for r in
              range(world_size)]  # fmt: skip
    assert sorted(i for shard in shards for i in shard) == list(range(103))


@pytest.mark.parametrize("world_size", [2, 3])
def test_training_shards_are_equal_disjoint_and_reshuffled_each_epoch(world_size):
    dataset = TensorDataset(torch.arange(100))
    samplers = [shard_sampler(dataset, "train", fake_trainer(world_size, r)) for r in
                range(world_size)]  # fmt: skip
    epochs = []
    for epoch in (0, 1):
        for sampler in samplers:
            sampler.set_epoch(epoch)
        shards = [list(sampler) for sampler in samplers]
        assert len({len(shard) for shard in shards}) == 1
        seen = [i for shard in shards for i in shard]
        assert len(seen) == len(set(seen)) == 100 - 100 % world_size
        epochs.append(shards[0])
    assert epochs[0] != epochs[1]


def test_one_process_reads_the_whole_split():
    assert shard_sampler(TensorDataset(torch.arange(5)), "train", fake_trainer(1, 0)) is None
    assert shard_sampler(TensorDataset(torch.arange(5)), "val", None) is None


@pytest.mark.slow
@pytest.mark.parametrize(("model", "data"), PAIRS, ids=[f"{m}-{d}" for m, d in PAIRS])
def test_every_compatible_pair_fits_under_two_process_ddp(model, data, tmp_path):
    """Every registered cell and model with every datamodule it pairs with, on its tiny example:
    a real 2-process gloo fit that validates, tests and writes one result (about 10 s each)."""
    config = tiny_config(model, data, tmp_path / "example")
    try:
        build_model_and_data(config, REGISTRY)
    except IncompatibleError as error:
        pytest.skip(f"not a pair: {error}")
    values = OmegaConf.to_container(config, resolve=True)
    overrides = [f"{group}.{key}={json.dumps(value)}" for group in ("model", "data")
                 for key, value in values[group].items() if key != "name"]  # fmt: skip
    result = run_fwlab("fit", "--model", model, "--data", data, *overrides, "logger=csv",
                       "trainer.max_steps=4", "trainer.max_epochs=1000", "trainer.accelerator=cpu",
                       "trainer.devices=2",
                       "trainer.strategy=ddp", cwd=tmp_path, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert read_results(run_dir)["global_step"] == 4
