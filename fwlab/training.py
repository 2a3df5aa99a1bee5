"""``fwlab fit | validate | test``: from a composed config to a Lightning run in its own dir."""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from fwlab import trainer_arguments
from fwlab.config import (
    GENERIC_MODEL,
    LoggerConfig,
    MatmulPrecision,
    compose,
    dataclass_from,
    to_plain,
    to_yaml,
)
from fwlab.errors import ConfigError, FwlabError, RunInterrupted
from fwlab.loggers import WANDB_ID_FILE, check_logger, make_logger
from fwlab.objective import objective_of
from fwlab.published import compare, summary_lines
from fwlab.registry import Registry, default_registry
from fwlab.requeue import RequeueAtBatchEnd
from fwlab.rundir import CHECKPOINT_DIR, CONFIG_FILE, LAST_CHECKPOINT, create_run_dir, run_dir_of

CHECKPOINT_CONFIG_KEY = "fwlab_config"
RESULTS_FILE = "results.json"
RUN_DIR_ENV_VAR = "FWLAB_RUN_DIR"  # set by the launching process for the other ranks


@dataclass
class Invocation:
    """One ``fwlab`` command line."""

    command: str  # fit | validate | test
    model: str | None = None
    data: str | None = None
    overrides: list[str] = field(default_factory=list)
    config_files: list[str] = field(default_factory=list)
    plugins: list[str] = field(default_factory=list)
    ckpt: str | None = None  # validate/test: the checkpoint to evaluate
    resume: str | None = None  # fit: a run directory (or a checkpoint in one) to continue
    print_config: bool = False


class SaveConfigInCheckpoint(Callback):
    """Stores the resolved config in every checkpoint, so ``fwlab test --ckpt`` can rebuild the
    model and data from the checkpoint alone (and a requeued job finds its W&B run id)."""

    def __init__(self, config: dict[str, Any], run_dir: Path) -> None:
        self.config = config
        self.run_dir = run_dir

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[CHECKPOINT_CONFIG_KEY] = self.config
        id_file = self.run_dir / WANDB_ID_FILE
        if id_file.exists():
            checkpoint["fwlab_wandb_run_id"] = id_file.read_text().strip()


class ValidateOnLastStep(Callback):
    """Validates after the last training step when ``max_steps`` ends fit in mid-epoch.

    Lightning validates at epoch ends; a run stopped by ``trainer.max_steps`` would otherwise end
    with no validation metric and so no best checkpoint. Setting ``should_stop`` on the last step
    makes Lightning's loop validate before it stops (as it does for early stopping).
    """

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any
    ) -> None:
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True


class StopWhenDiverged(Callback):
    """Stops ``fit`` at the first validation whose loss or monitored metric is not finite: a
    run that diverged (a learning rate too large, no gradient clipping) otherwise trained on to
    its end with NaN weights and reported a test of them. Read from the validation's synced
    metrics, so every DDP process stops at the same step, and at no cost per training step
    (a check of the training loss would wait on the device at every step).

    ``best`` is the run's best-checkpoint callback: Lightning runs checkpoint callbacks after
    the others, so at a diverged validation its best is still the one from before."""

    def __init__(self, names: list[str], best: ModelCheckpoint) -> None:
        self.names = names
        self.best = best
        self.diverged: tuple[str, float, int] | None = None  # (metric, value, step)
        self.best_before = ""  # the best checkpoint before the divergence, if any

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.diverged is not None:
            return
        for name in self.names:
            value = trainer.callback_metrics.get(name)
            if value is not None and not bool(torch.isfinite(value).all()):
                self.diverged = (name, float(value), trainer.global_step)
                self.best_before = self.best.best_model_path
                trainer.should_stop = True
                return


def build_datamodule(config: DictConfig, registry: Registry) -> L.LightningDataModule:
    """The datamodule a config names, with its typed config."""
    data_cls = registry.get("data", config.data.name)
    return data_cls(dataclass_from(data_cls.Config, config.data))


def build_model_and_data(
    config: DictConfig, registry: Registry
) -> tuple[L.LightningModule, L.LightningDataModule]:
    """Instantiate the datamodule and the model a config names, checking they pair up."""
    datamodule = build_datamodule(config, registry)
    name = config.model.name
    model_cls = registry.get("model", name if ("model", name) in registry else GENERIC_MODEL)
    model = model_cls.build(config, datamodule.spec, registry)
    return model, datamodule


def _saved_config(invocation: Invocation) -> tuple[dict[str, Any] | None, str, Path | None]:
    """The config a resumed run or an evaluated checkpoint was trained with."""
    if invocation.resume:
        run_dir = run_dir_of(invocation.resume)
        configs = sorted(run_dir.glob("config*.yaml"), key=lambda p: p.stat().st_mtime)
        if not configs:
            raise ConfigError(f"--resume {invocation.resume}: no {CONFIG_FILE} in {run_dir}")
        return OmegaConf.to_container(OmegaConf.load(configs[-1])), str(configs[-1]), run_dir
    if invocation.ckpt:
        path = Path(invocation.ckpt)
        if not path.is_file():
            raise ConfigError(f"--ckpt {path}: no such checkpoint file")
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as error:  # noqa: BLE001 - any unreadable file
            raise ConfigError(f"--ckpt {path}: not a readable checkpoint ({error})") from None
        if CHECKPOINT_CONFIG_KEY not in checkpoint:
            raise ConfigError(f"--ckpt {path}: not an fwlab checkpoint (no stored config)")
        return checkpoint[CHECKPOINT_CONFIG_KEY], f"the config stored in {path}", None
    return None, "", None


# the splits a command cannot do without (fit may validate on none: it then tests the last
# weights, saying so)
_NEEDED_SPLITS = {"fit": ("train", "test"), "validate": ("val",), "test": ("test",)}


def _check_splits_not_empty(datamodule: L.LightningDataModule, command: str, name: str) -> None:
    """Stop before anything is written when a split the command needs holds no examples (split
    fractions or sizes that leave it empty): Lightning would skip it, and ``fit`` would fail
    only at its final test, after training."""
    datasets = getattr(datamodule, "datasets", {})  # fwlab's DataModule: filled by setup()
    for split in _NEEDED_SPLITS.get(command, ()):
        dataset = datasets.get(split)
        if dataset is not None and hasattr(dataset, "__len__") and len(dataset) == 0:
            raise ConfigError(
                f"the {split} split of data {name} holds no examples, and fwlab {command} needs "
                "it: check the data.* settings that size the splits (nothing was written)"
            )


def _check_weights_fit(model: L.LightningModule, path: Path, flag: str, config: DictConfig) -> None:
    """Stop before anything is written when a checkpoint's weights do not fit the model the
    config builds: an override changed the network of the run being resumed or evaluated
    (``model.hidden_size=...``). Lightning finds it only as it loads them, with a traceback,
    once the run's files are written."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    stored, built = checkpoint.get("state_dict", {}), model.state_dict()
    misfits = [
        f"{key} is {tuple(value.shape)} there, {tuple(built[key].shape)} here"
        for key, value in stored.items()
        if key in built and value.shape != built[key].shape
    ]
    if getattr(model, "strict_loading", True):  # as Lightning loads them
        misfits += [f"{key} is only there" for key in stored if key not in built]
        misfits += [f"{key} is only here" for key in built if key not in stored]
    if not misfits:
        return
    saved = checkpoint.get(CHECKPOINT_CONFIG_KEY, {}).get("model", {})
    now = to_plain(config)["model"]
    changed = [f"model.{key}={now.get(key)} (was {was})" for key, was in saved.items()
               if now.get(key) != was]  # fmt: skip
    more = f" and {len(misfits) - 2} more" if len(misfits) > 2 else ""
    cause = f", after {', '.join(changed)}" if changed else ""
    raise ConfigError(
        f"{flag} {path}: its weights do not fit the model this config builds "
        f"({'; '.join(misfits[:2])}{more}){cause}. A resumed or evaluated run keeps the network "
        "it was trained with (nothing was written)"
    )


def _resume_checkpoint(run_dir: Path) -> Path:
    path = _newest_checkpoint(run_dir)
    if path is None:
        raise ConfigError(
            f"--resume {run_dir}: no checkpoint to resume from (no {CHECKPOINT_DIR}/"
            f"{LAST_CHECKPOINT} and no hpc_ckpt_*.ckpt)"
        )
    return path


def _write_new(path: Path, text: str) -> Path:
    """Write ``text`` to ``path``, or beside it (``name.1.yaml``...) if it exists already."""
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}.{n}{path.suffix}")
    candidate.write_text(text)
    return candidate


def launch_rank() -> int:
    """This process's global rank as its launcher (torchrun, srun, Lightning) set it; 0 alone."""
    for name in ("RANK", "SLURM_PROCID"):
        if name in os.environ:
            return int(os.environ[name])
    return int(os.environ.get("LOCAL_RANK", 0))  # a rank Lightning started on this machine


def _job_run_dir(run_dir: Path, config_yaml: str) -> tuple[Path, Path]:
    """A run directory given by ``FWLAB_RUN_DIR``: by fwlab to the DDP ranks Lightning starts,
    by the sbatch script of ``fwlab slurm`` to every task of the job (the same one again when the
    job is requeued), by ``fwlab sweep`` to a trial. Rank zero creates it and writes the config
    unless the same config is there already."""
    config_path = run_dir / CONFIG_FILE
    if launch_rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not config_path.exists():
            config_path.write_text(config_yaml)
        elif config_path.read_text() != config_yaml:
            config_path = _write_new(config_path, config_yaml)
    return run_dir, config_path


def _newest_checkpoint(run_dir: Path) -> Path | None:
    """The newest of Lightning's requeue checkpoints (``hpc_ckpt_<n>.ckpt``, saved on SLURM's
    signal before the time limit) and ``checkpoints/last.ckpt``; None for a fresh run."""
    candidates = [*run_dir.glob("hpc_ckpt_*.ckpt"), run_dir / CHECKPOINT_DIR / LAST_CHECKPOINT]
    existing = [path for path in candidates if path.is_file()]
    return max(existing, key=lambda path: path.stat().st_mtime) if existing else None


def compose_invocation(
    invocation: Invocation, registry: Registry, extra_overrides: list[str] | None = None
) -> tuple[DictConfig, Path | None]:
    """The config a command line asks for (on top of a resumed run's or a checkpoint's saved
    config), and the run directory it resumes, if any."""
    base, base_source, resume_dir = _saved_config(invocation)
    config = compose(
        registry,
        model=invocation.model,
        data=invocation.data,
        overrides=[*invocation.overrides, *(extra_overrides or [])],
        config_files=invocation.config_files,
        base=base,
        base_source=base_source,
    )
    return config, resume_dir


def run(invocation: Invocation) -> int:
    """Carry out one command; returns the exit status."""
    started = time.monotonic()
    registry = default_registry(invocation.plugins)
    config, resume_dir = compose_invocation(invocation, registry)
    if invocation.print_config:
        print(to_yaml(config), end="")
        return 0
    resume_from = _resume_checkpoint(resume_dir) if resume_dir is not None else None

    L.seed_everything(config.seed, workers=True, verbose=False)
    torch.set_float32_matmul_precision(MatmulPrecision(config.float32_matmul_precision).value)
    model, datamodule = build_model_and_data(config, registry)
    if resume_from is not None:
        _check_weights_fit(model, resume_from, "--resume", config)
    elif invocation.ckpt:
        _check_weights_fit(model, Path(invocation.ckpt), "--ckpt", config)
    # Load the data now: a missing or malformed dataset fails before a run directory exists.
    # (Lightning calls setup() again; fwlab's datamodules return at once the second time.)
    datamodule.setup("fit" if invocation.command == "fit" else invocation.command)
    _check_splits_not_empty(datamodule, invocation.command, config.data.name)
    plain = to_plain(config)
    trainer_arguments.check_settings(plain["trainer"])  # and what Lightning refuses, too
    check_logger(LoggerConfig(**plain["logger"]))

    name = config.run_name or ""
    inherited = os.environ.get(RUN_DIR_ENV_VAR)
    if inherited:
        run_dir, config_path = _job_run_dir(Path(inherited), to_yaml(config))
        if invocation.command == "fit" and resume_from is None:
            resume_from = _newest_checkpoint(run_dir)  # a requeued job continues
    else:
        run_dir = resume_dir or create_run_dir(
            config.output_dir, invocation.command, config.model.name, config.data.name, name
        )
        config_path = _write_new(run_dir / CONFIG_FILE, to_yaml(config))
        os.environ[RUN_DIR_ENV_VAR] = str(run_dir)  # inherited by the ranks Lightning launches
    try:
        status = _train_and_evaluate(
            invocation,
            config,
            plain,
            model,
            datamodule,
            run_dir,
            config_path,
            resume_from,
            started,
        )
    finally:
        if not inherited:
            os.environ.pop(RUN_DIR_ENV_VAR, None)
    release_process_group()
    return status


def release_process_group() -> None:
    """Destroy the process group a distributed run set up, once the run is done with it.

    Lightning leaves the group alive (a later fit or test in the process may use it), so it was
    left to the interpreter's exit to tear down; a test's DDP task whose group was left so once
    ended in SIGABRT ("terminate called without an active exception") instead of exiting 0."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _clearer_fit_error(error: ValueError, run_dir: Path) -> Exception:
    """A :class:`ConfigError` naming the key, for a setting Lightning can only check once the
    data is loaded, after the run directory exists (the message names it), or ``error``
    itself."""
    found = re.search(r"`val_check_interval` \((\d+)\) .* training batches \((\d+)\)", str(error))
    if found is None:
        return error
    interval, batches = found.groups()
    return ConfigError(
        f"trainer.val_check_interval={interval} is more than the {batches} training batches of "
        "an epoch: give at most that, a fraction of the epoch (0.25), or "
        "trainer.check_val_every_n_epoch=null to count it across epochs (stopped before "
        f"training; the run directory is {run_dir})"
    )


def _interrupted_fit(step: int, run_dir: Path) -> RunInterrupted:
    """What to tell of a fit Ctrl-C stopped: where, and how to continue it (from the newest
    checkpoint, ``last.ckpt`` of the last validation, which ``--resume`` takes)."""
    where = f"at step {step}; its files are in {run_dir}"
    newest = _newest_checkpoint(run_dir)
    if newest is None:
        return RunInterrupted(f"{where}, with no checkpoint yet (the first validation writes one)")
    return RunInterrupted(f"{where}; continue from {newest.name}: fwlab fit --resume {run_dir}")


def _diverged_error(diverged: tuple[str, float, int], best: str, run_dir: Path) -> FwlabError:
    """What to tell of a fit :class:`StopWhenDiverged` stopped."""
    name, value, step = diverged
    kept = f"; the best checkpoint before it: fwlab test --ckpt {best}" if best else ""
    return FwlabError(
        f"{name} was {value} at step {step}: the run diverged, so it stopped there untested "
        "(a smaller optim.lr, or trainer.gradient_clip_val, may help). Its files are in "
        f"{run_dir} (last.ckpt: the diverged state){kept}"
    )


def _train_and_evaluate(
    invocation: Invocation,
    config: DictConfig,
    plain: dict[str, Any],
    model: L.LightningModule,
    datamodule: L.LightningDataModule,
    run_dir: Path,
    config_path: Path,
    resume_from: Path | None,
    started: float,
) -> int:
    name = config.run_name or ""
    logger = make_logger(LoggerConfig(**plain["logger"]), run_dir, name or run_dir.name)
    if logger is not None:
        logger.log_hyperparams(plain)

    objective = objective_of(model)
    monitor = f"val/{objective.monitor}"
    checkpoints = ModelCheckpoint(
        dirpath=run_dir / CHECKPOINT_DIR,
        filename="best-epoch{epoch}-step{step}",
        auto_insert_metric_name=False,
        monitor=monitor,
        mode=objective.monitor_mode,
    )
    # last.ckpt, the state --resume continues from, written at every validation (or epoch end).
    # Not ModelCheckpoint(save_last=True): Lightning writes that only when it writes a best
    # checkpoint, so once the metric stopped improving, last.ckpt stayed at the best step.
    latest = ModelCheckpoint(
        dirpath=run_dir / CHECKPOINT_DIR,
        filename=Path(LAST_CHECKPOINT).stem,
        monitor=None,  # with save_top_k=1: keep the newest only, overwriting it in place
        save_top_k=1,
        enable_version_counter=False,
    )
    diverged = StopWhenDiverged(sorted({monitor, "val/loss"}), checkpoints)
    trainer = L.Trainer(
        **plain["trainer"],
        logger=logger if logger is not None else False,
        callbacks=[
            checkpoints,
            latest,
            diverged,
            ValidateOnLastStep(),
            SaveConfigInCheckpoint(plain, run_dir),
            RequeueAtBatchEnd(),
        ],
        default_root_dir=run_dir,
    )

    results: dict[str, float] = {}
    evaluated: str | None = invocation.ckpt
    if invocation.command == "fit":
        try:
            trainer.fit(model, datamodule=datamodule, ckpt_path=resume_from)
        except ValueError as error:
            raise _clearer_fit_error(error, run_dir) from None
        except SystemExit:
            if trainer.interrupted:  # Lightning's graceful stop on Ctrl-C ends in sys.exit(1)
                raise _interrupted_fit(trainer.global_step, run_dir) from None
            raise
        if diverged.diverged is not None:
            raise _diverged_error(diverged.diverged, diverged.best_before, run_dir)
        # (for a callback without a monitor, Lightning's "best" is the newest)
        evaluated = checkpoints.best_model_path or latest.best_model_path or None
        _record_best_in_wandb(logger, monitor, checkpoints.best_model_score)
        if trainer.is_global_zero and not checkpoints.best_model_path:
            print(f"fwlab: no '{monitor}' was logged, so the test uses the last weights")
        results = trainer.test(model, datamodule=datamodule, ckpt_path=evaluated)[0]
        split = "test"
    elif invocation.command in ("validate", "test"):
        evaluate = trainer.validate if invocation.command == "validate" else trainer.test
        results = evaluate(model, datamodule=datamodule, ckpt_path=invocation.ckpt)[0]
        split = "val" if invocation.command == "validate" else "test"
    else:
        raise ConfigError(f"unknown command '{invocation.command}'")

    wall_time = time.monotonic() - started
    published = compare(plain, results)
    _record_published_in_wandb(logger, published)
    if trainer.is_global_zero:
        record: dict[str, Any] = {
            "command": invocation.command,
            "model": config.model.name,
            "data": config.data.name,
            "checkpoint": evaluated,
            "metrics": results,
            "published": published,
            "wall_time_s": wall_time,
            "machine": _machine(trainer),
        }
        if invocation.command == "fit":
            best = checkpoints.best_model_score
            record["best"] = {  # the validation metric that chose the tested checkpoint
                "monitor": monitor,
                "mode": objective.monitor_mode,
                "value": None if best is None else float(best),
            }
            record["global_step"] = trainer.global_step
        _write_new(run_dir / RESULTS_FILE, json.dumps(record, indent=2) + "\n")
        _print_summary(
            invocation.command,
            config,
            run_dir,
            config_path,
            evaluated,
            [*objective.summary(results, split), *summary_lines(plain, published)],
            wall_time,
            record["machine"],
        )
    if logger is not None:
        logger.finalize("success")
    return 0


def _machine(trainer: L.Trainer) -> dict[str, Any]:
    """What ran the run, beside its wall time: the device (and the GPU's name), the processes,
    and each process's CPU threads (torch's intra-op threads, which fwlab's C kernels use too)."""
    device = trainer.strategy.root_device
    return {
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "processes": trainer.world_size,
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def _record_best_in_wandb(logger: Any, monitor: str, best: torch.Tensor | None) -> None:
    """W&B's summary keeps a metric's last value; ``best/<monitor>`` holds the value that chose
    the checkpoint (what a W&B sweep optimises)."""
    if isinstance(logger, WandbLogger) and best is not None and rank_zero_only.rank == 0:
        logger.experiment.summary[f"best/{monitor}"] = float(best)


def _record_published_in_wandb(logger: Any, published: list[dict[str, Any]]) -> None:
    """``published/<metric>`` in the W&B run's summary, beside the run's own ``<metric>``."""
    if isinstance(logger, WandbLogger) and rank_zero_only.rank == 0:
        for comparison in published:
            for metric, values in comparison["metrics"].items():
                logger.experiment.summary[f"published/{metric}"] = values["published"]


def _print_summary(
    command: str,
    config: DictConfig,
    run_dir: Path,
    config_path: Path,
    checkpoint: str | None,
    lines: list[str],
    wall_time: float,
    machine: dict[str, Any],
) -> None:
    rule = "─" * 72
    minutes, seconds = divmod(int(round(wall_time)), 60)
    print(rule)
    print(f"fwlab {command}: {config.model.name} on {config.data.name}, seed {config.seed}")
    print(f"run directory:   {run_dir}")
    print(f"config:          {config_path}")
    print(f"checkpoint:      {checkpoint or '(current weights)'}")
    for line in lines:
        print(line)
    device = machine["gpu"] or machine["device"]
    counts = f"processes × CPU threads: {machine['processes']} × {machine['cpu_threads']}"
    print(f"wall time:       {minutes}m {seconds:02d}s ({device}; {counts})")
    print(rule)
