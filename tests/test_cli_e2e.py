"""End to end: the real `fwlab` command in a subprocess, on CPU, seeded, offline."""

from __future__ import annotations

import csv

import pytest
import torch

from .conftest import fwlab_env, only_run_dir, read_results, run_fwlab

SMALL = ["data.train_size=3000", "data.val_size=500", "data.test_size=1000"]


def metrics_rows(run_dir):
    rows = []
    for path in sorted((run_dir / "csv").glob("version_*/metrics.csv")):
        rows += list(csv.DictReader(path.open()))
    return rows


@pytest.mark.parametrize("model", ["fast_weights", "lstm"])
def test_fit_writes_a_run_and_test_reproduces_its_metric(tmp_path, model):
    fit = run_fwlab(
        "fit",
        "--model",
        model,
        "--data",
        "retrieval",
        "trainer.max_steps=50",
        "logger=csv",
        cwd=tmp_path,
    )
    assert fit.returncode == 0, fit.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    assert (run_dir / "config.yaml").is_file()
    best = sorted((run_dir / "checkpoints").glob("best-*.ckpt"))
    assert len(best) == 1 and (run_dir / "checkpoints" / "last.ckpt").is_file()
    rows = metrics_rows(run_dir)
    assert any(row.get("val/acc") for row in rows) and any(row.get("test/acc") for row in rows)
    assert "test error:" in fit.stdout
    fitted = read_results(run_dir)
    assert fitted["checkpoint"] == str(best[0].resolve())

    one_thread = {**fwlab_env(tmp_path), "OMP_NUM_THREADS": "1"}
    test = run_fwlab("test", "--ckpt", str(best[0]), "logger=csv", cwd=tmp_path, env=one_thread)
    assert test.returncode == 0, test.stderr[-3000:]
    test_dirs = [p for p in (tmp_path / "runs").iterdir() if p != run_dir]
    assert len(test_dirs) == 1  # a run of its own; the fit's directory is untouched
    tested = read_results(test_dirs[0])
    assert tested["metrics"]["test/acc"] == pytest.approx(fitted["metrics"]["test/acc"], abs=1e-6)
    assert tested["model"] == model
    # what ran it, beside its wall time
    machine = {"device": "cpu", "gpu": None, "processes": 1, "cpu_threads": 1}
    assert tested["machine"] == {**machine, "torch": torch.__version__}
    assert "(cpu; processes × CPU threads: 1 × 1)" in test.stdout


def test_a_short_seeded_run_learns(tmp_path):
    result = run_fwlab(
        "fit",
        "--model",
        "fast_weights",
        "--data",
        "retrieval",
        "model.hidden_size=50",
        "trainer.max_steps=600",
        "optim.lr=3e-3",
        "data.val_size=1000",
        "data.test_size=2000",
        "logger=csv",
        "seed=3",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    accuracy = read_results(only_run_dir(tmp_path))["metrics"]["test/acc"]
    assert accuracy > 0.5, f"test accuracy {accuracy} after 600 steps (chance: 0.1)"


def test_resume_continues_from_the_last_checkpoint(tmp_path):
    first = run_fwlab(
        "fit",
        "--model",
        "fast_weights",
        "--data",
        "retrieval",
        *SMALL,
        "trainer.max_steps=20",
        "logger=csv",
        cwd=tmp_path,
    )
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    original_config = (run_dir / "config.yaml").read_text()
    first_metrics = (run_dir / "csv" / "version_0" / "metrics.csv").read_text()

    resumed = run_fwlab("fit", "--resume", str(run_dir), "trainer.max_steps=40", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert only_run_dir(tmp_path) == run_dir  # the same run directory, no new one
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 40
    assert last["fwlab_config"]["trainer"]["max_steps"] == 40
    # Nothing the first attempt wrote was overwritten.
    assert (run_dir / "config.yaml").read_text() == original_config
    assert (run_dir / "config.1.yaml").is_file()
    assert (run_dir / "csv" / "version_0" / "metrics.csv").read_text() == first_metrics
    steps = [int(r["step"]) for r in metrics_rows(run_dir) if r.get("train/loss_step")]
    assert max(steps) >= 30  # the second attempt trained steps 20..39
    assert "Restoring states from the checkpoint" in resumed.stderr + resumed.stdout


def test_a_resumed_or_evaluated_run_keeps_its_network_and_a_change_writes_nothing(tmp_path):
    first = run_fwlab(
        "fit", "--model", "lstm", "--data", "retrieval", *SMALL, "trainer.max_steps=2",
        "logger=csv", cwd=tmp_path,
    )  # fmt: skip
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    written = {path: path.stat().st_mtime_ns for path in run_dir.rglob("*")}
    last = str(run_dir / "checkpoints" / "last.ckpt")
    for command in (["fit", "--resume", str(run_dir)], ["test", "--ckpt", last]):
        changed = run_fwlab(*command, "model.hidden_size=33", cwd=tmp_path)
        assert changed.returncode == 2, changed.stderr[-3000:]
        assert "Traceback" not in changed.stderr
        assert "its weights do not fit the model this config builds" in changed.stderr
        assert "(400, 100) there, (132, 100) here" in changed.stderr  # the LSTM's 4H rows
        assert "after model.hidden_size=33 (was 100)" in changed.stderr
        assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == written
        assert only_run_dir(tmp_path) == run_dir  # and no run directory of its own


def test_last_ckpt_holds_the_final_step_when_validation_stops_improving(tmp_path):
    """Lightning's save_last writes last.ckpt only when it writes a best checkpoint: a run whose
    validation metric stopped improving kept its best step as last.ckpt, and --resume went back
    to it, dropping the steps after. Here the learning rate is too small for val/acc to move."""
    fit = run_fwlab(
        "fit", "--model", "lstm", "--data", "retrieval", *SMALL, "optim.lr=1e-12",
        "trainer.max_steps=30", "trainer.val_check_interval=10", "logger=csv", cwd=tmp_path,
    )  # fmt: skip
    assert fit.returncode == 0, fit.stderr[-3000:]
    checkpoints = only_run_dir(tmp_path) / "checkpoints"
    (best,) = checkpoints.glob("best-*.ckpt")
    assert torch.load(best, weights_only=False)["global_step"] == 10  # the first validation's
    assert torch.load(checkpoints / "last.ckpt", weights_only=False)["global_step"] == 30


def test_wandb_writes_offline_run_files_without_network(tmp_path):
    result = run_fwlab(
        "fit",
        "--model",
        "lstm",
        "--data",
        "retrieval",
        *SMALL,
        "trainer.max_steps=5",
        "model.hidden_size=8",
        cwd=tmp_path,
        env=fwlab_env(tmp_path),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    assert offline_runs[0].name.endswith(run_id)
    assert list(offline_runs[0].glob(f"run-{run_id}.wandb"))
    # The W&B run received the resolved config.
    data = (offline_runs[0] / f"run-{run_id}.wandb").read_bytes()
    assert b"hidden_size" in data and b"train_size" in data
    # and its summary the best validation value, which W&B sweeps optimise
    assert b"best/val/acc" in data


def test_validating_less_often_than_an_epoch_allows_is_a_clear_error(tmp_path):
    """Lightning checks trainer.val_check_interval against the epoch's batches only once the
    data is loaded, and raised a ValueError with a traceback."""
    result = run_fwlab(
        "fit", "--model", "lstm", "--data", "retrieval", "data.train_size=640",
        "trainer.val_check_interval=100", "logger=csv", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert (
        "fwlab: error: trainer.val_check_interval=100 is more than the 5 training batches of an "
        "epoch" in result.stderr
    )
    assert not list(only_run_dir(tmp_path).glob("checkpoints/*.ckpt"))


def test_a_bad_resume_path_is_a_clear_error(tmp_path):
    result = run_fwlab("fit", "--resume", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert result.returncode == 2 and "no config.yaml" in result.stderr


def test_an_incompatible_checkpoint_path_is_a_clear_error(tmp_path):
    bogus = tmp_path / "bogus.ckpt"
    bogus.write_text("not a checkpoint")
    result = run_fwlab("test", "--ckpt", str(bogus), cwd=tmp_path)
    assert result.returncode == 2 and "not a readable checkpoint" in result.stderr
    assert bogus.read_text() == "not a checkpoint"


@pytest.mark.slow
def test_the_main_job_reaches_a_low_test_error(tmp_path):
    """The README's main job (about 5 minutes on 2 CPU cores): run with `pytest -m slow`."""
    result = run_fwlab(
        "fit",
        "--model",
        "fast_weights",
        "--data",
        "retrieval",
        "logger=csv",
        cwd=tmp_path,
        timeout=1800,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    accuracy = read_results(only_run_dir(tmp_path))["metrics"]["test/acc"]
    assert 100 * (1 - accuracy) < 1.81  # below the paper's R=20 error; R=100 is the default


def test_the_same_seed_gives_the_same_result(tmp_path):
    metrics = []
    for attempt in ("a", "b"):
        workdir = tmp_path / attempt
        workdir.mkdir()
        result = run_fwlab(
            "fit",
            "--model",
            "fast_weights",
            "--data",
            "retrieval",
            *SMALL,
            "trainer.max_steps=30",
            "logger=none",
            "seed=11",
            cwd=workdir,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        metrics.append(read_results(only_run_dir(workdir))["metrics"])
    assert metrics[0] == metrics[1]


def test_a_run_that_diverges_stops_at_that_validation_untested_and_says_so(tmp_path):
    """It trained on to its end with NaN weights and reported a test of them, exit 0."""
    fit = run_fwlab(
        "fit", "--model", "irnn", "--data", "retrieval", *SMALL, "optim.lr=1000",
        "trainer.gradient_clip_val=null", "trainer.max_steps=60", "trainer.val_check_interval=20",
        "logger=csv", cwd=tmp_path,
    )  # fmt: skip
    assert fit.returncode == 2, fit.stderr[-3000:]
    assert "fwlab: error: val/loss was nan at step 20: the run diverged" in fit.stderr
    run_dir = only_run_dir(tmp_path)
    assert not (run_dir / "results.json").exists()  # untested
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()  # and nothing written is lost
    steps = [int(r["step"]) for r in metrics_rows(run_dir) if r.get("train/loss_step")]
    assert max(steps, default=0) < 40  # stopped at the diverged validation, not at step 60


def test_the_divergence_check_names_the_best_checkpoint_from_before_it():
    from types import SimpleNamespace

    from fwlab.training import StopWhenDiverged

    best = SimpleNamespace(best_model_path="")
    check = StopWhenDiverged(["val/acc", "val/loss"], best)
    trainer = SimpleNamespace(sanity_checking=False, should_stop=False, global_step=10)
    trainer.callback_metrics = {"val/acc": torch.tensor(0.5), "val/loss": torch.tensor(1.2)}
    check.on_validation_end(trainer, None)
    assert check.diverged is None and not trainer.should_stop
    best.best_model_path = "best-step10.ckpt"  # saved after the callbacks that are not checkpoints
    trainer.global_step, trainer.callback_metrics["val/loss"] = 20, torch.tensor(float("inf"))
    check.on_validation_end(trainer, None)
    assert check.diverged == ("val/loss", float("inf"), 20) and trainer.should_stop
    assert check.best_before == "best-step10.ckpt"


# Datamodules whose user presses Ctrl-C (a real SIGINT) as they load, or as the second epoch
# of training reads its first example
INTERRUPTED_PLUGIN = """
import os, signal

from torch.utils.data import Dataset

from fwlab import register
from fwlab_plugins.data.retrieval import AssociativeRetrievalDataModule


@register("data", "interrupted_loading")
class InterruptedLoading(AssociativeRetrievalDataModule):
    \"\"\"Retrieval interrupted as it loads.\"\"\"

    def setup(self, stage=None):
        os.kill(os.getpid(), signal.SIGINT)
        super().setup(stage)


class InterruptedAt(Dataset):
    def __init__(self, dataset, at):
        self.dataset, self.at, self.read = dataset, at, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        self.read += 1
        if self.read == self.at:
            os.kill(os.getpid(), signal.SIGINT)
        return self.dataset[index]


@register("data", "interrupted_training")
class InterruptedTraining(AssociativeRetrievalDataModule):
    \"\"\"Retrieval interrupted in the second epoch, after a validation wrote last.ckpt.\"\"\"

    def setup(self, stage=None):
        super().setup(stage)
        train = self.datasets["train"]
        if not isinstance(train, InterruptedAt):
            self.datasets["train"] = InterruptedAt(train, at=len(train) + 1)
"""


def test_ctrl_c_is_one_line_and_says_how_to_continue_a_fit(tmp_path):
    plugin = tmp_path / "interrupted.py"
    plugin.write_text(INTERRUPTED_PLUGIN)
    loading = run_fwlab("fit", "--plugin", str(plugin), "--model", "lstm", "--data",
                        "interrupted_loading", cwd=tmp_path)  # fmt: skip
    assert loading.returncode == 130 and "Traceback" not in loading.stderr
    assert loading.stderr.strip().splitlines()[-1] == "fwlab: interrupted"
    assert not (tmp_path / "runs").exists()  # it stopped before the run directory

    # in training: Lightning's graceful stop, then where it stopped and how to continue
    training = run_fwlab("fit", "--plugin", str(plugin), "--model", "lstm", "--data",
                         "interrupted_training", "data.train_size=256", "data.batch_size=64",
                         *SMALL[1:], "trainer.max_epochs=3", "logger=csv",
                         cwd=tmp_path)  # fmt: skip
    assert training.returncode == 130 and "Traceback" not in training.stderr
    run_dir = only_run_dir(tmp_path)
    assert training.stderr.strip().splitlines()[-1] == (
        f"fwlab: interrupted at step 4; its files are in {run_dir.relative_to(tmp_path)}; "
        f"continue from last.ckpt: fwlab fit --resume {run_dir.relative_to(tmp_path)}"
    )
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4
