"""After test, with the tested weights: calibration, per-class metrics, and the errors worth a look.

`report_run` (called by `tl.train` on the main process, over whole splits, after `trainer.test` has loaded the best
checkpoint):

1. logits of val and test (and of train under the evaluation transform, for possible label errors), from images or
   from cached features, in one process;
2. a temperature T fitted on the validation split only (`fit_temperature`: the NLL of softmax(logits / T), convex in
   1/T, minimised on [0.05, 20]); kept in the module (`module.calibration`, hence in the export) and written into the
   best checkpoint, so `tl.predict` and `tl.evaluate` use it; argmax, hence accuracy, is unchanged by T;
3. test metrics: balanced accuracy, macro-F1, per-class precision/recall/F1/support (`test/per_class`), NLL and the
   expected calibration error (15 bins) before and after calibration (`test/ece_uncalibrated`, `test/ece`);
4. RUN/report/: reliability.png (a reliability diagram before/after), top_losses.csv (the `top_losses` most
   confidently wrong val and test images, and the training images least likely under their given label), and one
   image grid per list; the figures and scalars also go to TensorBoard (`report/...`, `test/...`).
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_calibration_error,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)

from tl.data.datamodule import collate_readable
from tl.utils import atomic_path

log = logging.getLogger(__name__)

TEMPERATURE_BOUNDS = (0.05, 20.0)
ECE_BINS = 15


# -- calibration ------------------------------------------------------------------------------------------------
def fit_temperature(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, Any]:
    """The temperature T for softmax(logits / T) fitted on (logits, targets), with the NLL before and after.

    With at least one error: T minimises the NLL (convex in 1/T, so a bounded scalar search finds the optimum on
    the interval). Without a single error the NLL keeps falling towards certainty and says nothing about how
    confident the model should be; then T makes the mean top-1 probability equal (n + 1) / (n + 2), Laplace's
    estimate of the accuracy after n correct out of n (`method`: nll | confidence_match).
    """
    from scipy.optimize import brentq, minimize_scalar

    z, y = logits.double(), targets.long()

    def nll(beta: float) -> float:
        return float(F.cross_entropy(z * beta, y))

    low, high = TEMPERATURE_BOUNDS
    betas = (1 / high, 1 / low)
    errors = int((z.argmax(dim=1) != y).sum())
    if errors:
        found = minimize_scalar(nll, bounds=betas, method="bounded", options={"xatol": 1e-5})
        # never worse than no calibration, and not moved for a gain below 0.1% of the NLL (an untrained model's
        # near-uniform outputs let T run to a bound for nothing)
        beta = float(found.x) if nll(float(found.x)) < nll(1.0) * (1 - 1e-3) else 1.0
        method = "nll"
    else:
        target = (len(y) + 1) / (len(y) + 2)

        def gap(b: float) -> float:  # mean confidence grows with the inverse temperature
            return float((z * b).softmax(dim=-1).max(dim=-1).values.mean()) - target

        beta = betas[0] if gap(betas[0]) > 0 else betas[1] if gap(betas[1]) < 0 else brentq(gap, *betas, xtol=1e-6)
        method = "confidence_match"
    at_bound = bool(np.isclose(beta, betas[0]) or np.isclose(beta, betas[1]))
    if at_bound:
        log.warning("calibration: the temperature %.3g is at the end of its range %s (method %s): the validation "
                    "split says little about confidence; read test/ece with care", 1 / beta, TEMPERATURE_BOUNDS, method)
    return {"temperature": 1.0 / beta, "val_nll_before": nll(1.0), "val_nll_after": nll(beta), "n_val": len(y),
            "val_errors": errors, "method": method, "at_bound": at_bound}


def expected_calibration_error(probs: torch.Tensor, targets: torch.Tensor) -> float:
    return float(multiclass_calibration_error(probs, targets, probs.shape[1], n_bins=ECE_BINS))


def per_class_metrics(probs: torch.Tensor, targets: torch.Tensor, class_names: list[str]) -> list[dict[str, Any]]:
    """Precision, recall, F1 (torchmetrics, 0 where undefined) and support per class."""
    c = len(class_names)
    columns = {"precision": multiclass_precision(probs, targets, c, average=None).tolist(),
               "recall": multiclass_recall(probs, targets, c, average=None).tolist(),
               "f1": multiclass_f1_score(probs, targets, c, average=None).tolist(),
               "support": torch.bincount(targets, minlength=c).tolist()}
    return [{"class": name, **{k: v[i] for k, v in columns.items()}} for i, name in enumerate(class_names)]


def test_metrics(logits: torch.Tensor, targets: torch.Tensor, class_names: list[str],
                 temperature: float = 1.0) -> dict[str, Any]:
    """Test metrics of (logits, targets): calibrated (softmax(logits / T)) where calibration matters, the rest
    unchanged by T."""
    c = len(class_names)
    raw, probs = logits.float().softmax(dim=-1), (logits.float() / temperature).softmax(dim=-1)
    return {
        "test/balanced_acc": float(multiclass_accuracy(probs, targets, c, average="macro")),
        "test/macro_f1": float(multiclass_f1_score(probs, targets, c, average="macro")),
        "test/ece": expected_calibration_error(probs, targets),
        "test/ece_uncalibrated": expected_calibration_error(raw, targets),
        "test/nll": float(F.cross_entropy(logits.float() / temperature, targets)),
        "test/nll_uncalibrated": float(F.cross_entropy(logits.float(), targets)),
        "test/per_class": per_class_metrics(probs, targets, class_names),
    }


# -- logits over whole splits -------------------------------------------------------------------------------------
class _Indexed(Dataset):
    """(x, y, position) for each readable example: positions survive the examples dropped as unreadable."""

    def __init__(self, ds: Dataset):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        item = self.ds[i]
        return None if item is None else (*item, i)


@torch.inference_mode()
def split_logits(module, datamodule, fit_data, split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, targets, positions in the split) of the module in eval mode on a whole split, in this process:
    from cached features when the run trained on them, else from the images under the evaluation transform."""
    was_training = module.training
    module.eval()
    device = next(module.parameters()).device
    try:
        features = getattr(fit_data, "features", None)
        if features is not None:
            feats, targets = features[split]
            logits = torch.cat([module.classify_features(chunk.to(device)).float().cpu()
                                for chunk in feats.split(4096)]) if len(feats) else torch.empty(0)
            return logits, targets.long(), torch.arange(len(targets))
        conv = next((p for p in module.model.parameters() if p.ndim == 4), None)
        layout = (torch.channels_last if conv is not None and conv.is_contiguous(memory_format=torch.channels_last)
                  else torch.contiguous_format)  # the weights' own layout: a mixed pair is slow on the CPU
        ds = _Indexed(datamodule.dataset(split, augmented=False))
        loader = DataLoader(ds, batch_size=datamodule.eval_batch_size, num_workers=datamodule._workers(),
                            collate_fn=collate_readable)
        logits, targets, positions = [], [], []
        for batch in loader:
            if batch is None:
                continue
            x, y, pos = batch
            x = x.to(device).contiguous(memory_format=layout)
            logits.append(module.model(x).float().cpu())
            targets.append(y)
            positions.append(pos)
        if not logits:
            return torch.empty(0, datamodule.num_classes), torch.empty(0, dtype=torch.long), torch.empty(0)
        return torch.cat(logits), torch.cat(targets).long(), torch.cat(positions)
    finally:
        module.train(was_training)


# -- the errors worth a look ------------------------------------------------------------------------------------
def item_name(datamodule, split: str, position: int) -> str:
    """A file path, or `<Source>[i]` for in-memory data."""
    j = int(datamodule.split_indices[split][position])
    if datamodule.images.store is not None:
        return f"{datamodule.images.store.root}#{j}:{datamodule.images.store.name(j)}"
    paths = datamodule.images.paths
    return str(paths[j]) if paths is not None else f"{type(datamodule.source).__name__}[{j}]"


def rank_errors(probs: torch.Tensor, targets: torch.Tensor, k: int, kind: str) -> list[int]:
    """Row indices: `wrong`: the k wrong predictions with the highest predicted probability; `unlikely`: the k
    examples with the lowest probability of their given label."""
    if k <= 0 or len(targets) == 0:
        return []
    p_given = probs[torch.arange(len(targets)), targets]
    if kind == "wrong":
        confidence, predicted = probs.max(dim=1)
        wrong = (predicted != targets).nonzero().flatten()
        order = wrong[confidence[wrong].argsort(descending=True)]
    else:
        order = p_given.argsort()
    return order[:k].tolist()


def error_rows(datamodule, split: str, kind: str, probs, targets, positions, rows: list[int]) -> list[dict]:
    names = datamodule.classes
    out = []
    for r in rows:
        predicted = int(probs[r].argmax())
        p_given = float(probs[r, targets[r]])
        out.append({"split": split, "kind": kind, "path": item_name(datamodule, split, int(positions[r])),
                    "given": names[int(targets[r])], "predicted": names[predicted],
                    "prob_predicted": round(float(probs[r, predicted]), 6), "prob_given": round(p_given, 6),
                    "loss": round(-math.log(max(p_given, 1e-12)), 6), "position": int(positions[r])})
    return out


def grid_figure(datamodule, rows: list[dict], title: str):
    """The listed images (as loaded, before any transform) with given -> predicted labels and probabilities."""
    from tl.utils import pyplot

    plt = pyplot()

    n = len(rows)
    cols = min(8, n)
    lines = math.ceil(n / cols)
    fig, axes = plt.subplots(lines, cols, figsize=(2.0 * cols, 2.3 * lines + 0.4), squeeze=False)
    datasets = {}
    for ax, row in zip(axes.flat, rows, strict=False):
        ds = datasets.setdefault(row["split"], datamodule.dataset(row["split"], augmented=False))
        try:
            ax.imshow(np.asarray(ds.load_image(row["position"])))
        except Exception:  # noqa: BLE001 - a file broken since: the title still says which
            ax.text(0.5, 0.5, "unreadable", ha="center", va="center")
        ax.set_title(f"{row['given']} -> {row['predicted']}\np={row['prob_predicted']:.2f}", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def reliability_figure(before: torch.Tensor, after: torch.Tensor, targets: torch.Tensor, temperature: float):
    """Accuracy against confidence in 15 equal bins, before and after calibration (the diagonal is calibrated)."""
    from tl.utils import pyplot

    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2), sharey=True)
    edges = np.linspace(0, 1, ECE_BINS + 1)
    for ax, probs, name in ((axes[0], before, "uncalibrated"), (axes[1], after, f"temperature {temperature:.3f}")):
        confidence, predicted = probs.max(dim=1)
        correct = (predicted == targets).double().numpy()
        confidence = confidence.double().numpy()
        which = np.clip(np.digitize(confidence, edges[1:-1]), 0, ECE_BINS - 1)
        acc = [correct[which == b].mean() if (which == b).any() else np.nan for b in range(ECE_BINS)]
        count = np.bincount(which, minlength=ECE_BINS)
        centres = (edges[:-1] + edges[1:]) / 2
        ax.bar(centres, np.nan_to_num(acc), width=1 / ECE_BINS, edgecolor="black", alpha=0.7, label="accuracy")
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="calibrated")
        for x, n in zip(centres, count, strict=True):
            if n:
                ax.text(x, 0.02, str(n), ha="center", fontsize=6, rotation=90)
        ece = expected_calibration_error(probs, targets)
        ax.set_title(f"test, {name}: ECE {ece:.4f}")
        ax.set_xlabel("confidence (top-1 probability)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("accuracy (bar labels: images per bin)")
    axes[0].legend(loc="upper left")
    fig.tight_layout()
    return fig


def write_rows(path: Path, rows: list[dict]) -> None:
    columns = ["split", "kind", "path", "given", "predicted", "prob_predicted", "prob_given", "loss"]
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def save_figure(fig, path: Path, writers: list, tag: str, step: int) -> None:
    from tl.utils import pyplot

    plt = pyplot()

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
        if writers:  # TensorBoard gets the PNG just written: the figure is rendered once, not once per sink
            from PIL import Image

            with Image.open(path) as png:
                pixels = np.asarray(png.convert("RGB"))
            for writer in writers:
                writer.add_image(tag, pixels, step, dataformats="HWC")
    finally:
        plt.close(fig)


# -- the whole report -------------------------------------------------------------------------------------------
def report_run(module, datamodule, fit_data, run_dir: Path, loggers: list, step: int, calibrate: bool = True,
               top_losses: int = 16, best_ckpt: str | None = None) -> dict[str, Any]:
    """Calibrate the tested module on val, score it on test, list its worst errors; return results.json keys."""
    import time

    from pytorch_lightning.loggers import TensorBoardLogger

    started = time.perf_counter()
    names = datamodule.classes
    val_logits, val_y, val_pos = split_logits(module, datamodule, fit_data, "val")
    test_logits, test_y, test_pos = split_logits(module, datamodule, fit_data, "test")
    out: dict[str, Any] = {}
    if len(val_y):
        out["val/acc"] = float((val_logits.argmax(dim=1) == val_y).double().mean())  # the tested weights'
    temperature = 1.0
    if calibrate and len(val_y):
        fitted = fit_temperature(val_logits, val_y)
        temperature = fitted["temperature"]
        module.calibration = {**fitted, "fitted_on": "val"}
        out.update({f"calibration/{k}": v for k, v in fitted.items()})
        if best_ckpt:
            _keep_going(out, write_calibration, Path(best_ckpt), module.calibration)
    if not len(test_y):
        return out
    out.update(test_metrics(test_logits, test_y, names, temperature))

    writers = [lg.experiment for lg in loggers if isinstance(lg, TensorBoardLogger)]
    logged = {"test/balanced_acc", "test/macro_f1", "test/ece_uncalibrated"}  # by trainer.test already
    scalars = {k: v for k, v in out.items() if isinstance(v, float) and k.startswith(("test/", "calibration/"))
               and k not in logged}
    scalars.update({f"test/recall/{r['class']}": r["recall"] for r in out["test/per_class"]})
    for lg in loggers:
        lg.log_metrics(scalars, step=step)
    folder = Path(run_dir) / "report"
    _keep_going(out, folder.mkdir, parents=True, exist_ok=True)
    probs_before, probs_after = test_logits.softmax(dim=-1), (test_logits / temperature).softmax(dim=-1)
    _keep_going(out, save_figure, reliability_figure(probs_before, probs_after, test_y, temperature),
                folder / "reliability.png", writers, "report/reliability", step)
    files = [str(folder / "reliability.png")]
    if top_losses:
        lists = []
        for split, logits, y, pos in (("val", val_logits, val_y, val_pos), ("test", test_logits, test_y, test_pos)):
            probs = (logits / temperature).softmax(dim=-1)
            lists.append((split, "confidently_wrong",
                          error_rows(datamodule, split, "confidently_wrong", probs, y, pos,
                                     rank_errors(probs, y, top_losses, "wrong"))))
        train_logits, train_y, train_pos = split_logits(module, datamodule, fit_data, "train")
        probs = (train_logits / temperature).softmax(dim=-1)
        lists.append(("train", "least_likely_label",
                      error_rows(datamodule, "train", "least_likely_label", probs, train_y, train_pos,
                                 rank_errors(probs, train_y, top_losses, "unlikely"))))
        all_rows = [row for _, _, rows in lists for row in rows]
        _keep_going(out, write_rows, folder / "top_losses.csv", all_rows)
        files.append(str(folder / "top_losses.csv"))
        for split, kind, rows in lists:
            if not rows:
                continue
            title = (f"{split}: most confidently wrong" if kind == "confidently_wrong"
                     else "train: least likely under the given label (possible label errors)")
            path = folder / f"top_losses_{split}.png"
            _keep_going(out, save_figure, grid_figure(datamodule, rows, title), path, writers,
                        f"report/top_losses/{split}", step)
            files.append(str(path))
        out["top_losses"] = {"csv": str(folder / "top_losses.csv") if (folder / "top_losses.csv").is_file() else None,
                             **{f"{split}_{kind}": len(rows) for split, kind, rows in lists}}
    out["report_files"] = [f for f in files if Path(f).is_file()]
    out["report_seconds"] = round(time.perf_counter() - started, 2)
    return out


def _keep_going(out: dict, write, *args, **kwargs) -> None:
    """Write a report file; a failure (full disk, permissions) is recorded in `report_errors` and logged, never fatal:
    the run's results.json must still be written."""
    from tl.errors import TLError

    try:
        write(*args, **kwargs)
    except (OSError, TLError) as e:
        log.warning("report: %s", e)
        out.setdefault("report_errors", []).append(str(e))


def write_calibration(path: Path, calibration: dict) -> None:
    """Store the calibration in a checkpoint (key "calibration"), atomically: read by `TransferModule`. Files hard
    linked to it (last.ckpt, when the best was the last epoch: `LastCheckpoint`) are linked to the new file, so they
    stay one file."""
    import os

    from tl.errors import TLError

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a checkpoint damaged since it was tested
        raise TLError(f"could not add the calibration to {str(path)!r} ({type(e).__name__}); the export and "
                      "results.json carry it") from e
    linked = [p for p in path.parent.glob("*.ckpt") if p != path and os.path.samefile(p, path)]
    ckpt["calibration"] = dict(calibration)
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)
    for other in linked:
        tmp = other.with_name(f".{other.name}.{os.getpid()}.link")
        try:
            os.link(path, tmp)
            os.replace(tmp, other)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise TLError(f"could not link {str(other)!r} to the calibrated {str(path)!r} ({e.strerror or e}); "
                          f"{other.name} keeps the same weights without the temperature") from e
