"""``fwlab slurm``: sbatch scripts for fwlab commands, on N nodes × D devices, with requeue.

The script relies on Lightning's SLURM support: one task per device (``srun``, tasks per node =
devices per node, Lightning reads ranks and the master address from SLURM's variables), and
automatic requeue: ``--signal=SIGUSR1@<s>`` makes SLURM signal every task ``s`` seconds before
the time limit; Lightning then saves ``hpc_ckpt_<n>.ckpt`` in the run directory and calls
``scontrol requeue``, at the end of the batch the signal arrives in (:mod:`fwlab.requeue`).
The job's tasks share one run directory, fixed in the script
(``FWLAB_RUN_DIR``), so the requeued job finds that checkpoint, continues from it, and
continues the same W&B run (its id is stored in the run directory and in the checkpoint).
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from fwlab.errors import ConfigError, FwlabError

if TYPE_CHECKING:
    from fwlab.training import Invocation

SCRIPT_NAME = "slurm.sbatch"
# trainer keys the script sets from its own options, so the two cannot disagree
SET_BY_SLURM = {
    "trainer.num_nodes": "--nodes",
    "trainer.devices": "--devices-per-node",
    "trainer.accelerator": "--accelerator",
    "trainer.strategy": "(ddp whenever there is more than one device)",
}


@dataclass
class SlurmOptions:
    nodes: int = 1
    devices_per_node: int = 1
    accelerator: str = "gpu"  # gpu | cpu
    cpus_per_task: int = 4
    time: str = "24:00:00"
    partition: str | None = None
    account: str | None = None
    signal_seconds: int | None = 120  # SIGUSR1 this long before the limit; None: no requeue
    array: int | None = None  # sweeps: this many array tasks, each an independent worker
    extra: list[str] = field(default_factory=list)  # further #SBATCH lines, e.g. --mem=64G


# sbatch's --time: minutes, minutes:seconds, hours:minutes:seconds, days-hours,
# days-hours:minutes, days-hours:minutes:seconds, or no limit
_SLURM_TIME = re.compile(r"(\d+(:\d+){0,2}|\d+-\d+(:\d+){0,2}|unlimited|infinite)", re.IGNORECASE)


def trainer_overrides(options: SlurmOptions) -> list[str]:
    """The ``trainer.*`` overrides that match the allocation (and the allocation's checks)."""
    if options.nodes < 1 or options.devices_per_node < 1:
        raise ConfigError("--nodes and --devices-per-node must be at least 1")
    if not _SLURM_TIME.fullmatch(options.time):
        raise ConfigError(
            f"--time {options.time}: not a SLURM time limit (minutes, HH:MM:SS, D-HH, "
            "D-HH:MM:SS, ...), which sbatch would refuse"
        )
    if options.accelerator not in ("gpu", "cpu"):
        raise ConfigError(f"--accelerator {options.accelerator}: expected gpu or cpu")
    overrides = [
        f"trainer.num_nodes={options.nodes}",
        f"trainer.devices={options.devices_per_node}",
        f"trainer.accelerator={options.accelerator}",
    ]
    if options.nodes * options.devices_per_node > 1:
        overrides.append("trainer.strategy=ddp")
    return overrides


def check_no_conflict(overrides: list[str]) -> None:
    for item in overrides:
        key = item.partition("=")[0]
        if key in SET_BY_SLURM:
            raise ConfigError(f"{key} is set by fwlab slurm from {SET_BY_SLURM[key]}")


def render_script(
    options: SlurmOptions,
    job_name: str,
    run_dir: Path,
    command: list[str],
    origin: str,
    environment: dict[str, str] | None = None,
) -> str:
    """The sbatch script that runs ``command`` in every task (``srun``)."""
    run_dir = run_dir.resolve()
    lines = [
        "#!/bin/bash",
        f"# Written by: {origin}",
        f"#SBATCH --job-name={job_name}",
        f"#SBATCH --nodes={options.nodes}",
        f"#SBATCH --ntasks-per-node={options.devices_per_node}",
        f"#SBATCH --cpus-per-task={options.cpus_per_task}",
        f"#SBATCH --time={options.time}",
        "#SBATCH --open-mode=append",
    ]
    if options.signal_seconds is not None:
        lines += [f"#SBATCH --signal=SIGUSR1@{options.signal_seconds}", "#SBATCH --requeue"]
    if options.accelerator == "gpu":
        lines.append(f"#SBATCH --gpus-per-node={options.devices_per_node}")
    if options.array is not None:
        lines.append(f"#SBATCH --array=0-{options.array - 1}")
        lines.append(f"#SBATCH --output={run_dir}/slurm-%A_%a.out")
    else:
        lines.append(f"#SBATCH --output={run_dir}/slurm-%j.out")
    if options.partition:
        lines.append(f"#SBATCH --partition={options.partition}")
    if options.account:
        lines.append(f"#SBATCH --account={options.account}")
    lines += [f"#SBATCH {extra}" for extra in options.extra]
    lines.append("")
    for key, value in (environment or {}).items():
        lines.append(f"export {key}={shlex.quote(value)}")
    lines += [
        f"cd {shlex.quote(str(Path.cwd()))}",
        "srun " + shlex.join(command),
        "",
    ]
    return "\n".join(lines)


def submit(script: Path) -> str:
    """``sbatch script``; returns the job id."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise FwlabError(
            f"--submit: sbatch is not on PATH (not a SLURM login node?); the script is written: "
            f"submit it with `sbatch {script}`"
        )
    result = subprocess.run([sbatch, str(script.resolve())], capture_output=True, text=True)
    if result.returncode != 0:
        raise FwlabError(f"sbatch {script} failed: {result.stderr.strip() or result.stdout}")
    match = re.search(r"(\d+)", result.stdout)
    return match.group(1) if match else result.stdout.strip()


def python_command(*arguments: str) -> list[str]:
    """``python -m fwlab ARGS`` with this interpreter (clusters share the environment)."""
    return [sys.executable, "-m", "fwlab", *arguments]


def write_run_job(invocation: Invocation, options: SlurmOptions, submit_job: bool) -> int:
    """``fwlab slurm fit|validate|test ...``: check the config, make the run directory (with
    ``config.yaml`` and ``slurm.sbatch``), and submit the script if asked."""
    from fwlab.config import to_yaml
    from fwlab.registry import default_registry
    from fwlab.rundir import CONFIG_FILE, create_run_dir, run_dir_of
    from fwlab.training import RUN_DIR_ENV_VAR, compose_invocation

    check_no_conflict(invocation.overrides)
    allocation = trainer_overrides(options)
    overrides = [*invocation.overrides, *allocation]
    registry = default_registry(invocation.plugins)
    config, resume_dir = compose_invocation(invocation, registry, allocation)
    if resume_dir is not None:  # the job continues that run, in its directory
        run_dir = run_dir_of(resume_dir)
    else:
        run_dir = create_run_dir(
            config.output_dir,
            invocation.command,
            config.model.name,
            config.data.name,
            config.run_name or "",
            "slurm",
        )
        (run_dir / CONFIG_FILE).write_text(to_yaml(config))
    arguments = [invocation.command]
    if invocation.model:
        arguments += ["--model", invocation.model]
    if invocation.data:
        arguments += ["--data", invocation.data]
    for plugin in invocation.plugins:
        arguments += ["--plugin", _absolute_if_file(plugin)]
    for config_file in invocation.config_files:
        arguments += ["--config", str(Path(config_file).resolve())]
    if invocation.ckpt:
        arguments += ["--ckpt", str(Path(invocation.ckpt).resolve())]
    if invocation.resume:
        arguments += ["--resume", str(run_dir.resolve())]
    command = python_command(*arguments, *overrides)
    script = run_dir / SCRIPT_NAME
    script.write_text(
        render_script(
            options,
            f"fwlab-{invocation.command}-{config.model.name}-{config.data.name}",
            run_dir,
            command,
            origin=shlex.join(["fwlab", "slurm", *sys.argv[2:]]),
            environment={RUN_DIR_ENV_VAR: str(run_dir.resolve())},
        )
    )
    print(f"sbatch script:   {script}")
    print(f"run directory:   {run_dir}")
    if submit_job:
        print(f"submitted:       job {submit(script)}")
    else:
        print(f"submit with:     sbatch {script}")
    return 0


def _absolute_if_file(plugin: str) -> str:
    path = Path(plugin)
    return str(path.resolve()) if path.suffix == ".py" or path.exists() else plugin


def write_sweep_job(
    sweep_file: str,
    backend: str,
    options: SlurmOptions,
    sweep_dir: Path | None,
    plugins: list[str],
    count: int | None,
    submit_job: bool,
) -> int:
    """``fwlab slurm sweep FILE --array K``: K array tasks, each a sweep worker running one
    trial at a time on one device: Optuna workers joining the study in ``sweep_dir`` (a shared
    file system), or W&B agents of a sweep created now. A worker's trials are not requeued
    by SLURM: a trial cut off by the time limit (SIGTERM) is recorded as interrupted, and
    submitting the sweep again queues it again, here, once for all the workers."""
    from fwlab.sweep import (
        check_trials,
        create_wandb_sweep,
        default_sweep_dir,
        load_sweep,
        open_study,
        requeue_interrupted,
        wandb_agent_command,
        wandb_sweep_config,
    )

    if options.nodes != 1 or options.devices_per_node != 1:
        raise ConfigError(
            "fwlab slurm sweep: each array task runs one trial at a time on one device "
            "(--nodes 1 --devices-per-node 1); trials run in parallel across --array tasks"
        )
    if not options.array or options.array < 1:
        raise ConfigError("fwlab slurm sweep needs --array K (K workers)")
    spec = load_sweep(sweep_file)
    sweep_dir = sweep_dir or default_sweep_dir(spec)
    extra = trainer_overrides(options)
    plugins = [_absolute_if_file(p) for p in plugins]
    # before the sweep's directory or its job exists; composed only (the workers, on the
    # compute nodes, build the models and check the metric as each starts)
    check_trials(spec, plugins, extra, build_models=False)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    options = dataclasses.replace(options, signal_seconds=None)  # trials are not requeued
    if backend == "optuna":
        study = open_study(spec, sweep_dir)  # the study exists before the first task starts
        requeued = requeue_interrupted(study)
        if requeued:
            print(f"queued again:    {requeued} interrupted trial(s)")
        arguments = ["sweep", str(Path(sweep_file).resolve()), "--backend", "optuna"]
        arguments += ["--workers", "1", "--no-requeue", "--sweep-dir", str(sweep_dir.resolve())]
        for plugin in plugins:
            arguments += ["--plugin", plugin]
        for override in extra:
            arguments += [f"--set={override}"]
        command = python_command(*arguments)
    else:
        sweep_id = create_wandb_sweep(spec, wandb_sweep_config(spec, plugins, extra))
        command = wandb_agent_command(spec, sweep_id, count or 1)
    script = sweep_dir / f"slurm-{backend}.sbatch"
    script.write_text(
        render_script(
            options,
            f"fwlab-sweep-{spec.name}",
            sweep_dir,
            command,
            origin=shlex.join(["fwlab", "slurm", *sys.argv[2:]]),
        )
    )
    print(f"sbatch script:   {script}")
    if submit_job:
        print(f"submitted:       job {submit(script)}")
    else:
        print(f"submit with:     sbatch {script}")
    return 0
