"""Learning-rate range test (Lightning's `Tuner.lr_find`) that respects tl's per-group learning rates.

Lightning's finder sweeps one LR for every param group. tl trains the backbone at `backbone_lr_mult` (and optional
layer-wise decay) times the head's LR, so a uniform sweep would push the backbone far harder than training will and
suggest too low a head LR. Here the sweep moves the head's LR and keeps each group's ratio to it, so the suggestion
is directly `optimizer.lr`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.tuner import Tuner

log = logging.getLogger(__name__)


FAR = 100.0  # lr_find=apply keeps the configured LR when the suggestion is more than this factor away from it
MIN_BATCHES = 3  # lr_find=apply below this many training batches keeps the configured LR (and says so)


def _lr_ratios(module: pl.LightningModule) -> dict[str, float]:
    """Each param group's LR relative to the head's, by group name, as `configure_optimizers` will build them."""
    from tl.models.finetune import param_groups

    hp = module.hparams
    if not hasattr(module, "model") or "backbone_lr_mult" not in hp:
        return {}
    groups = param_groups(module.model, 1.0, hp.backbone_lr_mult, 0.0, hp.get("layer_decay"))
    return {g["name"]: g["lr"] for g in groups}


def find_lr(trainer_factory: Callable[[], pl.Trainer], module: pl.LightningModule, datamodule: pl.LightningDataModule,
            apply: bool, out_dir: str | Path | None = None, min_lr: float = 1e-7, max_lr: float = 1.0,
            num_training: int = 100, **lr_find_kwargs: Any) -> dict[str, Any]:
    """Run the LR range test on a throw-away trainer; plot it; optionally make the suggestion the head's LR.

    The module's weights are restored afterwards (Lightning checkpoints and reloads them), so training starts from
    the same initialisation either way.

    Args:
        trainer_factory: builds a fresh Trainer for the sweep (no loggers or checkpoints needed); it is used up.
        module: a `TransferModule` (the suggestion goes to `hparams.optimizer["lr"]`).
        datamodule: the data to sweep on.
        apply: write the suggestion into the module's optimizer config.
        out_dir: where `lr_find.png` goes (none: no plot).
        min_lr, max_lr, num_training: the sweep (exponential, one LR per optimizer step).
        **lr_find_kwargs: passed to `Tuner.lr_find` (e.g. `mode`, `early_stop_threshold`).

    Returns:
        `lr_find/suggestion` (None when the curve gives none), `lr_find/lr_before`, `lr_find/applied` and
        `lr_find/plot`, flat keys ready for results.json.
    """
    trainer = trainer_factory()
    # Enough epochs for num_training steps however short an epoch is (the sweep stops at num_training steps).
    # Not -1 (endless): the module's own schedule, built and then replaced by the finder's, needs a finite length.
    trainer.fit_loop.max_epochs = max(trainer.max_epochs or 1, num_training)
    trainer.check_val_every_n_epoch = trainer.fit_loop.max_epochs + 1  # the sweep needs no validation
    ratios = _lr_ratios(module)
    original_hook = module.on_before_optimizer_step

    def keep_ratios(optimizer) -> None:
        # The finder's scheduler sets every group to the swept LR in closed form each step; scale them just before
        # the update so the backbone moves at its usual fraction of the head's LR.
        for group in optimizer.param_groups:
            group["lr"] *= ratios.get(group.get("name"), 1.0)
        original_hook(optimizer)

    module.on_before_optimizer_step = keep_ratios
    try:
        finder = Tuner(trainer).lr_find(module, datamodule=datamodule, min_lr=min_lr, max_lr=max_lr,
                                        num_training=num_training, update_attr=False, **lr_find_kwargs)
    finally:
        del module.on_before_optimizer_step  # back to the class's method

    optimizer_cfg = module.hparams.get("optimizer")
    before = float(optimizer_cfg["lr"]) if optimizer_cfg and "lr" in optimizer_cfg else None
    # Lightning skips the first 10 points as warm-up noise; short sweeps (tests, tiny data) keep more of theirs.
    suggestion = finder.suggestion(skip_begin=min(10, num_training // 5)) if finder is not None else None
    result: dict[str, Any] = {"lr_find/suggestion": suggestion, "lr_find/lr_before": before,
                              "lr_find/applied": False, "lr_find/plot": None}
    if finder is not None and out_dir is not None and trainer.is_global_zero:
        from tl.utils import pyplot

        plt = pyplot()

        fig = finder.plot(suggest=suggestion is not None)
        ax = fig.axes[0]
        ax.set_title(f"LR range test: suggested optimizer.lr = {suggestion:.2g}" if suggestion else "LR range test")
        ax.set_xlabel("head learning rate (backbone groups keep their ratio to it)")
        ax.set_ylabel("training loss (smoothed)")
        path = Path(out_dir) / "lr_find.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        result["lr_find/plot"] = str(path)
    batches = getattr(trainer, "num_training_batches", None)
    few = isinstance(batches, (int, float)) and batches < MIN_BATCHES
    if suggestion is None:
        log.warning("LR finder: no suggestion (the loss curve had no clear descent); keeping optimizer.lr=%s", before)
    elif apply and few:  # the sweep steps over the same one or two batches again and again: it measures memorising
        result["lr_find/not_applied"] = (f"the training split is {int(batches)} batch(es): a range test on it does "
                                         "not transfer")
        log.warning("LR finder: suggests optimizer.lr=%.3g, not applied: the training split is %d batch(es) of "
                    "data.batch_size (at least %d needed for a range test that means something); keeping "
                    "optimizer.lr=%s", suggestion, int(batches), MIN_BATCHES, before)
    elif apply and before and not before / FAR <= suggestion <= before * FAR:
        # found by a hostile tester: a sweep over 5 batches of 2 images diverged early and suggested 700x below the
        # preset's rate; applied, the run trained to chance with exit 0
        result["lr_find/not_applied"] = (f"the suggestion is more than {FAR:g}x from the configured rate, which a "
                                         "range test on this data does not support (see lr_find.png)")
        log.warning("LR finder: suggests optimizer.lr=%.3g, not applied: more than %gx from optimizer.lr=%s; a range "
                    "test that far off is usually noise (small batches, few steps; see lr_find.png); set "
                    "optimizer.lr yourself to use it", suggestion, FAR, before)
    elif apply and optimizer_cfg is not None:
        optimizer_cfg["lr"] = float(suggestion)  # configure_optimizers reads it; the checkpoint records it
        result["lr_find/applied"] = True
        log.info("LR finder: optimizer.lr %s -> %.3g (applied)", before, suggestion)
    else:
        log.info("LR finder: suggests optimizer.lr=%.3g (now %s); rerun with it, or with lr_find=apply",
                 suggestion, before)
    return result
