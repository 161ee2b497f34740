"""`python -m tl.predict ckpt=PATH inputs=PATH output=FILE.csv`: class and probability for each image file.

1. load the classifier: a tl checkpoint or an exported model directory (PyTorch, `tl.predict_torch`), or an exported
   `model.onnx` (ONNX Runtime, `tl.onnx_runtime`: numpy and PIL only, no torch, Lightning or timm imported): its
   class names, preprocessing and calibration temperature come with it;
2. list the inputs: one file, a folder (searched recursively for images) or a .txt list of files;
3. decode in workers (an unreadable file becomes an error on its row, never a stopped run);
4. batched softmax (of logits / the calibration temperature the training run fitted), top-k per file, one CSV row
   per file, the same columns from either backend; with `min_prob=P`, a file whose top probability is below P gets an
   empty label and the reason in the `abstained` column.
"""

from __future__ import annotations

import codecs
import csv
import logging
import os
import re
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig

from tl.checks import PREDICT_RULES, check_rules
from tl.cli import launch
from tl.data.images import IMAGE_EXTENSIONS, JUNK_NAMES
from tl.errors import TLError
from tl.utils import (
    PREDICTIONS_HEADER,
    atomic_path,
    check_output_file,
    check_required,
    check_sweep_output,
    ensure_writable,
    megabytes,
    output_target,
    terminate_as_exception,
    user_errors,
)

log = logging.getLogger("tl.predict")


URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")  # http://, s3://, gs://, file://: not a local path


def list_inputs(inputs: str | Path) -> list[Path]:
    """The files to predict: a file, the images under a folder (recursively, sorted), or the lines of a .txt list.

    Relative paths in a .txt list are relative to the list's folder; blank lines and `#` comments are skipped.
    """
    root = Path(inputs).expanduser()
    if root.is_dir():
        # every entry with an image's name gets a row: a dangling link or a pipe gets one with its error
        entries = [p for p in root.rglob("*") if not p.is_dir() and not any(
            part.startswith(".") or part.lower() in JUNK_NAMES for part in p.relative_to(root).parts)]
        files = sorted(p for p in entries if p.suffix.lower() in IMAGE_EXTENSIONS)
        others = sorted(p for p in entries if p.suffix.lower() not in IMAGE_EXTENSIONS)
        if others:  # said, as training says it: a file named without its extension is not predicted in silence
            log.warning("%d file(s) under %s without an image extension (%s, ...) were not predicted, e.g. %r; list "
                        "them in a .txt file to predict them anyway", len(others), root,
                        ", ".join(IMAGE_EXTENSIONS[:4]), str(others[0].relative_to(root)))
        if not files:
            raise TLError(f"inputs={str(inputs)!r} has no image files ({', '.join(IMAGE_EXTENSIONS[:4])}, ...): "
                          "point inputs at a folder of images, an image file or a .txt list of files")
        return files
    if root.is_file() and root.suffix.lower() == ".txt":
        # a file name that is not valid UTF-8 keeps its bytes (and is reported on its row if it cannot be read)
        raw = root.read_bytes()
        if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):  # Notepad's "Unicode", PowerShell 5's `>`
            text = raw.decode("utf-16", errors="replace")
        else:
            text = raw.decode("utf-8", errors="surrogateescape")
        if "\x00" in text:
            raise TLError(f"inputs={str(inputs)!r} is not a text list of paths (it holds NUL bytes: a binary file "
                          "named .txt?): write one image path per line")
        text = text.removeprefix("\ufeff")  # the byte-order mark Windows editors and PowerShell write first
        # a comment is a line that starts with # as written; a quoted "#1.png" is a path
        lines = [("" if line.strip().startswith("#") else _unquote(line.strip())) for line in text.splitlines()]
        listed = [(n, line) for n, line in enumerate(lines, 1) if line]
        for n, line in listed:
            if URL.match(line):
                raise TLError(f"inputs={str(inputs)!r} line {n} is a URL ({line[:80]}): tl.predict reads local "
                              "files; download the images and list their paths")
        files = [root.parent / line for _, line in listed]  # absolute ones stay
        if not files:
            raise TLError(f"inputs={str(inputs)!r} lists no files: write one image path per line")
        return files
    if root.is_file():
        return [root]
    if root.exists():
        raise TLError(f"inputs={str(inputs)!r} is not a regular file or a folder (a device, a pipe, ...): give an "
                      "image file, a folder of images or a .txt list of files")
    raise TLError(f"inputs={str(inputs)!r} not found: give an image file, a folder of images or a .txt list of files")


def _unquote(line: str) -> str:
    """A path as Windows' "Copy as path" writes it, in double quotes (or in single quotes): without them."""
    if len(line) >= 2 and line[0] == line[-1] and line[0] in "\"'":
        return line[1:-1].strip()
    return line


def write_csv(path: Path, rows: list[dict], topk: int, abstain: bool = False) -> None:
    columns = PREDICTIONS_HEADER.split(",") + (["abstained"] if abstain else []) + [
        f"{c}_{k}" for k in range(2, topk + 1) for c in ("label", "prob")]
    # UTF-8 whatever the locale; a file name that is not valid UTF-8 is written as its original bytes
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)


def rows_from_probs(batches: Iterable[tuple[np.ndarray, list[str]]], paths: list[Path], class_names: list[str],
                    topk: int, min_prob: float | None = None) -> Iterator[dict]:
    """One row per file, in order: the top-k labels and (calibrated) probabilities, or the error that kept it from
    being read. Below `min_prob` the label is left empty and `abstained` says why (the probabilities stay)."""
    i = 0
    for probs, errors in batches:
        order = np.argsort(-probs, axis=-1, kind="stable")[:, :topk]
        for p, c, error in zip(probs.tolist(), order.tolist(), errors, strict=True):
            row = {"path": str(paths[i]), "error": error}
            i += 1
            if not error:
                for k in range(topk):
                    suffix = f"_{k + 1}" if k else ""
                    row[f"label{suffix}"], row[f"prob{suffix}"] = class_names[c[k]], f"{p[c[k]]:.6f}"
                top = p[c[0]]
                if min_prob is not None and top < min_prob:
                    row["abstained"] = f"top probability {top:.4f} < min_prob {min_prob:g} (best: {class_names[c[0]]})"
                    row["label"] = ""
            yield row


def load_predictor(ckpt: str, device: str, optimize: bool = True):
    """ONNX Runtime for a .onnx file; PyTorch for a .ckpt or an export directory."""
    if Path(ckpt).suffix.lower() == ".onnx":
        from tl.onnx_runtime import OnnxPredictor

        return OnnxPredictor(ckpt, device)
    from tl.predict_torch import TorchPredictor

    return TorchPredictor(ckpt, device, optimize)


def predict(cfg: DictConfig) -> tuple[list[dict], dict]:
    """Predict every input file as `cfg` says; write the CSV and return (rows, summary)."""
    check_required(cfg)
    check_rules(cfg, PREDICT_RULES)
    output = output_target(Path(cfg.output), "output", "predictions.csv")  # a link's target; no device, pipe, folder
    predictor = load_predictor(cfg.ckpt, cfg.get("device", "auto"), cfg.get("optimize", True))
    paths = list_inputs(cfg.inputs)
    ckpt = Path(str(cfg.ckpt)).expanduser()
    if ckpt.is_dir():  # an export folder, or a run's (its export/ and checkpoints/ are the model)
        model_dirs = [ckpt / "export", ckpt / "checkpoints"] if (ckpt / "export").is_dir() else [ckpt]
    else:
        model_dirs = [ckpt.parent] if ckpt.parent.name in ("export", "checkpoints") or (
            ckpt.parent / "model.json").is_file() else []
    check_sweep_output(output)
    check_output_file(output, "output", ".csv", reads=[ckpt, Path(str(cfg.inputs)), *paths], inside=model_dirs)
    class_names = predictor.class_names
    topk = min(cfg.topk, len(class_names))
    # each row: the path, then label and probability for each of the top k (an earlier CSV stays until the rename)
    row = max((len(os.fsencode(str(p))) for p in paths), default=0) + topk * (
        max((len(str(c).encode(errors="surrogateescape")) for c in class_names), default=0) + 16) + 32
    ensure_writable(output.parent, min_free_mb=megabytes(2 * row * len(paths)), setting="output=FILE.csv")
    min_prob = cfg.get("min_prob")
    min_prob = None if min_prob is None else float(min_prob)
    batch_size = cfg.batch_size
    workers, threads = predictor.settings(len(paths), batch_size, cfg.get("num_workers"), cfg.get("threads"))

    started = time.perf_counter()
    rows = list(rows_from_probs(predictor.run(paths, batch_size, workers, threads), paths, class_names, topk,
                                min_prob))
    seconds = time.perf_counter() - started
    write_csv(output, rows, topk, abstain=min_prob is not None)

    n_errors = sum(bool(r["error"]) for r in rows)
    n_abstained = sum(bool(r.get("abstained")) for r in rows)
    summary = {"files": len(rows), "errors": n_errors, "abstained": n_abstained, "temperature": predictor.temperature,
               "backend": predictor.backend,
               "seconds": round(seconds, 3),
               "images_per_s": round(len(rows) / seconds, 1), "workers": workers, "threads": threads,
               "output": str(output), "ckpt": predictor.source}
    abstained = f", {n_abstained} abstained (min_prob={min_prob:g})" if min_prob is not None else ""
    print(f"tl.predict: {len(rows)} files, {n_errors} errors{abstained}, {summary['images_per_s']} images/s "
          f"({seconds:.2f}s, {predictor.backend}, {workers} decoding workers, {threads} model threads) -> {output}")
    for row in [r for r in rows if r["error"]][:5]:
        print(f"  error: {row['path']}: {row['error']}")
    if rows and n_errors == len(rows):
        raise TLError(f"no input could be read ({n_errors} of {n_errors}; the errors are in {output}): check the "
                      "inputs")
    return rows, summary


@hydra.main(version_base="1.3", config_path="../conf", config_name="predict")
@user_errors
def _hydra_main(cfg: DictConfig) -> None:
    terminate_as_exception()
    predict(cfg)


def main() -> None:
    launch(_hydra_main, "predict")


if __name__ == "__main__":
    main()
