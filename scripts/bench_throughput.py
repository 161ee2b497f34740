"""Fine-tuning throughput (training images/s): tl's Lightning path against a plain timm training loop.

For each model, on the same device, batch size, input size, precision and memory format:
- `tl`: tl's TransferModule (full fine-tuning, AdamW) trained by a Lightning Trainer with the given precision plugin
  and tl's ChannelsLast callback (and TorchCompile with --compile);
- `timm-loop`: the inner loop of timm's train.py: `timm.create_model`, `create_optimizer_v2("adamw")`, autocast,
  backward, step;
- `timm-benchmark` (with --timm-benchmark PATH): timm's own benchmark.py (`--bench train`) from a
  pytorch-image-models checkout (the pip package ships neither train.py nor benchmark.py). Its inputs already sit on
  the GPU, so it is an upper bound; the two runners above both feed batches from pinned host memory.

Inputs are random tensors held in (pinned) host memory as whole batches, copied to the device each step, so the
numbers measure the model step and the framework around it, not JPEG decoding. Timing: `warmup` steps first (cuDNN
autotuning, compilation, allocator), then `steps` timed steps between two `torch.cuda.synchronize()` calls. Without a
CUDA GPU everything runs on the CPU and says so.

    python scripts/bench_throughput.py                                  # efficientnet_lite0 and resnet50, 224 px
    python scripts/bench_throughput.py --batch-size 128 --compile --out logs/bench/throughput.json
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import pytorch_lightning as pl
import timm
import torch
from benchlib import machine, synchronize, write_report
from torch.nn import functional as F
from torch.utils.data import DataLoader

NUM_CLASSES = 100


class _Batches(torch.utils.data.Dataset):
    """`n` steps' worth of whole batches, cycling over a few distinct ones held in (pinned) host memory."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]], n: int):
        self.batches, self.n = batches, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batches[i % len(self.batches)]


@functools.lru_cache(maxsize=2)
def _distinct_batches(batch_size: int, image_size: int, pin: bool, distinct: int = 8) -> list:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(distinct):
        x = torch.randn(batch_size, 3, image_size, image_size, generator=g)
        y = torch.randint(0, NUM_CLASSES, (batch_size,), generator=g)
        out.append((x.pin_memory(), y.pin_memory()) if pin else (x, y))
    return out


def make_loader(batch_size: int, image_size: int, n_batches: int, device: torch.device) -> DataLoader:
    """`n_batches` batches of random normalized images and labels, from pinned host memory on a GPU machine.

    Whole batches are made once and handed out as they are (no per-sample indexing and collation, which on a fast GPU
    would cost as much as the step itself); both runners copy them to the device each step, as from a real loader.
    """
    batches = _distinct_batches(batch_size, image_size, device.type == "cuda")
    return DataLoader(_Batches(batches, n_batches), batch_size=None, shuffle=False, num_workers=0)


class StepTimer(pl.Callback):
    """Wall time of the training steps after `warmup`, bracketed by device synchronizations."""

    def __init__(self, warmup: int, device: torch.device):
        self.warmup, self.device = warmup, device
        self.start = self.end = 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if batch_idx == self.warmup - 1:
            synchronize(self.device)
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        synchronize(self.device)
        self.end = time.perf_counter()


def bench_tl(model: str, args: argparse.Namespace, device: torch.device) -> float:
    """Seconds for `args.steps` training steps of tl's module under a Lightning Trainer."""
    from tl.callbacks.performance import ChannelsLast, TorchCompile
    from tl.models import TransferModule

    module = TransferModule(name=model, num_classes=NUM_CLASSES, pretrained="none", strategy="full",
                            optimizer={"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3,
                                       "weight_decay": 0.05}, scheduler=None)
    timer = StepTimer(args.warmup, device)
    callbacks: list[pl.Callback] = [timer]
    if args.channels_last:
        callbacks.append(ChannelsLast())
    if args.compile:
        callbacks.append(TorchCompile())
    trainer = pl.Trainer(accelerator=device.type, devices=1, precision=args.precision,
                         max_steps=args.warmup + args.steps, callbacks=callbacks, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0, benchmark=device.type == "cuda")
    trainer.fit(module, train_dataloaders=make_loader(args.batch_size, args.image_size,
                                                      args.warmup + args.steps, device))
    return timer.end - timer.start


def bench_timm_loop(model: str, args: argparse.Namespace, device: torch.device) -> float:
    """Seconds for `args.steps` steps of the loop timm's train.py runs (no Lightning)."""
    from timm.optim import create_optimizer_v2

    torch.backends.cudnn.benchmark = device.type == "cuda"
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    net = timm.create_model(model, num_classes=NUM_CLASSES).to(device=device, memory_format=memory_format).train()
    forward = torch.compile(net) if args.compile else net
    optimizer = create_optimizer_v2(net, "adamw", lr=1e-3, weight_decay=0.05)
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(args.precision)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    start = 0.0
    for i, (x, y) in enumerate(make_loader(args.batch_size, args.image_size, args.warmup + args.steps, device)):
        x = x.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        y = y.to(device, non_blocking=True)
        with autocast:
            loss = F.cross_entropy(forward(x), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if i == args.warmup - 1:
            synchronize(device)
            start = time.perf_counter()
    synchronize(device)
    return time.perf_counter() - start


def bench_timm_benchmark(model: str, args: argparse.Namespace) -> float:
    """Seconds for `args.steps` steps as measured by timm's benchmark.py (train mode)."""
    cmd = [sys.executable, str(args.timm_benchmark), "--bench", "train", "--model", model, "-b", str(args.batch_size),
           "--img-size", str(args.image_size), "--num-classes", str(NUM_CLASSES), "--opt", "adamw",
           "--num-warm-iter", str(args.warmup), "--num-bench-iter", str(args.steps)]
    if args.channels_last:
        cmd.append("--channels-last")
    if args.precision in ("bf16-mixed", "16-mixed"):
        cmd += ["--amp", "--amp-dtype", "bfloat16" if args.precision == "bf16-mixed" else "float16"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    result = json.loads(re.split(r"^--result$", out, flags=re.M)[-1])
    return args.steps * args.batch_size / float(result["train_samples_per_sec"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["efficientnet_lite0", "resnet50"])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=None, help="default: 64 on a GPU, 8 on the CPU")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 50 on a GPU, 3 on the CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 10 GPU, 1 CPU)")
    parser.add_argument("--precision", default="bf16-mixed", choices=["bf16-mixed", "16-mixed", "32-true"])
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    parser.add_argument("--compile", action="store_true", help="torch.compile in both runners (more warmup!)")
    parser.add_argument("--timm-benchmark", type=Path, default=None,
                        help="benchmark.py of a pytorch-image-models checkout, to run as a third reference")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    args.batch_size = args.batch_size or (64 if cuda else 8)
    args.steps = args.steps or (50 if cuda else 3)
    args.warmup = max(1, args.warmup if args.warmup is not None else (10 if cuda else 1))
    device_name = machine(device)["device_name"]
    if not cuda:
        print(f"no CUDA GPU available: measuring on the CPU ({device_name}) with {args.steps} steps; "
              "the numbers only show that the script works")

    runners = {"tl": bench_tl, "timm-loop": bench_timm_loop}
    if args.timm_benchmark is not None:
        if not cuda:  # timm's benchmark.py times with torch.cuda.synchronize
            print("--timm-benchmark skipped: it needs a CUDA GPU")
        else:
            runners["timm-benchmark"] = lambda m, a, d: bench_timm_benchmark(m, a)
    rows = []
    for model in args.models:
        for runner, fn in runners.items():
            seconds = fn(model, args, device)
            rows.append({"runner": runner, "model": model, "step_ms": round(1000 * seconds / args.steps, 2),
                         "images_per_s": round(args.steps * args.batch_size / seconds, 1)})
            print(f"{model:>20} {runner:>15}: {rows[-1]['images_per_s']:>9.1f} images/s "
                  f"({rows[-1]['step_ms']:.1f} ms/step)", flush=True)
        reference = next(r for r in rows if r["model"] == model and r["runner"] == "timm-loop")
        ours = next(r for r in rows if r["model"] == model and r["runner"] == "tl")
        print(f"{model:>20} {'tl / timm-loop':>15}: {ours['images_per_s'] / reference['images_per_s']:.3f}")

    report = {**machine(device), "precision": args.precision, "channels_last": args.channels_last,
              "compile": args.compile, "batch_size": args.batch_size, "image_size": args.image_size,
              "steps": args.steps, "warmup": args.warmup, "results": rows}
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
