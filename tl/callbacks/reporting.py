"""Callbacks whose findings belong in results.json."""

from __future__ import annotations

from typing import Any

from pytorch_lightning.callbacks import Callback


class ReportingCallback(Callback):
    """A callback that reports what it found as flat keys in `results` (e.g. `sanity/initial_loss`);
    `tl.results.collect_results` gathers them from every such callback of the run.

    The findings are saved in every checkpoint and restored with it, so a run resumed after them (the initial loss
    is measured at the first step only) still reports them: before, a run interrupted after its training (during
    the export) and finished with `ckpt_path=auto` lost its `sanity/initial_loss*` keys."""

    def __init__(self) -> None:
        self.results: dict[str, Any] = {}

    def state_dict(self) -> dict[str, Any]:
        return {"results": dict(self.results)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.results = {**dict(state_dict.get("results") or {}), **self.results}
