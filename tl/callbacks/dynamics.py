"""Training dynamics per backbone stage, sampled: update ratios with gradient norms, and histograms.

See tl/callbacks/tensorboard.py for the tags and how to read them.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import grad_norm
from torch import nn

from tl.callbacks.tensorboard import TensorBoardCallback, sample_values, stage_layout, tensorboard_writer


def _trainable_by_stage(pl_module: pl.LightningModule, layout: list) -> dict[str, list[tuple[str, nn.Parameter]]]:
    params = dict(pl_module.model.named_parameters())
    # Names missing here (a strategy that re-wraps parameters, e.g. FSDP) are skipped rather than guessed.
    return {label: [(n, params[n]) for n in names if n in params and params[n].requires_grad]
            for label, names, _ in layout}


class UpdateRatios(TensorBoardCallback):
    """Every `every_n_steps` optimizer steps: per stage, the weight update ratio across the step and the gradient
    norm (`diag/update_ratio/<stage>`, `diag/grad_norm/<stage>`).

    The ratio compares copies of the trainable weights taken before the step with the weights after it, so it sees
    what the optimizer really did (momentum, Adam's scaling, weight decay, clipping), not just lr * grad.
    """

    def __init__(self, every_n_steps: int = 50):
        super().__init__()
        self.every = int(every_n_steps)
        self._layout: list = []
        self._before: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self._enabled and not self._layout:
            self._layout = stage_layout(pl_module.model)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        writer = tensorboard_writer(trainer)
        step = trainer.global_step
        if writer is None or not self._due(self.every, step):
            return
        trainable = _trainable_by_stage(pl_module, self._layout)
        norms = grad_norm(pl_module.model, norm_type=2)  # Lightning's per-parameter norms: "grad_2.0_norm/<name>"
        for label, named in trainable.items():
            squares = [norms[f"grad_2.0_norm/{n}"] ** 2 for n, _ in named if f"grad_2.0_norm/{n}" in norms]
            if squares:
                writer.add_scalar(f"diag/grad_norm/{label}", torch.stack(squares).sum().sqrt().item(), step)
        self._before = {label: [(p, p.detach().clone()) for _, p in named] for label, named in trainable.items()
                        if named}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._before is None:
            return
        writer = tensorboard_writer(trainer)
        step = trainer.global_step - 1  # the step the copies were taken at
        for label, pairs in self._before.items():
            delta = torch.stack([(p.detach() - old).norm() for p, old in pairs]).norm()
            weight = torch.stack([old.norm() for _, old in pairs]).norm()
            writer.add_scalar(f"diag/update_ratio/{label}", (delta / weight.clamp_min(1e-12)).item(), step)
        self._before = None


class StageHistograms(TensorBoardCallback):
    """Every `every_n_steps` optimizer steps: histograms of each stage's output (`diag/activations/<stage>`, forward
    hooks that exist only on sampled steps) and of its parameters' gradients (`diag/gradients/<stage>`), each a
    strided sample of at most `max_values` values."""

    def __init__(self, every_n_steps: int = 200, max_values: int = 65536):
        super().__init__()
        self.every, self.max_values = int(every_n_steps), int(max_values)
        self._layout: list = []
        self._hooks: list[Any] = []
        self._step = -1

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self._enabled and not self._layout:
            self._layout = stage_layout(pl_module.model)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        writer = tensorboard_writer(trainer)
        step = trainer.global_step
        if writer is None or not self._due(self.every, step) or self._step == step:
            return
        self._step = step  # once per step, also under gradient accumulation
        for label, _, module in self._layout:
            if module is not None:
                self._hooks.append(module.register_forward_hook(self._activation_hook(writer, label, step)))

    def _activation_hook(self, writer, label: str, step: int):
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor) and output.numel():
                writer.add_histogram(f"diag/activations/{label}", sample_values(output, self.max_values), step)
        return hook

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        writer = tensorboard_writer(trainer)
        step = trainer.global_step
        if writer is None or self._step != step:
            return
        for label, named in _trainable_by_stage(pl_module, self._layout).items():
            grads = [p.grad.detach().flatten() for _, p in named if p.grad is not None]
            if grads:
                writer.add_histogram(f"diag/gradients/{label}", sample_values(torch.cat(grads), self.max_values), step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._remove_hooks()
