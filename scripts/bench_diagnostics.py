"""What the default diagnostics cost: epoch time of the default run with and without them.

    python scripts/bench_diagnostics.py                      # the default run (digits, EfficientNet-Lite0), 3 epochs
    python scripts/bench_diagnostics.py --epochs 2 --train-batches 10 --dense data=synthetic

Two measurements, both in one process:
1. in-run (robust on a shared machine): the diagnostic callbacks are subclassed so that every hook they run (and
   every forward hook they install) adds its wall time to a counter; the ratio is the run's epoch time over the same
   minus that counter. Load from other processes scales both sides alike.
2. A/B (noisy on a shared machine): median epoch time of separate fits with and without the callbacks, run
   alternately (off, on, off, on, ...) after a discarded warm-up fit.
Variants: `off` = callbacks=default without InitialLossCheck and the five diagnostic callbacks; `default` =
callbacks=default as shipped (update ratios every 50 steps, histograms every 200, confusion matrix every 5 epochs
and at the end, images once); `dense` (--dense) = callbacks=diagnostics as shipped. The epoch time runs from
on_train_epoch_start to on_train_epoch_end (training and validation). Target: `default` <= 1.05. With few epochs the
once-per-run costs (images, step-0 samples, last-epoch confusion matrix, HParams) weigh more than in a full run, so
the ratio errs high.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
from benchlib import compose_run, machine, write_report
from pytorch_lightning.callbacks import Callback

from tl.callbacks import DIAGNOSTICS, InitialLossCheck

# Hooks that run outside on_train_epoch_start..end: their time adds to the run, not to an epoch.
OUTSIDE_EPOCH = {"setup", "teardown", "on_fit_start", "on_fit_end", "on_train_start", "on_train_end", "on_test_end",
                 "on_test_start", "on_test_epoch_start", "on_test_epoch_end", "on_test_batch_start",
                 "on_test_batch_end"}


def _timed(cls: type) -> type:
    """A subclass of callback `cls` that adds the wall time of each of its hooks to `inside` / `outside` seconds."""

    def wrap(name: str):
        original = getattr(cls, name)

        def hook(self, *args, **kwargs):
            start = time.perf_counter()
            try:
                return original(self, *args, **kwargs)
            finally:
                self.seconds["outside" if name in OUTSIDE_EPOCH else "inside"] += time.perf_counter() - start
        return hook

    hooks = [n for n in dir(Callback) if (n.startswith("on_") or n in ("setup", "teardown"))
             and getattr(cls, n) is not getattr(Callback, n)]
    attrs = {n: wrap(n) for n in hooks}

    def init(self, *args, **kwargs):
        cls.__init__(self, *args, **kwargs)
        self.seconds = {"inside": 0.0, "outside": 0.0}

    attrs["__init__"] = init
    if hasattr(cls, "_activation_hook"):  # forward hooks run inside training_step, not inside a callback hook
        def activation_hook(self, *args, **kwargs):
            fn = cls._activation_hook(self, *args, **kwargs)

            def timed(*a, **k):
                start = time.perf_counter()
                fn(*a, **k)
                self.seconds["inside"] += time.perf_counter() - start
            return timed
        attrs["_activation_hook"] = activation_hook
    return type(f"Timed{cls.__name__}", (cls,), attrs)


# conf/callbacks/default.yaml's entry for each diagnostic callback (one per concern) and its timed stand-in
ENTRIES = {"run_summary": "RunSummary", "update_ratios": "UpdateRatios", "histograms": "StageHistograms",
           "image_samples": "ImageSamples", "val_confusion": "ValConfusion"}
TIMED = {cls.__name__: _timed(cls) for cls in (*DIAGNOSTICS, InitialLossCheck)}
globals().update({f"Timed{name}": cls for name, cls in TIMED.items()})
TIMED_ENTRIES = [f"callbacks.{entry}._target_={__name__}.Timed{name}" for entry, name in ENTRIES.items()]

VARIANTS = {
    "off": ["callbacks=default", "callbacks.initial_loss_check=null", *[f"callbacks.{e}=null" for e in ENTRIES]],
    "default": ["callbacks=default", f"callbacks.initial_loss_check._target_={__name__}.TimedInitialLossCheck",
                *TIMED_ENTRIES],
    "dense": ["callbacks=diagnostics", f"callbacks.initial_loss_check._target_={__name__}.TimedInitialLossCheck",
              *TIMED_ENTRIES],
}


class EpochTimer(Callback):
    """Wall time of each training epoch (validation included: Lightning runs it before on_train_epoch_end)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seconds.append(time.perf_counter() - self._start)


def run_once(variant: str, args: argparse.Namespace, root: Path, index: int) -> tuple[list[float], dict]:
    from tl.train import train

    overrides = [*VARIANTS[variant], f"trainer.max_epochs={args.epochs}", "test=false",
                 "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "callbacks.progress=null",
                 f"+callbacks.epoch_timer._target_={__name__}.EpochTimer", *args.overrides]
    if args.train_batches:
        overrides.append(f"+trainer.limit_train_batches={args.train_batches}")
    cfg = compose_run(overrides, root / f"{index:02d}_{variant}")
    _, objects = train(cfg)
    callbacks = objects["trainer"].callbacks
    timer = next(cb for cb in callbacks if isinstance(cb, EpochTimer))
    hooks = {"inside": 0.0, "outside": 0.0}
    for cb in callbacks:
        for where, seconds in getattr(cb, "seconds", {}).items() if not isinstance(cb, EpochTimer) else ():
            hooks[where] += seconds
    return timer.seconds, hooks


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-batches", type=int, default=None, help="trainer.limit_train_batches (default: all)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dense", action="store_true", help="also time callbacks=diagnostics")
    parser.add_argument("--out", type=Path, default=None, help="write the numbers as JSON here")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run (e.g. data=synthetic)")
    args = parser.parse_args(argv)
    variants = ["off", "default", *(["dense"] if args.dense else [])]
    epochs: dict[str, list[float]] = {v: [] for v in variants}
    in_run: dict[str, list[dict]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="bench_diag_") as tmp:
        # A discarded warm-up fit: first-call costs (imports, weight loading, allocator growth) would land on
        # whichever variant ran first.
        run_once("off", argparse.Namespace(**{**vars(args), "epochs": 1, "train_batches": 2}), Path(tmp), 99)
        for r in range(args.repeats):
            for i, variant in enumerate(variants if r % 2 == 0 else variants[::-1]):
                seconds, hooks = run_once(variant, args, Path(tmp), r * len(variants) + i)
                epochs[variant] += seconds
                in_run[variant].append({"epoch_s": sum(seconds), **{f"hooks_{k}_s": v for k, v in hooks.items()}})
    report: dict = {"epochs": args.epochs, "train_batches": args.train_batches, "repeats": args.repeats,
                    "overrides": args.overrides, "epoch_seconds": epochs, "in_run": in_run}
    base = statistics.median(epochs["off"])
    print(f"{'variant':<9}{'epoch s (median)':>18}{'A/B ratio':>11}{'hook s in/out epochs':>22}{'in-run ratio':>14}")
    for variant in variants:
        med = statistics.median(epochs[variant])
        with_ = sum(x["epoch_s"] + x["hooks_outside_s"] for x in in_run[variant])
        hook = sum(x["hooks_inside_s"] + x["hooks_outside_s"] for x in in_run[variant])
        ratio = with_ / (with_ - hook)
        report[variant] = {"median_epoch_s": med, "ab_ratio": med / base, "in_run_ratio": ratio,
                           "hook_s": hook, "run_s": with_}
        inside = sum(x["hooks_inside_s"] for x in in_run[variant])
        outside = sum(x["hooks_outside_s"] for x in in_run[variant])
        print(f"{variant:<9}{med:>18.2f}{med / base:>11.3f}{f'{inside:.2f} / {outside:.2f}':>22}{ratio:>14.3f}")
    write_report(args.out, {**machine(), **report})
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
