"""End to end: `train(cfg)` on tiny synthetic data with the real Trainer, checkpoints and TensorBoard files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tl.train import train

CONTRACT_KEYS = {"test/acc", "val/acc", "scenario", "n_train", "num_classes", "fit_seconds", "epochs"}


def scalars(run_dir, tag):
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return [e.value for e in acc.Scalars(tag)]


def test_tiny_run_learns_and_writes_results_checkpoints_and_events(tiny_cfg, tmp_path):
    cfg = tiny_cfg("trainer.max_epochs=4", "scenario=large_similar", "augment=none", "optimizer.lr=3e-3")
    results, objects = train(cfg)

    saved = json.loads((tmp_path / "results.json").read_text())
    assert CONTRACT_KEYS <= set(saved)
    assert saved["scenario"] == "large_similar" and saved["epochs"] == 4 and saved["num_classes"] == 4
    assert 0.0 <= saved["test/acc"] <= 1.0 and saved["fit_seconds"] > 0
    assert saved["n_train"] == 72  # 120 synthetic images, 20% val and 20% test carved out
    assert saved["test/acc"] > 0.5  # 4 classes: chance is 0.25

    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert saved["best_ckpt"] and (tmp_path / "checkpoints").joinpath(saved["best_ckpt"]).is_file()
    assert (tmp_path / "config.yaml").is_file()

    losses = scalars(tmp_path, "train/loss_epoch")
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert len(scalars(tmp_path, "val/acc")) == 4
    lr_tags = [t for t in EventAccumulator(str(tmp_path / "tensorboard")).Reload().Tags()["scalars"] if "lr" in t]
    assert lr_tags  # the learning rate per param group


def test_checkpoint_loads_weights_only_and_reproduces_logits(tiny_cfg, tmp_path):
    from tl.models import TransferModule

    _, objects = train(tiny_cfg("trainer.max_epochs=1"))
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)  # no arbitrary unpickling
    restored = TransferModule.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert restored.hparams.class_names == ckpt["hyper_parameters"]["class_names"]
    x = torch.randn(2, 3, 32, 32)
    module = objects["module"].eval()
    with torch.no_grad():
        assert torch.allclose(module(x), restored.eval()(x), atol=1e-6)


def test_linear_probe_leaves_backbone_and_bn_statistics_bit_identical(tiny_cfg):
    from tl.models.backbone import classifier_names

    cfg = tiny_cfg("scenario=small_similar", "trainer.max_epochs=2", "augment=light",
                   "+callbacks.record._target_=conftest.RecordWeights")
    _, objects = train(cfg)
    record = next(c for c in objects["trainer"].callbacks if type(c).__name__ == "RecordWeights")
    head = classifier_names(objects["module"].model)
    after = {k: v for k, v in objects["module"].model.state_dict().items() if k not in head}
    assert any("running_mean" in k for k in after) and after.keys() == record.backbone.keys()
    for k, v in record.backbone.items():
        assert torch.equal(v, after[k]), f"{k} changed under a frozen backbone"
    assert not torch.equal(record.head, objects["module"].model.get_classifier().weight)


def test_samples_per_class_sets_n_train(tiny_cfg):
    results, _ = train(tiny_cfg("data.samples_per_class=5", "trainer.max_epochs=1"))
    assert results["n_train"] == 20


@pytest.mark.slow
def test_resume_from_last_continues_to_the_planned_epochs(tiny_cfg, tmp_path):
    first, _ = train(tiny_cfg("trainer.max_epochs=2"))
    assert first["epochs"] == 2
    resumed, objects = train(tiny_cfg("trainer.max_epochs=3", "ckpt_path=last"))
    assert resumed["epochs"] == 3
    steps_per_epoch = first["global_step"] // 2
    assert resumed["global_step"] == first["global_step"] + steps_per_epoch  # continued, not restarted


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "rmsprop"])
@pytest.mark.parametrize("scheduler", ["step", "exponential", "constant"])
def test_optimizers_and_schedules_train(tiny_cfg, optimizer, scheduler):
    results, objects = train(tiny_cfg(f"optimizer={optimizer}", f"scheduler={scheduler}", "trainer.max_epochs=1",
                                      "test=false"))
    opt = objects["trainer"].optimizers[0]
    assert type(opt).__name__.lower() == {"sgd": "sgd", "adam": "adam", "rmsprop": "rmsprop"}[optimizer]
    assert results["epochs"] == 1 and np.isfinite(results["val/acc"])


def test_without_checkpoint_callbacks_the_last_weights_are_tested_and_exported(tiny_cfg, tmp_path):
    # Lightning's trainer.checkpoint_callback is then tl's InterruptCheckpoint, which selects nothing: the run ended
    # in an AttributeError after training, with no results.json
    results, objects = train(tiny_cfg("callbacks.model_checkpoint=null", "callbacks.last_checkpoint=null",
                                      "logger=none"))
    assert results["best_ckpt"] is None and "model_selection" not in results and 0 <= results["test/acc"] <= 1
    assert (tmp_path / "results.json").is_file() and (tmp_path / "export" / "model.safetensors").is_file()
    assert not list(tmp_path.glob("checkpoints/*.ckpt"))  # none asked for
