"""`python -m tl.predict ckpt=PATH inputs=PATH output=FILE.csv`: class and probability for each image file.

1. load the classifier (a tl checkpoint or an exported model directory): its class names and preprocessing;
2. list the inputs: one file, a folder (searched recursively for images) or a .txt list of files;
3. decode in DataLoader workers (an unreadable file becomes an error on its row, never a stopped run);
4. batched softmax (of logits / the calibration temperature the training run fitted) under `torch.inference_mode`,
   top-k per file, one CSV row per file; with `min_prob=P`, a file whose top probability is below P gets an empty
   label and the reason in the `abstained` column.
"""

from __future__ import annotations

import csv
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from tl.checks import PREDICT_RULES, check_rules
from tl.cli import launch
from tl.data.images import to_rgb
from tl.data.sources import IMAGE_EXTENSIONS
from tl.data.transforms import eval_transform
from tl.errors import TLError
from tl.inference import load_classifier, optimize_for_inference, resolve_device
from tl.utils import atomic_path, check_required, ensure_writable, user_errors

log = logging.getLogger("tl.predict")


def list_inputs(inputs: str | Path) -> list[Path]:
    """The files to predict: a file, the images under a folder (recursively, sorted), or the lines of a .txt list.

    Relative paths in a .txt list are relative to the list's folder; blank lines and `#` comments are skipped.
    """
    root = Path(inputs).expanduser()
    if root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                       and not any(part.startswith(".") for part in p.relative_to(root).parts))
        if not files:
            raise TLError(f"inputs={str(inputs)!r} has no image files ({', '.join(IMAGE_EXTENSIONS[:4])}, ...): "
                          "point inputs at a folder of images, an image file or a .txt list of files")
        return files
    if root.is_file() and root.suffix.lower() == ".txt":
        lines = [line.strip() for line in root.read_text().splitlines()]
        files = [root.parent / line for line in lines if line and not line.startswith("#")]  # absolute ones stay
        if not files:
            raise TLError(f"inputs={str(inputs)!r} lists no files: write one image path per line")
        return files
    if root.is_file():
        return [root]
    raise TLError(f"inputs={str(inputs)!r} not found: give an image file, a folder of images or a .txt list of files")


class FileDataset(Dataset):
    """Decodes and transforms image files; a file that fails gives a zero image and its error message."""

    def __init__(self, paths: list[Path], transform, input_size: list[int]):
        self.paths, self.transform, self.input_size = paths, transform, input_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        try:
            with Image.open(self.paths[i]) as f:
                return self.transform(to_rgb(f)), ""  # any mode, EXIF orientation applied (tl.data.images)
        except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, DecompressionBombError
            message = (str(e).splitlines() or [""])[0][:200]
            return torch.zeros(self.input_size), f"{type(e).__name__}: {message}"


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


def write_csv(path: Path, rows: list[dict], topk: int, abstain: bool = False) -> None:
    columns = ["path", "label", "prob", "error"] + (["abstained"] if abstain else []) + [
        f"{c}_{k}" for k in range(2, topk + 1) for c in ("label", "prob")]
    # UTF-8 whatever the locale; a file name that is not valid UTF-8 is written as its original bytes
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)


@torch.inference_mode()
def predict_rows(model: torch.nn.Module, loader: DataLoader, paths: list[Path], class_names: list[str], topk: int,
                 device: torch.device, temperature: float = 1.0, min_prob: float | None = None) -> Iterator[dict]:
    """One row per file, in order: the top-k labels and (calibrated) probabilities, or the error that kept it from
    being read. Below `min_prob` the label is left empty and `abstained` says why (the probabilities stay)."""
    i = 0
    for x, errors in loader:
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        top_p, top_i = (model(x).float() / temperature).softmax(dim=-1).topk(topk, dim=-1)
        for p, c, error in zip(top_p.tolist(), top_i.tolist(), errors, strict=True):
            row = {"path": str(paths[i]), "error": error}
            i += 1
            if not error:
                for k in range(topk):
                    suffix = f"_{k + 1}" if k else ""
                    row[f"label{suffix}"], row[f"prob{suffix}"] = class_names[c[k]], f"{p[k]:.6f}"
                if min_prob is not None and p[0] < min_prob:
                    row["abstained"] = f"top probability {p[0]:.4f} < min_prob {min_prob:g} (best: {class_names[c[0]]})"
                    row["label"] = ""
            yield row


def predict(cfg: DictConfig) -> tuple[list[dict], dict]:
    """Predict every input file as `cfg` says; write the CSV and return (rows, summary)."""
    check_required(cfg)
    check_rules(cfg, PREDICT_RULES)
    output = Path(cfg.output).expanduser()
    if output.is_dir():
        raise TLError(f"output={cfg.output!r} is a folder: give a file path, e.g. output={output / 'predictions.csv'}")
    device = resolve_device(cfg.get("device", "auto"))
    clf = load_classifier(cfg.ckpt, device)
    paths = list_inputs(cfg.inputs)
    ensure_writable(output.parent)
    topk = min(cfg.topk, clf.num_classes)
    min_prob = cfg.get("min_prob")
    min_prob = None if min_prob is None else float(min_prob)
    batch_size = cfg.batch_size
    workers = cfg.get("num_workers")
    workers = auto_workers(len(paths), batch_size, device) if workers is None else int(workers)
    threads = int(cfg.get("threads") or auto_threads(workers, device))

    model = optimize_for_inference(clf.model, clf.preprocess["input_size"]) if cfg.get("optimize", True) else clf.model
    dataset = FileDataset(paths, eval_transform(clf.preprocess), clf.preprocess["input_size"])
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        started = time.perf_counter()
        rows = list(predict_rows(model, loader, paths, clf.class_names, topk, device, clf.temperature, min_prob))
        seconds = time.perf_counter() - started
    finally:
        torch.set_num_threads(previous_threads)
    write_csv(output, rows, topk, abstain=min_prob is not None)

    n_errors = sum(bool(r["error"]) for r in rows)
    n_abstained = sum(bool(r.get("abstained")) for r in rows)
    summary = {"files": len(rows), "errors": n_errors, "abstained": n_abstained, "temperature": clf.temperature,
               "seconds": round(seconds, 3),
               "images_per_s": round(len(rows) / seconds, 1), "workers": workers, "threads": threads,
               "output": str(output), "ckpt": clf.source}
    abstained = f", {n_abstained} abstained (min_prob={min_prob:g})" if min_prob is not None else ""
    print(f"tl.predict: {len(rows)} files, {n_errors} errors{abstained}, {summary['images_per_s']} images/s "
          f"({seconds:.2f}s, {workers} decoding workers, {threads} model threads) -> {output}")
    for row in [r for r in rows if r["error"]][:5]:
        print(f"  error: {row['path']}: {row['error']}")
    return rows, summary


@hydra.main(version_base="1.3", config_path="../conf", config_name="predict")
@user_errors
def _hydra_main(cfg: DictConfig) -> None:
    predict(cfg)


def main() -> None:
    launch(_hydra_main, "predict")


if __name__ == "__main__":
    main()
