"""Data: sources, splits, transforms and the LightningDataModule."""

from tl.data.datamodule import ImageDataset, TransferDataModule
from tl.data.sources import DigitsSource, ImageFolderSource, ImageSet, SyntheticSource, TorchvisionSource

__all__ = ["DigitsSource", "ImageDataset", "ImageFolderSource", "ImageSet", "SyntheticSource", "TorchvisionSource",
           "TransferDataModule"]
