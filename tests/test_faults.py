"""Bad input and faults: each has an expected outcome, a one-line error naming the culprit, and nothing lost.

More cases live beside the code they exercise: image-folder layouts and corrupt files (test_data.py), weights
files, pickles that run code, offline hub (test_models.py), unknown names at the command line (test_cli.py).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tl.errors import TLError
from tl.train import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("override", "culprit"), [
    ("optimizer.lr=-0.1", "optimizer.lr=-0.1 is invalid"),
    ("optimizer.lr=fast", "optimizer.lr='fast' is invalid"),
    ("optimizer.weight_decay=-1", "optimizer.weight_decay=-1 is invalid"),
    ("model.drop_rate=1.0", "model.drop_rate=1.0 is invalid"),
    ("model.drop_path_rate=-0.1", "model.drop_path_rate=-0.1 is invalid"),
    ("model.name=efficientnet_lite9", "model.name='efficientnet_lite9' is not a timm model"),
    ("snapshots.ensemble_last=0", "snapshots.ensemble_last=0 is invalid"),
    ("snapshots.deliver=ensmble", "snapshots.deliver='ensmble' is invalid"),
    ("scenario=auto scenario.small_snapshots=-1", "scenario.small_snapshots=-1 is invalid"),
    ("scenario=auto scenario.small_snapshots=1", "scenario.small_snapshots=1 is invalid"),
    ("finetune.label_smoothing=1.5", "finetune.label_smoothing=1.5 is invalid"),
    ("finetune.strategy=half", "finetune.strategy='half' is invalid"),
    ("trainer.max_epochs=0", "trainer.max_epochs=0 is invalid"),
    ("data.batch_size=0", "data.batch_size=0 is invalid"),
    ("data.samples_per_class=-3", "data.samples_per_class=-3 is invalid"),
    ("data.on_bad_file=ignore", "data.on_bad_file='ignore' is invalid"),
    ("snapshots.cycles=5", "snapshots.cycles=5 exceeds trainer.max_epochs=2"),
    ("data.test_fraction=0.75", "leaves too little to train on"),
    ("data.samples_per_class=1000", "data.samples_per_class=1000 is more than class"),
    ("finetune.strategy=partial finetune.trainable_stages=50", "finetune.trainable_stages=50"),
    ("ckpt_path=last", "ckpt_path='last': no checkpoint"),
    ("overwrite=tru", "overwrite='tru' is invalid: use true or false"),
])
def test_invalid_values_fail_before_training(tiny_cfg, tmp_path, override, culprit):
    with pytest.raises(TLError) as e:
        train(tiny_cfg(*override.split()))
    assert culprit in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "checkpoints").exists()  # nothing trained, nothing half-written


def test_null_weight_decay_means_none(tiny_cfg):
    """Every validation rule and the constructors agree: null passes the rules, so it must train (no decay)."""
    results, objects = train(tiny_cfg("optimizer.weight_decay=null", "trainer.max_epochs=1", "export=false"))
    assert results["epochs"] == 1
    assert all(g["weight_decay"] == 0.0 for g in objects["trainer"].optimizers[0].param_groups)


def test_non_finite_loss_stops_with_the_step_and_causes(tiny_cfg, tmp_path, monkeypatch):
    """A diverging run (forced by an LR the up-front checks now refuse: past 10 is a typo, not a learning rate)."""
    import tl.train as train_module

    monkeypatch.setattr(train_module, "validate", lambda cfg, final=True: None)
    with pytest.raises(TLError) as e:
        train(tiny_cfg("optimizer=sgd", "optimizer.lr=1e30", "scenario=large_different", "trainer.max_epochs=3"))
    msg = str(e.value)
    assert "training loss is nan" in msg or "training loss is inf" in msg
    assert "at step" in msg and "optimizer.lr=1e+30" in msg


def test_unwritable_output_dir_fails_at_start(tiny_cfg, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    cfg = tiny_cfg()
    cfg.paths.output_dir = str(blocker / "run")
    with pytest.raises(TLError, match="is not writable"):
        train(cfg)


@pytest.mark.slow
def test_unwritable_run_dir_at_the_command_line(tmp_path):
    (tmp_path / "a_file").write_text("x")
    proc = subprocess.run([sys.executable, "-m", "tl.train", f"hydra.run.dir={tmp_path / 'a_file' / 'run'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "cannot be created" in proc.stderr and proc.stderr.count("\n") == 1


def test_class_in_val_but_not_in_train_is_refused(tmp_path):
    from PIL import Image

    from tl.data import ImageFolderSource

    for split, classes in (("train", ["a", "b"]), ("val", ["a", "b", "c"])):
        for c in classes:
            (tmp_path / split / c).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / split / c / "x.png")
    with pytest.raises(TLError, match="is not among the train classes"):
        ImageFolderSource(tmp_path).load()


TRAIN = [sys.executable, "-m", "tl.train", "data=synthetic", "data.source.samples_per_class=60", "trainer.max_epochs=6",
         "scenario=large_similar", "augment=none", "callbacks.progress=null", "trainer.enable_progress_bar=false",
         "seed=3", "export=false", "report.top_losses=0"]


@pytest.mark.slow
def test_kill_9_then_resume_finishes_the_planned_epochs(tmp_path):
    """SIGKILL mid-run leaves a loadable last.ckpt; ckpt_path=last resumes to the planned epoch count, and ends where
    the run that was never killed ends (the random generators' states travel in the checkpoint)."""
    run = tmp_path / "run"
    proc = subprocess.Popen([*TRAIN, f"hydra.run.dir={run}"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    last = run / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if last.is_file() and torch.load(last, weights_only=True)["epoch"] >= 1:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(last, weights_only=True)["epoch"]  # still a whole checkpoint after the kill
    assert killed_at < 5 and not (run / "results.json").exists()

    resumed = subprocess.run([*TRAIN, f"hydra.run.dir={run}", "ckpt_path=last"], cwd=ROOT, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    result = json.loads((run / "results.json").read_text())
    assert result["epochs"] == 6
    # the steps of 6 whole epochs, no more, no fewer (16 per batch; a last batch of one is dropped in training)
    steps_per_epoch = result["n_train"] // 16 + (result["n_train"] % 16 > 1)
    assert result["n_train"] == 144 and result["global_step"] == 6 * steps_per_epoch
    assert result["test/acc"] > 0.6  # it learnt (chance: 0.25)
    whole = subprocess.run([*TRAIN, f"hydra.run.dir={tmp_path / 'whole'}"], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
    assert whole.returncode == 0, whole.stderr[-2000:]
    expected = json.loads((tmp_path / "whole" / "results.json").read_text())
    assert (result["val/acc"], result["test/acc"]) == (expected["val/acc"], expected["test/acc"])


@pytest.mark.slow
def test_sigterm_saves_the_state_exits_143_and_resumes(tmp_path):
    """A preempted job (SIGTERM mid-epoch) exits non-zero with one line, keeps its state as interrupted.ckpt and
    writes no results; ckpt_path=auto resumes from it to the planned epochs (then the file is gone)."""
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    args = [*TRAIN, f"hydra.run.dir={run}", "trainer.max_epochs=3", "logger=none", "export=false"]
    killed = subprocess.run([*args, "+callbacks.term._target_=distributed_helpers.SignalAt", "+callbacks.term.step=12"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in killed.stderr.splitlines() if line.startswith("tl: ")]
    assert killed.returncode == 143 and len(lines) == 1 and "interrupted by SIGTERM" in lines[0], killed.stderr[-2000:]
    interrupted = run / "checkpoints" / "interrupted.ckpt"
    assert 12 <= torch.load(interrupted, weights_only=True)["global_step"] <= 13  # where the loop checked the flag
    assert not (run / "results.json").exists()

    resumed = subprocess.run([*args, "ckpt_path=auto"], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    result = json.loads((run / "results.json").read_text())
    assert result["epochs"] == 3 and result["global_step"] == 27  # 144 training images, batch 16: 9 steps an epoch
    assert not interrupted.exists()


@pytest.mark.slow
def test_sigterm_during_validation_validates_that_epoch_on_resume(tmp_path):
    """Found by a hostile tester: a SIGTERM that landed during an epoch's validation saved interrupted.ckpt with
    Lightning's counters saying that validation was done, so the resumed run skipped it: the epoch went unvalidated and
    a later checkpoint carried an earlier score. Now the resumed run validates that epoch whole first, with the score
    the run that was never stopped had there, and trains on to the planned steps."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}

    def args(name):
        return [*TRAIN, f"hydra.run.dir={tmp_path / name}", "trainer.max_epochs=3", "logger=none",
                "+callbacks.rec._target_=distributed_helpers.ValidationRecorder",
                f"+callbacks.rec.path={tmp_path / name}.jsonl"]

    whole = subprocess.run(args("whole"), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-2000:]
    killed = subprocess.run([*args("run"), "+callbacks.term._target_=distributed_helpers.SignalInValidation",
                             "+callbacks.term.epoch=1"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == 143, killed.stderr[-2000:]
    assert (tmp_path / "run" / "checkpoints" / "interrupted.ckpt").is_file()
    resumed = subprocess.run([*args("run"), "ckpt_path=auto"], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    def validations(name):
        return [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]

    expected = validations("whole")
    assert [v["epoch"] for v in expected] == [0, 1, 2] and all(v["batches"] == 2 for v in expected)
    got = validations("run")
    assert [v["epoch"] for v in got] == [0, 1, 2] and [v["batches"] for v in got] == [2, 2, 2]
    # epochs 0 and 1 as the run that was never stopped (epoch 1 validated again, on the same weights); after it
    # the loaders draw in another order (tl.callbacks.checkpoint.RandomState)
    assert [v["acc"] for v in got[:2]] == pytest.approx([v["acc"] for v in expected[:2]], abs=1e-6)
    before, after = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("whole", "run"))
    assert after["global_step"] == before["global_step"] == 27


@pytest.mark.slow
def test_sigterm_to_the_loader_processes_too_is_an_interruption_not_a_crash(tmp_path):
    """SLURM's scancel or preemption, `kill -TERM -PGID` and `pkill -f` signal the DataLoader workers with the main
    process. The main process met a dead worker first: a RuntimeError traceback, exit 1, no interrupted.ckpt (and
    torch's SIGCHLD handler aborted the save half-way). Now it is the SIGTERM interruption it is. (Signalling the
    group from a test is a race the main process usually wins; torch's error is raised here directly.)"""
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    killed = subprocess.run([*TRAIN, f"hydra.run.dir={run}", "trainer.max_epochs=3", "logger=none",
                             "+callbacks.term._target_=distributed_helpers.WorkerTerminatedAt",
                             "+callbacks.term.step=12"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in killed.stderr.splitlines() if line.startswith("tl: ")]
    assert killed.returncode == 143 and len(lines) == 1 and "interrupted by SIGTERM" in lines[0], killed.stderr[-2000:]
    assert "Traceback" not in killed.stderr
    assert torch.load(run / "checkpoints" / "interrupted.ckpt", weights_only=True)["global_step"] >= 12
    assert not (run / "results.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("surfaces_as", ["OSError", "RuntimeError"])
def test_a_full_disk_mid_save_keeps_the_previous_checkpoint_and_says_so(surfaces_as, tiny_cfg, tmp_path,
                                                                         monkeypatch):
    """The device fills while last.ckpt is being written: one line, the previous last.ckpt intact under its name,
    no partial file left behind (tl.checkpoint_io writes beside the name, then renames). torch.save reports a full
    disk as a RuntimeError ("unexpected pos") raised while handling the OSError (found by a hostile tester)."""
    import errno
    import hashlib

    train(tiny_cfg("trainer.max_epochs=1", "export=false"))
    last = tmp_path / "checkpoints" / "last.ckpt"
    before = hashlib.sha256(last.read_bytes()).hexdigest()
    original = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if "last.ckpt" in str(getattr(f, "name", f)):
            f.write(b"half a checkpoint")
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            finally:
                if surfaces_as == "RuntimeError":
                    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 21500096")
        return original(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(TLError, match="no space left writing .*last.ckpt.*No space left on device.*intact") as e:
        train(tiny_cfg("trainer.max_epochs=2", "ckpt_path=last", "export=false",
                       "callbacks.last_checkpoint.link_same_step=false"))
    assert "\n" not in str(e.value)
    assert hashlib.sha256(last.read_bytes()).hexdigest() == before
    assert not list((tmp_path / "checkpoints").glob(".*.tmp"))



@pytest.mark.slow
def test_a_file_size_limit_mid_run_is_one_line_and_keeps_the_earlier_checkpoints(tmp_path):
    """Found by a hostile tester: a run under `ulimit -f` (writes past the limit fail with EFBIG) ended in a
    traceback. Real limit, real torch.save: one line naming the file, exit 2, the earlier last.ckpt whole."""
    import hashlib
    import resource

    run = tmp_path / "run"
    first = subprocess.run([*TRAIN, "trainer.max_epochs=1", f"hydra.run.dir={run}"], cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    last = run / "checkpoints" / "last.ckpt"
    before = hashlib.sha256(last.read_bytes()).hexdigest()
    limit = last.stat().st_size // 2

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    resumed = subprocess.run([*TRAIN, "trainer.max_epochs=2", "ckpt_path=last", f"hydra.run.dir={run}"], cwd=ROOT,
                             capture_output=True, text=True, timeout=300, preexec_fn=limited)
    errors = [line for line in resumed.stderr.splitlines() if line.startswith("tl: error:")]
    assert resumed.returncode == 2 and len(errors) == 1, resumed.stderr[-3000:]
    assert "Traceback" not in resumed.stderr and "File too large" in errors[0] and "ckpt" in errors[0]
    assert hashlib.sha256(last.read_bytes()).hexdigest() == before
    assert not list(last.parent.glob(".*.tmp"))


def test_sigterm_after_fitting_is_one_line_and_ckpt_path_auto_finishes_the_run(tiny_cfg, tmp_path, monkeypatch):
    """Found by a hostile tester: a SIGTERM during the report or the export (Lightning's handler is gone after fit)
    killed the process outright, leaving the run's lock and the export's scratch folder. Now it raises in the main
    thread (clean-ups run, the lock is released), says what is left, and ckpt_path=auto finishes the run."""
    import tl.train as tl_train
    from tl.errors import Terminated

    real_export = tl_train.export_run

    def export_then_sigterm(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises here
        raise AssertionError("SIGTERM was not raised")

    monkeypatch.setattr(tl_train, "export_run", export_then_sigterm)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated) as e:
        train(tiny_cfg("trainer.max_epochs=1", "logger=none"))
    assert "training had finished" in e.value.tl_after and "ckpt_path=auto" in e.value.tl_after
    assert signal.getsignal(signal.SIGTERM) == before  # the previous handler is back
    assert not (tmp_path / "results.json").exists() and not (tmp_path / ".tl.lock").exists()
    assert not list((tmp_path).glob("export/.export-*"))
    monkeypatch.setattr(tl_train, "export_run", real_export)
    results, _ = train(tiny_cfg("trainer.max_epochs=1", "logger=none", "ckpt_path=auto"))
    assert results["epochs"] == 1 and (tmp_path / "export" / "model.safetensors").is_file()
    # the first step's check, measured by the interrupted process, restored from the checkpoint (it was lost)
    assert results["sanity/initial_loss_ok"] and results["sanity/initial_loss"] > 0


def test_random_states_survive_a_weights_only_checkpoint_and_are_put_back_on_resume(tmp_path):
    """What `RandomState` saves loads with weights_only=True, and putting it back makes every generator draw again
    what it drew after the save."""
    import random

    import numpy as np

    from tl.callbacks.checkpoint import RandomState

    saver = RandomState()
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.randn()  # a cached Gaussian in NumPy's state
    torch.save({"state": saver.state_dict()}, tmp_path / "s.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random(), np.random.randn())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)

    RandomState().load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True)["state"])
    got = (torch.rand(3), np.random.rand(3), random.random(), np.random.randn())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    assert got[2] == expected[2] and got[3] == expected[3]


def test_a_run_stopped_during_validation_validates_that_epoch_on_resume(tiny_cfg, tmp_path):
    """A SIGTERM during epoch 0's validation, then ckpt_path=auto: the resumed run validates epoch 0 whole (it was
    skipped before), with the uninterrupted run's score (the same weights), then trains on to the planned steps."""
    sys.path.insert(0, str(ROOT / "tests"))
    from distributed_helpers import SignalInValidation, ValidationRecorder  # noqa: F401 - named in the overrides

    def cfg(name, *extra):
        return tiny_cfg("logger=none", "export=false", "data.eval_batch_size=8",
                        "+callbacks.rec._target_=distributed_helpers.ValidationRecorder",
                        f"+callbacks.rec.path={tmp_path / name}.jsonl", *extra, run_dir=tmp_path / name)

    whole, _ = train(cfg("whole"))
    said: list[str] = []  # what Lightning's checkpoint code logs (INFO reaches the terminal under tl.train)
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: said.append(record.getMessage())
    connector = logging.getLogger("pytorch_lightning.trainer.connectors.checkpoint_connector")
    level = connector.level
    connector.addHandler(handler), connector.setLevel(logging.INFO)
    with pytest.raises(SystemExit):  # Lightning's SIGTERMException
        train(cfg("run", "+callbacks.term._target_=distributed_helpers.SignalInValidation",
                  "+callbacks.term.epoch=0"))
    # saved with the full state said, so Lightning printed no stray "`weights_only` was not set" line beside tl's own
    connector.removeHandler(handler), connector.setLevel(level)
    assert not [m for m in said if "weights_only" in m]
    assert (tmp_path / "run" / "checkpoints" / "interrupted.ckpt").is_file() and not (tmp_path / "run.jsonl").exists()
    resumed, _ = train(cfg("run", "ckpt_path=auto"))

    def validations(name):
        return [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]

    expected, got = validations("whole"), validations("run")
    assert [v["epoch"] for v in expected] == [0, 1] and expected[0]["batches"] > 1
    assert [v["epoch"] for v in got] == [0, 1] and [v["batches"] for v in got] == [v["batches"] for v in expected]
    assert got[0]["acc"] == expected[0]["acc"]
    assert resumed["global_step"] == whole["global_step"]


def test_an_output_folder_refused_for_its_free_space_is_not_left_behind(tmp_path, monkeypatch):
    """Found by a hostile tester: `tl.export output=FULL/exp` on a nearly full disk was refused, as it should, but
    left the empty exp/ it had made. Refused now, it leaves none of the folders it made."""
    import collections
    import shutil

    from tl.utils import ensure_writable

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 * 2**20, 7 * 2**20, 3 * 2**20))
    with pytest.raises(TLError, match="has 3 MB free"):
        ensure_writable(tmp_path / "a" / "b" / "exp", setting="output=DIR")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "kept").mkdir()
    with pytest.raises(TLError, match="has 3 MB free"):
        ensure_writable(tmp_path / "kept", setting="output=DIR")
    assert (tmp_path / "kept").is_dir()  # it was there before: not removed
