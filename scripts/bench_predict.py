"""Throughput of `python -m tl.predict` with the default backbone (EfficientNet-Lite0) on a folder of images.

    python scripts/bench_predict.py                      # 1,000 digit PNGs at 64 px (the default digits run)
    python scripts/bench_predict.py --image-size 224 --photos   # 1,000 320x240 JPEGs at 224 px
    python scripts/bench_predict.py --out bench.json --workers 2 --batch-size 64

It builds a TransferModule with the package's ImageNet weights and the preprocessing a run would save, writes a
checkpoint without a Trainer, writes the images, then times `tl.predict.predict` (decoding workers included, model
loading excluded) and writes the figures as JSON. Weights do not change the speed; the input size does.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from benchlib import machine, write_report
from omegaconf import OmegaConf
from PIL import Image


def write_digits(folder: Path, n: int) -> None:
    """The first `n` of scikit-learn's 8x8 digits as grayscale PNGs (what scripts/export_digits.py writes)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    for i in range(n):
        Image.fromarray(images[i % len(images)], mode="L").save(folder / f"{i:04d}.png")


def write_photos(folder: Path, n: int, seed: int = 0) -> None:
    """`n` photo-sized (320x240) JPEGs: smooth colour gradients plus noise, so decoding costs what a photo costs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:240, 0:320].astype(np.float32)
    for i in range(n):
        a, b, c = rng.uniform(0.005, 0.05, 3)
        img = np.stack([np.sin(a * xx + i), np.cos(b * yy), np.sin(c * (xx + yy))], -1) * 100 + 128
        img += rng.normal(0, 12, img.shape)
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(folder / f"{i:04d}.jpg", quality=90)


def write_checkpoint(path: Path, image_size: int, crop_pct: float) -> None:
    """A tl checkpoint of the default backbone without training: the weights and hyperparameters a run saves."""
    from tl.data.transforms import backbone_preprocess
    from tl.models import TransferModule

    preprocess = backbone_preprocess("efficientnet_lite0") | {"input_size": [3, image_size, image_size],
                                                              "crop_pct": crop_pct}
    module = TransferModule("efficientnet_lite0", num_classes=10, pretrained="package", drop_rate=0.2,
                            class_names=[str(i) for i in range(10)], preprocess=preprocess)
    module.load_pretrained()
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": pl.__version__}, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000, help="number of images")
    parser.add_argument("--image-size", type=int, default=64, help="model input size (the digits run uses 64)")
    parser.add_argument("--photos", action="store_true", help="320x240 JPEGs instead of 8x8 digit PNGs")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=None, help="decoding workers (default: tl.predict's choice)")
    parser.add_argument("--threads", type=int, default=None, help="model threads (default: tl.predict's choice)")
    parser.add_argument("--no-optimize", action="store_true", help="skip BatchNorm folding and channels-last")
    parser.add_argument("--out", type=Path, default=Path("logs/bench/bench_predict.json"))
    args = parser.parse_args()

    from tl.predict import predict

    with tempfile.TemporaryDirectory(prefix="tl_bench_") as tmp:
        tmp = Path(tmp)
        images = tmp / "images"
        images.mkdir()
        (write_photos if args.photos else write_digits)(images, args.n)
        ckpt = tmp / "model.ckpt"
        write_checkpoint(ckpt, args.image_size, crop_pct=0.875 if args.photos else 1.0)
        cfg = OmegaConf.create({"ckpt": str(ckpt), "inputs": str(images), "output": str(tmp / "predictions.csv"),
                                "batch_size": args.batch_size, "num_workers": args.workers, "threads": args.threads,
                                "topk": 1, "device": "cpu", "optimize": not args.no_optimize})
        rows, summary = predict(cfg)

    assert summary["errors"] == 0 and len(rows) == args.n
    record = {"images": args.n, "inputs": "320x240 jpeg" if args.photos else "8x8 png (digits)",
              "image_size": args.image_size, "batch_size": args.batch_size, "optimize": not args.no_optimize,
              "workers": summary["workers"], "threads": summary["threads"], "seconds": summary["seconds"],
              "images_per_s": summary["images_per_s"], "cpus": os.cpu_count(),
              "load_average_1min": round(os.getloadavg()[0], 2),  # other work on a shared machine slows this
              **machine()}
    write_report(args.out, record)
    print(json.dumps(record))


if __name__ == "__main__":
    main()
