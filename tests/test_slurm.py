"""`fwlab slurm`: the sbatch script, its submission, and a requeued job continuing its run.

No SLURM here: `sbatch` and `scontrol` are small fakes on PATH; the signal, the checkpoint,
the requeue call and the resume are Lightning's and fwlab's real code paths.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import lightning as L
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from fwlab.errors import ConfigError
from fwlab.requeue import RequeueAtBatchEnd
from fwlab.slurm import SlurmOptions, trainer_overrides

from .conftest import REPO, fwlab_env, read_results, run_fwlab, write_executable

SLURM_JOB = {  # the variables of a one-task SLURM job, as Lightning reads them
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NAME": "fwlab-fit",
    "SLURM_NTASKS": "1",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
    "SLURM_NNODES": "1",
    "SLURM_NODELIST": "localhost",
}


def fake_scontrol(tmp_path, kills_the_job: bool = False) -> str:
    """A folder holding an ``scontrol`` that records its arguments in ``scontrol.calls`` (and,
    like SLURM's requeue, ends the job that called it when ``kills_the_job``): for PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = f'#!/bin/sh\necho "$@" >> {tmp_path}/scontrol.calls\n'
    write_executable(bin_dir / "scontrol", script + ("kill -9 $PPID\n" if kills_the_job else ""))
    return str(bin_dir)


def sbatch_options(script: str) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?$", script, flags=re.M))


def test_the_script_matches_nodes_tasks_and_devices(tmp_path):
    result = run_fwlab("slurm", "fit", "--model", "lstm", "--data", "retrieval", "--nodes", "2",
                       "--devices-per-node", "4", "--partition", "gpu", "--time", "02:00:00",
                       "trainer.max_epochs=3", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    script = (run_dir / "slurm.sbatch").read_text()
    options = sbatch_options(script)
    assert options["nodes"] == "2"
    assert options["ntasks-per-node"] == options["gpus-per-node"] == "4"
    assert options["signal"].startswith("SIGUSR1@") and "requeue" in options
    assert options["partition"] == "gpu" and options["time"] == "02:00:00"
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    for override in ("trainer.num_nodes=2", "trainer.devices=4", "trainer.accelerator=gpu",
                     "trainer.strategy=ddp", "trainer.max_epochs=3"):  # fmt: skip
        assert override in srun.split()
    assert f"export FWLAB_RUN_DIR={run_dir.resolve()}" in script
    config = (run_dir / "config.yaml").read_text()
    assert "num_nodes: 2" in config and "devices: 4" in config
    assert "sbatch" in result.stdout and "submit with" in result.stdout


def test_submit_runs_sbatch_on_the_script(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "sbatch.calls"
    write_executable(bin_dir / "sbatch", f'#!/bin/sh\necho "$@" >> {calls}\n'
                     'echo "Submitted batch job 987654"\n')  # fmt: skip
    env = fwlab_env(tmp_path)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    result = run_fwlab("slurm", "fit", "--model", "lstm", "--data", "retrieval", "--submit",
                       cwd=tmp_path, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert calls.read_text().split() == [str((run_dir / "slurm.sbatch").resolve())]
    assert "job 987654" in result.stdout


def test_submit_without_sbatch_says_so_and_keeps_the_script(tmp_path):
    env = fwlab_env(tmp_path)
    env["PATH"] = os.path.dirname(sys.executable)  # python, but no sbatch
    result = run_fwlab("slurm", "fit", "--model", "lstm", "--data", "retrieval", "--submit",
                       cwd=tmp_path, env=env)  # fmt: skip
    assert result.returncode == 2
    assert "sbatch is not on PATH" in result.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert (run_dir / "slurm.sbatch").is_file()


def test_trainer_keys_of_the_allocation_cannot_be_overridden(tmp_path):
    result = run_fwlab("slurm", "fit", "--model", "lstm", "--data", "retrieval",
                       "trainer.devices=8", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2
    assert "trainer.devices is set by fwlab slurm from --devices-per-node" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_a_requeued_job_resumes_from_its_checkpoint_under_the_same_wandb_run(tmp_path):
    """SIGUSR1 (SLURM's warning before the time limit) -> Lightning saves hpc_ckpt_1.ckpt and
    calls `scontrol requeue`; the fake scontrol records that and kills the job, as SLURM would.
    The same command in the same job environment then continues from that checkpoint."""
    bin_dir = fake_scontrol(tmp_path, kills_the_job=True)
    run_dir = tmp_path / "job"
    env = fwlab_env(tmp_path)
    env.update(
        SLURM_JOB,
        PATH=f"{bin_dir}{os.pathsep}{env['PATH']}",
        WANDB_MODE="offline",
        FWLAB_RUN_DIR=str(run_dir),  # what the sbatch script exports
    )
    command = [sys.executable, "-m", "fwlab", "fit", "--model", "fast_weights", "--data",
               "retrieval", "data.train_size=256", "data.val_size=32", "data.test_size=32",
               "data.batch_size=16", "trainer.max_epochs=12", "trainer.accelerator=cpu",
               "logger=wandb"]  # fmt: skip
    first = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while not (run_dir / "checkpoints" / "last.ckpt").exists():  # after the first epoch
        assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()
        time.sleep(0.2)
    first.send_signal(signal.SIGUSR1)
    first.wait(timeout=60)
    assert first.returncode == -signal.SIGKILL  # killed by the requeue, mid-run

    assert (tmp_path / "scontrol.calls").read_text().split() == ["requeue", "4242"]
    saved = torch.load(run_dir / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=False)
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    assert saved["fwlab_wandb_run_id"] == run_id
    assert 0 < saved["global_step"] < 12 * 16

    second = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"Restored all states from the checkpoint at {run_dir / 'hpc_ckpt_1.ckpt'}" in (
        second.stdout + second.stderr
    )
    assert read_results(run_dir)["global_step"] == 12 * 16  # finished the same schedule
    assert (run_dir / "wandb_run_id").read_text().strip() == run_id
    offline_runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 2 and all(p.name.endswith(f"-{run_id}") for p in offline_runs)
    assert len(list(run_dir.glob("config*.yaml"))) == 1  # the same config both times


class SignalledAfterAnOptimizerStep(BoringModel):
    """Sends itself SLURM's requeue signal right after the optimizer step of step ``at`` (in
    the process of rank ``rank`` only, if given), before Lightning counts the step and its
    batch: where a checkpoint taken at once would hold the step's weights but have the batch
    run again on resuming."""

    def __init__(self, at: int, rank: int | None = None) -> None:
        super().__init__()
        self.at, self.rank = at, rank

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.global_step == self.at and self.rank in (None, self.global_rank):
            os.kill(os.getpid(), signal.SIGUSR1)  # its Python handler runs before this returns


def test_the_requeue_checkpoint_is_taken_at_the_end_of_the_signalled_batch(tmp_path, monkeypatch):
    """RequeueAtBatchEnd (in every fwlab fit): the signal mid-step, the checkpoint and the
    requeue after the batch; Lightning's progress counters in the checkpoint say so (the batch
    processed, not yet completed: Lightning counts it completed on resuming). The handler that
    was there before fit is back after it."""
    monkeypatch.setenv("PATH", f"{fake_scontrol(tmp_path)}{os.pathsep}{os.environ['PATH']}")
    for key, value in SLURM_JOB.items():
        monkeypatch.setenv(key, value)
    before = signal.getsignal(signal.SIGUSR1)
    trainer = L.Trainer(max_steps=6, limit_val_batches=0, accelerator="cpu", devices=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[RequeueAtBatchEnd()])  # fmt: skip
    trainer.fit(SignalledAfterAnOptimizerStep(at=2))

    assert (tmp_path / "scontrol.calls").read_text().split() == ["requeue", "4242"]
    saved = torch.load(tmp_path / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=False)
    loop = saved["loops"]["fit_loop"]
    batches = loop["epoch_loop.batch_progress"]["total"]
    steps = loop["epoch_loop.automatic_optimization.optim_progress"]["optimizer"]["step"]["total"]
    assert saved["global_step"] == 3 and steps["ready"] == steps["completed"] == 3
    assert batches["started"] == batches["processed"] == 3 and batches["completed"] == 2
    assert trainer.global_step == 6  # the fake scontrol does not end the job
    assert signal.getsignal(signal.SIGUSR1) == before


TWO_TASK_JOB = f"""
import sys

import lightning as L

sys.path.insert(0, {str(REPO)!r})
from fwlab.requeue import RequeueAtBatchEnd
from fwlab.training import release_process_group
from tests.test_slurm import SignalledAfterAnOptimizerStep

trainer = L.Trainer(max_steps=6, limit_val_batches=0, accelerator="cpu", devices=2,
                    strategy="ddp", logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False,
                    default_root_dir=sys.argv[1], callbacks=[RequeueAtBatchEnd()])
trainer.fit(SignalledAfterAnOptimizerStep(at=2, rank=1))
print("global_step", trainer.global_step)
release_process_group()  # as fwlab's run does when done
"""


def test_the_tasks_of_a_job_agree_on_the_batch_they_save_at(tmp_path):
    """Two DDP tasks as srun starts them; only rank 1 gets the signal (SLURM signals each task
    at its own moment). Both save at the end of the same batch (the checkpoint's save has a
    barrier: a rank saving alone would hang against the other's gradient all-reduce), rank 0
    alone calls scontrol, and both finish."""
    bin_dir = fake_scontrol(tmp_path)
    script = tmp_path / "job.py"
    script.write_text(TWO_TASK_JOB)
    with socket.socket() as probe:  # a free port for the tasks' rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    tasks = []
    for rank in (0, 1):
        env = fwlab_env(tmp_path)
        env.update(SLURM_JOB, PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", MASTER_PORT=str(port),
                   SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="2", SLURM_PROCID=str(rank),
                   SLURM_LOCALID=str(rank))  # fmt: skip
        tasks.append(subprocess.Popen([sys.executable, str(script), str(tmp_path / "run")],
                                      cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))  # fmt: skip
    try:
        outputs = [task.communicate(timeout=180) for task in tasks]
    finally:  # a task left hanging (ranks saving at different batches) is not left running
        for task in tasks:
            task.kill()
    for task, (stdout, stderr) in zip(tasks, outputs, strict=True):
        assert task.returncode == 0, stderr[-3000:]
        assert "global_step 6" in stdout
    assert (tmp_path / "scontrol.calls").read_text().split() == ["requeue", "4242"]
    saved = torch.load(tmp_path / "run" / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=False)
    batches = saved["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]
    assert saved["global_step"] == 3
    assert batches["processed"] == 3 and batches["completed"] == 2


def test_a_time_limit_sbatch_would_refuse_is_refused_before_the_script_is_written():
    for accepted in ("99", "30:00", "24:00:00", "2-12", "1-00:30", "1-00:30:00", "UNLIMITED"):
        trainer_overrides(SlurmOptions(time=accepted))
    for refused in ("abc", "1-", "24h", "1:2:3:4"):
        with pytest.raises(ConfigError, match=f"--time {refused}: not a SLURM time limit"):
            trainer_overrides(SlurmOptions(time=refused))
