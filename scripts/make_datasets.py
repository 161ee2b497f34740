"""Build small, real-image classification datasets as image folders, offline and deterministically.

    python scripts/make_datasets.py --out /tmp/tl_datasets [--datasets fonts photo_patches textures]
                                    [--per-class N] [--seed S] [--font-dir DIR ...] [--list-fonts]
    python -m tl.train data=imagefolder data.root=/tmp/tl_datasets/photo_patches

Nothing is downloaded: every pixel comes from image or font files already installed with the project's dependencies
(matplotlib, scikit-learn, scikit-image) or with the operating system. Each dataset is written as
`OUT/<dataset>/{train,val,test}/<class>/<NNNN>.png`, the split layout `data=imagefolder` reads, so the given val and
test splits are kept as they are, and a `manifest.csv` next to the split folders records where every image came
from (font and jitter, or source photo and crop box). Splits never share a source: train, val and test use disjoint
fonts (fonts) or disjoint regions of each photo (photo_patches, textures), so a test image is never a near-copy of a
training image. `--per-class N` is the number of images per class over all three splits (about 60/20/20). The same
`--seed` on the same machine writes the same bytes (PNG files carry no metadata or timestamps); `fonts` also depends on
which fonts the machine has, so its classes are fixed but its fonts, and so its images, may differ between machines.

Datasets
--------
fonts (default 100 per class; 16 classes; 32x32 grayscale, dark glyph on white): the characters 0-9 A B E H K R,
    each image rendered with PIL's FreeType from a real font file found on the machine: matplotlib's bundled fonts
    (`matplotlib.get_data_path()/fonts/ttf`: DejaVu, STIX, Computer Modern), fonts under /usr/share/fonts,
    /usr/local/share/fonts, ~/.fonts, ~/.local/share/fonts, any *.ttf/*.otf/*.ttc another installed Python package
    ships in site-packages, and `--font-dir`. A font is kept only if its character map has every class character, it
    is not a symbol-encoded font, no glyph renders empty or as the font's .notdef (tofu), the class glyphs are all
    different (Last Resort draws one box per Unicode block), and most glyphs look like the character (nearest match
    among reference renders from matplotlib's DejaVu Sans/Serif/Mono): this drops symbol and math-extension fonts
    such as cmsy10, cmex10, STIXSize*, STIXNonUnicode*. Fonts with the same full name or the same renders count once.
    Each image uses another font (cycling through the split's fonts in a seeded order) with a seeded rotation of up
    to 12 degrees, a scale of 0.8-1.1 and an offset of up to 2 px. Fonts are split between train/val/test (60/20/20,
    seeded), so the test set measures recognition of unseen typefaces. Domain: rendered glyphs, far from ImageNet.
    Licences: DejaVu fonts, Bitstream Vera licence (DejaVu changes public domain); STIX fonts, SIL Open Font Licence
    1.1; matplotlib's Computer Modern (cm*.ttf), BaKoMa Fonts Licence; see matplotlib's LICENSE_DEJAVU,
    LICENSE_STIX and its dist-info LICENSE. Other fonts on a machine carry their own licences.
photo_patches (default 100 per class; 6 classes; 64x64 RGB): square crops of side 48-96 px (at most the band's
    width) at seeded positions, resized to 64x64, cut from six real colour photographs; the class is the photograph.
    Each photo is divided along its longer side into three bands: the first 60% feeds train, the next 20% val, the
    last 20% test, and every crop lies inside its split's band, so no two crops of different splits share a pixel
    (the crop boxes are in manifest.csv). Test patches thus show other parts of the scene than training patches.
    Domain: natural photos, close to ImageNet. Sources and licences: scikit-image's `skimage.data` astronaut (Eileen
    Collins, NASA; public domain), chelsea (a cat; CC0, Stefan van der Walt), coffee (CC0, Rachel Michetti), rocket
    (DSCOVR launch on Falcon 9, SpaceX; released into the public domain); scikit-learn's `load_sample_images`
    china.jpg (Flickr user danielbuechele) and flower.jpg (Flickr user vultilion, per the link in scikit-learn's
    description, which names danielbuechele for both), both CC BY 2.0, so patches of china and flower need that
    attribution when shared.
textures (default 200 per class; 3 classes; 32x32 grayscale): square crops of side 32-64 px downsampled to 32x32 from
    scikit-image's grayscale texture photographs brick (CC0Textures Bricks25), grass (DeviantArt linolafett Grass-01)
    and gravel (CC0Textures Gravel04), all CC0; the same 60/20/20 band split as photo_patches. Domain: low-resolution
    grayscale texture recognition (like DTD, smaller), unlike ImageNet's object photos.

Left out on purpose: scikit-image's synthetic images (checkerboard, logo, clock, ...), its microscopy and medical
images, grayscale photos (camera, coins, moon: mixing them with colour photos would make colour a class cue), and
images without a stated licence (moon, stereo_motorcycle, lfw_subset). Images that scikit-image fetches on demand
(eagle, ...) are not used, as they need a download.

`build(name, out, per_class, seed)` builds one dataset and returns a `Built` record (classes, counts, the manifest
rows); tests load this file with importlib.
"""

from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import os
import shutil
import signal
import site
import sys
import sysconfig
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont, ImageOps

SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = {"train": 0.6, "val": 0.2, "test": 0.2}

FONT_CHARS = "0123456789ABEHKR"
FONT_IMAGE_SIZE = 32
FONT_RENDER_PX = 64  # glyphs are drawn at this size, then rotated and shrunk to the image size
FONT_EXTENSIONS = (".ttf", ".otf", ".ttc", ".woff", ".woff2")
FONT_MIN_MATCH = 0.75  # a font must have this fraction of class glyphs closest to the same character's reference
REFERENCE_FONTS = ("DejaVuSans.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Italic.ttf",
                   "DejaVuSansMono.ttf")


@dataclass
class Built:
    """What `build` wrote: one row per image in `records` (also written to manifest.csv)."""

    name: str
    root: Path
    classes: list[str]
    image_size: tuple[int, int]
    mode: str
    records: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    notes: str = ""

    def count(self, split: str | None = None, cls: str | None = None) -> int:
        return sum(1 for r in self.records if split in (None, r["split"]) and cls in (None, r["class"]))

    def summary(self) -> str:
        splits = " / ".join(f"{s} {self.count(s)}" for s in SPLITS)
        w, h = self.image_size
        notes = f", {self.notes}" if self.notes else ""
        return (f"{self.name}: {len(self.classes)} classes, {len(self.records)} images ({splits}), {w}x{h} "
                f"{self.mode}{notes}, {self.seconds:.1f} s -> {self.root}")


def split_counts(per_class: int) -> dict[str, int]:
    """Images per class in each split: 60/20/20, at least one in each."""
    if per_class < 3:
        raise ValueError(f"--per-class {per_class}: need at least 3 (one image per class in train, val and test)")
    val = max(1, round(SPLIT_FRACTIONS["val"] * per_class))
    test = max(1, round(SPLIT_FRACTIONS["test"] * per_class))
    return {"train": per_class - val - test, "val": val, "test": test}


def _rng(name: str, seed: int, *extra: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode()), *extra])


def _save_png(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")  # no pnginfo: no text chunks, no timestamps, same bytes every run


# ----------------------------------------------------------------------------------------------------------- fonts


@dataclass(frozen=True)
class Font:
    name: str  # the font's full name (name table ID 4)
    path: str
    index: int = 0  # face index inside a .ttc collection

    @property
    def file(self) -> str:
        return os.path.basename(self.path)


def font_search_dirs(extra: tuple[str, ...] = ()) -> list[Path]:
    import matplotlib

    dirs = [Path(matplotlib.get_data_path()) / "fonts", Path("/usr/share/fonts"), Path("/usr/local/share/fonts"),
            Path.home() / ".fonts", Path.home() / ".local/share/fonts"]
    dirs += [Path(p) for p in site.getsitepackages()]
    if site.ENABLE_USER_SITE:
        dirs.append(Path(site.getusersitepackages()))
    dirs += [Path(sysconfig.get_paths()[k]) for k in ("purelib", "platlib")]
    dirs += [Path(p).expanduser() for p in extra]
    out, seen = [], set()
    for d in dirs:
        if d.is_dir() and d.resolve() not in seen:
            seen.add(d.resolve())
            out.append(d)
    return out


def find_font_files(extra: tuple[str, ...] = ()) -> list[str]:
    """Every font file under the search folders, by resolved path, sorted."""
    found = set()
    for root in font_search_dirs(extra):
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d != "__pycache__" and not d.startswith(".")]
            for f in filenames:
                if f.lower().endswith(FONT_EXTENSIONS):
                    found.add(os.path.realpath(os.path.join(dirpath, f)))
    return sorted(found)


def _glyph(font: ImageFont.FreeTypeFont, ch: str) -> Image.Image | None:
    """The glyph's ink (255 on 0), cropped to its bounding box; None when nothing is drawn."""
    left, top, right, bottom = font.getbbox(ch)
    pad = 4
    canvas = Image.new("L", (max(1, right - left) + 2 * pad, max(1, bottom - top) + 2 * pad), 0)
    ImageDraw.Draw(canvas).text((pad - left, pad - top), ch, font=font, fill=255)
    box = canvas.getbbox()
    return canvas.crop(box) if box else None


def _shape_vector(glyph: Image.Image, n: int = 24) -> np.ndarray:
    """A size- and position-free, slightly blurred, unit-norm view of a glyph's shape, for comparing glyphs."""
    w, h = glyph.size
    side = max(w, h)
    square = Image.new("L", (side, side), 0)
    square.paste(glyph, ((side - w) // 2, (side - h) // 2))
    a = np.asarray(square.resize((n, n), Image.BILINEAR).filter(ImageFilter.GaussianBlur(1.5)), dtype=np.float64)
    a = a.ravel() - a.mean()
    return a / (np.linalg.norm(a) + 1e-9)


@functools.cache
def _reference_shapes() -> np.ndarray:
    """(references, classes, features): how matplotlib's DejaVu faces draw each class character."""
    import matplotlib

    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    refs = []
    for f in REFERENCE_FONTS:
        font = ImageFont.truetype(str(folder / f), FONT_RENDER_PX)
        refs.append(np.stack([_shape_vector(_glyph(font, ch)) for ch in FONT_CHARS]))
    return np.stack(refs)


def _check_font(path: str, index: int) -> tuple[Font | None, str, bytes]:
    """(Font, "", render digest) when the face draws every class character as that character; else (None, why, b"")."""
    from fontTools.ttLib import TTFont

    try:
        tt = TTFont(path, fontNumber=index, lazy=True)
        name = tt["name"].getDebugName(4) or os.path.basename(path)
        cmap_tables = tt["cmap"].tables
        cmap = tt.getBestCmap() or {}
    except Exception as e:  # any unreadable font file is skipped with its reason
        return None, f"unreadable by fontTools ({type(e).__name__})", b""
    if any(t.platformID == 3 and t.platEncID == 0 for t in cmap_tables):
        return None, "symbol-encoded font", b""
    missing = [ch for ch in FONT_CHARS if ord(ch) not in cmap]
    if missing:
        return None, f"no glyph for {''.join(missing)!r}", b""
    try:
        font = ImageFont.truetype(path, FONT_RENDER_PX, index=index)
        glyphs = [_glyph(font, ch) for ch in FONT_CHARS]
    except OSError as e:
        return None, f"unreadable by FreeType ({e})", b""
    if any(g is None for g in glyphs):
        return None, "a class glyph renders empty", b""
    absent = next((cp for cp in (0x10FFFD, 0xFFFF, 0xE000) if cp not in cmap), None)
    if absent is not None:
        tofu = _glyph(font, chr(absent))
        if tofu is not None and any(g.size == tofu.size and g.tobytes() == tofu.tobytes() for g in glyphs):
            return None, "a class glyph renders as .notdef (tofu)", b""
    shapes = np.stack([_shape_vector(g) for g in glyphs])
    same = shapes @ shapes.T - np.eye(len(FONT_CHARS)) * 2
    if same.max() > 0.995:
        return None, "two class characters render the same glyph", b""
    sim = np.einsum("cd,rkd->rck", shapes, _reference_shapes()).max(0)  # (class, reference class)
    match = float(np.mean(sim.argmax(1) == np.arange(len(FONT_CHARS))))
    if match < FONT_MIN_MATCH:
        return None, f"symbol font: only {match:.0%} of glyphs look like their character", b""
    digest = hashlib.sha1(b"".join(bytes(g.size) + g.tobytes() for g in glyphs)).digest()
    return Font(name=name, path=path, index=index), "", digest


def _faces(path: str) -> list[int]:
    if not path.lower().endswith(".ttc"):
        return [0]
    from fontTools.ttLib import TTCollection

    try:
        return list(range(len(TTCollection(path, lazy=True).fonts)))
    except Exception:  # not a readable collection: try its first face
        return [0]


@functools.cache
def usable_fonts(extra_dirs: tuple[str, ...] = ()) -> tuple[list[Font], list[tuple[str, str]]]:
    """(usable fonts sorted by name, [(file, why skipped)]). Duplicates (same full name or same renders) count once."""
    candidates, skipped = [], []
    for path in find_font_files(extra_dirs):
        with open(path, "rb") as fh:
            file_hash = hashlib.sha1(fh.read()).hexdigest()
        for index in _faces(path):
            font, why, digest = _check_font(path, index)
            label = f"{path}#{index}" if index else path
            if font is None:
                skipped.append((label, why))
            else:
                candidates.append((font.name, file_hash, index, font, digest, label))
    fonts, names, digests = [], set(), set()
    for name, _, _, font, digest, label in sorted(candidates, key=lambda c: c[:3]):  # order free of install paths
        if name in names or digest in digests:
            skipped.append((label, f"duplicate of {name!r}" if name in names else "renders like another font"))
            continue
        names.add(name)
        digests.add(digest)
        fonts.append(font)
    return fonts, sorted(skipped)


@functools.cache
def _freetype(path: str, index: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, FONT_RENDER_PX, index=index)


def render_char(font: Font, ch: str, angle: float, scale: float, dx: int, dy: int,
                size: int = FONT_IMAGE_SIZE) -> Image.Image:
    """`ch` in `font`, rotated by `angle` degrees, its longer side `scale` * 3/4 of `size`, shifted by (dx, dy)."""
    glyph = _glyph(_freetype(font.path, font.index), ch)
    glyph = glyph.rotate(angle, resample=Image.BICUBIC, expand=True, fillcolor=0)
    glyph = glyph.crop(glyph.getbbox())
    w, h = glyph.size
    k = scale * 0.75 * size / max(w, h)
    nw, nh = max(1, round(w * k)), max(1, round(h * k))
    glyph = glyph.resize((nw, nh), Image.LANCZOS)
    canvas = Image.new("L", (size, size), 0)
    canvas.paste(glyph, ((size - nw) // 2 + dx, (size - nh) // 2 + dy))
    return ImageOps.invert(canvas)  # dark ink on white paper


def split_fonts(fonts: list[Font], seed: int) -> dict[str, list[Font]]:
    """Disjoint train/val/test font sets (about 60/20/20, seeded)."""
    if len(fonts) < 3:
        raise RuntimeError(f"fonts: found {len(fonts)} usable font(s), need at least 3 (one per split): install fonts "
                           "or pass --font-dir DIR")
    order = [fonts[i] for i in _rng("fonts/split", seed).permutation(len(fonts))]
    n_val = max(1, round(SPLIT_FRACTIONS["val"] * len(fonts)))
    n_test = max(1, round(SPLIT_FRACTIONS["test"] * len(fonts)))
    parts = {"val": order[:n_val], "test": order[n_val:n_val + n_test], "train": order[n_val + n_test:]}
    return {s: sorted(parts[s], key=lambda f: f.name) for s in SPLITS}


def build_fonts(root: Path, per_class: int, seed: int, font_dirs: tuple[str, ...] = ()) -> Built:
    fonts, _ = usable_fonts(tuple(font_dirs))
    by_split = split_fonts(fonts, seed)
    counts = split_counts(per_class)
    classes = list(FONT_CHARS)
    built = Built("fonts", root, classes, (FONT_IMAGE_SIZE, FONT_IMAGE_SIZE), "L",
                  notes=f"{len(fonts)} fonts (" + "/".join(str(len(by_split[s])) for s in SPLITS) + " train/val/test)")
    for si, split in enumerate(SPLITS):
        pool = by_split[split]
        for ci, ch in enumerate(classes):
            rng = _rng("fonts", seed, si, ci)
            order = rng.permutation(len(pool))
            for k in range(counts[split]):
                if k and k % len(pool) == 0:
                    order = rng.permutation(len(pool))  # next round through the fonts, another order
                font = pool[order[k % len(pool)]]
                angle = round(float(rng.uniform(-12, 12)), 2)
                scale = round(float(rng.uniform(0.8, 1.1)), 3)
                dx, dy = (int(v) for v in rng.integers(-2, 3, size=2))
                rel = f"{split}/{ch}/{k:04d}.png"
                _save_png(render_char(font, ch, angle, scale, dx, dy), root / rel)
                built.records.append({"file": rel, "split": split, "class": ch, "source": font.name,
                                      "source_file": font.file, "angle": angle, "scale": scale, "dx": dx, "dy": dy})
    return built


# ------------------------------------------------------------------------------------------ photo and texture patches


def _photos() -> dict[str, Callable[[], np.ndarray]]:
    from skimage import data as sk
    from sklearn.datasets import load_sample_image

    return {"astronaut": sk.astronaut, "chelsea": sk.chelsea, "coffee": sk.coffee, "rocket": sk.rocket,
            "china": lambda: load_sample_image("china.jpg"), "flower": lambda: load_sample_image("flower.jpg")}


def _textures() -> dict[str, Callable[[], np.ndarray]]:
    from skimage import data as sk

    return {"brick": sk.brick, "grass": sk.grass, "gravel": sk.gravel}


def split_bands(height: int, width: int) -> dict[str, tuple[int, int, int, int]]:
    """Disjoint (x0, y0, x1, y1) regions per split: consecutive 60/20/20 bands along the image's longer side."""
    length = max(height, width)
    cuts = [0, round(0.6 * length), round(0.8 * length), length]
    bands = {}
    for i, split in enumerate(SPLITS):
        lo, hi = cuts[i], cuts[i + 1]
        bands[split] = (0, lo, width, hi) if height >= width else (lo, 0, hi, height)
    return bands


def _sample_box(rng: np.random.Generator, band: tuple[int, int, int, int], side: int) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = band
    side = min(side, x1 - x0, y1 - y0)
    x = int(rng.integers(x0, x1 - side + 1))
    y = int(rng.integers(y0, y1 - side + 1))
    return x, y, x + side, y + side


def build_patches(name: str, root: Path, per_class: int, seed: int, sources: dict[str, Callable[[], np.ndarray]],
                  size: int, scale: tuple[float, float], mode: str) -> Built:
    counts = split_counts(per_class)
    classes = sorted(sources)
    built = Built(name, root, classes, (size, size), mode)
    for ci, cls in enumerate(classes):
        photo = Image.fromarray(np.ascontiguousarray(sources[cls]())).convert(mode)
        bands = split_bands(photo.height, photo.width)
        for si, split in enumerate(SPLITS):
            rng = _rng(name, seed, ci, si)
            for k in range(counts[split]):
                box = _sample_box(rng, bands[split], round(size * float(rng.uniform(*scale))))
                patch = photo.crop(box)
                if patch.size != (size, size):
                    patch = patch.resize((size, size), Image.LANCZOS)
                rel = f"{split}/{cls}/{k:04d}.png"
                _save_png(patch, root / rel)
                built.records.append({"file": rel, "split": split, "class": cls, "source": cls,
                                      "x0": box[0], "y0": box[1], "x1": box[2], "y1": box[3],
                                      "band": ",".join(map(str, bands[split]))})
    return built


def build_photo_patches(root: Path, per_class: int, seed: int) -> Built:
    return build_patches("photo_patches", root, per_class, seed, _photos(), size=64, scale=(0.75, 1.5), mode="RGB")


def build_textures(root: Path, per_class: int, seed: int) -> Built:
    return build_patches("textures", root, per_class, seed, _textures(), size=32, scale=(1.0, 2.0), mode="L")


# ------------------------------------------------------------------------------------------------------------ build

DATASETS = {"fonts": (build_fonts, 100), "photo_patches": (build_photo_patches, 100), "textures": (build_textures, 200)}
MANIFEST = "manifest.csv"


def check_replaceable(folder: Path) -> None:
    """An earlier build of this script may be replaced, nothing else: `folder` must hold exactly the files its
    manifest lists (a user's own files, or a folder the script did not write, stop the build)."""
    def refuse(why: str) -> None:
        raise FileExistsError(f"{folder} exists and {why}: nothing was changed; move it away or choose another --out")

    if not folder.is_dir() or folder.is_symlink():
        refuse("is not a folder this script wrote")
    try:
        with open(folder / MANIFEST, newline="") as fh:
            listed = {row["file"] for row in csv.DictReader(fh)}
    except (OSError, KeyError, csv.Error, UnicodeDecodeError):
        refuse(f"was not written by this script (no readable {MANIFEST} listing its files)")
    present = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() or p.is_symlink()}
    extra = sorted(present - listed - {MANIFEST})
    if extra:
        refuse(f"holds files this script did not write (e.g. {extra[0]!r})")
    if not listed or not listed <= present:
        refuse(f"does not hold the files its {MANIFEST} lists (not this script's output, or damaged)")


def build(name: str, out: str | Path, per_class: int | None = None, seed: int = 0,
          font_dirs: tuple[str, ...] = ()) -> Built:
    """Build dataset `name` into `out/name` (replacing an earlier build of this script there) and return its record."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}: choose from {', '.join(DATASETS)}")
    builder, default = DATASETS[name]
    per_class = default if per_class is None else int(per_class)
    split_counts(per_class)  # fail before writing anything
    final = Path(out).expanduser() / name
    # left by a build killed outright (kill -9, power loss): its half-written copy goes; an earlier build it had
    # moved aside to put its own in place comes back
    for stale in sorted(final.parent.glob(f".{name}.*-*")):
        kind, _, pid = stale.name[len(name) + 2:].rpartition("-")
        if kind not in ("partial", "old") or not pid.isdigit() or _alive(int(pid)):
            continue
        if kind == "old" and not (final.exists() or final.is_symlink()):
            stale.rename(final)
        else:
            shutil.rmtree(stale, ignore_errors=True)
    if final.exists() or final.is_symlink():
        check_replaceable(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FileExistsError(f"--out {out}: cannot create {final.parent} ({e.strerror}): choose a writable --out") \
            from None
    partial = final.parent / f".{name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    start = time.perf_counter()
    try:
        kwargs = {"font_dirs": tuple(font_dirs)} if name == "fonts" else {}
        built = builder(partial, per_class, seed, **kwargs)
        fields = list(dict.fromkeys(k for r in built.records for k in r))
        with open(partial / MANIFEST, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields, lineterminator="\n")
            writer.writeheader()
            writer.writerows(built.records)
        old = final.parent / f".{name}.old-{os.getpid()}"
        if final.exists():  # two renames: the earlier build is whole until the new one is in place
            final.rename(old)
        partial.rename(final)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    built.root = final
    built.seconds = time.perf_counter() - start
    return built


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


_EXIT = {"code": 130}  # Ctrl-C's exit status, 143 after SIGTERM


def _terminated(signum, frame):  # SIGTERM (kill, a scheduler's time limit): unwind like Ctrl-C, so `build` cleans up
    _EXIT["code"] = 128 + signum
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="folder that receives one subfolder per dataset")
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    parser.add_argument("--per-class", type=int, default=None,
                        help="images per class over train+val+test (default: " +
                             ", ".join(f"{k} {v[1]}" for k, v in DATASETS.items()) + ")")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--font-dir", action="append", default=[], help="another folder to search for fonts")
    parser.add_argument("--list-fonts", action="store_true", help="list usable and skipped fonts, then exit")
    args = parser.parse_args(argv)

    if args.list_fonts:
        fonts, skipped = usable_fonts(tuple(args.font_dir))
        for f in fonts:
            print(f"usable  {f.name}  ({f.path}{f'#{f.index}' if f.index else ''})")
        for label, why in skipped:
            print(f"skipped {label}: {why}")
        print(f"{len(fonts)} usable fonts, {len(skipped)} skipped")
        return
    if args.out is None:
        parser.error("--out is required")
    for d in args.font_dir:
        if not Path(d).expanduser().is_dir():
            parser.error(f"--font-dir {d}: not a folder (a folder of .ttf/.otf fonts)")
    signal.signal(signal.SIGTERM, _terminated)
    for name in args.datasets:
        try:
            built = build(name, args.out, args.per_class, args.seed, font_dirs=tuple(args.font_dir))
        except KeyboardInterrupt:
            sys.stderr.write(f"{name}: interrupted: nothing of it was written (an earlier build of it, and the "
                             "datasets finished before it, are kept)\n")
            sys.exit(_EXIT["code"])
        except (ValueError, RuntimeError, FileExistsError) as e:
            print(f"make_datasets.py: error: {name}: {e}", file=sys.stderr)
            sys.exit(2)
        except OSError as e:
            print(f"make_datasets.py: error: {name}: {e.strerror or e}: {e.filename or args.out}: choose a writable "
                  "--out with free space", file=sys.stderr)
            sys.exit(2)
        print(built.summary(), flush=True)


if __name__ == "__main__":
    main()
