"""tl.predict's PyTorch path: a tl checkpoint (.ckpt) or a safetensors export directory, decoded in DataLoader
workers, batched under `torch.inference_mode` (BatchNorm folded, channels-last: `tl.inference.optimize_for_inference`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from tl.data.images import open_image
from tl.data.transforms import decode_side, eval_transform
from tl.errors import TLError
from tl.inference import EXPORT_CONFIG, delivered, load_classifier, optimize_for_inference, resolve_device
from tl.onnx_runtime import check_regular, read_error

log = logging.getLogger("tl.predict")


class FileDataset(Dataset):
    """Decodes and transforms image files; a file that fails gives a zero image and its error message."""

    def __init__(self, paths: list[Path], transform, input_size: list[int], min_side: int | None = None,
                 interpolation: str = "bicubic"):
        self.paths, self.transform, self.input_size = paths, transform, input_size
        self.min_side, self.interpolation = min_side, interpolation

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        try:
            check_regular(self.paths[i])
            # any mode, EXIF orientation applied, large files reduced to what the transform needs (tl.data.images)
            return self.transform(open_image(self.paths[i], self.min_side, self.interpolation)), ""
        except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, DecompressionBombError
            return torch.zeros(self.input_size), read_error(e)


def auto_workers(n_files: int, batch_size: int, device: torch.device) -> int:
    """Decoding processes: none for a single batch (startup costs more); on the CPU, half the cores (the model
    needs the rest); beside a GPU, up to 8."""
    cores = os.cpu_count() or 1
    if n_files <= batch_size:
        return 0
    return min(8, cores) if device.type == "cuda" else min(4, max(1, cores // 2))


def auto_threads(workers: int, device: torch.device) -> int:
    """Model threads on the CPU: the cores the decoding workers leave, at most torch's own setting (OMP_NUM_THREADS).

    Oversubscribed cores make every intra-op barrier wait for a descheduled thread: on 2 shared cores, 2 model threads
    beside a decoding worker ran 5-10x slower than 1.
    """
    if device.type != "cpu":
        return torch.get_num_threads()
    return max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) - workers))


@torch.inference_mode()
def batch_probs(models: list[torch.nn.Module], loader: DataLoader, device: torch.device,
                temperatures: list[float]) -> Iterator[tuple[np.ndarray, list[str]]]:
    """Per batch: calibrated probabilities (N, C), the mean over `models` (a snapshot ensemble's members, or one
    model), and the read errors ('' for a file that was read)."""
    for x, errors in loader:
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        probs = torch.stack([(m(x).float() / t).softmax(dim=-1) for m, t in zip(models, temperatures, strict=True)])
        yield probs.mean(dim=0).cpu().numpy(), list(errors)


def _delivered_elsewhere(export: Path) -> bool:
    """The export holds the best checkpoint alone of a run that delivered its snapshot ensemble (no ONNX there)."""
    try:
        sources = json.loads((export / EXPORT_CONFIG).read_text()).get("weights_from") or {}
        return isinstance(sources, dict) and sources.get("run_delivered") == "ensemble"
    except (OSError, ValueError, AttributeError):
        return False


def _onnx_members(export: Path) -> int:
    """How many models an export folder's model.onnx averages (1 when it says nothing)."""
    try:
        members = json.loads((export / EXPORT_CONFIG).read_text()).get("onnx", {}).get("members", 1)
        return int(members) if isinstance(members, int) else 1
    except (OSError, ValueError, AttributeError):
        return 1


class TorchPredictor:
    """The PyTorch model behind tl.predict for a .ckpt or an export directory."""

    backend = "pytorch"

    def __init__(self, ckpt: str, device: str, optimize: bool = True):
        self.device = resolve_device(device)
        run = Path(ckpt).expanduser()
        model, members = delivered(run) if run.is_dir() else (None, [])
        # a run that delivered its snapshot ensemble is served as that ensemble (its export's ONNX graph is the same)
        single = ckpt
        if model != "ensemble" and run.is_dir() and not (run / "model.json").is_file() \
                and not (run / "export" / "model.json").is_file():
            # a training run without an export (export=false, or it failed): its best checkpoint, as tl.evaluate and
            # tl.export take it
            from tl.evaluate import resolve_members

            found = resolve_members(ckpt, None)
            if len(found) > 1:  # a run with snapshots that records no choice: its snapshots, as tl.evaluate scores
                model, members = "ensemble", found
            single = str(found[0])
        self.members = [load_classifier(p, self.device) for p in members] if model == "ensemble" else \
            [load_classifier(single, self.device)]
        self.clf = self.members[-1]
        if any(m.class_names != self.clf.class_names or m.preprocess != self.clf.preprocess for m in self.members):
            raise TLError(f"ckpt={ckpt!r}: the members of its ensemble disagree on classes or preprocessing")
        export = Path(self.clf.source)
        if model != "ensemble" and export.is_dir() and _delivered_elsewhere(export):
            log.warning("%s holds the run's best single checkpoint, but the run delivered (and reported the test "
                        "accuracy of) its snapshot ensemble, which it could not export without ONNX: give ckpt= the "
                        "training run's folder to serve the ensemble", export)
        elif model != "ensemble" and export.is_dir() and _onnx_members(export) > 1:
            log.warning("%s: model.safetensors is the run's best single checkpoint, and model.onnx the snapshot "
                        "ensemble it delivered; for the ensemble give ckpt=%s or the training run's folder",
                        export, export / "model.onnx")
        temperatures = [m.temperature for m in self.members]
        self.class_names, self.source = self.clf.class_names, str(run) if model == "ensemble" else self.clf.source
        self.temperature = temperatures[0] if len(temperatures) == 1 else temperatures
        self.optimize = optimize

    def settings(self, n_files: int, batch_size: int, workers: int | None, threads: int | None) -> tuple[int, int]:
        workers = auto_workers(n_files, batch_size, self.device) if workers is None else int(workers)
        return workers, int(threads or auto_threads(workers, self.device))

    def run(self, paths: list[Path], batch_size: int, workers: int, threads: int) -> Iterator:
        clf = self.clf
        models = [optimize_for_inference(m.model, clf.preprocess["input_size"]) if self.optimize else m.model
                  for m in self.members]
        dataset = FileDataset(paths, eval_transform(clf.preprocess), clf.preprocess["input_size"],
                              decode_side(clf.preprocess), str(clf.preprocess.get("interpolation") or "bicubic"))
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                            pin_memory=self.device.type == "cuda")
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            yield from batch_probs(models, loader, self.device, [m.temperature for m in self.members])
        finally:
            torch.set_num_threads(previous)
