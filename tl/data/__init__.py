"""Data: sources, splits, transforms and the LightningDataModule.

The names below load on first use (PEP 562): `tl.data.images` (PIL and numpy only) is imported by the ONNX Runtime
prediction path, which must not pull in torch, Lightning or timm through this package.
"""

from importlib import import_module

_EXPORTS = {
    "ImageDataset": "tl.data.datamodule", "TransferDataModule": "tl.data.datamodule",
    "DigitsSource": "tl.data.sources", "ImageFolderSource": "tl.data.sources", "ImageSet": "tl.data.sources",
    "SyntheticSource": "tl.data.sources", "TorchvisionSource": "tl.data.sources",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tl.data' has no attribute {name!r}")
