"""`python -m tl.evaluate ckpt=PATH`: a checkpoint, or a run's snapshot ensemble, on the test split.

1. what to evaluate: `ckpt=RUN/checkpoints/X.ckpt` (one model), `ckpt=RUN` (its snapshot ensemble,
   RUN/checkpoints/snapshots/*.ckpt, the last `ensemble.last`; without snapshots, its best checkpoint) or an exported
   model directory (with `data=...`);
2. the data: the run's own data config (RUN/config.yaml or RUN/.hydra/config.yaml) and seed, so the test split is
   the one training held out; `data=NAME ...` on the command line evaluates on other data instead;
3. per batch and member, the mean softmax over the test-time views (`tta=none|flip|multicrop`), then the mean over
   members; all deterministic (models in eval mode, fixed views);
4. accuracy, top-5, NLL, macro F1, calibration error, per-class accuracy and the confusion matrix, written as JSON
   (RUN/evaluation.json unless `output=`) and printed as a table.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch.nn import functional as F
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_calibration_error,
    multiclass_confusion_matrix,
    multiclass_f1_score,
)

from tl.cli import launch
from tl.errors import TLError
from tl.inference import (
    CKPT_HINT,
    TTA_CHOICES,
    Classifier,
    load_classifier,
    member_probs,
    resolve_device,
    run_dir_of,
    snapshot_paths,
)
from tl.utils import check_required, print_results, user_errors, write_json

log = logging.getLogger("tl.evaluate")


def resolve_members(ckpt: str, last: int | None) -> list[Path]:
    """The checkpoints to evaluate: one file or export directory, or the last `last` snapshots of a run directory."""
    path = Path(ckpt).expanduser()
    if not path.exists():
        raise TLError(f"ckpt={ckpt!r} not found: {CKPT_HINT}, or a run directory")
    if path.is_file() or (path / "model.json").is_file():
        return [path]
    snapshots = snapshot_paths(path)
    if snapshots:
        if last is not None and not 1 <= int(last) <= len(snapshots):
            raise TLError(f"ensemble.last={last} but {str(path)!r} has {len(snapshots)} snapshots: use 1.."
                          f"{len(snapshots)}, or null for all")
        return snapshots[-int(last):] if last is not None else snapshots
    results = path / "results.json"
    best = json.loads(results.read_text()).get("best_ckpt") if results.is_file() else None
    for candidate in (best, path / "checkpoints" / "last.ckpt"):
        if candidate and Path(candidate).is_file():
            return [Path(candidate)]
    raise TLError(f"ckpt={ckpt!r} is a directory with no snapshots (checkpoints/snapshots/*.ckpt), no best or last "
                  f"checkpoint and no model.json: {CKPT_HINT}")


def data_config(cfg: DictConfig, member: Path, clf: Classifier) -> DictConfig:
    """A config for `tl.train.build_datamodule`: the run's data and seed, or the command line's `data=...`."""
    run_dir = run_dir_of(member)
    saved = None
    if run_dir is not None:
        path = run_dir / "config.yaml" if (run_dir / "config.yaml").is_file() else run_dir / ".hydra" / "config.yaml"
        saved = OmegaConf.load(path)
    if cfg.get("data") is None and (saved is None or saved.get("data") is None):
        raise TLError(f"ckpt={str(member)!r} has no training run config beside it (RUN/config.yaml): name the data, "
                      "e.g. data=imagefolder data.root=DIR")
    run_cfg = saved if saved is not None else OmegaConf.create({})
    with open_dict(run_cfg):
        if cfg.get("data") is not None:
            run_cfg.data = cfg.data
        run_cfg.model = {"name": clf.name}
        run_cfg.augment = None  # test data is never augmented
        run_cfg.seed = cfg.seed if cfg.get("seed") is not None else run_cfg.get("seed", 42)
        if cfg.get("batch_size") is not None:
            run_cfg.data.eval_batch_size = cfg.batch_size  # the test loader's batch size
        if cfg.get("num_workers") is not None:
            run_cfg.data.num_workers = cfg.num_workers
    return run_cfg


def classification_metrics(probs: torch.Tensor, targets: torch.Tensor, class_names: list[str]) -> dict[str, Any]:
    """Test metrics from class probabilities (N, C) and integer targets (N)."""
    c = len(class_names)
    metrics: dict[str, Any] = {
        "test/acc": multiclass_accuracy(probs, targets, c, average="micro").item(),
        "test/nll": F.nll_loss(probs.clamp_min(1e-12).log(), targets).item(),
        "test/f1_macro": multiclass_f1_score(probs, targets, c, average="macro").item(),
        "test/ece": multiclass_calibration_error(probs, targets, c, n_bins=15).item(),
    }
    if c > 5:
        metrics["test/acc_top5"] = multiclass_accuracy(probs, targets, c, top_k=5, average="micro").item()
    per_class = multiclass_accuracy(probs, targets, c, average=None).tolist()
    metrics["per_class_acc"] = dict(zip(class_names, per_class, strict=True))
    metrics["confusion_matrix"] = multiclass_confusion_matrix(probs, targets, c).tolist()
    return metrics


def evaluate_members(members: list[Classifier], datamodule, tta: str = "none",
                     device: torch.device | str = "cpu") -> tuple[dict, dict]:
    """Test metrics of the mean softmax of `members` (one model or a snapshot ensemble) on `datamodule`'s test split.

    The data module must yield images (not cached features) and be set up; its preprocessing is replaced by the
    members' own. Returns (metrics, objects: ensemble probs (N, C), member_probs (M, N, C), targets (N)).
    """
    first = members[0]
    if any(m.class_names != first.class_names or m.preprocess != first.preprocess for m in members[1:]):
        raise TLError(f"{first.source!r} and the other members disagree on classes or preprocessing: evaluate them "
                      "one by one")
    if datamodule.num_classes != first.num_classes:
        raise TLError(f"ckpt={first.source!r} predicts {first.num_classes} classes but the data has "
                      f"{datamodule.num_classes}: evaluate on the data it was trained on (data=...)")
    datamodule.preprocess = first.preprocess  # the model's own input pipeline, whatever the data config says
    if tta == "flip" and not datamodule.mirror_invariant:
        log.warning("tta=flip skipped: the data is not mirror invariant (data.mirror_invariant=false)")
        tta = "none"

    started = time.perf_counter()
    chunks, targets = [], []
    for x, y in datamodule.test_dataloader():
        chunks.append(member_probs([m.model for m in members], x.to(device), tta).cpu())
        targets.append(y)
    seconds = time.perf_counter() - started
    per_member, targets = torch.cat(chunks, dim=1), torch.cat(targets)  # (members, N, C), (N,)
    probs = per_member.mean(dim=0)  # the ensemble: mean of the members' softmaxes

    results = {"members": [m.source for m in members], "tta": tta, "n_test": len(targets),
               "num_classes": first.num_classes, "seconds": round(seconds, 2),
               **classification_metrics(probs, targets, first.class_names)}
    if len(members) > 1:
        results["member_acc"] = [multiclass_accuracy(p, targets, first.num_classes, average="micro").item()
                                 for p in per_member]
    return results, {"probs": probs, "member_probs": per_member, "targets": targets}


def evaluate(cfg: DictConfig) -> tuple[dict, dict]:
    """Evaluate as `cfg` says; write the JSON and return (results, objects with probabilities and targets)."""
    from tl.train import build_datamodule

    check_required(cfg)
    tta = cfg.get("tta", "none")
    if tta not in TTA_CHOICES:
        raise TLError(f"tta={tta!r} is unknown: use one of {', '.join(TTA_CHOICES)}")
    device = resolve_device(cfg.get("device", "auto"))
    paths = resolve_members(cfg.ckpt, cfg.get("ensemble", {}).get("last"))
    members = [load_classifier(p, device) for p in paths]
    datamodule = build_datamodule(data_config(cfg, paths[0], members[0]))
    datamodule.setup("test")
    metrics, objects = evaluate_members(members, datamodule, tta, device)

    results = {"ckpt": str(cfg.ckpt), **metrics}
    run_dir = run_dir_of(paths[0])
    output = Path(cfg.output) if cfg.get("output") else (run_dir or Path(cfg.paths.output_dir)) / "evaluation.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    write_json(output, results)
    title = f"{len(members)} model(s), tta={results['tta']}"
    print_results({k: v for k, v in results.items() if k.startswith("test/") or k in ("n_test", "seconds")}, title)
    for path, acc in zip(paths, results.get("member_acc", []), strict=False):
        print(f"  member {path.name}: test/acc {acc:.4f}")
    print(f"tl.evaluate: wrote {output}")
    return results, {**objects, "datamodule": datamodule}


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
@user_errors
def _hydra_main(cfg: DictConfig) -> float:
    results, _ = evaluate(cfg)
    return results["test/acc"]


def main() -> None:
    launch(_hydra_main)


if __name__ == "__main__":
    main()
