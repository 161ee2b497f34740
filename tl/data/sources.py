"""Where images come from.

A source loads a whole dataset into an `ImageSet`: class names, integer targets, and either the images themselves
(uint8 tensors, for small datasets held in memory), file paths (decoded lazily by the dataset), or a store of LitData
shards read by index (`tl.data.shards`, written by `python -m tl.shard`). A source may also
say which examples belong to given splits (an image folder's train/val/test, a torchvision dataset's train/test).
Splitting, subsetting and transforms happen elsewhere (`tl.data.splits`, `tl.data.datamodule`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from tl.data.images import IMAGE_EXTENSIONS, JUNK_NAMES, to_rgb
from tl.errors import TLError
from tl.utils import file_identity

log = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "val", "test")
# Split folder names other tools write (Kaggle, Roboflow, ...), matched in any case.
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "test": "test", "testing": "test"}


@dataclass
class ImageSet:
    """A labelled image collection: exactly one of `images` (uint8, N x C x H x W), `paths` or `store` (a
    `tl.data.shards.ShardStore`) is set."""

    classes: list[str]
    targets: np.ndarray
    images: torch.Tensor | None = None
    paths: list[str] | None = None
    given_splits: dict[str, np.ndarray] = field(default_factory=dict)  # split name -> indices
    skipped_files: list[str] = field(default_factory=list)  # image files that do not decode
    # files left out: names that are not images' (notes.txt), and images outside every class folder
    ignored_files: list[str] = field(default_factory=list)
    store: Any = None

    def __len__(self) -> int:
        return len(self.targets)


class DigitsSource:
    """scikit-learn's bundled handwritten digits: 1,797 8x8 grayscale images, 10 classes, no download."""

    def load(self) -> ImageSet:
        from sklearn.datasets import load_digits

        digits = load_digits()
        # Pixel values are counts 0..16; scale to the full uint8 range like any other image.
        images = torch.from_numpy(np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
        return ImageSet(classes=[str(c) for c in digits.target_names], targets=digits.target.astype(np.int64),
                        images=images)


class SyntheticSource:
    """Procedurally generated, class-separable colour images for tests and smoke runs (deterministic per seed).

    Each class is an oriented sinusoidal grating with its own frequency and colour; examples vary in phase and noise.
    """

    def __init__(self, num_classes: int = 4, samples_per_class: int = 30, image_size: int = 32, seed: int = 0):
        if num_classes < 2:
            raise TLError(f"data.source.num_classes={num_classes}: a classifier needs at least 2 classes")
        self.num_classes, self.samples_per_class, self.image_size, self.seed = (
            num_classes, samples_per_class, image_size, seed)

    def load(self) -> ImageSet:
        g = torch.Generator().manual_seed(self.seed)
        n, s = self.samples_per_class, self.image_size
        yy, xx = torch.meshgrid(torch.linspace(0, 1, s), torch.linspace(0, 1, s), indexing="ij")
        images, targets = [], []
        for c in range(self.num_classes):
            angle = np.pi * c / self.num_classes
            freq = 2.0 + 2.0 * (c % 3)
            colour = torch.tensor([(c * 0.37) % 1, (c * 0.61 + 0.3) % 1, (c * 0.83 + 0.6) % 1]).view(3, 1, 1)
            phase = torch.rand(n, generator=g) * 2 * np.pi
            wave = torch.sin(2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy)[None] + phase.view(n, 1, 1))
            img = 0.5 + 0.35 * wave[:, None] * (0.5 + colour) + 0.08 * torch.randn(n, 3, s, s, generator=g)
            images.append((img.clamp(0, 1) * 255).to(torch.uint8))
            targets.append(np.full(n, c, dtype=np.int64))
        return ImageSet(classes=[f"class_{c}" for c in range(self.num_classes)], targets=np.concatenate(targets),
                        images=torch.cat(images))


# Verdicts of _is_readable_image by path and identity (size, mtime, ctime, inode): a process that loads the same
# folder twice (scenario=auto measures before the run trains) decodes each file once; a changed file gets a new key.
_READABLE: dict[tuple[str, str], bool] = {}
_WHY: dict[str, str] = {}  # why a file was found unreadable (for the messages)
# Above this size a PNG is checked by its chunks' CRCs and by inflating its compressed stream, not decoded into
# pixels: a truncated, damaged or garbled file fails one or the other, without a full-size pixel buffer per thread
# (the loader decodes it again anyway). A 3000x2000 PNG on the 2-core CPU: CRCs 0.008 s, inflating 0.11 s, a full
# decode 0.14 s (the CRCs alone had missed a garbled stream whose CRCs were recomputed).
LARGE_PNG_PIXELS = 4_000_000


def _is_readable_image(path: Path) -> bool:
    """True when PIL can identify and fully decode the file (catches truncated and non-image files)."""
    try:
        st = path.stat()
    except OSError:  # a broken symlink, or gone since the listing
        return False
    key = (str(path), file_identity(st))
    if key not in _READABLE:
        try:
            with Image.open(path) as img:
                if img.format == "PNG" and img.width * img.height > LARGE_PNG_PIXELS:
                    img.verify()  # every chunk read and its CRC checked
                    _inflate_png(path)  # and its compressed stream inflated (a garbled one can carry good CRCs)
                else:
                    if img.format == "JPEG":  # decoding at 1/8 scale still reads (and checks) the whole stream
                        img.draft(None, (1, 1))
                    img.load()
            _READABLE[key] = True
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            _READABLE[key] = False
            _WHY[str(path)] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:100]}"
    return _READABLE[key]


def _inflate_png(path: Path, window: int = 1 << 20) -> None:
    """Inflate a PNG's image data (its IDAT chunks' zlib stream), discarding the output a megabyte at a time: a
    stream garbled where its CRCs were recomputed passes `verify` but not zlib (found by a hostile tester: such a
    3000x2000 PNG was scanned as readable and stored by tl.shard). OSError if the stream is broken or cut short.
    No unfiltering and no pixel buffer (most of a decode's time is the inflating, though)."""
    import struct
    import zlib

    inflater = zlib.decompressobj()
    with open(path, "rb") as f:
        f.seek(8)  # the signature, checked by PIL
        while True:
            head = f.read(8)
            if len(head) < 8:
                raise OSError("PNG ends before its IEND chunk")
            length, kind = struct.unpack(">I4s", head)
            if kind == b"IEND":
                break
            data = f.read(length)
            f.seek(4, os.SEEK_CUR)  # the CRC, checked by verify()
            if kind != b"IDAT":
                continue
            try:
                inflater.decompress(data, window)
                while inflater.unconsumed_tail:
                    inflater.decompress(inflater.unconsumed_tail, window)
            except zlib.error as e:
                raise OSError(f"broken PNG data stream ({e})") from None
    if not inflater.eof:
        raise OSError("PNG data stream cut short")


def unreadable_examples(bad: list[str], n: int = 3) -> str:
    """The first `n` unreadable files, each with why it was refused (a truncated file, a decompression bomb...)."""
    return ", ".join(f"{b!r} ({_WHY[b]})" if b in _WHY else repr(b) for b in bad[:n])


def _readable_all(files: list[Path]) -> list[bool]:
    """`_is_readable_image` for each of `files` with an image extension (False for the others), decoded in threads
    (PIL releases the GIL while decoding: a folder of large photos is checked on every core)."""
    candidates = [f for f in files if f.suffix.lower() in IMAGE_EXTENSIONS]
    if len(candidates) < 8:
        verdicts = dict(zip(candidates, map(_is_readable_image, candidates), strict=True))
    else:
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            verdicts = dict(zip(candidates, pool.map(_is_readable_image, candidates), strict=True))
    return [verdicts.get(f, False) for f in files]


def _is_regular(path: Path) -> bool:
    """A regular file, or a link to one (not a pipe, socket or device, which would block or never end)."""
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except OSError:
        return False


def walk_once(root):
    """`os.walk(root)` following links to folders, each real folder once (a link loop ends there); the caller may
    prune or order `dirs` in place, as with os.walk."""
    seen: set[str] = set()
    for top, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        yield top, dirs, files


def _walk_files(folder: Path, root: Path | None = None) -> list[Path]:
    """Every non-directory entry under `folder`, recursively and sorted (`walk_once`), leaving out hidden entries and
    OS junk (.DS_Store, .ipynb_checkpoints/, Thumbs.db, __MACOSX/). With `root` (data.root): a link inside `folder` to
    a folder elsewhere in `root`, to `root` or to a folder above it is refused; following it would read other
    classes' or splits' images (or every image) again under this class."""
    out = []
    real_root = root.resolve() if root is not None else None
    real_folder = folder.resolve()
    for top, dirs, files in walk_once(folder):
        dirs[:] = sorted(d for d in dirs if not _ignored_name(d))
        if real_root is not None:
            for d in dirs:
                link = Path(top) / d
                if not link.is_symlink():
                    continue
                target = link.resolve()
                if target == real_folder or real_folder in target.parents:
                    continue  # within the class folder itself: each real folder is read once (walk_once)
                if target == real_root or target in real_root.parents or real_root in target.parents:
                    raise TLError(f"folder {str(link)!r} links to {str(target)!r}, "
                                  + ("inside data.root" if real_root in target.parents else "data.root or above")
                                  + f": its images would count again under class {folder.name!r}; remove the link")
        out += [Path(top) / f for f in files if not _ignored_name(f)]
    return sorted(out)


def _ignored_name(name: str) -> bool:
    """Hidden files and folders, and what operating systems leave in image folders (JUNK_NAMES)."""
    return name.startswith(".") or name.lower() in JUNK_NAMES


class ImageFolderSource:
    """Images on disk: `root/<class>/*.png|jpg...`, or `root/train/<class>/...` with optional `root/val`, `root/test`.

    Every file is checked once up front; unreadable files are skipped and reported (`on_bad_file=skip`) or stop the
    run before training (`on_bad_file=error`).
    """

    def __init__(self, root: str | Path, on_bad_file: str = "skip", exclude: list | tuple = (), layout: str = "auto"):
        """`exclude`: folders that are never data (tl's own run and cache folders, when data.root holds them).
        `layout`: auto (train/ val/ test/ folders, or their aliases, are splits; else every folder is a class),
        classes (every folder is a class: a quality-control set with classes `valid/` and `invalid/`) or splits."""
        if on_bad_file not in ("skip", "error"):
            raise TLError(f"data.on_bad_file={on_bad_file!r}: use skip or error")
        if layout not in ("auto", "classes", "splits"):
            raise TLError(f"data.layout={layout!r} is invalid: use auto, classes (every folder under data.root is a "
                          "class) or splits (data.root/train/<class>/..., optional val/ and test/)")
        self.layout = layout
        if root is None or not str(root).strip():
            raise TLError("data.root is empty: set it to a folder of class subfolders, e.g. data.root=DIR")
        self.root = Path(root).expanduser()
        self.on_bad_file = on_bad_file
        self.exclude = [Path(e).expanduser().resolve() for e in (exclude or ()) if e]
        self._left_out: set[Path] = set()

    def _split_dirs(self) -> dict[str, Path]:
        """The split folders under data.root, by tl's split name: train/ val/ test/, in any case, and the names other
        tools use (valid/, validation/, training/, testing/)."""
        found: dict[str, list[Path]] = {}
        if self.layout == "classes":
            return {}
        for d in sorted(p for p in self.root.iterdir() if p.is_dir() and not _ignored_name(p.name)):
            split = SPLIT_ALIASES.get(d.name.lower())
            if split:
                found.setdefault(split, []).append(d)
        for split, dirs in found.items():
            if len(dirs) > 1:
                raise TLError(f"data.root={str(self.root)!r} has {' and '.join(d.name + '/' for d in dirs)}: both "
                              f"would be the {split} split; merge them or rename one")
        return {s: dirs[0] for s, dirs in found.items()}

    def _class_dirs(self, folder: Path) -> list[Path]:
        dirs = []
        for p in sorted(p for p in folder.iterdir() if p.is_dir() and not _ignored_name(p.name)):
            target = p.resolve()
            ours = any(e == target or target in e.parents for e in self.exclude)
            if ours and _holds_images(p):  # the run's output put into a class folder: the class would vanish
                raise TLError(f"the run's output or feature cache (hydra.run.dir, paths.cache_dir) is inside class "
                              f"folder {str(p)!r}, which holds images: that class would be left out of the data; "
                              "write the run outside data.root")
            if ours or (p / ".hydra").is_dir():
                if p not in self._left_out:
                    self._left_out.add(p)
                    log.warning("Left out %s: it holds this run's output or its feature cache, not data", p)
                continue
            dirs.append(p)
        root = self.root.resolve()
        for d in dirs:  # a link to data.root or above would make a class of every image (and loop)
            target = d.resolve()
            if target == root or target in root.parents or target == folder.resolve():
                raise TLError(f"class folder {str(d)!r} links back to {str(target)!r}: it would hold every image "
                              "again as one more class; remove the link")
        return dirs

    def load(self) -> ImageSet:
        root = self.root
        if not root.is_dir():
            raise TLError(f"data.root={str(root)!r} does not exist or is not a folder: point data.root at a folder of "
                          "class subfolders (DIR/<class>/*.jpg) or of train/ val/ test/ splits")
        split_dirs = self._split_dirs()
        if (split_dirs or self.layout == "splits") and "train" not in split_dirs:
            have = f"has {'/'.join(d.name for d in split_dirs.values())}/ but" if split_dirs else "has"
            raise TLError(f"data.root={str(root)!r} {have} no train/ folder: add {root / 'train'}/<class>/..."
                          + ("" if self.layout == "splits" else ", or, if those are class folders (valid/ and "
                             "invalid/ in a quality-control set), add data.layout=classes"))
        layout = split_dirs if split_dirs else {None: root}
        if split_dirs:  # a class folder left beside train/ would be silently left out of every split
            for d in self._class_dirs(root):
                if d not in split_dirs.values() and any(f.suffix.lower() in IMAGE_EXTENSIONS for f in d.iterdir()):
                    raise TLError(f"folder {str(d)!r} holds images beside {split_dirs['train']}/: with train/ val/ "
                                  f"test/ folders, classes are read from {split_dirs['train']}/<class>/ only; move it "
                                  "under train/ (or val/, test/) or out of data.root; or, if every folder there is a "
                                  "class (valid/ and invalid/), add data.layout=classes")
        classes = [p.name for p in self._class_dirs(layout.get("train", root))]
        if not classes and (root / "manifest.json").is_file() and (root / ".tl-shards").exists():
            raise TLError(f"data.root={str(root)!r} is a tl shard dataset (made by python -m tl.shard), not a folder "
                          f"of class folders: train on it with data=shards data.root={root}")
        if not classes:
            raise TLError(f"data.root={str(root)!r} has no class folders: expected {root}/<class>/*.jpg "
                          f"(or {root}/train/<class>/...)")
        for name in classes:  # a name that is not UTF-8 cannot reach model.json, TensorBoard or a CSV intact
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:
                raise TLError(f"class folder {name!r} under {str(layout.get('train', root))!r} has a name that is not "
                              "valid UTF-8 (a zip from another system?): rename it, e.g. with convmv -f latin1 -t "
                              "utf8 -r --notest DIR") from None
        seen: dict[str, str] = {}
        for name in classes:  # café written two ways (macOS writes NFD): two classes that read as one name
            key = unicodedata.normalize("NFC", name)  # (letter case is kept apart: 'a' and 'A' can be two classes)
            if key in seen:
                raise TLError(f"class folders {seen[key]!r} and {name!r} differ only in Unicode form: they would be "
                              "two classes shown under one name; merge them into one folder")
            seen[key] = name
        index = {c: i for i, c in enumerate(classes)}

        paths, targets, split_of, bad, ignored = [], [], [], [], []
        for split, folder in layout.items():
            for class_dir in self._class_dirs(folder):
                if class_dir.name not in index:
                    raise TLError(f"class folder {str(class_dir)!r} is not among the train classes "
                                  f"({', '.join(classes)}): rename it or add it to train/")
                files, special, others = [], [], []
                for f in _walk_files(class_dir, self.root):
                    if f.suffix.lower() not in IMAGE_EXTENSIONS:
                        others.append(str(f))
                    elif _is_regular(f):
                        files.append(f)
                    else:  # a dangling link, a pipe or a device named like an image: never opened (a pipe blocks)
                        special.append(str(f))
                ignored += others
                subfolders = sorted({f.relative_to(class_dir).parts[0] for f in files if f.parent != class_dir})
                if len(subfolders) > 1 and all(f.parent != class_dir for f in files):
                    log.warning("Class folder %s holds its images only in subfolders (%s): they are all one class "
                                "here; to tell them apart, point data.root at %s", class_dir,
                                ", ".join(subfolders[:5]) + (", ..." if len(subfolders) > 5 else ""), class_dir)
                good = []
                for f, ok in zip(files, _readable_all(files), strict=True):
                    if ok:
                        good.append(f)
                    else:
                        bad.append(str(f))
                bad += special
                if not good and (split in (None, "train")):
                    found = (f"; its {len(others)} other file(s), e.g. {Path(others[0]).name!r}, are not in an image "
                             f"format tl reads: convert them to .jpg or .png" if others else "")
                    raise TLError(f"class folder {str(class_dir)!r} has no readable images{found}: add images "
                                  f"({', '.join(IMAGE_EXTENSIONS[:3])}, ...) or remove the folder")
                paths += [str(f) for f in good]
                targets += [index[class_dir.name]] * len(good)
                split_of += [split] * len(good)
        loose = self._loose_images(layout)
        if loose:  # found by a hostile tester: they were left out without a word
            log.warning("Left out %d image(s) outside every class folder, e.g. %s: an image is read only from "
                        "%s/<class>/; move them into their class's folder", len(loose), loose[:3],
                        layout.get("train", root) if split_dirs else root)
            ignored += loose
        if bad and self.on_bad_file == "error":
            raise TLError(f"{len(bad)} unreadable image file(s) under data.root, first: {unreadable_examples(bad, 1)}: "
                          "remove them or set data.on_bad_file=skip")
        if bad:
            log.warning("Skipped %d unreadable image file(s) under %s, e.g. %s", len(bad), root,
                        unreadable_examples(bad))
        if ignored:
            log.warning("Ignored %d file(s) under %s whose names are not images' (%s, ...), e.g. %s: an image saved "
                        "under another extension is used once renamed", len(ignored), root,
                        ", ".join(IMAGE_EXTENSIONS[:4]), ignored[:3])
        split_of = np.array(split_of, dtype=object)
        given = {s: np.flatnonzero(split_of == s) for s in split_dirs}
        for s, idx in given.items():
            if not len(idx):  # it would be scored on nothing: no model selection, or no test after the training
                raise TLError(f"{str(split_dirs[s])!r} holds no readable images: add images to its class folders, or "
                              f"remove it (the {s} split is then carved from train)")
        return ImageSet(classes=classes, targets=np.array(targets, dtype=np.int64), paths=paths,
                        given_splits=given, skipped_files=bad, ignored_files=ignored)


    def _loose_images(self, layout: dict) -> list[str]:
        """Image files directly in data.root or in a split folder, where no class folder holds them."""
        folders = {self.root, *layout.values()}
        return [str(f) for folder in sorted(folders) for f in sorted(folder.iterdir())
                if f.suffix.lower() in IMAGE_EXTENSIONS and not _ignored_name(f.name) and not f.is_dir()]


class TorchvisionSource:
    """A torchvision dataset class by name, e.g. `CIFAR10`, with keyword arguments per given split.

    `splits` maps tl's split names to the dataset's constructor arguments, e.g. `{train: {train: true}, test:
    {train: false}}`. Images are held in memory as uint8 tensors (they are decoded once, here).
    """

    def __init__(self, name: str, root: str | Path, splits: dict[str, dict], download: bool = True):
        import torchvision.datasets as tvd

        if not hasattr(tvd, name):
            raise TLError(f"data.source.name={name!r} is not a torchvision dataset: see torchvision.datasets")
        self.cls, self.name = getattr(tvd, name), name
        self.root, self.splits, self.download = Path(root).expanduser(), splits, download

    def _open(self, split_kwargs: dict):
        before = set(_missing_dirs(self.root))
        try:
            return self.cls(root=str(self.root), download=self.download, **split_kwargs)
        except (OSError, RuntimeError) as e:  # URLError is an OSError; torchvision raises RuntimeError if not found
            _remove_empty(before, self.root)  # a failed download leaves no empty folders behind
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise TLError(f"could not load or download torchvision {self.name} into data.root={str(self.root)!r} "
                          f"({first}): without internet, place its files there in torchvision's layout, or use "
                          "data=imagefolder data.root=DIR") from e

    def load(self) -> ImageSet:
        from torchvision.transforms.v2.functional import pil_to_tensor

        images, targets, given, classes = [], [], {}, None
        for split, kwargs in self.splits.items():
            ds = self._open(dict(kwargs))
            start = sum(len(t) for t in targets)
            xs, ys = [], []
            for img, y in ds:  # decode once; datasets are (PIL image, int) pairs
                xs.append(pil_to_tensor(to_rgb(img)))
                ys.append(int(y))
            sizes = {tuple(x.shape) for x in xs}
            if len(sizes) > 1:  # variable-size images (Flowers, Pets, DTD): bring to one size once, keep aspect
                xs = [_resize_short_center(x, 256) for x in xs]
            images.append(torch.stack(xs))
            targets.append(np.array(ys, dtype=np.int64))
            given[split] = np.arange(start, start + len(ys))
            classes = classes or list(getattr(ds, "classes", [])) or [str(c) for c in sorted(set(ys))]
        return ImageSet(classes=[str(c) for c in classes], targets=np.concatenate(targets), images=torch.cat(images),
                        given_splits=given)


def _holds_images(folder: Path) -> bool:
    """Does `folder` itself (not its subfolders) hold a file named as an image?"""
    try:
        return any(f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file() for f in folder.iterdir())
    except OSError:
        return False


def _missing_dirs(root: Path) -> list[Path]:
    """`root` and those of its parents that do not exist yet, deepest first."""
    missing, p = [], root.absolute()
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    return missing


def _remove_empty(created: set[Path], root: Path) -> None:
    """Remove the folders a failed download made (those in `created`, and empty folders it made under `root`)."""
    if root.absolute() not in created:
        return  # root existed: what is inside may be the user's
    for d in sorted((p for p in root.absolute().rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        with contextlib.suppress(OSError):
            d.rmdir()  # only empty ones
    for d in sorted(created, key=lambda p: -len(p.parts)):
        with contextlib.suppress(OSError):
            d.rmdir()


def _resize_short_center(x: torch.Tensor, size: int) -> torch.Tensor:
    from torchvision.transforms.v2.functional import center_crop, resize

    return center_crop(resize(x, size, antialias=True), [size, size])
