"""The 2x2 study: every scenario preset, `auto`, and training from scratch, at a small and a large data size, over
several seeds — one Hydra multirun per data size and baseline — then a table and a plot.

    python scripts/study.py --out logs/study/digits --sizes 10 full --seeds 0 1 2
    python scripts/study.py --out logs/study/digits --collect-only          # rebuild the report from the runs
    python scripts/study.py --out logs/study/flowers --sizes 10 full -- data=imagefolder data.root=DIR

Overrides after `--` go to every run. Writes OUT/study.csv (one row per run), OUT/study.md (mean +- std of test
accuracy per policy and size, with the preset auto chose) and OUT/study.png.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import yaml

PRESETS = ["small_similar", "small_different", "large_similar", "large_different"]
# From scratch everything trains at one LR; it gets the schedule of the preset for its data size, so it is not
# starved of optimizer steps at small sizes (batch 16 x 30 epochs there, as small_different).
SCRATCH = {
    "small": ["scenario=small_different", "finetune.strategy=full", "finetune.backbone_lr_mult=1.0",
              "model.pretrained=none"],
    "full": ["scenario=large_different", "model.pretrained=none"],
}


def run_sweeps(out: Path, sizes: list[str], seeds: list[int], extra: list[str], which: list[str]) -> None:
    seed_list = ",".join(map(str, seeds))
    for size in sizes:
        per_class = "null" if size == "full" else size
        common = [f"data.samples_per_class={per_class}", f"seed={seed_list}", *extra]
        sweeps = {
            "transfer": [f"scenario={','.join(PRESETS + ['auto'])}"],
            "scratch": SCRATCH["full" if size == "full" else "small"],
        }
        for name, overrides in sweeps.items():
            if name not in which:
                continue
            sweep_dir = out / f"{size}-{name}"
            cmd = [sys.executable, "-m", "tl.train", "-m", *overrides, *common, f"hydra.sweep.dir={sweep_dir}",
                   "callbacks.progress=null", "trainer.enable_progress_bar=false"]
            print("+", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)


def collect(out: Path) -> list[dict]:
    rows = []
    for results_file in sorted(out.glob("*/*/results.json")):
        run = results_file.parent
        size = run.parent.name.split("-", 1)[0]
        overrides = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
        asked = dict(o.split("=", 1) for o in overrides if "=" in o)
        r = json.loads(results_file.read_text())
        policy = "scratch" if asked.get("model.pretrained") == "none" else asked.get("scenario", r["scenario"])
        rows.append({"size": size, "policy": policy, "resolved": r["scenario"], "seed": r["seed"],
                     "n_train": r["n_train"], "test_acc": r["test/acc"], "val_acc": r["val/acc"],
                     "fit_seconds": r["fit_seconds"], "epochs": r["epochs"], "run": str(run)})
    return rows


def report(out: Path, rows: list[dict]) -> str:
    with open(out / "study.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    sizes = sorted({r["size"] for r in rows}, key=lambda s: (s == "full", int(s) if s.isdigit() else 0))
    policies = [p for p in [*PRESETS, "auto", "scratch"] if any(r["policy"] == p for r in rows)]
    acc = defaultdict(list)
    chosen = defaultdict(set)
    for r in rows:
        acc[r["policy"], r["size"]].append(r["test_acc"])
        if r["policy"] == "auto":
            chosen[r["size"]].add(r["resolved"])
    n_train = {s: sorted({r["n_train"] for r in rows if r["size"] == s}) for s in sizes}
    head = [f"{s}/class (n_train {n_train[s][0]})" if s != "full" else f"full (n_train {n_train[s][0]})"
            for s in sizes]
    lines = ["| policy | " + " | ".join(head) + " |", "|---|" + "---|" * len(sizes)]
    for p in policies:
        cells = []
        for s in sizes:
            v = acc.get((p, s), [])
            cell = f"{np.mean(v):.4f} ± {np.std(v):.4f} (n={len(v)})" if v else "–"
            if p == "auto" and chosen[s]:
                cell += f" → {', '.join(sorted(chosen[s]))}"
            cells.append(cell)
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    (out / "study.md").write_text("Test accuracy, mean ± std over seeds.\n\n" + table + "\n")
    plot(out, sizes, policies, acc)
    return table


def plot(out: Path, sizes: list[str], policies: list[str], acc: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(policies)
    for i, p in enumerate(policies):
        means = [np.mean(acc.get((p, s), [np.nan])) for s in sizes]
        stds = [np.std(acc.get((p, s), [np.nan])) for s in sizes]
        ax.bar(np.arange(len(sizes)) + i * width, means, width, yerr=stds, label=p, capsize=3)
    ax.set_xticks(np.arange(len(sizes)) + width * (len(policies) - 1) / 2)
    ax.set_xticklabels([f"{s} per class" if s != "full" else "full train split" for s in sizes])
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, ncols=len(policies), loc="upper center", bbox_to_anchor=(0.5, -0.1), frameon=False)
    ax.set_title("Transfer policies vs training from scratch")
    fig.tight_layout()
    fig.savefig(out / "study.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("logs/study/digits"))
    parser.add_argument("--sizes", nargs="+", default=["10", "full"], help="examples per class, or 'full'")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--sweeps", nargs="+", default=["transfer", "scratch"], choices=["transfer", "scratch"])
    parser.add_argument("--collect-only", action="store_true", help="only rebuild the report from OUT")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run (after --)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.collect_only:
        run_sweeps(args.out, args.sizes, args.seeds, args.overrides, args.sweeps)
    rows = collect(args.out)
    if not rows:
        sys.exit(f"no results.json under {args.out}/*/*/")
    print(report(args.out, rows))
    print(f"wrote {args.out / 'study.md'}, {args.out / 'study.csv'}, {args.out / 'study.png'}")


if __name__ == "__main__":
    main()
