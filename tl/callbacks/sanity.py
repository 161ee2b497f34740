"""Sanity checks a person should not have to remember: the initial loss, and whether the model can overfit at all.

- `InitialLossCheck` (on by default): a new head initialised small predicts the uniform distribution, so the first
  training batch's cross-entropy is about ln(num_classes). Far from it, something is wrong before any learning.
- `OverfitCheck` (with `+debug=overfit`): on one or two batches with regularisation off, a healthy model and
  pipeline drive the training loss to about zero; if it cannot, no amount of data will help.

Both report what they found in `self.results` (`ReportingCallback`: flat keys, collected into results.json) and
log it as scalars to every logger and as text to TensorBoard.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any

import pytorch_lightning as pl
import torch

from tl.callbacks.reporting import ReportingCallback
from tl.callbacks.tensorboard import tensorboard_writer

log = logging.getLogger(__name__)


class InitialLossWarning(UserWarning):
    """The first training loss is far from ln(num_classes): the run starts from a bad place."""


class OverfitWarning(UserWarning):
    """The model did not drive the training loss to about zero on a tiny subset."""


def _loss_of(outputs: Any, trainer: pl.Trainer) -> torch.Tensor | None:
    """The training step's loss; Lightning hands it over divided by the gradient-accumulation count."""
    loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
    return loss.detach().float() * trainer.accumulate_grad_batches if isinstance(loss, torch.Tensor) else None


def _report(trainer: pl.Trainer, ok: bool, message: str, warning: type[Warning]) -> None:
    """Log a check's verdict once (rank zero): info when it passed, a warning (logged and raised) when not."""
    if not trainer.is_global_zero:
        return
    if ok:
        log.info(message)
    else:
        log.warning(message)
        warnings.warn(message, warning, stacklevel=3)


def _log_everywhere(trainer: pl.Trainer, metrics: dict[str, float], text_tag: str, text: str) -> None:
    """Scalars to every logger (TensorBoard, CSV), the explanation as TensorBoard text."""
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)
    writer = tensorboard_writer(trainer)
    if writer is not None:
        writer.add_text(text_tag, text, trainer.global_step)


class InitialLossCheck(ReportingCallback):
    """Compare the first training batch's loss with ln(num_classes) and warn when it is far off.

    Near-zero logits give the uniform prediction, whose cross-entropy is exactly ln C whatever the label, with label
    smoothing too (the smoothed target still sums to one). The check costs nothing: it reads the loss the first
    training step computed anyway (before the first update) and the batch's input statistics. Resumed runs are
    skipped: their first loss says nothing about the initialisation.

    Args:
        tolerance: warn when |loss - ln C| > tolerance * ln C (0.25: 1.04..1.73 for 4 classes).
    """

    def __init__(self, tolerance: float = 0.25):
        self.tolerance = float(tolerance)
        super().__init__()
        self._pending = False
        self._inputs: dict[str, float] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A head fitted as a linear probe (finetune.head_init=probe) is meant to start far below ln C.
        self._pending = trainer.global_step == 0 and getattr(pl_module, "head_init", None) is None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        x = batch[0] if isinstance(batch, (list, tuple)) else None
        if self._pending and isinstance(x, torch.Tensor) and x.ndim == 4:  # images, not cached features
            x = x.detach().float()
            self._inputs = {"mean": x.mean().item(), "std": x.std().item()}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._pending:
            return
        self._pending = False
        loss = _loss_of(outputs, trainer)
        num_classes = pl_module.hparams.get("num_classes") or getattr(trainer.datamodule, "num_classes", None)
        if loss is None or not num_classes or num_classes < 2:
            return
        loss = float(trainer.strategy.reduce(loss, reduce_op="mean"))  # the same verdict on every rank
        expected = math.log(num_classes)
        ok = math.isfinite(loss) and abs(loss - expected) <= self.tolerance * expected
        self.results = {"sanity/initial_loss": loss, "sanity/expected_initial_loss": expected,
                        "sanity/initial_loss_ok": ok}
        message = self._message(loss, expected, num_classes, ok, pl_module)
        _log_everywhere(trainer, {"sanity/initial_loss": loss, "sanity/expected_initial_loss": expected},
                        "sanity/initial_loss", message)
        _report(trainer, ok, message, InitialLossWarning)

    def _message(self, loss: float, expected: float, num_classes: int, ok: bool, pl_module: pl.LightningModule) -> str:
        head = (f"initial loss {loss:.3f} vs ln({num_classes}) = {expected:.3f} "
                f"(tolerance {self.tolerance:.0%})")
        if ok:
            return f"{head}: the new head starts near the uniform prediction, as it should."
        stats = (f"inputs mean {self._inputs['mean']:.2f}, std {self._inputs['std']:.2f}" if self._inputs
                 else "inputs not inspected")
        std = pl_module.hparams.get("head_init_std")
        unnormalised = bool(self._inputs) and (abs(self._inputs["mean"]) > 1.0 or not 0.3 < self._inputs["std"] < 3.0)
        input_cause = (f"inputs {'look' if unnormalised else 'may be'} unnormalised ({stats}; inputs normalised with "
                       "the backbone's mean/std have mean ~0 and std ~1)")
        causes = (
            f"too high: {input_cause + ', or ' if unnormalised else ''}the head's initial weights are too large "
            f"(model.head_init_std={std}; ~0.01 gives near-zero logits), or labels do not match num_classes "
            f"(classes mixed up){'' if unnormalised else ', or ' + input_cause}"
            if not math.isfinite(loss) or loss > expected else
            "too low: the model already knows these labels (a trained head loaded from a checkpoint?), or the "
            "labels leak into the inputs"
        )
        return f"{head}: {causes}."


class OverfitCheck(ReportingCallback):
    """Report at the end of training whether the training loss reached about zero (`+debug=overfit`).

    The loss is averaged over each epoch's training batches from the values the steps return, so it does not depend
    on what the module logs.

    Args:
        threshold: the last epoch's mean training loss must fall below this.
    """

    def __init__(self, threshold: float = 0.05):
        self.threshold = float(threshold)
        super().__init__()
        self._sum: torch.Tensor | None = None
        self._count = 0
        self.epoch_losses: list[float] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sum, self._count = None, 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = _loss_of(outputs, trainer)
        if loss is not None:  # kept as a tensor: no device sync per step
            self._sum = loss if self._sum is None else self._sum + loss
            self._count += 1

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._count:
            self.epoch_losses.append(float(trainer.strategy.reduce(self._sum / self._count, reduce_op="mean")))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.epoch_losses:
            return
        final, first = self.epoch_losses[-1], self.epoch_losses[0]
        reached = math.isfinite(final) and final < self.threshold
        self.results = {"overfit/final_train_loss": final, "overfit/first_train_loss": first,
                        "overfit/reached": reached, "overfit/epochs": len(self.epoch_losses)}
        if reached:
            message = (f"overfit check passed: training loss {first:.3f} -> {final:.4f} (< {self.threshold}) in "
                       f"{len(self.epoch_losses)} epochs; model, labels and optimiser can fit data.")
        else:
            message = (f"overfit check FAILED: training loss {first:.3f} -> {final:.4f}, not below {self.threshold} "
                       f"after {len(self.epoch_losses)} epochs on a tiny subset. Likely causes: learning rate too "
                       "low/high, too few epochs, most of the network frozen (finetune.strategy), regularisation "
                       "still on, labels that do not match the images, or a bug in the loss or data pipeline.")
        _log_everywhere(trainer, {"overfit/final_train_loss": final, "overfit/reached": float(reached)},
                        "overfit/report", message)
        _report(trainer, reached, message, OverfitWarning)
