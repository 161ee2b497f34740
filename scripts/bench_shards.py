"""LitData shards: peak memory against dataset size, and loader throughput against an image folder and the model.

    python scripts/bench_shards.py [--work /tmp/bench_shards] [--sizes 10000 100000] [--json out.json]

1. Generates image folders of the given sizes (10 classes of 32 px PNG gratings with noise: small, real files).
2. Converts each with `python -m tl.shard data=imagefolder` (timed).
3. Peak memory of a 1-epoch training run from each (`python -m tl.train data=shards`, full fine-tuning so that train
   streams; EfficientNet-Lite0 at 32 px; test, calibration and the report as usual; ONNX off): the peak over the run
   of the summed PSS of the process and its loader workers (PSS counts pages shared by forked workers once), and
   the main process's peak RSS. Target: the largest size at most 1.2x the smallest.
4. Loader throughput on the smallest size, side by side in one process: full training epochs from shards vs from
   the same images as an image folder, alternated (the same transform: 64 px, strong augmentation, as the default
   digits run; the data module's default workers; medians), and what the model consumes: EfficientNet-Lite0
   training steps at 64 px, batch 64, channels_last (the default run's shape). Targets: shards >= folder, shards
   >= 3x the model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))


def make_folder(root: Path, n: int, classes: int = 10, side: int = 32, seed: int = 0) -> Path:
    if (root / ".done").is_file():
        return root
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0, 1, side), np.linspace(0, 1, side), indexing="ij")
    for c in range(classes):
        (root / f"class_{c}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        c = i % classes
        angle, freq = np.pi * c / classes, 2.0 + c % 4
        wave = np.sin(2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy) + rng.uniform(0, 2 * np.pi))
        colour = np.array([(c * 0.37) % 1, (c * 0.61 + 0.3) % 1, (c * 0.83 + 0.6) % 1])
        img = 0.5 + 0.35 * wave[..., None] * (0.5 + colour) + 0.1 * rng.standard_normal((side, side, 3))
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(root / f"class_{c}" / f"{i:06d}.png")
    (root / ".done").write_text("")
    return root


def tree_memory(pid: int) -> tuple[int, int]:
    """(summed PSS of `pid` and its descendants, RSS of `pid`) in bytes."""
    from tl.shard import _descendants

    pss = 0
    for p in [pid, *_descendants(pid)]:
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
        except OSError:
            continue
    try:
        rss = next(int(line.split()[1]) * 1024 for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                   if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        rss = 0
    return pss, rss


def run_measured(cmd: list[str], log: Path) -> dict:
    """Run `cmd`, sampling its process tree's memory every 0.25 s."""
    peak = {"pss": 0, "rss": 0}
    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)

        def sample():
            while proc.poll() is None:
                pss, rss = tree_memory(proc.pid)
                peak["pss"], peak["rss"] = max(peak["pss"], pss), max(peak["rss"], rss)
                time.sleep(0.25)

        t = threading.Thread(target=sample, daemon=True)
        t.start()
        rc = proc.wait()
        t.join()
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed ({rc}); see {log}")
    return {"peak_tree_pss_mib": round(peak["pss"] / 2**20, 1), "peak_main_rss_mib": round(peak["rss"] / 2**20, 1),
            "seconds": round(time.perf_counter() - started, 1)}


def loader_throughput(datamodule) -> float:
    """Images/s of one full training epoch from the data module's train loader (worker start-up included, as a run
    pays it every epoch)."""
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    started, seen = time.perf_counter(), 0
    for batch in loader:
        seen += len(batch[1])
    return seen / (time.perf_counter() - started)


def model_throughput(steps: int = 8, batch: int = 64, side: int = 64, device: str = "cpu") -> float:
    """Training images/s of EfficientNet-Lite0 at the default run's shape on `device` (on a GPU: bf16 autocast, as
    trainer=gpu, and more steps)."""
    import timm
    import torch

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    steps = steps * 8 if cuda else steps
    model = timm.create_model("efficientnet_lite0", num_classes=10).to(dev, memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 3, side, side, device=dev).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=dev)
    model.train()
    for i in range(steps + 5):
        if i == 5:
            if cuda:
                torch.cuda.synchronize(dev)
            started = time.perf_counter()
        opt.zero_grad()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    if cuda:
        torch.cuda.synchronize(dev)
    return steps * batch / (time.perf_counter() - started)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_shards"))
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--repeats", type=int, default=3, help="full loader epochs per source, alternated")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--model-device", default="cpu", help="where the model's appetite is measured: cpu | cuda | auto")
    args = ap.parse_args()
    from benchlib import machine, write_report

    args.work.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine(), "sizes": {}}
    for n in args.sizes:
        t = time.perf_counter()
        folder = make_folder(args.work / f"images_{n}", n)
        shards = args.work / f"shards_{n}"
        conv = run_measured([sys.executable, "-m", "tl.shard", "data=imagefolder", f"data.root={folder}",
                             f"output={shards}", f"hydra.run.dir={args.work / f'shard_run_{n}'}"],
                            args.work / f"shard_{n}.log")
        run = run_measured([sys.executable, "-m", "tl.train", "data=shards", f"data.root={shards}",
                            "data.image_size=32", "data.crop_pct=1.0", "scenario=large_different",
                            "finetune.strategy=full", "trainer.max_epochs=1", "onnx.enabled=false",
                            "callbacks.progress=null", "trainer.enable_progress_bar=false", "overwrite=true",
                            f"hydra.run.dir={args.work / f'train_run_{n}'}"], args.work / f"train_{n}.log")
        results = json.loads((args.work / f"train_run_{n}" / "results.json").read_text())
        report["sizes"][n] = {"generate_s": round(time.perf_counter() - t - conv["seconds"] - run["seconds"], 1),
                              "shard": conv, "train_1_epoch": run, "n_train": results["n_train"],
                              "test_acc": results["test/acc"]}
        print(json.dumps({n: report["sizes"][n]}), flush=True)
    sizes = sorted(report["sizes"])
    small, large = report["sizes"][sizes[0]], report["sizes"][sizes[-1]]
    ratio = large["train_1_epoch"]["peak_tree_pss_mib"] / small["train_1_epoch"]["peak_tree_pss_mib"]
    report["memory_ratio"] = round(ratio, 3)

    # Loader throughput, side by side (smallest size), and the model's appetite.
    from tl.data.datamodule import TransferDataModule
    from tl.data.shards import ShardSource
    from tl.data.sources import ImageFolderSource
    from tl.data.transforms import backbone_preprocess

    pre = backbone_preprocess("efficientnet_lite0")
    from omegaconf import OmegaConf

    augment = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "augment" / "strong.yaml"))
    kw = {"preprocess": pre, "augment": augment, "image_size": 64, "crop_pct": 1.0, "batch_size": 64, "seed": 42}
    n = sizes[0]
    runs: dict[str, list[float]] = {"shards": [], "folder": []}
    for _ in range(args.repeats):  # alternated: the machine's load drifts
        runs["shards"].append(loader_throughput(TransferDataModule(ShardSource(str(args.work / f"shards_{n}")), **kw)))
        runs["folder"].append(loader_throughput(TransferDataModule(ImageFolderSource(args.work / f"images_{n}"), **kw)))
    import torch

    model_device = args.model_device
    if model_device == "auto":
        model_device = "cuda" if torch.cuda.is_available() else "cpu"
    model_ips = model_throughput(device=model_device)
    shards_ips, folder_ips = float(np.median(runs["shards"])), float(np.median(runs["folder"]))
    report["loader"] = {"shards_img_s": [round(x, 1) for x in runs["shards"]],
                        "folder_img_s": [round(x, 1) for x in runs["folder"]],
                        "model_train_img_s": round(model_ips, 1), "model_device": model_device,
                        "workers": min(8, os.cpu_count() or 1),
                        "shards_vs_folder": round(shards_ips / folder_ips, 2),
                        "shards_vs_model": round(shards_ips / model_ips, 2)}
    print(json.dumps(report, indent=1))
    print(f"peak memory (tree PSS) {small['train_1_epoch']['peak_tree_pss_mib']:.0f} MiB at {sizes[0]} images, "
          f"{large['train_1_epoch']['peak_tree_pss_mib']:.0f} MiB at {sizes[-1]}: {ratio:.2f}x (target <= 1.2x)")
    lo = report["loader"]
    print(f"loader (median of {args.repeats} epochs): shards {np.median(lo['shards_img_s']):.0f} img/s, folder "
          f"{np.median(lo['folder_img_s']):.0f} img/s "
          f"({lo['shards_vs_folder']:.2f}x, target >= 1); model consumes {lo['model_train_img_s']:.0f} img/s on "
          f"{lo['model_device']} "
          f"({lo['shards_vs_model']:.2f}x, target >= 3)")
    write_report(args.json, report)


if __name__ == "__main__":
    main()
