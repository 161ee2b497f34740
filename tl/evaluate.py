"""`python -m tl.evaluate ckpt=PATH`: a checkpoint, or a run's snapshot ensemble, on the test split.

1. what to evaluate: `ckpt=RUN/checkpoints/X.ckpt` (one model), `ckpt=RUN` (the model the run delivered: its snapshot
   ensemble or its best checkpoint, results.json `delivered`; `ensemble.last=K`: the last K snapshots) or an
   exported model directory (with `data=...`);
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
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from tl.checks import EVALUATE_RULES, check_rules
from tl.cli import launch
from tl.data.datamodule import build_datamodule
from tl.errors import TLError
from tl.inference import (
    CKPT_HINT,
    TTA_CHOICES,
    delivered,
    evaluate_members,
    load_classifier,
    resolve_device,
    run_dir_of,
    snapshot_paths,
)
from tl.utils import (
    check_output_file,
    check_required,
    check_sweep_output,
    ensure_writable,
    output_target,
    print_results,
    terminate_as_exception,
    user_errors,
    write_json,
)

log = logging.getLogger("tl.evaluate")


def resolve_members(ckpt: str, last: int | None) -> list[Path]:
    """The checkpoints to evaluate: one file or export directory, or the last `last` snapshots of a run directory."""
    path = Path(ckpt).expanduser()
    if not path.exists():
        raise TLError(f"ckpt={ckpt!r} not found: {CKPT_HINT}, or a run directory")
    if path.is_file() or (path / "model.json").is_file():
        return [path]
    snapshots = snapshot_paths(path)
    if last is None:
        model, members = delivered(path)  # what the run delivered: its ensemble (its members must be there), or best
        if model == "ensemble":
            return members
        if model is None and snapshots:  # a run from before snapshots.deliver: all its snapshots
            return snapshots
    elif snapshots:
        if not 1 <= int(last) <= len(snapshots):
            raise TLError(f"ensemble.last={last} but {str(path)!r} has {len(snapshots)} snapshots: use 1.."
                          f"{len(snapshots)}, or null for all")
        return snapshots[-int(last):]
    results = path / "results.json"
    try:
        best = json.loads(results.read_text()).get("best_ckpt") if results.is_file() else None
    except (ValueError, AttributeError, OSError):  # garbled results.json: the checkpoints decide
        log.warning("%s is not readable JSON: using the run's last checkpoint", results)
        best = None
    # results.json holds the absolute path it was written with: a copied or moved run finds its best checkpoint by
    # name in its own folder, never in the original's
    best_here = []
    if isinstance(best, str) and best:
        best_here.append(path / "checkpoints" / Path(best).name)
        if Path(best).resolve().is_relative_to(path.resolve()):  # another checkpoint folder inside this run
            best_here.append(Path(best))
    for candidate in (*best_here, path / "checkpoints" / "last.ckpt", path / "last.ckpt"):  # RUN, or RUN/checkpoints
        if candidate.is_file():
            if best_here and candidate not in best_here:
                log.warning("the best checkpoint results.json names (%s) is not in %s: using %s", best, path,
                            candidate)
            return [candidate]
    for interrupted in (path / "checkpoints" / "interrupted.ckpt", path / "interrupted.ckpt"):
        if interrupted.is_file():  # stopped in its first epoch: nothing to choose from but the state it stopped in
            raise TLError(f"ckpt={ckpt!r} holds a run stopped before its first checkpoint ({interrupted.name} only): "
                          f"finish it with python -m tl.train hydra.run.dir="
                          f"{path.parent if path.name == 'checkpoints' else path} ckpt_path=auto, or give "
                          f"ckpt={interrupted} to use the state it stopped in")
    raise TLError(f"ckpt={ckpt!r} is a directory with no snapshots (checkpoints/snapshots/*.ckpt), no best or last "
                  f"checkpoint and no model.json: {CKPT_HINT}")


def data_config(cfg: DictConfig, member: Path) -> tuple[DictConfig, int]:
    """The data to evaluate on and its split seed: `data=...` from the command line, else the training run's own
    (RUN/config.yaml beside the checkpoint), with the run's seed unless `seed=` is given."""
    run_dir = run_dir_of(member)
    saved = None
    if run_dir is not None:
        path = run_dir / "config.yaml" if (run_dir / "config.yaml").is_file() else run_dir / ".hydra" / "config.yaml"
        saved = OmegaConf.load(path)
    data = cfg.get("data") if cfg.get("data") is not None else (saved.get("data") if saved is not None else None)
    if data is None:
        raise TLError(f"ckpt={str(member)!r} has no training run config beside it (RUN/config.yaml): name the data, "
                      "e.g. data=imagefolder data.root=DIR")
    data = OmegaConf.create(OmegaConf.to_container(data, resolve=False))
    with open_dict(data):
        if cfg.get("batch_size") is not None:
            data.eval_batch_size = cfg.batch_size  # the test loader's batch size
        if cfg.get("num_workers") is not None:
            data.num_workers = cfg.num_workers
    seed = cfg.seed if cfg.get("seed") is not None else (saved.get("seed", 42) if saved is not None else 42)
    return data, int(seed)


def _datamodule_states(path: Path) -> list[dict]:
    """The data module states a checkpoint saved (trained on images, or on cached features of them)."""
    if Path(path).suffix != ".ckpt":
        return []
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - load_classifier read it already; nothing more to learn here
        return []
    if not isinstance(ckpt, dict):
        return []
    return [s for s in (ckpt.get(n) for n in ("TransferDataModule", "FeatureDataModule")) if isinstance(s, dict)]


def check_same_shards(paths: list[Path], datamodule) -> None:
    """A checkpoint trained on shards (its datamodule state records their manifest's fingerprint) is evaluated on the
    same shards: converted again from other input, their test split may hold the run's training images."""
    store = datamodule.images.store if datamodule.images is not None else None
    if store is None:
        return
    for path in paths:
        expected = next((s["shards_fingerprint"] for s in _datamodule_states(path) if s.get("shards_fingerprint")),
                        None)
        if expected and expected != store.fingerprint:
            raise TLError(f"{str(path)!r} was trained on other shards than data.root={store.root!r} holds now "
                          "(converted again from other input, or another dataset): its test split there may hold "
                          "the run's training images; evaluate on the shards it was trained on")


def check_same_split(paths: list[Path], datamodule, own_data: bool = True) -> bool:
    """The run's own data split as the checkpoint was trained on it (its `splits_digest`). Where test is carved from
    the same pool as train (no given test folder), files added or removed since move images between the splits, so
    the test split could hold training images: refused. A given test folder cannot: a warning. True if it matches
    (or the checkpoint records no digest)."""
    if not datamodule.split_indices:
        return True
    for path in paths:
        expected = next((s["splits_digest"] for s in _datamodule_states(path) if s.get("splits_digest")), None)
        if not expected or expected == datamodule.splits_digest():
            continue
        given = getattr(datamodule.images, "given_splits", None) or {}
        if "test" in given:  # a given test folder: never carved from the training images
            if own_data:
                log.warning("The data changed since %s was trained (files added, removed or renamed): its given "
                            "test folder is evaluated as it is now", path)
            return False
        if not own_data:  # data named on the command line: other images, or the same ones split again
            log.warning("The test split here is carved from data.root=%s by seed, and it is not the split %s was "
                        "trained beside: if these are the images it was trained on, the test images may include "
                        "training images and the accuracy reads high; evaluate with the run's own data and seed "
                        "(leave data= out), or on a folder of held-out images",
                        getattr(datamodule.source, "root", None), path)
            return False
        raise TLError(f"the test split is not the one {str(path)!r} was trained beside (another seed=, or files "
                      f"added, removed or renamed under data.root={getattr(datamodule.source, 'root', None)!s}): test "
                      "is carved from the same images as train, so it could hold training images; evaluate with the "
                      "run's seed and data, or on images kept apart (data=imagefolder data.root=TEST_DIR)")
    return True


def _command_line_keys() -> set[str]:
    """The keys set on this command line (Hydra's record of the overrides), or none when called from Python."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return set()
    return {o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task}


def evaluate(cfg: DictConfig) -> tuple[dict, dict]:
    """Evaluate as `cfg` says; write the JSON and return (results, objects with probabilities and targets)."""
    check_required(cfg)
    check_rules(cfg, EVALUATE_RULES)
    tta = cfg.get("tta", "none")
    if tta not in TTA_CHOICES:
        raise TLError(f"tta={tta!r} is unknown: use one of {', '.join(TTA_CHOICES)}")
    device = resolve_device(cfg.get("device", "auto"))
    paths = resolve_members(cfg.ckpt, cfg.get("ensemble", {}).get("last"))
    members = [load_classifier(p, device) for p in paths]
    run_dir = run_dir_of(paths[0])
    output = Path(cfg.output) if cfg.get("output") else (run_dir or Path(cfg.paths.output_dir)) / "evaluation.json"
    output = output_target(output, "output", "evaluation.json")  # a link's target; no device, pipe or folder
    keep = [run_dir / name for name in ("results.json", "config.yaml")] if run_dir is not None else []
    check_sweep_output(output)
    check_output_file(output, "output", ".json", reads=[*paths, *keep],
                      inside=[run_dir / d for d in ("checkpoints", "export", ".hydra")] if run_dir is not None else [])
    ensure_writable(output.parent, min_free_mb=1, setting="output=FILE.json")  # now, not after the evaluation
    data, seed = data_config(cfg, paths[0])
    given_keys = _command_line_keys()
    if cfg.get("data") is not None:  # size settings given on the command line would be ignored in silence
        trained = members[0].preprocess
        for key, value in (("image_size", int(trained["input_size"][-1])), ("crop_pct", trained.get("crop_pct"))):
            given = data.get(key)
            if f"data.{key}" in given_keys and given is not None and value is not None and float(given) != float(value):
                raise TLError(f"data.{key}={given} does not apply to tl.evaluate: a model is evaluated on the inputs "
                              f"it was trained on ({key} {value}); leave data.{key} out")
    datamodule = build_datamodule(data, members[0].preprocess, augment=None, seed=seed)  # the model's own inputs
    datamodule.setup("test")
    if cfg.get("data") is None:  # the run's own data; data named on the command line is the user's choice
        check_same_shards(paths, datamodule)
    check_same_split(paths, datamodule, own_data=cfg.get("data") is None)  # ... but a re-carved split is warned of
    metrics, objects = evaluate_members(members, datamodule, tta, device)

    results = {"tool": "tl.evaluate", "ckpt": str(cfg.ckpt), **metrics}
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
    terminate_as_exception()
    results, _ = evaluate(cfg)
    return results["test/acc"]


def main() -> None:
    launch(_hydra_main, "evaluate")


if __name__ == "__main__":
    main()
