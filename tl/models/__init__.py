"""Models: backbone creation and pretrained sources, freeze policies, schedules, the LightningModule.

`TransferModule` loads on first use (PEP 562), so light modules here (`tl.models.strategies`) import without Lightning.
"""

from importlib import import_module

__all__ = ["TransferModule"]


def __getattr__(name: str):
    if name == "TransferModule":
        return import_module("tl.models.module").TransferModule
    raise AttributeError(f"module 'tl.models' has no attribute {name!r}")
