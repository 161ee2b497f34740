"""Models: backbone creation and pretrained sources, freeze policies, schedules, the LightningModule."""

from tl.models.module import TransferModule

__all__ = ["TransferModule"]
