"""The validation confusion matrix and per-class accuracy, every K epochs and at the last."""

from __future__ import annotations

import logging
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from tl.callbacks.tensorboard import TensorBoardCallback, tensorboard_writer

log = logging.getLogger(__name__)


class ValConfusion(TensorBoardCallback):
    """`diag/val_confusion_matrix` (a figure) and `diag/val_class_acc/<class>` every `every_n_epochs` epochs and at
    the last epoch (0: off). The logits come from a hook on the classifier during the normal validation pass: no
    second forward pass. The matrix is synced across processes under DDP."""

    def __init__(self, every_n_epochs: int = 5):
        super().__init__()
        self.every = int(every_n_epochs)
        self._confmat = None
        self._hook = None
        self._logits: torch.Tensor | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        num_classes = pl_module.hparams.get("num_classes")
        if self._enabled and self.every and num_classes and self._confmat is None:
            from torchmetrics.classification import MulticlassConfusionMatrix

            self._confmat = MulticlassConfusionMatrix(num_classes)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hook()

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _due(self, trainer: pl.Trainer) -> bool:
        epoch = trainer.current_epoch
        last = bool(trainer.max_epochs and trainer.max_epochs > 0) and epoch + 1 >= trainer.max_epochs
        return (self._confmat is not None and not trainer.sanity_checking
                and (super()._due(self.every, epoch + 1) or last))

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._due(trainer):
            return
        # Moved here, not in setup: Lightning puts the module on its device only after the setup hooks.
        self._confmat = self._confmat.to(pl_module.device)
        self._confmat.reset()

        def keep_logits(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            self._logits = output.detach().flatten(1)

        self._hook = pl_module.model.get_classifier().register_forward_hook(keep_logits)

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._logits is not None and self._hook is not None:
            y = batch[1]
            if len(self._logits) == len(y):
                self._confmat.update(self._logits.argmax(dim=1), y)
            self._logits = None

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._due(trainer) or self._hook is None:
            return
        self._remove_hook()
        matrix = self._confmat.compute()  # synced across processes: every rank gets here
        writer = tensorboard_writer(trainer)
        if writer is None:
            return
        step = trainer.global_step
        names = pl_module.hparams.get("class_names") or [str(i) for i in range(len(matrix))]
        per_class = matrix.diag().float() / matrix.sum(dim=1).clamp_min(1).float()
        for name, acc in zip(names, per_class.tolist(), strict=True):
            writer.add_scalar(f"diag/val_class_acc/{name}", acc, step)
        writer.add_figure("diag/val_confusion_matrix", self._figure(matrix, names, trainer), step)

    def _figure(self, matrix: torch.Tensor, names: list[str], trainer: pl.Trainer):
        from tl.utils import pyplot

        plt = pyplot()

        n = len(names)
        size = min(24.0, max(5.0, 0.45 * n + 2))
        fig, ax = plt.subplots(figsize=(size, size))
        # Cell counts only where they stay readable; the colours carry the rest.
        self._confmat.plot(matrix.cpu(), ax=ax, add_text=n <= 20, labels=[str(c) for c in names], cmap="Blues")
        acc = matrix.diag().sum().item() / max(1, matrix.sum().item())
        ax.set_title(f"validation, epoch {trainer.current_epoch}: accuracy {acc:.3f}")
        return fig
