"""Learning-rate schedules, stepped every optimizer step so short runs still anneal smoothly.

Each function takes the optimizer and the run's length and returns a torch scheduler; conf/scheduler/ holds them as
`_partial_` targets, finished in `TransferModule.configure_optimizers`. Group LRs are scaled relatively, so the
backbone keeps its ratio to the head throughout.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import CosineAnnealingWarmRestarts, LambdaLR, LRScheduler


def epoch_steps(trainer) -> int:
    """Optimizer steps per epoch as the schedules count them (from the Trainer's own estimate)."""
    return max(1, int(trainer.estimated_stepping_batches) // max(1, int(trainer.max_epochs)))


def cycle_steps(trainer, cycles: int) -> int:
    """Optimizer steps in one warm-restart cycle; `warm_restarts` and the snapshot callback share this."""
    return max(1, epoch_steps(trainer) * int(trainer.max_epochs) // max(1, cycles))


def _warmup(step: int, warmup_steps: int) -> float:
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def cosine(optimizer: Optimizer, steps_per_epoch: int, max_epochs: int, warmup_epochs: float = 1.0,
           min_lr_ratio: float = 0.01) -> LRScheduler:
    """Linear warmup, then cosine decay to `min_lr_ratio` of each group's LR at the end of training."""
    total = max(1, steps_per_epoch * max_epochs)
    warm = min(int(warmup_epochs * steps_per_epoch), total - 1)

    def factor(step: int) -> float:
        if step < warm:
            return _warmup(step, warm)
        t = min(1.0, (step - warm) / max(1, total - warm))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

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


def warm_restarts(optimizer: Optimizer, steps_per_epoch: int, max_epochs: int, cycles: int = 1,
                  min_lr_ratio: float = 0.0) -> LRScheduler:
    """Cosine annealing with warm restarts (SGDR): `cycles` equal cycles over the run, stepped per step."""
    cycle_steps = max(1, steps_per_epoch * max_epochs // max(1, cycles))
    eta_min = min_lr_ratio * min(g["lr"] for g in optimizer.param_groups)
    return CosineAnnealingWarmRestarts(optimizer, T_0=cycle_steps, eta_min=eta_min)
