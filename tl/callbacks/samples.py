"""Pictures of what the network sees and starts from: first-layer filters and one augmented training batch."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from tl.callbacks.tensorboard import TensorBoardCallback, tensorboard_writer


class ImageSamples(TensorBoardCallback):
    """The first convolution's filters at the start and the end of training (`diag/first_layer_filters`), and the
    first training batch of images after augmentation, denormalised with the module's preprocessing mean/std, with
    its labels (`diag/train_batch`; skipped when the head trains on cached features).

    Args:
        num_images: how many images of that batch to show.
    """

    def __init__(self, num_images: int = 32):
        super().__init__()
        self.num_images = int(num_images)
        self._batch_shown = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log_filters(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log_filters(trainer, pl_module)

    def _log_filters(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from torchvision.utils import make_grid

        writer = tensorboard_writer(trainer)
        conv = next((m for m in pl_module.model.modules() if isinstance(m, nn.Conv2d) and m.in_channels == 3), None)
        if writer is None or not self._enabled or conv is None:
            return
        w = conv.weight.detach().float().cpu()[:64]
        # 3x3 kernels are unreadable at 1 pixel per weight: blow them up to about 24 pixels.
        w = nn.functional.interpolate(w, scale_factor=max(1, 24 // w.shape[-1]), mode="nearest")
        writer.add_image("diag/first_layer_filters", make_grid(w, nrow=8, normalize=True, scale_each=True, padding=2),
                         trainer.global_step)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        from torchvision.utils import make_grid

        writer = tensorboard_writer(trainer)
        images = isinstance(batch, (list, tuple)) and isinstance(batch[0], torch.Tensor) and batch[0].ndim == 4
        if writer is None or not self._enabled or self._batch_shown or not images:  # images, not cached features
            return
        self._batch_shown = True
        x, y = batch[0][: self.num_images].detach().float().cpu(), batch[1][: self.num_images]
        pre = pl_module.hparams.get("preprocess") or {}
        if "mean" in pre and "std" in pre:
            x = x * torch.tensor(pre["std"]).view(1, -1, 1, 1) + torch.tensor(pre["mean"]).view(1, -1, 1, 1)
        step = trainer.global_step
        writer.add_image("diag/train_batch", make_grid(x.clamp(0, 1), nrow=8, padding=2), step)
        names = pl_module.hparams.get("class_names")
        labels = [names[int(i)] if names else str(int(i)) for i in y]
        writer.add_text("diag/train_batch", "labels, row by row: " + ", ".join(labels), step)
