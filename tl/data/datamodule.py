"""The LightningDataModule: a source, seeded stratified splits, the small-data subset, and transforms."""

from __future__ import annotations

import hashlib
import logging
import math
import multiprocessing as mp
import os
import warnings
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate

from tl.data.audit import audit_splits
from tl.data.balance import balanced_sampler, class_weights, imbalance_ratio, resolve_balance
from tl.data.images import decode
from tl.data.sources import ImageSet
from tl.data.splits import make_splits, subset_per_class
from tl.data.transforms import decode_side, eval_transform, train_transform
from tl.errors import TLError
from tl.utils import build, to_plain

log = logging.getLogger(__name__)


def eval_sampler(trainer, ds: Dataset, shuffle: bool):
    """Under DDP, an unpadded sampler for val/test: Lightning's DistributedSampler pads with repeated examples, which
    synced metrics would count twice. Lightning keeps a DistributedSampler it finds. None elsewhere."""
    dist = trainer.distributed_sampler_kwargs if trainer is not None else None
    if shuffle or not dist or dist.get("num_replicas", 1) <= 1:
        return None
    from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler

    return UnrepeatedDistributedSampler(ds, shuffle=False, **dist)


DECODE_CACHE_MB = 256  # per process: reduced large files kept decoded (about 500 photos at 224 px, 4x more at 112)


class ImageDataset(Dataset):
    """Indexes into an `ImageSet`; images come from memory (uint8 tensors) or are decoded from disk on access.

    A file that was readable at the scan but fails now (deleted, truncated or replaced mid-run) is skipped and counted
    (`on_bad_file=skip`: the example is None, which `collate_readable` drops, and `unreadable` counts it across loader
    processes), or stops the run with one line naming it (`on_bad_file=error`).
    """

    def __init__(self, images: ImageSet, indices: np.ndarray, transform, on_bad_file: str = "skip",
                 unreadable=None, min_side: int | None = None, interpolation: str = "bicubic"):
        self.set, self.indices, self.transform = images, np.asarray(indices), transform
        # files are decoded no larger than the transform needs (tl.data.images.decode)
        self.min_side, self.interpolation = min_side, interpolation
        self._decoded: dict[int, Image.Image] = {}  # reduced large files, decoded once per process
        self._decoded_bytes = 0
        self.on_bad_file = on_bad_file
        self.unreadable = unreadable if unreadable is not None else mp.Value("i", 0)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_decoded": {}, "_decoded_bytes": 0}

    def __len__(self) -> int:
        return len(self.indices)

    def load_image(self, i: int) -> Image.Image:
        j = int(self.indices[i])
        if self.set.store is not None:  # LitData shards (tl.data.shards): damaged records stop with one line
            return self.set.store.open(j, self.min_side, self.interpolation)
        if self.set.images is not None:
            arr = self.set.images[j].permute(1, 2, 0).numpy()
            img = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
        else:  # any mode, EXIF orientation applied, large files reduced to what the transform needs (tl.data.images)
            if j in self._decoded:
                return self._decoded[j]
            img, reduced = decode(self.set.paths[j], self.min_side, self.interpolation)
            size = img.width * img.height * 3
            if reduced and self._decoded_bytes + size <= DECODE_CACHE_MB * 2**20:
                self._decoded[j] = img  # transforms return new images: the cached one is never changed
                self._decoded_bytes += size
            return img
        return img.convert("RGB")  # in-memory sources are uint8 grayscale or RGB

    def __getitem__(self, i: int):
        target = int(self.set.targets[self.indices[i]])
        if self.set.paths is None:  # in memory, or shards (their files were checked at conversion)
            return self.transform(self.load_image(i)), target
        try:
            return self.transform(self.load_image(i)), target
        except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, DecompressionBombError
            path = self.set.paths[int(self.indices[i])]
            why = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"
            if self.on_bad_file == "error":
                raise TLError(f"image file {path!r} cannot be decoded ({why}; changed since the scan, or damaged "
                              "where the scan's quick check of a large file could not see): restore or remove it, "
                              "or set data.on_bad_file=skip") from e
            with self.unreadable.get_lock():
                self.unreadable.value += 1
            log.warning("Skipped %s: it cannot be decoded (%s), though it passed the scan", path, why)
            return None


def collate_readable(batch: list):
    """`default_collate` without the examples that could not be read (None); None for a batch with none left."""
    batch = [b for b in batch if b is not None]
    return default_collate(batch) if batch else None


def build_datamodule(data: DictConfig | dict, preprocess: dict, augment: DictConfig | dict | None = None,
                     seed: int = 0) -> TransferDataModule:
    """The data module a data config (conf/data/) describes, preprocessing as `preprocess` says (the backbone's own
    from `tl.data.transforms.backbone_preprocess`, or a trained model's), augmented by `augment` (None: not at all)."""
    return build(data, preprocess=preprocess, augment=to_plain(augment), seed=seed, _convert_="all")


class TransferDataModule(pl.LightningDataModule):
    """Feeds train/val/test loaders for one source, split deterministically from `seed`.

    Args:
        source: an object with `load() -> ImageSet` (see `tl.data.sources`), usually built by Hydra.
        preprocess: the backbone's input size, interpolation, crop and mean/std (`backbone_preprocess`).
        image_size, crop_pct: override the backbone's input size and centre-crop fraction (e.g. for 8x8 digits).
        augment: the augmentation policy for training (a conf/augment/ node); None means none.
        val_fraction, test_fraction: parts of the data carved out (stratified) when the source gives no such split.
        samples_per_class: if set, train on this many examples per class, drawn from train only.
        mirror_invariant: False switches flips off (digits, text).
        batch_size: training batch size; evaluation uses `eval_batch_size` (default 2x).
        num_workers: loader processes; None picks 0 for in-memory data trained on the CPU, else the core count
            (max 8; on GPUs, per GPU of the node).
        seed: fixes splits and the subset.
        small_data_image_size: the dataset's resolution for few examples; the small-data presets put it in
            `image_size` (conf/scenario/small_*.yaml), so a command-line `data.image_size` still wins.
        root, on_bad_file, layout: where the data lives, what to do with unreadable files, and how an image
            folder's subfolders read (data.layout); the source reads them (through the config), they are kept here
            for the record.
        balance: none | weights | sampler | auto: how class imbalance in train is corrected (`tl.data.balance`);
            auto turns on at an imbalance ratio (largest / smallest training class) of `balance_auto_ratio` or more.
    """

    def __init__(self, source: Any, preprocess: dict, augment: dict | None = None, val_fraction: float = 0.15,
                 test_fraction: float = 0.15, samples_per_class: int | None = None, mirror_invariant: bool = True,
                 batch_size: int = 64, eval_batch_size: int | None = None, num_workers: int | None = None,
                 seed: int = 0, image_size: int | None = None, crop_pct: float | None = None,
                 root: str | None = None, on_bad_file: str = "skip", small_data_image_size: int | None = None,
                 layout: str = "auto",
                 balance: str = "none", balance_auto_ratio: float = 3.0):
        super().__init__()
        self.balance, self.balance_auto_ratio = balance, float(balance_auto_ratio)
        self.balance_mode = "none"  # what runs, once setup has measured train
        self.source, self.augment, self.root, self.on_bad_file = source, augment, root, on_bad_file
        self.preprocess = dict(preprocess)
        if image_size is not None:
            self.preprocess["input_size"] = [3, int(image_size), int(image_size)]
        if crop_pct is not None:
            self.preprocess["crop_pct"] = float(crop_pct)
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.samples_per_class, self.mirror_invariant, self.seed = samples_per_class, mirror_invariant, seed
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or 2 * batch_size)
        self.num_workers = num_workers
        self.images: ImageSet | None = None
        self.split_indices: dict[str, np.ndarray] = {}
        self.audit: dict = {}
        self.unreadable = mp.Value("i", 0)  # files that failed after the scan, counted by every loader process

    # -- loading ----------------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.split_indices:
            return
        if self.images is None:
            self.images = self.source.load()
        splits = make_splits(self.images.targets, self.images.given_splits, self.val_fraction, self.test_fraction,
                             self.seed, self.images.classes)
        splits["train"] = subset_per_class(splits["train"], self.images.targets, self.samples_per_class, self.seed,
                                           self.images.classes)
        for name, idx in splits.items():  # a source's given split can be empty: refused before anything trains
            if not len(idx):
                raise TLError(f"the {name} split of the data is empty: give it images, or leave it out so that it is "
                              "carved from train")
        self.audit = audit_splits(self.images, splits)  # one class, classes missing from a split, train/test copies
        self.split_indices = splits
        self._check_resumed_shards()
        log.info("Data: %d classes; train %d, val %d, test %d", self.num_classes,
                 *(len(splits[s]) for s in ("train", "val", "test")))
        counts = self.class_counts
        self.balance_mode = resolve_balance(self.balance, counts, self.balance_auto_ratio)
        imbalanced = self.balance_mode != "none" or imbalance_ratio(counts) >= self.balance_auto_ratio
        if imbalanced and stage in (None, "fit"):  # a training matter: evaluate and export set up without it
            log.info("Train classes: largest/smallest %.1f (%d/%d); data.balance=%s -> %s", imbalance_ratio(counts),
                     max(counts), min(counts), self.balance, self.balance_mode)

    # -- resuming -------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Saved in checkpoints: which shard dataset (its manifest's fingerprint) a run trained on, and a digest of
        its train/val/test split, so that a resume on another split is refused."""
        store = self.images.store if self.images is not None else None
        state = {"shards_fingerprint": store.fingerprint} if store is not None else {}
        if self.split_indices:
            state["splits_digest"] = self.splits_digest()
        return state

    def load_state_dict(self, state: dict) -> None:
        self._resumed_shards = state.get("shards_fingerprint")
        self._resumed_splits = state.get("splits_digest")
        self._check_resumed_shards()

    def splits_digest(self) -> str:
        """A digest of which examples are in train (the `samples_per_class` subset), val and test, with their labels:
        files by class folder and name (the data may move), in-memory images and shard records by index. Computed
        once (checkpoints are saved often; the splits are made once, in setup)."""
        if getattr(self, "_splits_digest", None) is not None:
            return self._splits_digest
        h = hashlib.sha256()
        names = None
        if self.images.paths is not None:
            names = [os.path.join(os.path.basename(os.path.dirname(p)), os.path.basename(p)) for p in self.images.paths]
        for split in ("train", "val", "test"):
            idx = np.sort(np.asarray(self.split_indices[split], dtype=np.int64))
            h.update(f"{split}:{len(idx)}:".encode())
            h.update(self.images.targets[idx].astype(np.int64).tobytes())
            if names is None:
                h.update(idx.tobytes())
            else:
                h.update("\n".join(names[i] for i in idx).encode("utf-8", "surrogateescape"))
        self._splits_digest = h.hexdigest()[:16]
        return self._splits_digest

    def _check_resumed_shards(self) -> None:
        expected = getattr(self, "_resumed_shards", None)
        store = self.images.store if self.images is not None else None
        if expected and store is not None and store.fingerprint != expected:
            raise TLError(f"the checkpoint was trained on other shards than data.root={store.root!r} holds now "
                          "(converted again from other input, or another dataset): resume with the shards it "
                          "started on, or start a new run")
        splits = getattr(self, "_resumed_splits", None)
        if splits and self.split_indices and self.splits_digest() != splits:
            raise TLError("the checkpoint was trained on another split of the data than this run makes (data.root, "
                          "seed, data.samples_per_class, data.val_fraction or data.test_fraction differ, or files were "
                          "added or removed): its test split could hold training images; resume with the run's own "
                          "settings (its config.yaml) and data, or start a new run")

    # -- class balance ----------------------------------------------------------------------------------------
    @property
    def class_counts(self) -> list[int]:
        """Training examples per class, in class order."""
        train = self.images.targets[self.split_indices["train"]]
        return np.bincount(np.asarray(train), minlength=self.num_classes).tolist()

    @property
    def loss_weights(self) -> list[float] | None:
        """Per-class cross-entropy weights when `balance` resolved to weights, else None."""
        return class_weights(self.class_counts) if self.balance_mode == "weights" else None

    def balance_report(self) -> dict:
        """For results.json: the imbalance measured on train and the correction that ran."""
        counts = self.class_counts
        ratio = imbalance_ratio(counts)
        return {"imbalance_ratio": ratio if math.isfinite(ratio) else None,  # None: a class has no training example
                "balance": {"asked": self.balance, "mode": self.balance_mode, "auto_ratio": self.balance_auto_ratio,
                            "train_class_counts": dict(zip(self.classes, counts, strict=True))}}

    def train_sampler(self, trainer=None):
        """The class-balanced sampler when `balance` resolved to sampler (for this process under DDP), else None."""
        if self.balance_mode != "sampler":
            return None
        targets = self.images.targets[self.split_indices["train"]]
        return balanced_sampler(trainer, targets, self.num_classes, self.seed)

    @property
    def num_classes(self) -> int:
        return len(self.images.classes)

    @property
    def classes(self) -> list[str]:
        return list(self.images.classes)

    @property
    def skipped_files(self) -> list[str]:
        return list(self.images.skipped_files) if self.images else []

    @property
    def ignored_files(self) -> list[str]:
        return list(self.images.ignored_files) if self.images else []

    def dataset(self, split: str, augmented: bool | None = None) -> ImageDataset:
        """The dataset for `split`; training data is augmented by the policy unless `augmented=False`."""
        augmented = (split == "train") if augmented is None else augmented
        tf = (train_transform(self.preprocess, self.augment, self.mirror_invariant) if augmented
              else eval_transform(self.preprocess))
        side = decode_side(self.preprocess, self.augment if augmented else None)
        return ImageDataset(self.images, self.split_indices[split], tf, self.on_bad_file, self.unreadable, side,
                            str(self.preprocess.get("interpolation") or "bicubic"))

    # -- loaders ----------------------------------------------------------------------------------------------
    def _workers(self) -> int:
        if self.num_workers is not None:
            return int(self.num_workers)
        cores = os.cpu_count() or 1
        if self.images.images is None:
            return min(8, cores)
        # In-memory images are cheap to transform: on the CPU, extra processes would only compete with the model for
        # cores. A GPU consumes images faster than one process augments them (the default digits run on an H200 took
        # 85 s to fit, 180 images/s from the main process, with the GPU mostly idle), so there they get workers,
        # the cores shared among the node's GPUs.
        device = getattr(getattr(self.trainer, "strategy", None), "root_device", None)
        if getattr(device, "type", None) == "cuda":
            return max(1, min(8, cores // max(1, int(getattr(self.trainer, "num_devices", 1) or 1))))
        return 0

    @property
    def streams_train(self) -> bool:
        """Train is streamed from LitData shards: a shard source, all of train (no `samples_per_class` subset) and no
        class-balanced sampler (those draw examples by index, which the shards also serve, without streaming)."""
        store = self.images.store if self.images is not None else None
        return (store is not None and self.balance_mode != "sampler"
                and len(self.split_indices["train"]) == store.sizes["train"])

    def _stream_loader(self):
        """Train from shards: LitData's StreamingDataset (disjoint shares per DDP rank, shuffled by chunk and within
        chunks from the seed and the epoch) and StreamingDataLoader, whose position Lightning saves in checkpoints,
        so a run resumed mid-epoch reads exactly the records an uninterrupted run would. Batches are (images,
        labels, record ids)."""
        from litdata import StreamingDataLoader

        from tl.data.shards import ShardSample

        # LitData gives each loader process its own share, so the length Lightning doubts is right
        warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")

        store = self.images.store
        tf = train_transform(self.preprocess, self.augment, self.mirror_invariant)
        side = decode_side(self.preprocess, self.augment)
        interpolation = str(self.preprocess.get("interpolation") or "bicubic")
        stream = store.stream(ShardSample(tf, store.root, side, interpolation, store.train_digests()), self.seed)
        return StreamingDataLoader(stream, batch_size=self.batch_size, num_workers=self._workers(),
                                   pin_memory=torch.cuda.is_available())

    def _loader(self, ds: Dataset, batch_size: int, shuffle: bool, sampler=None) -> DataLoader:
        """`sampler`: a training sampler that draws the order itself (class-balanced); else shuffled or in order."""
        workers = self._workers()
        train = shuffle or sampler is not None
        # Drop only a last batch of one: BatchNorm cannot train on it; keep every other example.
        drop_last = train and len(sampler if sampler is not None else ds) % batch_size == 1
        if sampler is None:
            sampler = eval_sampler(self.trainer, ds, shuffle)
        else:
            shuffle = False
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, sampler=sampler,
                          num_workers=workers, collate_fn=collate_readable,
                          persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(), drop_last=drop_last)

    def train_dataloader(self) -> DataLoader:
        if self.streams_train:
            return self._stream_loader()
        sampler = self.train_sampler(self.trainer)  # class-balanced, or None: shuffled
        return self._loader(self.dataset("train"), self.batch_size, shuffle=True, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("val"), self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("test"), self.eval_batch_size, shuffle=False)
