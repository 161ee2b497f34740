"""A tuned SVM on raw pixels, on exactly tl's digits splits: the classical baseline the transfer study is held to.

    python scripts/svm_baseline.py --sizes 10 full --seeds 0 1 2

For each seed it rebuilds the run's stratified train/val/test split (tl.data.splits, as `python -m tl.train
seed=S` does), grid-searches an RBF SVM's C, gamma and input scaling by 5-fold cross-validation on the training
subset (the examples a tl run trains on), and scores it once on the test split. Prints a table; writes JSON with
--out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import yaml
from sklearn.datasets import load_digits
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from tl.data.splits import make_splits, subset_per_class

# The split fractions every tl run uses, read from the config rather than copied, so the splits cannot drift apart.
DATA_DEFAULTS = yaml.safe_load((Path(__file__).resolve().parents[1] / "conf" / "data" / "_base.yaml").read_text())


def run(size: str, seed: int, val_fraction: float, test_fraction: float) -> dict:
    digits = load_digits()
    x, y = digits.data.astype(np.float64), digits.target
    splits = make_splits(y, {}, val_fraction, test_fraction, seed)
    train = subset_per_class(splits["train"], y, None if size == "full" else int(size), seed)
    # Raw 0-16 intensities or standardized pixels: the search picks (standardizing blows up near-constant edge pixels).
    grid = {"scale": [StandardScaler(), "passthrough"], "svc__C": np.logspace(-1, 3, 5),
            "svc__gamma": np.logspace(-4, -1, 7)}
    folds = StratifiedKFold(n_splits=min(5, int(np.bincount(y[train]).min())), shuffle=True, random_state=seed)
    search = GridSearchCV(Pipeline([("scale", StandardScaler()), ("svc", SVC(kernel="rbf"))]), grid, cv=folds, n_jobs=1)
    search.fit(x[train], y[train])
    test = splits["test"]
    return {"size": size, "seed": seed, "n_train": int(len(train)), "n_test": int(len(test)),
            "cv_acc": float(search.best_score_), "test_acc": float(search.score(x[test], y[test])),
            "C": float(search.best_params_["svc__C"]), "gamma": float(search.best_params_["svc__gamma"]),
            "standardized": search.best_params_["scale"] != "passthrough"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["10", "full"], help="examples per class, or 'full'")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--val-fraction", type=float, default=DATA_DEFAULTS["val_fraction"])
    parser.add_argument("--test-fraction", type=float, default=DATA_DEFAULTS["test_fraction"])
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args()
    rows = [run(size, seed, args.val_fraction, args.test_fraction) for size in args.sizes for seed in args.seeds]
    print("| size | seed | n_train | standardized | C | gamma | cv acc | test acc |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['seed']} | {r['n_train']} | {r['standardized']} | {r['C']:g} | {r['gamma']:g} "
              f"| {r['cv_acc']:.4f} | {r['test_acc']:.4f} |")
    for size in args.sizes:
        acc = [r["test_acc"] for r in rows if r["size"] == size]
        print(f"{size}: test accuracy {np.mean(acc):.4f} ± {np.std(acc):.4f} over seeds {args.seeds}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
