"""SLURM's requeue signal, handled where a training run can resume exactly: between batches.

A job that ``fwlab slurm`` writes asks SLURM for a signal before its time limit
(``--signal=SIGUSR1@s``). Lightning's handler for it saves ``hpc_ckpt_<n>.ckpt`` and calls
``scontrol requeue`` from inside the signal handler, that is at whatever line the main thread
is on. A checkpoint taken after a batch's optimizer step but before Lightning counts the batch
as processed holds the step and not the batch, so the requeued job trains on that batch again:
one optimizer step more than the schedule, on weights that already took it.

:class:`RequeueAtBatchEnd` takes the signal over while ``fit`` runs: the handler only notes it,
and Lightning's handler runs at the next point where Lightning's loops resume exactly, the end
of a training batch, of a validation run or of training (where its own checkpoints are saved).
Outside the training and validation loops (setup, the sanity check) it runs at once, as before.
With several processes, which SLURM signals each at its own moment, the processes agree at
every such point whether any has the signal, so that all save at the same batch.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import RunningStage, TrainerFn

_LOOP_STAGES = (RunningStage.TRAINING, RunningStage.VALIDATING)


class RequeueAtBatchEnd(Callback):
    """Defers Lightning's SLURM requeue (checkpoint, then ``scontrol requeue``) to the end of a
    training batch, of a validation run or of training, during ``fit`` under SLURM with
    Lightning's automatic requeue (its default there)."""

    def __init__(self) -> None:
        self._trainer: L.Trainer | None = None
        self._signal: signal.Signals | None = None
        self._replaced: Any = None  # the handler in place before this one
        self._pending = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        environment = getattr(trainer._accelerator_connector, "cluster_environment", None)
        if not (
            stage == TrainerFn.FITTING
            and isinstance(environment, SLURMEnvironment)
            and environment.auto_requeue
            and environment.requeue_signal is not None
            and threading.current_thread() is threading.main_thread()  # signal.signal's rule
        ):
            return
        replaced = signal.getsignal(environment.requeue_signal)
        if replaced not in (signal.SIG_DFL, None):  # someone's own handler: Lightning keeps it too
            return
        self._trainer, self._signal, self._replaced = trainer, environment.requeue_signal, replaced
        self._pending = False
        # set before Lightning sets its own (after the setup hooks), which it then does not
        signal.signal(self._signal, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        trainer = self._trainer
        assert trainer is not None
        if trainer.state.fn == TrainerFn.FITTING and trainer.state.stage in _LOOP_STAGES:
            self._pending = True  # handled at the next batch end
        else:
            self._requeue(trainer)

    def _requeue(self, trainer: L.Trainer) -> None:
        self._pending = False
        trainer._signal_connector._slurm_sigusr_handler_fn(self._signal, None)

    def _requeue_if_signalled(self, trainer: L.Trainer) -> None:
        if self._signal is None:
            return
        pending = self._pending
        if trainer.world_size > 1:  # every process takes part, signalled or not
            pending = trainer.strategy.reduce_boolean_decision(pending, all=False)
        if pending:
            self._requeue(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        self._requeue_if_signalled(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._requeue_if_signalled(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._requeue_if_signalled(trainer)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._signal is not None:  # after Lightning put back what it found, this handler
            signal.signal(self._signal, self._replaced)
            self._trainer, self._signal, self._replaced = None, None, None
