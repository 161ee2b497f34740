"""Write scikit-learn's digits as an image folder (DIR/<class>/*.png): a ready example for `data=imagefolder`.

    python scripts/export_digits.py /tmp/digits_png [--split]

With --split the folder gets train/ and test/ subfolders (a fixed 80/20 stratified split), the other layout that
`data=imagefolder` reads. DIR must be new or empty: the images are written beside it first and moved into place
whole, so a failure (a full disk, Ctrl-C) leaves nothing half-written, and nothing already there is overwritten.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--split", action="store_true", help="write train/ and test/ subfolders")
    args = parser.parse_args()

    out = args.out.expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        sys.exit(f"export_digits: error: {str(out)!r} exists and is not an empty folder: its files would be "
                 "overwritten or mixed with the digits; give a new or empty folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as e:
        sys.exit(f"export_digits: error: cannot write beside {str(out)!r} ({e.strerror or e}): give a writable folder")
    try:
        write(work, args.split)
        os.replace(work, out)  # onto nothing or an empty folder: atomic
    except OSError as e:
        sys.exit(f"export_digits: error: could not write {str(out)!r} ({e.strerror or e}); nothing was written")
    except KeyboardInterrupt:
        print("export_digits: interrupted: nothing was written", file=sys.stderr)
        sys.exit(130)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {len(load_digits().target)} images to {out}")


def write(out: Path, split: bool) -> None:
    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    idx = np.arange(len(images))
    parts = {"": idx}
    if split:
        train, test = train_test_split(idx, test_size=0.2, stratify=digits.target, random_state=0)
        parts = {"train": train, "test": test}
    for part, members in parts.items():
        for i in members:
            folder = out / part / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i], mode="L").save(folder / f"{i:04d}.png")


if __name__ == "__main__":
    main()
