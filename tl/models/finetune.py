"""Which parameters train, and at what learning rate.

Strategies (`finetune.strategy`):
- `linear_probe`: the backbone is frozen; only the new classifier trains.
- `partial`: the last `trainable_stages` stages of the backbone train with the classifier; earlier stages are frozen.
- `full`: everything trains.
- `gradual`: a linear probe for `lp_epochs` epochs, then one more backbone stage every `unfreeze_every` epochs, from
  the top down (ULMFiT's gradual unfreezing);
- `lp_ft`: a linear probe for `lp_epochs` epochs, then everything trains (LP-FT, Kumar et al. 2022).
The staged strategies are driven by `tl.callbacks.unfreezing.ScheduledUnfreezing`; here they start frozen.
Stages come from timm's own `group_matcher(coarse=True)` (stem, stage 1..n, head), so the same code works for
ResNets, EfficientNets, ConvNeXts and ViTs. Frozen parameters never reach the optimizer, and modules that are wholly
frozen stay in eval mode (BatchNorm running statistics and dropout frozen too).
"""

from __future__ import annotations

import math

from torch import nn

from tl.errors import TLError
from tl.models.backbone import classifier_names
from tl.models.strategies import STAGED, STRATEGIES


def stage_groups(model: nn.Module) -> list[list[str]]:
    """Parameter names grouped stem-first by timm's coarse group matcher; the classifier is the last group."""
    from timm.models import group_parameters

    head = classifier_names(model)
    groups = [[n for n in names if n not in head] for names in
              group_parameters(model, model.group_matcher(coarse=True)).values()]
    return [g for g in groups if g] + [sorted(head)]


def trainable_stage_count(strategy: str, n_stages: int, epoch: int = 0, trainable_stages: int = 1,
                          lp_epochs: int = 0, unfreeze_every: int = 1) -> int:
    """How many of the backbone's `n_stages` last stages train at `epoch` under `strategy`."""
    if strategy not in STRATEGIES:
        raise TLError(f"finetune.strategy={strategy!r} is unknown: use one of {', '.join(STRATEGIES)}")
    if strategy == "partial" and not 1 <= int(trainable_stages) <= n_stages:
        raise TLError(f"finetune.trainable_stages={trainable_stages}: this backbone has {n_stages} stages "
                      f"(stem included); use 1..{n_stages}")
    if strategy in STAGED and (int(lp_epochs) < 0 or int(unfreeze_every) < 1):
        raise TLError(f"finetune.lp_epochs={lp_epochs}, finetune.unfreeze_every={unfreeze_every}: use lp_epochs >= 0 "
                      "and unfreeze_every >= 1")
    if strategy == "full":
        return n_stages
    if strategy == "partial":
        return int(trainable_stages)
    if strategy == "linear_probe" or epoch < int(lp_epochs):
        return 0
    if strategy == "lp_ft":
        return n_stages
    return min(n_stages, 1 + (epoch - int(lp_epochs)) // int(unfreeze_every))  # gradual


def apply_strategy(model: nn.Module, strategy: str, trainable_stages: int = 1, lp_epochs: int = 0,
                   unfreeze_every: int = 1) -> None:
    """Set `requires_grad` for `strategy` at the start of training (see module docstring)."""
    groups = stage_groups(model)
    backbone = groups[:-1]
    k = trainable_stage_count(strategy, len(backbone), 0, trainable_stages, lp_epochs, unfreeze_every)
    trainable = {n for g in backbone[len(backbone) - k:] + groups[-1:] for n in g}  # k = 0: the head only
    for n, p in model.named_parameters():
        p.requires_grad_(n in trainable)


def set_frozen_modules_eval(model: nn.Module) -> None:
    """Put every module whose parameters are all frozen into eval mode (BN statistics, dropout, drop-path).

    Top-down: a frozen module's eval() covers its whole subtree, which is then not walked again (a frozen
    EfficientNet-Lite0 is one call, not 246 nested parameter scans: this runs at every epoch start).
    """
    params = list(model.parameters())
    if params and not any(p.requires_grad for p in params):
        model.eval()
        return
    for child in model.children():
        set_frozen_modules_eval(child)


def param_groups(model: nn.Module, lr: float, backbone_lr_mult: float = 1.0, weight_decay: float = 0.0,
                 layer_decay: float | None = None, only: set[str] | None = None,
                 name_suffix: str = "") -> list[dict]:
    """Optimizer groups for the trainable parameters.

    The classifier gets `lr`; the backbone `lr * backbone_lr_mult`, further scaled by layer-wise decay when
    `layer_decay` is set (timm's `param_groups_layer_decay`, BEiT's rule: `layer_decay ** k` for the layer k blocks
    below the top, from timm's fine-grained `group_matcher`; group `backbone.k`). Biases and normalisation weights
    (1-d tensors) and the model's `no_weight_decay()` names get no weight decay. `only` restricts the groups to those
    parameter names (staged unfreezing adds groups later); `name_suffix` keeps their names unique. The config is
    validated before (tl.checks): lr > 0, the rest >= 0.
    """
    head = set(stage_groups(model)[-1])
    no_weight_decay = set(getattr(model, "no_weight_decay", lambda: set())())
    layers_down: dict[str, int] = {}  # layer-wise decay: how many layers below the top each parameter sits
    if layer_decay:
        from timm.optim import param_groups_layer_decay

        names = {id(p): n for n, p in model.named_parameters()}
        for group in param_groups_layer_decay(model, weight_decay, layer_decay=layer_decay):
            k = round(math.log(group["lr_scale"]) / math.log(layer_decay)) if layer_decay < 1 else 0
            layers_down.update({names[id(p)]: k for p in group["params"]})
    buckets: dict[tuple, dict] = {}
    for n, p in model.named_parameters():
        if not p.requires_grad or (only is not None and n not in only):
            continue
        is_head = n in head
        k = layers_down.get(n, 0)
        scale = 1.0 if is_head else backbone_lr_mult * (layer_decay ** k if layer_decay else 1.0)
        no_decay = p.ndim <= 1 or n in no_weight_decay
        key = ("head" if is_head else f"backbone{'.' + str(k) if layer_decay else ''}", no_decay)
        name = f"{key[0]}{'/no_decay' if no_decay else ''}{name_suffix}"
        group = buckets.setdefault(key, {"name": name, "params": [], "lr": lr * scale,
                                         "weight_decay": 0.0 if no_decay else weight_decay})
        group["params"].append(p)
    return list(buckets.values())
