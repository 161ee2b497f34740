"""Backbones, pretrained sources, freeze policies and param groups."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
from PIL import Image

from tl.data.transforms import backbone_preprocess, eval_transform
from tl.errors import TLError
from tl.models import TransferModule
from tl.models.backbone import create_backbone, load_pretrained
from tl.models.finetune import apply_strategy, param_groups, set_frozen_modules_eval, stage_groups

IMAGENET_CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


def imagenet_top1(model, image: np.ndarray, name: str) -> int:
    x = eval_transform(backbone_preprocess(name))(Image.fromarray(image))[None]
    with torch.no_grad():
        return int(model.eval()(x).argmax())


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_package_weights_are_real_imagenet_weights(name):
    """The shipped weights call scikit-image's cat photo a cat and its coffee photo an espresso."""
    skimage_data = pytest.importorskip("skimage.data")
    from tl.models.backbone import package_weights_file

    model = create_backbone(name, num_classes=1000)
    assert load_pretrained(model, "package", name).startswith("package")
    # The package's own classifier is ImageNet's: load it too for this check.
    sd = torch.load(package_weights_file(name), weights_only=True)
    model.classifier.load_state_dict({"weight": sd["_fc.weight"], "bias": sd["_fc.bias"]})
    assert imagenet_top1(model, skimage_data.chelsea(), name) in IMAGENET_CATS
    assert imagenet_top1(model, skimage_data.coffee(), name) == ESPRESSO


def test_package_weights_only_fit_their_models():
    with pytest.raises(TLError, match="efficientnet_lite0, efficientnet_lite1, efficientnet_lite2 only"):
        load_pretrained(create_backbone("resnet18", 10), "package", "resnet18")


def test_file_weights_round_trip_and_new_head(tmp_path):
    src = create_backbone("resnet18", num_classes=1000)
    torch.save({"state_dict": {f"model.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "w.ckpt")
    dst = create_backbone("resnet18", num_classes=7)
    load_pretrained(dst, str(tmp_path / "w.ckpt"), "resnet18")
    assert torch.equal(dst.layer4[1].conv2.weight, src.layer4[1].conv2.weight)
    assert dst.fc.weight.shape == (7, 512)  # the 1000-way head is not ours to keep


def test_file_weights_that_do_not_fit_are_refused(tmp_path):
    torch.save(create_backbone("resnet34", 10).state_dict(), tmp_path / "r34.pth")
    with pytest.raises(TLError, match="does not fit model"):
        load_pretrained(create_backbone("resnet18", 10), str(tmp_path / "r34.pth"), "resnet18")


def test_pickles_that_run_code_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pth", _use_new_zipfile_serialization=True)
    with pytest.raises(TLError, match="weights_only=True"):
        load_pretrained(create_backbone("resnet18", 10), str(tmp_path / "evil.pth"), "resnet18")


def test_safetensors_weights(tmp_path):
    from safetensors.torch import save_file

    src = create_backbone("resnet18", num_classes=10)
    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    dst = create_backbone("resnet18", num_classes=10)
    load_pretrained(dst, str(tmp_path / "w.safetensors"), "resnet18")
    assert torch.equal(dst.fc.weight, src.fc.weight)  # same width: the whole state is loaded


def test_hub_loading_offline_fails_with_alternatives(monkeypatch, tmp_path):
    """The real timm hub path runs up to the download, which offline must fail with a one-line way out."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_network(*args, **kwargs):  # refused at once, as on a machine without a route (not a 40 s timeout)
        raise OSError("Network is unreachable")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    # huggingface_hub reads HF_HUB_OFFLINE when it is imported, which in a test session was earlier
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(TLError) as e:
        load_pretrained(create_backbone("resnet18", 10), "hub", "resnet18")
    assert "model.pretrained=package" in str(e.value) and "\n" not in str(e.value)


def test_unknown_model_suggests_names():
    with pytest.raises(TLError, match="did you mean resnet50"):
        create_backbone("resnet5O", 10)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet18", "convnext_atto", "vit_tiny_patch16_224"])
def test_strategies_select_stages_generically(name):
    model = create_backbone(name, num_classes=3)
    groups = stage_groups(model)
    trainable = lambda: {n for n, p in model.named_parameters() if p.requires_grad}  # noqa: E731
    apply_strategy(model, "linear_probe")
    assert trainable() == set(groups[-1]) and all("weight" in n or "bias" in n for n in groups[-1])
    apply_strategy(model, "partial", trainable_stages=2)
    assert trainable() == set(groups[-3]) | set(groups[-2]) | set(groups[-1])
    assert not trainable() & set(groups[0])  # the stem stays frozen
    apply_strategy(model, "full")
    assert trainable() == {n for n, _ in model.named_parameters()}
    with pytest.raises(TLError, match="trainable_stages=99"):
        apply_strategy(model, "partial", trainable_stages=99)


def test_frozen_modules_stay_in_eval_mode():
    model = create_backbone("efficientnet_lite0", 3)
    apply_strategy(model, "linear_probe")
    model.train()
    set_frozen_modules_eval(model)
    assert not model.bn1.training and not model.blocks.training
    assert model.classifier.training


def test_param_groups_carry_backbone_lr_and_skip_decay_on_norms():
    model = create_backbone("resnet18", 3)
    apply_strategy(model, "partial", trainable_stages=1)
    groups = {g["name"]: g for g in param_groups(model, lr=0.1, backbone_lr_mult=0.1, weight_decay=0.05)}
    assert groups["head"]["lr"] == 0.1 and groups["backbone"]["lr"] == pytest.approx(0.01)
    assert groups["backbone/no_decay"]["weight_decay"] == 0.0 and groups["backbone"]["weight_decay"] == 0.05
    in_groups = {id(p) for g in groups.values() for p in g["params"]}
    assert in_groups == {id(p) for p in model.parameters() if p.requires_grad}  # frozen ones are left out


def test_layer_decay_scales_deeper_layers_less():
    """timm's layer-wise decay (BEiT's rule) on top of the backbone multiplier: the head keeps the LR, each block
    below the top gets another factor, the stem the smallest."""
    model = create_backbone("resnet18", 3)
    groups = param_groups(model, lr=1.0, backbone_lr_mult=0.5, layer_decay=0.5)
    lrs = {g["name"].split("/")[0]: g["lr"] for g in groups}
    depth = {int(name.split(".")[1]): lr for name, lr in lrs.items() if name.startswith("backbone.")}
    assert lrs["head"] == 1.0 and len(depth) >= 5  # resnet18: stem + 8 blocks
    assert all(lr == pytest.approx(0.5 * 0.5 ** k) for k, lr in depth.items())
    stem = next(g for g in groups if any(p is model.conv1.weight for p in g["params"]))
    assert stem["lr"] == min(depth.values())
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in model.parameters()}


def test_initial_loss_is_near_ln_num_classes():
    module = TransferModule("efficientnet_lite0", num_classes=10, pretrained="package")
    module.load_pretrained()
    x = torch.randn(32, 3, 64, 64)
    loss = torch.nn.functional.cross_entropy(module.eval()(x), torch.randint(0, 10, (32,)))
    assert abs(loss.item() - np.log(10)) < 0.1
