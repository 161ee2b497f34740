"""`python -m tl.train`: fine-tune a pretrained backbone on an image dataset.

The entry point (`_hydra_main`) decides `scenario=auto` first (`tl.scenarios.resolve`: measure the data, compose the
config once with the chosen preset); `train(cfg)` then receives a final config and only instantiates and runs it:

1. check the config (one validation layer, `tl.checks`), claim the run directory (`tl.rundir`: one run per
   directory), seed;
2. the data module from `cfg.data` (preprocessing from the backbone's pretrained config);
3. the LightningModule from `cfg.model` (a checkpoint to resume must fit it), then the backbone's pretrained weights
   (`model.pretrained`); save the config;
4. the Trainer from `cfg.trainer` with every entry of `cfg.callbacks` and `cfg.logger`;
5. fit (on cached backbone features where that is exact), test the best checkpoint, calibrate it and report on it
   (`tl.report`: temperature, per-class metrics, top losses), score the snapshot ensemble, export, and write
   results.json (`tl.results`).
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.utilities.exceptions import SIGTERMException

import tl
from tl.callbacks.snapshots import SnapshotEnsemble
from tl.checks import check_resume, load_training_checkpoint, validate
from tl.cli import launch
from tl.config import require_output_dir
from tl.data.datamodule import build_datamodule
from tl.data.features import FeatureCache, FeatureDataModule, feature_cache_applies
from tl.data.transforms import backbone_preprocess
from tl.errors import Interrupted, Terminated, TLError
from tl.export import ensemble_members, export_model
from tl.inference import snapshot_ensemble_scores
from tl.models.backbone import classifier_names
from tl.models.probe_head import init_head_from_probe
from tl.report import report_run
from tl.results import collect_results, selected_val_acc, selection_checkpoint
from tl.rundir import RESUMABLE, claim_run_dir, clear_previous_run, own_resume
from tl.scenarios import resolve
from tl.utils import (
    atomic_write_bytes,
    build,
    default_sigterm,
    ensure_writable,
    print_config,
    print_results,
    run_terminated,
    sigterm_as_exception,
    user_errors,
    write_json,
)

log = logging.getLogger("tl.train")


def build_data(cfg: DictConfig):
    """The data module for `cfg.data`, preprocessing as the backbone `cfg.model.name` expects, augmented as
    `cfg.augment` says."""
    return build_datamodule(cfg.data, backbone_preprocess(cfg.model.name), cfg.augment, cfg.seed)


def build_module(cfg: DictConfig, datamodule) -> pl.LightningModule:
    """The LightningModule `cfg.model` names, sized to the data module's classes (random weights)."""
    return build(cfg.model, num_classes=datamodule.num_classes, class_names=datamodule.classes,
                 preprocess=datamodule.preprocess, class_weights=getattr(datamodule, "loss_weights", None),
                 _convert_="all")


def build_trainer(cfg: DictConfig, **kwargs: Any) -> pl.Trainer:
    """The Trainer `cfg.trainer` describes, with every callback and logger the config lists (null entries are off)."""
    callbacks = [build(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    loggers = [build(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    if "progress" in (cfg.get("callbacks") or {}) and cfg.callbacks.progress is None:
        kwargs.setdefault("enable_progress_bar", False)  # callbacks.progress=null: no bar, not Lightning's default one
    return build(cfg.trainer, callbacks=callbacks, logger=loggers or False, **kwargs)


def resolve_ckpt_path(ckpt_path: str | None, run_dir: Path) -> str | None:
    if ckpt_path in (None, "", "null"):
        return None
    if ckpt_path == "auto":  # a requeued or interrupted job: this run dir's latest saved state, else start fresh
        found = [p for p in (*(run_dir / "checkpoints" / name for name in RESUMABLE),
                             *run_dir.glob("hpc_ckpt_*.ckpt")) if p.is_file()]
        return str(max(found, key=saved_order)) if found else None
    path = run_dir / "checkpoints" / "last.ckpt" if ckpt_path == "last" else Path(ckpt_path).expanduser()
    if not path.is_file():
        others = ckpt_path == "last" and (run_dir / "checkpoints" / "interrupted.ckpt").is_file()
        raise TLError(f"ckpt_path={ckpt_path!r}: no checkpoint at {str(path)!r}; " + (
            "the run was stopped before its first epoch ended: resume it with ckpt_path=auto (its interrupted.ckpt)"
            if others else "resume with the run's own hydra.run.dir=DIR ckpt_path=auto, or give an existing .ckpt "
            "path"))
    return str(path)


def saved_order(path: Path) -> tuple:
    """When a checkpoint was saved, as the checkpoint itself records it (tl.checkpoint_io stamps every save), then its
    step: a folder copied without its timestamps (cp -r) keeps them. Files' times decide only between older
    checkpoints without the stamp; an unreadable file comes last."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return (1, int(ckpt.get("tl_saved_ns", -1)), int(ckpt.get("global_step", -1)), path.stat().st_mtime)
    except Exception:  # noqa: BLE001 - damaged: another candidate, or load_training_checkpoint's one line
        return (0, -1, -1, path.stat().st_mtime)


def onnx_formats(cfg: DictConfig) -> tuple[str, str | None]:
    """The export formats a run writes, and why ONNX is left out (None when it is not)."""
    from tl.onnx_export import onnx_available

    enabled = OmegaConf.select(cfg, "onnx.enabled", default="auto")
    if not cfg.export or enabled is False:
        return "safetensors", "onnx.enabled=false" if cfg.export else None
    missing = onnx_available()
    if missing and enabled is True:
        raise TLError(f"onnx.enabled=true but {missing}: install them, or set onnx.enabled=auto|false")
    return ("safetensors", missing) if missing else ("all", None)


def export_run(cfg: DictConfig, module, datamodule, run_dir: Path, snapshots: list[dict] | None,
               tested_ckpt: str | None, delivered_model: str | None = None) -> dict[str, Any]:
    """RUN/export: the tested weights (safetensors; with EMA or SWA, the average the run tested) and, where onnx is
    installed, model.onnx checked on validation images; when the run delivered its snapshot ensemble
    (`delivered_model`), the ONNX graph is that ensemble (the last `snapshots.ensemble_last` members, as
    `ensemble/test/acc` scored them: `snapshots` holds exactly those)."""
    formats, skipped = onnx_formats(cfg)
    ensemble = bool(snapshots) and formats == "all" and delivered_model == "ensemble"
    if delivered_model == "ensemble" and not ensemble:
        log.warning("the run delivered its snapshot ensemble, but %s: RUN/export holds the best checkpoint alone "
                    "(tl.predict ckpt=RUN serves the ensemble from the run's snapshots)", skipped or "no ONNX")
    members = ensemble_members([s["path"] for s in snapshots]) if ensemble else None
    started = time.perf_counter()
    averaging = OmegaConf.select(cfg, "callbacks.weight_averaging._target_")
    tested = [s["path"] for s in snapshots] if ensemble else [tested_ckpt]
    sources = {"checkpoints": tested, "weight_averaging": averaging.rsplit(".", 1)[-1] if averaging else None}
    if delivered_model == "ensemble" and not ensemble:  # said where tl.predict reads it, not only in the run's log
        sources["run_delivered"] = "ensemble"
    try:
        out_dir = export_model(module, run_dir / "export", formats, OmegaConf.to_container(cfg.onnx, resolve=True),
                               members, parity_data=datamodule, sources=sources)
    except TLError as e:
        if formats != "all":
            raise
        # the ONNX part failed (a parity check, a model torch.export cannot capture): keep the weights usable
        export_model(module, run_dir / "export", "safetensors", sources={**sources, "checkpoints": [tested_ckpt]})
        raise TLError(f"{e} [model.safetensors and model.json were written, without model.onnx]") from None
    info: dict[str, Any] = {"export_dir": str(out_dir), "export_seconds": round(time.perf_counter() - started, 2)}
    if formats == "all":
        section = json.loads((out_dir / "model.json").read_text())["onnx"]
        info["onnx"] = {"members": section["members"], "parity": section["parity"],
                        **({"int8_parity": section["int8"]["parity"]} if "int8" in section else {})}
    else:
        info["onnx"] = {"skipped": skipped}
        if skipped != "onnx.enabled=false":
            log.info("model.onnx not written: %s", skipped)
    return info


def deliver(ensemble: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`extra` with a scored snapshot ensemble's keys (`snapshot_ensemble_scores`). When the ensemble is what the run
    delivers, its test metrics become the run's (`test/acc`, ...; `val/acc` its validation accuracy) and every test
    metric of the best checkpoint moves beside them under `best/` (`best/test/acc`, `best/test/loss`, ...;
    `best/val/acc`), so no `test/` key describes a model the run does not deliver."""
    out = {**extra, **{k: v for k, v in ensemble.items() if k != "ensemble_metrics"}}
    if out["delivered"]["model"] == "ensemble":
        for key in [k for k in out if k.startswith("test/") or k in ("per_class_acc", "confusion_matrix")]:
            out[f"best/{key}"] = out.pop(key)
        if "val/acc" in out:
            out["best/val/acc"] = out["val/acc"]
        out.update(ensemble["ensemble_metrics"])
        if "ensemble/val/acc" in out:
            out["val/acc"] = out["ensemble/val/acc"]
    return out


def train(cfg: DictConfig) -> tuple[dict, dict]:
    """Train and test as the final config `cfg` says (no `scenario=auto`: see `tl.scenarios.resolve`).

    Returns (results, objects: trainer, module, datamodule).
    """
    # 1. check, seed, record
    require_output_dir(cfg)
    validate(cfg)
    with open_dict(cfg):
        root = OmegaConf.select(cfg, "data.root")
        if isinstance(root, str) and root.strip() and "://" not in root:
            # recorded absolute: tl.evaluate RUN from another folder must read these images, not others
            cfg.data.root = os.path.abspath(os.path.expanduser(root))
    onnx_formats(cfg)  # onnx.enabled=true without onnx installed: refused now, not after training
    run_dir = ensure_writable(Path(cfg.paths.output_dir))
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, run_dir)
    # a weights file or junk: one line, before the run directory is touched
    resumed_step = load_training_checkpoint(ckpt_path)["global_step"] if ckpt_path is not None else None
    # another run's checkpoint starts a new run here: refused over a finished one unless overwrite=true
    resuming = ckpt_path is not None and own_resume(cfg.ckpt_path, run_dir)
    # a resume trains on: what the run delivered (export/: what tl.predict ckpt=RUN serves; report/ and the test
    # scores) would describe the old weights if this run did not redo it
    stale = [f"{name}/ ({flag}=false)" for name, flag in (("export", "export"), ("report", "test"))
             if resuming and not cfg.get(flag) and (run_dir / name).exists()]
    if stale:
        raise TLError(f"ckpt_path={cfg.ckpt_path} resumes {str(run_dir)!r}, whose {' and '.join(stale)} would be left "
                      "describing the weights before this resume: drop the =false (they are redone), or move them out "
                      "of the run folder first")
    if resuming and cfg.overwrite:  # e.g. a SLURM job that starts over once, then resumes on every requeue
        log.warning("overwrite=true does not apply: ckpt_path=%s resumes this run's own checkpoint (%s); nothing is "
                    "replaced", cfg.ckpt_path, ckpt_path)
    with claim_run_dir(run_dir, resuming=resuming, overwrite=cfg.overwrite):
        return _train(cfg, run_dir, ckpt_path, resumed_step, replace=bool(cfg.overwrite) and not resuming)


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _train(cfg: DictConfig, run_dir: Path, ckpt_path: str | None, resumed_step: object = None,
           replace: bool = False) -> tuple[dict, dict]:
    """`replace`: overwrite=true over a previous run, whose files are removed once this run's input has loaded."""
    pl.seed_everything(cfg.seed, workers=True)

    # 2. data
    datamodule = build_data(cfg)
    datamodule.setup("fit")

    if OmegaConf.select(cfg, "callbacks.model_checkpoint.monitor") == "val/acc_top5" and datamodule.num_classes <= 5:
        raise TLError(f"callbacks.model_checkpoint.monitor=val/acc_top5 but the data has {datamodule.num_classes} "
                      "classes (top-5 is logged above 5): monitor val/acc or val/balanced_acc")

    # 3. model: architecture and new head, then the pretrained backbone weights; a checkpoint to resume must fit it
    module = build_module(cfg, datamodule)
    resumed_lr: dict[str, float] = {}
    if ckpt_path is not None:
        saved = check_resume(ckpt_path, module, cfg.trainer.max_epochs,
                             finished=(run_dir / "results.json").is_file() and own_resume(cfg.ckpt_path, run_dir),
                             planned=OmegaConf.select(cfg, "scenario.evidence.plan") is not None,
                             lr_found=cfg.lr_find == "apply")
        saved_lr = (saved.get("optimizer") or {}).get("lr") if isinstance(saved.get("optimizer"), dict) else None
        if cfg.lr_find == "apply" and saved_lr is not None and module.hparams.get("optimizer") is not None:
            module.hparams.optimizer["lr"] = saved_lr  # the finder's rate, which the restored optimizer goes on with
            resumed_lr = {"lr_find/resumed_lr": float(saved_lr)}  # results.json keeps the rate the run trained at
    pretrained = module.load_pretrained()
    head_init = None
    if cfg.finetune.head_init == "probe" and ckpt_path is None:  # LP-FT: start from the best linear probe
        module.head_init = head_init = init_head_from_probe(module, datamodule, cfg.paths.cache_dir, cfg.seed)
    # only now: a resume refused above leaves the run's config as it was (one refused once fitting has started, e.g.
    # a snapshot schedule that moved, puts it back: see the fit below)
    previous_config = _read_bytes(run_dir / "config.yaml") if ckpt_path is not None else None
    if replace:  # the data, the model and its weights loaded: only now is the previous run given up
        clear_previous_run(run_dir)
    print_config(cfg, save_to=run_dir / "config.yaml")

    # 4. trainer
    trainer = build_trainer(cfg)

    # 5. fit, test, score, export
    fit_data = datamodule
    if feature_cache_applies(cfg):  # the backbone runs once per image, not once per image per epoch
        features = FeatureCache(cfg.paths.cache_dir).get(module.model, classifier_names(module.model), datamodule)
        fit_data = FeatureDataModule(features, datamodule.batch_size, datamodule.eval_batch_size,
                                     train_sampler=datamodule.train_sampler, source=datamodule)
    lr_found: dict[str, Any] = dict(resumed_lr)
    if cfg.lr_find and ckpt_path is None:  # a resumed run keeps its optimizer state
        from tl.callbacks.lr_finder import find_lr

        lr_found = find_lr(lambda: build(cfg.trainer, callbacks=[], logger=False, enable_checkpointing=False,
                                         enable_progress_bar=False),
                           module, fit_data, apply=cfg.lr_find == "apply", out_dir=run_dir)
    started = time.perf_counter()
    try:
        with default_sigterm(), warnings.catch_warnings():  # Lightning's own SIGTERM handler during fit
            if ckpt_path is None:
                # a fresh fit: with an OnExceptionCheckpoint (interrupted.ckpt) Lightning reads ckpt_path=None as
                # "last" and prints two misleading lines about "the previous fit call" and "no last checkpoint" in
                # every run (found by a hostile tester). The run directory holds no checkpoint here (tl.rundir)
                warnings.filterwarnings("ignore", message=r"`\.fit\(ckpt_path=None\)` was called without a model")
                warnings.filterwarnings("ignore", message=r'\.fit\(ckpt_path="last"\) is set, but there is no last')
            trainer.fit(module, datamodule=fit_data, ckpt_path=ckpt_path)
    except SystemExit as e:
        # Ctrl-C: Lightning has saved interrupted.ckpt (InterruptCheckpoint) and exits 1. (A SIGTERM is Lightning's
        # SIGTERMException, also a SystemExit: tl.utils.user_errors reports it as itself.)
        if trainer.interrupted and not isinstance(e, SIGTERMException):
            raise Interrupted() from None
        raise
    except RuntimeError as e:  # SIGTERM to the loader processes too (a scheduler, a process group): saved as SIGTERM
        if run_terminated(e, trainer):
            raise SIGTERMException() from None
        raise
    except TLError:
        if previous_config is not None and trainer.global_step == resumed_step and trainer.is_global_zero:
            atomic_write_bytes(run_dir / "config.yaml", previous_config)  # refused before a step: the run as it was
        raise
    # earlier attempts' training (saved in the checkpoint this fit resumed) plus this process's
    earlier = module.fit_seconds_earlier if ckpt_path is not None else 0.0
    fit_seconds = earlier + time.perf_counter() - started
    try:  # a SIGTERM from here on (Lightning's handler is gone after fit) ends in one line, scratch files removed
        with sigterm_as_exception():
            return _finish(cfg, run_dir, trainer, module, datamodule, fit_data, fit_seconds, pretrained, lr_found,
                           head_init, fit_seconds_earlier=earlier)
    except (Terminated, KeyboardInterrupt) as e:
        e.tl_after = ("; training had finished: the same hydra.run.dir with ckpt_path=auto tests, reports and "
                      "exports it (an early-stopped run first trains one more epoch)")
        raise


def _finish(cfg: DictConfig, run_dir: Path, trainer, module, datamodule, fit_data, fit_seconds: float, pretrained,
            lr_found: dict, head_init, fit_seconds_earlier: float = 0.0) -> tuple[dict, dict]:
    """After fitting: test the selected weights, report, deliver a snapshot ensemble, export, write results.json."""

    extra: dict[str, Any] = {"fit_seconds": round(fit_seconds, 2), "pretrained": pretrained,
                             "precision": str(cfg.trainer.precision), **lr_found}
    if head_init is not None:
        extra["head_init"] = head_init
    if fit_seconds_earlier > 0:  # a resumed run: fit_seconds counts every attempt (each up to its last checkpoint)
        extra["fit_seconds_earlier"] = round(fit_seconds_earlier, 2)
    if cfg.test:
        best = getattr(selection_checkpoint(trainer), "best_model_path", None)
        extra.update(trainer.test(module, datamodule=fit_data, ckpt_path=best or None, weights_only=True)[0])
        if trainer.is_global_zero:  # the tested weights, whole splits, one process: calibration, per-class, top losses
            extra.update(report_run(module, datamodule, fit_data, run_dir, trainer.loggers, trainer.global_step,
                                    calibrate=cfg.report.calibrate, top_losses=cfg.report.top_losses,
                                    best_ckpt=best or None))
    snapshots = next((c.snapshots for c in trainer.callbacks if isinstance(c, SnapshotEnsemble)), [])
    if snapshots and trainer.is_global_zero:  # the whole val and test splits, on one process
        if "val/acc" not in extra and selected_val_acc(trainer) is not None:  # test=false: no report
            extra["val/acc"] = selected_val_acc(trainer)
        ensemble = snapshot_ensemble_scores(snapshots, cfg.snapshots.ensemble_last, datamodule,
                                            cfg.snapshots.get("deliver", "best"), extra.get("val/acc"),
                                            calibrate=cfg.report.calibrate, score_test=bool(cfg.test))
        extra = deliver(ensemble, extra)
        for logger in trainer.loggers:
            logger.log_metrics({**{k: v for k, v in extra.items() if k.startswith("ensemble/")},
                                "delivered/ensemble": float(extra["delivered"]["model"] == "ensemble")},
                               step=trainer.global_step)
    export_error = None
    if cfg.export and trainer.is_global_zero:  # weights + labels + preprocessing, no config needed
        try:
            tested = (getattr(selection_checkpoint(trainer), "best_model_path", None) or None
                      if cfg.test else None)  # without a test, the module holds the last weights
            extra.update(export_run(cfg, module, datamodule, run_dir, extra.get("snapshots"), tested,
                                    (extra.get("delivered") or {}).get("model")))
        except TLError as e:  # optional: the results of the finished training are written all the same
            export_error = extra["export_error"] = str(e)

    results = collect_results(cfg, trainer, module, datamodule, fit_data is not datamodule, extra)
    if trainer.is_global_zero:
        write_json(run_dir / "results.json", results)
        print_results(results)
        # the run is complete: a state saved by an earlier interruption must not be what ckpt_path=auto finds next
        (run_dir / "checkpoints" / "interrupted.ckpt").unlink(missing_ok=True)
    if export_error:
        ckpt = results.get("best_ckpt") or "RUN/checkpoints/last.ckpt"
        raise TLError(f"training finished and results.json is written, but the export failed: {export_error} "
                      f"(export again: python -m tl.export ckpt={ckpt})")
    return results, {"trainer": trainer, "module": module, "datamodule": datamodule}


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
@user_errors
def _hydra_main(cfg: DictConfig) -> float | None:
    job = HydraConfig.get()
    # a single run's budget counts from the process start (imports included); each job of a sweep from its own start
    started = tl.STARTED if job.mode == RunMode.RUN else None
    results, _ = train(resolve(cfg, list(job.overrides.task), job.job.config_name, started=started))  # auto: here
    return results.get("val/acc")  # what a sweeper optimises: validation, never test


def main() -> None:
    launch(_hydra_main, "train")


if __name__ == "__main__":
    main()
