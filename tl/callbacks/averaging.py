"""Weight averaging (EMA and SWA) on Lightning's `WeightAveraging`, which swaps the average in for validation, saves
it as the checkpoint's `state_dict` and copies it into the model when training ends.

Two things are added for fine-tuning runs that are short (hundreds of steps, not hundreds of thousands):
- nothing is swapped, saved or copied until the average has seen an update (Lightning's average starts as a copy of
  the initial weights, which would otherwise be validated and checkpointed as if trained);
- EMA warms its decay up as timm's ModelEmaV3 does, decay_t = min(decay, (1 + t) / (10 + t)), so early steps are
  not dominated by the initial weights.
Lightning's own `StochasticWeightAveraging` replaces the LR schedule with a single LR for every param group, which
would undo the backbone's lowered LR; `SWA` here keeps tl's schedule and groups.
"""

from __future__ import annotations

import torch
from pytorch_lightning.callbacks import WeightAveraging

from tl.errors import TLError


class _AfterFirstUpdate(WeightAveraging):
    """WeightAveraging that stays out of the way until the average holds at least one update."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._trainer = trainer

    def _has_average(self) -> bool:
        return self._average_model is not None and int(self._average_model.n_averaged) > 0

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._swapped = self._has_average()
        if self._swapped:
            super().on_validation_epoch_start(trainer, pl_module)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if getattr(self, "_swapped", False):
            super().on_validation_epoch_end(trainer, pl_module)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self._has_average():
            super().on_save_checkpoint(trainer, pl_module, checkpoint)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._has_average():
            super().on_train_end(trainer, pl_module)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        # Only a resumed fit restores the average and the raw weights. Testing a checkpoint after fit tests what it
        # holds as `state_dict` (the average); Lightning's hook would put the raw weights back in its place.
        if trainer.state.fn == "fit":
            super().on_load_checkpoint(trainer, pl_module, checkpoint)


class EMA(_AfterFirstUpdate):
    """Exponential moving average of weights and buffers, updated every step from `start_epoch` on.

    Args:
        decay: the decay once warmed up.
        start_epoch: first epoch whose steps update the average.
    """

    def __init__(self, decay: float = 0.999, start_epoch: int = 0, **kwargs):
        if not 0.0 < decay < 1.0:
            raise TLError(f"weight_averaging.decay={decay}: use a value in (0, 1), e.g. 0.999")

        def ema(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
            d = torch.clamp((1.0 + num_averaged) / (10.0 + num_averaged), max=decay).to(averaged.dtype)
            return averaged * d + current * (1.0 - d)

        super().__init__(avg_fn=ema, **kwargs)
        self.decay, self.start_epoch = decay, int(start_epoch)

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and self._trainer.current_epoch >= self.start_epoch


class SWA(_AfterFirstUpdate):
    """Equal-weight average of the weights at every step of the last `1 - start_fraction` of the epochs.

    Args:
        start_fraction: fraction of the epochs after which averaging starts.
    """

    def __init__(self, start_fraction: float = 0.75, **kwargs):
        if not 0.0 <= start_fraction < 1.0:
            raise TLError(f"weight_averaging.start_fraction={start_fraction}: use a fraction in [0, 1)")
        super().__init__(**kwargs)
        self.start_fraction = start_fraction

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        start = int(self.start_fraction * (self._trainer.max_epochs or 1))
        return step_idx is not None and self._trainer.current_epoch >= start
