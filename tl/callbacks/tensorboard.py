"""TensorBoard diagnostics for babysitting a run: is it learning, and learning sensibly? One callback per concern.

Everything is sampled (every N optimizer steps, every K epochs, or once) and does nothing without a TensorBoard
logger, so the default settings cost a few percent of epoch time at most (scripts/bench_diagnostics.py). What each
writes, by TensorBoard tab:
- `UpdateRatios` (tl/callbacks/dynamics.py), scalars `diag/update_ratio/<group>`: ||w_after - w_before|| /
  ||w_before|| across one optimizer step, per timm stage (`tl.models.finetune.stage_groups`). Rule of thumb
  (cs231n): about 1e-3 is healthy; 1e-2 and up the LR is too high and the weights thrash; 1e-5 and below the group
  barely learns (too low LR, or frozen by design). Beside them `diag/grad_norm/<group>`.
- `StageHistograms` (tl/callbacks/dynamics.py), histograms `diag/activations/<group>` and `diag/gradients/<group>`:
  stage outputs (forward hooks that exist only on sampled steps) and parameter gradients. Dead (all-zero) or
  exploding activations show up here.
- `ImageSamples` (tl/callbacks/samples.py), images: the first convolution's filters at the start and the end
  (`diag/first_layer_filters`), and one training batch after augmentation, denormalised with the module's
  preprocessing mean/std (`diag/train_batch`).
- `ValConfusion` (tl/callbacks/confusion.py), image `diag/val_confusion_matrix` every K epochs and at the last
  epoch, with scalars `diag/val_class_acc/<class>`.
- `RunSummary` (tl/callbacks/run_summary.py), text `diag/run`: the scenario and the freeze/LR policy, and
  `scenario/decision` (what scenario=auto measured); HParams tab: the run's hyperparameters with `hp/*` metrics (best
  val acc, final losses, test acc) so runs compare side by side. TensorBoard keeps the first HParams summary of a
  run, so the logger must not write its own (`default_hp_metric: false`, as conf/logger/tensorboard.yaml has).

This module holds what they share: the writer, the stage layout, sampling.
"""

from __future__ import annotations

import logging
import math

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn

log = logging.getLogger(__name__)


def tensorboard_writer(trainer: pl.Trainer):
    """The SummaryWriter of the trainer's TensorBoard logger on rank zero, else None."""
    if not trainer.is_global_zero:
        return None
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def sample_values(t: torch.Tensor, max_values: int) -> torch.Tensor:
    """A strided subset of at most `max_values` elements, on the CPU: histograms of millions of values cost time."""
    flat = t.detach().flatten()
    if flat.numel() > max_values:
        flat = flat[:: math.ceil(flat.numel() / max_values)]
    return flat.float().cpu()


def stage_layout(model: nn.Module) -> list[tuple[str, list[str], nn.Module | None]]:
    """(label, parameter names, module whose output ends the stage) per stage group, stem first, head last.

    The module is the deepest one holding every parameter of the group (e.g. `blocks.3`); a group spread over
    siblings (stem = conv + bn) ends at the module of its last parameter.
    """
    from tl.models.finetune import stage_groups

    groups = stage_groups(model)
    layout = []
    for i, names in enumerate(groups):
        parents = [n.rsplit(".", 1)[0] if "." in n else "" for n in names]
        common = parents[0].split(".") if parents[0] else []
        for p in parents[1:]:
            parts = p.split(".") if p else []
            k = 0
            while k < min(len(common), len(parts)) and common[k] == parts[k]:
                k += 1
            common = common[:k]
        path = ".".join(common) or parents[-1]
        module = model.get_submodule(path) if path else None
        label = "stem" if i == 0 else "head" if i == len(groups) - 1 else ".".join(
            (common or parents[0].split("."))[:2]) or names[0]
        layout.append((f"{i:02d}_{label}", names, module))
    return layout


class TensorBoardCallback(Callback):
    """A diagnostic that is on only when the run has a TensorBoard logger and the module a timm `model`.

    Decided alike on every rank (the loggers are), so collective metric syncs line up under DDP; only rank zero
    writes (`tensorboard_writer`).
    """

    def __init__(self) -> None:
        self._enabled = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._enabled = any(isinstance(lg, TensorBoardLogger) for lg in trainer.loggers)
        if self._enabled and not isinstance(getattr(pl_module, "model", None), nn.Module):
            log.warning("%s: %s has no timm `model` attribute; it is off", type(self).__name__,
                        type(pl_module).__name__)
            self._enabled = False

    def _due(self, every: int, step: int) -> bool:
        return self._enabled and every > 0 and step % every == 0
