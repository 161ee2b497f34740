"""SLURM auto-requeue that checkpoints at a consistent point of the training loop.

With `SLURMEnvironment(auto_requeue=True)` (conf/trainer/slurm.yaml), Lightning saves `hpc_ckpt_<n>.ckpt` and runs
`scontrol requeue` inside the SIGUSR1 handler, i.e. wherever the loop happens to be. Mid-batch that is fine, but at an
epoch boundary (Lightning 2.6: the epoch counted as ready, the batch progress still the previous epoch's) the saved
progress is inconsistent and the resumed job skips that whole epoch. `DeferredRequeue` registers its own handler
before Lightning's (which then stands aside), only notes the signal, and runs Lightning's own save-and-requeue at the
next point where the loop state is consistent: the end of a training batch, the end of validation, or the end of
training. Under DDP the ranks agree on the point (one boolean all-reduce per batch, only while this is active), so
all of them save at the same step. The warning signal comes 90 s before the time limit (`--signal=SIGUSR1@90`);
the next batch end is normally well inside that.

On in conf/callbacks/default.yaml; it does nothing unless the run uses SLURM auto-requeue.
"""

from __future__ import annotations

import logging
import signal
from types import FrameType

import pytorch_lightning as pl
from lightning_fabric.plugins.environments import SLURMEnvironment

log = logging.getLogger(__name__)


class DeferredRequeue(pl.Callback):
    def __init__(self) -> None:
        self.active = False
        self.pending: int | None = None  # the signal number received, until handled
        self.handled = False
        self._previous = None
        self._signum: int | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        env = trainer._accelerator_connector.cluster_environment
        if not (isinstance(env, SLURMEnvironment) and env.auto_requeue) or not hasattr(signal, "SIGUSR1"):
            return
        self._signum = env.requeue_signal or signal.SIGUSR1
        self._previous = signal.getsignal(self._signum)
        signal.signal(self._signum, self._note)  # registered first: Lightning then installs no handler of its own
        self.active = True

    def _note(self, signum: int, frame: FrameType | None) -> None:
        if self.active and not self.handled:
            log.info("signal %d: checkpoint and requeue at the next consistent point", signum)
            self.pending = signum

    def _flush(self, trainer: pl.Trainer, collective: bool = True) -> None:
        if not self.active or self.handled:
            return
        pending = self.pending is not None
        if collective and trainer.world_size > 1:
            pending = trainer.strategy.reduce_boolean_decision(pending, all=False)
        if pending:
            self.handled = True
            trainer._signal_connector._slurm_sigusr_handler_fn(self.pending or self._signum, None)

    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
        self._flush(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._flush(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush(trainer)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.active:
            self.active = False
            signal.signal(self._signum, self._previous if self._previous is not None else signal.SIG_DFL)
