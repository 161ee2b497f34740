"""TensorBoard diagnostics for babysitting a run: is it learning, and learning sensibly?

Everything is sampled (every N optimizer steps, every K epochs, or once) and does nothing without a TensorBoard
logger, so the default settings cost a few percent of epoch time at most (scripts/bench_diagnostics.py).

What `Diagnostics` writes, by TensorBoard tab:
- Scalars `diag/update_ratio/<group>`: ||w_after - w_before|| / ||w_before|| across one optimizer step, per timm
  stage (`tl.models.finetune.stage_groups`). Rule of thumb (cs231n): about 1e-3 is healthy; 1e-2 and up the LR is
  too high and the weights thrash; 1e-5 and below the group barely learns (too low LR, or frozen by design).
  Beside them `diag/grad_norm/<group>`.
- Histograms `diag/activations/<group>` and `diag/gradients/<group>`: stage outputs (forward hooks that exist only
  on sampled steps) and parameter gradients. Dead (all-zero) or exploding activations show up here.
- Images: the first convolution's filters at the start and the end (`diag/first_layer_filters`), and one training
  batch after augmentation, denormalised with the module's preprocessing mean/std (`diag/train_batch`).
- Images `diag/val_confusion_matrix` every K epochs and at the last epoch, with scalars `diag/val_class_acc/<class>`.
- Text `diag/run`: the scenario and the freeze/LR policy; HParams tab: the run's hyperparameters with `hp/*` metrics
  (best val acc, final losses, test acc) so runs compare side by side. TensorBoard keeps the first HParams summary
  of a run, so the logger must not write its own (`default_hp_metric: false`, as conf/logger/tensorboard.yaml has).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
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


def _sample(t: torch.Tensor, max_values: int) -> torch.Tensor:
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


class Diagnostics(Callback):
    """Sampled training diagnostics for TensorBoard (see the module docstring for the tags).

    Args:
        scenario: the resolved scenario name, shown as text (conf: `${scenario.name}`).
        decision: what `scenario=auto` measured and why it chose (conf: `${oc.select:scenario.evidence,null}`),
            written as JSON text under `scenario/decision`.
        notes: more facts to show beside the scenario.
        update_ratio_every_n_steps: update ratios and gradient norms every N optimizer steps (0: off).
        histogram_every_n_steps: activation and gradient histograms every N optimizer steps (0: off).
        histogram_max_values: histograms are of a strided sample of at most this many values per tensor.
        images: first-layer filters at start and end, and one augmented training batch.
        num_sample_images: how many images of that batch to show.
        confusion_every_n_epochs: validation confusion matrix and per-class accuracy every K epochs and at the last
            epoch (0: off).
        hparams: extra hyperparameters for the HParams tab (the module's own are always included).
    """

    def __init__(self, scenario: str | None = None, decision: dict | None = None, notes: dict | None = None,
                 update_ratio_every_n_steps: int = 50,
                 histogram_every_n_steps: int = 200, histogram_max_values: int = 65536, images: bool = True,
                 num_sample_images: int = 32, confusion_every_n_epochs: int = 5, hparams: dict | None = None):
        self.scenario, self.notes, self.hparams = scenario, dict(notes or {}), dict(hparams or {})
        self.decision = (OmegaConf.to_container(decision, resolve=True) if OmegaConf.is_config(decision)
                         else dict(decision) if decision else None)
        self.update_every, self.hist_every = int(update_ratio_every_n_steps), int(histogram_every_n_steps)
        self.hist_max, self.images, self.num_sample_images = int(histogram_max_values), bool(images), num_sample_images
        self.confusion_every = int(confusion_every_n_epochs)
        self._enabled = False
        self._layout: list[tuple[str, list[str], nn.Module | None]] = []
        self._hooks: list[Any] = []
        self._before: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] | None = None
        self._hist_step = self._batch_shown = -1
        self._confmat = None
        self._logits: torch.Tensor | None = None

    # -- set-up -----------------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Decided alike on every rank (the loggers are), so collective metric syncs line up under DDP.
        self._enabled = any(isinstance(lg, TensorBoardLogger) for lg in trainer.loggers)
        if self._enabled and not isinstance(getattr(pl_module, "model", None), nn.Module):
            log.warning("Diagnostics: %s has no timm `model` attribute; diagnostics are off", type(pl_module).__name__)
            self._enabled = False
        if not self._enabled or self._layout:
            return
        self._layout = stage_layout(pl_module.model)
        num_classes = pl_module.hparams.get("num_classes")
        if self.confusion_every and num_classes:
            from torchmetrics.classification import MulticlassConfusionMatrix

            self._confmat = MulticlassConfusionMatrix(num_classes)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def _due(self, every: int, step: int) -> bool:
        return self._enabled and every > 0 and step % every == 0

    # -- once per run -----------------------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        writer = tensorboard_writer(trainer)
        if writer is None:
            return
        writer.add_text("diag/run", self._run_text(pl_module), trainer.global_step)
        if self.decision:
            import json

            writer.add_text("scenario/decision", f"```\n{json.dumps(self.decision, indent=2, default=str)}\n```", 0)
        if self.images:
            self._log_filters(writer, pl_module, trainer.global_step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        writer = tensorboard_writer(trainer)
        if writer is None:
            return
        if self.images:
            self._log_filters(writer, pl_module, trainer.global_step)
        self._log_hparams(writer, trainer, pl_module)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        writer = tensorboard_writer(trainer)
        if writer is not None:  # declared in the HParams summary at the end of fitting
            for key in ("test/acc", "test/loss"):
                if key in trainer.callback_metrics:
                    writer.add_scalar(f"hp/{key.replace('/', '_')}", float(trainer.callback_metrics[key]),
                                      trainer.global_step)

    def _run_text(self, pl_module: pl.LightningModule) -> str:
        hp = pl_module.hparams
        trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        total = sum(p.numel() for p in pl_module.parameters())
        rows = {"scenario": self.scenario, "pretrained": hp.get("pretrained"),
                "trainable params": f"{trainable:,} of {total:,}", "head lr": (hp.get("optimizer") or {}).get("lr"),
                **{k: hp.get(k) for k in ("strategy", "trainable_stages", "backbone_lr_mult", "layer_decay",
                                          "label_smoothing", "drop_rate", "drop_path_rate")},
                **self.notes}
        return "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows.items())

    def _log_filters(self, writer, pl_module: pl.LightningModule, step: int) -> None:
        from torchvision.utils import make_grid

        conv = next((m for m in pl_module.model.modules() if isinstance(m, nn.Conv2d) and m.in_channels == 3), None)
        if conv is None:
            return
        w = conv.weight.detach().float().cpu()[:64]
        # 3x3 kernels are unreadable at 1 pixel per weight: blow them up to about 24 pixels.
        w = nn.functional.interpolate(w, scale_factor=max(1, 24 // w.shape[-1]), mode="nearest")
        writer.add_image("diag/first_layer_filters", make_grid(w, nrow=8, normalize=True, scale_each=True, padding=2),
                         step)

    def _log_batch(self, writer, pl_module: pl.LightningModule, batch: Any, step: int) -> None:
        from torchvision.utils import make_grid

        x, y = batch[0][: self.num_sample_images].detach().float().cpu(), batch[1][: self.num_sample_images]
        pre = pl_module.hparams.get("preprocess") or {}
        if "mean" in pre and "std" in pre:
            x = x * torch.tensor(pre["std"]).view(1, -1, 1, 1) + torch.tensor(pre["mean"]).view(1, -1, 1, 1)
        writer.add_image("diag/train_batch", make_grid(x.clamp(0, 1), nrow=8, padding=2), step)
        names = pl_module.hparams.get("class_names")
        labels = [names[int(i)] if names else str(int(i)) for i in y]
        writer.add_text("diag/train_batch", "labels, row by row: " + ", ".join(labels), step)

    def _log_hparams(self, writer, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from torch.utils.tensorboard.summary import hparams

        params: dict[str, Any] = {"scenario": self.scenario}
        for key, value in {**pl_module.hparams, **self.hparams}.items():
            if key in ("class_names", "preprocess"):
                continue
            if isinstance(value, dict):  # optimizer / scheduler configs: one entry per field
                params.update({f"{key}.{k}": v for k, v in value.items()})
            else:
                params[key] = value
        params = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in params.items()}
        metrics = trainer.callback_metrics
        ckpt = trainer.checkpoint_callback
        best = getattr(ckpt, "best_model_score", None) if getattr(ckpt, "monitor", None) == "val/acc" else None
        values = {"hp/val_acc": best if best is not None else metrics.get("val/acc"),
                  "hp/val_loss": metrics.get("val/loss"),
                  "hp/train_loss": metrics.get("train/loss_epoch", metrics.get("train/loss")),
                  "hp/train_acc": metrics.get("train/acc")}
        # The summary declares the metric names; the HParams tab reads their latest scalar values.
        declared = {**values, "hp/test_acc": None, "hp/test_loss": None}
        for summary in hparams(params, {k: 0.0 for k in declared}):
            writer._get_file_writer().add_summary(summary)  # as Lightning's own TensorBoardLogger does
        for key, value in values.items():
            if value is not None:
                writer.add_scalar(key, float(value), trainer.global_step)

    # -- sampled every N steps --------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        writer = tensorboard_writer(trainer)
        if writer is None:
            return
        step = trainer.global_step
        images = isinstance(batch, (list, tuple)) and isinstance(batch[0], torch.Tensor) and batch[0].ndim == 4
        if self.images and self._batch_shown < 0 and images:  # images, not cached features
            self._batch_shown = step
            self._log_batch(writer, pl_module, batch, step)
        if self._due(self.hist_every, step) and self._hist_step != step:
            self._hist_step = step  # once per step, also under gradient accumulation
            for label, _, module in self._layout:
                if module is not None:
                    self._hooks.append(module.register_forward_hook(self._activation_hook(writer, label, step)))

    def _activation_hook(self, writer, label: str, step: int):
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor) and output.numel():
                writer.add_histogram(f"diag/activations/{label}", _sample(output, self.hist_max), step)
        return hook

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        writer = tensorboard_writer(trainer)
        step = trainer.global_step
        if writer is None or not (self._due(self.update_every, step) or self._hist_step == step):
            return
        params = dict(pl_module.model.named_parameters())
        # Names missing here (a strategy that re-wraps parameters, e.g. FSDP) are skipped rather than guessed.
        trainable = {label: [params[n] for n in names if n in params and params[n].requires_grad]
                     for label, names, _ in self._layout}
        if self._hist_step == step:
            for label, ps in trainable.items():
                grads = [p.grad.detach().flatten() for p in ps if p.grad is not None]
                if grads:
                    writer.add_histogram(f"diag/gradients/{label}", _sample(torch.cat(grads), self.hist_max), step)
        if self._due(self.update_every, step):
            # Copies of the trainable weights, compared after the step: the ratio sees what the optimizer really
            # did (momentum, Adam's scaling, weight decay, clipping), not just lr * grad.
            self._before = {label: [(p, p.detach().clone()) for p in ps] for label, ps in trainable.items() if ps}
            for label, ps in trainable.items():
                norms = [p.grad.detach().norm() for p in ps if p.grad is not None]
                if norms:
                    writer.add_scalar(f"diag/grad_norm/{label}", torch.stack(norms).norm().item(), step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._remove_hooks()
        if self._before is None:
            return
        writer = tensorboard_writer(trainer)
        step = trainer.global_step - 1  # the step the snapshot was taken at
        for label, pairs in self._before.items():
            delta = torch.stack([(p.detach() - old).norm() for p, old in pairs]).norm()
            weight = torch.stack([old.norm() for _, old in pairs]).norm()
            writer.add_scalar(f"diag/update_ratio/{label}", (delta / weight.clamp_min(1e-12)).item(), step)
        self._before = None

    # -- validation confusion matrix every K epochs -----------------------------------------------------------
    def _confusion_due(self, trainer: pl.Trainer) -> bool:
        epoch = trainer.current_epoch
        last = bool(trainer.max_epochs and trainer.max_epochs > 0) and epoch + 1 >= trainer.max_epochs
        return (self._confmat is not None and not trainer.sanity_checking
                and (self._due(self.confusion_every, epoch + 1) or last))

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._confusion_due(trainer):
            return
        # Moved here, not in setup: Lightning puts the module on its device only after the setup hooks.
        self._confmat = self._confmat.to(pl_module.device)
        self._confmat.reset()

        # The classifier's output is the logits whatever the module does around it: no second forward pass.
        def keep_logits(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            self._logits = output.detach().flatten(1)

        self._hooks.append(pl_module.model.get_classifier().register_forward_hook(keep_logits))

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._logits is not None and self._hooks:
            y = batch[1]
            if len(self._logits) == len(y):
                self._confmat.update(self._logits.argmax(dim=1), y)
            self._logits = None

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._confusion_due(trainer) or not self._hooks:
            return
        self._remove_hooks()
        matrix = self._confmat.compute()  # synced across processes: every rank gets here
        writer = tensorboard_writer(trainer)
        if writer is None:
            return
        step = trainer.global_step
        names = pl_module.hparams.get("class_names") or [str(i) for i in range(len(matrix))]
        per_class = matrix.diag().float() / matrix.sum(dim=1).clamp_min(1).float()
        for name, acc in zip(names, per_class.tolist(), strict=True):
            writer.add_scalar(f"diag/val_class_acc/{name}", acc, step)
        figure = self._confusion_figure(matrix, names, trainer)
        if figure is not None:
            writer.add_figure("diag/val_confusion_matrix", figure, step)

    def _confusion_figure(self, matrix: torch.Tensor, names: list[str], trainer: pl.Trainer):
        try:
            import matplotlib.pyplot as plt
        except ImportError:  # a dev extra: without it the per-class scalars still tell the story
            log.warning("Diagnostics: matplotlib is not installed; no confusion-matrix figure")
            return None

        n = len(names)
        size = min(24.0, max(5.0, 0.45 * n + 2))
        fig, ax = plt.subplots(figsize=(size, size))
        # Cell counts only where they stay readable; the colours carry the rest.
        self._confmat.plot(matrix.cpu(), ax=ax, add_text=n <= 20, labels=[str(c) for c in names], cmap="Blues")
        acc = matrix.diag().sum().item() / max(1, matrix.sum().item())
        ax.set_title(f"validation, epoch {trainer.current_epoch}: accuracy {acc:.3f}")
        return fig
