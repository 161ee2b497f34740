"""One run per run directory (tl/rundir.py): a lock while it runs, no silent overwrite, resume checked first."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys

import pytest

from tl.errors import TLError
from tl.rundir import LOCK
from tl.train import train


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_finished_run_is_not_overwritten_until_asked(tiny_cfg, tmp_path):
    first, _ = train(tiny_cfg("trainer.max_epochs=1", "export=false"))
    kept = {p: digest(p) for p in [tmp_path / "results.json", tmp_path / "config.yaml",
                                    *(tmp_path / "checkpoints").glob("*.ckpt")]}
    with pytest.raises(TLError, match="holds a finished run") as e:
        train(tiny_cfg("trainer.max_epochs=1", "export=false", "seed=5"))
    assert "\n" not in str(e.value)
    assert {p: digest(p) for p in kept} == kept  # nothing rewritten, config.yaml included
    assert not (tmp_path / LOCK).exists()  # the lock is released after a refusal too

    assert (tmp_path / "report" / "reliability.png").is_file()
    second, _ = train(tiny_cfg("trainer.max_epochs=1", "export=false", "seed=5", "overwrite=true", "test=false"))
    assert second["seed"] == 5 and digest(tmp_path / "results.json") != kept[tmp_path / "results.json"]
    assert len(list((tmp_path / "checkpoints").glob("epoch*.ckpt"))) == 1  # the old run's best file is gone
    assert not (tmp_path / "report").exists()  # nor can the old run's report pass for the new run's


def test_a_live_lock_refuses_a_second_writer_and_a_stale_one_is_taken_over(tiny_cfg, tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        holder = json.dumps({"host": socket.gethostname(), "pid": str(sleeper.pid), "job": ""})
        (tmp_path / LOCK).write_text(holder)
        with pytest.raises(TLError, match=f"in use by another run \\(pid {sleeper.pid} on "):
            train(tiny_cfg("trainer.max_epochs=1", "export=false"))
        assert (tmp_path / LOCK).read_text() == holder  # not ours to remove
    finally:
        sleeper.kill()
        sleeper.wait()
    results, _ = train(tiny_cfg("trainer.max_epochs=1", "export=false"))  # the holder is gone: stale
    assert results["epochs"] == 1 and not (tmp_path / LOCK).exists()


def test_a_resume_that_does_not_fit_is_refused_before_the_config_is_rewritten(tiny_cfg, tmp_path):
    train(tiny_cfg("trainer.max_epochs=1", "export=false"))
    config = digest(tmp_path / "config.yaml")
    with pytest.raises(TLError, match="was trained with num_classes=4 but this run has num_classes=3"):
        train(tiny_cfg("trainer.max_epochs=2", "ckpt_path=last", "data.source.num_classes=3", "export=false"))
    assert digest(tmp_path / "config.yaml") == config
    assert os.path.isfile(tmp_path / "checkpoints" / "last.ckpt")


def test_a_resume_with_another_policy_or_optimizer_is_refused_before_the_config_is_rewritten(tiny_cfg, tmp_path):
    """Another scenario (here: another fine-tuning strategy) or optimizer has other parameter groups or optimizer
    state: Lightning would fail loading it, after the run's config was rewritten."""
    train(tiny_cfg("trainer.max_epochs=1", "export=false"))
    config = digest(tmp_path / "config.yaml")
    # Found by a hostile tester: another optimizer.lr (or weight decay, backbone multiplier) trained on at the
    # checkpoint's rates (Lightning restores the optimizer's groups) while config.yaml recorded the new value
    for change, says in (("finetune.strategy=linear_probe", "was trained with finetune.strategy="),
                         ("optimizer=sgd", "was trained with the optimizer torch.optim.AdamW but this run has "
                                           "torch.optim.SGD"),
                         ("optimizer.lr=0.5", r"was trained with optimizer.lr=.* but this run has optimizer.lr=0.5: a "
                                              "resume goes on with the checkpoint's optimizer state"),
                         ("optimizer.weight_decay=0.3", "optimizer.weight_decay=0.3"),
                         ("finetune.backbone_lr_mult=0.9", "finetune.backbone_lr_mult=0.9"),
                         # found by a hostile tester: a third "cycle" that never restarted, delivered as a member
                         ("snapshots.cycles=2", "was trained with snapshots.cycles=0 but this run has "
                                                "snapshots.cycles=2: the learning-rate cycles")):
        with pytest.raises(TLError, match=says) as e:
            train(tiny_cfg("trainer.max_epochs=2", "ckpt_path=last", change, "export=false"))
        assert "\n" not in str(e.value)
        assert digest(tmp_path / "config.yaml") == config


def test_the_optimizer_settings_a_resume_compares():
    """betas saved as a list match a tuple; a rate the LR finder applied (lr_find=apply) is not the config's, so it
    is not compared; any other change is refused."""
    from omegaconf import OmegaConf

    from tl.checks import _check_optimizer_settings

    saved = {"optimizer": {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 0.0123, "weight_decay": 0.05,
                           "betas": [0.9, 0.999]}, "backbone_lr_mult": 0.1}
    ours = {"optimizer": OmegaConf.create({"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 0.001,
                                           "weight_decay": 0.05, "betas": (0.9, 0.999)}), "backbone_lr_mult": 0.1}
    _check_optimizer_settings("c.ckpt", saved, ours, lr_found=True)
    with pytest.raises(TLError, match=r"optimizer.lr=0.0123 but this run has optimizer.lr=0.001"):
        _check_optimizer_settings("c.ckpt", saved, ours)
    ours["optimizer"].betas = [0.9, 0.99]
    with pytest.raises(TLError, match=r"optimizer.betas=\[0.9, 0.999\] but this run has optimizer.betas=\[0.9, 0.99\]"):
        _check_optimizer_settings("c.ckpt", saved, ours, lr_found=True)


def test_a_lock_of_the_same_slurm_job_is_taken_over_and_one_from_another_machine_is_not(tmp_path, monkeypatch):
    from tl.rundir import claim_run_dir

    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    lock = tmp_path / LOCK
    lock.write_text(json.dumps({"host": "node-7", "pid": "1", "job": "4242"}))  # requeued: another node, same job
    with claim_run_dir(tmp_path, resuming=True, overwrite=False):
        assert json.loads(lock.read_text())["pid"] == str(os.getpid())
    lock.write_text(json.dumps({"host": "node-7", "pid": "1", "job": "17"}))
    with pytest.raises(TLError, match="in use by another run"), claim_run_dir(tmp_path, resuming=True,
                                                                              overwrite=False):
        pass
    assert json.loads(lock.read_text())["job"] == "17"

