"""Snapshot ensembles, weight averaging and batch mixing, on tiny runs."""

from __future__ import annotations

import torch

from tl.callbacks.snapshots import SnapshotEnsemble
from tl.train import train


def snapshot_callback(trainer) -> SnapshotEnsemble:
    return next(c for c in trainer.callbacks if isinstance(c, SnapshotEnsemble))


def test_snapshots_at_cycle_ends_with_lr_at_its_minimum(tiny_cfg, tmp_path):
    # The "best" checkpoint is the worst-loss one (epoch 0, before any snapshot): testing restores callback state
    # from it, which must not shorten the list of snapshots reported.
    results, objects = train(tiny_cfg("trainer.max_epochs=6", "snapshots.cycles=3", "optimizer.lr=1e-3",
                                      "callbacks.model_checkpoint.monitor=val/loss",
                                      "callbacks.model_checkpoint.mode=max"))
    assert torch.load(results["best_ckpt"], weights_only=True)["epoch"] < 2
    trainer = objects["trainer"]
    snaps = snapshot_callback(trainer).snapshots
    assert [s["cycle"] for s in snaps] == [1, 2, 3]
    cycle = trainer.global_step // 3
    assert [s["step"] for s in snaps] == [cycle, 2 * cycle, 3 * cycle]  # no extra epochs: the last is the end
    assert results["epochs"] == 6
    for s in snaps:
        assert s["lr"] < 0.05 * 1e-3  # the cosine has annealed to (near) its floor at each cycle's end
        assert (tmp_path / "checkpoints" / "snapshots" / f"snapshot_cycle{s['cycle']}.ckpt").is_file()
    saved = results["snapshots"]
    assert [s["cycle"] for s in saved] == [1, 2, 3] and all(0 <= s["test/acc"] <= 1 for s in saved)
    assert 0 <= results["ensemble/test/acc"] <= 1 and results["ensemble/size"] == 3
    # Between snapshots the LR restarted to its peak: the scheduler is SGDR with one cycle per snapshot.
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert type(scheduler).__name__ == "CosineAnnealingWarmRestarts" and scheduler.T_0 == cycle


def test_mixup_and_cutmix_train_on_soft_targets(tiny_cfg):
    results, objects = train(tiny_cfg("augment=mix", "trainer.max_epochs=5"))  # mixed batches learn slower
    assert objects["module"].mixup is not None
    assert results["augment"] == "mix" and results["test/acc"] > 0.25


def test_ema_weights_are_what_checkpoints_hold_and_test_uses(tiny_cfg, tmp_path):
    results, objects = train(tiny_cfg("weight_averaging=ema", "trainer.max_epochs=3"))
    best = torch.load(results["best_ckpt"], weights_only=True)
    assert "current_model_state" in best and int(best["averaging_state"]["n_averaged"]) > 0
    averaged, raw = best["state_dict"], best["current_model_state"]
    head = "model.classifier.weight"
    assert not torch.equal(averaged[head], raw[head])
    assert torch.equal(objects["module"].state_dict()[head], averaged[head])  # test ran on the average


def test_swa_averages_from_the_last_quarter(tiny_cfg, tmp_path):
    results, objects = train(tiny_cfg("weight_averaging=swa", "trainer.max_epochs=4"))
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    per_epoch = objects["trainer"].global_step // 4
    assert int(last["averaging_state"]["n_averaged"]) == per_epoch  # every step of epoch 3 (from 0.75 * 4 on)
    best = torch.load(results["best_ckpt"], weights_only=True)
    if int(best["epoch"]) < 3:  # checkpoints from before averaging began hold the raw weights, not an empty average
        assert "averaging_state" not in best
