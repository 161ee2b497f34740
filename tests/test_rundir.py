"""One run per run directory (tl/rundir.py): a lock while it runs, no silent overwrite, resume checked first."""

from __future__ import annotations

import hashlib
import os
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

    second, _ = train(tiny_cfg("trainer.max_epochs=1", "export=false", "seed=5", "overwrite=true"))
    assert second["seed"] == 5 and digest(tmp_path / "results.json") != kept[tmp_path / "results.json"]
    assert len(list((tmp_path / "checkpoints").glob("epoch*.ckpt"))) == 1  # the old run's best file is gone


def test_a_live_lock_refuses_a_second_writer_and_a_stale_one_is_taken_over(tiny_cfg, tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK).write_text(f"{sleeper.pid}\n")
        with pytest.raises(TLError, match=f"in use by another run \\(pid {sleeper.pid}\\)"):
            train(tiny_cfg("trainer.max_epochs=1", "export=false"))
        assert (tmp_path / LOCK).read_text().strip() == str(sleeper.pid)  # not ours to remove
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
