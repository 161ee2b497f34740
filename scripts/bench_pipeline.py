"""Input pipeline against model step: images/s each delivers or consumes in the default run's configuration.

    python scripts/bench_pipeline.py                                  # the default run (digits, strong augmentation)
    python scripts/bench_pipeline.py --epochs 3 --steps 40 --out logs/bench/pipeline.json
    python scripts/bench_pipeline.py -- data.num_workers=2            # any Hydra override, for both sides

`python -m tl.train` with no arguments resolves `scenario=auto` to `large_different` on digits (README), so the
config here is `scenario=large_different`: EfficientNet-Lite0 with its packaged ImageNet weights, full fine-tuning,
batch 64 at 64 px, strong augmentation (random resized crop, RandAugment rand-m5-mstd0.5, random erasing),
AdamW, and the data module's own loader settings (in-memory digits: `num_workers` 0, i.e. the main process).

- pipeline: iterate the run's training DataLoader (`TransferDataModule.train_dataloader()`, augmentation and
  collation included) for `--epochs` epochs without touching the model; images/s over all batches after the first.
- model: forward + backward + optimizer step (and schedule step) of the run's `TransferModule` network in
  channels_last (as the default callbacks set it), on batches made by that loader beforehand and held in memory;
  `--warmup` untimed steps, then `--steps` timed ones.

The target: the pipeline delivers >= 3x the images/s the model consumes. With `num_workers=0` the two take turns in
one process, so an epoch costs about images/pipeline + images/model; the table shows that share too.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytorch_lightning as pl
import torch
from benchlib import CONF_DIR, machine, synchronize, write_report
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

from tl.models.finetune import set_frozen_modules_eval
from tl.train import build_data, build_module

DEFAULT_RUN = ["scenario=large_different"]  # what scenario=auto picks for the embedded digits default (README)


def bench_pipeline(datamodule, epochs: int) -> dict:
    """Images/s of the training DataLoader alone (the first batch, with worker start-up, is not counted)."""
    images = batches = 0
    elapsed = 0.0
    for _ in range(epochs):
        loader = datamodule.train_dataloader()
        start = time.perf_counter()
        for i, (x, _y) in enumerate(loader):
            if i == 0:  # worker start-up and first-call costs
                start = time.perf_counter()
                continue
            images += len(x)
            batches += 1
        elapsed += time.perf_counter() - start
    return {"images": images, "batches": batches, "seconds": round(elapsed, 3),
            "images_per_s": round(images / elapsed, 1)}


def bench_model(cfg, datamodule, warmup: int, steps: int, device: torch.device) -> dict:
    """Images/s of training steps on pre-made batches (the run's module, optimizer and schedule)."""
    module = build_module(cfg, datamodule)
    module.load_pretrained()
    model = module.model.to(device=device, memory_format=torch.channels_last)
    loader = datamodule.train_dataloader()
    batches = []
    for x, y in loader:  # a handful of real augmented batches, reused in turn
        batches.append((x.to(device).contiguous(memory_format=torch.channels_last), y.to(device)))
        if len(batches) == min(8, warmup + steps):
            break
    max_epochs = int(cfg.trainer.max_epochs)
    module.trainer = SimpleNamespace(estimated_stepping_batches=len(loader) * max_epochs, max_epochs=max_epochs)
    configured = module.configure_optimizers()
    module.trainer = None
    optimizer = configured["optimizer"] if isinstance(configured, dict) else configured
    scheduler = configured["lr_scheduler"]["scheduler"] if isinstance(configured, dict) else None
    model.train()
    set_frozen_modules_eval(model)
    images = 0
    start = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            synchronize(device)
            start = time.perf_counter()
        x, y = batches[i % len(batches)]
        optimizer.zero_grad(set_to_none=True)
        loss = module.criterion(model(x), y)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if i >= warmup:
            images += len(x)
    synchronize(device)
    elapsed = time.perf_counter() - start
    return {"images": images, "steps": steps, "seconds": round(elapsed, 3), "images_per_s": round(images / elapsed, 1),
            "step_ms": round(1000 * elapsed / steps, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2, help="epochs of the DataLoader to time")
    parser.add_argument("--warmup", type=int, default=3, help="untimed model steps first")
    parser.add_argument("--steps", type=int, default=20, help="timed model steps")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (after --)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # trainer.accelerator=auto, devices=1
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose("train", overrides=[*DEFAULT_RUN, *args.overrides])
        with open_dict(cfg):
            cfg.paths.output_dir = tmp
        pl.seed_everything(cfg.seed, workers=True)
        datamodule = build_data(cfg)
        datamodule.prepare_data()
        datamodule.setup("fit")
        pipeline = bench_pipeline(datamodule, args.epochs)
        model = bench_model(cfg, datamodule, args.warmup, args.steps, device)
    ratio = pipeline["images_per_s"] / model["images_per_s"]
    # Serial (num_workers=0): per image, the loader's time then the model's; the loader's share of that.
    loader_share = model["images_per_s"] / (pipeline["images_per_s"] + model["images_per_s"])
    workers = datamodule._workers()

    print(f"\n{'side':10} {'images/s':>10} {'ms/image':>9}")
    for name, r in (("pipeline", pipeline), ("model", model)):
        print(f"{name:10} {r['images_per_s']:10.1f} {1000 / r['images_per_s']:9.3f}")
    print(f"pipeline / model: {ratio:.2f}x (target >= 3x); batch {datamodule.batch_size}, "
          f"augment {cfg.augment.get('name')}, num_workers {workers}"
          + (f": the loader takes {100 * loader_share:.1f}% of a serial epoch" if workers == 0 else ""))
    load_after = os.getloadavg()
    print(f"load average before/after: {[round(x, 2) for x in load_before]} / {[round(x, 2) for x in load_after]} "
          f"({os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, {device.type})")

    report = {"config": [*DEFAULT_RUN, *args.overrides], "batch_size": datamodule.batch_size,
              "image_size": datamodule.preprocess["input_size"][-1], "augment": cfg.augment.get("name"),
              "num_workers": workers, **machine(device),
              "load_average": {"before": list(load_before), "after": list(load_after)},
              "pipeline": pipeline, "model": model, "ratio": round(ratio, 2),
              "loader_share_of_serial_epoch": round(loader_share, 4) if workers == 0 else None}
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
