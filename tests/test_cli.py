"""Bad input at the command line: non-zero exit, one line on stderr naming the culprit, nothing trained."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run_train(*overrides: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tl.train", *overrides, f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("tl: error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


@pytest.mark.parametrize(("overrides", "culprit"), [
    (["scenario=large_weird"], "scenario=large_weird is not a known scenario"),
    (["data=mnist_typo"], "data=mnist_typo is not a known data"),
    (["model.name=resnet5O"], "model.name='resnet5O' is not a timm model"),
    (["data=imagefolder"], "data.root is required"),
    (["data=imagefolder", "data.root=/no/such/dir"], "data.root='/no/such/dir' does not exist"),
    (["model.pretrained=/no/such/weights.pth"], "weights file '/no/such/weights.pth' not found"),
])
def test_bad_input_exits_with_one_line(tmp_path, overrides, culprit):
    proc = run_train(*overrides, tmp_path=tmp_path)
    assert proc.returncode == 2
    assert culprit in error_line(proc)
    assert not (tmp_path / "run" / "results.json").exists()


def test_empty_class_folder_and_misfit_checkpoint(tmp_path):
    from PIL import Image

    data = tmp_path / "data"
    (data / "a").mkdir(parents=True)
    (data / "b").mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(data / "a" / f"{i}.png")
    proc = run_train("data=imagefolder", f"data.root={data}", tmp_path=tmp_path)
    assert proc.returncode == 2 and f"class folder '{data / 'b'}' has no readable images" in error_line(proc)

    import timm

    torch.save(timm.create_model("resnet18").state_dict(), tmp_path / "r18.pth")
    proc = run_train(f"model.pretrained={tmp_path / 'r18.pth'}", tmp_path=tmp_path)  # default is efficientnet
    assert proc.returncode == 2 and "does not fit model EfficientNet" in error_line(proc)
