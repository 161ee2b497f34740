"""scripts/study.py over several image folders: sizes past a class's count fall back to the whole train split, the
probe baseline runs on tl's own splits, and the summary states issue 16's margins from the rows it is given."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _row(policy: str, acc: float, size: str = "10", seed: int = 0) -> dict:
    return {"size": size, "policy": policy, "resolved": policy, "seed": seed, "n_train": 30, "test_acc": acc,
            "val_acc": "", "fit_seconds": 100.0, "epochs": 30, "side": 128, "run": "r"}


def test_summary_states_each_margin(tmp_path):
    study = _load("study")
    rows = {"a": [_row("probe", 0.80), _row("auto", 0.87), _row("small_different", 0.875), _row("small_similar", 0.7),
                  _row("scratch", 0.70)],
            "b": [_row("probe", 0.80, "100"), _row("auto", 0.83, "100"), _row("small_different", 0.90, "100"),
                  _row("scratch", 0.50, "100")]}
    table = study.summarize(tmp_path, rows)
    a, b = (line for line in table.splitlines() if line.startswith(("| a ", "| b ")))
    assert "+7.0 (met)" in a and "small_different 0.875" in a and "-0.5 (met)" in a and "+17.0 (met)" in a
    assert "+3.0 (not met)" in b and "-7.0 (not met)" in b and "+33.0 (met)" in b  # 4 points needed at 100/class
    assert (tmp_path / "summary.md").read_text().count("not met") == 2
    assert (tmp_path / "summary.png").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("skimage") is None, reason="the textures builder needs scikit-image")
def test_probe_sweep_on_tl_splits(tmp_path):
    """The probe baseline through the study on a real (tiny) dataset: 3 training images per class, so size 100
    runs on the whole train split; the training subset of size 2 is what tl.train would draw."""
    md = _load("make_datasets")
    md.build("textures", tmp_path / "data", 5, 0)  # 3 classes x (3 train, 1 val, 1 test)
    out = tmp_path / "study"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "study.py"), "--out", str(out), "--datasets",
                             str(tmp_path / "data" / "textures"), "--sizes", "2", "100", "--seeds", "0",
                             "--sweeps", "probe"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {r["size"]: r for f in (out / "textures").glob("*-probe.json") for r in json.loads(f.read_text())["rows"]}
    assert rows["2"]["n_train"] == 6 and rows["100"]["n_train"] == 9  # 100 > 3 per class: all of train
    assert rows["2"]["pixels"] == 224 and rows["2"]["n_test"] == 3
    assert 0.0 <= rows["100"]["test_acc"] <= 1.0
    summary = (out / "summary.md").read_text()
    assert "| textures | 2 | 6 |" in summary and "| textures | 100 | 9 |" in summary


@pytest.mark.parametrize("args, code, says", [
    (["--datasets", "{tmp}/none"], 2, "--datasets {tmp}/none: not a folder"),
    (["--datasets", "{tmp}/a/ds", "{tmp}/b/ds"], 2, "two folders named 'ds'"),
    # found by a hostile tester: the runs' folder inside the dataset became a class, after 26 s, left behind
    (["--datasets", "{tmp}/a/ds", "--out", "{tmp}/a/ds/out"], 2, "--out {tmp}/a/ds/out lies inside --datasets"),
    (["--datasets", "{tmp}/a/ds", "--", "data.batchsize=4"], 2, "did you mean data.batch_size"),
    (["--datasets", "{tmp}/a/ds", "--", "data.batch_size=abc"], 2, "study.py: error: data.batch_size='abc' is invalid"),
    (["--datasets", "{tmp}/a/ds", "--out", "{tmp}/file/x", "--collect-only"], 2,
     "study.py: error: Not a directory: {tmp}/file/x/ds (choose a writable --out)"),
    (["--out", "{tmp}/none/out", "--collect-only"], 1, "--out {tmp}/none/out: no such folder, so no runs to collect"),
    # auto's own keys only make sense where every run is auto (the presets have no such keys)
    (["--datasets", "{tmp}/a/ds", "--", "scenario.small_budget_minutes=null"], 2, "apply with --policies auto"),
    (["--datasets", "{tmp}/a/ds", "--policies", "auto", "--", "scenario.small_budgt=1"], 2,
     "did you mean scenario.small_budget_minutes"),
])
def test_bad_study_arguments_fail_in_one_line_before_any_run(tmp_path, args, code, says):
    for d in ("a/ds", "b/ds"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "file").write_text("")
    args = [a.format(tmp=tmp_path) for a in args]
    out = ["--out", str(tmp_path / "out")] if "--out" not in args else []
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "study.py"), "--sizes", "10", "--seeds", "0",
                           "--sweeps", "transfer", *out, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == code and says.format(tmp=tmp_path) in proc.stderr, proc.stderr[-1500:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists() and not (tmp_path / "none").exists()


@pytest.mark.slow
def test_a_sigterm_to_the_study_reaches_its_sweep_and_leaves_no_orphan(tmp_path):
    """Found by a hostile tester: on SIGTERM (a scheduler's, `timeout`) the script exited at once and its
    `tl.train -m` sweep ran on, orphaned. Now the sweep is told, saves its run's state, and the script waits."""
    import os
    import signal
    import time

    import numpy as np
    from PIL import Image

    image_root = tmp_path / "ds"
    rng = np.random.default_rng(0)

    for k in range(2):
        (image_root / f"c{k}").mkdir(parents=True)
        for i in range(12):
            Image.fromarray((rng.random((24, 24, 3)) * 60 + 90 * k).astype("uint8")).save(image_root / f"c{k}/{i}.png")
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "study.py"), "--out", str(out), "--datasets",
                             str(image_root), "--sizes", "3", "--seeds", "0", "--policies", "small_different",
                             "--sweeps", "transfer", "--", "data.image_size=64", "trainer.max_epochs=200"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not list(out.rglob("last.ckpt")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(1)  # training has begun: a first epoch's checkpoint is written
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    os.kill(proc.pid, signal.SIGTERM)  # the script alone, as `timeout` does
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "study.py: error: interrupted by SIGTERM" in err and "tl: interrupted by SIGTERM" in err
    assert list(out.rglob("interrupted.ckpt"))  # the sweep's run saved its state before the script exited
    orphans = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout.split()
    assert not orphans
