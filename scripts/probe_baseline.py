"""The linear probe anyone can write, on exactly tl's splits: the baseline `scenario=auto` is held to (issue 16).

    python scripts/probe_baseline.py --sizes 10 100 --seeds 0 1 2 -- data=imagefolder data.root=DIR
    python scripts/probe_baseline.py --sizes 10 --image-sizes native 128 64 --out logs/probe.json   # digits

For each seed and training size it composes tl's own training config with the overrides after `--` plus
`seed=S data.samples_per_class=K` (so the train/val/test split and the training subset are the ones
`python -m tl.train` with the same overrides uses), extracts the pretrained backbone's pooled features (frozen,
eval mode, the backbone's own preprocessing; `native` is the backbone's input size, a number resizes to that side),
fits a standardised `LogisticRegressionCV` on the training subset (inner stratified folds choose C), and scores it
once on the test split. Nothing is fine-tuned and test data never chooses anything. Prints one line per cell and,
with --out, writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegressionCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tl.config import compose_config  # noqa: E402
from tl.data.datamodule import build_datamodule, collate_readable  # noqa: E402
from tl.data.features import extract_features  # noqa: E402
from tl.data.transforms import backbone_preprocess  # noqa: E402
from tl.models.backbone import create_backbone, load_pretrained  # noqa: E402


def fail(message: str, code: int = 2) -> None:
    """Exit as argparse does for bad input: `probe_baseline.py: error: ...`, status 2 (1 for a run that failed)."""
    print(f"probe_baseline.py: error: {message}", file=sys.stderr)
    sys.exit(code)


def features(model, datamodule, split: str) -> tuple[np.ndarray, np.ndarray]:
    loader = DataLoader(datamodule.dataset(split, augmented=False), batch_size=64, num_workers=0,
                        collate_fn=collate_readable)
    x, y = extract_features(model, loader)
    return x.numpy(), y.numpy()


def probe(x_train: np.ndarray, y_train: np.ndarray, seed: int) -> object:
    """Standardised multinomial logistic regression; C from 10 values by stratified inner cross-validation."""
    folds = int(max(2, min(5, np.bincount(y_train)[np.unique(y_train)].min())))
    clf = LogisticRegressionCV(Cs=10, cv=folds, max_iter=2000, random_state=seed, n_jobs=1, scoring="accuracy")
    return make_pipeline(StandardScaler(), clf).fit(x_train, y_train)


def run(overrides: list[str], size: str, seed: int, image_size: str) -> dict:
    extra = [f"seed={seed}", f"data.samples_per_class={'null' if size == 'full' else int(size)}"]
    if image_size != "native":
        extra.append(f"data.image_size={int(image_size)}")
    cfg = compose_config([*overrides, "scenario=small_similar", *extra])  # the preset only matters for image_size
    data = cfg.data
    if image_size == "native":  # the small presets set the dataset's small-data size; native means the backbone's
        from omegaconf import open_dict

        with open_dict(data):
            data.image_size = None
    started = time.perf_counter()
    datamodule = build_datamodule(data, backbone_preprocess(cfg.model.name), None, seed)
    datamodule.setup("fit")
    model = create_backbone(cfg.model.name, datamodule.num_classes)
    load_pretrained(model, cfg.model.pretrained, cfg.model.name)
    x_train, y_train = features(model, datamodule, "train")
    x_test, y_test = features(model, datamodule, "test")
    fitted = probe(x_train, y_train, seed)
    acc = float((fitted.predict(x_test) == y_test).mean())
    return {"size": size, "seed": seed, "image_size": image_size,
            "pixels": int(datamodule.preprocess["input_size"][-1]), "n_train": len(y_train), "n_test": len(y_test),
            "test_acc": round(acc, 4), "C": float(fitted[-1].C_[0]), "seconds": round(time.perf_counter() - started, 1)}


def _earlier_probe(path: Path) -> bool:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and set(data) == {"overrides", "rows"}


def main() -> None:
    argv = sys.argv[1:]
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["10"], help="training images per class, or full")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--image-sizes", nargs="+", default=["native"], help="native (the backbone's) or a side")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    for size in args.sizes:
        if size != "full" and not (size.isdigit() and int(size) > 0):
            parser.error(f"--sizes {size}: a positive number of images per class, or full")
    for side in args.image_sizes:
        if side != "native" and not (side.isdigit() and 16 <= int(side) <= 4096):
            parser.error(f"--image-sizes {side}: native (the backbone's) or a side from 16 to 4096 px")
    for seed in args.seeds:
        if not 0 <= seed < 2**32:
            parser.error(f"--seeds {seed}: seeds are integers from 0 to 2**32 - 1")
    # before any work: the overrides as tl.train checks them, and a writable --out
    from tl.cli import check_group_choices, check_override_keys, check_syntax
    from tl.errors import TLError

    check_syntax(overrides)
    check_group_choices(overrides)
    check_override_keys(overrides, "train")
    try:
        from tl.checks import validate

        validate(compose_config([*overrides, "scenario=small_similar"]))
        if args.out:
            from tl.utils import ensure_writable

            ensure_writable(args.out.expanduser().absolute().parent, min_free_mb=1, setting="--out FILE.json")
            if args.out.is_dir():
                raise TLError(f"--out {args.out} is a folder: give a .json file path")
            if args.out.is_file() and not _earlier_probe(args.out):
                raise TLError(f"--out {args.out} exists and is not an earlier output of this script (a run's "
                              "results?): give a new .json file path")
    except TLError as e:
        fail(str(e))
    try:
        rows = probe_all(args, overrides)
    except TLError as e:
        fail(str(e))
    if args.out:
        from tl.utils import atomic_write_text

        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps({"overrides": overrides, "rows": rows}, indent=2) + "\n")


def probe_all(args: argparse.Namespace, overrides: list[str]) -> list[dict]:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    for size in args.sizes:
        for image_size in args.image_sizes:
            for seed in args.seeds:
                row = run(overrides, size, seed, image_size)
                rows.append(row)
                print(json.dumps(row), flush=True)
            accs = [r["test_acc"] for r in rows if r["size"] == size and r["image_size"] == image_size]
            print(f"probe size={size} image_size={image_size}: test acc {np.mean(accs):.4f} +- {np.std(accs):.4f} "
                  f"(n={len(accs)})", flush=True)
    return rows


if __name__ == "__main__":
    main()
