"""The report's figures saved to PNG and TensorBoard: before (savefig, then add_figure rendering each figure again)
vs tl.report.save_figure (savefig once; TensorBoard gets the written PNG). Each repeat saves three 16-image grids and
the reliability plot, the two ways alternated; prints seconds per repeat and the ratio of the medians.

    python scripts/bench_report_figures.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tl.report import reliability_figure, save_figure  # noqa: E402


def grid_of_16():
    """A top-losses-like grid: 16 images of 64 px with two-line titles."""
    fig, axes = plt.subplots(2, 8, figsize=(16, 5))
    rng = np.random.default_rng(0)
    for ax in axes.flat:
        ax.imshow(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
        ax.set_title("a -> b\np=0.90", fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    return fig


def save_before(fig, path: Path, writers: list, tag: str, step: int) -> None:
    """tl.report.save_figure before this change."""
    try:
        fig.savefig(path, format="png", dpi=110)
        for writer in writers:
            writer.add_figure(tag, fig, step, close=False)
    finally:
        plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp())
    writer = SummaryWriter(str(out / "tb"))
    probs = torch.softmax(torch.randn(300, 10), 1)
    targets = torch.randint(0, 10, (300,))
    seconds = {"before": [], "now": []}
    for rep in range(args.repeats):
        for name, save in (("before", save_before), ("now", save_figure)):
            started = time.perf_counter()
            for k in range(3):
                save(grid_of_16(), out / f"grid{k}.png", [writer], f"grid{k}", rep)
            save(reliability_figure(probs, probs, targets, 1.0), out / "reliability.png", [writer], "reliability", rep)
            seconds[name].append(time.perf_counter() - started)
    writer.close()
    print({k: [round(s, 2) for s in v] for k, v in seconds.items()},
          f"median before/now: {np.median(seconds['before']) / np.median(seconds['now']):.2f}x")


if __name__ == "__main__":
    main()
