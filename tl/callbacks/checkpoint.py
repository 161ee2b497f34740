"""The every-epoch `last.ckpt`, hard-linked to the best checkpoint when both are taken at the same point.

Lightning 2.6 writes `save_last` only in steps where a top-k checkpoint is also saved, so the run's resume point is a
second `ModelCheckpoint` (no monitor, `filename: last`). In every epoch that improves the monitored metric, the two
would serialise the same state twice (EfficientNet-Lite0: 14 MB, ~21 ms a write on the CI machine). `LastCheckpoint`
instead hard-links `last.ckpt` to the file the other checkpoint callback has just written, when that file was dumped
from exactly the loop state `last.ckpt` would hold (same global step, same fit-loop progress). Resuming from either
name restores the same state; removing the best file later (top-k rotation) leaves `last.ckpt` intact, since a hard
link is a second name of the same data.

A file with two names is never written through: the next save replaces the name with a new file (a write would
rewrite the best checkpoint as well); with `tl.checkpoint_io.AtomicCheckpointIO` (the default) that is a rename over
the name, so the old last.ckpt stays whole until the new one is complete, even if the save fails. Where links are
impossible (another filesystem, a remote path, no permission), it writes the file as `ModelCheckpoint` does.

Lightning's own `save_last="link"` differs: every epoch it symlinks last.ckpt to the latest top-k file, i.e. the
best epoch's state, not the last one's (resuming would rewind).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from weakref import proxy

import pytorch_lightning as pl
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint, OnExceptionCheckpoint
from pytorch_lightning.utilities.exceptions import SIGTERMException

from tl.checkpoint_io import AtomicCheckpointIO

log = logging.getLogger(__name__)


def _moved_here(state: dict, here: str) -> dict | None:
    """A ModelCheckpoint state recorded in another folder, with its paths moved into `here`, if the files it tracks
    are found there by name (a run folder copied or moved, then resumed); None otherwise (another run's checkpoint,
    whose files this run neither uses nor rewrites)."""
    old = state.get("dirpath")
    if not old:
        return None

    def move(path):
        return os.path.join(here, os.path.basename(path)) if path and os.path.dirname(path) == old else path

    best_k = {move(k): v for k, v in (state.get("best_k_models") or {}).items()}
    tracked = [*best_k, move(state.get("best_model_path")), move(state.get("kth_best_model_path"))]
    if not all(os.path.isfile(p) for p in tracked if p):
        return None
    return {**state, "dirpath": here, "best_k_models": best_k, "best_model_path": move(state.get("best_model_path")),
            "kth_best_model_path": move(state.get("kth_best_model_path")),
            "last_model_path": move(state.get("last_model_path"))}


class MovableCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that keeps its record of the best checkpoints when the run folder was moved or copied.

    Found by a hostile tester: Lightning reloads that record only when the checkpoint folder's path is the one it was
    saved under. A run copied elsewhere (off a cluster's scratch disk, say) and resumed there started from no record:
    its first validation became "best" whatever it scored, the copied best was neither compared nor removed, and
    the worse checkpoint was tested and exported. The record now follows the files, found by name in the new folder."""

    def load_state_dict(self, state_dict: dict) -> None:
        if self.dirpath and state_dict.get("dirpath") not in (None, self.dirpath):
            state_dict = _moved_here(state_dict, self.dirpath) or state_dict
        super().load_state_dict(state_dict)


class BestCheckpoint(MovableCheckpoint):
    """Lightning's ModelCheckpoint (model selection on the monitored metric), with a rule for ties: `first` keeps the
    earliest checkpoint among equal scores (Lightning's own rule), `last` takes the latest. On a small validation
    split accuracy moves in steps of 1/n, so equal scores are common; under a decaying learning rate the later of two
    equally scored checkpoints has trained longer at a lower rate."""

    def __init__(self, *args, ties: str = "first", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if ties not in ("first", "last"):
            raise ValueError(f"ties={ties!r}: use first or last")
        self.ties = ties

    @property
    def state_key(self) -> str:
        # Lightning files a callback's state under its class name: under ModelCheckpoint's, so that checkpoints
        # written before this class (or with a plain ModelCheckpoint) resume with their best-model tracking
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def check_monitor_top_k(self, trainer: pl.Trainer, current=None) -> bool:
        if self.ties == "first" or current is None or self.save_top_k == -1 \
                or len(self.best_k_models) < self.save_top_k:
            return super().check_monitor_top_k(trainer, current)
        import torch

        monitor_op = {"min": torch.le, "max": torch.ge}[self.mode]  # an equal score replaces the kept one
        better = bool(monitor_op(current, self.best_k_models[self.kth_best_model_path]))
        return trainer.strategy.reduce_boolean_decision(better)  # every rank alike


class LastCheckpoint(MovableCheckpoint):
    """`last.ckpt` at every epoch's end and, with `every_n_steps`, also every that many optimizer steps within an
    epoch (Lightning's own `every_n_train_steps` would replace the epoch-end save). A mid-epoch `last.ckpt` is what a
    job killed without warning (kill -9, a node lost) resumes from; from shards (`data=shards`), whose loader
    position is saved with it, the resumed run reads exactly the records the uninterrupted run would have."""

    def __init__(self, *args, link_same_step: bool = True, every_n_steps: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.link_same_step = link_same_step
        self.every_n_steps = int(every_n_steps or 0)
        self._dumped_loop_state: dict | None = None  # fit-loop state (global step included) of the latest dump

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        n = self.every_n_steps
        if n <= 0 or trainer.global_step % n or self._should_skip_saving_checkpoint(trainer):
            return
        self._save_none_monitor_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        # Called for every checkpoint the trainer dumps, whichever callback asked for it.
        self._dumped_loop_state = checkpoint.get("loops", {}).get("fit_loop")
        return super().on_save_checkpoint(trainer, pl_module, checkpoint)

    def _same_state_file(self, trainer: pl.Trainer) -> str | None:
        """A checkpoint another callback wrote from the current loop state, or None."""
        if not self.link_same_step or self._dumped_loop_state != trainer.fit_loop.state_dict():
            return None
        for cb in trainer.checkpoint_callbacks:
            if cb is self or not isinstance(cb, ModelCheckpoint) or cb.save_weights_only != self.save_weights_only:
                continue
            path = cb._last_checkpoint_saved
            if cb._last_global_step_saved == trainer.global_step and path and os.path.isfile(path):
                return path
        return None

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        twin = self._same_state_file(trainer)
        linked = False
        if trainer.is_global_zero:
            if twin is not None and os.path.abspath(twin) != os.path.abspath(filepath):
                tmp = f"{filepath}.{os.getpid()}.link"
                try:
                    os.link(twin, tmp)
                    os.replace(tmp, filepath)  # atomic: the old last.ckpt stays until the new name is in place
                    linked = True
                except OSError:
                    if os.path.lexists(tmp):
                        os.remove(tmp)
            if not linked and not isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO) \
                    and os.path.isfile(filepath) and os.stat(filepath).st_nlink > 1:
                # Shared with another checkpoint and the IO may write in place: a new file, not through the link.
                # (AtomicCheckpointIO renames a new file over the name, so the old one stays until then.)
                os.remove(filepath)
        linked = trainer.strategy.broadcast(linked)
        if not linked:
            super()._save_checkpoint(trainer, filepath)
            return
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))


class InterruptCheckpoint(OnExceptionCheckpoint):
    """On SIGTERM (a preempted or cancelled job) or Ctrl-C, the state at that point as `interrupted.ckpt`, which
    `ckpt_path=auto` resumes from (the newest checkpoint of the run directory). Any other exception saves nothing: a
    run that diverged or crashed must not leave its broken state as the newest checkpoint. A run that later finishes
    removes the file (Lightning's `OnExceptionCheckpoint.teardown`)."""

    def __init__(self, dirpath: str, filename: str = "interrupted") -> None:
        super().__init__(dirpath, filename)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        from tl.utils import run_terminated

        if isinstance(exception, (SIGTERMException, KeyboardInterrupt)) or run_terminated(exception, trainer):
            # torch's SIGCHLD handler raises again for each loader process that dies (a scheduler's SIGTERM reaches
            # them too), which would abort this save half-way: the run is ending, their deaths are expected
            with contextlib.suppress(ValueError, AttributeError):  # not the main thread; no SIGCHLD (Windows)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            # A NaN loss a GPU had not yet reported: nothing to save (and nothing may be raised here: Lightning's
            # shutdown, which stops the DDP processes and exits, runs after this hook)
            read = getattr(pl_module, "_read_loss_checks", None)
            bad = read() if read is not None else None
            if bad is not None:
                log.warning("No interrupted.ckpt: the training loss was %s at step %s before the interruption; the "
                            "last good checkpoints are kept", *bad)
                return
            if trainer.validating and not trainer.sanity_checking:
                _validate_again_on_resume(trainer.fit_loop.epoch_loop.val_loop)
            # OnExceptionCheckpoint.on_exception without its default: Lightning logs a stray "`weights_only` was not
            # set, defaulting to `False`." line when a caller leaves it out (ModelCheckpoint passes it)
            trainer.save_checkpoint(self.ckpt_path, weights_only=False)


def _validate_again_on_resume(val_loop) -> None:
    """Stopped during an epoch's validation: record it as not yet begun, so that the resumed run validates that epoch
    whole before it trains on.

    Lightning raises its SIGTERMException between validation batches, with the batch counters saying "this many
    completed". Restored from that state, its training loop counts the validation as done and fast-forwards past it:
    the epoch went unvalidated, so no checkpoint was selected on it, early stopping did not count it, and a later
    checkpoint carried an earlier score. Lightning does re-enter a validation that stopped inside a batch (started,
    not processed), but then from the batch it stopped at, with the metrics of the batches before it lost. So the
    counters are set to "one batch started, none of this validation's completed": Lightning's own mid-evaluation
    restart, from the first batch."""
    progress = val_loop.batch_progress
    before = progress.total.completed - progress.current.completed  # the earlier validations' batches
    progress.current.reset()
    progress.total.ready = progress.total.started = before + 1
    progress.total.processed = progress.total.completed = before


class PatientEarlyStopping(EarlyStopping):
    """Lightning's `EarlyStopping`, idle when `patience` is None and under a snapshot ensemble (`snapshot_cycles` > 0:
    its members are the ends of the LR cycles, so the schedule must run to the end).

    Checked after each validation on the metric model selection monitors. Its state (best score, validations
    without improvement) is saved in every checkpoint by Lightning, so a resumed run stops where the uninterrupted
    run would have. Why it stopped is logged and kept in results.json (`early_stopping`, from `report`).
    """

    def __init__(self, patience: int | None = None, monitor: str = "val/acc", mode: str = "max",
                 min_delta: float = 0.0, snapshot_cycles: int = 0, **kwargs):
        super().__init__(monitor=monitor, mode=mode, patience=int(patience or 0), min_delta=float(min_delta),
                         **kwargs)
        self.enabled = patience is not None and not snapshot_cycles
        if patience is not None and snapshot_cycles:
            log.warning("early_stopping.patience=%s ignored: a snapshot ensemble (snapshots.cycles=%s) runs its whole "
                        "schedule", patience, snapshot_cycles)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.enabled:
            super().on_validation_end(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.enabled:
            super().on_train_epoch_end(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # kept now: testing the best checkpoint afterwards restores the callback states saved with it
        self._final = self._summary() if self.enabled else {}

    @property
    def report(self) -> dict:
        """For results.json: whether it stopped the run, at which epoch and why (as fit ended)."""
        final = getattr(self, "_final", None)
        return final if final is not None else (self._summary() if self.enabled else {})

    def _summary(self) -> dict:
        return {"early_stopping": {"patience": self.patience, "monitor": self.monitor, "stopped": bool(
            self.stopped_epoch), "stopped_epoch": int(self.stopped_epoch) or None, "best": float(self.best_score),
            "reason": self.stopping_reason_message}}


class RandomState(pl.Callback):
    """The random generators' states (Python's, NumPy's, torch's CPU and CUDA devices') in every checkpoint,
    put back when a run resumes from it, so that the resumed run draws what the run that was never stopped would have
    drawn: the same shuffles, augmentations, dropout masks and loader-worker seeds after an epoch boundary (the
    resume of `last.ckpt` after a kill). A run stopped during a validation validates that epoch again on resume with
    the same weights, so the same score, but its loaders then draw in another order than the uninterrupted run's
    (Lightning creates the training iterator once more), so the epochs after it differ by chance as before.

    Without it a resumed run went on from the seed's initial states, so its remaining epochs differed from the
    uninterrupted run's by chance (tests/test_faults.py compares the two runs' scores). The states are put back as
    soon as Lightning hands them over (`load_state_dict`, while it restores the checkpoint), not at a later hook: the
    optimizer's setup (`trainer.estimated_stepping_batches`) creates the training loader's iterator, which draws its
    seed, before `on_fit_start` (measured: put back at `on_train_start`, the resumed epoch drew another shuffle). A
    resume runs no sanity check (Lightning skips it when restarting), so nothing else draws in between. (Loading a
    checkpoint to test it puts its states back too: harmless, the same checkpoint gives the same states.) Stored as
    tensors and plain numbers: checkpoints stay loadable with `weights_only=True`. In a multi-process run each
    process gets rank 0's states, as each got the same seed at the start (Lightning's `seed_everything`); per-rank
    data comes from the distributed sampler, not these states."""

    def state_dict(self) -> dict:
        import torch
        from lightning_fabric.utilities.seed import _collect_rng_states

        # Lightning's own collection (torch, CUDA where in use, NumPy, Python), NumPy's array as a tensor
        states = _collect_rng_states(include_cuda=torch.cuda.is_available() and torch.cuda.is_initialized())
        name, keys, pos, has_gauss, cached = states["numpy"]
        states["numpy"] = {"name": str(name), "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                           "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
        return states

    def load_state_dict(self, state_dict: dict) -> None:
        if not state_dict:
            return
        from lightning_fabric.utilities.seed import _set_rng_states

        try:
            numpy = state_dict["numpy"]
            _set_rng_states({**state_dict, "numpy": (numpy["name"], numpy["keys"].numpy().astype("uint32"),
                                                     numpy["pos"], numpy["has_gauss"], numpy["cached_gaussian"])})
        except (KeyError, TypeError, ValueError, RuntimeError) as e:  # another version's layout: start from the seed
            log.warning("The checkpoint's random-generator states could not be restored (%s); the resumed run draws "
                        "from the seed's states instead", e)
