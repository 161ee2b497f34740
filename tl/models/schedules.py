"""Learning-rate schedules, stepped every optimizer step so short runs still anneal smoothly.

Each function takes the optimizer and the run's length and returns a torch scheduler; conf/scheduler/ holds them as
`_partial_` targets, finished in `TransferModule.configure_optimizers`. Group LRs are scaled relatively, so the
backbone keeps its ratio to the head throughout.

Why LambdaLR and not torch's StepLR/ExponentialLR/SequentialLR or timm's scheduler factory: staged unfreezing
(`tl.callbacks.unfreezing`) adds param groups mid-run and must extend the schedule to them at its current point. A
LambdaLR is one factor function of the step applied to every group's own base LR, so extending it is appending a
base LR; chained torch schedulers keep per-child state that cannot be extended, and timm's schedulers set absolute
LRs (one `lr_min` for all groups), which would undo the backbone/head ratio at the floor.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler


def epoch_steps(trainer) -> int:
    """Optimizer steps per epoch as the schedules count them (from the Trainer's own estimate)."""
    return max(1, int(trainer.estimated_stepping_batches) // max(1, int(trainer.max_epochs)))


def cycle_ends(total_steps: int, cycles: int, first_cycle: float | None = None) -> list[int]:
    """The optimizer step at which each warm-restart cycle ends; the last ends the run.

    Equal cycles by default (Huang et al. 2017). With `first_cycle` (a fraction of the run) the first cycle is that
    long and the others share the rest equally: one full descent to a good model, then short cycles that explore
    around it (as in fast geometric ensembling, Garipov et al. 2018). `cosine` and the snapshot callback
    share this, so snapshots land where the LR is at its floor.
    """
    cycles, total = max(1, int(cycles)), max(1, int(total_steps))
    if cycles == 1:
        return [total]
    first = total // cycles if first_cycle is None else int(round(float(first_cycle) * total))
    first = min(max(1, first), total - (cycles - 1))  # every later cycle keeps at least one step
    rest = (total - first) // (cycles - 1)
    return [first + rest * i for i in range(cycles - 1)] + [total]


def run_cycle_ends(trainer, cycles: int, first_cycle: float | None = None) -> list[int]:
    """`cycle_ends` for a Trainer's run, counted as the schedules count steps."""
    return cycle_ends(epoch_steps(trainer) * int(trainer.max_epochs), cycles, first_cycle)


def _warmup(step: int, warmup_steps: int) -> float:
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def cosine(optimizer: Optimizer, steps_per_epoch: int, max_epochs: int, warmup_epochs: float = 1.0,
           min_lr_ratio: float = 0.01, cycles: int = 1, first_cycle: float | None = None) -> LRScheduler:
    """Linear warmup, then cosine decay from each group's LR to `min_lr_ratio` of it.

    With `cycles` > 1 the decay restarts (SGDR, Loshchilov & Hutter 2017) at the ends of `cycle_ends`, so the LR is
    at its floor where `tl.callbacks.snapshots.SnapshotEnsemble` saves each snapshot. Restarts start at the peak
    with no warmup, as in SGDR and snapshot ensembles (a warmup would also eat into short first cycles).
    `cycles` 0 or 1 is one warmup and decay over the whole run.
    """
    total = max(1, steps_per_epoch * max_epochs)
    cycles = max(1, int(cycles or 1))
    ends = cycle_ends(total, cycles, first_cycle)
    starts = [0, *ends[:-1]]
    warm = min(int(warmup_epochs * steps_per_epoch), total - 1) if cycles == 1 else 0

    def factor(step: int) -> float:
        if step < warm:
            return _warmup(step, warm)
        for start, end in zip(starts, ends, strict=True):
            if step < end:
                start = max(start, warm)
                t = (step - start) / max(1, end - start)
                return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
        return min_lr_ratio

    return LambdaLR(optimizer, factor)


def step(optimizer: Optimizer, steps_per_epoch: int, max_epochs: int, step_epochs: int = 3, gamma: float = 0.1,
         warmup_epochs: float = 0.0) -> LRScheduler:
    """Multiply the LR by `gamma` every `step_epochs` epochs (after an optional warmup)."""
    warm = int(warmup_epochs * steps_per_epoch)
    return LambdaLR(optimizer, lambda s: _warmup(s, warm) * gamma ** (s // max(1, step_epochs * steps_per_epoch)))


def exponential(optimizer: Optimizer, steps_per_epoch: int, max_epochs: int, gamma: float = 0.9,
                warmup_epochs: float = 0.0) -> LRScheduler:
    """Multiply the LR by `gamma` per epoch, applied smoothly per step."""
    warm = int(warmup_epochs * steps_per_epoch)
    return LambdaLR(optimizer, lambda s: _warmup(s, warm) * gamma ** (s / max(1, steps_per_epoch)))


def constant(optimizer: Optimizer, steps_per_epoch: int, max_epochs: int, warmup_epochs: float = 0.0) -> LRScheduler:
    """A fixed LR (after an optional warmup)."""
    warm = int(warmup_epochs * steps_per_epoch)
    return LambdaLR(optimizer, lambda s: _warmup(s, warm))
