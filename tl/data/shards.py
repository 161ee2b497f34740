"""Datasets converted once into LitData shards and streamed from them (`python -m tl.shard`, `data=shards`).

A shard dataset is a folder:

    DIR/.tl-shards           written first: the folder belongs to tl.shard (complete only with manifest.json)
    DIR/train/ val/ test/    LitData's `optimize` output: index.json + chunk-*.bin, one record per image:
                             {image: the encoded file's bytes, label, id, name}
    DIR/<split>.meta.npz     per record, in shard order: label, id, content digest, height and width
    DIR/manifest.json        written last: classes, counts per split and class, the split recipe, skipped files,
                             the source it came from and its fingerprint

Images keep their own encoding (a JPEG stays the same bytes) and are decoded by the same code as an image folder
(`tl.data.images.decode`), except where a lossless image's pixels are hardly bigger than its file (`raw_max_ratio`
of tl.shard: small PNGs, in-memory sources such as digits): those are stored decoded, as a netpbm PGM or PPM, and
read back in microseconds where a PNG decode takes tens. Either way a model sees the same pixels from shards as
from the folder they came from. The splits are made once, at conversion, by tl's own
seeded stratified recipe (`tl.data.splits`), so every run on the shards trains, selects and tests on the same
examples. Train is written in a seeded random order: LitData shuffles chunks and records within chunks, which mixes
well only if a chunk is not one class (an image folder lists its files class by class).

Reading: training streams train through `StreamingDataset` + `StreamingDataLoader` (each DDP rank reads a disjoint
share, the loader's position goes into checkpoints for an exact mid-epoch resume). Validation, test, the feature
cache, scenario=auto's measurements and the report read records by index (`ShardStore`), in order, so under DDP
they are split exactly by `UnrepeatedDistributedSampler` like any other source.
"""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from litdata import StreamingDataset
from PIL import Image

from tl.data.audit import _digest
from tl.data.images import decode as decode_image
from tl.data.images import from_netpbm, shrink
from tl.errors import TLError

log = logging.getLogger(__name__)
# LitData logs each reader it opens at INFO (cache sizes, mmap mode): one line per split and loader process.
logging.getLogger("litdata").setLevel(logging.WARNING)

FORMAT = "tl-shards"
VERSION = 1
MANIFEST = "manifest.json"
MARKER = ".tl-shards"
SPLITS = ("train", "val", "test")
META_FIELDS = ("labels", "ids", "digests", "heights", "widths")


def is_remote(root: str | os.PathLike) -> bool:
    return "://" in str(root)


def meta_name(split: str) -> str:
    return f"{split}.meta.npz"


def _join(root: str, name: str) -> str:
    return f"{str(root).rstrip('/')}/{name}"


def _read_bytes(root: str, name: str) -> bytes:
    """A small file of the dataset (manifest, index, meta), local or at a URL fsspec can open."""
    path = _join(root, name)
    if is_remote(root):
        import fsspec

        with fsspec.open(path, "rb") as f:
            return f.read()
    with open(path, "rb") as f:
        return f.read()


# -- the store: reading records by index ---------------------------------------------------------------------------
class ShardStore:
    """Random access to the records of a shard dataset, by index over train, val and test in that order.

    Each process opens its own LitData readers on first use (DataLoader workers included), so the store can be
    handed to worker processes.
    """

    def __init__(self, root: str, sizes: dict[str, int], digests: np.ndarray, heights: np.ndarray,
                 widths: np.ndarray, fingerprint: str, ids: np.ndarray | None = None):
        self.root, self.sizes, self.fingerprint = str(root), dict(sizes), fingerprint
        self.digests, self.heights, self.widths = digests, heights, widths
        self.ids = ids  # the source ids of the records, in shard order (meta.npz)
        self.offsets = {}
        start = 0
        for split in SPLITS:
            self.offsets[split] = start
            start += self.sizes[split]
        self._open: dict[str, Any] = {}
        self._pid = os.getpid()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": {}}

    def split_dir(self, split: str) -> str:
        return _join(self.root, split)

    def locate(self, j: int) -> tuple[str, int]:
        if 0 <= j < sum(self.sizes.values()):
            for split in reversed(SPLITS):
                if j >= self.offsets[split] and self.sizes[split]:
                    return split, j - self.offsets[split]
        raise IndexError(f"record {j} of a shard dataset of {sum(self.sizes.values())}")

    def _dataset(self, split: str):
        if self._pid != os.getpid():  # a forked worker: its own readers
            self._open, self._pid = {}, os.getpid()
        if split not in self._open:
            ds = StreamingDataset(self.split_dir(split), shuffle=False)  # read by index: no shares
            # No in-place mmap of local chunks (LitData's "POSIX-fast" reader) for reads by index: every chunk
            # touched stays mapped, so a pass over train (the report's) kept the whole split resident: +210 MB of
            # RSS at 100,000 small images, growing with the data. Plain reads here measured as fast per record.
            ds.posix_fast = None
            self._open[split] = ds
        return self._open[split]

    def record(self, j: int) -> dict:
        split, i = self.locate(int(j))
        try:
            record = self._dataset(split)[i]
        except TLError:
            raise
        except Exception as e:  # noqa: BLE001 - a damaged chunk surfaces as struct, index or decode errors
            raise _damaged(self.root, f"record {i} of {split}", e) from e
        check_digest(record, self.digests[int(j)], self.root, split)
        return record

    def train_digests(self) -> tuple[np.ndarray, np.ndarray]:
        """Train's source ids, sorted, and their records' digests: what `ShardSample` checks a streamed record
        against (it knows the record's id, not its position)."""
        n = self.sizes["train"]
        ids = np.asarray(self.ids[:n] if self.ids is not None else np.arange(n), dtype=np.int64)
        order = np.argsort(ids, kind="stable")
        return ids[order], self.digests[:n][order]

    def open(self, j: int, min_side: int | None = None, interpolation: str = "bicubic") -> Image.Image:
        """The record's image as an image folder's loader makes it (`tl.data.images.decode`: RGB, a large one
        reduced to `min_side`)."""
        return decode(self.record(j), self.root, min_side, interpolation)

    def name(self, j: int) -> str:
        return str(self.record(j)["name"])

    def stream(self, transform, seed: int, shuffle: bool = True):
        """Train as a LitData `StreamingDataset`: under DDP each rank reads a disjoint share; shuffled from `seed`
        and the epoch by chunk, by block of 256 records within a chunk, and within blocks (LitData's default window:
        train was written in a random order, so blocks are already mixed; a full in-chunk permutation,
        `item_shuffle_window="full"`, measured 25x slower per record here). Items are `transform(record)`."""
        return ShardStream(self.split_dir("train"), shuffle=shuffle, seed=int(seed), transform=transform)


def _damaged(root: str, what: str, e: Exception) -> TLError:
    return TLError(f"shard dataset {root!r}: {what} cannot be read ({type(e).__name__}: "
                   f"{(str(e).splitlines() or [''])[0][:120]}): the files are damaged or incomplete; copy them again "
                   "or rerun python -m tl.shard")


class ShardStream(StreamingDataset):
    """LitData's StreamingDataset whose read errors (a damaged chunk: struct, index or decode errors inside LitData)
    are one line naming the dataset, like the reads by index."""

    def __getitem__(self, index):
        try:
            return super().__getitem__(index)
        except TLError:
            raise
        except Exception as e:  # noqa: BLE001
            root = str(self.input_dir.path or self.input_dir.url)
            raise _damaged(root, f"record {getattr(index, 'index', index)}", e) from e


def check_digest(record: dict, expected, where: str, split: str) -> None:
    """The record's bytes against the digest tl.shard took of them (meta.npz). A chunk damaged in place (a copy cut
    short and padded, a bad block) keeps its size, and an image stored as its pixels has no checksum of its own:
    without this it would train on whatever the bytes became. blake2b runs at about 1 GB/s: microseconds a record."""
    # numpy's S16 drops a digest's trailing zero bytes: compare without them
    if _digest(bytes(record["image"])).rstrip(b"\0") != bytes(expected):
        raise TLError(f"shard dataset {where!r}: {split} image {record.get('name')!r} (id {record.get('id')}) is not "
                      f"the bytes tl.shard wrote (its digest in {meta_name(split)} differs): the shard is damaged; "
                      "copy it again or rerun python -m tl.shard")


def decode(record: dict, where: str = "", min_side: int | None = None, interpolation: str = "bicubic") -> Image.Image:
    """The record's image decoded by the image folder's code (`tl.data.images.decode`: RGB, and no larger than the
    transform needs: a large JPEG decoded at a reduced scale, then resized to `min_side`), so that shards and the
    folder they came from give a model the same pixels at the same cost."""
    try:
        raw = from_netpbm(record["image"])  # small lossless images are stored as their pixels (tl.shard)
        if raw is not None:
            return shrink(raw, min_side, interpolation)
        return decode_image(io.BytesIO(bytes(record["image"])), min_side, interpolation)[0]
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, DecompressionBombError
        raise TLError(f"shard dataset {where!r}: image {record.get('name')!r} (id {record.get('id')}) does not decode "
                      f"({type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}): the shard is damaged; "
                      "rerun python -m tl.shard") from e


class ShardSample:
    """A training record -> (transformed image, label, id): applied inside LitData's streaming dataset (in the
    loader's worker processes). The id is the record's index in the source (`manifest.json`: ids), so a run's sample
    sequence can be compared across runs."""

    def __init__(self, transform, where: str, min_side: int | None = None, interpolation: str = "bicubic",
                 digests: tuple[np.ndarray, np.ndarray] | None = None):
        self.transform, self.where = transform, where
        self.min_side, self.interpolation = min_side, interpolation
        self.digests = digests  # (sorted train ids, their digests): ShardStore.train_digests

    def __call__(self, record: dict):
        if self.digests is not None:
            ids, digests = self.digests
            k = int(np.searchsorted(ids, int(record["id"])))
            if k >= len(ids) or ids[k] != int(record["id"]):
                raise TLError(f"shard dataset {self.where!r}: a train record has id {record.get('id')}, which "
                              f"{meta_name('train')} does not list: the shard is damaged; rerun python -m tl.shard")
            check_digest(record, digests[k], self.where, "train")
        image = decode(record, self.where, self.min_side, self.interpolation)
        return self.transform(image), int(record["label"]), int(record["id"])


# -- the source: a shard dataset as tl data ------------------------------------------------------------------------
def _manifest(root: str) -> dict:
    if not is_remote(root):
        path = Path(root)
        if not path.is_dir():
            raise TLError(f"data.root={root!r} does not exist or is not a folder: give the output of "
                          "python -m tl.shard data=<source> output=DIR")
        if not (path / MANIFEST).is_file():
            if (path / MARKER).exists():
                raise TLError(f"data.root={root!r} is an incomplete shard dataset (no {MANIFEST}: its conversion was "
                              "interrupted): rerun the same python -m tl.shard command to finish it")
            raise TLError(f"data.root={root!r} is not a tl shard dataset (no {MANIFEST}): for a folder of images "
                          f"use data=imagefolder data.root={root}, or convert it first with python -m tl.shard "
                          f"data=imagefolder data.root={root} output=<a new folder> and train with data=shards "
                          "data.root=<that folder>")
    try:
        manifest = json.loads(_read_bytes(root, MANIFEST))
    except (OSError, ValueError) as e:
        raise TLError(f"{_join(root, MANIFEST)!r} cannot be read ({e}): rerun python -m tl.shard") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise TLError(f"{_join(root, MANIFEST)!r} is not a tl shard manifest: rerun python -m tl.shard")
    if manifest.get("version") != VERSION:
        raise TLError(f"{_join(root, MANIFEST)!r} has shard format version {manifest.get('version')!r}, this tl "
                      f"reads version {VERSION}: rerun python -m tl.shard with this version")
    sizes = manifest.get("sizes")
    if not (isinstance(manifest.get("classes"), list) and isinstance(manifest.get("fingerprint"), str)
            and isinstance(sizes, dict) and all(isinstance(sizes.get(s), int) for s in SPLITS)):
        raise TLError(f"{_join(root, MANIFEST)!r} lacks classes, sizes or fingerprint: it is damaged; rerun "
                      "python -m tl.shard")
    return manifest


def check_chunks(root: str, split: str) -> None:
    """Every chunk file the split's index lists is there, whole (size as indexed)."""
    try:
        index = json.loads(_read_bytes(root, f"{split}/index.json"))
        chunks = index["chunks"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TLError(f"{_join(root, split + '/index.json')!r} is missing or damaged ({type(e).__name__}): copy the "
                      "shard dataset again or rerun python -m tl.shard") from e
    if is_remote(root):
        return
    for c in chunks:
        path = Path(root) / split / c["filename"]
        try:
            size = path.stat().st_size
        except OSError:
            raise TLError(f"shard file {str(path)!r} is missing: copy the shard dataset again or rerun "
                          "python -m tl.shard") from None
        if size != int(c["chunk_bytes"]):
            raise TLError(f"shard file {str(path)!r} is {size} bytes, its index says {c['chunk_bytes']}: it is "
                          "truncated or damaged; copy the shard dataset again or rerun python -m tl.shard")


def read_meta(root: str, split: str) -> dict[str, np.ndarray]:
    try:
        with np.load(io.BytesIO(_read_bytes(root, meta_name(split))), allow_pickle=False) as z:
            return {k: z[k] for k in META_FIELDS}
    except Exception as e:  # noqa: BLE001 - OSError, ValueError, KeyError, zipfile.BadZipFile, ...
        raise TLError(f"{_join(root, meta_name(split))!r} is missing or damaged ({type(e).__name__}): rerun "
                      "python -m tl.shard") from e


class ShardSource:
    """A shard dataset written by `python -m tl.shard`: `data=shards data.root=DIR` (a local folder, or a URL LitData
    and fsspec can read, e.g. s3://bucket/prefix).

    Its splits are the ones made at conversion (the manifest records the recipe); the data module's
    val_fraction/test_fraction do not apply. Unreadable files were skipped at conversion and are listed in the
    manifest; they are reported here as `skipped_files`.
    """

    def __init__(self, root: str | Path | None):
        if root is None or not str(root).strip():
            raise TLError("data.root is empty: set it to a shard dataset folder written by python -m tl.shard, "
                          "e.g. data=shards data.root=DIR")
        self.root = str(root) if is_remote(root) else str(Path(root).expanduser())

    def load(self):
        from tl.data.sources import ImageSet

        manifest = _manifest(self.root)
        metas = {}
        for split in SPLITS:
            check_chunks(self.root, split)
            metas[split] = read_meta(self.root, split)
            expected = int(manifest["sizes"][split])
            if len(metas[split]["labels"]) != expected:
                raise TLError(f"{_join(self.root, meta_name(split))!r} lists {len(metas[split]['labels'])} records, "
                              f"the manifest {expected}: the dataset is inconsistent; rerun python -m tl.shard")
        targets = np.concatenate([metas[s]["labels"] for s in SPLITS]).astype(np.int64)
        classes = manifest.get("classes")
        train_labels = np.asarray(metas["train"]["labels"], dtype=np.int64)
        problem = ("its classes are not a list of names" if not isinstance(classes, list) or not classes else
                   "its classes repeat a name" if len({str(c) for c in classes}) != len(classes) else
                   f"labels run outside its {len(classes)} classes" if len(targets) and (
                       targets.min() < 0 or targets.max() >= len(classes)) else
                   "a class has no training record" if len(np.unique(train_labels)) != len(classes) else None)
        if problem:  # an edited manifest.json: training would crash or fit a head to classes that are not there
            raise TLError(f"shard dataset {self.root!r}: manifest.json does not match its records ({problem}): the "
                          "dataset was edited or is damaged; rerun python -m tl.shard")
        sizes = {s: len(metas[s]["labels"]) for s in SPLITS}
        given, start = {}, 0
        for s in SPLITS:
            given[s] = np.arange(start, start + sizes[s])
            start += sizes[s]
        store = ShardStore(self.root, sizes, np.concatenate([metas[s]["digests"] for s in SPLITS]),
                           np.concatenate([metas[s]["heights"] for s in SPLITS]),
                           np.concatenate([metas[s]["widths"] for s in SPLITS]), manifest["fingerprint"],
                           np.concatenate([metas[s]["ids"] for s in SPLITS]))
        skipped = manifest.get("skipped_files", {})
        log.info("Shards %s: %d classes; train %d, val %d, test %d (written %s from %s)", self.root,
                 len(manifest["classes"]), sizes["train"], sizes["val"], sizes["test"], manifest.get("created"),
                 manifest.get("source", {}).get("name", "?"))
        return ImageSet(classes=[str(c) for c in classes], targets=targets, store=store, given_splits=given,
                        skipped_files=list(skipped.get("first", [])))
