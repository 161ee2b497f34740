"""Staged fine-tuning: gradual unfreezing and LP-FT, as a Lightning `BaseFinetuning` callback.

Both strategies start as a linear probe (`tl.models.finetune.apply_strategy`) and open the backbone on a schedule:
- `gradual` (Howard & Ruder 2018, ULMFiT): after `finetune.lp_epochs` head-only epochs, one more backbone stage
  unfreezes every `finetune.unfreeze_every` epochs, from the top down;
- `lp_ft` (Kumar et al. 2022): after `finetune.lp_epochs` head-only epochs the whole backbone unfreezes at once, so
  fine-tuning starts from a trained head instead of a random one and distorts the pretrained features less.

Newly unfrozen parameters join the optimizer as new param groups at the LR the static strategies would give them
(`backbone_lr_mult`, `layer_decay`, no weight decay on norms and biases), placed at the schedule's current point;
the LR scheduler is extended to drive them. Under DDP the module is re-wrapped so the new parameters are averaged
across ranks (DDP registers only those that required grad when it was built). The groups added so far are part of
the callback's state (Lightning's `BaseFinetuning` saves them in checkpoints), so a resumed run rebuilds them
before the optimizer state is loaded.
"""

from __future__ import annotations

import logging

import pytorch_lightning as pl
from pytorch_lightning.callbacks import BaseFinetuning
from torch.optim import Optimizer

from tl.models.finetune import STAGED, param_groups, stage_groups, trainable_stage_count

log = logging.getLogger(__name__)


def rewrap_ddp(trainer: pl.Trainer) -> None:
    """Wrap the LightningModule in a fresh DistributedDataParallel, so parameters unfrozen since it was wrapped are
    registered for gradient averaging (DDP only registers those with requires_grad=True at construction).

    Uses Lightning's own `DDPStrategy.configure_ddp`; every rank calls it at the same hook (DDP's constructor is a
    collective that broadcasts rank 0's weights).
    """
    from torch.nn.parallel import DistributedDataParallel

    strategy = trainer.strategy
    if isinstance(strategy.model, DistributedDataParallel):
        strategy.model = strategy.model.module
        strategy.configure_ddp()


def sync_schedulers(trainer: pl.Trainer, optimizer: Optimizer) -> None:
    """Extend the LR schedulers of `optimizer` to param groups added after they were built.

    torch schedulers keep one base LR (and for LambdaLR one factor function) per group and zip them with the
    optimizer's groups, so a group they don't know would keep its LR forever. New groups get their own LR as base
    and the first group's factor, and start at the schedule's current point.
    """
    groups = optimizer.param_groups
    for config in trainer.lr_scheduler_configs:
        scheduler = config.scheduler
        if scheduler.optimizer is not optimizer:
            continue
        if hasattr(scheduler, "lr_lambdas") and len(scheduler.lr_lambdas) < len(groups):
            # LambdaLR: the same factor for every group (a resumed run restores base LRs but not the functions)
            scheduler.lr_lambdas = [*scheduler.lr_lambdas,
                                    *[scheduler.lr_lambdas[0]] * (len(groups) - len(scheduler.lr_lambdas))]
        known = len(scheduler.base_lrs)
        if known >= len(groups):
            continue
        progress = groups[0]["lr"] / scheduler.base_lrs[0] if scheduler.base_lrs[0] else 1.0
        for group in groups[known:]:
            group.setdefault("initial_lr", group["lr"])
            group["lr"] = group["initial_lr"] * progress
        scheduler.base_lrs = [*scheduler.base_lrs, *(g["initial_lr"] for g in groups[known:])]
        scheduler._last_lr = [g["lr"] for g in groups]


class ScheduledUnfreezing(BaseFinetuning):
    """Open the backbone stage by stage (`gradual`) or all at once (`lp_ft`) as `TransferModule`'s hparams say.

    The schedule lives in the module's hyperparameters (`strategy`, `lp_epochs`, `unfreeze_every`), so a checkpoint
    carries it. The callback is an entry of the default callbacks (conf/callbacks/) and stays idle under the static
    strategies (linear_probe, partial, full): their trainable set never changes.
    """

    @staticmethod
    def active(pl_module: pl.LightningModule) -> bool:
        return pl_module.hparams.get("strategy") in STAGED

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.active(pl_module):
            super().on_train_epoch_start(trainer, pl_module)

    def freeze_before_training(self, pl_module: pl.LightningModule) -> None:
        pass  # the module starts frozen already (apply_strategy: staged strategies begin as a linear probe)

    def stages_at(self, pl_module: pl.LightningModule, epoch: int) -> int:
        hp = pl_module.hparams
        return trainable_stage_count(hp.strategy, len(stage_groups(pl_module.model)) - 1, epoch=epoch,
                                     lp_epochs=hp.lp_epochs, unfreeze_every=hp.unfreeze_every,
                                     trainable_stages=hp.trainable_stages)

    def finetune_function(self, pl_module: pl.LightningModule, epoch: int, optimizer: Optimizer) -> None:
        backbone = stage_groups(pl_module.model)[:-1]
        k = self.stages_at(pl_module, epoch)
        due = {n for g in backbone[len(backbone) - k:] for n in g} if k else set()
        params = dict(pl_module.model.named_parameters())
        new = sorted(n for n in due if not params[n].requires_grad)
        if not new:
            return
        for n in new:
            params[n].requires_grad_(True)
        hp = pl_module.hparams
        head_lr = next(g.get("initial_lr", g["lr"]) for g in optimizer.param_groups if g["name"].startswith("head"))
        weight_decay = float((hp.optimizer or {}).get("weight_decay") or 0.0)
        for group in param_groups(pl_module.model, head_lr, hp.backbone_lr_mult, weight_decay, hp.layer_decay,
                                  only=set(new), name_suffix=f"@epoch{epoch}"):
            group["initial_lr"] = group["lr"]
            optimizer.add_param_group(group)
        sync_schedulers(pl_module.trainer, optimizer)
        pl_module.train()  # the unfrozen stages leave eval mode (their BatchNorm statistics adapt from now on)
        rewrap_ddp(pl_module.trainer)
        log.info("epoch %d: %d of %d backbone stages train (%d tensors unfrozen)", epoch, k, len(backbone), len(new))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.active(pl_module):
            self._restarting = False
            return
        restarting = self._restarting
        super().on_fit_start(trainer, pl_module)  # a resumed run: the saved param groups are rebuilt
        if restarting:
            for optimizer in trainer.optimizers:
                for group in optimizer.param_groups:
                    for p in group["params"]:
                        p.requires_grad_(True)
            pl_module.train()
            rewrap_ddp(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After a resume the scheduler state was loaded after on_fit_start: extend it to the rebuilt groups.
        for optimizer in trainer.optimizers:
            sync_schedulers(trainer, optimizer)
