"""Snapshot ensembles, weight averaging and batch mixing, on tiny runs."""

from __future__ import annotations

import json

import pytest
import torch

from tl.callbacks.snapshots import SnapshotEnsemble
from tl.models.schedules import cosine, cycle_ends
from tl.train import train


def snapshot_callback(trainer) -> SnapshotEnsemble:
    return next(c for c in trainer.callbacks if isinstance(c, SnapshotEnsemble))


@pytest.mark.slow
def test_snapshots_at_cycle_ends_with_lr_at_its_minimum(tiny_cfg, tmp_path):
    # The "best" checkpoint is the first epoch's (lowest epoch index, before any snapshot): testing restores callback
    # state from it, which must not shorten the list of snapshots reported.
    results, objects = train(tiny_cfg("trainer.max_epochs=6", "snapshots.cycles=3", "optimizer.lr=1e-3",
                                      "+callbacks.epoch_index._target_=conftest.LogEpoch",
                                      "callbacks.model_checkpoint.monitor=epoch_index",
                                      "callbacks.model_checkpoint.mode=min"))
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
    factor = trainer.lr_scheduler_configs[0].scheduler.lr_lambdas[0]
    assert [factor(s["step"]) for s in snaps[:-1]] == [1.0, 1.0]
    assert all(factor(s["step"] - 1) < 0.05 for s in snaps)


@pytest.mark.slow
def test_first_cycle_is_a_long_descent_then_equal_short_cycles(tiny_cfg, tmp_path):
    results, objects = train(tiny_cfg("trainer.max_epochs=8", "snapshots.cycles=3", "snapshots.first_cycle=0.5"))
    total = objects["trainer"].global_step
    steps = [s["step"] for s in results["snapshots"]]
    assert steps == [total // 2, total // 2 + total // 4, total] and results["epochs"] == 8
    assert all(s["lr"] < 0.05 * 1e-3 for s in results["snapshots"])  # each one at its cycle's LR floor


@pytest.mark.parametrize(("total", "cycles", "first", "ends"), [
    (12, 3, None, [4, 8, 12]),
    (13, 3, None, [4, 8, 13]),      # the last cycle absorbs the remainder: the run ends on a snapshot
    (12, 3, 0.5, [6, 9, 12]),
    (10, 4, 0.99, [7, 8, 9, 10]),   # later cycles keep at least one step each
    (5, 1, 0.5, [5]),
])
def test_cycle_ends(total, cycles, first, ends):
    assert cycle_ends(total, cycles, first) == ends


def test_cosine_with_restarts_falls_to_its_floor_and_jumps_back_per_group():
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
    optimizer = torch.optim.SGD([{"params": params[:1], "lr": 1.0}, {"params": params[1:], "lr": 0.1}])
    scheduler = cosine(optimizer, steps_per_epoch=3, max_epochs=4, warmup_epochs=0, cycles=2, min_lr_ratio=0.1,
                       first_cycle=0.75)
    lrs = []
    for _ in range(12):
        lrs.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    head = [lr[0] for lr in lrs]
    assert head[0] == 1.0 and head[9] == 1.0  # cycle 1: steps 0-8, cycle 2: steps 9-11
    assert all(a > b for a, b in zip(head[:8], head[1:9], strict=True))  # cosine descent within the cycle
    assert head[8] < 0.15 and head[11] < 0.4
    assert all(abs(lr[1] - 0.1 * lr[0]) < 1e-9 for lr in lrs)  # the backbone keeps its ratio to the head


@pytest.mark.slow
def test_mixup_and_cutmix_train_on_soft_targets(tiny_cfg):
    results, objects = train(tiny_cfg("augment=mix", "trainer.max_epochs=5"))  # mixed batches learn slower
    assert objects["module"].mixup is not None
    assert results["augment"] == "mix" and results["test/acc"] > 0.25


@pytest.mark.slow
def test_ema_weights_are_what_checkpoints_hold_and_test_uses(tiny_cfg, tmp_path):
    results, objects = train(tiny_cfg("weight_averaging=ema", "trainer.max_epochs=3"))
    best = torch.load(results["best_ckpt"], weights_only=True)
    assert "current_model_state" in best and int(best["averaging_state"]["n_averaged"]) > 0
    averaged, raw = best["state_dict"], best["current_model_state"]
    head = "model.classifier.weight"
    assert not torch.equal(averaged[head], raw[head])
    assert torch.equal(objects["module"].state_dict()[head], averaged[head])  # test ran on the average


@pytest.mark.slow
def test_swa_averages_from_the_last_quarter(tiny_cfg, tmp_path):
    results, objects = train(tiny_cfg("weight_averaging=swa", "trainer.max_epochs=4",
                                      "callbacks.model_checkpoint.save_top_k=-1"))  # every epoch's checkpoint kept
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    per_epoch = objects["trainer"].global_step // 4
    assert int(last["averaging_state"]["n_averaged"]) == per_epoch  # every step of epoch 3 (from 0.75 * 4 on)
    by_epoch = {int(torch.load(p, weights_only=True)["epoch"]): p
                for p in (tmp_path / "checkpoints").glob("epoch*.ckpt")}
    assert sorted(by_epoch) == [0, 1, 2, 3]
    # before averaging began a checkpoint holds the raw weights, not an empty average; after, the average
    assert "averaging_state" not in torch.load(by_epoch[0], weights_only=True)
    assert int(torch.load(by_epoch[3], weights_only=True)["averaging_state"]["n_averaged"]) == per_epoch


@pytest.mark.slow
def test_a_run_from_another_runs_checkpoint_keeps_its_own_snapshots(tiny_cfg, tmp_path):
    """Its checkpoint lists the other run's snapshots: they are not this run's members, and are left untouched."""
    import hashlib

    first, _ = train(tiny_cfg("trainer.max_epochs=4", "snapshots.cycles=2", run_dir=tmp_path / "a"))
    digests = {s["path"]: hashlib.md5(open(s["path"], "rb").read()).hexdigest() for s in first["snapshots"]}
    ckpt = tmp_path / "a" / "checkpoints" / "snapshots" / "snapshot_cycle1.ckpt"
    results, _ = train(tiny_cfg("trainer.max_epochs=4", "snapshots.cycles=2", f"ckpt_path={ckpt}",
                                run_dir=tmp_path / "b"))
    assert [s["cycle"] for s in results["snapshots"]] == [2]  # its own cycle 2; cycle 1 was the other run's
    assert all(str(tmp_path / "b") in s["path"] for s in results["snapshots"])
    assert {p: hashlib.md5(open(p, "rb").read()).hexdigest() for p in digests} == digests


@pytest.mark.slow
def test_resuming_a_snapshot_run_on_another_schedule_is_refused(tiny_cfg, tmp_path):
    """Found by a hostile tester: resumed with more epochs, the new cycle ends moved, the old snapshots counted as
    taken, and the run delivered the old ensemble (exit 0). Now one line; the run's files are unchanged."""
    import hashlib

    from tl.errors import TLError

    first, _ = train(tiny_cfg("trainer.max_epochs=2", "snapshots.cycles=2", "export=false"))
    files = {p: hashlib.md5(p.read_bytes()).hexdigest() for p in (tmp_path / "checkpoints").rglob("*.ckpt")}
    config = (tmp_path / "config.yaml").read_text()
    with pytest.raises(TLError, match=r"took its snapshots at steps .* its 2 LR cycles end at steps"):
        train(tiny_cfg("trainer.max_epochs=4", "snapshots.cycles=2", "export=false", "ckpt_path=last"))
    assert {p: hashlib.md5(p.read_bytes()).hexdigest() for p in (tmp_path / "checkpoints").rglob("*.ckpt")} == files
    assert json.loads((tmp_path / "results.json").read_text())["snapshots"] == first["snapshots"]
    assert (tmp_path / "config.yaml").read_text() == config  # "its config.yaml" still holds the run's settings


def test_without_a_test_the_run_still_decides_what_it_delivers(tiny_cfg, tmp_path):
    from tl.evaluate import resolve_members

    results, _ = train(tiny_cfg("trainer.max_epochs=2", "snapshots.cycles=2", "test=false", "export=false"))
    assert results["delivered"]["model"] == "ensemble" and "ensemble/test/acc" not in results
    assert "test/acc" not in results and 0 <= results["ensemble/val/acc"] <= 1
    assert [p.name for p in resolve_members(str(tmp_path), None)] == ["snapshot_cycle1.ckpt", "snapshot_cycle2.ckpt"]
    # A garbled results.json (which records the delivery) is one line for evaluate, export and predict alike: they
    # must not each fall back to a different model
    from tl.errors import TLError
    from tl.inference import delivered

    (tmp_path / "results.json").write_text((tmp_path / "results.json").read_text()[:200])
    for read in (lambda: delivered(tmp_path), lambda: resolve_members(str(tmp_path), None)):
        with pytest.raises(TLError, match="results.json' cannot be read"):
            read()
