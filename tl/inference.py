"""Shared by predict, evaluate, export and train: load a trained classifier, score it (or a snapshot ensemble) on a
test split, test-time augmentation, softmax averaging.

A classifier comes from either a Lightning checkpoint written by `python -m tl.train` (loaded with
`weights_only=True`) or a directory written by `python -m tl.export` (`model.json` + `model.safetensors`). Either way
it carries its class names and its preprocessing, so no training config is needed to use it.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_confusion_matrix,
    multiclass_f1_score,
)

from tl.data.datamodule import collate_readable
from tl.errors import TLError

log = logging.getLogger(__name__)

EXPORT_CONFIG = "model.json"
EXPORT_WEIGHTS = "model.safetensors"
TTA_CHOICES = ("none", "flip", "multicrop")
MULTICROP_FRACTION = 0.875  # each corner/centre crop keeps 87.5% of the side, then is resized back
CKPT_HINT = ("give a .ckpt written by python -m tl.train (RUN/checkpoints/*.ckpt) or a directory written by "
             "python -m tl.export")


@dataclass
class Classifier:
    """A trained model in eval mode with what it needs to be used: class names and input preprocessing."""

    model: nn.Module
    name: str
    class_names: list[str]
    preprocess: dict
    source: str
    temperature: float = 1.0  # calibration fitted on the training run's val split (tl.report); 1.0: none

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` is the GPU when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise TLError(f"device={device!r} is not a device: use auto, cpu, cuda or cuda:N") from e
    if dev.type == "cuda":
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus == 0 or (dev.index or 0) >= gpus:
            raise TLError(f"device={device!r} is not on this machine ({gpus} CUDA GPUs): use device=cpu or auto")
    elif dev.type not in ("cpu", "mps") or (dev.type == "mps" and not torch.backends.mps.is_available()):
        raise TLError(f"device={device!r} is not available here: use auto, cpu, cuda or cuda:N")
    return dev


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> Classifier:
    """Load a tl checkpoint (.ckpt) or an exported model directory, on `device`, in eval mode."""
    path = Path(path).expanduser()
    if path.is_dir() and not (path / EXPORT_CONFIG).is_file() and (path / "export" / EXPORT_CONFIG).is_file():
        path = path / "export"  # a training run's folder: the model it exported
    if path.is_dir():
        clf = load_export(path)
    elif path.is_file():
        clf = load_checkpoint(path)
    else:
        raise TLError(f"ckpt={str(path)!r} not found: {CKPT_HINT}")
    clf.model.to(device).eval()
    return clf


def load_checkpoint(path: Path) -> Classifier:
    """A classifier from a Lightning checkpoint of `tl.models.TransferModule`."""
    module = load_module(path)
    hp = module.hparams
    names = [str(c) for c in (hp.class_names or range(hp.num_classes))]
    return Classifier(module.model, hp.name, names, dict(hp.preprocess), str(path), module.temperature)


def load_module(path: Path):
    """The `TransferModule` saved in a checkpoint, on the CPU; a file that is not a tl checkpoint is refused."""
    from tl.models import TransferModule
    from tl.models.module import check_calibration

    if path.is_dir():
        raise TLError(f"ckpt={str(path)!r} is a folder, and this needs a .ckpt file written by python -m tl.train: "
                      "give RUN/checkpoints/<name>.ckpt" + (" (this folder is an export already)"
                                                          if (path / EXPORT_CONFIG).is_file() else ""))
    if not path.is_file():
        raise TLError(f"ckpt={str(path)!r} not found: {CKPT_HINT}")
    try:  # a cheap look (memory-mapped, tensors only) before building anything
        peek = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - UnpicklingError for code-carrying pickles, RuntimeError for junk
        raise TLError(f"ckpt={str(path)!r} is not a checkpoint that loads with weights_only=True "
                      f"({type(e).__name__}): {CKPT_HINT}") from e
    hp = peek.get("hyper_parameters") if isinstance(peek, dict) else None
    if not isinstance(hp, dict) or not {"name", "num_classes", "class_names", "preprocess"} <= hp.keys() \
            or not any(k.startswith("model.") for k in peek.get("state_dict", {})):
        raise TLError(f"ckpt={str(path)!r} is not a tl checkpoint (no TransferModule hyperparameters): {CKPT_HINT}")
    check_calibration(peek.get("calibration"), f"ckpt={str(path)!r}")
    problem = export_meta_problem({"format": "tl-export/ckpt", "name": hp.get("name"),
                                   "num_classes": hp.get("num_classes"), "class_names": hp.get("class_names"),
                                   "preprocess": hp.get("preprocess"), "drop_rate": hp.get("drop_rate") or 0.0,
                                   "drop_path_rate": hp.get("drop_path_rate") or 0.0})
    if problem:  # an edited checkpoint: refused before anything is built from it or written from it
        raise TLError(f"ckpt={str(path)!r} records hyperparameters tl cannot use ({problem}): {CKPT_HINT}")
    del peek
    try:
        return TransferModule.load_from_checkpoint(path, weights_only=True, map_location="cpu")
    except TLError:
        raise
    except Exception as e:  # noqa: BLE001 - size mismatches (num_classes or name edited), unknown keys
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        first = (lines[1] if len(lines) > 1 else lines[0] if lines else type(e).__name__)[:200]
        raise TLError(f"ckpt={str(path)!r}: its hyperparameters do not fit its weights ({first}): "
                      f"{CKPT_HINT}") from None


def preprocess_problem(pre) -> str | None:
    """What is wrong with a model's preprocessing record (model.json's `preprocess`, a checkpoint's hyperparameters),
    or None: every value tl.predict and tl.evaluate feed the transforms."""
    from tl.checks import _number
    from tl.data.images import RESAMPLE

    if not isinstance(pre, dict):
        return "preprocess is not a mapping"
    size = pre.get("input_size")
    if not (isinstance(size, (list, tuple)) and len(size) == 3 and size[0] == 3
            and all(isinstance(v, int) and not isinstance(v, bool) and 16 <= v <= 4096 for v in size[1:])):
        return f"preprocess.input_size {size!r} is not [3, H, W] with sides from 16 to 4096"
    for key in ("mean", "std"):
        v = pre.get(key)
        if not (isinstance(v, (list, tuple)) and len(v) == 3 and all(_number(x) for x in v)):
            return f"preprocess.{key} {v!r} is not three numbers"
    if not all(0 < x <= 1e3 for x in pre["std"]):
        return f"preprocess.std {pre['std']!r} is not positive"
    if not all(-1e3 <= x <= 1e3 for x in pre["mean"]):
        return f"preprocess.mean {pre['mean']!r} is out of range"
    if pre.get("interpolation") not in RESAMPLE:
        return f"preprocess.interpolation {pre.get('interpolation')!r} is not one of {', '.join(RESAMPLE)}"
    crop = pre.get("crop_pct", 1.0)
    if not (_number(crop) and 0.25 <= crop <= 1):
        return f"preprocess.crop_pct {crop!r} is not a fraction from 0.25 to 1"
    if pre.get("crop_mode", "center") not in ("center", "squash", "border"):
        return f"preprocess.crop_mode {pre.get('crop_mode')!r} is not center, squash or border"
    return None


def export_meta_problem(meta) -> str | None:
    """What is wrong with an export's model.json, or None (the ONNX path's `check_meta` checks its own part)."""
    from tl.checks import _number

    if not isinstance(meta, dict):
        return "it is not a JSON object"
    if not str(meta.get("format", "")).startswith("tl-export/"):
        return f"format {meta.get('format')!r} is not a tl export's"
    if not isinstance(meta.get("name"), str) or not meta["name"]:
        return f"name {meta.get('name')!r} is not a model name"
    n = meta.get("num_classes")
    if not isinstance(n, int) or isinstance(n, bool) or n < 2:
        return f"num_classes {n!r} is not an integer >= 2"
    names = meta.get("class_names")
    if not isinstance(names, list) or not all(isinstance(c, str) and c for c in names) or len(names) != n:
        return f"class_names is not a list of {n} names"
    if len(set(names)) != len(names):
        return "class_names repeats a name"
    for key in ("drop_rate", "drop_path_rate"):
        v = meta.get(key, 0.0)
        if not (_number(v) and 0 <= v < 1):
            return f"{key} {v!r} is not a rate from 0 to below 1"
    return preprocess_problem(meta.get("preprocess"))


def load_export(folder: Path) -> Classifier:
    """A classifier from a directory written by `tl.export.export_model`: the timm model, weights from safetensors."""
    from safetensors.torch import load_file

    from tl.models.backbone import create_backbone
    from tl.models.module import check_calibration

    config_path, weights_path = folder / EXPORT_CONFIG, folder / EXPORT_WEIGHTS
    if config_path.is_file() and not weights_path.is_file() and (folder / "model.onnx").is_file():
        raise TLError(f"ckpt={str(folder)!r} holds model.onnx and no {EXPORT_WEIGHTS}: predict with "
                      f"ckpt={str(folder / 'model.onnx')!r} (ONNX Runtime), or export format=all")
    if not config_path.is_file() or not weights_path.is_file():
        raise TLError(f"ckpt={str(folder)!r} is a directory without {EXPORT_CONFIG} and {EXPORT_WEIGHTS}: {CKPT_HINT}")
    try:
        meta = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise TLError(f"{str(config_path)!r} is not a tl export ({type(e).__name__}: {e}): export it again with "
                      "python -m tl.export ckpt=PATH") from e
    problem = export_meta_problem(meta)
    if problem:  # an edited or foreign model.json: refused, not a traceback or silently wrong predictions
        raise TLError(f"{str(config_path)!r} is not a usable tl export: {problem}; export it again with python -m "
                      "tl.export ckpt=RUN")
    names, preprocess = list(meta["class_names"]), dict(meta["preprocess"])
    calibration = check_calibration(meta.get("calibration"), repr(str(config_path)))
    temperature = float(calibration["temperature"]) if calibration else 1.0
    try:
        model = create_backbone(meta["name"], meta["num_classes"], meta.get("drop_rate", 0.0),
                                meta.get("drop_path_rate", 0.0))
    except TLError as e:  # e.g. a model name timm does not know
        raise TLError(f"{str(config_path)!r} names a model this timm cannot build ({e})") from None
    try:
        state = load_file(str(weights_path))
    except Exception as e:  # noqa: BLE001 - SafetensorError for a truncated or garbled file, OSError
        raise TLError(f"{str(weights_path)!r} is not a readable safetensors file ({type(e).__name__}: "
                      f"{(str(e).splitlines() or [''])[0][:160]}): export it again with python -m tl.export "
                      "ckpt=RUN/checkpoints/<best>.ckpt") from e
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # another model's weights, or a model.json edited since
        first = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))[:200]
        raise TLError(f"the weights in {str(weights_path)!r} do not fit the model {str(config_path)!r} describes "
                      f"({meta['name']}, {meta['num_classes']} classes; {first}): export the two files together "
                      "again with python -m tl.export") from None
    return Classifier(model, meta["name"], names, preprocess, str(folder), temperature)


def run_dir_of(ckpt: Path) -> Path | None:
    """The training run a checkpoint belongs to: the nearest ancestor (up to 3 levels) holding the run's config."""
    for folder in [ckpt, *ckpt.parents][:4]:
        if (folder / "config.yaml").is_file() or (folder / ".hydra" / "config.yaml").is_file():
            return folder
    return None


def snapshot_paths(run_dir: Path) -> list[Path]:
    """Snapshot-ensemble members of a run (RUN/checkpoints/snapshots/*.ckpt), oldest cycle first."""
    def cycle(p: Path) -> tuple[int, str]:
        match = re.search(r"(\d+)$", p.stem)
        return (int(match.group(1)) if match else -1, p.name)

    return sorted((run_dir / "checkpoints" / "snapshots").glob("*.ckpt"), key=cycle)


def delivered(run_dir: Path) -> tuple[str | None, list[Path]]:
    """What a training run delivered as its model (results.json `delivered`, written when it had snapshots):
    ("ensemble", its member checkpoints, found by name in its own folder), ("best", []), or (None, []) for a run
    that says nothing (no snapshots, or written before `snapshots.deliver`)."""
    path = run_dir / "results.json"
    try:
        results = json.loads(path.read_text())
    except FileNotFoundError:  # a run that has not finished: it delivered nothing yet
        return None, []
    except (OSError, ValueError) as e:
        error = type(e).__name__
    else:
        error = None if isinstance(results, dict) else "not a results object"
    if error is not None:
        if not any((run_dir / "checkpoints" / "snapshots").glob("*.ckpt")):
            return None, []  # a run without snapshots delivers its best checkpoint: the callers find it by name
        # with snapshots, only results.json says whether the ensemble or the best checkpoint was delivered:
        # tl.predict, tl.evaluate and tl.export must not each guess otherwise
        raise TLError(f"{str(path)!r} cannot be read ({error}): it records which model this snapshot-ensemble run "
                      "delivered; restore it, or give one checkpoint, ckpt=RUN/checkpoints/<name>.ckpt")
    choice = results.get("delivered")
    model = choice.get("model") if isinstance(choice, dict) else None
    if model != "ensemble":
        return ("best" if model == "best" else None), []
    listed = results.get("snapshots")
    names = [Path(s["path"]).name for s in (listed if isinstance(listed, list) else [])
             if isinstance(s, dict) and isinstance(s.get("path"), str)]
    paths = [run_dir / "checkpoints" / "snapshots" / name for name in names]
    missing = [str(p) for p in paths if not p.is_file()]
    if not paths or missing:
        raise TLError(f"{str(run_dir)!r} delivered a snapshot ensemble, but its members are missing "
                      f"({', '.join(missing[:2]) or 'none listed in results.json'}): give one checkpoint, "
                      "ckpt=RUN/checkpoints/<name>.ckpt")
    return "ensemble", paths


# -- scoring -------------------------------------------------------------------------------------------------------
def classification_metrics(probs: torch.Tensor, targets: torch.Tensor, class_names: list[str],
                           uncalibrated: torch.Tensor | None = None) -> dict[str, Any]:
    """Test metrics from class probabilities (N, C) and integer targets (N); `uncalibrated`: the probabilities before
    the temperature, for `test/ece_uncalibrated`."""
    from tl.report import expected_calibration_error, per_class_metrics

    c = len(class_names)
    metrics: dict[str, Any] = {
        "test/acc": multiclass_accuracy(probs, targets, c, average="micro").item(),
        "test/balanced_acc": multiclass_accuracy(probs, targets, c, average="macro").item(),
        "test/nll": F.nll_loss(probs.clamp_min(1e-12).log(), targets).item(),
        "test/macro_f1": multiclass_f1_score(probs, targets, c, average="macro").item(),
        "test/ece": expected_calibration_error(probs, targets),
    }
    metrics["test/f1_macro"] = metrics["test/macro_f1"]  # the earlier name
    if uncalibrated is not None:
        metrics["test/ece_uncalibrated"] = expected_calibration_error(uncalibrated, targets)
    if c > 5:
        metrics["test/acc_top5"] = multiclass_accuracy(probs, targets, c, top_k=5, average="micro").item()
    per_class = multiclass_accuracy(probs, targets, c, average=None).tolist()
    metrics["per_class_acc"] = dict(zip(class_names, per_class, strict=True))
    metrics["test/per_class"] = per_class_metrics(probs, targets, class_names)
    metrics["confusion_matrix"] = multiclass_confusion_matrix(probs, targets, c).tolist()
    return metrics


def evaluate_members(members: list[Classifier], datamodule, tta: str = "none",
                     device: torch.device | str = "cpu", split: str = "test") -> tuple[dict, dict]:
    """Test metrics of the mean softmax of `members` (one model or a snapshot ensemble) on `datamodule`'s test split
    (`split`: another split, its metrics under the same `test/` names).

    The data module must be set up; its preprocessing is replaced by the members' own. The whole test split is
    scored in this process (a plain loader, never a distributed sampler's shard, even when the data module is
    attached to a DDP trainer). Returns (metrics, objects: ensemble probs (N, C), member_probs (M, N, C),
    logits (M, N, C: each member's, the mean over the TTA views), targets (N)).
    """
    first = members[0]
    if any(m.class_names != first.class_names or m.preprocess != first.preprocess for m in members[1:]):
        raise TLError(f"{first.source!r} and the other members disagree on classes or preprocessing: evaluate them "
                      "one by one")
    if datamodule.num_classes != first.num_classes:
        raise TLError(f"ckpt={first.source!r} predicts {first.num_classes} classes but the data has "
                      f"{datamodule.num_classes}: evaluate on the data it was trained on (data=...)")
    data_names = [str(c) for c in datamodule.classes]
    if data_names != [str(c) for c in first.class_names]:
        if sorted(data_names) == sorted(str(c) for c in first.class_names):
            why = "in another order"
        else:
            more = ", ..." if first.num_classes > 5 else ""
            why = f"not the model's ({', '.join(map(str, first.class_names[:5]))}{more})"
        raise TLError(f"the data's classes ({', '.join(data_names[:5])}{', ...' if len(data_names) > 5 else ''}) are "
                      f"{why}: label i of the data would be scored as the model's class i; evaluate on data with the "
                      "model's class folders")
    datamodule.preprocess = first.preprocess  # the model's own input pipeline, whatever the data config says
    if tta == "flip" and not datamodule.mirror_invariant:
        log.warning("tta=flip skipped: the data is not mirror invariant (data.mirror_invariant=false)")
        tta = "none"

    temperatures = [m.temperature for m in members]
    calibrated = any(t != 1.0 for t in temperatures)
    started = time.perf_counter()
    chunks, raw_chunks, logit_chunks, targets = [], [], [], []
    loader = DataLoader(datamodule.dataset(split), batch_size=datamodule.eval_batch_size,
                        num_workers=datamodule._workers(), collate_fn=collate_readable)
    for batch in loader:
        if batch is None:  # every file of the batch unreadable since the scan (counted by the dataset)
            continue
        x, y = batch
        logits = member_logits([m.model for m in members], x.to(device), tta)
        chunks.append(probs_from_logits(logits, temperatures).cpu())
        logit_chunks.append(logits.float().mean(dim=1).cpu())
        if calibrated:
            raw_chunks.append(probs_from_logits(logits).cpu())
        targets.append(y)
    seconds = time.perf_counter() - started
    if not targets:
        raise TLError(f"the {split} split has no readable images to score")
    per_member, targets = torch.cat(chunks, dim=1), torch.cat(targets)  # (members, N, C), (N,)
    probs = per_member.mean(dim=0)  # the ensemble: mean of the members' softmaxes
    raw = torch.cat(raw_chunks, dim=1).mean(dim=0) if calibrated else probs

    results = {"members": [m.source for m in members], "tta": tta, "n_test": len(targets),
               "num_classes": first.num_classes, "seconds": round(seconds, 2),
               "calibration/temperature": temperatures[0] if len(members) == 1 else temperatures,
               **classification_metrics(probs, targets, first.class_names, raw)}
    if len(members) > 1:
        results["member_acc"] = [multiclass_accuracy(p, targets, first.num_classes, average="micro").item()
                                 for p in per_member]
    return results, {"probs": probs, "member_probs": per_member, "logits": torch.cat(logit_chunks, dim=1),
                     "targets": targets}


DELIVER_CHOICES = ("best", "ensemble", "val")


def choose_delivery(deliver: str, ensemble_val_acc: float | None, best_val_acc: float | None,
                    size: int) -> tuple[str, str]:
    """(model, reason): what a snapshot-ensemble run delivers, "ensemble" or "best" (`snapshots.deliver`)."""
    if deliver != "val":
        return deliver, f"snapshots.deliver={deliver}"
    if ensemble_val_acc is None or best_val_acc is None:
        return "best", "no validation split to compare them on: the best checkpoint, as with deliver=best"
    model = "ensemble" if ensemble_val_acc >= best_val_acc else "best"
    return model, (f"validation accuracy: the ensemble of {size} snapshots {ensemble_val_acc:.4f} "
                   f"{'>=' if model == 'ensemble' else '<'} the best checkpoint {best_val_acc:.4f}")


def snapshot_ensemble_scores(snapshots: list[dict], last: int | None, datamodule, deliver: str = "best",
                             best_val_acc: float | None = None, calibrate: bool = True,
                             score_test: bool = True) -> dict[str, Any]:
    """Score the snapshot ensemble (`SnapshotEnsemble.snapshots`: the mean softmax of the last `last`, all when None)
    on the whole test split of `datamodule`, and decide what the run delivers (`snapshots.deliver`):

    - `best`: the best single checkpoint; the ensemble is scored beside it (`ensemble/test/acc`).
    - `ensemble`: the ensemble.
    - `val`: whichever scores higher on the validation split, the ensemble on a tie. `best_val_acc` is the best
      checkpoint's accuracy on the whole validation split (`tl.report`); picked as the best of many validations, it
      reads high, so this leans toward the best checkpoint (README, "auto across datasets").

    With `calibrate`, each member gets its own temperature fitted on the validation split (stored in its checkpoint,
    as the best checkpoint's is), so the ensemble averages calibrated probabilities wherever it is used. Returns
    results.json keys; `ensemble_metrics` holds the ensemble's test metrics (`test/...`) for the caller to report
    when the ensemble is delivered. `score_test=False` (a run with test=false): validation and the decision only."""
    from tl.report import fit_temperature, write_calibration

    if deliver not in DELIVER_CHOICES:
        raise TLError(f"snapshots.deliver={deliver!r} is unknown: use one of {', '.join(DELIVER_CHOICES)}")
    members = snapshots[-last:] if last else snapshots
    classifiers = [load_classifier(s["path"]) for s in members]
    has_val = len(datamodule.split_indices.get("val", [])) > 0
    val_acc: float | None = None
    member_val: list[float | None] = [None] * len(members)
    if has_val:
        _, val = evaluate_members(classifiers, datamodule, split="val")
        logits, y = val["logits"], val["targets"]
        for i, (clf, snapshot) in enumerate(zip(classifiers, members, strict=True)):
            member_val[i] = float((logits[i].argmax(dim=1) == y).double().mean())
            if calibrate:
                fitted = fit_temperature(logits[i], y)
                clf.temperature = fitted["temperature"]
                try:
                    write_calibration(Path(snapshot["path"]), {**fitted, "fitted_on": "val"})
                except TLError as e:  # a full disk: the scores stand; the member file keeps no temperature
                    log.warning("%s", e)
                    clf.temperature = 1.0
        ensemble = probs_from_logits(logits.unsqueeze(1), [c.temperature for c in classifiers]).mean(dim=0)
        val_acc = float((ensemble.argmax(dim=1) == y).double().mean())
    metrics, _ = evaluate_members(classifiers, datamodule) if score_test else ({}, None)
    member_acc = metrics.get("member_acc", [metrics.get("test/acc")]) if score_test else [None] * len(members)
    out: dict[str, Any] = {
        "ensemble/size": len(members),
        "snapshots": [{**s, **({"test/acc": acc} if acc is not None else {}),
                       **({"val/acc": v} if v is not None else {}),
                       **({"calibration/temperature": c.temperature} if calibrate and has_val else {})}
                      for s, acc, v, c in zip(members, member_acc, member_val, classifiers, strict=True)]}
    if score_test:
        out["ensemble/test/acc"], out["ensemble/best_member_test_acc"] = metrics["test/acc"], max(member_acc)
    if val_acc is not None:
        out["ensemble/val/acc"] = val_acc
    model, reason = choose_delivery(deliver, val_acc, best_val_acc, len(members))
    out["delivered"] = {"model": model, "deliver": deliver, "reason": reason,
                        **({"ensemble_val_acc": val_acc} if val_acc is not None else {}),
                        **({"best_val_acc": best_val_acc} if best_val_acc is not None else {})}
    out["ensemble_metrics"] = {k: v for k, v in metrics.items()
                               if k.startswith("test/") or k in ("per_class_acc", "confusion_matrix")}
    return out


# -- speed ----------------------------------------------------------------------------------------------------------
def fold_batchnorm(model: nn.Module) -> int:
    """Fold each eval-mode BatchNorm into the convolution defined just before it; return how many were folded.

    timm defines a norm right after the convolution it normalises (conv -> BatchNorm2d, or BatchNormAct2d whose
    activation stays). Folding saves a pass over every feature map: about 1.3x on the CPU for EfficientNet-Lite0.
    """
    from timm.layers import BatchNormAct2d
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    named = list(model.named_modules())
    folded = 0
    for (conv_name, conv), (norm_name, norm) in zip(named, named[1:], strict=False):
        if isinstance(conv, nn.Conv2d) and type(norm) in (nn.BatchNorm2d, BatchNormAct2d) \
                and norm.track_running_stats and conv.out_channels == norm.num_features:
            model.set_submodule(conv_name, fuse_conv_bn_eval(conv, norm))
            model.set_submodule(norm_name, nn.Sequential(norm.drop, norm.act) if isinstance(norm, BatchNormAct2d)
                                else nn.Identity())
            folded += 1
    return folded


def optimize_for_inference(model: nn.Module, input_size: Sequence[int]) -> nn.Module:
    """An eval-mode copy that computes the same function faster: BatchNorm folded, channels-last memory layout.

    The folded copy is checked against the original on a random batch and discarded if it differs (a norm that was
    not applied to the convolution before it); predictions are then exactly the original model's.
    """
    import copy

    model = model.eval()
    fast = copy.deepcopy(model)
    if fold_batchnorm(fast):
        device = next(model.parameters()).device
        x = torch.randn(2, *input_size, device=device, generator=torch.Generator(device).manual_seed(0))
        with torch.inference_mode():
            reference, got = model(x), fast(x)
        if not torch.allclose(got, reference, rtol=1e-3, atol=1e-3 * float(reference.abs().max())):
            log.warning("BatchNorm folding changed the outputs of %s: predicting with the unfolded model",
                        type(model).__name__)
            fast = model
    return fast.to(memory_format=torch.channels_last)


# -- test-time augmentation and averaging ---------------------------------------------------------------------------
def mean_softmax(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """The mean of the softmaxes of several logit tensors of one shape: TTA views, or ensemble members."""
    return torch.stack([z.float().softmax(dim=-1) for z in logits]).mean(dim=0)


def tta_views(x: torch.Tensor, tta: str = "none") -> list[torch.Tensor]:
    """Deterministic views of a normalised batch (N, C, H, W).

    `flip`: the batch and its horizontal mirror. `multicrop`: the batch, its four corner crops and its centre crop,
    each `MULTICROP_FRACTION` of the side and resized back to the input size.
    """
    if tta == "none":
        return [x]
    if tta == "flip":
        return [x, x.flip(-1)]
    if tta == "multicrop":
        from torchvision.transforms.v2.functional import five_crop

        size = list(x.shape[-2:])
        crops = five_crop(x, [max(1, round(s * MULTICROP_FRACTION)) for s in size])
        return [x, *(F.interpolate(c, size=size, mode="bilinear", align_corners=False) for c in crops)]
    raise TLError(f"tta={tta!r} is unknown: use one of {', '.join(TTA_CHOICES)}")


@torch.inference_mode()
def member_logits(models: Sequence[nn.Module], x: torch.Tensor, tta: str = "none") -> torch.Tensor:
    """Logits (members, views, N, classes) of each model on each TTA view of `x` (one forward pass per model)."""
    views = tta_views(x, tta)
    batch = torch.cat(views) if len(views) > 1 else x
    return torch.stack([model(batch).float().unflatten(0, (len(views), len(x))) for model in models])


def probs_from_logits(logits: torch.Tensor, temperatures: Sequence[float] | None = None) -> torch.Tensor:
    """(members, N, classes): per member, the mean over views of softmax(logits / the member's temperature)."""
    temperatures = temperatures or [1.0] * len(logits)
    return torch.stack([mean_softmax(views / t) for views, t in zip(logits, temperatures, strict=True)])


def member_probs(models: Sequence[nn.Module], x: torch.Tensor, tta: str = "none",
                 temperatures: Sequence[float] | None = None) -> torch.Tensor:
    """Class probabilities (members, N, classes): per model, the mean softmax (of logits / its temperature) over the
    TTA views of `x`."""
    return probs_from_logits(member_logits(models, x, tta), temperatures)
