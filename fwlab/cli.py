"""The ``fwlab`` command: a table of subcommands over :mod:`fwlab.training` and the registry."""

from __future__ import annotations

import argparse
import signal
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from fwlab.errors import FwlabError
from fwlab.registry import KINDS, PluginImportWarning, default_registry
from fwlab.slurm import SlurmOptions, write_run_job, write_sweep_job


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="FILE_OR_MODULE",
        help="load a local plugin file (path/to/file.py) or module; repeatable "
        "(also: the FWLAB_PLUGINS environment variable)",
    )


def _add_run_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    _add_common(parser)
    parser.add_argument("--model", help="a model or a cell (see `fwlab list`)")
    parser.add_argument("--data", help="a datamodule (see `fwlab list data`)")
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="FILE",
        help="a YAML file merged before the key=value overrides; repeatable",
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )
    if command == "fit":
        parser.add_argument(
            "--resume",
            metavar="RUN_DIR",
            help="continue a run from its last checkpoint, in its own directory",
        )
    else:
        parser.add_argument(
            "--ckpt",
            metavar="PATH",
            help="checkpoint to evaluate; its stored config supplies --model and --data",
        )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides, e.g. model.hidden_size=50 data.batch_size=64 "
        "trainer.max_steps=2000 logger=csv",
    )


def _add_slurm_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("SLURM")
    group.add_argument("--nodes", type=int, default=1, help="nodes (trainer.num_nodes)")
    group.add_argument(
        "--devices-per-node",
        type=int,
        default=1,
        help="GPUs (or CPU processes) per node = tasks per node (trainer.devices)",
    )
    group.add_argument("--accelerator", default="gpu", choices=("gpu", "cpu"))
    group.add_argument("--cpus-per-task", type=int, default=4)
    group.add_argument("--time", default="24:00:00", help="time limit, e.g. 24:00:00")
    group.add_argument("--partition")
    group.add_argument("--account")
    group.add_argument(
        "--signal-seconds",
        type=int,
        default=120,
        help="SIGUSR1 this long before the time limit: checkpoint and requeue",
    )
    group.add_argument(
        "--sbatch",
        action="append",
        default=[],
        metavar="OPTION",
        help="a further #SBATCH option, e.g. --sbatch=--mem=64G; repeatable",
    )
    group.add_argument("--submit", action="store_true", help="run sbatch on the script")


def _add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    _add_common(parser)
    parser.add_argument("file", help="a sweep file, e.g. configs/sweep/retrieval_cells.yaml")
    parser.add_argument("--backend", default="optuna", choices=("optuna", "wandb"))
    parser.add_argument(
        "--workers", type=int, default=1, help="optuna: trials run at the same time here"
    )
    parser.add_argument(
        "--sweep-dir",
        help="optuna: the study and the trials' runs (default: sweeps/<name>); "
        "rerunning with the same directory continues the sweep, trials a stop (Ctrl-C, "
        "SIGTERM) interrupted first",
    )
    parser.add_argument(
        "--no-requeue",
        action="store_true",
        help="optuna: leave interrupted trials to another worker (the array tasks of "
        "fwlab slurm sweep, whose submission queued them again)",
    )
    parser.add_argument("--count", type=int, help="wandb: runs per agent")
    parser.add_argument(
        "--dry-run", action="store_true", help="wandb: print what would be sent, send nothing"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a further override for every trial; repeatable",
    )


def _run_sweep(args: argparse.Namespace) -> int:
    from fwlab.sweep import (
        check_trials,
        completed,
        default_sweep_dir,
        load_sweep,
        results_table,
        run_optuna,
        run_wandb,
    )

    spec = load_sweep(args.file)
    check_trials(spec, list(args.plugin), list(args.set))  # before a trial or the sweep exists
    if args.backend == "wandb":
        return run_wandb(spec, list(args.plugin), list(args.set), args.count, args.dry_run)
    sweep_dir = Path(args.sweep_dir) if args.sweep_dir else default_sweep_dir(spec)
    workers, plugins, extra = max(1, args.workers), list(args.plugin), list(args.set)
    study, stopped_by = run_optuna(spec, sweep_dir, workers, plugins, extra, not args.no_requeue)
    print(results_table(spec, study, sweep_dir))
    print(f"sweep directory: {sweep_dir}  (results.csv, results.json, trials/, logs/)")
    if stopped_by is not None:
        print(
            f"stopped by {signal.Signals(stopped_by).name}: rerun this command (same "
            "--sweep-dir) to run the interrupted trials again and the rest"
        )
        return 128 + stopped_by  # the shell's status for a command a signal ended
    return 0 if completed(study) else 1  # every trial failed: the sweep did not run


def _slurm_options(args: argparse.Namespace) -> SlurmOptions:
    return SlurmOptions(
        nodes=args.nodes,
        devices_per_node=args.devices_per_node,
        accelerator=args.accelerator,
        cpus_per_task=args.cpus_per_task,
        time=args.time,
        partition=args.partition,
        account=args.account,
        signal_seconds=args.signal_seconds,
        extra=list(args.sbatch),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fwlab",
        description="Train fast-weights and memory-augmented recurrent networks.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command, help_text in (
        ("fit", "train, then test the best checkpoint"),
        ("validate", "evaluate on the validation split"),
        ("test", "evaluate on the test split"),
    ):
        _add_run_arguments(commands.add_parser(command, help=help_text), command)
    slurm_parser = commands.add_parser(
        "slurm", help="write (and with --submit, submit) an sbatch script for a command"
    )
    slurm_commands = slurm_parser.add_subparsers(dest="slurm_command", required=True)
    for command in ("fit", "validate", "test"):
        sub = slurm_commands.add_parser(command, help=f"fwlab {command} as a SLURM job")
        _add_run_arguments(sub, command)
        _add_slurm_arguments(sub)
    sweep_parser = commands.add_parser("sweep", help="run a hyperparameter sweep file")
    _add_sweep_arguments(sweep_parser)
    slurm_sweep = slurm_commands.add_parser("sweep", help="sweep workers as a SLURM array")
    _add_sweep_arguments(slurm_sweep)
    _add_slurm_arguments(slurm_sweep)
    slurm_sweep.add_argument("--array", type=int, help="K array tasks, one worker each")
    list_parser = commands.add_parser("list", help="list the registered plugins")
    list_parser.add_argument("kind", nargs="?", choices=KINDS, help="only this kind")
    _add_common(list_parser)
    return parser


def list_plugins(kind: str | None, plugins: Sequence[str]) -> int:
    registry = default_registry(plugins)
    for each in [kind] if kind else KINDS:
        rows = registry.describe(each)
        print(f"{each}:")
        width = max((len(name) for name, _, _ in rows), default=0)
        for name, description, _ in rows:
            print(f"  {name:<{width}}  {description}")
    return 0


_default_format_warning = warnings.formatwarning


def _format_warning(
    message: Warning | str, category: type[Warning], *args: object, **kwargs: object
) -> str:
    if issubclass(category, PluginImportWarning):
        return f"fwlab: warning: {message}\n"
    return _default_format_warning(message, category, *args, **kwargs)  # type: ignore[arg-type]


def main(argv: Sequence[str] | None = None) -> int:
    warnings.formatwarning = _format_warning  # type: ignore[assignment]
    # Lightning 2.6 builds torch's deprecated LeafSpec at every run's first batch: nothing a
    # user can act on, so not printed (the processes DDP starts run main() too)
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
    )
    args = build_parser().parse_args(argv)
    try:
        if args.command == "list":
            return list_plugins(args.kind, args.plugin)
        if args.command == "sweep":
            return _run_sweep(args)
        if args.command == "slurm" and args.slurm_command == "sweep":
            options = _slurm_options(args)
            options.array = args.array
            sweep_dir = Path(args.sweep_dir) if args.sweep_dir else None
            return write_sweep_job(args.file, args.backend, options, sweep_dir,
                                   list(args.plugin), args.count, args.submit)  # fmt: skip
        from fwlab.training import Invocation, run  # imports Lightning: only when needed

        invocation = Invocation(
            command=args.slurm_command if args.command == "slurm" else args.command,
            model=args.model,
            data=args.data,
            overrides=list(args.overrides),
            config_files=list(args.config),
            plugins=list(args.plugin),
            ckpt=getattr(args, "ckpt", None),
            resume=getattr(args, "resume", None),
            print_config=args.print_config,
        )
        if args.command == "slurm":
            return write_run_job(invocation, _slurm_options(args), args.submit)
        return run(invocation)
    except FwlabError as error:
        print(f"fwlab: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:  # Ctrl-C (a RunInterrupted says how to continue)
        detail = f" {interrupt}" if str(interrupt) else ""
        print(f"fwlab: interrupted{detail}", file=sys.stderr)
        return 128 + signal.SIGINT  # the shell's status for a command SIGINT ended


if __name__ == "__main__":
    sys.exit(main())
