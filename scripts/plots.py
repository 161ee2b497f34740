"""Turn run directories into PNG figures, for people who would rather look than read TensorBoard.

    python scripts/plots.py logs/train/runs/2024-05-01_12-00-00            # -> <run>/plots/
    python scripts/plots.py logs/train/multiruns/2024-05-01_12-00-00/* --out plots/compare

Writes `curves.png` (loss and accuracy for train and val, learning rates, weight-update ratios; several runs are
overlaid, one colour per run) and `confusion_<run>.png` (the last validation confusion matrix the Diagnostics
callback drew). Everything is read from the runs' TensorBoard event files.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

CONFUSION_TAG = "diag/val_confusion_matrix"
UPDATE_PREFIX = "diag/update_ratio/"


class Run:
    """One run's scalars (tag -> (steps, values)), its last confusion-matrix PNG, and its results.json."""

    def __init__(self, run_dir: Path, name: str):
        self.dir, self.name = run_dir, name
        self.scalars: dict[str, tuple[list[int], list[float]]] = {}
        self.confusion_png: bytes | None = None
        event_dirs = sorted({p.parent for p in run_dir.rglob("events.out.tfevents.*")})
        for d in event_dirs:
            # Keep every scalar and only the latest image (the reservoir always keeps the last one).
            acc = EventAccumulator(str(d), size_guidance={"scalars": 0, "images": 1, "histograms": 1,
                                                          "compressedHistograms": 1, "tensors": 1})
            acc.Reload()
            for tag in acc.Tags()["scalars"]:
                events = acc.Scalars(tag)
                steps, values = self.scalars.setdefault(tag, ([], []))
                steps += [e.step for e in events]
                values += [e.value for e in events]
            if CONFUSION_TAG in acc.Tags()["images"]:
                self.confusion_png = acc.Images(CONFUSION_TAG)[-1].encoded_image_string
        results = run_dir / "results.json"
        self.results = json.loads(results.read_text()) if results.is_file() else {}
        if not event_dirs:
            print(f"plots: no TensorBoard event files under {run_dir}", file=sys.stderr)

    def label(self) -> str:
        test = self.results.get("test/acc")
        return f"{self.name} (test acc {test:.3f})" if isinstance(test, float) else self.name

    def get(self, tag: str) -> tuple[list[int], list[float]] | None:
        return self.scalars.get(tag)


def run_names(dirs: list[Path]) -> list[str]:
    """Short unique names: the directory name, or more of the path where names clash (multirun 0, 1, ...)."""
    for depth in range(1, 6):
        names = ["_".join(d.resolve().parts[-depth:]) for d in dirs]
        if len(set(names)) == len(names):
            return [re.sub(r"[^\w.=-]+", "_", n) for n in names]
    return [f"run{i}" for i in range(len(dirs))]


def _plot(ax, series, **kwargs) -> None:
    if series is not None and series[0]:
        ax.plot(*series, **kwargs)


def _distinct(run: Run, tags: list[str]) -> dict[tuple, list[str]]:
    """Series that are identical (e.g. a group and its no-decay twin share an LR) drawn once, labelled together."""
    groups: dict[tuple, list[str]] = {}
    for tag in tags:
        steps, values = run.scalars[tag]
        groups.setdefault((tuple(steps), tuple(values)), []).append(tag)
    return groups


def _geometric_mean_ratio(run: Run) -> tuple[list[int], list[float]] | None:
    """One update-ratio curve per run when several are compared: the geometric mean over the trainable stages."""
    by_step: dict[int, list[float]] = defaultdict(list)
    for tag, (steps, values) in run.scalars.items():
        if tag.startswith(UPDATE_PREFIX):
            for s, v in zip(steps, values, strict=True):
                if v > 0 and math.isfinite(v):
                    by_step[s].append(math.log10(v))
    if not by_step:
        return None
    steps = sorted(by_step)
    return steps, [10 ** (sum(by_step[s]) / len(by_step[s])) for s in steps]


def plot_curves(runs: list[Run], path: Path) -> None:
    """Loss, accuracy, learning rates and update ratios, one panel each."""
    fig, axes = plt.subplots(2, 2, figsize=(13, 9), constrained_layout=True)
    (ax_loss, ax_acc), (ax_lr, ax_ratio) = axes
    single = len(runs) == 1
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(runs):
        c = None if single else colours[i % len(colours)]
        who = "" if single else f"{run.name} "
        _plot(ax_loss, run.get("train/loss_step"), color=c or "tab:blue", alpha=0.25, lw=0.8,
              label=f"{who}train (step)")
        _plot(ax_loss, run.get("train/loss_epoch"), color=c or "tab:blue", lw=2, label=f"{who}train (epoch)")
        _plot(ax_loss, run.get("val/loss"), color=c or "tab:orange", lw=2, ls="--", marker="o", ms=3,
              label=f"{who}val")
        _plot(ax_acc, run.get("train/acc"), color=c or "tab:blue", lw=2, label=f"{who}train")
        _plot(ax_acc, run.get("val/acc"), color=c or "tab:orange", lw=2, ls="--", marker="o", ms=3,
              label=f"{run.label()} val" if not single else "val")
        test = run.get("test/acc")
        if test is not None:
            ax_acc.scatter(test[0][-1:], test[1][-1:], color=c or "tab:green", marker="*", s=120, zorder=3,
                           label=f"{who}test")
        lr_tags = sorted(t for t in run.scalars if t.startswith("lr-"))
        if single:
            for series, tags in _distinct(run, lr_tags).items():
                _plot(ax_lr, series, lw=1.5, label=" = ".join(t.removeprefix("lr-") for t in tags))
        else:
            for tag in [t for t in lr_tags if t.endswith("/head")][:1] or lr_tags[:1]:
                _plot(ax_lr, run.get(tag), color=c, lw=1.5, label=f"{who}{tag}")
        if single:
            for tag in sorted(t for t in run.scalars if t.startswith(UPDATE_PREFIX)):
                _plot(ax_ratio, run.get(tag), lw=1.5, marker=".", label=tag.removeprefix(UPDATE_PREFIX))
        else:
            _plot(ax_ratio, _geometric_mean_ratio(run), color=c, lw=1.5, marker=".",
                  label=f"{who}(geometric mean of stages)")
    ax_ratio.axhline(1e-3, color="grey", ls=":", lw=1.5, label="rule of thumb ~1e-3")
    titles = {ax_loss: ("loss", "cross-entropy"), ax_acc: ("accuracy", "accuracy"),
              ax_lr: ("learning rate per param group", "learning rate"),
              ax_ratio: ("update / weight ratio per stage", "||dw|| / ||w||")}
    for ax, (title, ylabel) in titles.items():
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
    for ax in (ax_lr, ax_ratio):
        if any(line.get_ydata().size and min(line.get_ydata()) > 0 for line in ax.get_lines()):
            ax.set_yscale("log")
    if not any(t.startswith(UPDATE_PREFIX) for r in runs for t in r.scalars):
        ax_ratio.text(0.5, 0.5, "no update ratios logged\n(callbacks=diagnostics)", ha="center", va="center",
                      transform=ax_ratio.transAxes, color="grey")
    ax_acc.set_ylim(-0.02, 1.02)
    fig.suptitle(runs[0].label() if single else f"{len(runs)} runs")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ours(png: Path) -> bool:
    """A figure this script wrote: matplotlib's PNGs say so in their metadata."""
    try:
        from PIL import Image

        with Image.open(png) as im:
            return str(im.info.get("Software", "")).startswith("Matplotlib")
    except Exception:  # noqa: BLE001 - not an image at all: not ours
        return False


def main(argv: list[str] | None = None) -> list[Path]:
    """Write the figures; return their paths."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (hydra.run.dir of python -m tl.train)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: RUN/plots for one run, ./plots for several)")
    args = parser.parse_args(argv)
    dirs = [d for d in args.runs if d.is_dir()]
    for d in set(args.runs) - set(dirs):
        print(f"plots: skipping {d}: not a directory", file=sys.stderr)
    if not dirs:
        parser.error("no run directory found")
    runs = [Run(d, n) for d, n in zip(dirs, run_names(dirs), strict=True)]
    runs = [r for r in runs if r.scalars]
    if not runs:
        parser.error("none of the runs has TensorBoard scalars (was logger=tensorboard on?)")
    out = args.out or (runs[0].dir / "plots" if len(runs) == 1 else Path("plots"))
    if out.exists() and not out.is_dir():
        parser.error(f"--out {str(out)!r} exists and is not a folder: give a folder")
    if (out / "curves.png").exists() and not _ours(out / "curves.png"):
        parser.error(f"{str(out / 'curves.png')!r} exists and was not drawn by plots.py: it would be replaced; give "
                     "--out another folder")
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "curves.png"]
    plot_curves(runs, written[0])
    for run in runs:
        if run.confusion_png:
            written.append(out / f"confusion_{run.name}.png")
            written[-1].write_bytes(run.confusion_png)
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main()
