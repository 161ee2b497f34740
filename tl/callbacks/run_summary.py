"""What ran, in TensorBoard: the policy as text, the scenario decision, and the HParams tab."""

from __future__ import annotations

import json
from typing import Any

import pytorch_lightning as pl
from omegaconf import OmegaConf

from tl.callbacks.tensorboard import TensorBoardCallback, tensorboard_writer


class RunSummary(TensorBoardCallback):
    """`diag/run` (text: the scenario and the freeze/LR policy), `scenario/decision` (what scenario=auto measured
    and why it chose) and the HParams tab: the module's hyperparameters plus `hparams`, with `hp/*` metrics (best
    val acc, final losses, test acc) so runs compare side by side.

    Args:
        scenario: the resolved scenario name (conf: `${scenario.name}`).
        decision: the advisor's evidence (conf: `${oc.select:scenario.evidence,null}`), or None.
        notes: more facts to show beside the scenario.
        hparams: extra hyperparameters for the HParams tab (the module's own are always included).
    """

    def __init__(self, scenario: str | None = None, decision: dict | None = None, notes: dict | None = None,
                 hparams: dict | None = None):
        super().__init__()
        self.scenario, self.notes, self.hparams = scenario, dict(notes or {}), dict(hparams or {})
        self.decision = (OmegaConf.to_container(decision, resolve=True) if OmegaConf.is_config(decision)
                         else dict(decision) if decision else None)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        writer = tensorboard_writer(trainer)
        if writer is None or not self._enabled:
            return
        writer.add_text("diag/run", self._run_text(pl_module), trainer.global_step)
        if self.decision:
            writer.add_text("scenario/decision", f"```\n{json.dumps(self.decision, indent=2, default=str)}\n```", 0)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        writer = tensorboard_writer(trainer)
        if writer is not None and self._enabled:
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
        from tl.results import selection_checkpoint

        ckpt = selection_checkpoint(trainer)
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
