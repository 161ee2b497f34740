"""A hostile user, case by case: every case asserts its outcome (one line naming the culprit and the fix, exit
status 2, or the run carrying on and counting), and that nothing written earlier was lost (checksums of a finished
run's files before and after).

The seven classes of failure (issue 20): 1 artifacts that are not atomic, 2 run directories, 3 real-world images,
4 data shapes, 5 inputs that reach a library unchecked, 6 corrupt or foreign files, 7 signals and divergence. More
cases live beside the code they exercise (test_faults, test_cli, test_rundir, test_images, test_data,
test_evaluate_predict, test_models); this file holds the ones across classes, with the same finished run as victim.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, make_cfg
from PIL import Image

from tl.errors import TLError
from tl.train import train

pytestmark = [pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning"),  # runpy: already imported
              pytest.mark.usefixtures("one_thread")]  # conftest: one intra-op thread


@pytest.fixture(scope="module")
def finished(tmp_path_factory, one_thread):
    """A finished tiny run with its export: the victim whose files must survive every case."""
    run_dir = tmp_path_factory.mktemp("finished")
    results, _ = train(make_cfg(run_dir, [*TINY, "trainer.max_epochs=1", "scenario=large_similar", "logger=none"]))
    assert (run_dir / "results.json").is_file() and (run_dir / "export" / "model.safetensors").is_file()
    return run_dir, results


def checksums(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def victim(finished, tmp_path):
    """A copy of the finished run for cases that aim at it, and its checksums."""
    run_dir = tmp_path / "victim"
    shutil.copytree(finished[0], run_dir)
    return run_dir, checksums(run_dir)


def entry(module: str, *argv: str, monkeypatch, capfd) -> tuple[int, list[str]]:
    """`python -m module argv...` run in this process (runpy): (exit status, the stderr lines tl wrote)."""
    monkeypatch.setattr(sys, "argv", [module, *argv])
    code = 0
    try:
        runpy.run_module(module, run_name="__main__")
    except SystemExit as e:
        code = e.code
    return code, [line for line in capfd.readouterr().err.splitlines() if line.startswith("tl: ")]


def one_line(code: int, lines: list[str], culprit: str) -> None:
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("tl: error:") and culprit in lines[0], lines


# -- 5. inputs checked up front, with the closest valid names -------------------------------------------------------
@pytest.mark.parametrize(("argv", "culprit"), [
    (["optimizer.lrr=0.1"], "did you mean optimizer.lr?"),
    (["optimzer.lr=0.1"], "'optimzer' is not under the top level): did you mean optimizer"),
    (["+optimizer.lrr=0.1"], "takes no argument 'lrr', so nothing would read it: did you mean optimizer.lr?"),
    (["+finetune.stratgy=full"], "nothing reads (finetune builds no object): did you mean finetune.strategy?"),
    (["+optimizer.lr=0.1"], "optimizer.lr exists already: set it without the +"),
    (["callbacks.progress=null", "callbacks.progress.metrics_every=0"],
     "callbacks.progress=null on the same command line switches callbacks.progress off"),
    (["callbacks.progress=null", "+callbacks.progress.metrics_every=0"], "has nothing to set: drop one of the two"),
    (["+trainer.limit_train_batchs=2"], "did you mean trainer.limit_train_batches"),
    # a real Trainer argument named without the +: the advice pointed at accumulate_grad_batches (hostile round 39)
    (["trainer.limit_train_batches=2"], "trainer.limit_train_batches is not in this config yet, but "
     "pytorch_lightning.Trainer takes 'limit_train_batches': add it with a +, i.e. +trainer.limit_train_batches=2"),
    (["trainer.limit_train_batchs=2"], "did you mean +trainer.limit_train_batches or"),
    (["data.imagesize=64"], "did you mean data.image_size"),
    (["callbacks.progres=null"], "did you mean callbacks.progress?"),
    (["data=imagefolder", "data.root=/x", "data.source.roott=/y"], "did you mean data.source.root?"),
    (["seed=0,1"], "seed=0,1 lists several values: add -m"),
    # a comma in a path: -m alone would run jobs on /tmp/x and y (found by a hostile tester)
    (["data=imagefolder", "data.root=/tmp/x,y"],
     "add -m (--multirun) to run one job per value; or, if the comma is part of one value (a path), quote it for "
     "Hydra: \"data.root='/tmp/x,y'\""),
    (["trainer.accelerator=gpu"], "this machine has no CUDA GPU: use trainer=cpu"),
    (["trainer.accelerator=quantum"], "trainer.accelerator='quantum' is invalid: use one of auto, cpu"),
    (["trainer.precision=fp16"], "trainer.precision='fp16' is invalid"),
    (["trainer.accelerator=cpu", "trainer.precision=16-mixed"], "needs a GPU: on the CPU use bf16-mixed"),
    (["trainer.devices=0"], "trainer.devices=0 is invalid"),
    (["trainer.devices=[0,x]"], "trainer.devices=[0, 'x'] is invalid"),
    (["trainer.accelerator=cpu", "trainer.devices=-1"], "trainer.devices=-1 selects GPUs, and this run is on the CPU"),
    (["trainer.accelerator=cpu", "trainer.devices=[0]"], "trainer.devices=[0] selects GPUs"),
    (["trainer.accelerator=cpu", "trainer.devices='0,1'"], "trainer.devices=0,1 selects GPUs"),
    (["trainer.num_nodes=0"], "trainer.num_nodes=0 is invalid"),
    (["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches=0 is invalid"),
    (["trainer.gradient_clip_val=-1"], "trainer.gradient_clip_val=-1 is invalid"),
    (["data.num_workers=-1"], "data.num_workers=-1 is invalid"),
    (["data.image_size=8"], "data.image_size=8 is invalid: use null (the backbone's own) or a side"),
    (["data.image_size=big"], "data.image_size='big' is invalid"),
    (["data.crop_pct=0"], "data.crop_pct=0 is invalid"),
    (["data.crop_pct=1.5"], "data.crop_pct=1.5 is invalid"),
    (["data.eval_batch_size=0"], "data.eval_batch_size=0 is invalid"),
    (["data.mirror_invariant=maybe"], "data.mirror_invariant='maybe' is invalid: use true or false"),
    (["hydra.run.dir=/tmp/tl $HOME/x"], "holds a '$': Lightning's TensorBoard logger expands $NAME"),
    (["data.val_fraction=null"], "data.val_fraction=None is invalid: use a fraction in (0, 1)"),
])
def test_train_inputs_are_checked_in_one_line(argv, culprit, tmp_path, monkeypatch, capfd):
    run = tmp_path / "run"
    code, lines = entry("tl.train", *argv, "scenario=large_similar", f"hydra.run.dir={run}", monkeypatch=monkeypatch,
                        capfd=capfd)
    one_line(code, lines, culprit)
    assert not (run / "checkpoints").exists() and not (run / "results.json").exists()


def test_a_sweep_whose_jobs_share_one_folder_is_refused_before_the_first_job(tmp_path, monkeypatch, capfd):
    """Found by a hostile tester: hydra.sweep.subdir=same trained job 0, then Hydra rewrote its record with job 1's
    overrides and job 1 was refused, naming hydra.run.dir. Now refused before anything is written, naming the
    setting; a subdir that varies per job is accepted."""
    sweep = tmp_path / "sweep"
    code, lines = entry("tl.train", "-m", "seed=0,1", "scenario=large_similar", f"hydra.sweep.dir={sweep}",
                        "hydra.sweep.subdir=same", monkeypatch=monkeypatch, capfd=capfd)
    one_line(code, lines, "hydra.sweep.subdir=same puts every job of the sweep in one folder")
    assert not sweep.exists()
    code, lines = entry("tl.train", "-m", "seed=0,1", "scenario=large_similar", f"hydra.sweep.dir={sweep}",
                        "hydra.sweep.subdir=s${hydra.job.num}", "trainer.max_epochs=0", monkeypatch=monkeypatch,
                        capfd=capfd)
    one_line(code, lines, "trainer.max_epochs=0 is invalid")  # past the subdir check, stopped by the next one


@pytest.mark.parametrize(("module", "argv", "culprit"), [
    ("tl.predict", ["topk=0"], "topk=0 is invalid: use an integer >= 1"),
    ("tl.predict", ["topk=many"], "topk='many' is invalid"),
    ("tl.predict", ["batch_size=0"], "batch_size=0 is invalid"),
    ("tl.predict", ["num_workers=-2"], "num_workers=-2 is invalid"),
    ("tl.predict", ["threads=0"], "threads=0 is invalid"),
    ("tl.predict", ["device=cuda"], "device='cuda' is not on this machine"),
    ("tl.predict", ["device=tpu"], "device='tpu' is not a device"),
    ("tl.predict", ["topkk=3"], "did you mean topk?"),
    ("tl.evaluate", ["ensemble.last=0"], "ensemble.last=0 is invalid"),
    ("tl.evaluate", ["device=cuda:3"], "device='cuda:3' is not on this machine"),
    ("tl.evaluate", ["tta=flop"], "tta='flop' is unknown"),
    ("tl.evaluate", ["ensemble.lats=2"], "did you mean ensemble.last?"),
    ("tl.export", ["outptu=/tmp/x"], "did you mean output?"),
    ("tl.predict", ["~output"], "~output removes output, which python -m tl.predict reads"),
    ("tl.predict", ["data=digits"], "python -m tl.predict has no data settings"),
    ("tl.predict", ["+data=digits"], "python -m tl.predict has no data settings"),
    ("tl.evaluate", ["ensemble=null"], "ensemble is a group of settings, not a switch"),
    ("tl.export", ["onnx=null"], "onnx is a group of settings, not a switch"),
])
def test_other_entry_points_check_their_inputs(module, argv, culprit, finished, tmp_path, monkeypatch, capfd):
    run_dir, results = finished
    before = checksums(run_dir)
    extra = [f"inputs={tmp_path}"] if module == "tl.predict" else []
    code, lines = entry(module, f"ckpt={results['best_ckpt']}", *extra, *argv, f"hydra.run.dir={tmp_path / 'out'}",
                        monkeypatch=monkeypatch, capfd=capfd)
    one_line(code, lines, culprit)
    assert checksums(run_dir) == before
    assert not (tmp_path / "out").exists()  # a refused command leaves no run folder of Hydra's records behind


def test_a_refused_command_keeps_a_folder_that_holds_anything_else(finished, tmp_path, monkeypatch, capfd):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.md").write_text("mine")
    code, lines = entry("tl.predict", f"ckpt={finished[1]['best_ckpt']}", f"inputs={tmp_path / 'none'}",
                        f"hydra.run.dir={out}", monkeypatch=monkeypatch, capfd=capfd)
    one_line(code, lines, "not found")
    assert (out / "notes.md").read_text() == "mine" and (out / ".hydra").is_dir()


# -- 2. a run directory holds one run: refused before Hydra writes its record into it ---------------------------
def test_a_second_run_into_a_finished_run_is_refused_before_anything_is_written(victim, monkeypatch, capfd):
    run_dir, before = victim
    code, lines = entry("tl.train", "scenario=large_similar", f"hydra.run.dir={run_dir}", monkeypatch=monkeypatch,
                        capfd=capfd)
    one_line(code, lines, "holds a finished run (results.json)")
    assert checksums(run_dir) == before  # RUN/.hydra and config.yaml included


def test_a_weights_file_as_ckpt_path_is_refused_before_overwrite_empties_the_run(victim, tmp_path, monkeypatch,
                                                                                 capfd):
    """Found by a hostile tester: a plain state_dict (or any torch.save'd dict) loads with weights_only=True but is
    no training checkpoint; Lightning failed on it with a traceback after overwrite=true had emptied the run."""
    import torch

    run_dir, before = victim
    weights = tmp_path / "weights.pth"
    ckpt = torch.load(json.loads((run_dir / "results.json").read_text())["best_ckpt"], weights_only=True)
    torch.save(ckpt["state_dict"], weights)
    code, lines = entry("tl.train", "scenario=large_similar", f"hydra.run.dir={run_dir}", "overwrite=true",
                        f"ckpt_path={weights}", monkeypatch=monkeypatch, capfd=capfd)
    one_line(code, lines, "holds weights, not a training checkpoint")
    assert checksums(run_dir) == before


def test_a_live_lock_is_refused_at_the_command_line(victim, monkeypatch, capfd):
    import socket

    run_dir, _ = victim
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run_dir / ".tl.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": str(holder.pid)}))
        before = checksums(run_dir)
        code, lines = entry("tl.train", "scenario=large_similar", f"hydra.run.dir={run_dir}", "overwrite=true",
                            monkeypatch=monkeypatch, capfd=capfd)
        one_line(code, lines, "is in use by another run")
        assert checksums(run_dir) == before
    finally:
        holder.kill()
        holder.wait()


# -- 1. artifacts written beside their name and renamed -------------------------------------------------------------
def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_results_json_that_cannot_be_written_keeps_the_previous_one(victim, monkeypatch):
    from tl.utils import write_json

    def half_then_full(self, text, *args, **kwargs):  # the device fills half-way through the file
        with open(self, "w") as f:
            f.write(text[: len(text) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    run_dir, before = victim
    monkeypatch.setattr(Path, "write_text", half_then_full)
    with pytest.raises(TLError, match="could not write .*results.json.*No space left.*previous version") as e:
        write_json(run_dir / "results.json", {"val/acc": 0.5, "padding": "x" * 10000})
    assert "\n" not in str(e.value)
    assert checksums(run_dir) == before and not list(run_dir.glob(".results.json.*"))


class _Unwritable:
    def __str__(self):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_late_row_that_fails_keeps_the_previous_predictions(finished, tmp_path, monkeypatch):
    import csv

    from tl.predict import write_csv

    out = tmp_path / "predictions.csv"
    out.write_text("path,label\nold.png,a\n")
    rows = [{"path": f"{i}.png", "label": "a", "prob": "1.0", "error": ""} for i in range(1000)]
    rows[-1]["label"] = _Unwritable()  # raises while the last row is written
    monkeypatch.setattr(csv.DictWriter, "_dict_to_list", lambda self, row: [str(row.get(k, "")) for k in
                                                                              self.fieldnames])
    with pytest.raises(TLError, match="could not write"):
        write_csv(out, rows, 1)
    assert out.read_text() == "path,label\nold.png,a\n" and not list(tmp_path.glob(".predictions.csv.*"))


def test_file_names_that_are_not_utf8_reach_the_csv(finished, tmp_path):
    from tl.predict import predict

    run_dir, results = finished
    folder = tmp_path / "in"
    folder.mkdir()
    odd = os.fsdecode(b"caf\xe9-latin1.png")  # a Latin-1 name on a UTF-8 system: a lone surrogate in Python
    Image.new("RGB", (32, 32), (200, 10, 10)).save(folder / odd)
    Image.new("RGB", (32, 32), (10, 200, 10)).save(folder / "plain.png")
    rows, summary = predict(make_cfg(tmp_path / "out", [f"ckpt={results['best_ckpt']}", f"inputs={folder}",
                                                        f"output={tmp_path / 'p.csv'}"], config_name="predict"))
    data = (tmp_path / "p.csv").read_bytes()
    assert summary["files"] == 2 and b"caf\xe9-latin1.png" in data and b"plain.png" in data  # the name's own bytes


def test_a_symlink_loop_among_the_inputs_is_an_error_row(finished, tmp_path):
    from tl.predict import predict

    run_dir, results = finished
    folder = tmp_path / "in"
    folder.mkdir()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(folder / "good.png")
    (folder / "loop.png").symlink_to("loop.png")  # a link to itself: resolving it raised RuntimeError
    listing = tmp_path / "list.txt"
    listing.write_text(f"{folder / 'loop.png'}\n{folder / 'good.png'}\n")
    for inputs in (folder, listing):
        out = tmp_path / f"p-{inputs.name}.csv"
        rows, summary = predict(make_cfg(tmp_path / "out", [f"ckpt={run_dir / 'export'}", f"inputs={inputs}",
                                                            f"output={out}"], config_name="predict"))
        text = out.read_text()
        assert summary["files"] == 2 and summary["errors"] == 1 and "symbolic links" in text and "good.png," in text


def test_an_export_that_fails_after_training_still_writes_the_results(tmp_path, monkeypatch):
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    run_dir = tmp_path / "run"
    with pytest.raises(TLError, match="training finished and results.json is written, but the export failed") as e:
        train(make_cfg(run_dir, [*TINY, "trainer.max_epochs=1", "scenario=large_similar", "logger=none"]))
    assert "\n" not in str(e.value) and "python -m tl.export ckpt=" in str(e.value)
    results = json.loads((run_dir / "results.json").read_text())
    assert "No space left" in results["export_error"] and results["test/acc"] >= 0
    assert not (run_dir / "export" / "model.safetensors").exists() and not list(run_dir.glob("export/.*.tmp"))


def test_an_export_over_a_previous_one_keeps_it_when_the_write_fails(victim, monkeypatch):
    import safetensors.torch

    from tl.export import export_model
    from tl.inference import load_module

    run_dir, before = victim
    module = load_module(Path(json.loads((run_dir / "results.json").read_text())["best_ckpt"]))
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(TLError, match="model.safetensors.*previous export, if any, is unchanged"):
        export_model(module, run_dir / "export")
    assert checksums(run_dir) == before


def test_a_feature_cache_that_cannot_be_written_does_not_stop_the_run(tmp_path, monkeypatch, caplog):
    import tl.data.features as features

    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and "features" in obj:
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(features.torch, "save", save)
    results, _ = train(make_cfg(tmp_path, [*TINY, "trainer.max_epochs=2", "scenario=small_similar", "logger=none",
                                           "export=false"]))
    assert results["feature_cache"] and results["epochs"] == 2
    assert "not written" in caplog.text and not list((tmp_path / "cache").glob("**/.*.tmp"))


# -- 3. a file that becomes unreadable after the scan is skipped and counted ---------------------------------------
def image_folder(root: Path, per_class: int = 12, classes=("a", "b", "c"), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for k, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = (rng.random((24, 24, 3)) * 60 + 60 * k).astype(np.uint8)
            Image.fromarray(pixels).save(root / c / f"{i:02d}.png")
    return root


class BreakFiles:
    """Damages image files once fit starts (after the scan): removed, truncated, or replaced by text."""

    def __init__(self, files: list[str], how: str = "truncate"):
        self.files, self.how = files, how

    def setup(self, trainer, pl_module, stage):
        pass

    def on_fit_start(self, trainer, pl_module):
        for f in self.files:
            if self.how == "remove":
                os.remove(f)
            elif self.how == "truncate":
                data = Path(f).read_bytes()
                Path(f).write_bytes(data[: len(data) // 3])
            else:
                Path(f).write_text("not an image")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["remove", "truncate", "garble"])
def test_files_damaged_after_the_scan_are_skipped_and_counted(how, tmp_path):
    import pytorch_lightning as pl

    root = image_folder(tmp_path / "data")
    cfg = make_cfg(tmp_path / "run", [*TINY, "data=imagefolder", f"data.root={root}", "scenario=large_similar",
                                      "trainer.max_epochs=2", "data.num_workers=1", "logger=none", "export=false",
                                      "data.val_fraction=0.2", "data.test_fraction=0.2"])
    datamodule_files = sorted(str(p) for p in root.rglob("*.png"))
    breaker = type("Breaker", (BreakFiles, pl.Callback), {})(datamodule_files[::5], how)
    from tl.train import build_data, build_module, build_trainer

    # the same steps train() takes, with the damage done as fit starts
    dm = build_data(cfg)
    dm.setup("fit")
    module = build_module(cfg, dm)
    module.load_pretrained()
    trainer = build_trainer(cfg)
    trainer.callbacks.append(breaker)
    trainer.fit(module, datamodule=dm)
    assert trainer.current_epoch == 2 and dm.unreadable.value >= 1  # counted across the loader's worker process


def test_on_bad_file_error_names_the_file_that_broke_mid_run(tmp_path):
    from tl.data.datamodule import ImageDataset
    from tl.data.sources import ImageFolderSource
    from tl.data.transforms import backbone_preprocess, eval_transform

    root = image_folder(tmp_path / "data", per_class=3)
    images = ImageFolderSource(root, on_bad_file="error").load()
    victim_file = images.paths[4]
    Path(victim_file).write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    ds = ImageDataset(images, np.arange(len(images)), eval_transform(backbone_preprocess("efficientnet_lite0")),
                      on_bad_file="error")
    assert ds[0][0].shape[0] == 3
    with pytest.raises(TLError, match=f"image file '{victim_file}' cannot be decoded") as e:
        ds[4]
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(("mode", "colour", "suffix"), [
    ("1", 1, ".png"), ("CMYK", (200, 40, 0, 10), ".jpg"), ("P", 7, ".png"), ("LAB", (60, 20, 200), ".tif"),
    ("YCbCr", (120, 90, 200), ".jpg"), ("I;16B", 40000, ".png"), ("HSV", (20, 200, 200), None),
])
def test_uncommon_image_modes_decode_to_flat_rgb_of_the_right_size(mode, colour, suffix, tmp_path):
    from tl.data.images import to_rgb

    img = Image.new(mode, (20, 12), colour)
    if suffix is None:  # no file format stores HSV: decode it from memory
        out = to_rgb(img)
    else:
        img.save(tmp_path / f"x{suffix}")
        with Image.open(tmp_path / f"x{suffix}") as f:
            out = to_rgb(f)
    pixels = np.asarray(out).reshape(-1, 3).astype(float)
    assert out.mode == "RGB" and out.size == (20, 12)
    assert pixels.std(axis=0).max() < 3  # a flat colour stays flat: no noise, no bands, no dithering


# -- 4. data shapes -----------------------------------------------------------------------------------------------
def test_a_single_class_is_refused_in_one_line(tmp_path, monkeypatch, capfd):
    root = image_folder(tmp_path / "data", classes=("only",))
    code, lines = entry("tl.train", "data=imagefolder", f"data.root={root}", "scenario=large_similar",
                        f"hydra.run.dir={tmp_path / 'run'}", monkeypatch=monkeypatch, capfd=capfd)
    one_line(code, lines, "a classifier needs at least 2")


def test_byte_identical_images_across_splits_are_counted(tmp_path):
    from tl.data.audit import audit_splits
    from tl.data.sources import ImageFolderSource

    root = tmp_path / "data"
    image_folder(root / "train", per_class=6)
    image_folder(root / "test", per_class=3, seed=1)
    for c in ("a", "b", "c"):  # copies: two test images per class are training images under other names
        for i in (0, 1):
            shutil.copy(root / "train" / c / f"0{i}.png", root / "test" / c / f"copy{i}.png")
    images = ImageFolderSource(root).load()
    train = images.given_splits["train"]
    held = np.array([images.paths[i].endswith("05.png") for i in train])
    splits = {"train": train[~held], "val": train[held], "test": images.given_splits["test"]}
    report = audit_splits(images, splits)
    assert report["duplicates_train_test"] == 6  # 2 per class x 3 classes
    assert report["duplicates_train_val"] == 0
    assert all("copy" in a for a, _ in report["duplicates_train_test_first"])


@pytest.mark.slow
def test_a_class_missing_from_the_given_test_split_is_reported(tmp_path):
    root = tmp_path / "data"
    image_folder(root / "train", per_class=8)
    image_folder(root / "test", per_class=2, classes=("a", "b"))
    (root / "test" / "c").mkdir()
    cfg = make_cfg(tmp_path / "run", [*TINY, "data=imagefolder", f"data.root={root}", "scenario=large_similar",
                                      "trainer.max_epochs=1", "logger=none", "export=false"])
    results, _ = train(cfg)
    assert results["data_audit"]["classes_without_test"] == ["c"]


def test_a_class_the_carving_left_without_val_images_is_told_to_grow(tmp_path, caplog):
    """No split folders: a class too small for the fractions to carve one got "let tl carve the split from train",
    which tl had just done."""
    from tl.data.audit import audit_splits
    from tl.data.sources import ImageFolderSource

    root = tmp_path / "flat"
    image_folder(root, per_class=4, classes=("a", "b"))
    images = ImageFolderSource(root).load()
    b = np.flatnonzero(images.targets == 1)
    a = np.flatnonzero(images.targets == 0)
    splits = {"train": np.concatenate([a[:2], b[:3]]), "val": a[2:3], "test": np.concatenate([a[3:], b[3:]])}
    audit_splits(images, splits)
    assert "have no val images (b)" in caplog.text
    assert "too few images for data.val_fraction to carve one: add images to them, or give a val/ folder" in caplog.text


def test_digits_carry_no_train_test_copies():
    from tl.data.audit import audit_splits
    from tl.data.sources import DigitsSource
    from tl.data.splits import make_splits

    digits = DigitsSource().load()
    report = audit_splits(digits, make_splits(digits.targets, {}, 0.15, 0.15, 42))
    assert report == {"duplicates_train_val": 0, "duplicates_train_test": 0, "same_image_two_classes": 0}


# -- 6. corrupt or foreign files read back ------------------------------------------------------------------------
def test_foreign_and_mismatched_exports_are_refused_in_one_line(finished, tmp_path):
    from safetensors.torch import save_file

    from tl.inference import load_classifier

    run_dir, _ = finished
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    save_file({"w": torch.zeros(3)}, str(foreign / "model.safetensors"))
    (foreign / "model.json").write_text((run_dir / "export" / "model.json").read_text())
    mismatch = tmp_path / "mismatch"
    shutil.copytree(run_dir / "export", mismatch)
    meta = json.loads((mismatch / "model.json").read_text())
    meta["num_classes"] += 3
    meta["class_names"] += ["x", "y", "z"]
    (mismatch / "model.json").write_text(json.dumps(meta))
    garbled = tmp_path / "garbled"
    shutil.copytree(run_dir / "export", garbled)
    (garbled / "model.safetensors").write_bytes(b"\x00" * 100)
    nojson = tmp_path / "nojson"
    shutil.copytree(run_dir / "export", nojson)
    (nojson / "model.json").write_text("{not json")
    for folder in (foreign, mismatch, garbled, nojson):
        with pytest.raises(TLError) as e:
            load_classifier(folder)
        assert str(folder) in str(e.value) and "\n" not in str(e.value), (folder, e.value)


def test_a_truncated_checkpoint_names_the_intact_alternative(victim, tmp_path):
    from tl.inference import load_classifier

    run_dir, _ = victim
    best = json.loads((run_dir / "results.json").read_text())["best_ckpt"]
    broken = tmp_path / "broken.ckpt"
    data = Path(best).read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(TLError, match="not a checkpoint that loads") as e:
        load_classifier(broken)
    assert "\n" not in str(e.value)


# -- 7. divergence: last.ckpt never holds diverged weights --------------------------------------------------------
class PoisonAtEpoch:
    """Sets a head weight to NaN after the last optimizer step of epoch `epoch` (the step's loss was finite)."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == trainer.num_training_batches - 1:
            with torch.no_grad():
                pl_module.model.get_classifier().weight[0, 0] = float("nan")


def test_weights_that_turn_nan_leave_last_ckpt_at_the_previous_epoch(tmp_path):
    import pytorch_lightning as pl

    from tl.train import build_data, build_module, build_trainer

    cfg = make_cfg(tmp_path, [*TINY, "trainer.max_epochs=3", "scenario=large_similar", "logger=none", "export=false"])
    dm = build_data(cfg)
    dm.setup("fit")
    module = build_module(cfg, dm)
    module.load_pretrained()
    trainer = build_trainer(cfg)
    trainer.callbacks.insert(0, type("Poison", (PoisonAtEpoch, pl.Callback), {})(1))
    last = tmp_path / "checkpoints" / "last.ckpt"
    with pytest.raises(TLError, match="weights became NaN or infinite") as e:
        trainer.fit(module, datamodule=dm)
    assert "\n" not in str(e.value)
    state = torch.load(last, weights_only=True)
    assert state["epoch"] == 0  # epoch 1's diverged state was never written
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())


# -- found by a hostile tester after the first round ----------------------------------------------------------------
def test_resuming_into_fewer_epochs_than_were_trained_is_refused(tmp_path):
    from types import SimpleNamespace

    from tl.checks import check_resume

    ckpt = tmp_path / "e5.ckpt"
    torch.save({"epoch": 5, "global_step": 60, "pytorch-lightning_version": "2.6.6", "state_dict": {},
                "hyper_parameters": {}}, ckpt)
    with pytest.raises(TLError, match="was saved in epoch 6 but trainer.max_epochs=3") as e:
        check_resume(str(ckpt), SimpleNamespace(hparams={}), max_epochs=3)
    assert "\n" not in str(e.value)
    check_resume(str(ckpt), SimpleNamespace(hparams={}), max_epochs=8)  # more epochs: fine
    check_resume(str(ckpt), SimpleNamespace(hparams={}), max_epochs=5)  # saved after its last epoch: test, report


@pytest.mark.slow
@pytest.mark.parametrize("args, says", [
    (["hydra.run.dir=/proc/tl-run"], "hydra.run.dir=/proc/tl-run cannot be created"),
    (["hydra.run.dir={tmp}/" + "x" * 300], "longer than this filesystem allows"),
    (["hydra.run.dir={tmp}/new/" + "x" * 300], "longer than this filesystem allows"),
    (["data.root=[a"], "cannot be parsed as an override"),
    (["data=imagefolder", "data.root=/tmp/My", "Photos"],
     '\'Photos\' is not a KEY=VALUE override: a value with a space must be quoted whole (with the one before: '
     '"data.root=/tmp/My Photos")'),
    (["hydra.sweeper.n_trials=0"], "hydra.sweeper.n_trials=0: use a whole number >= 1"),
    (["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=512"], "starts 512 processes on the CPU"),
    (["optimizer.lr=1e30"], "optimizer.lr=1e+30 is invalid: use a positive number up to 10"),
])
def test_more_bad_command_lines_fail_in_one_line(tmp_path, args, says):
    """Found by a hostile tester (third round): each was a traceback, a hang (512 CPU processes) or, for lr=1e30,
    a run that ended with a NaN test loss and exit 0."""
    args = [a.format(tmp=tmp_path) for a in args]
    run = [] if any(a.startswith("hydra.run.dir") for a in args) else [f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run([sys.executable, "-m", "tl.train", *args, *run], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and says in lines[0], proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_outputs_never_replace_the_model_its_records_or_the_inputs(tmp_path):
    from tl.utils import check_output_file

    export = tmp_path / "run" / "export"
    export.mkdir(parents=True)
    for name in ("model.onnx", "model.json"):
        (export / name).write_text("model")
    image = tmp_path / "in" / "a.png"
    image.parent.mkdir()
    image.write_bytes(b"png")
    cases = [(export / "model.onnx", "which this command reads"), (export / "other.csv", "which holds the model"),
             (image, "which this command reads"), (tmp_path / "run" / "notes.txt", "exists and is not a .csv file")]
    (tmp_path / "run" / "notes.txt").write_text("mine")
    for output, says in cases:
        with pytest.raises(TLError, match=says):
            check_output_file(output, "output", ".csv", reads=[export / "model.onnx", image], inside=[export])
    check_output_file(tmp_path / "predictions.csv", "output", ".csv", reads=[image], inside=[export])  # new: fine
    (tmp_path / "predictions.csv").write_text("path,label,prob,error\n")
    check_output_file(tmp_path / "predictions.csv", "output", ".csv", reads=[image], inside=[export])  # its own kind
    assert (export / "model.onnx").read_text() == "model" and image.read_bytes() == b"png"
    # another run's files, or a user's, of the same suffix: not this command's output (hostile round 4)
    other = tmp_path / "other_run"
    (other / "report").mkdir(parents=True)
    (other / "report" / "top_losses.csv").write_text("split,path,given,predicted\n")
    (other / "results.json").write_text('{"test/acc": 0.9, "best_ckpt": "x.ckpt", "fit_seconds": 3}')
    (other / "manifest.csv").write_text("path,class\n")
    for output, suffix in ((other / "report" / "top_losses.csv", ".csv"), (other / "results.json", ".json"),
                           (other / "manifest.csv", ".csv")):
        with pytest.raises(TLError, match="exists and was not written by this command"):
            check_output_file(output, "output", suffix)
    (other / "evaluation.json").write_text('{"tool": "tl.evaluate", "ckpt": "x", "test/acc": 0.5}')
    check_output_file(other / "evaluation.json", "output", ".json")  # an earlier evaluation: replaced


def test_export_into_a_folder_of_someone_elses_files_is_refused(finished, tmp_path, monkeypatch, capfd):
    run_dir, results = finished
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "model.json").write_text('{"my": "own config"}')
    (foreign / "model.onnx").write_text("precious")
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (8, 8)).save(photos / "cat.png")
    for output, says in ((foreign, "that are not a tl export"), (photos, "holds 1 image file(s)")):
        before = checksums(output)
        code, lines = entry("tl.export", f"ckpt={results['best_ckpt']}", "format=safetensors", f"output={output}",
                            f"hydra.run.dir={tmp_path / 'x'}", monkeypatch=monkeypatch, capfd=capfd)
        one_line(code, lines, says)
        assert checksums(output) == before
    # a tl export there already: replaced, as before
    code, lines = entry("tl.export", f"ckpt={results['best_ckpt']}", "format=safetensors",
                        f"output={tmp_path / 'mine'}", f"hydra.run.dir={tmp_path / 'y'}", monkeypatch=monkeypatch,
                        capfd=capfd)
    assert code in (0, None) and (tmp_path / "mine" / "model.safetensors").is_file()
    code, lines = entry("tl.export", f"ckpt={results['best_ckpt']}", "format=safetensors",
                        f"output={tmp_path / 'mine'}", f"hydra.run.dir={tmp_path / 'z'}", monkeypatch=monkeypatch,
                        capfd=capfd)
    assert code in (0, None), lines


def test_export_into_another_runs_export_is_refused(finished, tmp_path, monkeypatch, capfd):
    run_dir, results = finished
    victim = tmp_path / "victim"
    shutil.copytree(run_dir, victim)
    before = checksums(victim)
    code, lines = entry("tl.export", f"ckpt={results['best_ckpt']}", "format=safetensors",
                        f"output={victim / 'export'}", f"hydra.run.dir={tmp_path / 'x'}", monkeypatch=monkeypatch,
                        capfd=capfd)
    one_line(code, lines, "is the export of another training run")
    assert checksums(victim) == before


def test_exporting_another_checkpoint_of_a_run_never_replaces_its_delivered_export(victim, monkeypatch, capfd):
    """RUN/export is the model the run delivered (calibrated, the one results.json reports): tl.export of another
    checkpoint without output= writes RUN/export-<checkpoint> beside it; the delivered checkpoint still goes to
    RUN/export."""
    run_dir, before = victim
    code, _ = entry("tl.export", f"ckpt={run_dir / 'checkpoints' / 'last.ckpt'}", "format=safetensors",
                    f"hydra.run.dir={run_dir.parent / 'x'}", monkeypatch=monkeypatch, capfd=capfd)
    assert code == 0
    after = checksums(run_dir)
    assert {k: v for k, v in after.items() if not k.startswith("export-last/")} == before
    assert {"export-last/model.safetensors", "export-last/model.json"} <= set(after)
    best = json.loads((run_dir / "results.json").read_text())["best_ckpt"]
    code, _ = entry("tl.export", f"ckpt={run_dir / 'checkpoints' / Path(best).name}", "format=safetensors",
                    f"hydra.run.dir={run_dir.parent / 'y'}", monkeypatch=monkeypatch, capfd=capfd)
    assert code == 0 and sorted(p.name for p in run_dir.glob("export*")) == ["export", "export-last"]
    from safetensors.torch import load_file

    delivered, other = (load_file(run_dir / d / "model.safetensors") for d in ("export", "export-last"))
    assert delivered.keys() == other.keys()  # the 1-epoch run's best is its last: the same weights in both
    assert all(torch.equal(delivered[k], other[k]) for k in delivered)


def test_a_class_folder_linking_back_to_the_root_is_refused(tmp_path):
    from tl.data.sources import ImageFolderSource

    root = image_folder(tmp_path / "data", per_class=3)
    (root / "loop").symlink_to(root)
    with pytest.raises(TLError, match="class folder .*loop' links back to"):
        ImageFolderSource(root).load()


@pytest.mark.parametrize(("module", "argv", "culprit"), [
    ("tl.train", ["data=imagefolder", "data.root=null"], "data.root is empty"),
    ("tl.train", ["trainer.max_epochs=99999999999999999999"], "trainer.max_epochs=99999999999999999999 is invalid"),
    ("tl.train", ["optimizer.lr=0.01,abc", "-m"], "the sweep's optimizer.lr=abc: optimizer.lr='abc' is invalid"),
    ("tl.train", ["model.pretrained=/"], "weights file '/' is a folder"),
    ("tl.evaluate", ["ckpt=null"], "ckpt=None is invalid"),
    ("tl.predict", ["ckpt=null", "inputs=x"], "ckpt=None is invalid"),
    ("tl.export", ["ckpt=null"], "ckpt=None is invalid"),
])
def test_more_inputs_refused_in_one_line(module, argv, culprit, tmp_path, monkeypatch, capfd):
    sweep = ["hydra.sweep.dir=" + str(tmp_path / "sweep")] if "-m" in argv else []
    code, lines = entry(module, *argv, *(["scenario=large_similar"] if module == "tl.train" else []),
                        f"hydra.run.dir={tmp_path / 'run'}", *sweep, monkeypatch=monkeypatch, capfd=capfd)
    one_line(code, lines, culprit)
    assert not (tmp_path / "sweep").exists() or not list((tmp_path / "sweep").rglob("results.json"))


def test_outputs_of_the_wrong_kind_are_named(finished, tmp_path, monkeypatch, capfd):
    run_dir, results = finished
    before = checksums(run_dir)
    cases = [
        ("tl.predict", [f"ckpt={run_dir / 'export'}", f"inputs={tmp_path}", f"output={tmp_path}"],
         "is a folder: give a file"),
        ("tl.export", [f"ckpt={results['best_ckpt']}", f"output={run_dir / 'results.json'}"],
         "exists and is not a folder: give a folder"),
        ("tl.export", [f"ckpt={run_dir / 'export'}"], "is an export already: export from the training run"),
    ]
    for module, argv, culprit in cases:
        code, lines = entry(module, *argv, f"hydra.run.dir={tmp_path / 'out'}", monkeypatch=monkeypatch, capfd=capfd)
        one_line(code, lines, culprit)
    assert checksums(run_dir) == before


def test_evaluate_takes_the_checkpoints_folder_of_a_run(finished, tmp_path):
    from tl.evaluate import resolve_members

    run_dir, _ = finished
    assert resolve_members(str(run_dir / "checkpoints"), None) == [run_dir / "checkpoints" / "last.ckpt"]


@pytest.mark.slow
def test_ctrl_c_saves_the_state_exits_130_in_one_line_and_resumes(tmp_path):
    run = tmp_path / "run"
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests), os.environ.get("PYTHONPATH", "")])}
    args = [sys.executable, "-m", "tl.train", "data=synthetic", "scenario=large_similar", "trainer.max_epochs=2",
            "callbacks.progress=null", "trainer.enable_progress_bar=false", "logger=none", "export=false",
            f"hydra.run.dir={run}"]
    root = tests.parent
    killed = subprocess.run([*args, "+callbacks.int._target_=distributed_helpers.SignalAt", "+callbacks.int.step=3",
                             f"+callbacks.int.signum={int(__import__('signal').SIGINT)}"],
                            cwd=root, env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in killed.stderr.splitlines() if line.startswith("tl: ")]
    assert killed.returncode == 130 and len(lines) == 1 and "interrupted by Ctrl-C" in lines[0], killed.stderr[-2000:]
    assert (run / "checkpoints" / "interrupted.ckpt").is_file() and not (run / "results.json").exists()
    resumed = subprocess.run([*args, "ckpt_path=auto"], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((run / "results.json").read_text())["epochs"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_ctrl_c_while_an_entry_point_starts_is_one_line(signame, tmp_path):
    """Ctrl-C in the first seconds (torch and Lightning still importing) was a 45-line traceback through the imports,
    or, landing inside numpy's import, a RecursionError from scipy's; a SIGTERM there ended it without a word."""
    import signal
    import time

    sig = getattr(signal, signame)
    # -X importtime reports each import as it completes: the signal goes as soon as the `tl` package has imported
    # (its handlers are in place), while torch and Lightning are still importing. A fixed sleep landed before that
    # on a loaded machine (a traceback from Python's own start-up, not tl's to handle).
    proc = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "tl.export", f"ckpt={tmp_path}",
                             f"output={tmp_path / 'x'}"], cwd=Path(__file__).resolve().parents[1],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    deadline = time.time() + 60
    while time.time() < deadline:
        line = proc.stderr.readline()
        seen.append(line)
        if not line or line.rstrip().endswith("| tl"):
            break
    assert seen[-1].rstrip().endswith("| tl"), "".join(seen)[-2000:]
    time.sleep(0.3)  # into the imports that follow
    proc.send_signal(sig)
    _, rest = proc.communicate(timeout=120)
    err = "\n".join(line for line in (*seen, *rest.splitlines())
                    if line.strip() and not line.startswith("import time:"))
    assert proc.returncode in (128 + sig, -sig) and "Traceback" not in err, err[-2000:]
    assert len(err.strip().splitlines()) == 1 and "interrupted" in err, err[-2000:]
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_sigterm_after_the_imports_before_fitting_is_one_line_and_releases_the_run(tmp_path):
    """Between the imports and Lightning's own handler (the data scan, auto's measurement: minutes on a large
    dataset) SIGTERM killed tl.train without a word (status -15) and left its lock; now one line, 143, no lock."""
    import signal

    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "tl.train", *TINY, "trainer.max_epochs=1", f"hydra.run.dir={run}"],
                            cwd=Path(__file__).resolve().parents[1],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stdout:  # the data's first log line: the scan is done, auto measures next
        seen.append(line)
        if "Data: 4 classes" in line:
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 143 and "Traceback" not in err, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("tl: interrupted by SIGTERM"), err[-2000:]
    assert not (run / ".tl.lock").exists() and not (run / "results.json").exists()


def test_predict_takes_a_run_folder_and_never_writes_into_its_model(tmp_path):
    """`ckpt=RUN` was refused although evaluate and export take it: it now reads RUN/export."""
    from tl.inference import load_classifier
    from tl.utils import check_output_file

    run = tmp_path / "run"
    (run / "export").mkdir(parents=True)
    (run / "export" / "model.json").write_text("{not json")
    with pytest.raises(TLError, match=str(run / "export")):  # it looked in the run's export
        load_classifier(run)
    with pytest.raises(TLError, match="which holds the model"):
        check_output_file(run / "export" / "p.csv", "output", ".csv", inside=[run / "export", run / "checkpoints"])
    check_output_file(run / "p.csv", "output", ".csv", inside=[run / "export", run / "checkpoints"])


def test_a_relative_data_root_is_recorded_absolute_and_dollar_signs_in_class_names_plot(tmp_path, monkeypatch):
    """tl.evaluate RUN run from another folder must read the run's images; a class named with two `$` signs reaches
    the confusion matrix and the report's figures as text (matplotlib read it as a formula and failed)."""
    image_folder(tmp_path / "data", per_class=8, classes=("cost_$5_$10", "plain"))
    monkeypatch.chdir(tmp_path)
    cfg = make_cfg(tmp_path / "run", [*TINY, "data=imagefolder", "data.root=data", "scenario=large_similar",
                                      "trainer.max_epochs=1", "export=false", "report.top_losses=4",
                                      "data.val_fraction=0.25", "data.test_fraction=0.25"])
    results, _ = train(cfg)
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert f"root: {tmp_path / 'data'}" in saved and results["test/acc"] >= 0
    assert (tmp_path / "run" / "report" / "reliability.png").is_file()


def test_the_largest_seed_splits_and_a_tiny_crop_fraction_is_refused(tmp_path, monkeypatch, capfd):
    from tl.data.splits import make_splits

    splits = make_splits(np.repeat(np.arange(3), 20), {}, 0.2, 0.2, seed=2**32 - 1)
    assert sum(len(v) for v in splits.values()) == 60
    code, lines = entry("tl.train", "data.crop_pct=0.01", "scenario=large_similar", f"hydra.run.dir={tmp_path / 'r'}",
                        monkeypatch=monkeypatch, capfd=capfd)
    one_line(code, lines, "data.crop_pct=0.01 is invalid: use null (the backbone's own) or a fraction from 0.25 to 1")


# -- hostile round 4: run folders that are not this run's to replace ------------------------------------------------
@pytest.mark.parametrize(("flags", "named"), [
    (["export=false"], "export/ (export=false)"),
    (["test=false"], "report/ (test=false)"),
])
def test_a_resume_that_would_leave_the_delivered_model_stale_is_refused(victim, flags, named):
    run_dir, before = victim
    cfg = make_cfg(run_dir, [*TINY, "trainer.max_epochs=2", "scenario=large_similar", "logger=none",
                             "ckpt_path=last", *flags])
    with pytest.raises(TLError, match=re.escape(named) + ".*describing the weights before this resume"):
        train(cfg)
    assert checksums(run_dir) == before  # export/, report/, results.json and the checkpoints as they were


def test_another_runs_checkpoint_into_a_finished_run_is_refused_without_overwrite(victim, finished, tmp_path,
                                                                                  monkeypatch, capfd):
    run_dir, before = victim
    other = tmp_path / "other.ckpt"
    shutil.copy(finished[1]["best_ckpt"], other)
    for run_arg in (f"hydra.run.dir={run_dir}", f"++hydra.run.dir={run_dir}"):  # the ++ form is the same setting
        code, lines = entry("tl.train", "scenario=large_similar", run_arg, f"ckpt_path={other}",
                            monkeypatch=monkeypatch, capfd=capfd)
        one_line(code, lines, "holds a finished run")
    assert checksums(run_dir) == before


def test_overwrite_empties_only_a_tl_run(tmp_path, monkeypatch, capfd):
    proj = tmp_path / "proj"
    (proj / "export").mkdir(parents=True)
    (proj / "export" / "notes.txt").write_text("mine")
    (proj / "results.json").write_text('{"mine": 1}')
    code, lines = entry("tl.train", "scenario=large_similar", f"hydra.run.dir={proj}", "overwrite=true",
                        monkeypatch=monkeypatch, capfd=capfd)
    one_line(code, lines, "but no tl training run (no config.yaml of one): overwrite=true replaces only a tl run's")
    assert (proj / "export" / "notes.txt").read_text() == "mine" and (proj / "results.json").is_file()


def test_a_sweep_into_an_earlier_sweeps_folder_is_refused_before_hydra_rewrites_it(finished, tmp_path, monkeypatch,
                                                                                     capfd):
    sweep = tmp_path / "sweep"
    shutil.copytree(finished[0], sweep / "0")
    (sweep / "multirun.yaml").write_text("earlier: sweep\n")
    before = checksums(sweep)
    code, lines = entry("tl.train", "-m", "seed=5,6", "scenario=large_similar", f"hydra.sweep.dir={sweep}",
                        monkeypatch=monkeypatch, capfd=capfd)
    one_line(code, lines, f"hydra.sweep.dir='{sweep}' holds the runs of an earlier sweep (0/, ...)")
    assert checksums(sweep) == before
    # a job stopped in its first epoch holds only interrupted.ckpt: an earlier sweep too
    (sweep / "1" / "checkpoints").mkdir(parents=True)
    shutil.copy(finished[1]["best_ckpt"], sweep / "1" / "checkpoints" / "interrupted.ckpt")
    shutil.rmtree(sweep / "0")
    before = checksums(sweep)
    code, lines = entry("tl.train", "-m", "seed=5,6", "scenario=large_similar", f"hydra.sweep.dir={sweep}",
                        monkeypatch=monkeypatch, capfd=capfd)
    one_line(code, lines, f"hydra.sweep.dir='{sweep}' holds the runs of an earlier sweep (1/, ...)")
    assert checksums(sweep) == before


def test_a_sweep_of_evaluations_into_one_file_is_refused(victim, tmp_path, monkeypatch, capfd):
    run_dir, before = victim
    code, lines = entry("tl.evaluate", "-m", f"ckpt={run_dir}", "tta=none,flip", f"hydra.sweep.dir={tmp_path / 's'}",
                        monkeypatch=monkeypatch, capfd=capfd)
    one_line(code, lines, "under -m: every job of the sweep would write it")
    assert checksums(run_dir) == before


@pytest.mark.parametrize(("edit", "says"), [
    (lambda m: m.update(class_names=[]), "class_names is not a list of 4 names"),
    (lambda m: m.update(class_names=m["class_names"][:-1]), "class_names is not a list of"),
    (lambda m: m.update(class_names=["a"] * len(m["class_names"])), "class_names repeats a name"),
    (lambda m: m.update(num_classes="2"), "num_classes '2' is not an integer >= 2"),
    (lambda m: m.update(format="other/1"), "format 'other/1' is not a tl export's"),
    (lambda m: m.update(drop_rate=2), "drop_rate 2 is not a rate"),
    (lambda m: m["preprocess"].update(input_size=[3, 0, 0]), "input_size [3, 0, 0] is not [3, H, W]"),
    (lambda m: m["preprocess"].update(input_size=[3, 100000, 100000]), "is not [3, H, W] with sides from 16"),
    (lambda m: m["preprocess"].update(std=[0, 1, 1]), "preprocess.std [0, 1, 1] is not positive"),
    (lambda m: m["preprocess"].update(mean="0.5"), "preprocess.mean '0.5' is not three numbers"),
    (lambda m: m["preprocess"].update(interpolation="foo"), "preprocess.interpolation 'foo' is not one of"),
    (lambda m: m["preprocess"].update(crop_pct=0), "preprocess.crop_pct 0 is not a fraction"),
    (lambda m: m.pop("preprocess"), "preprocess is not a mapping"),
    (lambda m: m.update(calibration={"temperature": 1e-300}), "not a temperature from 0.001 to 1000"),
])
def test_an_edited_model_json_is_refused_in_one_line(edit, says, finished, tmp_path):
    """Found by a hostile tester (round 4): the PyTorch path read model.json unchecked (tracebacks, NaN
    probabilities, predictions at another size or under the wrong names, all with exit 0)."""
    from tl.inference import load_export

    export = tmp_path / "export"
    shutil.copytree(finished[0] / "export", export)
    meta = json.loads((export / "model.json").read_text())
    edit(meta)
    (export / "model.json").write_text(json.dumps(meta))
    with pytest.raises(TLError, match=re.escape(says)) as e:
        load_export(export)
    assert "\n" not in str(e.value)


def test_resuming_a_finished_run_at_its_own_epochs_is_refused(victim, monkeypatch, capfd):
    run_dir, before = victim
    code, lines = entry("tl.train", *TINY, "trainer.max_epochs=1", "scenario=large_similar", "logger=none",
                        f"hydra.run.dir={run_dir}", "ckpt_path=auto", monkeypatch=monkeypatch, capfd=capfd)
    one_line(code, lines, "the run finished its 1 epochs and holds its results.json")
    def kept(sums):  # Hydra's own record and log of the refused command aside
        return {k: v for k, v in sums.items() if not k.startswith(".hydra") and k != "train.log"}

    assert kept(checksums(run_dir)) == kept(before)


# -- hostile round 5 --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("module", "where", "says"), [
    ("tl.train", "checkpoints", "is inside"),
    ("tl.predict", "export", "is inside"),
    ("tl.evaluate", "report", "is inside"),
    ("tl.predict", "", "holds a training run: python -m tl.predict would replace its record"),
])
def test_a_run_folder_inside_or_onto_a_training_run_is_refused(module, where, says, victim, tmp_path, monkeypatch,
                                                                capfd):
    run_dir, before = victim
    (run_dir / "report").mkdir(exist_ok=True)
    before = checksums(run_dir)
    extra = [f"ckpt={run_dir}", f"inputs={tmp_path}"] if module == "tl.predict" else \
        [f"ckpt={run_dir}"] if module == "tl.evaluate" else ["scenario=large_similar"]
    code, lines = entry(module, *extra, f"hydra.run.dir={run_dir / where if where else run_dir}",
                        monkeypatch=monkeypatch, capfd=capfd)
    one_line(code, lines, says)
    assert checksums(run_dir) == before


@pytest.mark.parametrize(("edit", "says"), [
    (lambda hp: hp.update(class_names=["a", "b"]), "class_names is not a list of"),
    (lambda hp: hp.update(class_names=["x"] * hp["num_classes"]), "class_names repeats a name"),
    (lambda hp: hp.update(name="resnet18"), "its hyperparameters do not fit its weights"),
    (lambda hp: hp["preprocess"].update(input_size=[3, 5, 5]), "input_size [3, 5, 5]"),
])
def test_a_checkpoint_with_edited_hyperparameters_is_refused(edit, says, finished, tmp_path):
    from tl.inference import load_module

    ckpt = torch.load(finished[1]["best_ckpt"], map_location="cpu", weights_only=False)
    edit(ckpt["hyper_parameters"])
    torch.save(ckpt, tmp_path / "edited.ckpt")
    with pytest.raises(TLError, match=re.escape(says)) as e:
        load_module(tmp_path / "edited.ckpt")
    assert "\n" not in str(e.value)


def test_resuming_with_other_preprocessing_is_refused(victim, monkeypatch, capfd):
    run_dir, before = victim
    code, lines = entry("tl.train", *TINY, "trainer.max_epochs=3", "scenario=large_similar", "logger=none",
                        "data.image_size=48", f"hydra.run.dir={run_dir}", "ckpt_path=last",
                        monkeypatch=monkeypatch, capfd=capfd)
    one_line(code, lines, "was trained with other preprocessing (input_size")
    assert checksums(run_dir)["results.json"] == before["results.json"]


@pytest.mark.slow
def test_probe_baseline_never_writes_over_a_runs_results(finished, tmp_path):
    target = tmp_path / "results.json"
    shutil.copy(finished[0] / "results.json", target)
    before = target.read_bytes()
    proc = subprocess.run([sys.executable, "scripts/probe_baseline.py", "--sizes", "10", "--seeds", "0", "--out",
                           str(target), "--", "data=synthetic"], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "is not an earlier output of this script" in proc.stderr
    assert target.read_bytes() == before


# -- hostile round 6 ------------------------------------------------------------------------------------------------
def test_evaluate_and_predict_outputs_never_replace_devices_pipes_or_links(finished, tmp_path, monkeypatch, capfd):
    """`tl.evaluate output=/dev/full` replaced the system's device with a JSON file (exit 0); a pipe and a link
    were replaced too. Now a device or a pipe is refused and a link is written through (the link stays)."""
    from tl.utils import output_target

    fifo = tmp_path / "pipe.json"
    os.mkfifo(fifo)
    with pytest.raises(TLError, match="exists and is not a regular file"):
        output_target(fifo, "output", "evaluation.json")
    target, link = tmp_path / "target.json", tmp_path / "link.json"
    link.symlink_to(target)
    assert output_target(link, "output", "evaluation.json") == target.resolve()
    run_dir, results = finished
    code, lines = entry("tl.evaluate", f"ckpt={results['best_ckpt']}", f"output={fifo}",
                        f"hydra.run.dir={tmp_path / 'out'}", monkeypatch=monkeypatch, capfd=capfd)
    one_line(code, lines, "exists and is not a regular file")
    assert fifo.is_fifo()
    code, lines = entry("tl.evaluate", f"ckpt={results['best_ckpt']}", f"output={link}",
                        f"hydra.run.dir={tmp_path / 'out2'}", monkeypatch=monkeypatch, capfd=capfd)
    assert code in (0, None) and link.is_symlink() and json.loads(target.read_text())["tool"] == "tl.evaluate"


def test_predict_lists_that_are_binary_or_name_urls_are_refused(tmp_path):
    from tl.predict import list_inputs

    binary = tmp_path / "list.txt"
    binary.write_bytes(b"a.png\n\x00\x01\x02garbage\n")
    with pytest.raises(TLError, match="NUL bytes"):
        list_inputs(binary)
    urls = tmp_path / "urls.txt"
    urls.write_text("# mine\na.png\n\nhttps://example.com/x.png\n")
    with pytest.raises(TLError, match=r"line 4 is a URL \(https://example.com/x.png\): tl.predict reads local"):
        list_inputs(urls)
    with pytest.raises(TLError, match="is not a regular file or a folder"):
        list_inputs("/dev/zero")


def test_predict_lists_with_a_byte_order_mark_and_quoted_paths_read_as_meant(tmp_path):
    """Found by a hostile tester: a list saved by a Windows editor (BOM, CRLF) lost its first path, and paths as
    Explorer's "Copy as path" writes them (in double quotes) were not found."""
    from tl.predict import list_inputs

    listed = tmp_path / "list.txt"
    listed.write_bytes(b'\xef\xbb\xbf/data/a.png\r\n"/data/my photos/b.png"\r\n\'c.png\'\r\n')
    assert list_inputs(listed) == [Path("/data/a.png"), Path("/data/my photos/b.png"), tmp_path / "c.png"]


def test_predict_lists_in_utf16_and_quoted_hash_names_read_as_meant(tmp_path):
    """Found by a hostile tester: a list saved as UTF-16 (Notepad's "Unicode", PowerShell 5's `>`) was refused as a
    binary file, and a quoted path whose name starts with # was taken for a comment."""
    from tl.predict import list_inputs

    for encoding in ("utf-16", "utf-16-be"):
        listed = tmp_path / f"{encoding}.txt"
        body = '# mine\r\n/data/a.png\r\n"#2 b.png"\r\n'.encode(encoding)
        listed.write_bytes(body if encoding == "utf-16" else b"\xfe\xff" + body)
        assert list_inputs(listed) == [Path("/data/a.png"), tmp_path / "#2 b.png"]


def test_predict_fails_when_no_input_could_be_read(finished, tmp_path, monkeypatch, capfd):
    run_dir, results = finished
    bad = tmp_path / "in"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"not a png")
    out = tmp_path / "p.csv"
    code, lines = entry("tl.predict", f"ckpt={run_dir}", f"inputs={bad}", f"output={out}",
                        f"hydra.run.dir={tmp_path / 'out'}", monkeypatch=monkeypatch, capfd=capfd)
    one_line(code, lines, "no input could be read (1 of 1")
    assert "a.png" in out.read_text()  # the errors are kept in the CSV


def test_folder_links_back_into_the_data_are_refused(tmp_path):
    """A link inside a class folder to data.root (or above it, or into another class) made every other class's
    images count again under that class (exit 0); a link to /tmp named dir.png walked all of /tmp."""
    from tl.data.sources import ImageFolderSource

    for target, says in (("..", "data.root or above"), ("../../..", "data.root or above"),
                         ("../b", "inside data.root")):
        root = image_folder(tmp_path / f"d{len(target)}{target[-1]}", per_class=3)
        (root / "a" / "up.png").symlink_to(target)
        with pytest.raises(TLError, match=f"links to .*{says}.*remove the link"):
            ImageFolderSource(root).load()
    root = image_folder(tmp_path / "inner", per_class=3)
    (root / "a" / "sub").mkdir()
    (root / "a" / "again").symlink_to("sub")  # within the class folder: read once, fine
    assert len(ImageFolderSource(root).load().paths) == 9


def test_a_run_dir_that_is_empty_or_holds_runs_and_a_read_only_default_are_refused(finished, tmp_path, monkeypatch,
                                                                                     capsys):
    from tl import cli

    with pytest.raises(SystemExit):
        cli.check_run_dir(["hydra.run.dir="], "train")
    assert "hydra.run.dir is empty" in capsys.readouterr().err
    holder = tmp_path / "runs"
    shutil.copytree(finished[0], holder / "one")
    with pytest.raises(SystemExit):
        cli.check_run_dir([f"hydra.run.dir={holder}"], "train")
    assert "holds other runs (one/)" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "_read_only", lambda folder: True)
    with pytest.raises(SystemExit):
        cli.check_run_dir(["data=digits"], "predict")
    assert "the default run folder logs/ cannot be made" in capsys.readouterr().err
    cli.check_run_dir(["--help"], "train")  # help writes nothing


@pytest.mark.parametrize("value", ["-1", "1.5", "-0.5"])
def test_batch_limits_that_mean_nothing_are_refused(value, tiny_cfg):
    from tl.checks import validate

    cfg = tiny_cfg()
    from omegaconf import open_dict

    with open_dict(cfg):
        cfg.trainer.limit_train_batches = float(value) if "." in value else int(value)
    with pytest.raises(TLError, match="trainer.limit_train_batches=.* is invalid"):
        validate(cfg)


# -- round 33 (a hostile tester's findings) ---------------------------------------------------------------------------
def test_overwrite_keeps_the_previous_run_when_the_new_one_is_refused_for_its_input(victim, tmp_path):
    """overwrite=true emptied a finished run, then the new run failed on its own bad weights file: both were lost.
    Now the previous run is given up only once the new run's data, model and weights have loaded."""
    run_dir, before = victim
    with pytest.raises(TLError, match="not found"):
        train(make_cfg(run_dir, [*TINY, "trainer.max_epochs=1", "scenario=large_similar", "logger=none",
                                 "overwrite=true", f"model.pretrained={tmp_path / 'missing.pth'}"]))
    assert checksums(run_dir) == before


def test_a_run_stopped_before_its_first_epoch_ended_is_not_started_over(tiny_cfg, tmp_path):
    """A run stopped by SIGTERM in its first epoch has only checkpoints/interrupted.ckpt: the same command again (no
    ckpt_path) deleted it and started from scratch. It is an unfinished run now; ckpt_path=last names the fix."""
    train(tiny_cfg("trainer.max_epochs=1", "export=false", "logger=none"))
    checkpoints = tmp_path / "checkpoints"
    os.replace(checkpoints / "last.ckpt", checkpoints / "interrupted.ckpt")
    for path in checkpoints.glob("epoch*.ckpt"):
        path.unlink()
    (tmp_path / "results.json").unlink()
    saved = hashlib.sha256((checkpoints / "interrupted.ckpt").read_bytes()).hexdigest()
    with pytest.raises(TLError, match=r"holds an unfinished run \(checkpoints/interrupted.ckpt\): resume it with "
                                      "ckpt_path=auto"):
        train(tiny_cfg("trainer.max_epochs=1", "export=false", "logger=none"))
    with pytest.raises(TLError, match="stopped before its first epoch ended: resume it with ckpt_path=auto"):
        train(tiny_cfg("trainer.max_epochs=1", "export=false", "logger=none", "ckpt_path=last"))
    assert hashlib.sha256((checkpoints / "interrupted.ckpt").read_bytes()).hexdigest() == saved


def test_ckpt_path_auto_takes_the_latest_state_even_in_a_copy_without_timestamps(tiny_cfg, tmp_path):
    """ckpt_path=auto chose by file time: in a run folder copied with cp -r (new times, in copy order) it resumed an
    old interrupted.ckpt over a later last.ckpt. It reads the stamp each checkpoint carries now."""
    from tl.train import resolve_ckpt_path

    train(tiny_cfg("trainer.max_epochs=2", "export=false", "logger=none"))
    checkpoints = tmp_path / "checkpoints"
    last = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert last["global_step"] > 0 and last["tl_saved_ns"] > 0
    older = {**last, "global_step": 1, "tl_saved_ns": last["tl_saved_ns"] - 10**9}
    torch.save(older, checkpoints / "interrupted.ckpt")  # written after last.ckpt: the newer file, the older state
    assert (checkpoints / "interrupted.ckpt").stat().st_mtime >= (checkpoints / "last.ckpt").stat().st_mtime
    assert resolve_ckpt_path("auto", tmp_path) == str(checkpoints / "last.ckpt")
    (checkpoints / "last.ckpt").write_bytes(b"damaged")  # an unreadable candidate gives way to a readable one
    assert resolve_ckpt_path("auto", tmp_path) == str(checkpoints / "interrupted.ckpt")


@pytest.mark.slow
@pytest.mark.parametrize("changed", ["seed=7", "data.samples_per_class=8", "data.val_fraction=0.3"])
def test_a_resume_on_another_split_of_the_data_is_refused(changed, tiny_cfg, tmp_path):
    """Resuming re-made the splits from the current settings: with another seed, 12 of 18 test images had been
    trained on, in silence. The checkpoint carries a digest of its splits; another split is refused in one line."""
    train(tiny_cfg("trainer.max_epochs=1", "export=false", "logger=none", "data.samples_per_class=12"))
    before = hashlib.sha256((tmp_path / "checkpoints" / "last.ckpt").read_bytes()).hexdigest()
    with pytest.raises(TLError, match="trained on another split of the data than this run makes"):
        train(tiny_cfg("trainer.max_epochs=2", "export=false", "logger=none", "data.samples_per_class=12",
                       "ckpt_path=last", changed))
    assert hashlib.sha256((tmp_path / "checkpoints" / "last.ckpt").read_bytes()).hexdigest() == before
    results, _ = train(tiny_cfg("trainer.max_epochs=2", "export=false", "logger=none", "data.samples_per_class=12",
                                "ckpt_path=last"))  # the run's own settings resume
    assert results["epochs"] == 2


def test_auto_with_one_image_per_class_says_why_it_cannot_compare_the_probes(auto_cfg):
    """The reason read "gain +nan < 0.1 -> different": a comparison that is false, and not the real reason."""
    cfg = auto_cfg("data.samples_per_class=1")
    evidence = cfg.scenario.evidence
    assert "cannot be measured with 1 training image(s) in a class" in evidence.reason and "nan" not in evidence.reason
    assert evidence.feature_gain is None and evidence.domain == "different"


def test_predict_says_which_files_of_a_folder_it_does_not_predict(tmp_path, caplog):
    """Files without an image extension (`scan01`, `b.png ` with a trailing space) were dropped from a folder's
    predictions with no row, warning or count; training warns about the same files."""
    import logging

    from tl.predict import list_inputs

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "scan01").write_bytes((tmp_path / "a.png").read_bytes())
    (tmp_path / "b.png ").write_bytes((tmp_path / "a.png").read_bytes())
    with caplog.at_level(logging.WARNING, logger="tl.predict"):
        assert list_inputs(tmp_path) == [tmp_path / "a.png"]
    assert "2 file(s) under" in caplog.text and "were not predicted" in caplog.text


def test_evaluate_refuses_size_settings_it_would_ignore(finished, tmp_path, monkeypatch, capfd):
    """`tl.evaluate ... data.image_size=160` reported the model at its own size, in silence."""
    run_dir, _ = finished
    code, lines = entry("tl.evaluate", f"ckpt={run_dir}", "data=synthetic", "data.image_size=48",
                        f"output={tmp_path / 'e.json'}", f"hydra.run.dir={tmp_path / 'out'}",
                        monkeypatch=monkeypatch, capfd=capfd)
    one_line(code, lines, "data.image_size=48 does not apply to tl.evaluate: a model is evaluated on the inputs")
    assert not (tmp_path / "e.json").exists()


def test_a_sweep_refuses_hydra_run_dir_it_would_ignore(tmp_path, monkeypatch, capfd):
    """With -m, hydra.run.dir was ignored in silence and the runs went to ./logs/train/multiruns/."""
    code, lines = entry("tl.train", "-m", "seed=1,2", f"hydra.run.dir={tmp_path / 'mine'}",
                        monkeypatch=monkeypatch, capfd=capfd)
    one_line(code, lines, "would ignore it: give hydra.sweep.dir=DIR instead")
    assert not (tmp_path / "mine").exists()


def test_settings_that_contradict_or_mislabel_are_refused(finished, tiny_cfg, tmp_path):
    """Found by a hostile tester: min_epochs above max_epochs trained past max_epochs; overwrite=true with
    ckpt_path=last resumed and ignored overwrite; tl.predict output=x.json wrote CSV into it."""
    from tl.checks import validate
    from tl.utils import check_output_file

    with pytest.raises(TLError, match="trainer.min_epochs=5 is invalid"):
        validate(tiny_cfg("trainer.max_epochs=2", "trainer.min_epochs=5"))
    with pytest.raises(TLError, match=r"output='.*x.json' names a .json file but this command writes .csv"):
        check_output_file(tmp_path / "x.json", "output", ".csv")
    check_output_file(tmp_path / "preds_lr0.001", "output", ".csv")  # a dot in a name is not a format


def test_review_fixes_of_round_33(tiny_cfg, tmp_path):
    """A reviewer's findings on this round's fixes: train() from a worker thread (signals are the main thread's),
    `raise ... from None` hides its context from os_error, early stopping's monitor checked without model
    checkpointing, train/loss_epoch is logged, and shards made before data.layout keep their fingerprint."""
    import threading

    from omegaconf import OmegaConf

    from tl.checks import validate
    from tl.errors import os_error
    from tl.shard import _recipe
    from tl.utils import sigterm_as_exception

    failed = []

    def in_thread():
        try:
            with sigterm_as_exception():
                pass
        except Exception as e:  # noqa: BLE001
            failed.append(e)

    worker = threading.Thread(target=in_thread)
    worker.start()
    worker.join()
    assert not failed
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise ValueError("a bug while handling it") from None
    except ValueError as e:
        assert os_error(e) is None
    with pytest.raises(TLError, match="callbacks.early_stopping.monitor='val_acc' is not logged"):
        validate(tiny_cfg("callbacks.model_checkpoint=null", "callbacks.early_stopping.monitor=val_acc"))
    validate(tiny_cfg("callbacks.model_checkpoint.monitor=train/loss_epoch", "callbacks.model_checkpoint.mode=min"))
    cfg = OmegaConf.create({"seed": 0, "chunk_bytes": "8MB", "data": {"source": {"root": "/x", "layout": "auto"},
                                                                       "val_fraction": 0.2, "test_fraction": 0.2}})
    assert "layout" not in _recipe(cfg)["source"]
    cfg.data.source.layout = "classes"
    assert _recipe(cfg)["source"]["layout"] == "classes"
    # shards made before raw pixels keep their fingerprint at the default ratio; another ratio is another recipe
    assert "raw_max_ratio" not in _recipe(cfg) and "raw_max_ratio" not in _recipe(OmegaConf.merge(cfg, {
        "raw_max_ratio": 1.5}))
    assert _recipe(OmegaConf.merge(cfg, {"raw_max_ratio": 0}))["raw_max_ratio"] == 0


def test_predict_takes_a_run_folder_without_an_export(victim):
    """tl.evaluate and tl.export take ckpt=RUN for a run with checkpoints but no export (export=false); tl.predict
    refused it. It serves the run's best checkpoint now, as they do."""
    from tl.predict_torch import TorchPredictor

    run_dir, _ = victim
    shutil.rmtree(run_dir / "export")
    best = json.loads((run_dir / "results.json").read_text())["best_ckpt"]
    predictor = TorchPredictor(str(run_dir), "cpu")
    assert Path(predictor.source).name == Path(best).name and len(predictor.class_names) == 4


def test_class_folders_named_like_splits_read_as_classes_with_data_layout(tmp_path):
    """A quality-control set with classes valid/ and invalid/ was read as a split layout, and the error told the user
    to put class folders under data.root, where they were. The error names data.layout=classes, which reads them."""
    from tl.data.sources import ImageFolderSource

    root = image_folder(tmp_path / "qc", per_class=3, classes=("invalid", "valid"))
    with pytest.raises(TLError, match="add data.layout=classes"):
        ImageFolderSource(root).load()
    images = ImageFolderSource(root, layout="classes").load()
    assert images.classes == ["invalid", "valid"] and np.bincount(images.targets).tolist() == [3, 3]
    with pytest.raises(TLError, match="data.layout='flat' is invalid"):
        ImageFolderSource(root, layout="flat")
    with pytest.raises(TLError, match="has no train/ folder"):
        ImageFolderSource(image_folder(tmp_path / "flat", per_class=2), layout="splits").load()


def test_overwrite_with_a_resume_resumes_and_says_overwrite_does_not_apply(tiny_cfg, tmp_path, caplog):
    """overwrite=true with ckpt_path=last resumed and ignored overwrite in silence. It still resumes (a SLURM job
    that starts over once and resumes on every requeue passes both), and a warning says overwrite does not apply."""
    import logging

    train(tiny_cfg("trainer.max_epochs=1", "export=false", "logger=none"))
    with caplog.at_level(logging.WARNING, logger="tl.train"):
        results, _ = train(tiny_cfg("trainer.max_epochs=2", "export=false", "logger=none", "overwrite=true",
                                    "ckpt_path=last"))
    assert results["epochs"] == 2 and "overwrite=true does not apply" in caplog.text


def test_a_run_dir_through_a_dangling_or_looping_link_is_one_line(tmp_path, capfd):
    from tl import cli

    (tmp_path / "dangling").symlink_to(tmp_path / "deleted-run")  # a "latest" link to a run since removed
    (tmp_path / "loop").symlink_to("loop")
    for target in (tmp_path / "dangling", tmp_path / "dangling" / "sub", tmp_path / "loop"):
        with pytest.raises(SystemExit) as e:
            cli._check_creatable("hydra.run.dir", target)
        err = capfd.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1
        assert "is a symbolic link to a missing folder, or a link loop" in err[0]
