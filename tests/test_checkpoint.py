"""last.ckpt every epoch, hard-linked to the best checkpoint when both hold the same state, never written through."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tl.train import train


def _step(path) -> int:
    return torch.load(path, weights_only=True, map_location="cpu")["global_step"]


# The best checkpoint by epoch index (conftest.LogEpoch), so which epoch is best does not hang on the loss curve.
BY_EPOCH = ["+callbacks.epoch_index._target_=conftest.LogEpoch", "callbacks.model_checkpoint.monitor=epoch_index",
            "callbacks.model_checkpoint.filename=epoch\\{epoch:03d\\}"]


@pytest.mark.parametrize(("ties", "epoch"), [("first", 0), ("last", 2)])
def test_equal_scores_keep_the_first_or_take_the_last_checkpoint(ties, epoch, tiny_cfg, tmp_path):
    """callbacks.model_checkpoint.ties: among equally scored checkpoints, the earliest (Lightning's rule) or the
    latest."""
    results, objects = train(tiny_cfg("trainer.max_epochs=3", "+callbacks.constant._target_=conftest.LogConstant",
                                      "callbacks.model_checkpoint.monitor=constant_score",
                                      "callbacks.model_checkpoint.mode=max", f"callbacks.model_checkpoint.ties={ties}",
                                      "callbacks.model_checkpoint.filename=epoch\\{epoch:03d\\}", "export=false"))
    steps_per_epoch = objects["trainer"].global_step // 3
    best = tmp_path / "checkpoints" / results["best_ckpt"]
    assert _step(best) == (epoch + 1) * steps_per_epoch and best.name == f"epoch{epoch:03d}.ckpt"
    assert len(list((tmp_path / "checkpoints").glob("epoch*.ckpt"))) == 1  # top-1: the other was removed


def test_last_links_to_a_best_saved_at_the_same_step_and_a_later_epoch_writes_its_own_file(tiny_cfg, tmp_path):
    # Best = lowest epoch index: the first epoch, so epoch 0 links and epochs 1-2 write last.ckpt.
    results, objects = train(tiny_cfg("trainer.max_epochs=3", *BY_EPOCH, "callbacks.model_checkpoint.mode=min",
                                      "augment=none", "optimizer.lr=3e-3"))
    ckpts = tmp_path / "checkpoints"
    best, last = ckpts / results["best_ckpt"], ckpts / "last.ckpt"
    steps_per_epoch = objects["trainer"].global_step // 3
    assert _step(best) == steps_per_epoch  # the epoch-0 checkpoint, intact after last.ckpt moved on twice
    assert _step(last) == 3 * steps_per_epoch
    assert os.stat(best).st_ino != os.stat(last).st_ino and os.stat(best).st_nlink == 1
    assert not list(ckpts.glob("*.link"))


@pytest.mark.slow
def test_linked_last_holds_what_a_written_one_would_and_resumes(tiny_cfg, tmp_path):
    # Best = highest epoch index: the final epoch's best and last.ckpt are one file.
    common = ["trainer.max_epochs=2", *BY_EPOCH, "callbacks.model_checkpoint.mode=max", "augment=none",
              "optimizer.lr=3e-3"]
    results, objects = train(tiny_cfg(*common))
    ckpts = tmp_path / "checkpoints"
    assert os.path.samefile(ckpts / results["best_ckpt"], ckpts / "last.ckpt")
    linked = torch.load(ckpts / "last.ckpt", weights_only=True, map_location="cpu")

    written_dir = tmp_path / "written"  # the same run, last.ckpt serialised on its own
    train(tiny_cfg(*common, "callbacks.last_checkpoint.link_same_step=false", run_dir=written_dir))
    written = torch.load(written_dir / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert linked["global_step"] == written["global_step"] == objects["trainer"].global_step
    assert linked["loops"] == written["loops"]
    assert linked["state_dict"].keys() == written["state_dict"].keys()
    assert all(torch.equal(linked["state_dict"][k], written["state_dict"][k]) for k in linked["state_dict"])

    resumed, _ = train(tiny_cfg(*common[1:], "trainer.max_epochs=3", "ckpt_path=last"))
    assert resumed["epochs"] == 3 and resumed["global_step"] == objects["trainer"].global_step * 3 // 2


# -- 6. resume == uninterrupted ---------------------------------------------------------------------------------------
def _last_ckpt(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")


def test_resume_matches_an_uninterrupted_run(tiny_cfg, tmp_path):
    """2 epochs straight vs 1 epoch, stop, `ckpt_path=last` to 2: the same epoch, step, LR schedule position,
    optimizer state, best validation score and final weights (data order seeded per epoch, see EpochSeededShuffle)."""
    common = ["trainer.max_epochs=2", "data.batch_size=16", "augment=none", "model.drop_rate=0", "logger=none",
              "model.drop_path_rate=0",
              "test=false",
              "+callbacks.reseed._target_=distributed_helpers.EpochSeededShuffle"]
    straight, _ = train(tiny_cfg(*common, run_dir=tmp_path / "straight"))
    first, _ = train(tiny_cfg(*common, "+callbacks.stop._target_=distributed_helpers.StopAfterEpochs",
                              "+callbacks.stop.epochs=1", run_dir=tmp_path / "resumed"))
    assert first["epochs"] == 1
    resumed, _ = train(tiny_cfg(*common, "ckpt_path=last", run_dir=tmp_path / "resumed"))

    assert (resumed["epochs"], resumed["global_step"]) == (straight["epochs"], straight["global_step"]) == (2, 10)
    a, b = _last_ckpt(tmp_path / "straight"), _last_ckpt(tmp_path / "resumed")
    assert a["lr_schedulers"] == b["lr_schedulers"]  # the schedule continued, not restarted
    steps_a = [s["step"] for s in a["optimizer_states"][0]["state"].values()]
    assert steps_a == [s["step"] for s in b["optimizer_states"][0]["state"].values()]
    for k, v in a["state_dict"].items():
        assert torch.allclose(v.float(), b["state_dict"][k].float(), atol=1e-5), k
    assert resumed["val/acc"] == pytest.approx(straight["val/acc"], abs=1e-6)


def test_a_resume_keeps_the_csv_loggers_earlier_rows(tiny_cfg, tmp_path):
    """Lightning's CSVLogger deleted metrics.csv when a resume reopened its folder: the epochs before the resume
    were gone from the run's record."""
    import csv

    common = ("logger=csv", "export=false")
    train(tiny_cfg(*common, "trainer.max_epochs=1"))
    path = tmp_path / "csv" / "metrics.csv"

    def epochs() -> set[int]:
        with path.open(newline="") as f:
            return {int(float(r["epoch"])) for r in csv.DictReader(f) if r.get("epoch") and r.get("val/acc")}

    assert epochs() == {0}
    train(tiny_cfg(*common, "trainer.max_epochs=2", "ckpt_path=last"))
    assert epochs() == {0, 1}


def test_a_resumed_run_reports_the_fit_time_of_every_attempt(tiny_cfg, tmp_path):
    """fit_seconds counted only the last attempt: a run requeued twice reported a third of its training."""
    common = ("export=false", "test=false", "logger=none")
    first, _ = train(tiny_cfg(*common, "trainer.max_epochs=1"))
    assert "fit_seconds_earlier" not in first
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")["fit_seconds"]
    assert 0 < saved <= first["fit_seconds"]  # saved at the epoch's end, before the fit's last hooks ran
    resumed, _ = train(tiny_cfg(*common, "trainer.max_epochs=2", "ckpt_path=last"))
    assert resumed["fit_seconds_earlier"] == pytest.approx(saved, abs=0.01)
    assert resumed["fit_seconds"] > saved  # the earlier attempt's time plus this one's
    later = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")["fit_seconds"]
    assert saved < later <= resumed["fit_seconds"]  # the next resume would carry both attempts


def test_a_run_folder_copied_elsewhere_resumes_with_its_best_checkpoint_record(tiny_cfg, tmp_path):
    """Found by a hostile tester: Lightning reloads the best-checkpoint record only in the folder it was saved in.
    A run copied elsewhere and resumed there made its first new epoch "best" whatever it scored, and tested and
    exported it. Here epoch 0 is best (lowest epoch index); the copy extended to 3 epochs must still deliver it."""
    import shutil

    common = (*BY_EPOCH, "callbacks.model_checkpoint.mode=min", "logger=none", "export=false")
    first, _ = train(tiny_cfg(*common, "trainer.max_epochs=2", run_dir=tmp_path / "a"))
    assert Path(first["best_ckpt"]).name == "epoch000.ckpt"
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a" / "checkpoints").iterdir()}
    resumed, _ = train(tiny_cfg(*common, "trainer.max_epochs=3", "ckpt_path=last", run_dir=tmp_path / "b"))
    assert resumed["epochs"] == 3
    assert Path(resumed["best_ckpt"]) == tmp_path / "b" / "checkpoints" / "epoch000.ckpt"  # the copy's own file
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").glob("epoch*.ckpt")) == ["epoch000.ckpt"]
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a" / "checkpoints").iterdir()} == before


def test_a_fresh_run_prints_no_warning_about_a_previous_fit(tiny_cfg, recwarn):
    """Lightning read ckpt_path=None as "last" (tl's interrupt checkpoint is an OnExceptionCheckpoint) and warned,
    in every run, of "the last model of the previous fit call" and of "no last checkpoint" (found by a hostile
    tester)."""
    results, _ = train(tiny_cfg("trainer.max_epochs=1", "export=false", "test=false", "logger=none"))
    assert results["epochs"] == 1
    said = [str(w.message) for w in recwarn]
    assert not [m for m in said if "was called without a model" in m or "there is no last checkpoint" in m], said
