"""Linear probe with and without the frozen-feature cache: same data, epochs and seed, timed in one process.

    python scripts/bench_cache.py                       # digits, EfficientNet-Lite0, 20 epochs
    python scripts/bench_cache.py --breakdown --out logs/bench/cache.json
    python scripts/bench_cache.py --repeats 3                     # a machine shared with other jobs
    python scripts/bench_cache.py --epochs 20 --out bench_cache.json -- data.samples_per_class=50

Both runs are `python -m tl.train scenario=small_similar augment=none` (a linear probe) with every default callback
(checkpoints, LR monitor, diagnostics...) and logger, only the progress bar and the export off; they differ in
`cache_features` alone. The cached run starts from an empty cache, so computing the features is part of its time.

Prints a table and writes JSON: fit seconds (what results.json reports: feature extraction of train and val
included for the cached run; the test split's features are computed when the test runs, after fitting), whole-run
seconds (data, model, fit, test), test accuracy, the speed-up and the accuracy difference. The two runs see the same
batches and dropout draws, so their accuracies should agree to floating-point noise. The target: >= 10x faster at 20
epochs, test accuracy within 0.5 points.

`--repeats N` runs N (uncached, cached) pairs and reports medians, the speed-up as the median of the pairs' ratios:
on a machine shared with other jobs the runs' times drift by tens of per cent (there, OMP_NUM_THREADS=1 also avoids
threads waiting for each other); on an idle machine one pair is enough.

`--breakdown` runs both under Lightning's SimpleProfiler (a few per cent slower) and splits fit time into parts:
feature extraction, training steps, batch fetching, validation steps, checkpoint writes, the diagnostics callbacks,
other callbacks' hooks, the module's epoch hooks, and the rest (Lightning's loops, set-up, logging at epoch ends).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

from benchlib import compose_run, machine, write_report

import tl.data.features as features
from tl.train import train

# Batch-level hooks run inside run_training_batch: counted there, not again as callback time.
IN_BATCH_HOOKS = ("on_before_backward", "on_after_backward", "on_before_optimizer_step", "on_before_zero_grad")


class ExtractionTimer:
    """Wall time of feature extraction (cache misses and hits) per split, by wrapping FeatureCache.load_or_extract."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._original = features.FeatureCache.load_or_extract

    def __enter__(self):
        original, seconds = self._original, self.seconds

        def timed(cache, model, head_names, datamodule, split):
            start = time.perf_counter()
            try:
                return original(cache, model, head_names, datamodule, split)
            finally:
                seconds[split] = seconds.get(split, 0.0) + time.perf_counter() - start

        features.FeatureCache.load_or_extract = timed
        return self

    def __exit__(self, *exc):
        features.FeatureCache.load_or_extract = self._original


def run(overrides: list[str], out: Path) -> tuple[dict, dict]:
    cfg = compose_run(overrides, out, cache_dir=out / "cache")  # a cold cache: extraction is part of the run's time
    with ExtractionTimer() as extraction:
        started = time.perf_counter()
        results, objects = train(cfg)
        results["run_seconds"] = round(time.perf_counter() - started, 2)
    profiler = objects["trainer"].profiler
    durations = dict(getattr(profiler, "recorded_durations", {}) or {})
    return results, {"extraction": extraction.seconds, "durations": durations}


def breakdown(fit_seconds: float, extraction: dict[str, float], durations: dict[str, list[float]]) -> dict[str, float]:
    """Non-overlapping parts of fit time from SimpleProfiler actions (test-stage actions left out)."""
    def total(match) -> float:
        return math.fsum(math.fsum(d) for name, d in durations.items() if "test" not in name and match(name))

    def hook(name: str) -> str:
        return name.rsplit(".", 1)[-1]

    def diagnostic(name: str) -> bool:  # the TensorBoard diagnostics, one callback per concern
        return name.startswith("[Callback]") and name.removeprefix("[Callback]").split(".", 1)[0].split("{", 1)[0] in (
            "RunSummary", "UpdateRatios", "StageHistograms", "ImageSamples", "ValConfusion")

    def checkpointing(name: str) -> bool:  # ModelCheckpoint and subclasses (their names end in Checkpoint)
        return name.startswith("[Callback]") and "Checkpoint" in name.split(".", 1)[0].split("{", 1)[0]

    parts = {
        "feature extraction": sum(s for split, s in extraction.items() if split != "test"),
        "training steps": total(lambda n: n == "run_training_batch"),
        "batch fetching": total(lambda n: n in ("[_TrainingEpochLoop].train_dataloader_next",
                                                "[_EvaluationLoop].val_next")),
        "validation steps": total(lambda n: n.endswith(".validation_step") and n.startswith("[Strategy]")),
        "checkpoint writes": total(checkpointing),
        "Diagnostics callbacks": total(lambda n: diagnostic(n) and hook(n) not in IN_BATCH_HOOKS),
        "other callbacks": total(lambda n: n.startswith("[Callback]") and not checkpointing(n)
                                 and not diagnostic(n) and hook(n) not in IN_BATCH_HOOKS),
        "module epoch hooks": total(lambda n: n.startswith("[LightningModule]") and "epoch" in hook(n)),
    }
    parts["rest (loops, set-up, epoch-end logging)"] = fit_seconds - math.fsum(parts.values())
    return {k: round(v, 3) for k, v in parts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--breakdown", action="store_true", help="profile both runs and split fit time into parts")
    parser.add_argument("--repeats", type=int, default=1,
                        help="pairs of runs (uncached, then cached); medians are reported, the speed-up as the median "
                             "of the pairs' ratios (for a machine shared with other jobs)")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for both runs (after --)")
    args = parser.parse_args()
    common = ["scenario=small_similar", "augment=none", f"trainer.max_epochs={args.epochs}", "data.batch_size=64",
              "~callbacks.progress", "trainer.enable_progress_bar=false", "export=false", *args.overrides]
    if args.breakdown:
        common.append("+trainer.profiler=simple")
    load_before = os.getloadavg()
    figures: dict = {"epochs": args.epochs, "overrides": common, **machine(), "profiled": args.breakdown}
    runs: dict[str, list[dict]] = {"uncached": [], "cached": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for name, flag in (("uncached", "false"), ("cached", "true")):
                r, timing = run([*common, f"cache_features={flag}"], Path(tmp) / f"{name}{i}")
                assert r["feature_cache"] is (flag == "true")
                got = {k: r[k] for k in ("fit_seconds", "run_seconds", "test/acc", "test/loss", "val/acc", "epochs",
                                         "global_step")}
                got["extraction_seconds"] = {k: round(v, 3) for k, v in timing["extraction"].items()}
                if args.breakdown:
                    got["breakdown"] = breakdown(r["fit_seconds"], timing["extraction"], timing["durations"])
                runs[name].append(got)
                print(f"[pair {i}] {name}: fit {got['fit_seconds']:.2f} s, test acc {got['test/acc']:.4f}", flush=True)
    figures["load_average"] = {"before": [round(x, 2) for x in load_before],
                               "after": [round(x, 2) for x in os.getloadavg()]}
    for name, rs in runs.items():  # medians over the pairs (one pair: its figures)
        figures[name] = {k: statistics.median(r[k] for r in rs) if isinstance(rs[0][k], (int, float)) else rs[0][k]
                         for k in rs[0]}
        if args.breakdown:
            figures[name]["breakdown"] = {part: round(statistics.median(r["breakdown"][part] for r in rs), 3)
                                          for part in rs[0]["breakdown"]}
        figures[name]["runs"] = rs
    unc, cac = figures["uncached"], figures["cached"]
    figures["speedup"] = round(statistics.median(u["fit_seconds"] / c["fit_seconds"]
                                                 for u, c in zip(runs["uncached"], runs["cached"], strict=True)), 2)
    figures["speedup_whole_run"] = round(statistics.median(
        u["run_seconds"] / c["run_seconds"] for u, c in zip(runs["uncached"], runs["cached"], strict=True)), 2)
    figures["acc_diff_points"] = round(100 * (cac["test/acc"] - unc["test/acc"]), 2)

    print(f"\n{'run':10} {'fit s':>8} {'run s':>8} {'test acc':>9} {'test loss':>10}")
    for name in ("uncached", "cached"):
        f = figures[name]
        print(f"{name:10} {f['fit_seconds']:8.2f} {f['run_seconds']:8.2f} {f['test/acc']:9.4f} {f['test/loss']:10.5f}")
    print(f"speed-up {figures['speedup']}x (fit), {figures['speedup_whole_run']}x (whole run); "
          f"accuracy difference {figures['acc_diff_points']:+.2f} points (target: >= 10x, within 0.5 points)")
    if args.breakdown:
        print(f"\n{'fit time, s':40} {'uncached':>9} {'cached':>9}")
        for part in unc["breakdown"]:
            print(f"{part:40} {unc['breakdown'][part]:9.3f} {cac['breakdown'][part]:9.3f}")
        print(f"{'(test-split extraction, after fitting)':40} {'':>9} {cac['extraction_seconds'].get('test', 0):9.3f}")
    print(f"load average before/after: {figures['load_average']['before']} / {figures['load_average']['after']} "
          f"({figures['cpu_count']} CPUs, {figures['torch_threads']} torch threads)")
    write_report(args.out, figures)


if __name__ == "__main__":
    main()
