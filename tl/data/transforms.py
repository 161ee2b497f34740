"""Preprocessing from the backbone's own pretrained config, plus the augmentation policy.

The backbone decides input size, interpolation, crop and mean/std (timm's `pretrained_cfg`); train and eval use the
same normalisation. Augmentation policies (conf/augment/) are arguments to timm's `create_transform`.
"""

from __future__ import annotations

import math
from typing import Any

import timm
from timm.data import create_transform, resolve_data_config

from tl.errors import TLError


def backbone_preprocess(model_name: str) -> dict:
    """Input size, interpolation, crop and mean/std for `model_name`, from its pretrained config (no weights built)."""
    try:
        pretrained_cfg = timm.get_pretrained_cfg(model_name)
    except Exception:  # noqa: BLE001 - timm raises various errors for odd names
        pretrained_cfg = None
    if pretrained_cfg is None and not timm.is_model(model_name):
        raise TLError(_unknown_model_message(model_name))
    cfg = resolve_data_config(pretrained_cfg=pretrained_cfg.to_dict() if pretrained_cfg else {})
    return {
        "input_size": [int(s) for s in cfg["input_size"]],
        "interpolation": cfg["interpolation"],
        "mean": [float(m) for m in cfg["mean"]],
        "std": [float(s) for s in cfg["std"]],
        "crop_pct": float(cfg["crop_pct"]),
        "crop_mode": cfg.get("crop_mode", "center"),
    }


def fixed_input_side(model_name: str) -> int | None:
    """The only side `model_name` takes (timm's `fixed_input_size`: ViT, DeiT, Swin, BEiT, ... whose position
    embeddings or windows are sized to it), or None for a model that takes any size (CNNs)."""
    try:
        pretrained_cfg = timm.get_pretrained_cfg(model_name)
    except Exception:  # noqa: BLE001
        return None
    if pretrained_cfg is None or not getattr(pretrained_cfg, "fixed_input_size", False):
        return None
    return int(pretrained_cfg.input_size[-1])


def _unknown_model_message(name: str) -> str:
    import difflib

    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return f"model.name={name!r} is not a timm model: {hint}list them with timm.list_models('*pattern*')"


def decode_side(preprocess: dict, augment: dict[str, Any] | None = None) -> int:
    """The shorter side an image needs for the transform to lose no detail (`tl.data.images.open_image` reduces larger
    ones to it): the evaluation resize (input size / crop_pct), or, augmented, the smallest random crop (the least
    scale at the most extreme aspect ratio) upsampled to the input size."""
    side = max(int(s) for s in preprocess["input_size"][-2:])
    need = math.floor(side / min(1.0, float(preprocess.get("crop_pct") or 1.0)))  # timm's eval resize
    if augment and augment.get("name", "none") != "none":
        scale = min(float((augment.get("scale") or (0.08, 1.0))[0]), 1.0)
        ratio = augment.get("ratio") or (3 / 4, 4 / 3)
        extreme = min(float(ratio[0]), 1.0 / float(ratio[1]), 1.0)
        if scale > 0 and extreme > 0:
            need = max(need, side / math.sqrt(scale * extreme))
    return int(math.ceil(need))


def eval_transform(preprocess: dict):
    """Resize, centre crop, normalise: the same at validation, test and prediction time."""
    return create_transform(
        input_size=preprocess["input_size"], is_training=False, interpolation=preprocess["interpolation"],
        mean=preprocess["mean"], std=preprocess["std"], crop_pct=preprocess["crop_pct"],
        crop_mode=preprocess["crop_mode"])


def train_transform(preprocess: dict, augment: dict[str, Any] | None, mirror_invariant: bool = True):
    """The augmentation policy on top of the backbone's preprocessing; policy `none` is the eval transform.

    Args:
        preprocess: from `backbone_preprocess`.
        augment: a conf/augment/ policy (`name`, `scale`, `ratio`, `hflip`, `color_jitter`, `auto_augment`,
            `re_prob`).
        mirror_invariant: False for data whose meaning changes under a flip (digits, text): flips are switched off.
    """
    if not augment or augment.get("name", "none") == "none":
        return eval_transform(preprocess)
    hflip = float(augment.get("hflip", 0.0)) if mirror_invariant else 0.0
    try:
        return create_transform(
            input_size=preprocess["input_size"], is_training=True, interpolation=preprocess["interpolation"],
            mean=preprocess["mean"], std=preprocess["std"],
            scale=tuple(augment.get("scale") or (0.08, 1.0)), ratio=tuple(augment.get("ratio") or (3 / 4, 4 / 3)),
            hflip=hflip, vflip=float(augment.get("vflip", 0.0)),
            color_jitter=augment.get("color_jitter"), auto_augment=augment.get("auto_augment"),
            re_prob=float(augment.get("re_prob", 0.0)), re_mode="pixel")
    except (ValueError, AssertionError, KeyError) as e:
        raise TLError(f"augment={augment.get('name')!r} has an invalid setting ({e}): see conf/augment/") from e
