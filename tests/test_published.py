"""Published numbers beside a run's own (fwlab/published.py): which entries apply, what the
summary says, the checks on a config's entries, every preset's, and the real command's output."""

from __future__ import annotations

import pytest

from fwlab.config import compose, config_dir, load_yaml, to_plain
from fwlab.errors import ConfigError
from fwlab.published import compare, summary_lines
from fwlab.registry import default_registry

from .conftest import only_run_dir, read_results, run_fwlab

REGISTRY = default_registry()


def entry(source: str, value: float, **where: object) -> dict:
    return {"source": source, "metrics": {"test/acc": value}, "where": where}


def plain_config(hidden_size: int, *entries: dict) -> dict:
    return {"model": {"name": "lstm", "hidden_size": hidden_size}, "published": list(entries)}


TABLE = [entry("R = 20", 0.39, **{"model.hidden_size": 20}),
         entry("R = 50", 0.98, **{"model.hidden_size": 50})]  # fmt: skip


def test_only_the_entry_for_the_runs_setting_is_compared():
    compared = compare(plain_config(50, *TABLE), {"test/acc": 0.9, "test/loss": 0.3})
    assert compared == [
        {
            "source": "R = 50",
            "where": {"model.hidden_size": 50},
            "metrics": {"test/acc": {"published": 0.98, "measured": 0.9}},
        }
    ]
    lines = summary_lines(plain_config(50, *TABLE), compared)
    assert lines[0] == "published:       R = 50"
    assert "0.98" in lines[1] and "published" in lines[1] and "0.9 this run" in lines[1]


def test_an_entry_without_settings_always_applies():
    assert compare(plain_config(7, entry("any", 0.5)), {"test/acc": 0.4})[0]["source"] == "any"


def test_when_no_entry_applies_the_summary_names_the_setting_that_differs():
    plain = plain_config(30, *TABLE)
    assert compare(plain, {"test/acc": 0.9}) == []
    assert summary_lines(plain, []) == [
        "not compared:    R = 20: for model.hidden_size=20; this run has model.hidden_size=30",
        "not compared:    R = 50: for model.hidden_size=50; this run has model.hidden_size=30",
    ]


def test_a_metric_the_command_did_not_log_is_said_so():
    plain = plain_config(50, *TABLE)
    compared = compare(plain, {"val/acc": 0.9})  # fwlab validate logs val/*, not test/*
    assert compared[0]["metrics"]["test/acc"]["measured"] is None
    assert "not logged by this command" in summary_lines(plain, compared)[1]


def test_a_run_without_published_numbers_prints_nothing_of_them():
    plain = plain_config(50)
    assert compare(plain, {"test/acc": 0.9}) == [] and summary_lines(plain, []) == []


@pytest.mark.parametrize(
    "text, expected",
    [
        ("published:\n  - source: x\n    where: {model.hiden_size: 3}\n",
         r"published\[0\]\.where \(from .*mine.yaml\): 'model.hiden_size' is not a config key"),
        ("published:\n  - sorce: x\n", r"'published\[0\]\.sorce' \(from .*mine.yaml\)"),
        ("published:\n  - source: x\n    metrics: {test/acc: high}\n",
         r"'published\[0\]\.metrics\.test/acc' \(from .*mine.yaml\): .*'high'"),
        ("published:\n  - metrics: {test/acc: 0.5}\n",
         r"published\[0\] \(from .*mine.yaml\) has no 'source'"),
        ("published: {source: x}\n", r"'published' \(from .*mine.yaml\) must be a list"),
    ],
    ids=["unknown-where-key", "unknown-field", "not-a-number", "no-source", "not-a-list"],
)  # fmt: skip
def test_a_bad_entry_is_refused_naming_it(tmp_path, text, expected):
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected):
        compose(REGISTRY, model="lstm", data="retrieval", config_files=[path])


def presets_with_published_numbers() -> list[str]:
    return sorted(
        path.stem
        for path in (config_dir() / "experiment").glob("*.yaml")
        if load_yaml(path).get("published")
    )


def test_every_paper_has_a_preset_with_its_published_numbers():
    sources = " ".join(
        published["source"]
        for name in presets_with_published_numbers()
        for published in load_yaml(config_dir() / "experiment" / f"{name}.yaml")["published"]
    )
    for author in ("Ba et al.", "Cooijmans et al.", "Santoro et al.", "Bengio et al."):
        assert author in sources


@pytest.mark.parametrize("name", presets_with_published_numbers())
def test_each_preset_as_given_is_compared_with_its_paper(name):
    """The one command a preset opens with compares the run with a published number: some
    entry applies to the preset's own settings, and names a metric the run's model logs."""
    config = compose(REGISTRY, overrides=[f"experiment={name}"])
    compared = compare(to_plain(config), {})
    assert compared, f"experiment={name}: no published entry applies to the preset as given"
    for comparison in compared:
        for metric in comparison["metrics"]:
            assert metric.startswith("test/"), metric


def test_the_command_prints_and_records_the_published_number_beside_its_own(tmp_path):
    small = ["data.train_size=1000", "data.val_size=200", "data.test_size=200"]
    fit = run_fwlab(  # W&B's offline run files: no credentials in the test's environment
        "fit", "experiment=retrieval_lstm", "trainer.max_steps=5", *small, cwd=tmp_path
    )  # fmt: skip
    assert fit.returncode == 0, fit.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    (wandb_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    assert b"published/test/acc" in wandb_file.read_bytes()  # in the W&B run's summary
    results = read_results(run_dir)
    measured = results["metrics"]["test/acc"]
    assert results["published"] == [
        {
            "source": "Ba et al. 2016, Table 1, LSTM, R = 20 (recalled)",
            "where": {"model.hidden_size": 20},
            "metrics": {"test/acc": {"published": 0.3919, "measured": measured}},
        }
    ]
    assert "published:       Ba et al. 2016, Table 1, LSTM, R = 20 (recalled)" in fit.stdout
    assert f"{measured:.4g} this run" in fit.stdout

    other = tmp_path / "other"
    other.mkdir()
    changed = run_fwlab(
        "fit", "experiment=retrieval_lstm", "model.hidden_size=30", "trainer.max_steps=5",
        "logger=csv", *small, cwd=other,
    )  # fmt: skip
    assert changed.returncode == 0, changed.stderr[-3000:]
    assert read_results(only_run_dir(other))["published"] == []
    assert "this run has model.hidden_size=30" in changed.stdout
