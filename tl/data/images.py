"""Decoding any image file PIL reads into the 8-bit RGB picture a person would see.

`Image.convert("RGB")` alone gets several real-world files wrong:
- 16-bit and 32-bit grayscale (`I;16`, `I;16B`, `I`, `F`: medical and scientific images) are clipped to 8 bits, so
  a 12- or 16-bit X-ray becomes a solid white square. Here the image's own value range is stretched to 0-255, as
  image viewers (ImageJ, 3D Slicer) display such files by default; a constant image becomes black.
- EXIF orientation (phone photos) is ignored: the picture is sideways. Here it is applied (`ImageOps.exif_transpose`).
- Transparent pixels (`RGBA`, `LA`, `PA`, palette transparency) keep whatever colour they store, often black. Here
  they are composited over white, as a viewer shows them.
Everything else (`1`, `L`, `P`, `CMYK`, `YCbCr`, `RGB`) goes through PIL's own conversion.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
HIGH_BIT_DEPTH = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def to_rgb(img: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of `img` as it should look (see the module docstring)."""
    img = ImageOps.exif_transpose(img)
    if img.mode in HIGH_BIT_DEPTH:
        values = np.asarray(img, dtype=np.float64)
        if values.ndim == 3:  # some PIL versions decode I;16 variants with a trailing channel
            values = values[..., 0]
        finite = values[np.isfinite(values)]
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
