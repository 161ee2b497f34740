"""Babysitting callbacks on tiny synthetic runs: TensorBoard tags read back, the initial-loss check, overfit mode,
the LR finder and the plotting script."""

from __future__ import annotations

import importlib.util
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tl.callbacks import DIAGNOSTICS, InitialLossCheck, InitialLossWarning, OverfitCheck
from tl.train import train

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
STAGES = ("00_stem", "08_head")  # efficientnet_lite0: stem, blocks.0..6, classifier


def events(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "histograms": 0})
    return acc.Reload()


def callback(objects: dict, cls: type):
    return next(cb for cb in objects["trainer"].callbacks if isinstance(cb, cls))


def script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_diagnostics_write_scalars_histograms_images_and_hparams(tiny_cfg, tmp_path):
    cfg = tiny_cfg("callbacks=diagnostics", "callbacks.update_ratios.every_n_steps=2",
                   "callbacks.histograms.every_n_steps=4", "scenario=large_similar", "augment=light")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, objects = train(cfg)
    assert not [w for w in caught if issubclass(w.category, InitialLossWarning)]  # good init: silent
    check = callback(objects, InitialLossCheck).results
    assert check["sanity/initial_loss_ok"] and abs(check["sanity/initial_loss"] - math.log(4)) < 0.25 * math.log(4)

    acc = events(tmp_path)
    tags = acc.Tags()
    steps = objects["trainer"].global_step  # 2 epochs x 5 batches
    ratios = {t: [e.value for e in acc.Scalars(t)] for t in tags["scalars"] if t.startswith("diag/update_ratio/")}
    assert {f"diag/update_ratio/{s}" for s in STAGES} <= set(ratios)  # full fine-tuning: every stage
    for tag, values in ratios.items():
        assert len(values) == math.ceil(steps / 2), tag
        assert all(np.isfinite(v) and 0 < v < 1 for v in values), (tag, values)
    assert [e.step for e in acc.Scalars("diag/update_ratio/08_head")] == list(range(0, steps, 2))

    for kind in ("activations", "gradients"):
        for stage in STAGES:
            hist = acc.Histograms(f"diag/{kind}/{stage}")
            assert [h.step for h in hist] == list(range(0, steps, 4))
            assert all(h.histogram_value.num > 0 and np.isfinite(h.histogram_value.sum) for h in hist)

    assert {"diag/first_layer_filters", "diag/train_batch", "diag/val_confusion_matrix"} <= set(tags["images"])
    assert [i.step for i in acc.Images("diag/first_layer_filters")] == [0, steps]  # start and end
    assert len(acc.Images("diag/val_confusion_matrix")) == 2  # every epoch (K=1 here)
    batch = acc.Images("diag/train_batch")
    assert len(batch) == 1 and batch[0].width > 32 and batch[0].encoded_image_string[:4] == b"\x89PNG"

    per_class = [t for t in tags["scalars"] if t.startswith("diag/val_class_acc/")]
    assert len(per_class) == 4 and all(0 <= acc.Scalars(t)[-1].value <= 1 for t in per_class)
    assert {"hp/val_acc", "hp/train_loss", "hp/test_acc"} <= set(tags["scalars"])
    assert set(acc.PluginTagToContent("hparams")) >= {"_hparams_/experiment", "_hparams_/session_start_info"}
    assert {"diag/run/text_summary", "sanity/initial_loss/text_summary"} <= set(tags["tensors"])
    run_text = acc.Tensors("diag/run/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "large_similar" in run_text
    assert acc.Scalars("sanity/initial_loss")[0].value == pytest.approx(check["sanity/initial_loss"])

    # scripts/plots.py turns the same run into figures.
    written = script("plots").main([str(tmp_path), "--out", str(tmp_path / "plots")])
    assert [p.name for p in written] == ["curves.png", f"confusion_{tmp_path.name}.png"]
    assert all(p.stat().st_size > 10_000 and p.read_bytes()[:4] == b"\x89PNG" for p in written)
    assert script("plots").main([str(tmp_path), "--out", str(tmp_path / "plots")]) == written  # its own: redrawn
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "curves.png").write_bytes(b"\x89PNG not drawn by plots.py")
    with pytest.raises(SystemExit):  # argparse's one line, status 2; the user's file kept
        script("plots").main([str(tmp_path), "--out", str(tmp_path / "mine")])
    assert (tmp_path / "mine" / "curves.png").read_bytes() == b"\x89PNG not drawn by plots.py"


def test_initial_loss_check_warns_on_a_large_head_init(tiny_cfg):
    cfg = tiny_cfg("callbacks=diagnostics", "model.head_init_std=10", "trainer.max_epochs=1", "test=false",
                   "+trainer.limit_train_batches=1", "+trainer.limit_val_batches=1")
    with pytest.warns(InitialLossWarning, match=r"too high: .*head_init_std=10"):
        _, objects = train(cfg)
    results = callback(objects, InitialLossCheck).results
    assert not results["sanity/initial_loss_ok"] and results["sanity/initial_loss"] > 3 * math.log(4)


def test_overfit_mode_drives_the_training_loss_to_about_zero(tiny_cfg):
    cfg = tiny_cfg("debug=overfit", "scenario=small_different", "trainer.overfit_batches=1", "trainer.max_epochs=12")
    assert cfg.augment.name == "none" and cfg.finetune.label_smoothing == 0 and cfg.optimizer.weight_decay == 0
    assert cfg.model.drop_rate == 0 and cfg.model.drop_path_rate == 0 and not cfg.test
    results, objects = train(cfg)
    check = callback(objects, OverfitCheck).results
    assert check["overfit/reached"] and check["overfit/final_train_loss"] < 0.05, check
    assert check["overfit/epochs"] == 12 and objects["trainer"].global_step == 12  # one fixed batch per epoch


def test_diagnostics_without_a_tensorboard_logger_do_nothing(tiny_cfg, tmp_path):
    cfg = tiny_cfg("callbacks=diagnostics", "logger=csv", "trainer.max_epochs=1", "test=false",
                   "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1")
    _, objects = train(cfg)
    diagnostics = [callback(objects, cls) for cls in DIAGNOSTICS]
    assert not any(d._enabled for d in diagnostics)
    assert not (tmp_path / "tensorboard").exists()
    assert callback(objects, InitialLossCheck).results["sanity/initial_loss_ok"]  # the check still logs to CSV
    assert "sanity/initial_loss" in (tmp_path / "csv" / "metrics.csv").read_text()


def test_find_lr_suggests_plots_and_applies(tiny_cfg, tmp_path):
    import torch

    from tl.callbacks.lr_finder import find_lr
    from tl.train import build_data, build_module
    from tl.utils import build

    cfg = tiny_cfg("scenario=large_similar")  # backbone at 0.1x the head's LR
    datamodule = build_data(cfg)
    datamodule.setup("fit")
    module = build_module(cfg, datamodule)
    module.load_pretrained()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    lr_before = module.hparams.optimizer["lr"]
    seen_ratios = []
    original = type(module).on_before_optimizer_step

    def spy(self, optimizer):  # the sweep keeps the backbone at its fraction of the head's LR
        lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
        seen_ratios.append(lrs["backbone"] / lrs["head"])
        original(self, optimizer)

    type(module).on_before_optimizer_step = spy
    try:
        result = find_lr(lambda: build(cfg.trainer, callbacks=[], logger=False, enable_checkpointing=False),
                         module, datamodule, apply=True, out_dir=tmp_path, num_training=20)
    finally:
        type(module).on_before_optimizer_step = original
    suggestion = result["lr_find/suggestion"]
    assert suggestion is not None and 1e-7 <= suggestion <= 1.0
    assert seen_ratios and all(r == pytest.approx(0.1) for r in seen_ratios)
    assert Path(result["lr_find/plot"]).is_file()
    assert result["lr_find/applied"] and result["lr_find/lr_before"] == lr_before
    assert module.hparams.optimizer["lr"] == suggestion != lr_before
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in before.items())  # weights restored


def test_find_lr_does_not_apply_a_suggestion_far_from_the_configured_rate(tiny_cfg, tmp_path):
    """Found by a hostile tester: a sweep over a few tiny batches diverged early and suggested 700x below the
    preset's rate; lr_find=apply trained to chance with exit 0. More than 100x away, the configured rate stays (the
    sweep spans 1e-7..1, so from 1e-10 every suggestion is that far)."""
    from tl.callbacks.lr_finder import find_lr
    from tl.train import build_data, build_module
    from tl.utils import build

    cfg = tiny_cfg("scenario=large_similar", "optimizer.lr=1e-10")
    datamodule = build_data(cfg)
    datamodule.setup("fit")
    module = build_module(cfg, datamodule)
    module.load_pretrained()
    result = find_lr(lambda: build(cfg.trainer, callbacks=[], logger=False, enable_checkpointing=False),
                     module, datamodule, apply=True, out_dir=tmp_path, num_training=20)
    assert result["lr_find/suggestion"] is not None and not result["lr_find/applied"]
    assert "more than 100x from the configured rate" in result["lr_find/not_applied"]
    assert module.hparams.optimizer["lr"] == 1e-10


@pytest.mark.slow
def test_find_lr_does_not_apply_a_sweep_over_one_batch(tiny_cfg, tmp_path):
    """Found by a hostile tester: lr_find=apply on a training split of one batch applied an LR ~190x lower in
    silence (the sweep stepped over the same images 100 times). It keeps the configured LR and says why."""
    from tl.callbacks.lr_finder import find_lr
    from tl.train import build_data, build_module
    from tl.utils import build

    cfg = tiny_cfg("scenario=large_similar", "data.batch_size=256")  # 144 training images: one batch
    datamodule = build_data(cfg)
    datamodule.setup("fit")
    module = build_module(cfg, datamodule)
    module.load_pretrained()
    lr_before = module.hparams.optimizer["lr"]
    result = find_lr(lambda: build(cfg.trainer, callbacks=[], logger=False, enable_checkpointing=False),
                     module, datamodule, apply=True, out_dir=tmp_path, num_training=20)
    assert not result["lr_find/applied"] and "1 batch(es)" in result["lr_find/not_applied"]
    assert module.hparams.optimizer["lr"] == lr_before
