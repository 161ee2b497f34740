"""Snapshot ensembles (Huang et al., 2017, "Snapshot Ensembles: Train 1, get M for free").

The learning rate follows cosine annealing with warm restarts over `cycles` cycles inside the normal epoch budget
(`tl.models.schedules.cosine`, whose cycles conf/scheduler/cosine.yaml ties to `snapshots.cycles`): equal cycles as
in the paper, or, with `first_cycle`, one long first descent followed by short cycles. At the end of each cycle,
where the LR is at its minimum and the model sits in a local minimum, the weights are saved as a snapshot. At test
time the last `ensemble_last` snapshots vote by averaging their softmax outputs. No extra training epochs.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

from tl.models.schedules import run_cycle_ends


class SnapshotEnsemble(Callback):
    """Save a snapshot at the end of every LR cycle into `dirpath` (snapshot_cycle{K}.ckpt).

    Args:
        cycles: number of cosine cycles over the run; 0 disables snapshots.
        dirpath: where snapshots go (default: <run>/checkpoints/snapshots).
        first_cycle: the first cycle's share of the run (None: equal cycles); the schedule must use the same.
    """

    def __init__(self, cycles: int, dirpath: str | Path | None = None, first_cycle: float | None = None):
        self.cycles, self.dirpath = int(cycles), Path(dirpath) if dirpath else None
        self.first_cycle = first_cycle
        self.snapshots: list[dict] = []  # {"path", "cycle", "step", "lr"}
        self._lrs: list[float] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = Path(trainer.default_root_dir) / "checkpoints" / "snapshots"

    def on_train_start(self, trainer, pl_module) -> None:
        """A resumed run must end its cycles where the run it continues did: snapshots taken on another schedule
        (another trainer.max_epochs, snapshots.cycles or first_cycle, or other data) would be skipped as taken and
        the ensemble would keep the old weights (every rank decides alike: the same list and schedule)."""
        if self.cycles <= 0 or not self.snapshots:
            return
        ends = run_cycle_ends(trainer, self.cycles, self.first_cycle)
        moved = [s for s in self.snapshots if s["cycle"] > len(ends) or ends[s["cycle"] - 1] != s["step"]]
        if moved:
            from tl.errors import TLError

            raise TLError(f"the run being resumed took its snapshots at steps {[s['step'] for s in self.snapshots]}, "
                          f"but with these settings its {self.cycles} LR cycles end at steps {ends} (trainer."
                          "max_epochs, snapshots.cycles or snapshots.first_cycle changed, or the data): resume with "
                          "the run's own settings (its config.yaml), or start a new run in another hydra.run.dir")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # The LRs this step will use (the scheduler steps after the optimizer, so read them before).
        self._lrs = [g["lr"] for g in trainer.optimizers[0].param_groups]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.cycles <= 0:
            return
        ends = run_cycle_ends(trainer, self.cycles, self.first_cycle)
        if trainer.global_step not in ends:
            return
        cycle = ends.index(trainer.global_step) + 1
        if any(s["cycle"] == cycle for s in self.snapshots):
            return
        path = self.dirpath / f"snapshot_cycle{cycle}.ckpt"
        # Listed before saving, so every checkpoint (and a resumed run) knows the snapshots up to itself.
        self.snapshots.append({"path": str(path), "cycle": cycle, "step": trainer.global_step,
                               "lr": max(self._lrs) if self._lrs else float("nan")})
        trainer.save_checkpoint(path, weights_only=False)  # the full state, as said (no log line asking)

    def state_dict(self) -> dict:
        return {"snapshots": self.snapshots}

    def load_state_dict(self, state_dict: dict) -> None:
        # A resumed fit starts empty and takes the saved list. Lightning also restores callback state when testing
        # with ckpt_path=best after fitting: a best checkpoint from an earlier cycle must not drop later snapshots.
        saved = state_dict.get("snapshots", [])
        if self.dirpath is not None:  # set up: snapshots are this run's, recorded here or found here by name (a
            # moved run); a checkpoint of another run lists that run's, which this run neither uses nor rewrites (it
            # saves its own). Decided from the recorded folder first: every DDP rank must decide alike, since each
            # snapshot it then saves is a collective call.
            here = os.path.abspath(self.dirpath)
            names = [(s, Path(s["path"]).name) for s in saved]
            saved = [{**s, "path": os.path.join(here, name)} for s, name in names
                     if os.path.abspath(Path(s["path"]).parent) == here or (Path(here) / name).is_file()]
        by_cycle = {s["cycle"]: s for s in saved}
        by_cycle.update({s["cycle"]: s for s in self.snapshots})
        self.snapshots = [by_cycle[c] for c in sorted(by_cycle)]
