"""Episodic Omniglot: the on-disk layouts, the class split, episodes, labels, determinism."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from fwlab.errors import ConfigError
from fwlab.metrics import PerInstanceAccuracy
from fwlab_plugins.data.omniglot import (
    EpisodeDataset,
    OmniglotConfig,
    OmniglotDataModule,
    write_example_omniglot,
)
from fwlab_plugins.data.omniglot_files import load_omniglot, split_classes

from .conftest import SHARED_DATA, only_run_dir, run_fwlab


@pytest.fixture
def root(tmp_path):
    write_example_omniglot(tmp_path, alphabets=2, characters=5, drawings=6)
    return tmp_path


def make(root, **overrides):
    values = dict(
        root=str(root),
        train_class_fraction=0.6,
        instances_per_class=3,
        classes_per_episode=3,
        train_episodes=10,
        val_episodes=4,
        test_episodes=4,
    )
    config = OmniglotConfig(**{**values, **overrides})
    module = OmniglotDataModule(config)
    module.setup()
    return module


def test_folder_and_zip_layouts_load_the_same_drawings(tmp_path):
    write_example_omniglot(tmp_path / "folder", alphabets=2, characters=2, drawings=3)
    write_example_omniglot(tmp_path / "zip", alphabets=2, characters=2, drawings=3, zipped=True)
    from_folder = load_omniglot(tmp_path / "folder", size=20)
    from_zip = load_omniglot(tmp_path / "zip", size=20)
    assert (
        list(from_folder)
        == list(from_zip)
        == [
            ("Alphabet_0", "character01"),
            ("Alphabet_0", "character02"),
            ("Alphabet_1", "character01"),
            ("Alphabet_1", "character02"),
        ]
    )
    for key in from_folder:
        assert from_folder[key].shape == (3, 20, 20)
        np.testing.assert_array_equal(from_folder[key], from_zip[key])


def test_ink_is_one_after_resizing(tmp_path):
    from PIL import Image

    folder = tmp_path / "images_background" / "A" / "character01"
    folder.mkdir(parents=True)
    pixels = np.full((105, 105), 255, dtype=np.uint8)
    pixels[:, :52] = 0  # left half inked (black)
    Image.fromarray(pixels).save(folder / "a_01.png")
    image = load_omniglot(tmp_path, size=20)[("A", "character01")][0]
    assert image[:, :9].min() > 0.99 and image[:, 11:].max() < 0.01


def test_a_missing_dataset_says_where_it_looked(tmp_path):
    with pytest.raises(ConfigError, match=f"data.root={tmp_path}.*data.download=true"):
        load_omniglot(tmp_path, size=20)


def test_the_class_split_is_seeded_and_matches_the_paper_on_the_full_set():
    keys = [("alphabet", f"c{i}") for i in range(1623)]
    train, held_out = split_classes(keys, 0.7394, seed=1)
    assert (len(train), len(held_out)) == (1200, 423)
    assert not set(train) & set(held_out)
    assert split_classes(keys, 0.7394, seed=1) == (train, held_out)
    assert split_classes(keys, 0.7394, seed=2) != (train, held_out)


def test_rotations_add_classes_on_their_side_of_the_split(root):
    module = make(root)
    assert len(module.class_split["train"]) == 6 and len(module.class_split["held_out"]) == 4
    assert len(module.datasets["train"].classes) == 24  # 6 characters × 4 rotations
    first = module.datasets["train"].classes
    np.testing.assert_array_equal(first[1], np.rot90(first[0], 1, axes=(-2, -1)))
    assert len(make(root, rotation_classes=False).datasets["test"].classes) == 4


def test_an_episode_follows_the_protocol(root):
    module = make(root, augment=False)
    inputs, targets, instance = module.datasets["val"][0]
    assert inputs.shape == (9, 400 + 3) and targets.shape == (9,)
    assert sorted(targets.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # N classes × K instances
    assert torch.all(inputs[0, 400:] == 0)  # no label before the first step
    torch.testing.assert_close(
        inputs[1:, 400:], torch.nn.functional.one_hot(targets[:-1], 3).float()
    )
    for label in range(3):  # presentations counted 1..K in order
        assert instance[targets == label].tolist() == [1, 2, 3]
    # The same class keeps its label: identical drawings never carry two labels.
    spec = module.spec
    assert (spec.input_size, spec.num_classes, spec.seq_len) == (403, 3, 9)


def test_labels_are_assigned_per_episode(root):
    module = make(root, augment=False)
    firsts = {tuple(module.datasets["train"][i][1][:3].tolist()) for i in range(10)}
    assert len(firsts) > 1


def test_string_labels(root):
    module = make(root, labels="string", augment=False)
    inputs, targets, _ = module.datasets["test"][1]
    assert targets.shape == (9, 5) and targets.max() < 5
    assert inputs.shape == (9, 400 + 25)
    assert len({tuple(t.tolist()) for t in targets}) == 3  # distinct strings for 3 classes
    spec = module.spec
    assert (spec.num_classes, spec.target_groups) == (5, 5)


def test_episodes_are_a_function_of_seed_split_and_index(root):
    module = make(root)
    a, b = module.datasets["train"][3], make(root).datasets["train"][3]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], module.datasets["train"][4][0])
    assert not torch.equal(module.datasets["val"][0][0], module.datasets["test"][0][0])


def test_the_same_episodes_whatever_the_workers_and_disjoint_across_ranks(root):
    dataset = make(root).datasets["train"]
    single = torch.cat([b[0] for b in DataLoader(dataset, batch_size=4)])
    workers = torch.cat([b[0] for b in DataLoader(dataset, batch_size=4, num_workers=2)])
    assert torch.equal(single, workers)
    ranks = [
        list(DistributedSampler(dataset, num_replicas=2, rank=r, shuffle=True, seed=7))
        for r in range(2)
    ]
    assert not set(ranks[0]) & set(ranks[1]) and len(set(ranks[0]) | set(ranks[1])) == 10


def test_augmentation_only_in_training(root):
    plain = make(root, augment=False)
    augmented = make(root, augment=True)
    assert not torch.equal(plain.datasets["train"][0][0], augmented.datasets["train"][0][0])
    assert torch.equal(plain.datasets["test"][0][0], augmented.datasets["test"][0][0])


def test_too_many_classes_per_episode_is_a_clear_error(root):
    with pytest.raises(ConfigError, match="classes_per_episode=20.*only"):
        make(root, classes_per_episode=20, rotation_classes=False)


def test_per_instance_accuracy_by_hand():
    metric = PerInstanceAccuracy()
    correct = torch.tensor([[True, False, True, True]])
    instance = torch.tensor([[1, 1, 2, 10]])
    metric.update(correct, instance)
    values = metric.compute()
    assert values["instance_1"] == 0.5 and values["instance_2"] == 1.0
    assert values["instance_10"] == 1.0 and values["instance_3"] == 0.0


@pytest.mark.skipif(
    not (SHARED_DATA / "omniglot").is_dir(),
    reason="../shared/data/omniglot is not here (a user's clone has no ../shared)",
)
def test_the_real_omniglot_subsets_load_and_make_episodes():
    module = OmniglotDataModule(
        OmniglotConfig(
            root=str(SHARED_DATA / "omniglot"), train_episodes=2, val_episodes=2, test_episodes=2
        )
    )
    module.setup()
    total = len(module.class_split["train"]) + len(module.class_split["held_out"])
    assert total == 136 + 156 - 50  # the two subsets share 50 characters (Greek among them)
    inputs, targets, instance = module.datasets["train"][0]
    assert inputs.shape == (50, 405) and instance.max() == 10


def test_the_cli_trains_on_omniglot_and_saves_the_split(tmp_path):
    write_example_omniglot(tmp_path / "data", alphabets=2, characters=3, drawings=4)
    result = run_fwlab(
        "fit",
        "--model",
        "lru_ntm",
        "--data",
        "omniglot",
        f"data.root={tmp_path / 'data'}",
        "data.classes_per_episode=2",
        "data.instances_per_class=3",
        "data.train_episodes=8",
        "data.val_episodes=4",
        "data.test_episodes=4",
        "data.batch_size=4",
        "data.train_class_fraction=0.5",
        "model.hidden_size=8",
        "model.memory_slots=8",
        "model.memory_width=4",
        "trainer.max_steps=2",
        "logger=csv",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    split = json.loads((run_dir / "omniglot_split.json").read_text())
    assert len(split["train"]) == 3 and len(split["held_out"]) == 3
    assert "accuracy % by instance" in result.stdout


def test_labels_are_consistent_within_an_episode():
    """Classes of constant images (class c has value c/10): equal images, equal labels."""
    classes = [np.full((5, 20, 20), c / 10, dtype=np.float32) for c in range(6)]
    config = OmniglotConfig(classes_per_episode=4, instances_per_class=5, augment=False)
    dataset = EpisodeDataset(classes, config, "train", length=20)
    for index in range(20):
        inputs, targets, _ = dataset[index]
        label_of = {}
        for value, label in zip(inputs[:, 0].tolist(), targets.tolist()):
            assert label_of.setdefault(round(value, 3), label) == label
        assert len(label_of) == 4 and sorted(label_of.values()) == [0, 1, 2, 3]
