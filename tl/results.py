"""results.json: one function gathers a run's results from the objects that hold them.

- the config: the policy that ran (scenario, strategy, model, augmentation, seed) and, for `scenario=auto`, the
  evidence behind the choice (`scenario.evidence`, set by `tl.scenarios.resolve`);
- the trainer: epochs, steps, the best checkpoint and its validation score;
- the module: parameter counts;
- the data module: class count, split sizes, skipped files, the split audit (`tl.data.audit`);
- the callbacks that report findings (`ReportingCallback`: sanity checks);
- `extra`: what the run measured outside those objects (test metrics, fit time, ensemble scores, export folder).
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from tl.callbacks.checkpoint import PatientEarlyStopping
from tl.callbacks.reporting import ReportingCallback


def _plain(value: Any) -> Any:
    """Floats for tensors and numbers, so results.json holds plain JSON."""
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    return value


def selection_checkpoint(trainer: pl.Trainer):
    """The checkpoint callback that selects (and keeps) the best weights: Lightning's `trainer.checkpoint_callback`
    is the first checkpoint callback of any kind, which is tl's InterruptCheckpoint when both
    `callbacks.model_checkpoint` and `callbacks.last_checkpoint` are null. None: no weights are selected (the last
    ones are tested and exported)."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    return next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)), None)


def selected_val_acc(trainer: pl.Trainer) -> float | None:
    """The validation accuracy the checkpoint callback selected the best checkpoint by (None: it monitors another
    metric, or has not scored one)."""
    ckpt = selection_checkpoint(trainer)
    if ckpt is None or ckpt.monitor != "val/acc" or ckpt.best_model_score is None:
        return None
    return float(ckpt.best_model_score)


def collect_results(cfg: DictConfig, trainer: pl.Trainer, module: pl.LightningModule, datamodule, feature_cache: bool,
                    extra: dict[str, Any]) -> dict[str, Any]:
    """The run's results as flat JSON-ready keys (the interface contract's keys among them)."""
    ckpt = selection_checkpoint(trainer)
    best_score = ckpt.best_model_score if ckpt is not None else None
    monitor = ckpt.monitor if ckpt is not None else None
    if (extra.get("delivered") or {}).get("model") == "ensemble" and "ensemble/val/acc" in extra:
        val_acc = extra["ensemble/val/acc"]  # the delivered model's
    elif selected_val_acc(trainer) is not None:
        val_acc = selected_val_acc(trainer)
    else:  # the tested weights' own validation accuracy (tl.report), else the last validation's
        val_acc = extra.get("val/acc", trainer.callback_metrics.get("val/acc", float("nan")))
    results: dict[str, Any] = {k: _plain(v) for k, v in extra.items()}
    if best_score is not None and monitor:
        results["model_selection"] = {"monitor": monitor, "best": float(best_score)}
    results.update({
        "val/acc": float(val_acc),
        "scenario": cfg.scenario.name,
        "strategy": cfg.finetune.strategy,
        "model": cfg.model.name,
        "augment": cfg.augment.name,
        "feature_cache": feature_cache,
        "num_classes": datamodule.num_classes,
        "n_train": len(datamodule.split_indices["train"]),
        "n_val": len(datamodule.split_indices["val"]),
        "n_test": len(datamodule.split_indices["test"]),
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "trainable_params": sum(p.numel() for p in module.parameters() if p.requires_grad),
        "total_params": sum(p.numel() for p in module.parameters()),
        "seed": cfg.seed,
        "best_ckpt": (ckpt.best_model_path or None) if ckpt is not None else None,
        "run_dir": str(cfg.paths.output_dir),
    })
    for callback in trainer.callbacks:
        if isinstance(callback, ReportingCallback):
            results.update(callback.results)
        elif isinstance(callback, PatientEarlyStopping):
            results.update(callback.report)
    evidence = cfg.scenario.get("evidence")
    if evidence is not None:
        results["scenario_evidence"] = OmegaConf.to_container(evidence, resolve=True)
    if hasattr(datamodule, "balance_report"):
        results.update(datamodule.balance_report())  # imbalance_ratio, balance
    if getattr(datamodule, "audit", None):
        results["data_audit"] = datamodule.audit
    unreadable = getattr(datamodule, "unreadable", None)
    if unreadable is not None and unreadable.value:
        results["unreadable_during_run"] = unreadable.value  # files that failed after the scan, skipped
    if datamodule.skipped_files:
        results["skipped_files"] = {"count": len(datamodule.skipped_files), "first": datamodule.skipped_files[:10]}
    if getattr(datamodule, "ignored_files", None):
        results["ignored_files"] = {"count": len(datamodule.ignored_files), "first": datamodule.ignored_files[:10]}
    return results
