"""Frozen-backbone features, computed once and reused.

When the backbone is frozen and the training transform is deterministic (a linear probe without augmentation),
every epoch would push the same images through the same network. Instead the pooled pre-logit features of train,
val and test are computed once, stored on disk under a key that covers the model, its weights, the data, the
transform and the split, and the head trains on them. Any change to one of those makes a new key.
The same features serve `scenario=auto`'s domain measurement.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

log = logging.getLogger(__name__)

CACHE_VERSION = 1


def _digest(h: hashlib._Hash, t: torch.Tensor) -> None:
    h.update(str((t.dtype, tuple(t.shape))).encode())
    h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def backbone_fingerprint(model: nn.Module, head_names: set[str]) -> str:
    """A hash of every backbone tensor (weights and BN statistics): changed weights, changed key."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        if k not in head_names:
            h.update(k.encode())
            _digest(h, v)
    return h.hexdigest()


def data_fingerprint(datamodule) -> str:
    """A hash of the images themselves (in memory) or of the files' paths, sizes and mtimes."""
    h = hashlib.sha256()
    images = datamodule.images
    if images.images is not None:
        _digest(h, images.images)
    else:
        for p in images.paths:
            st = os.stat(p)
            h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode())
    _digest(h, torch.as_tensor(images.targets))
    return h.hexdigest()


@torch.inference_mode()
def extract_features(model: nn.Module, loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled pre-logit features (what the classifier sees) and targets, the model in eval mode."""
    was_training = model.training
    model.eval()
    feats, targets = [], []
    device = next(model.parameters()).device
    for x, y in loader:
        f = model.forward_head(model.forward_features(x.to(device)), pre_logits=True)
        feats.append(f.float().cpu())
        targets.append(y)
    model.train(was_training)
    return torch.cat(feats), torch.cat(targets)


class FeatureCache:
    """Features per split for one (model, weights, data, transform, split) combination, stored in `cache_dir`."""

    def __init__(self, cache_dir: str | Path):
        self.cache_dir = Path(cache_dir)

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

    def get(self, model: nn.Module, head_names: set[str], datamodule, splits=("train", "val", "test")) -> dict:
        """{split: (features, targets)}; computed where the cache has no entry, loaded where it has."""
        out = {}
        for split in splits:
            path = self.cache_dir / f"{split}-{self.key(model, head_names, datamodule, split)}.pt"
            if path.is_file():
                data = torch.load(path, weights_only=True)
                out[split] = (data["features"], data["targets"])
                log.info("Feature cache hit: %s (%s)", split, path.name)
                continue
            loader = DataLoader(datamodule.dataset(split, augmented=False), batch_size=datamodule.eval_batch_size,
                                num_workers=datamodule._workers())
            feats, targets = extract_features(model, loader)
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")  # per process: ranks may write the same entry
            torch.save({"features": feats, "targets": targets}, tmp)
            os.replace(tmp, path)  # atomic: a killed run never leaves half a cache entry
            log.info("Feature cache write: %s %s (%s)", split, tuple(feats.shape), path.name)
            out[split] = (feats, targets)
        return out


class FeatureDataModule(pl.LightningDataModule):
    """Loaders over cached features, batched like the image data module they came from."""

    def __init__(self, features: dict, batch_size: int, eval_batch_size: int):
        super().__init__()
        self.features, self.batch_size, self.eval_batch_size = features, batch_size, eval_batch_size

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        from tl.data.datamodule import eval_sampler

        ds = TensorDataset(*self.features[split])
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, sampler=eval_sampler(self.trainer, ds, shuffle),
                          drop_last=shuffle and len(ds) % batch_size == 1)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, shuffle=False)
