"""Decoding any image file PIL reads into the 8-bit RGB picture a person would see.

`Image.convert("RGB")` alone gets several real-world files wrong:
- 16-bit and 32-bit grayscale (`I;16`, `I;16B`, `I`, `F`: medical and scientific images) are clipped to 8 bits, so
  a 12- or 16-bit X-ray becomes a solid white square. Here the image's own value range is stretched to 0-255, as
  image viewers (ImageJ, 3D Slicer) display such files by default; a constant image becomes black.
- EXIF orientation (phone photos) is ignored: the picture is sideways. Here it is applied (`ImageOps.exif_transpose`).
- Transparent pixels (`RGBA`, `LA`, `PA`, palette transparency) keep whatever colour they store, often black. Here
  they are composited over white, as a viewer shows them.
Everything else (`1`, `L`, `P`, `CMYK`, `YCbCr`, `RGB`) goes through PIL's own conversion.
- A sliver (one side more than `MAX_ASPECT` times the other: a 2x20000 px scan line) is cut to its centre
  `MAX_ASPECT` times as long as wide. Uncut, the evaluation resize (shorter side to 256 px) would blow a 2x20000 px
  file up to 256x2,560,000 px (12 s and 3.4 GB for one image; a 1x100000 px file needs 34 GB). The cut keeps what a
  model sees (to within half a source pixel of centring): evaluation keeps the centre square, and training's random
  resized crop falls back to a centre crop on anything longer than 1:17 (timm's default least scale 0.08, ratio 3/4;
  1:32 for any least scale down to 0.042).

`decode(path, min_side)` also bounds the cost of large files (a 3000x2000 px photo took half a second to decode and
augment for a 224 px model on the 2-core CPU, every epoch). `min_side` is what the transform needs to lose no detail
(`tl.data.transforms.decode_side`: the evaluation resize, or the smallest random crop upsampled to the input size).
A file whose shorter side is at least twice that is resized to it (shorter side = `min_side`, as torchvision's
`Resize` sizes it, with the model's interpolation): for evaluation that is the transform's own first step, so the
model sees the same pixels; a JPEG is first decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, PIL's `draft`)
while its shorter side stays at least twice `min_side`. Smaller files are untouched. Training
reads each file once per epoch: `tl.data.datamodule.ImageDataset` keeps reduced images in memory (up to
`DECODE_CACHE_MB` per process), so a large PNG or TIFF, which has no cheap reduced decoding, is decoded once per
loader process rather than once per epoch.
"""

from __future__ import annotations

import math
import os
from typing import IO

import numpy as np
from PIL import Image, ImageOps

# Raster formats a dataset is kept in, where this PIL reads them (AVIF and JPEG 2000 need optional codecs). A file
# with another extension is not an image to tl (a README, labels.csv, Thumbs.db): it is ignored and reported.
_COMMON = (".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".dib", ".gif", ".apng", ".tif", ".tiff", ".webp",
           ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".qoi", ".avif", ".jp2", ".j2k")
IMAGE_EXTENSIONS = tuple(e for e in _COMMON if e in Image.registered_extensions() or e in (".jpe", ".jfif"))
# Files and folders that operating systems and tools leave in image folders: never data, never reported.
JUNK_NAMES = frozenset({"thumbs.db", "ehthumbs.db", "desktop.ini", "icon\r", "__macosx"})
HIGH_BIT_DEPTH = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
MAX_ASPECT = 32  # a longer side beyond this many times the shorter one is cut (see the module docstring)


# EXIF orientation -> the transpose that makes the picture upright (as ImageOps.exif_transpose applies it)
ORIENTATION = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
               5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
               8: Image.Transpose.ROTATE_90}


def upright(img: Image.Image) -> Image.Image:
    """`img` turned as its EXIF orientation says. A camera's EXIF block that PIL reads but cannot write back (a tag
    whose type does not match its value) still turns the picture, rather than failing the image. The pixels are
    decoded first, outside that leniency: a damaged stream must fail the image. (Swallowed here, PIL's decode error
    was lost: its next `convert` returned the zero-filled buffer, and a damaged file was classified, trained and
    sharded as a black or half-black picture with exit 0; found by a hostile tester.)"""
    img.load()
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - struct.error, TypeError, ValueError from re-serialising the EXIF
        try:
            method = ORIENTATION.get(img.getexif().get(0x0112))
        except Exception:  # noqa: BLE001
            return img
        return img.transpose(method) if method is not None else img


def clip_aspect(img: Image.Image, limit: int = MAX_ASPECT) -> Image.Image:
    """`img`, or its centre `limit` times as long as its shorter side where the longer side is longer than that."""
    width, height = img.size
    short = max(1, min(width, height))
    if max(width, height) <= limit * short:
        return img
    keep = limit * short
    if width > height:
        left = (width - keep) // 2
        return img.crop((left, 0, left + keep, height))
    top = (height - keep) // 2
    return img.crop((0, top, width, top + keep))


def to_rgb(img: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of `img` as it should look (see the module docstring)."""
    img = clip_aspect(upright(img))
    if img.mode in HIGH_BIT_DEPTH:
        values = np.asarray(img, dtype=np.float64)
        if values.ndim == 3:  # some PIL versions decode I;16 variants with a trailing channel
            values = values[..., 0]
        finite = values[np.isfinite(values)]
        if not finite.size and values.size:  # found by a hostile tester: an all-NaN TIFF was labelled as a black one
            raise ValueError(f"a {img.mode} image with no finite pixel value (all NaN or infinite): nothing to see")
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        scaled = np.zeros_like(values) if high <= low else (np.nan_to_num(values, nan=low) - low) / (high - low)
        img = Image.fromarray(np.clip(np.round(scaled * 255), 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


# torchvision's interpolation names (a model's preprocess, an export's steps) -> PIL's filters
RESAMPLE = {"nearest": Image.NEAREST, "nearest-exact": Image.NEAREST, "bilinear": Image.BILINEAR,
            "bicubic": Image.BICUBIC, "box": Image.BOX, "hamming": Image.HAMMING, "lanczos": Image.LANCZOS}


def shrink(img: Image.Image, min_side: int | None, interpolation: str = "bicubic") -> Image.Image:
    """`img` resized so that its shorter side is `min_side` where it is at least twice that, as torchvision's
    `Resize(min_side)` sizes it (the longer side truncated), with PIL's antialiased `interpolation`."""
    width, height = img.size
    if not min_side or min(width, height) < 2 * int(min_side):
        return img
    side = int(min_side)
    size = (side, int(side * height / width)) if width <= height else (int(side * width / height), side)
    return img.resize(size, RESAMPLE.get(interpolation, Image.BICUBIC))


def decode(path: str | os.PathLike | IO[bytes], min_side: int | None = None,
           interpolation: str = "bicubic") -> tuple[Image.Image, bool]:
    """(the file at `path` (or an open binary file: a shard record's bytes) as `to_rgb` makes it, its shorter side
    resized to `min_side` where it is at least twice that; whether it was): see the module docstring."""
    with Image.open(path) as f:
        reduced = bool(min_side) and min(f.size) >= 2 * int(min_side)
        if reduced and f.format == "JPEG":
            # libjpeg's DCT scaling by the largest power of two that keeps the shorter side >= 2 * min_side
            scale = min(f.size) / (2 * int(min_side))
            if scale >= 2:
                f.draft(None, (math.ceil(f.size[0] / scale), math.ceil(f.size[1] / scale)))
        return shrink(to_rgb(f), min_side, interpolation), reduced


# -- raw pixels (netpbm): what tl.shard stores for small lossless images ---------------------------------------------
# Formats that lose nothing when their decoded pixels are stored instead of their bytes (JPEG and WebP are kept as
# they are: their pixels would be several times the file, and the folder's reduced-scale JPEG decoding would differ).
LOSSLESS_FORMATS = frozenset({"PNG", "BMP", "DIB", "GIF", "TIFF", "PPM", "TGA", "QOI"})


def to_netpbm(img: Image.Image) -> bytes:
    """`img` (RGB, as `to_rgb` made it) as a binary netpbm file: PGM (P5) where its three channels are equal (a
    grayscale picture: a third of the bytes), else PPM (P6). Any image tool reads it; `from_netpbm` reads it back in
    a few microseconds, where decoding a small PNG takes tens."""
    if img.mode != "RGB":
        raise ValueError(f"to_netpbm takes RGB, not {img.mode}")
    r, g, b = img.split()
    if r.tobytes() == g.tobytes() == b.tobytes():
        return b"P5\n%d %d\n255\n" % img.size + r.tobytes()
    return b"P6\n%d %d\n255\n" % img.size + img.tobytes()


def from_netpbm(data: bytes | memoryview) -> Image.Image | None:
    """The RGB picture of a netpbm file written by `to_netpbm` (8-bit P5 or P6, single-newline header), or None for
    any other bytes (which then go through PIL). Its size must match its header exactly (ValueError otherwise)."""
    head = bytes(data[:40])
    if head[:3] not in (b"P5\n", b"P6\n"):
        return None
    parts = head.split(b"\n", 3)
    if len(parts) < 4 or parts[2] != b"255":
        return None
    try:
        width, height = (int(v) for v in parts[1].split(b" "))
    except ValueError:
        return None
    offset = len(parts[0]) + len(parts[1]) + len(parts[2]) + 3
    channels = 3 if head[1:2] == b"6" else 1
    if width < 1 or height < 1 or len(data) - offset != width * height * channels:
        raise ValueError(f"netpbm data of {len(data) - offset} bytes for {width}x{height}x{channels} pixels")
    mode = "RGB" if channels == 3 else "L"
    img = Image.frombytes(mode, (width, height), bytes(data[offset:]))
    return clip_aspect(img if channels == 3 else img.convert("RGB"))


def open_image(path: str | os.PathLike, min_side: int | None = None, interpolation: str = "bicubic") -> Image.Image:
    """The file at `path` as `to_rgb` makes it, large ones resized to `min_side` (see `decode`)."""
    return decode(path, min_side, interpolation)[0]
