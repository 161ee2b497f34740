"""Class imbalance: `data.balance=none|weights|sampler|auto` on an imbalanced copy of digits, several seeds.

    python scripts/bench_imbalance.py --out logs/imbalance [--seeds 0 1 2] [--modes none weights sampler]
                                      [--keep 0.1] [--minority 0 1 2 3 4] [-- extra tl.train overrides]
    python scripts/bench_imbalance.py --source /tmp/tl_datasets/fonts --out logs/imbalance_fonts \
                                      --minority 0 1 2 3 4 5 6 7 -- data.mirror_invariant=false

1. Builds an imbalanced copy, `OUT/<name>_imbalanced/{train,val,test}/<class>/NNNN.png`: train and val keep a
   fraction `--keep` of each minority class (`--minority`: class indices in sorted order; the first images of each
   in split order) and all of the others; test is left whole and balanced. Without `--source`, from scikit-learn's
   digits with tl's own split (seed 0, 70/15/15 stratified) as 8x8 PNGs, the same pixels as `data=digits`; with
   `--source DIR`, from an image folder with train/val/test splits (e.g. one of scripts/make_datasets.py's).
2. Runs the default `python -m tl.train` on it for each balance mode and seed (digits: with digits' own data
   settings, 64 px, no centre crop, no mirroring, 128 px for the small-data presets), each in OUT/<mode>_s<seed>.
3. Prints one row per run and the mean per mode: test accuracy, balanced accuracy, macro-F1, minority-class recall,
   ECE and fit time; writes OUT/summary.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DIGITS_DATA = ["data.image_size=64", "data.small_data_image_size=128", "data.crop_pct=1.0",
               "data.mirror_invariant=false"]


def build_from_folder(source: Path, out: Path, keep: float, minority: list[int]) -> Path:
    import shutil

    root = out / f"{source.name}_imbalanced"
    classes = sorted(p.name for p in (source / "train").iterdir() if p.is_dir())
    for split in ("train", "val", "test"):
        line = []
        for c, name in enumerate(classes):
            files = sorted((source / split / name).iterdir())
            if split != "test" and c in minority:
                files = files[:max(1, round(keep * len(files)))]
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for f in files:
                shutil.copyfile(f, folder / f.name)
            line.append(f"{name}:{len(files)}")
        print(f"{split}: " + " ".join(line))
    return root


def build(out: Path, keep: float, minority: list[int]) -> Path:
    sys.path.insert(0, str(ROOT))
    from tl.data.sources import DigitsSource
    from tl.data.splits import make_splits

    images = DigitsSource().load()
    splits = make_splits(images.targets, images.given_splits, 0.15, 0.15, 0)
    root = out / "digits_imbalanced"
    counts = {}
    for split, idx in splits.items():
        for c in range(10):
            members = [int(i) for i in idx if images.targets[i] == c]
            if split != "test" and c in minority:
                members = members[:max(1, round(keep * len(members)))]
            counts[(split, c)] = len(members)
            folder = root / split / str(c)
            folder.mkdir(parents=True, exist_ok=True)
            for j, i in enumerate(members):
                Image.fromarray(images.images[i, 0].numpy()).save(folder / f"{j:04d}.png")
    for split in ("train", "val", "test"):
        print(f"{split}: " + " ".join(f"{c}:{counts[(split, c)]}" for c in range(10)))
    return root


def run(root: Path, out: Path, mode: str, seed: int, extra: list[str], digits: bool) -> dict:
    run_dir = out / f"{mode}_s{seed}"
    if not (run_dir / "results.json").is_file():
        cmd = [sys.executable, "-m", "tl.train", "data=imagefolder", f"data.root={root}",
               *(DIGITS_DATA if digits else []),
               f"data.balance={mode}", f"seed={seed}", f"hydra.run.dir={run_dir}", "callbacks.progress=null",
               "overwrite=true", *extra]
        started = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        print(f"  {mode} seed {seed}: {time.perf_counter() - started:.0f} s wall")
    return json.loads((run_dir / "results.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "logs" / "imbalance")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--modes", nargs="+", default=["none", "weights", "sampler"])
    parser.add_argument("--source", type=Path, default=None,
                        help="an image folder with train/val/test splits (default: digits)")
    parser.add_argument("--keep", type=float, default=0.1)
    parser.add_argument("--minority", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("extra", nargs="*", help="more tl.train overrides (after --)")
    args = parser.parse_args()
    root = (build(args.out, args.keep, args.minority) if args.source is None
            else build_from_folder(args.source, args.out, args.keep, args.minority))
    rows = []
    for seed in args.seeds:
        for mode in args.modes:
            r = run(root, args.out, mode, seed, args.extra, args.source is None)
            minority = [c["recall"] for i, c in enumerate(r["test/per_class"]) if i in args.minority]
            rows.append({"mode": mode, "seed": seed, "resolved": r["balance"]["mode"], "scenario": r["scenario"],
                         "acc": r["test/acc"], "balanced_acc": r["test/balanced_acc"], "macro_f1": r["test/macro_f1"],
                         "minority_recall": float(np.mean(minority)), "ece": r["test/ece"],
                         "ece_uncalibrated": r["test/ece_uncalibrated"], "fit_seconds": r["fit_seconds"],
                         "imbalance_ratio": r["imbalance_ratio"]})
    print(f"\n{'mode':8} {'seed':>4} {'ran':8} {'scenario':16} {'acc':>6} {'bal_acc':>7} {'macroF1':>7} "
          f"{'min_rec':>7} {'ECE':>6} {'ECE_raw':>7} {'fit_s':>6}")
    for r in rows:
        print(f"{r['mode']:8} {r['seed']:>4} {r['resolved']:8} {r['scenario']:16} {r['acc']:6.3f} "
              f"{r['balanced_acc']:7.3f} {r['macro_f1']:7.3f} {r['minority_recall']:7.3f} {r['ece']:6.3f} "
              f"{r['ece_uncalibrated']:7.3f} {r['fit_seconds']:6.0f}")
    summary = {}
    for mode in args.modes:
        mine = [r for r in rows if r["mode"] == mode]
        summary[mode] = {k: statistics.mean(r[k] for r in mine) for k in
                         ("acc", "balanced_acc", "macro_f1", "minority_recall", "ece", "fit_seconds")}
        summary[mode]["balanced_acc_sd"] = statistics.pstdev(r["balanced_acc"] for r in mine)
        print(f"mean {mode:8}: acc {summary[mode]['acc']:.3f}  balanced {summary[mode]['balanced_acc']:.3f} "
              f"(sd {summary[mode]['balanced_acc_sd']:.3f})  macro-F1 {summary[mode]['macro_f1']:.3f}  "
              f"minority recall {summary[mode]['minority_recall']:.3f}  fit {summary[mode]['fit_seconds']:.0f} s")
    (args.out / "summary.json").write_text(json.dumps({"rows": rows, "mean": summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
