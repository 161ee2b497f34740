"""What the splits of a dataset look like before anything trains on them, said with numbers.

- fewer than two classes: an error (a classifier needs two; the metrics library would fail later with a traceback);
- a class with no example in val or test (a given split folder that lacks it): a warning naming the classes, since
  the reported accuracy then says nothing about them;
- byte-identical images in train and in val or test (a copied file, a dataset assembled twice): a warning with the
  count and examples, and the counts in results.json (`data_audit`), since they inflate the scores;
- byte-identical images under two classes (a file copied into two class folders, a class folder linked to another):
  a warning naming them (`same_image_two_classes`), since one of the labels is wrong.

Duplicates are found by content hash. Files are grouped by size first and only sizes that occur on both sides are
read, so a folder of distinct photos costs a `stat` per file; in-memory images are hashed directly.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import defaultdict

import numpy as np

from tl.data.sources import ImageSet
from tl.errors import TLError

log = logging.getLogger(__name__)


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def _file_digests(paths: list[str], indices: np.ndarray, sizes: dict[int, int], keep: set[int]) -> dict[int, bytes]:
    out = {}
    for i in indices:
        if sizes.get(int(i)) in keep:
            try:
                with open(paths[int(i)], "rb") as f:
                    out[int(i)] = _digest(f.read())
            except OSError:  # unreadable now: the loader skips and counts it
                continue
    return out


def _digests(images: ImageSet, train: np.ndarray, others: np.ndarray) -> dict[int, bytes]:
    """Content digests of the examples that could be copies of one another: a train example and a val or test one,
    or two examples under different labels. Files are read only where their size occurs on both sides or under two
    labels; in-memory images and shards (digests taken at conversion) have all."""
    everything = np.concatenate([train, others])
    if images.store is not None:
        return {int(i): bytes(images.store.digests[int(i)]) for i in everything}
    if images.images is not None:
        return {int(i): _digest(images.images[int(i)].numpy().tobytes()) for i in everything}
    sizes: dict[int, int] = {}
    for i in everything:
        try:
            sizes[int(i)] = os.stat(images.paths[int(i)]).st_size
        except OSError:
            continue
    shared = {sizes[int(i)] for i in train if int(i) in sizes} & {sizes[int(i)] for i in others if int(i) in sizes}
    labels_of_size = defaultdict(set)
    for i, size in sizes.items():
        labels_of_size[size].add(int(images.targets[i]))
    keep = shared | {size for size, labels in labels_of_size.items() if len(labels) > 1}
    return _file_digests(images.paths, everything, sizes, keep)


def _name(images: ImageSet, i: int) -> str:
    if images.store is not None:
        return images.store.name(i)
    if images.paths is None:
        return f"#{i}"
    head, name = os.path.split(images.paths[i])
    return f"{os.path.basename(head)}/{name}"  # class folder and file


def audit_splits(images: ImageSet, splits: dict[str, np.ndarray]) -> dict:
    """Check the splits (see the module docstring); return the counts for results.json."""
    classes = images.classes
    present = np.unique(images.targets) if len(images.targets) else np.array([], dtype=int)
    if len(classes) < 2 or len(present) < 2:
        found = [classes[int(c)] for c in present] if len(present) else []
        raise TLError(f"the data has {len(present)} class(es) with images ({', '.join(map(repr, found)) or 'none'}): "
                      "a classifier needs at least 2; give one folder of images per class")
    report: dict = {}
    for split in ("val", "test"):
        counts = np.bincount(images.targets[splits[split]], minlength=len(classes))
        missing = [classes[c] for c in range(len(classes)) if counts[c] == 0]
        if missing:
            report[f"classes_without_{split}"] = missing
            fix = (f"give each class some {split} images (or let tl carve the split from train)"
                   if split in (images.given_splits or {}) else
                   f"they have too few images for data.{split}_fraction to carve one: add images to them, or give "
                   f"a {split}/ folder")
            log.warning("%d class(es) have no %s images (%s): the %s accuracy says nothing about them; %s",
                        len(missing), split, ", ".join(missing[:10]), split, fix)
    train = splits["train"]
    others = np.concatenate([splits["val"], splits["test"]])
    digests = _digests(images, train, others)  # one pass: the copies across splits and across labels
    seen = defaultdict(list)
    for i in train:
        if int(i) in digests:
            seen[digests[int(i)]].append(int(i))
    for split in ("val", "test"):
        dupes = [(int(i), seen[digests[int(i)]][0]) for i in splits[split]
                 if int(i) in digests and digests[int(i)] in seen]
        report[f"duplicates_train_{split}"] = len(dupes)
        if dupes:
            examples = ", ".join(f"{_name(images, a)} = {_name(images, b)}" for a, b in dupes[:3])
            report[f"duplicates_train_{split}_first"] = [[_name(images, a), _name(images, b)] for a, b in dupes[:10]]
            log.warning("%d of %d %s images are byte-identical to training images (e.g. %s): they inflate the %s "
                        "score; remove the copies from one side", len(dupes), len(splits[split]), split, examples,
                        split)
    conflicts = _label_conflicts(images, digests)
    report["same_image_two_classes"] = len(conflicts)
    if conflicts:
        named = [[f"{_name(images, i)} ({classes[int(images.targets[i])]})" for i in group] for group in conflicts]
        report["same_image_two_classes_first"] = named[:10]
        log.warning("%d image(s) appear byte for byte under more than one class (e.g. %s): at most one label can be "
                    "right; remove the wrong copies", len(conflicts),
                    " = ".join(named[0][:4]) + (f" and {len(named[0]) - 4} more" if len(named[0]) > 4 else ""))
    return report


def _label_conflicts(images: ImageSet, digests: dict[int, bytes]) -> list[list[int]]:
    """Groups of byte-identical examples with more than one label (a file copied into two class folders, a class
    folder linked to another)."""
    groups = defaultdict(list)
    for i, d in digests.items():
        groups[d].append(i)
    return [sorted(g) for g in groups.values() if len({int(images.targets[i]) for i in g}) > 1]
