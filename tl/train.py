"""`python -m tl.train`: fine-tune a pretrained backbone on an image dataset.

1. seed, check the output directory, print and save the config;
2. the data module (source, splits, subset, transforms from the backbone's preprocessing);
3. the LightningModule (backbone + new head, freeze policy, optimizer and schedule);
4. callbacks, loggers and the Trainer from the config;
5. fit, test with the best checkpoint, write results.json.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from hydra.utils import get_class
from omegaconf import DictConfig
from pytorch_lightning.callbacks import WeightAveraging

from tl.callbacks.snapshots import SnapshotEnsemble
from tl.callbacks.unfreezing import ScheduledUnfreezing
from tl.checks import validate
from tl.cli import launch
from tl.data.features import FeatureCache, FeatureDataModule
from tl.data.transforms import backbone_preprocess
from tl.errors import TLError
from tl.evaluate import evaluate_members
from tl.export import export_model
from tl.inference import load_classifier
from tl.models.backbone import classifier_names
from tl.models.finetune import STAGED
from tl.scenarios import recompose, resolve_auto
from tl.utils import (
    build,
    check_required,
    ensure_writable,
    print_config,
    print_results,
    to_plain,
    user_errors,
    write_json,
)

log = logging.getLogger("tl.train")


def data_image_size(cfg: DictConfig) -> int | None:
    """The training resolution: `data.small_data_image_size` under a small-data preset when the dataset sets one
    (few images make a larger, nearer-to-pretraining resolution affordable), else `data.image_size`."""
    small = cfg.data.get("small_data_image_size")
    if small is not None and str(cfg.scenario.name).startswith("small_"):
        return int(small)
    return cfg.data.get("image_size")


def build_datamodule(cfg: DictConfig):
    """The data module for `cfg.data`, preprocessing as the backbone `cfg.model.name` expects."""
    preprocess = backbone_preprocess(cfg.model.name)
    data = to_plain(cfg.data)
    data.pop("small_data_image_size", None)
    data["image_size"] = data_image_size(cfg)
    return build(data, preprocess=preprocess, augment=to_plain(cfg.augment), seed=cfg.seed, _convert_="all")


def build_module(cfg: DictConfig, datamodule, pretrained: str | None = None):
    """The LightningModule for `cfg`, sized to the data module's classes."""
    model_cfg = to_plain(cfg.model)
    cls = get_class(model_cfg.pop("_target_"))
    if pretrained is not None:
        model_cfg["pretrained"] = pretrained
    scheduler = to_plain(cfg.get("scheduler"))
    if snapshot_cycles(cfg):  # snapshots need the LR at its minimum at every cycle's end: warm restarts
        scheduler = {"_target_": "tl.models.schedules.warm_restarts", "_partial_": True,
                     "cycles": snapshot_cycles(cfg), "min_lr_ratio": float(cfg.snapshots.min_lr_ratio),
                     "first_cycle": cfg.snapshots.get("first_cycle")}
    mixup = {k: cfg.augment[k] for k in ("mixup_alpha", "cutmix_alpha", "prob", "switch_prob") if k in cfg.augment}
    return cls(**model_cfg, **to_plain(cfg.finetune), num_classes=datamodule.num_classes,
               class_names=datamodule.classes, preprocess=datamodule.preprocess, mixup=mixup or None,
               optimizer=to_plain(cfg.optimizer), scheduler=scheduler)


def snapshot_cycles(cfg: DictConfig) -> int:
    cycles = int(cfg.get("snapshots", {}).get("cycles") or 0)
    if cycles < 0:
        raise TLError(f"snapshots.cycles={cycles}: use 0 (off) or a positive number of cycles")
    return cycles


def build_trainer(cfg: DictConfig, **kwargs: Any) -> pl.Trainer:
    from pytorch_lightning.callbacks import LearningRateMonitor, ProgressBar

    callbacks = [build(c) for c in (cfg.get("callbacks") or {}).values() if c is not None and "_target_" in c]
    loggers = [build(c) for c in (cfg.get("logger") or {}).values() if c is not None and "_target_" in c]
    averaging = cfg.get("weight_averaging")
    if averaging and "_target_" in averaging:
        callbacks.append(build(averaging))
    if cfg.finetune.strategy in STAGED:  # gradual / lp_ft: the backbone opens on a schedule
        callbacks.append(ScheduledUnfreezing())
    if snapshot_cycles(cfg):
        snapshot_dir = Path(cfg.paths.output_dir) / "checkpoints" / "snapshots"
        callbacks.append(SnapshotEnsemble(snapshot_cycles(cfg), snapshot_dir, cfg.snapshots.get("first_cycle")))
    if cfg.trainer.get("enable_progress_bar") is False:  # a progress-bar callback would contradict the flag
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    if not loggers:  # nothing to write learning rates to
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    return build(cfg.trainer, callbacks=callbacks, logger=loggers or False, **kwargs)


def feature_cache_applies(cfg: DictConfig) -> bool:
    """Cached features are exact only for a frozen backbone fed a deterministic transform."""
    return bool(cfg.get("cache_features", True)) and cfg.finetune.strategy == "linear_probe" \
        and cfg.augment.get("name", "none") == "none"


def snapshot_ensemble_scores(snapshots: list[dict], last: int | None, datamodule, trainer: pl.Trainer) -> dict:
    """Test accuracy of each snapshot and of the mean softmax of the last `last` (all when None)."""
    members = snapshots[-last:] if last else snapshots
    metrics, _ = evaluate_members([load_classifier(s["path"]) for s in members], datamodule)
    member_acc = metrics.get("member_acc", [metrics["test/acc"]])
    out = {"ensemble/test/acc": metrics["test/acc"], "ensemble/size": len(members),
           "snapshots": [{**s, "test/acc": acc} for s, acc in zip(members, member_acc, strict=True)]}
    if trainer.logger is not None:
        trainer.logger.log_metrics({"ensemble/test/acc": out["ensemble/test/acc"],
                                    "ensemble/best_member_test_acc": max(member_acc)}, step=trainer.global_step)
    return out


def log_text(trainer: pl.Trainer, tag: str, payload: dict) -> None:
    """Put a JSON payload on every TensorBoard logger's Text tab."""
    import json

    from pytorch_lightning.loggers import TensorBoardLogger

    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text(tag, f"```\n{json.dumps(payload, indent=2)}\n```", 0)


def resolve_ckpt_path(ckpt_path: str | None, run_dir: Path) -> str | None:
    if ckpt_path in (None, "", "null"):
        return None
    if ckpt_path == "auto":  # a requeued cluster job: this run dir's newest checkpoint, else start fresh
        found = [p for p in (run_dir / "checkpoints" / "last.ckpt", *run_dir.glob("hpc_ckpt_*.ckpt")) if p.is_file()]
        return str(max(found, key=lambda p: p.stat().st_mtime)) if found else None
    path = run_dir / "checkpoints" / "last.ckpt" if ckpt_path == "last" else Path(ckpt_path).expanduser()
    if not path.is_file():
        raise TLError(f"ckpt_path={ckpt_path!r}: no checkpoint at {str(path)!r}; resume with the run's own "
                      "hydra.run.dir=DIR ckpt_path=last, or give an existing .ckpt path")
    return str(path)


def train(cfg: DictConfig) -> tuple[dict, dict]:
    """Train and test as `cfg` says; return (results, objects)."""
    check_required(cfg)
    validate(cfg)
    run_dir = ensure_writable(Path(cfg.paths.output_dir))
    pl.seed_everything(cfg.seed, workers=True)

    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")
    evidence = None
    if cfg.scenario.name == "auto":
        chosen, evidence = resolve_auto(cfg, datamodule)
        images, cfg = datamodule.images, recompose(cfg, chosen)
        datamodule = build_datamodule(cfg)  # the chosen policy's transforms, on the images already loaded
        datamodule.images = images
        datamodule.setup("fit")
        pl.seed_everything(cfg.seed, workers=True)  # train exactly as `scenario=<chosen>` would
    print_config(cfg, save_to=run_dir / "config.yaml")

    module = build_module(cfg, datamodule)
    trainer = build_trainer(cfg)
    if evidence is not None:
        log_text(trainer, "scenario/decision", evidence)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), run_dir)

    started = time.perf_counter()
    fit_data = datamodule
    if feature_cache_applies(cfg):  # the backbone runs once per image, not once per image per epoch
        features = FeatureCache(cfg.paths.cache_dir).get(module.model, classifier_names(module.model), datamodule)
        fit_data = FeatureDataModule(features, datamodule.batch_size, datamodule.eval_batch_size)
        module.features_input = True
    lr_found: dict[str, Any] = {}
    if cfg.get("lr_find") and ckpt_path is None:  # a resumed run keeps its optimizer state
        from tl.callbacks.lr_finder import find_lr

        lr_found = find_lr(lambda: build(cfg.trainer, callbacks=[], logger=False, enable_checkpointing=False,
                                         enable_progress_bar=False),
                           module, fit_data, apply=cfg.lr_find == "apply", out_dir=run_dir)
    trainer.fit(module, datamodule=fit_data, ckpt_path=ckpt_path)
    fit_seconds = time.perf_counter() - started

    ckpt_cb = trainer.checkpoint_callback
    best = ckpt_cb.best_model_path if ckpt_cb is not None and ckpt_cb.best_model_path else None
    results: dict[str, Any] = {}
    if cfg.get("test", True):
        # A checkpoint's state_dict holds the averaged weights under EMA/SWA; with the averaging callback still
        # attached, loading it would put the raw weights back. Test what was averaged.
        trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, WeightAveraging)]
        test_metrics = trainer.test(module, datamodule=fit_data, ckpt_path=best, weights_only=True)
        results.update({k: float(v) for k, v in test_metrics[0].items()})
    module.features_input = False  # the returned module takes images again
    snapshots = next((c.snapshots for c in trainer.callbacks if isinstance(c, SnapshotEnsemble)), [])
    if snapshots and cfg.get("test", True):
        results.update(snapshot_ensemble_scores(snapshots, cfg.snapshots.get("ensemble_last"), datamodule, trainer))
    if cfg.get("export", True) and trainer.is_global_zero:  # weights + labels + preprocessing, no config needed
        results["export_dir"] = str(export_model(module, run_dir / "export"))
    val_best = ckpt_cb.best_model_score if ckpt_cb is not None else None
    n_trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    results.update({
        "val/acc": float(val_best) if val_best is not None else float(trainer.callback_metrics.get("val/acc", "nan")),
        "scenario": cfg.scenario.name,
        "strategy": cfg.finetune.strategy,
        "model": cfg.model.name,
        "pretrained": module.pretrained_source,
        "augment": cfg.augment.get("name", "none"),
        "feature_cache": fit_data is not datamodule,
        "num_classes": datamodule.num_classes,
        "n_train": len(datamodule.split_indices["train"]),
        "n_val": len(datamodule.split_indices["val"]),
        "n_test": len(datamodule.split_indices["test"]),
        "fit_seconds": round(fit_seconds, 2),
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "trainable_params": n_trainable,
        "total_params": sum(p.numel() for p in module.parameters()),
        "seed": cfg.seed,
        "best_ckpt": best,
        "run_dir": str(run_dir),
    })
    for callback in trainer.callbacks:  # InitialLossCheck / OverfitCheck report flat keys, e.g. "overfit/reached"
        results.update(getattr(callback, "results", None) or {})
    results.update(lr_found)
    if evidence is not None:
        results["scenario_evidence"] = evidence
    if datamodule.skipped_files:
        results["skipped_files"] = {"count": len(datamodule.skipped_files), "first": datamodule.skipped_files[:10]}
    if trainer.is_global_zero:
        write_json(run_dir / "results.json", results)
        print_results(results)
    return results, {"trainer": trainer, "module": module, "datamodule": datamodule}


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
@user_errors
def _hydra_main(cfg: DictConfig) -> float | None:
    results, _ = train(cfg)
    return results.get("val/acc")  # what a sweeper optimises: validation, never test


def main() -> None:
    launch(_hydra_main)


if __name__ == "__main__":
    main()
