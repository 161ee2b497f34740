"""Frozen-backbone features, computed once and reused.

When the backbone is frozen and the training transform is deterministic (a linear probe without augmentation),
every epoch would push the same images through the same network. Instead the pooled pre-logit features of train,
val and test are computed once each (lazily: a split when it is first needed, on the device the model is on by then),
stored on disk under a key that covers the model, its weights, the data, the transform and the split, and the head
trains on them. Any change to one of those makes a new key. The same features serve `scenario=auto`'s domain
measurement.

Training on features is exactly training on images, up to floating point: the feature loaders shuffle and batch like
the image loaders, and extraction leaves the global RNG as it found it, so both see the same batches and dropout
draws (tests/test_features.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tl.data.datamodule import collate_readable
from tl.errors import TLError
from tl.utils import atomic_path, file_identity

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: large files are decoded at the size the transform needs (tl.data.images.decode)


def _digest(h: hashlib._Hash, t: torch.Tensor) -> None:
    h.update(str((t.dtype, tuple(t.shape))).encode())
    h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())  # the buffer itself, no copy


def backbone_fingerprint(model: nn.Module, head_names: set[str]) -> str:
    """A hash of every backbone tensor (weights and BN statistics): changed weights, changed key."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        if k not in head_names:
            h.update(k.encode())
            _digest(h, v)
    return h.hexdigest()


def data_fingerprint(datamodule) -> str:
    """A hash of the images themselves (in memory) or of the files' paths and identities (`tl.utils.file_identity`)."""
    h = hashlib.sha256()
    images = datamodule.images
    if images.store is not None:  # shards: their manifest's fingerprint of the source and the split recipe
        h.update(images.store.fingerprint.encode())
    elif images.images is not None:
        _digest(h, images.images)
    else:
        for p in images.paths:
            st = os.stat(p)
            h.update(f"{p}|{file_identity(st)}".encode("utf-8", "surrogateescape"))
    _digest(h, torch.as_tensor(images.targets))
    return h.hexdigest()


def extract_features(model: nn.Module, loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled pre-logit features (what the classifier sees) and targets, the model in eval mode.

    Runs on the model's device. Leaves no trace: every module's train/eval mode and the global RNG are as they were.
    """
    modes = {m: m.training for m in model.modules()}  # frozen parts may be in eval while the rest trains
    model.eval()
    # NHWC convolutions: ~2x faster on CPUs (oneDNN) and GPUs alike. Outside inference mode (also when called from
    # inside one, e.g. a Lightning evaluation loop): the parameters must stay ordinary tensors (the model trains
    # afterwards).
    with torch.inference_mode(False):
        model.to(memory_format=torch.channels_last)
    feats, targets = [], []
    device = next(model.parameters()).device
    # Iterating a DataLoader draws a seed from the global RNG. The uncached run makes no such loaders, so drawing here
    # would shift its shuffling and dropout: with the state restored, cached and uncached runs see the same batches.
    try:
        with torch.inference_mode(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for batch in loader:
                if batch is None:  # every file of the batch unreadable since the scan (counted by the dataset)
                    continue
                x, y = batch
                x = x.to(device).contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x.to(device)
                f = model.forward_head(model.forward_features(x), pre_logits=True)
                feats.append(f.float().cpu())
                targets.append(y)
    finally:
        for m, training in modes.items():
            m.training = training
    return torch.cat(feats), torch.cat(targets)


def _check_not_a_delivery(cache_dir: Path) -> None:
    """paths.cache_dir must not be, or be inside, a folder of a training run's results (RUN/export, checkpoints,
    report, ...) or an exported model: the cache's entries would be written among another run's deliverables (found
    by a hostile tester: paths.cache_dir=OTHER_RUN/export filled it with feature files, exit 0)."""
    from tl.export import RUN_PARTS, _is_run, _is_tl_export

    target = cache_dir.expanduser().resolve(strict=False)
    for folder in (target, *target.parents):
        part = folder.name in ("export", *RUN_PARTS)
        if (part and _is_run(folder.parent)) or _is_tl_export(folder / "model.json"):
            raise TLError(f"paths.cache_dir={str(cache_dir)!r} is inside {str(folder)!r}, "
                          f"{'a training run' + chr(39) + 's ' + folder.name + '/' if part else 'an exported model'}: "
                          "the feature files would be written among its results; choose a folder of its own, e.g. "
                          "paths.cache_dir=logs/cache/features (the default)")


class FeatureCache:
    """Features per split for one (model, weights, data, transform, split) combination, stored in `cache_dir`."""

    def __init__(self, cache_dir: str | Path):
        self.cache_dir = Path(cache_dir)
        _check_not_a_delivery(self.cache_dir)

    def key(self, model: nn.Module, head_names: set[str], datamodule, split: str) -> str:
        from tl.data.transforms import eval_transform

        parts = {
            "version": CACHE_VERSION,
            "model": type(model).__name__,
            "weights": backbone_fingerprint(model, head_names),
            "data": data_fingerprint(datamodule),
            "transform": repr(eval_transform(datamodule.preprocess)),
            "indices": hashlib.sha256(datamodule.split_indices[split].tobytes()).hexdigest(),
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]

    def get(self, model: nn.Module, head_names: set[str], datamodule, splits=("train", "val", "test")) -> SplitFeatures:
        """{split: (features, targets)} for `splits`, each read from the cache or computed when first looked up.

        Lazily, so that a split is computed where and when it is needed: under a Trainer the data module's loaders
        look the splits up after the model has moved to its device (GPU extraction), and the test split costs nothing
        until a test runs (none with `test=false`).
        """
        return SplitFeatures(self, model, head_names, datamodule, splits)

    def load_or_extract(self, model: nn.Module, head_names: set[str], datamodule, split: str):
        """(features, targets) of one split: from the cache when it has the entry, else computed and stored."""
        path = self.cache_dir / f"{split}-{self.key(model, head_names, datamodule, split)}.pt"
        if path.is_file():
            try:
                data = torch.load(path, weights_only=True)
                feats, targets = data["features"], data["targets"]
                if len(feats) != len(targets) or len(targets) != len(datamodule.split_indices[split]):
                    raise ValueError("sizes do not match the split")
                log.info("Feature cache hit: %s (%s)", split, path.name)
                return feats, targets
            except Exception as e:  # noqa: BLE001 - truncated, garbled or foreign: recompute, never stop the run
                log.warning("Feature cache entry %s is unreadable (%s: %s): computing it again", path,
                            type(e).__name__, (str(e).splitlines() or [""])[0][:120])
                path.unlink(missing_ok=True)
        # On a CPU, the training batch size: what the uncached run pushes through the backbone, and larger batches
        # mostly spill the caches (EfficientNet-Lite0, 64 px, one thread of the 2-core CI CPU: 1.33 ms/image at
        # batch 64, 1.77 at 128).
        # On an accelerator, the evaluation batch size (larger batches, fewer launches).
        device = next(model.parameters()).device
        loader = DataLoader(datamodule.dataset(split, augmented=False),
                            batch_size=datamodule.batch_size if device.type == "cpu" else datamodule.eval_batch_size,
                            num_workers=datamodule._workers(), pin_memory=device.type == "cuda",
                            collate_fn=collate_readable)
        feats, targets = extract_features(model, loader)
        try:  # per process temporary name (ranks may write the same entry), renamed: never half an entry
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                torch.save({"features": feats, "targets": targets}, tmp)
            log.info("Feature cache write: %s %s (%s)", split, tuple(feats.shape), path.name)
        except (OSError, RuntimeError, TLError) as e:  # the cache is an optimisation: a full disk must not stop the run
            log.warning("Feature cache entry %s not written (%s): continuing without it", path,
                        (str(e).splitlines() or [""])[0][:160])
        return feats, targets


class SplitFeatures(Mapping):
    """{split: (features, targets)} from a `FeatureCache`, each split loaded or extracted once, on first lookup."""

    def __init__(self, cache: FeatureCache, model: nn.Module, head_names: set[str], datamodule, splits):
        self.cache, self.model, self.head_names, self.datamodule = cache, model, head_names, datamodule
        self.splits = tuple(splits)
        self._loaded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __getitem__(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if split not in self.splits:
            raise KeyError(split)
        if split not in self._loaded:
            self._loaded[split] = self.cache.load_or_extract(self.model, self.head_names, self.datamodule, split)
        return self._loaded[split]

    def __iter__(self):
        return iter(self.splits)

    def __len__(self) -> int:
        return len(self.splits)


class _FeatureTensors(TensorDataset):
    """Rows of feature tensors, fetched a whole batch at a time (one indexing op, not one per example + a stack)."""

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, ...]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return tuple(t[idx] for t in self.tensors)


def _as_batch(batch: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """The collate function for `_FeatureTensors`: its batches come ready-made."""
    return list(batch)


class FeatureDataModule(pl.LightningDataModule):
    """Loaders over cached features, batched like the image data module they came from.

    The same samplers as `TransferDataModule` (a shuffled `RandomSampler` drawing its seed from the global RNG, the
    same batch size and `drop_last`), so a head trained here sees exactly the batches it would see on images.
    """

    def __init__(self, features: Mapping, batch_size: int, eval_batch_size: int, train_sampler=None, source=None):
        super().__init__()
        self.features, self.batch_size, self.eval_batch_size = features, batch_size, eval_batch_size
        self.train_sampler = train_sampler  # (trainer) -> the image data module's training sampler, or None
        self.source = source  # the image data module the features came from: its state goes into checkpoints

    def state_dict(self) -> dict:
        """The image data module's (which shards a run trained on), so a resume or tl.evaluate can compare."""
        return self.source.state_dict() if self.source is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.source is not None:
            self.source.load_state_dict(state)

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        from tl.data.datamodule import eval_sampler

        ds = _FeatureTensors(*self.features[split])
        sampler = self.train_sampler(self.trainer) if shuffle and self.train_sampler is not None else None
        if sampler is not None:  # class-balanced: it draws the order itself
            return DataLoader(ds, batch_size=batch_size, sampler=sampler, collate_fn=_as_batch,
                              drop_last=len(sampler) % batch_size == 1)
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, sampler=eval_sampler(self.trainer, ds, shuffle),
                          collate_fn=_as_batch, drop_last=shuffle and len(ds) % batch_size == 1)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, shuffle=False)


def feature_cache_applies(cfg) -> bool:
    """Does the run `cfg` describes train on cached features? They are exact only for a frozen backbone fed a
    deterministic transform (a linear probe without augmentation)."""
    return bool(cfg.cache_features) and cfg.finetune.strategy == "linear_probe" and cfg.augment.name == "none"
