"""Deterministic, stratified splits and the small-data subset.

The seed fixes every split. Given splits (from the source) are kept; a missing val or test split is carved out of
train, stratified. `samples_per_class` then draws the training subset from train only, so val and test never change
with the data size and test data never touches model selection.
"""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import train_test_split

from tl.errors import TLError


def _carve(indices: np.ndarray, targets: np.ndarray, fraction: float, seed: int, what: str,
           classes: list[str] | None = None, left: str = ""):
    """Split `indices` into (rest, carved) with `fraction` of each class in `carved`."""
    if not 0.0 < fraction < 1.0:
        raise TLError(f"data.{what}_fraction={fraction}: use a fraction in (0, 1)")
    all_counts = np.bincount(targets[indices])
    counts = all_counts[all_counts > 0]
    if counts.min() < 2:
        small = [int(c) for c in np.flatnonzero((all_counts > 0) & (all_counts < 2))]
        names = ", ".join(repr(classes[c]) if classes and c < len(classes) else str(c) for c in small[:5])
        more = f" and {len(small) - 5} more" if len(small) > 5 else ""
        raise TLError(f"class {names}{more} has only {counts.min()} example(s) to split{left}: too few to carve a "
                      f"{what} split; add images to it, remove it, or provide a {what}/ folder")
    # Stratified needs at least one example per class on each side; round the carved count up to the class count.
    n_carve = max(int(round(fraction * len(indices))), len(counts))
    if n_carve >= len(indices) - len(counts) + 1:
        raise TLError(f"data.{what}_fraction={fraction} leaves no training data for {len(indices)} examples")
    rest, carved = train_test_split(indices, test_size=n_carve, stratify=targets[indices], random_state=seed)
    return np.sort(rest), np.sort(carved)


def make_splits(targets: np.ndarray, given: dict[str, np.ndarray], val_fraction: float, test_fraction: float,
                seed: int, classes: list[str] | None = None) -> dict[str, np.ndarray]:
    """Return index arrays for train, val and test (`classes`: the names, for errors)."""
    splits = {k: np.asarray(v) for k, v in given.items()}
    train = splits.get("train", np.arange(len(targets)))
    n = len(train)  # fractions are of the data before carving, so val and test come out the sizes asked for
    if "test" not in splits:
        train, splits["test"] = _carve(train, targets, test_fraction, seed, "test", classes)
    if "val" not in splits:
        left = " (left in train once the test split was carved)" if "test" not in given else ""
        train, splits["val"] = _carve(train, targets, val_fraction * n / len(train), (seed + 1) % 2**32, "val",
                                      classes, left)
    splits["train"] = train
    return splits


def subset_per_class(train: np.ndarray, targets: np.ndarray, samples_per_class: int | None, seed: int,
                     classes: list[str] | None = None) -> np.ndarray:
    """Draw `samples_per_class` training examples of each class (seeded); None keeps all of train."""
    if samples_per_class is None:
        return train
    if int(samples_per_class) < 1:
        raise TLError(f"data.samples_per_class={samples_per_class}: use a positive integer, or null for all")
    k = int(samples_per_class)
    present = np.unique(targets[train])
    counts = np.bincount(targets[train])[present]
    if counts.min() < k:  # name the class that limits it
        c = int(present[np.argmin(counts)])
        name = classes[c] if classes and c < len(classes) else str(c)
        short = int((counts < k).sum())
        raise TLError(f"data.samples_per_class={k} is more than class {name!r} has in train ({counts.min()}"
                      f"{f'; {short} classes have fewer' if short > 1 else ''}): use at most {counts.min()} or null")
    rng = np.random.default_rng(seed)
    picked = []
    for c in present:
        members = train[targets[train] == c]
        picked.append(rng.choice(members, size=k, replace=False))
    return np.sort(np.concatenate(picked))
