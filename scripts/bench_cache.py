"""Linear probe with and without the frozen-feature cache: same data, epochs and seed, timed in one process.

    python scripts/bench_cache.py                       # digits, EfficientNet-Lite0, 20 epochs
    python scripts/bench_cache.py --epochs 20 --out bench_cache.json -- data.samples_per_class=50

Prints a table and writes JSON: fit seconds (feature extraction included for the cached run), test accuracy, and
the speed-up. The target: >= 10x faster at 20 epochs, test accuracy within 0.5 points.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from tl.train import train

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def run(overrides: list[str], out: Path) -> dict:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"hydra.run.dir={out}"], return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            cfg.paths.output_dir = str(out)
            cfg.paths.cache_dir = str(out / "cache")  # a cold cache: extraction is part of the cached run's time
            del cfg["hydra"]
        results, _ = train(cfg)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for both runs (after --)")
    args = parser.parse_args()
    common = ["scenario=small_similar", "augment=none", f"trainer.max_epochs={args.epochs}", "data.batch_size=64",
              "callbacks.progress=null", "trainer.enable_progress_bar=false", "export=false", *args.overrides]
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, flag in (("uncached", "false"), ("cached", "true")):
            r = run([*common, f"cache_features={flag}"], Path(tmp) / name)
            assert r["feature_cache"] is (flag == "true")
            figures[name] = {"fit_seconds": r["fit_seconds"], "test/acc": r["test/acc"], "epochs": r["epochs"]}
    figures["speedup"] = round(figures["uncached"]["fit_seconds"] / figures["cached"]["fit_seconds"], 2)
    figures["acc_diff_points"] = round(100 * (figures["cached"]["test/acc"] - figures["uncached"]["test/acc"]), 2)
    print(f"{'run':10} {'fit s':>8} {'test acc':>9}")
    for name in ("uncached", "cached"):
        print(f"{name:10} {figures[name]['fit_seconds']:8.1f} {figures[name]['test/acc']:9.4f}")
    print(f"speed-up {figures['speedup']}x, accuracy difference {figures['acc_diff_points']:+.2f} points")
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
