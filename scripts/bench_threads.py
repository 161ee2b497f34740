"""How torch's OpenMP threads wait: spinning (libgomp's default) against sleeping (`OMP_WAIT_POLICY=PASSIVE`, what tl
sets unless the environment says otherwise), on whole `tl.train` runs.

On a CPU, torch runs each operator on an OpenMP team of one thread per core. Between operators libgomp's threads spin
for a while before they sleep. That is fastest when the team has the cores to itself, and very slow when it does not:
a data-loading worker decoding images, a second job, or anything else on the same cores makes the team wait for a
spinning thread that holds the core another thread needs. tl's image-folder runs always share the cores with their
own loader workers. This script times the same runs under both policies, alternating them so that a machine's drift
hits both alike, and prints fit seconds (results.json) and wall seconds per run.

    python scripts/bench_threads.py                                 # digits (in memory) and an image folder
    python scripts/bench_threads.py --folder /tmp/tl_datasets/fonts --repeats 3 --out logs/bench/threads.json
    python scripts/bench_threads.py --busy 1                         # with one other busy process on the cores
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

POLICIES = {"spin (libgomp default)": "ACTIVE", "sleep (tl default)": "PASSIVE"}


def run(policy: str, overrides: list[str], run_dir: Path) -> dict:
    env = dict(os.environ, OMP_WAIT_POLICY=policy)
    command = [sys.executable, "-m", "tl.train", *overrides, f"hydra.run.dir={run_dir}", "callbacks.progress=null",
               "onnx.enabled=false"]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"bench_threads.py: error: {' '.join(command)} failed:\n{done.stderr[-2000:]}")
    results = json.loads((run_dir / "results.json").read_text())
    return {"wall_s": round(wall, 1), "fit_s": results.get("fit_seconds"),
            "test_acc": results.get("test/acc")}


def busy_loop() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", default="/tmp/tl_datasets/fonts", help="an image folder (train/val/test)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--busy", type=int, default=0, help="other busy processes running beside the runs")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    cases = {"digits (in memory, no workers)": [f"trainer.max_epochs={args.epochs}"]}
    if args.folder and Path(args.folder).is_dir():
        cases[f"{Path(args.folder).name} folder, 10/class (loader workers)"] = [
            "data=imagefolder", f"data.root={args.folder}", "data.samples_per_class=10",
            "scenario=small_different", f"trainer.max_epochs={args.epochs}"]
    hogs = [busy_loop() for _ in range(args.busy)]
    figures: dict = {}
    try:
        with tempfile.TemporaryDirectory(prefix="bench_threads_") as tmp:
            for case, overrides in cases.items():
                for repeat in range(args.repeats):
                    for name, policy in POLICIES.items():
                        result = run(policy, overrides, Path(tmp) / f"{len(figures)}_{repeat}_{policy}")
                        figures.setdefault(case, {}).setdefault(name, []).append(result)
                        print(f"{case} | {name} | repeat {repeat}: {result}", flush=True)
    finally:
        for hog in hogs:
            hog.kill()
    print(f"\ncores {os.cpu_count()}, {args.epochs} epochs, {args.busy} busy process(es) beside, median of "
          f"{args.repeats}:")
    print("| run | spin: fit s (wall s) | sleep: fit s (wall s) | spin / sleep (fit) |\n|---|---|---|---|")
    for case, by_policy in figures.items():
        cells = []
        for name in POLICIES:
            fit = statistics.median(r["fit_s"] for r in by_policy[name])
            wall = statistics.median(r["wall_s"] for r in by_policy[name])
            cells.append((fit, wall))
        print(f"| {case} | {cells[0][0]:.1f} ({cells[0][1]:.1f}) | {cells[1][0]:.1f} ({cells[1][1]:.1f}) | "
              f"{cells[0][0] / cells[1][0]:.2f}x |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"busy": args.busy, "epochs": args.epochs, "figures": figures}, indent=1))


if __name__ == "__main__":
    main()
