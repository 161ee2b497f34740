"""Write scikit-learn's digits as an image folder (DIR/<class>/*.png): a ready example for `data=imagefolder`.

    python scripts/export_digits.py /tmp/digits_png [--split]

With --split the folder gets train/ and test/ subfolders (a fixed 80/20 stratified split), the other layout that
`data=imagefolder` reads.
"""

from __future__ import annotations

import argparse
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

    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    idx = np.arange(len(images))
    parts = {"": idx}
    if args.split:
        train, test = train_test_split(idx, test_size=0.2, stratify=digits.target, random_state=0)
        parts = {"train": train, "test": test}
    for part, members in parts.items():
        for i in members:
            folder = args.out / part / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i], mode="L").save(folder / f"{i:04d}.png")
    print(f"wrote {len(images)} images to {args.out}")


if __name__ == "__main__":
    main()
