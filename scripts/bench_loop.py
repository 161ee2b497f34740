"""Lightning's training loop against a plain PyTorch loop: same model, data, steps; epoch time and overhead.

    python scripts/bench_loop.py                              # the default run's model and data, 3 epochs each
    python scripts/bench_loop.py --ablate --out logs/bench/loop.json
    python scripts/bench_loop.py --epochs 12 --repeats 2 -- data.batch_size=32

Both loops train the default run's configuration: `python -m tl.train` resolves `scenario=auto` to
`large_different` on digits (README), so the config is `scenario=large_different` (EfficientNet-Lite0 with its
packaged ImageNet weights, full fine-tuning, strong augmentation, AdamW + per-step cosine schedule over the preset's
12 epochs, batch 64, 64 px). Both get the same seed, the same `TransferDataModule` loaders (train transform and
validation) and a freshly built `TransferModule`:

- `tl`: the module under the `pl.Trainer` that `tl.train.build_trainer` makes from the config (every default
  callback: checkpoints, LR monitor, channels_last, progress bar, initial-loss check, diagnostics; TensorBoard);
- `plain`: a hand-written loop over the same module's network: channels_last, forward, label-smoothed cross-entropy,
  backward, AdamW step, scheduler step (optimizer and schedule from the module's own `configure_optimizers`), then a
  validation pass counting correct predictions. No logging, metrics objects, checkpoints or callbacks.

An epoch is timed from its start to the next epoch's start (training steps, validation, and in Lightning everything
its callbacks do at the epoch's end); the first epoch of each loop is a warm-up and is not counted. Overhead =
(tl epoch - plain epoch) / plain epoch, on the median epoch; the target is <= 5%. Loops alternate over `--repeats`
rounds so that a machine's drift hits both alike; the process's CPU time per epoch is reported beside wall time. Both
drift by 10-20% on a machine shared with other jobs (there, run with OMP_NUM_THREADS=1, or threads waiting for each
other inflate everything), so take the figures on an idle machine.

`--profile` splits each epoch into parts, timed directly rather than as differences of noisy totals: data fetch,
forward + loss (in Lightning with tl's `self.log` calls and metrics), backward, optimizer step and loop machinery,
validation, and each callback's hooks (SimpleProfiler actions in Lightning; timers around the plain loop's segments).

`--ablate` adds Lightning variants that each remove one thing from `tl` (progress bar, Diagnostics, LR monitor,
checkpoints, TensorBoard logger, per-step logging), and `lightning-bare`: only the channels_last callback, no logger,
no checkpoints, no progress bar: Lightning's own loop with tl's module (whose `self.log` calls and metrics stay).
What a variant saves against `tl` is what that part costs; `lightning-bare` against `plain` is the framework.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytorch_lightning as pl
import torch
from benchlib import clocks, compose_run, machine, synchronize, write_report
from omegaconf import DictConfig

from tl.models.finetune import set_frozen_modules_eval
from tl.train import build_data, build_module, build_trainer

DEFAULT_RUN = ["scenario=large_different"]  # what scenario=auto picks for the embedded digits default (README)

# Hooks Lightning calls inside a training batch (within run_training_batch).
IN_BATCH_HOOKS = ("on_before_backward", "on_after_backward", "on_before_optimizer_step", "on_before_zero_grad")
DIAGNOSTIC_ENTRIES = ("run_summary", "update_ratios", "histograms", "image_samples", "val_confusion")
DIAGNOSTIC_CLASSES = ("RunSummary", "UpdateRatios", "StageHistograms", "ImageSamples", "ValConfusion")
NO_CHECKPOINTS = ["~callbacks.model_checkpoint", "~callbacks.last_checkpoint", "+trainer.enable_checkpointing=false"]
VARIANTS: dict[str, list[str]] = {
    "tl": [],
    "tl -progress bar": ["callbacks.progress=null", "trainer.enable_progress_bar=false"],
    "tl -Diagnostics": [f"callbacks.{name}=null" for name in DIAGNOSTIC_ENTRIES],
    "tl -LR monitor": ["~callbacks.lr_monitor"],
    "tl -checkpoints": NO_CHECKPOINTS,
    "tl -TensorBoard": ["logger=none"],  # Diagnostics and the LR monitor then have nothing to write to either
    "tl log_every_n_steps=1000": ["trainer.log_every_n_steps=1000"],
    "lightning-bare": ["callbacks=none", "~callbacks.model_checkpoint", "~callbacks.last_checkpoint",
                       "+callbacks.channels_last._target_=tl.callbacks.performance.ChannelsLast", "logger=none",
                       "+trainer.enable_checkpointing=false", "trainer.enable_progress_bar=false",
                       "trainer.enable_model_summary=false"],
}


class EpochTimer(pl.Callback):
    """Epoch boundaries (first callback: before any other's epoch-start work) and the end of each epoch's training
    batches; stops fitting after `epochs` epochs (the schedule still spans max_epochs, as in the real run)."""

    def __init__(self, epochs: int, device: torch.device):
        self.epochs, self.device = epochs, device
        self.starts: list[tuple[float, float]] = []  # (wall, process CPU) at each epoch's start
        self.train_ends: list[float] = []
        self.end = (0.0, 0.0)
        self.marks: list[dict[str, int]] = []
        self.durations: dict[str, list[float]] = {}

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        synchronize(self.device)
        self.starts.append(clocks())
        self.marks.append(action_counts(trainer))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if batch_idx == trainer.num_training_batches - 1:
            synchronize(self.device)
            self.train_ends.append(time.perf_counter())

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True

    def on_train_end(self, trainer, pl_module) -> None:
        synchronize(self.device)
        self.end = clocks()
        self.marks.append(action_counts(trainer))
        self.durations = dict(getattr(trainer.profiler, "recorded_durations", {}) or {})


def action_counts(trainer) -> dict[str, int]:
    """How many times each SimpleProfiler action has run so far (nothing without the profiler)."""
    return {k: len(v) for k, v in (getattr(trainer.profiler, "recorded_durations", None) or {}).items()}


def lightning_parts(durations: dict[str, list[float]], start: dict[str, int], end: dict[str, int]) -> dict[str, float]:
    """One epoch's time by part, from SimpleProfiler actions recorded between two marks."""
    def total(match) -> float:
        return math.fsum(math.fsum(d[start.get(k, 0):end.get(k, 0)]) for k, d in durations.items() if match(k))

    def callback(k: str) -> str:  # "[Callback]ModelCheckpoint{'monitor': ...}.on_train_epoch_end" -> ModelCheckpoint
        return k.removeprefix("[Callback]").split(".", 1)[0].split("{", 1)[0] if k.startswith("[Callback]") else ""

    callbacks = {name: total(lambda k, n=name: callback(k) == n or (n == "Checkpoint" and callback(k).endswith(n))
                             or (n == "Diagnostics" and callback(k) in DIAGNOSTIC_CLASSES))
                 for name in ("Checkpoint", "Diagnostics", "RichProgressBar", "LearningRateMonitor")}
    all_callbacks = total(lambda k: k.startswith("[Callback]") and not k.startswith("[Callback]EpochTimer"))
    in_batch_callbacks = total(lambda k: k.startswith("[Callback]") and k.rsplit(".", 1)[-1] in IN_BATCH_HOOKS)
    step, backward = total(lambda k: k.endswith("Strategy.training_step")), total(lambda k: k.endswith(".backward"))
    parts = {
        "data fetch (train)": total(lambda k: k == "[_TrainingEpochLoop].train_dataloader_next"),
        "forward + loss (+ self.log, metrics)": step,
        "backward": backward,
        "optimizer step + loop machinery": total(lambda k: k == "run_training_batch") - step - backward
        - in_batch_callbacks,
        "validation (fetch + steps)": total(lambda k: k == "[_EvaluationLoop].val_next"
                                            or k.endswith("Strategy.validation_step")),
        "callback: checkpoints": callbacks["Checkpoint"],  # ModelCheckpoint and subclasses
        "callback: Diagnostics": callbacks["Diagnostics"],
        "callback: RichProgressBar": callbacks["RichProgressBar"],
        "callback: LR monitor": callbacks["LearningRateMonitor"],
        "callbacks: others": all_callbacks - math.fsum(callbacks.values()),
    }
    return parts


def epochs_of(starts: list[tuple[float, float]], train_ends: list[float], end: tuple[float, float],
              parts: list[dict[str, float]] | None = None) -> list[dict]:
    bounds = [*starts, end]
    out = [{"epoch_s": bounds[i + 1][0] - starts[i][0], "train_steps_s": train_ends[i] - starts[i][0],
            "epoch_cpu_s": bounds[i + 1][1] - starts[i][1]} for i in range(len(starts))]
    for epoch, p in zip(out, parts or [], strict=False):
        if p:
            epoch["parts"] = {**p, "rest": epoch["epoch_s"] - math.fsum(p.values())}
    return out


def run_lightning(cfg: DictConfig, datamodule, epochs: int, device: torch.device) -> list[dict]:
    pl.seed_everything(cfg.seed, workers=True)
    module = build_module(cfg, datamodule)
    module.load_pretrained()
    trainer = build_trainer(cfg)
    timer = EpochTimer(epochs, device)
    trainer.callbacks.insert(0, timer)
    trainer.fit(module, datamodule=datamodule)
    parts = [lightning_parts(timer.durations, a, b) if b else {} for a, b in itertools.pairwise(timer.marks)]
    return epochs_of(timer.starts, timer.train_ends, timer.end, parts)


def run_plain(cfg: DictConfig, datamodule, epochs: int, device: torch.device, profile: bool = False) -> list[dict]:
    pl.seed_everything(cfg.seed, workers=True)
    module = build_module(cfg, datamodule)
    module.load_pretrained()
    model = module.model.to(device=device, memory_format=torch.channels_last)
    datamodule.trainer = None  # a Lightning loop may have run before: no trainer, no distributed samplers
    train_loader, val_loader = datamodule.train_dataloader(), datamodule.val_dataloader()
    max_epochs = int(cfg.trainer.max_epochs)
    # The module's own optimizer and schedule; it only asks its trainer for the run's length.
    module.trainer = SimpleNamespace(estimated_stepping_batches=len(train_loader) * max_epochs, max_epochs=max_epochs)
    configured = module.configure_optimizers()
    module.trainer = None
    optimizer = configured["optimizer"] if isinstance(configured, dict) else configured
    scheduler = configured["lr_scheduler"]["scheduler"] if isinstance(configured, dict) else None
    criterion = module.criterion
    starts, train_ends, parts = [], [], []
    t = PartTimer(device, profile)
    for _ in range(epochs):
        synchronize(device)
        starts.append(clocks())
        t.reset()
        model.train()
        set_frozen_modules_eval(model)
        batches = iter(train_loader)
        while True:
            t.start()
            batch = next(batches, None)
            t.stop("data fetch (train)")
            if batch is None:
                break
            optimizer.zero_grad(set_to_none=True)
            t.stop("optimizer step + loop machinery")
            x = batch[0].to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            y = batch[1].to(device, non_blocking=True)
            loss = criterion(model(x), y)
            t.stop("forward + loss (+ self.log, metrics)")
            loss.backward()
            t.stop("backward")
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            t.stop("optimizer step + loop machinery")
        synchronize(device)
        train_ends.append(time.perf_counter())
        t.start()
        model.eval()
        correct = torch.zeros((), dtype=torch.long, device=device)
        with torch.inference_mode():
            for x, y in val_loader:
                x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
                correct += (model(x).argmax(dim=1) == y.to(device)).sum()
        correct.item()
        t.stop("validation (fetch + steps)")
        parts.append(dict(t.parts) if profile else {})
    synchronize(device)
    return epochs_of(starts, train_ends, clocks(), parts)


class PartTimer:
    """Consecutive segments of the plain loop, timed into named parts (device-synchronized; off unless profiling)."""

    def __init__(self, device: torch.device, enabled: bool):
        self.device, self.enabled = device, enabled
        self.parts: dict[str, float] = {}
        self._last = 0.0

    def reset(self) -> None:
        self.parts = {}

    def start(self) -> None:
        if self.enabled:
            synchronize(self.device)
            self._last = time.perf_counter()

    def stop(self, part: str) -> None:
        if self.enabled:
            synchronize(self.device)
            now = time.perf_counter()
            self.parts[part] = self.parts.get(part, 0.0) + now - self._last
            self._last = now


def summarize(epochs: list[dict]) -> dict:
    counted = [e for e in epochs if not e["warmup"]]
    parts = [e["parts"] for e in counted if e.get("parts")]
    medians = {k: round(statistics.median(p.get(k, 0.0) for p in parts), 4) for k in parts[0]} if parts else None
    return {"parts_s": medians, "epoch_s": round(statistics.median(e["epoch_s"] for e in counted), 3),
            "train_steps_s": round(statistics.median(e["train_steps_s"] for e in counted), 3),
            "epoch_cpu_s": round(statistics.median(e["epoch_cpu_s"] for e in counted), 3),
            "epoch_s_min": round(min(e["epoch_s"] for e in counted), 3),
            "epochs_counted": len(counted)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per loop and round, the first a warm-up")
    parser.add_argument("--repeats", type=int, default=1, help="rounds; loops alternate within each round")
    parser.add_argument("--ablate", action="store_true", help="also time Lightning without each callback in turn")
    parser.add_argument("--profile", action="store_true",
                        help="split epochs into parts (SimpleProfiler in Lightning, timers in the plain loop)")
    parser.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS),
                        help="Lightning variants to time (default: tl, or all with --ablate)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every loop (after --)")
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be >= 2: the first epoch is a warm-up")
    variants = args.variants or (list(VARIANTS) if args.ablate else ["tl"])

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # trainer.accelerator=auto, devices=1
    load_before = os.getloadavg()
    epochs: dict[str, list[dict]] = {name: [] for name in ["plain", *variants]}
    with tempfile.TemporaryDirectory() as tmp:
        base = compose_run([*DEFAULT_RUN, *args.overrides], Path(tmp) / "base")
        datamodule = build_data(base)  # images loaded once; each loop gets the same loaders
        datamodule.prepare_data()
        datamodule.setup("fit")
        for round_ in range(args.repeats):
            for i, name in enumerate(epochs):
                out_dir = Path(tmp) / f"round{round_}-loop{i}"
                if name == "plain":
                    got = run_plain(base, datamodule, args.epochs, device, profile=args.profile)
                else:
                    profiler = ["+trainer.profiler=simple"] if args.profile else []
                    cfg = compose_run([*DEFAULT_RUN, *VARIANTS[name], *profiler, *args.overrides], out_dir)
                    got = run_lightning(cfg, datamodule, args.epochs, device)
                for i, e in enumerate(got):
                    epochs[name].append({"round": round_, "epoch": i, "warmup": i == 0,
                                         **{k: round(v, 4) if isinstance(v, float) else
                                            {part: round(t, 4) for part, t in v.items()} for k, v in e.items()}})
                print(f"[round {round_}] {name}: " + ", ".join(f"{e['epoch_s']:.2f}s" for e in got), flush=True)

    summary = {name: summarize(e) for name, e in epochs.items()}
    plain = summary["plain"]
    for name, s in summary.items():  # per round against that round's plain loop: the machine's drift cancels
        def round_median(loop: str, r: int) -> float:
            return statistics.median(e["epoch_s"] for e in epochs[loop] if e["round"] == r and not e["warmup"])

        s["paired_overhead_pct"] = round(statistics.median(
            100 * (round_median(name, r) / round_median("plain", r) - 1) for r in range(args.repeats)), 2)
        s["overhead_pct"] = round(100 * (s["epoch_s"] - plain["epoch_s"]) / plain["epoch_s"], 2)
        s["cpu_overhead_pct"] = round(100 * (s["epoch_cpu_s"] - plain["epoch_cpu_s"]) / plain["epoch_cpu_s"], 2)
        s["train_steps_overhead_pct"] = round(
            100 * (s["train_steps_s"] - plain["train_steps_s"]) / plain["train_steps_s"], 2)
        if name not in ("plain", "tl") and "tl" in summary:
            s["saves_vs_tl_s"] = round(summary["tl"]["epoch_s"] - s["epoch_s"], 3)

    print(f"\n{'loop':28} {'epoch s':>8} {'overhead':>9} {'train s':>8} {'overhead':>9} {'CPU s':>8} {'overhead':>9} "
          f"{'saves vs tl':>12}")
    for name, s in summary.items():
        saves = f"{s['saves_vs_tl_s']:+.3f}s" if "saves_vs_tl_s" in s else ""
        print(f"{name:28} {s['epoch_s']:8.3f} {s['overhead_pct']:8.2f}% {s['train_steps_s']:8.3f} "
              f"{s['train_steps_overhead_pct']:8.2f}% {s['epoch_cpu_s']:8.3f} {s['cpu_overhead_pct']:8.2f}% "
              f"{saves:>12}")
    print("(medians over the counted epochs: epoch = training steps + validation + epoch-end work; train = up to the "
          "last training batch; CPU = this process's CPU time per epoch)")
    if args.profile:
        names = [n for n, sm in summary.items() if sm["parts_s"]]
        keys = list(dict.fromkeys(k for n in names for k in summary[n]["parts_s"]))
        print(f"\n{'per epoch, s (median)':38}" + "".join(f" {n[:14]:>14}" for n in names))
        for k in keys:
            print(f"{k:38}" + "".join(f" {summary[n]['parts_s'].get(k, 0.0):14.3f}" for n in names))
        print("(plain: timers around its own segments; Lightning: SimpleProfiler actions; rest = epoch - the parts)")
    if "tl" in summary:
        tl = summary["tl"]
        print(f"Lightning overhead on the default run: {tl['overhead_pct']:.2f}% of epoch time "
              f"({tl['cpu_overhead_pct']:.2f}% of CPU time; median of per-round pairs {tl['paired_overhead_pct']:.2f}%)"
              "; target <= 5%")
    load_after = os.getloadavg()
    print(f"load average before/after: {[round(x, 2) for x in load_before]} / {[round(x, 2) for x in load_after]} "
          f"({os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, {device.type})")

    report = {"config": [*DEFAULT_RUN, *args.overrides], **machine(device),
              "epochs_per_loop": args.epochs, "repeats": args.repeats,
              "load_average": {"before": list(load_before), "after": list(load_after)},
              "summary": summary, "epochs": epochs}
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
