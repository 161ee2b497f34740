"""last.ckpt every epoch, hard-linked to the best checkpoint when both hold the same state, never written through."""

from __future__ import annotations

import os

import torch

from tl.train import train


def _step(path) -> int:
    return torch.load(path, weights_only=True, map_location="cpu")["global_step"]


def test_last_links_to_a_best_saved_at_the_same_step_and_a_later_epoch_writes_its_own_file(tiny_cfg, tmp_path):
    # Best = highest val loss: the first epoch (the loss falls), so epoch 0 links and epochs 1-2 write last.ckpt.
    results, objects = train(tiny_cfg("trainer.max_epochs=3", "callbacks.model_checkpoint.monitor=val/loss",
                                      "callbacks.model_checkpoint.mode=max", "augment=none", "optimizer.lr=3e-3"))
    ckpts = tmp_path / "checkpoints"
    best, last = ckpts / results["best_ckpt"], ckpts / "last.ckpt"
    steps_per_epoch = objects["trainer"].global_step // 3
    assert _step(best) == steps_per_epoch  # the epoch-0 checkpoint, intact after last.ckpt moved on twice
    assert _step(last) == 3 * steps_per_epoch
    assert os.stat(best).st_ino != os.stat(last).st_ino and os.stat(best).st_nlink == 1
    assert not list(ckpts.glob("*.link"))


def test_linked_last_holds_what_a_written_one_would_and_resumes(tiny_cfg, tmp_path):
    # Best = lowest val loss, which keeps falling here: the final epoch's best and last.ckpt are one file.
    common = ["trainer.max_epochs=2", "callbacks.model_checkpoint.monitor=val/loss",
              "callbacks.model_checkpoint.mode=min", "augment=none", "optimizer.lr=3e-3"]
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
