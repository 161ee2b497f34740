"""Callbacks whose findings belong in results.json."""

from __future__ import annotations

from typing import Any

from pytorch_lightning.callbacks import Callback


class ReportingCallback(Callback):
    """A callback that reports what it found as flat keys in `results` (e.g. `sanity/initial_loss`);
    `tl.results.collect_results` gathers them from every such callback of the run."""

    def __init__(self) -> None:
        self.results: dict[str, Any] = {}
