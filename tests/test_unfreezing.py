"""Staged fine-tuning: gradual unfreezing and LP-FT (tl/callbacks/unfreezing.py)."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from tl.models.finetune import stage_groups, trainable_stage_count
from tl.train import train


class Record(pl.Callback):
    """At each training epoch's end: the trainable parameter names, the param groups (name -> LR), the weights."""

    def __init__(self):
        self.epochs: dict[int, dict] = {}

    def on_train_epoch_end(self, trainer, pl_module):
        opt = trainer.optimizers[0]
        self.epochs[trainer.current_epoch] = {
            "trainable": {n for n, p in pl_module.model.named_parameters() if p.requires_grad},
            "groups": {g["name"]: g["lr"] for g in opt.param_groups},
            "state": {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()},
        }


class StopAfter(pl.Callback):
    """End fitting after `epoch` (as a requeued job would be stopped), leaving last.ckpt behind."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


@pytest.mark.parametrize(("strategy", "expected"), [
    ("linear_probe", [0, 0, 0, 0, 0]), ("partial", [2, 2, 2, 2, 2]), ("full", [8, 8, 8, 8, 8]),
    ("gradual", [0, 0, 1, 1, 2]), ("lp_ft", [0, 0, 8, 8, 8])])
def test_stage_schedule(strategy, expected):
    counts = [trainable_stage_count(strategy, 8, epoch, trainable_stages=2, lp_epochs=2, unfreeze_every=2)
              for epoch in range(5)]
    assert counts == expected


def _run(tiny_cfg, *extra, callbacks=(), **kw):
    cfg = tiny_cfg("finetune.lp_epochs=1", "finetune.unfreeze_every=1", "finetune.backbone_lr_mult=0.5",
                   "logger=none", "test=false", "export=false", *extra, **kw)
    from tl import train as train_module

    original = train_module.build_trainer

    def with_callbacks(cfg, **kwargs):
        trainer = original(cfg, **kwargs)
        trainer.callbacks[:0] = list(callbacks)
        return trainer

    train_module.build_trainer = with_callbacks
    try:
        return train(cfg)
    finally:
        train_module.build_trainer = original


def test_gradual_unfreezing_opens_one_stage_per_epoch_from_the_top(tiny_cfg):
    record = Record()
    results, objects = _run(tiny_cfg, "finetune.strategy=gradual", "trainer.max_epochs=3", callbacks=[record])
    model = objects["module"].model
    stages = stage_groups(model)
    head, top, second = set(stages[-1]), set(stages[-2]), set(stages[-3])
    e = record.epochs
    assert e[0]["trainable"] == head
    assert e[1]["trainable"] == head | top
    assert e[2]["trainable"] == head | top | second
    # One set of groups per unfreezing, named by the epoch it happened, at backbone_lr_mult x the head's LR.
    assert not any("@" in name for name in e[0]["groups"])
    assert {n for n in e[2]["groups"] if "@" in n} == {"backbone@epoch1", "backbone/no_decay@epoch1",
                                                     "backbone@epoch2", "backbone/no_decay@epoch2"}
    assert e[2]["groups"]["backbone@epoch2"] == pytest.approx(0.5 * e[2]["groups"]["head"])
    assert e[2]["groups"]["backbone@epoch1"] == pytest.approx(0.5 * e[2]["groups"]["head"])
    # The stages still frozen are bit-identical to the start; each opened stage changed after it opened.
    start = objects["module"].model.state_dict()  # after fit; compare against epoch 0 for frozen stages
    frozen = [n for g in stages[:-3] for n in g]
    assert all(torch.equal(e[0]["state"][n], start[n]) for n in frozen)
    assert all(torch.equal(e[0]["state"][n], e[1]["state"][n]) for n in second)  # still frozen in epoch 1
    assert any(not torch.equal(e[1]["state"][n], e[2]["state"][n]) for n in second)
    assert any(not torch.equal(e[0]["state"][n], e[1]["state"][n]) for n in top)
    # BatchNorm statistics of frozen stages stay put (those modules are kept in eval mode).
    frozen_bn = [k for k in start if "running_mean" in k and k.startswith("blocks.0.")]
    assert frozen_bn and all(torch.equal(e[0]["state"][k], start[k]) for k in frozen_bn)
    assert results["epochs"] == 3


def test_lp_ft_trains_the_head_first_then_everything(tiny_cfg):
    record = Record()
    results, objects = _run(tiny_cfg, "finetune.strategy=lp_ft", "trainer.max_epochs=2", callbacks=[record])
    model = objects["module"].model
    all_names = {n for n, _ in model.named_parameters()}
    head = set(stage_groups(model)[-1])
    e = record.epochs
    assert e[0]["trainable"] == head and e[1]["trainable"] == all_names
    stem = [n for n in stage_groups(model)[0]]
    assert any(not torch.equal(e[0]["state"][n], e[1]["state"][n]) for n in stem)  # the whole backbone moved


@pytest.mark.slow
def test_gradual_unfreezing_survives_a_resume(tiny_cfg, tmp_path):
    straight = Record()
    _run(tiny_cfg, "finetune.strategy=gradual", "trainer.max_epochs=4", callbacks=[straight],
         run_dir=tmp_path / "straight")
    _run(tiny_cfg, "finetune.strategy=gradual", "trainer.max_epochs=4", callbacks=[StopAfter(1)],
         run_dir=tmp_path / "resumed")
    resumed = Record()
    results, objects = _run(tiny_cfg, "finetune.strategy=gradual", "trainer.max_epochs=4", "ckpt_path=last",
                            callbacks=[resumed], run_dir=tmp_path / "resumed")
    assert results["epochs"] == 4 and sorted(resumed.epochs) == [2, 3]
    for epoch in (2, 3):  # the same stages train, in the same groups, at the same learning rates
        assert resumed.epochs[epoch]["trainable"] == straight.epochs[epoch]["trainable"]
        assert resumed.epochs[epoch]["groups"].keys() == straight.epochs[epoch]["groups"].keys()
        for name, lr in straight.epochs[epoch]["groups"].items():
            assert resumed.epochs[epoch]["groups"][name] == pytest.approx(lr, rel=1e-6)
    # The groups restored from the checkpoint are live: the resumed epochs move the stage opened before the stop.
    stages = stage_groups(objects["module"].model)
    assert any(not torch.equal(resumed.epochs[2]["state"][n], resumed.epochs[3]["state"][n]) for n in stages[-2])
