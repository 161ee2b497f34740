"""Helpers for the multi-process tests (test_ddp, test_slurm, test_sweeps) and the resume test: running
`python -m tl.train` the way users start it, and callbacks/data modules loaded by `_target_`.

DDP runs go through `python -m tl.train` in a subprocess: Lightning re-launches the same command for rank 1 with the
run directory pinned. What those subprocesses load by `_target_=distributed_helpers.X` (probes, a pause for signals,
the unpadded-evaluation data module) lives here and is importable there through PYTHONPATH=tests/.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BaseFinetuning
from torch.utils.data import DataLoader

from tl.data.datamodule import TransferDataModule

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

# A tiny DDP-able run: synthetic 32x32 gratings, random init (weights don't matter here), no progress bar.
TINY_CLI = [
    "data=synthetic",
    "model.pretrained=none",
    "trainer.max_epochs=1",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "~callbacks.progress",
    "report.top_losses=0",  # the lists and their image grids are tested in-process (test_trust.py)
    "export=false",  # the export is tested in test_onnx.py, and under DDP in test_ddp.py's end-to-end run
]
DDP_CPU = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]


# -- helpers loaded by the subprocesses -------------------------------------------------------------------------------
def _digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class RankProbe(pl.Callback):
    """Writes, per rank, what DDP must keep identical across ranks: param groups and the weights after training."""

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)
        self.record: dict = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        named = list(pl_module.named_parameters())
        self.record.update({
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "param_groups": [[g.get("name"), sum(p.numel() for p in g["params"]), g["lr"]]
                             for g in trainer.optimizers[0].param_groups],
            "trainable": sorted(n for n, p in named if p.requires_grad),
            "frozen_before": _digest(p for _, p in named if not p.requires_grad),
        })

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        named = list(pl_module.named_parameters())
        self.record.update({
            "trainable_after": _digest(p for _, p in named if p.requires_grad),
            "frozen_after": _digest(p for _, p in named if not p.requires_grad),
            "all_after": _digest(p for _, p in named),
            "trainable_names_after": sorted(n for n, p in named if p.requires_grad),
            "param_groups_after": [[g.get("name"), sum(p.numel() for p in g["params"]), g["lr"]]
                                   for g in trainer.optimizers[0].param_groups],
        })
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.record))


class UnfreezeLastBlock(BaseFinetuning):
    """Staged unfreezing done naively with Lightning's BaseFinetuning: the backbone's last block joins at `epoch`
    and nothing else happens (the control for tl's ScheduledUnfreezing, which also re-wraps DDP)."""

    def __init__(self, epoch: int = 1):
        super().__init__()
        self.epoch = epoch

    def freeze_before_training(self, pl_module: pl.LightningModule) -> None:
        pass  # finetune.strategy=linear_probe froze the backbone already

    def finetune_function(self, pl_module: pl.LightningModule, epoch: int, optimizer) -> None:
        if epoch == self.epoch:
            self.unfreeze_and_add_param_group(pl_module.model.blocks[-1], optimizer, initial_denom_lr=1.0)


class PauseAt(pl.Callback):
    """Touch `marker` and sleep at one point of training, so a signal sent from outside lands exactly there.

    Args:
        marker: file created when the pause starts.
        epoch: the epoch to pause in.
        batch: pause after this training batch; None pauses in `on_train_epoch_start` (an epoch boundary).
        seconds: how long to wait for the signal (the test kills the process long before).
    """

    def __init__(self, marker: str, epoch: int = 1, batch: int | None = None, seconds: float = 120.0):
        self.marker, self.epoch, self.batch, self.seconds = Path(marker), epoch, batch, seconds

    def _pause(self) -> None:
        self.marker.touch()
        time.sleep(self.seconds)  # the signal handler runs during the sleep (PEP 475 resumes it afterwards)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.batch is None and trainer.current_epoch == self.epoch:
            self._pause()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.batch == batch_idx and trainer.current_epoch == self.epoch:
            self._pause()


class EpochSeededShuffle(pl.Callback):
    """Shuffle each epoch's training data with a generator seeded from (seed, epoch), as DistributedSampler.set_epoch
    does under DDP, instead of from the global RNG, whose state depends on how many epochs this process ran: a resumed
    single-device run then repeats an uninterrupted one bit for bit (with augmentation and dropout off)."""

    def __init__(self, seed: int = 0):
        self.seed = seed

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The sampler draws its permutation at the epoch's first batch, after this hook, also when resuming.
        trainer.train_dataloader.sampler.generator = torch.Generator().manual_seed(self.seed + trainer.current_epoch)


class StopAfterEpochs(pl.Callback):
    """Interrupt a run after `epochs` epochs, as a killed job would after its epoch-end checkpoint."""

    def __init__(self, epochs: int):
        self.epochs = epochs

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


class UnpaddedEvalDataModule(TransferDataModule):
    """TransferDataModule with the evaluation fix proposed for tl/data/datamodule.py (see `_loader` there).

    Lightning's default DistributedSampler pads val/test so that every rank gets as many samples, duplicating a few;
    the synced torchmetrics then count the duplicates. Lightning leaves a DistributedSampler it finds in a loader
    alone, so evaluation gets Lightning's UnrepeatedDistributedSampler (no padding; ranks may differ by one sample).
    """

    def _loader(self, ds, batch_size: int, shuffle: bool) -> DataLoader:
        from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler

        loader = super()._loader(ds, batch_size, shuffle)
        dist = self.trainer.distributed_sampler_kwargs if self.trainer is not None else None
        if shuffle or not dist or dist["num_replicas"] == 1:
            return loader
        sampler = UnrepeatedDistributedSampler(ds, shuffle=False, **dist)
        return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=loader.num_workers,
                          persistent_workers=loader.persistent_workers, pin_memory=loader.pin_memory)


# -- running tl.train -------------------------------------------------------------------------------------------------
def run_tl(args: list[str], cwd: Path = REPO, env: dict | None = None,
           timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m tl.train ARGS` with this file's helpers importable; fails the test with the output on error."""
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
                "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "tl.train", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc


def probe(out_dir: Path) -> list[str]:
    return [f"+callbacks.probe._target_={__name__}.RankProbe", f"+callbacks.probe.out_dir={out_dir}"]


def read_ranks(out_dir: Path) -> list[dict]:
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in (0, 1)]




class SignalAt(pl.Callback):
    """Sends `signum` (SIGTERM by default) to this process once, after optimizer step `step`: a job preempted or
    cancelled mid-epoch."""

    def __init__(self, step: int, signum: int = signal.SIGTERM):
        self.step, self.signum, self.sent = int(step), int(signum), False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if not self.sent and trainer.global_step >= self.step:
            self.sent = True
            os.kill(os.getpid(), self.signum)


class WorkerTerminatedAt(pl.Callback):
    """What the main process meets after optimizer step `step` when a scheduler's SIGTERM reached its DataLoader
    workers first: torch's RuntimeError for a worker killed by SIGTERM (raised by torch wherever the main process
    waits for a batch)."""

    def __init__(self, step: int):
        self.step = int(step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step >= self.step:
            raise RuntimeError(f"DataLoader worker (pid {os.getpid() + 1}) is killed by signal: Terminated. ")


class SamplerProbe(pl.Callback):
    """Writes, per rank, the training sampler Lightning kept, and the indices it draws in the first epoch."""

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sampler = trainer.train_dataloader.sampler
        dm = trainer.datamodule
        record = {"rank": trainer.global_rank, "type": type(sampler).__name__,
                  "num_replicas": getattr(sampler, "num_replicas", None),
                  "sampler_rank": getattr(sampler, "rank", None),
                  "epoch": getattr(sampler, "epoch", None), "drawn": [int(i) for i in sampler],
                  "train_targets": [int(t) for t in dm.images.targets[dm.split_indices["train"]]],
                  "seed": dm.seed}
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"sampler{trainer.global_rank}.json").write_text(json.dumps(record))


class SampleLog(pl.Callback):
    """Appends, per rank, each training batch's record ids (batches streamed from shards carry them as their third
    element) with the global step after it, one JSON line per batch, flushed at once: the log survives kill -9."""

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / f"ids{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps({"step": trainer.global_step, "epoch": trainer.current_epoch,
                                "ids": [int(i) for i in batch[2]]}) + "\n")
            f.flush()
            os.fsync(f.fileno())


class SignalInValidation(pl.Callback):
    """Sends `signum` (SIGTERM by default) to this process once, after validation batch `batch` of the validation at
    the end of epoch `epoch` (not the sanity check): a job preempted while it validates."""

    def __init__(self, epoch: int, batch: int = 0, signum: int = signal.SIGTERM):
        self.epoch, self.batch, self.signum, self.sent = int(epoch), int(batch), int(signum), False

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0):
        if (not self.sent and not trainer.sanity_checking and trainer.current_epoch == self.epoch
                and batch_idx >= self.batch):
            self.sent = True
            os.kill(os.getpid(), self.signum)


class ValidationRecorder(pl.Callback):
    """Appends one JSON line per finished validation (not the sanity check) to `path`: the epoch, the number of
    validation batches it ran, and the validation accuracy logged."""

    def __init__(self, path: str):
        self.path, self.batches = Path(path), 0

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self.batches = 0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0):
        self.batches += 1

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            acc = trainer.callback_metrics.get("val/acc")
            with self.path.open("a") as f:
                f.write(json.dumps({"epoch": trainer.current_epoch, "batches": self.batches,
                                    "acc": None if acc is None else float(acc)}) + "\n")
