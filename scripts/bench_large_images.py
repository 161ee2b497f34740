"""Large image files: what decoding at the size the transform needs saves, side by side in one process.

    python scripts/bench_large_images.py [--work /tmp/bench_large] [--side 3000] [--per-class 10] [--epochs 3]

Builds an image folder of 4 classes x `--per-class` camera-sized files (scikit-image's real photographs, enlarged
to `--side` x 2/3 `--side` px, each class a different photo under random crops and flips), as JPEG and as PNG. For
each format, alternately with tl's decoding off (`min_side=None`: every file decoded whole, every epoch, as tl did
before) and on (`tl.data.images.decode`: JPEG DCT scaling, a resize to what the transform needs, the reduced picture
kept per loader process), it times:
- the scan (`ImageFolderSource.load`: every file checked once; JPEGs at 1/8 scale, in threads, when on);
- `--epochs` training epochs of the loader alone (the `small_different` preset's transform: 224 px, strong
  augmentation; the data module's default loader processes), images/s.
Prints one line per format and the ratios; `--json` writes them.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def make_folder(root: Path, suffix: str, side: int, per_class: int, seed: int = 0) -> Path:
    from skimage import data

    if (root / ".done").is_file():
        return root
    rng = np.random.default_rng(seed)
    size = (side, side * 2 // 3)
    for name in PHOTOS:
        photo = Image.fromarray(getattr(data, name)()).convert("RGB")
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = photo.size
            f = rng.uniform(0.7, 1.0)
            x, y = rng.integers(0, int(w * (1 - f)) + 1), rng.integers(0, int(h * (1 - f)) + 1)
            img = photo.crop((x, y, x + int(w * f), y + int(h * f))).resize(size, Image.BICUBIC)
            if rng.random() < 0.5:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
            img.save(root / name / f"{i:03d}{suffix}", **({"quality": 92} if suffix == ".jpg" else {}))
    (root / ".done").write_text("")
    return root


def timed(root: Path, decoding: bool, epochs: int) -> tuple[float, float]:
    """(scan seconds, loader images/s over `epochs`) with tl's decoding on or off."""
    from omegaconf import OmegaConf

    import tl.data.datamodule as dm
    import tl.data.sources as sources
    from tl.data.transforms import backbone_preprocess

    sources._READABLE.clear()
    original = (sources._readable_all, dm.decode)
    if not decoding:  # the path before: every file decoded whole, one at a time, every epoch

        def whole(files):
            return [f.suffix.lower() in sources.IMAGE_EXTENSIONS and _load_whole(f) for f in files]

        sources._readable_all = whole
        dm.decode = lambda path, min_side=None, interpolation="bicubic": (_open_whole(path), False)
    try:
        started = time.perf_counter()
        source = sources.ImageFolderSource(root)
        source.load()
        scan = time.perf_counter() - started
        augment = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "augment" / "strong.yaml"))
        datamodule = dm.TransferDataModule(source, backbone_preprocess("efficientnet_lite0"), augment=augment,
                                           batch_size=16, seed=0)
        datamodule.setup("fit")
        loader = datamodule.train_dataloader()
        started, seen = time.perf_counter(), 0
        for _ in range(epochs):
            for batch in loader:
                seen += len(batch[1])
        return scan, seen / (time.perf_counter() - started)
    finally:
        sources._readable_all, dm.decode = original


def _load_whole(path: Path) -> bool:
    with Image.open(path) as img:
        img.load()
    return True


def _open_whole(path) -> Image.Image:
    from tl.data.images import to_rgb

    with Image.open(path) as f:
        return to_rgb(f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_large"))
    parser.add_argument("--side", type=int, default=3000)
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    from benchlib import load_average, machine, write_report

    report = {"machine": machine(), "side": args.side, "per_class": args.per_class, "epochs": args.epochs,
              "formats": {}}
    for suffix in (".jpg", ".png"):
        root = make_folder(args.work / f"{suffix[1:]}_{args.side}", suffix, args.side, args.per_class)
        runs = {"off": [], "on": []}
        for _ in range(args.repeats):  # alternated: the machine's load drifts
            for mode in ("off", "on"):
                runs[mode].append(timed(root, mode == "on", args.epochs))
        med = {m: (float(np.median([r[0] for r in v])), float(np.median([r[1] for r in v]))) for m, v in runs.items()}
        report["formats"][suffix] = {"runs": runs, "scan_s": {m: round(v[0], 2) for m, v in med.items()},
                                     "loader_img_s": {m: round(v[1], 2) for m, v in med.items()}}
        print(f"{suffix[1:].upper()} {args.side} px, {4 * args.per_class} files: scan {med['off'][0]:.1f} s -> "
              f"{med['on'][0]:.1f} s ({med['off'][0] / med['on'][0]:.1f}x); loader {med['off'][1]:.1f} -> "
              f"{med['on'][1]:.1f} images/s ({med['on'][1] / med['off'][1]:.1f}x), medians of {args.repeats}",
              flush=True)
    report["load_average"] = load_average()
    write_report(args.json, report)


if __name__ == "__main__":
    main()
