"""`fwlab sweep`: a server-free Optuna sweep run for real, the W&B sweep as far as it goes
without a server, SLURM array workers, and the preset sweep files."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import optuna
import pytest

from fwlab.config import config_dir
from fwlab.errors import ConfigError
from fwlab.sweep import (
    INTERRUPTED,
    available_cpus,
    check_trials,
    load_sweep,
    open_study,
    trial_command,
    trial_environment,
    wandb_sweep_config,
)

from .conftest import fwlab_env, read_results, run_fwlab, write_executable

TINY = textwrap.dedent(
    """
    # fwlab sweep tiny.yaml --workers 2
    name: tiny
    model: fast_weights
    data: retrieval
    method: random
    trials: 3
    seed: 1
    metric: {name: val/acc, goal: maximize}
    overrides: [logger=csv, data.train_size=64, data.val_size=32, data.test_size=32,
                trainer.max_epochs=2]
    parameters:
      model.hidden_size: {values: [8, 16]}
      optim.lr: {min: 1.0e-3, max: 1.0e-2, distribution: log_uniform_values}
    """
)


@pytest.fixture
def tiny_sweep(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


def test_an_optuna_sweep_of_three_trials_on_two_workers_marks_the_best(tmp_path, tiny_sweep):
    result = run_fwlab("sweep", str(tiny_sweep), "--workers", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep_dir = tmp_path / "sweeps" / "tiny"
    with open(sweep_dir / "results.csv") as file:
        rows = list(csv.DictReader(file))
    assert [row["state"] for row in rows] == ["complete"] * 3
    values = [float(row["val/acc"]) for row in rows]
    best = [row for row in rows if row["best"] == "True"]
    assert len(best) == 1 and float(best[0]["val/acc"]) == max(values)
    # two trials at a time share the CPUs instead of each starting a thread per CPU
    threads = int(os.environ.get("OMP_NUM_THREADS") or max(1, available_cpus() // 2))
    for row in rows:  # each trial is a real run; its metric is its best validation accuracy
        results = read_results(tmp_path / row["run_dir"])
        assert results["machine"]["cpu_threads"] == threads
        assert results["best"]["monitor"] == "val/acc"
        assert results["best"]["value"] == pytest.approx(float(row["val/acc"]))
        assert row["model.hidden_size"] in ("8", "16") and 1e-3 <= float(row["optim.lr"]) <= 1e-2
    table = result.stdout[result.stdout.index("trial  model.hidden_size") :]
    assert table.count("★") == 2  # the best row and the legend
    # the sweep is done: running it again adds no trial
    again = run_fwlab("sweep", str(tiny_sweep), cwd=tmp_path)
    assert again.returncode == 0 and len(list((sweep_dir / "trials").iterdir())) == 3


def test_trials_at_a_time_share_the_cpus_unless_the_user_chose_their_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("fwlab.sweep.available_cpus", lambda: 16)
    assert trial_environment(1) == {}  # one trial: all of them, as a run of its own
    assert trial_environment(2) == {"OMP_NUM_THREADS": "8"}
    assert trial_environment(3) == {"OMP_NUM_THREADS": "5"}
    assert trial_environment(64) == {"OMP_NUM_THREADS": "1"}
    monkeypatch.setenv("OMP_NUM_THREADS", "4")  # the user's choice holds
    assert trial_environment(2) == {}


def test_ctrl_c_stops_a_sweep_and_a_rerun_runs_the_interrupted_trial_again(tmp_path):
    """Ctrl-C printed a traceback and left the running trial failed: a rerun never ran it."""
    path = tmp_path / "grid.yaml"
    grid, lr = TINY.replace("method: random", "method: grid"), TINY.splitlines()[-1]
    path.write_text(grid.replace("trials: 3", "").replace(lr, "").replace("epochs=2", "epochs=1"))
    command = [sys.executable, "-m", "fwlab", "sweep", str(path)]
    sweep = subprocess.Popen(command, cwd=tmp_path, env=fwlab_env(tmp_path), text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             start_new_session=True)  # fmt: skip
    first_log = tmp_path / "sweeps" / "tiny" / "logs" / "trial-0000.log"
    deadline = time.monotonic() + 120
    while not first_log.exists() and sweep.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sweep.poll() is None, sweep.communicate()
    os.killpg(sweep.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole process group
    stdout, stderr = sweep.communicate(timeout=120)
    assert sweep.returncode == 128 + signal.SIGINT, stderr[-3000:]
    assert "Traceback" not in stderr and "stopped by SIGINT: rerun this command" in stdout
    with open(tmp_path / "sweeps" / "tiny" / "results.csv") as file:
        assert [row["state"] for row in csv.DictReader(file)] == ["interrupted"]

    rerun = run_fwlab("sweep", str(path), "--workers", "2", cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    with open(tmp_path / "sweeps" / "tiny" / "results.csv") as file:
        rows = list(csv.DictReader(file))
    assert [row["state"] for row in rows] == ["interrupted", "complete", "complete"]
    assert rows[1]["model.hidden_size"] == rows[0]["model.hidden_size"]  # the stopped one first
    assert {rows[1]["model.hidden_size"], rows[2]["model.hidden_size"]} == {"8", "16"}  # the grid


def test_interrupted_trials_are_queued_again_once_and_do_not_count_as_done():
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import TrialState, create_trial

    from fwlab.sweep import done, requeue_interrupted

    study = optuna.create_study()
    space = {"model.hidden_size": CategoricalDistribution([8, 16, 32])}
    for size, state, stopped in [
        (8, TrialState.COMPLETE, False),
        (32, TrialState.FAIL, False),  # failed as it ran: done, and not run again
        (16, TrialState.FAIL, True),
        (8, TrialState.FAIL, True),  # stopped, but trial 0 has its parameters
    ]:
        study.add_trial(create_trial(
            params={"model.hidden_size": size}, distributions=space, state=state,
            value=0.5 if state == TrialState.COMPLETE else None,
            user_attrs={INTERRUPTED: True} if stopped else {},
        ))  # fmt: skip
    assert done(study) == 2
    assert requeue_interrupted(study) == 1
    assert requeue_interrupted(study) == 0  # queued already: not twice
    (queued,) = study.get_trials(states=(TrialState.WAITING,))
    assert queued.system_attrs["fixed_params"] == {"model.hidden_size": 16}
    assert queued.user_attrs["rerun_of"] == 2


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("method: random", "methd: random", "unknown sweep keys ['methd']"),
        ("trials: 3\n", "", "a random sweep needs trials"),
        ("log_uniform_values", "log", "distribution 'log' is not one of"),
        ("goal: maximize", "goal: upward", "metric.goal 'upward'"),
        ("name: val/acc", "name: acc", "must start with val/ or test/"),
    ],
)
def test_a_malformed_sweep_file_is_a_clear_error_naming_it(tmp_path, old, new, message):
    path = tmp_path / "broken.yaml"
    path.write_text(TINY.replace(old, new))
    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        load_sweep(path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("model.hidden_size: {values", "model.hiden_size: {values",
         "sweep tiny, trial model.hiden_size=8 optim.lr=0.001: unknown config key"),
        ("values: [8, 16]", "values: [8, 0]",
         "trial model.hidden_size=0 optim.lr=0.001: bad value for 'model.hidden_size'"),
        ("optim.lr: {min: 1.0e-3", "optim.lr: {min: -1.0",
         "trial model.hidden_size=8 optim.lr=-1.0: bad value for 'optim.lr'"),
        ("name: val/acc", "name: val/accuracy",
         "metric val/accuracy is not the checkpoint monitor of model fast_weights (val/acc)"),
    ],
)  # fmt: skip
def test_a_trial_config_that_cannot_work_is_found_before_any_trial(tmp_path, old, new, message):
    path = tmp_path / "broken.yaml"
    path.write_text(TINY.replace(old, new))
    assert path.read_text() != TINY
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_trials(load_sweep(path), plugins=[], extra=[])


def test_composing_only_finds_a_bad_key_but_leaves_the_metric_to_the_workers(tmp_path):
    """``fwlab slurm sweep`` on a login node, which may lack what building a model checks for
    (a GPU for model.kernel=triton): it composes the trials and builds no model."""
    path = tmp_path / "sweep.yaml"
    path.write_text(TINY.replace("name: val/acc", "name: val/accuracy"))
    check_trials(load_sweep(path), plugins=[], extra=[], build_models=False)
    path.write_text(TINY.replace("model.hidden_size: {values", "model.hiden_size: {values"))
    with pytest.raises(ConfigError, match="unknown config key 'model.hiden_size'"):
        check_trials(load_sweep(path), plugins=[], extra=[], build_models=False)


def test_checked_points_cover_a_grid_and_each_value_or_bound_of_a_random_sweep(tiny_sweep):
    from fwlab.sweep import checked_points

    spec = load_sweep(tiny_sweep)  # random: hidden size in {8, 16}, lr in [1e-3, 1e-2]
    assert checked_points(spec) == [
        {"model.hidden_size": 8, "optim.lr": 1e-3},
        {"model.hidden_size": 16, "optim.lr": 1e-3},
        {"model.hidden_size": 8, "optim.lr": 1e-3},
        {"model.hidden_size": 8, "optim.lr": 1e-2},
    ]
    grid = load_sweep(config_dir() / "sweep" / "retrieval_cells.yaml")
    assert len(checked_points(grid)) == grid.grid_size() == 9


def test_failed_trials_are_one_line_each_and_a_sweep_with_none_complete_exits_1(
    tmp_path, tiny_sweep
):
    """A trial that composes but fails as it runs (the command's environment hides any GPU)."""
    path = tmp_path / "gpu.yaml"
    path.write_text(
        TINY.replace("trials: 3", "trials: 1") + "  trainer.accelerator: {value: gpu}\n"
    )
    result = run_fwlab("sweep", str(path), cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]
    failed = [line for line in result.stdout.splitlines() if " failed (" in line]
    assert len(failed) == 1 and "Traceback" not in result.stdout + result.stderr
    assert failed[0].startswith("trial 0 failed (exit 2: fwlab: error: trainer.accelerator=gpu")
    assert failed[0].endswith("log: sweeps/tiny/logs/trial-0000.log")
    assert "no trial completed" in result.stdout


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("method: random", "method: annealing", "method 'annealing'"),
        # a trial config that cannot work: every trial failed the same way, one after another,
        # and the sweep exited 0
        ("model.hidden_size: {values", "model.hiden_size: {values",
         "unknown config key 'model.hiden_size'"),
    ],
)  # fmt: skip
def test_the_command_refuses_a_malformed_sweep_before_running_anything(tmp_path, old, new, message):
    path = tmp_path / "broken.yaml"
    path.write_text(TINY.replace(old, new))
    result = run_fwlab("sweep", str(path), cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr
    assert not (tmp_path / "sweeps").exists()


def test_the_wandb_sweep_config_and_agent_command_without_a_server(tmp_path, tiny_sweep):
    spec = load_sweep(tiny_sweep)
    config = wandb_sweep_config(spec, [], [])
    assert config["method"] == "random" and config["run_cap"] == 3
    assert config["metric"] == {"name": "best/val/acc", "goal": "maximize"}
    assert config["parameters"] == spec.parameters
    assert config["command"][0] == "${env}" and config["command"][-1] == "${args_no_hyphens}"
    assert config["command"][2:5] == ["-m", "fwlab", "fit"] and "logger=wandb" in config["command"]

    dry = run_fwlab("sweep", str(tiny_sweep), "--backend", "wandb", "--dry-run", "--count", "4",
                    cwd=tmp_path)  # fmt: skip
    assert dry.returncode == 0
    printed = json.loads(dry.stdout[dry.stdout.index("{") : dry.stdout.rindex("}") + 1])
    assert printed == json.loads(json.dumps(config))
    assert "agent command:   wandb agent --count 4 'fwlab/<SWEEP_ID>'" in dry.stdout
    # without credentials or network, creating the sweep fails at once and says why
    real = run_fwlab("sweep", str(tiny_sweep), "--backend", "wandb", cwd=tmp_path, timeout=60)
    assert real.returncode == 2 and "need the W&B server" in real.stderr


def test_a_parameter_that_picks_the_model_replaces_model(tmp_path):
    path = tmp_path / "cells.yaml"
    path.write_text(TINY.replace("parameters:", "parameters:\n  model: {values: [lstm, irnn]}"))
    command = trial_command(load_sweep(path), {"model": "irnn", "model.hidden_size": 8}, [], [])
    assert "--model" not in command and "model=irnn" in command
    assert command[command.index("--data") + 1] == "retrieval"


def test_trials_of_paper_presets_are_tabled_beside_the_published_numbers(tmp_path):
    path = tmp_path / "table.yaml"
    path.write_text(textwrap.dedent(
        """
        # fwlab sweep table.yaml
        name: table
        method: grid
        metric: {name: test/acc, goal: maximize}
        overrides: [logger=csv, data.train_size=64, data.val_size=32, data.test_size=32,
                    trainer.max_epochs=1]
        parameters:
          experiment: {values: [retrieval_fast_weights]}
          model.hidden_size: {values: [20]}
        """
    ))  # fmt: skip
    result = run_fwlab("sweep", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "sweeps" / "table" / "results.csv") as file:
        (row,) = list(csv.DictReader(file))
    # Ba et al.'s fast weights at R = 20: 1.81 % test error (the preset's published entry)
    assert float(row["published"]) == pytest.approx(0.9819)
    assert float(row["test/acc"]) == read_results(tmp_path / row["run_dir"])["metrics"]["test/acc"]
    table = result.stdout[result.stdout.index("   trial") :].splitlines()
    assert table[0].split() == ["trial", "experiment", "model.hidden_size", "test/acc",
                                "published", "state"]  # fmt: skip
    measured = f"{float(row['test/acc']):.4f}"
    assert table[1].split() == ["★", "0", "retrieval_fast_weights", "20", measured, "0.9819",
                                "complete"]  # fmt: skip


def test_published_value_reads_the_metric_a_run_set_beside_a_paper():
    from fwlab.sweep import published_value

    accuracy = {"test/acc": {"published": 0.98, "measured": 0.9}}
    results = {"published": [{"source": "a paper", "where": {}, "metrics": accuracy}]}
    assert published_value(results, "test/acc") == 0.98
    assert published_value(results, "test/loss") is None
    assert published_value({"published": []}, "test/acc") is None


@pytest.mark.parametrize("path", sorted((config_dir() / "sweep").glob("*.yaml")), ids=str)
def test_every_preset_sweep_composes_for_every_grid_point(path):
    check_trials(load_sweep(path), plugins=[], extra=[])  # every point, and the metric
    assert path.read_text().startswith("# fwlab sweep")


def test_slurm_array_workers_join_one_study(tmp_path, tiny_sweep):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_executable(bin_dir / "sbatch", f'#!/bin/sh\necho "$@" > {tmp_path}/sbatch.calls\n'
                     'echo "Submitted batch job 77"\n')  # fmt: skip
    env = fwlab_env(tmp_path)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    # an earlier array's trial that its time limit stopped
    sweep_dir = tmp_path / "sweeps" / "tiny"
    study = open_study(load_sweep(tiny_sweep), sweep_dir)
    trial = study.ask()
    trial.suggest_categorical("model.hidden_size", [8, 16])
    trial.set_user_attr(INTERRUPTED, True)
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    result = run_fwlab("slurm", "sweep", str(tiny_sweep), "--array", "4", "--submit",
                       cwd=tmp_path, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    script = (sweep_dir / "slurm-optuna.sbatch").read_text()
    assert "#SBATCH --array=0-3" in script and "#SBATCH --ntasks-per-node=1" in script
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    assert f"--sweep-dir {sweep_dir.resolve()}" in srun and "--workers 1" in srun
    # queued again once, here, not by each of the 4 workers as it starts
    assert "queued again:    1 interrupted trial(s)" in result.stdout and "--no-requeue" in srun
    waiting = open_study(load_sweep(tiny_sweep), sweep_dir).get_trials(
        states=(optuna.trial.TrialState.WAITING,)
    )
    assert [t.system_attrs["fixed_params"] for t in waiting] == [trial.params]
    assert "--set=trainer.devices=1" in srun
    assert (sweep_dir / "optuna.journal").is_file()  # the study exists before the array starts
    assert "job 77" in result.stdout


def test_slurm_sweep_refuses_multi_device_trials(tmp_path, tiny_sweep):
    result = run_fwlab("slurm", "sweep", str(tiny_sweep), "--array", "2",
                       "--devices-per-node", "4", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2 and "one device" in result.stderr


def test_load_sweep_names_the_file(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("name: x\nmetric: {name: val/acc}\n")
    with pytest.raises(ConfigError, match="empty.yaml: parameters"):
        load_sweep(path)
