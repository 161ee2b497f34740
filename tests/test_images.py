"""Every image mode PIL reads decodes to the picture a person would see (tl/data/images.py), from a file on disk."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tl.data.images import to_rgb


def roundtrip(img: Image.Image, path, **save) -> Image.Image:
    img.save(path, **save)
    with Image.open(path) as f:
        return to_rgb(f)


def test_16_bit_grayscale_is_stretched_not_clipped_to_white(tmp_path):
    """A 12-bit X-ray stored as 16-bit PNG: convert("RGB") alone makes it solid white."""
    ramp = np.tile(np.linspace(1000, 4095, 64).astype(np.uint16), (16, 1))
    with Image.open(_save(Image.fromarray(ramp), tmp_path / "xray.png")) as f:
        assert f.mode.startswith("I")
        assert np.asarray(f.convert("RGB")).min() == 255  # the failure this module exists for
    rgb = np.asarray(roundtrip(Image.fromarray(ramp), tmp_path / "xray2.png"))
    assert rgb.shape == (16, 64, 3) and rgb[..., 0].min() == 0 and rgb[..., 0].max() == 255
    assert np.all(np.diff(rgb[0, :, 0].astype(int)) >= 0)  # the ramp stays a ramp
    assert np.array_equal(rgb[..., 0], rgb[..., 2])  # gray


def _save(img: Image.Image, path, **kwargs):
    img.save(path, **kwargs)
    return path


@pytest.mark.parametrize("mode", ["I", "F"])
def test_32_bit_integer_and_float_images(tmp_path, mode):
    values = np.linspace(-5, 70000, 32 * 8).reshape(8, 32)
    img = Image.fromarray(values.astype(np.int32 if mode == "I" else np.float32), mode=mode)
    rgb = np.asarray(roundtrip(img, tmp_path / "deep.tif"))
    assert rgb[..., 1].min() == 0 and rgb[..., 1].max() == 255


def test_constant_high_bit_depth_image_is_black_not_a_division_by_zero(tmp_path):
    rgb = np.asarray(roundtrip(Image.fromarray(np.full((8, 8), 3000, np.uint16)), tmp_path / "flat.png"))
    assert rgb.max() == 0


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    rgb = roundtrip(img, tmp_path / "phone.jpg", exif=exif.tobytes())
    assert rgb.size == (20, 40)


@pytest.mark.parametrize(("mode", "fill"), [("RGBA", (0, 0, 0, 0)), ("LA", (0, 0))])
def test_transparent_pixels_are_white(tmp_path, mode, fill):
    rgb = np.asarray(roundtrip(Image.new(mode, (8, 8), fill), tmp_path / "clear.png"))
    assert rgb.min() == 255


def test_palette_with_transparency(tmp_path):
    img = Image.new("P", (8, 8), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.paste(1, (0, 0, 4, 8))
    rgb = np.asarray(roundtrip(img, tmp_path / "pal.png", transparency=0))
    assert tuple(rgb[0, 0]) == (255, 0, 0) and tuple(rgb[0, 7]) == (255, 255, 255)


@pytest.mark.parametrize(("mode", "colour", "suffix", "expected"), [
    ("1", 1, "png", (255, 255, 255)),
    ("L", 128, "png", (128, 128, 128)),
    ("RGB", (10, 20, 30), "png", (10, 20, 30)),
    ("CMYK", (0, 255, 255, 0), "jpg", (255, 0, 0)),
    ("YCbCr", (76, 85, 255), "jpg", (254, 0, 0)),
])
def test_ordinary_modes_keep_their_colours(tmp_path, mode, colour, suffix, expected):
    rgb = np.asarray(roundtrip(Image.new(mode, (8, 8), colour), tmp_path / f"img.{suffix}"))
    assert np.abs(rgb[4, 4].astype(int) - np.array(expected)).max() <= 12


def test_the_training_and_prediction_datasets_decode_16_bit_files(tmp_path):
    from tl.data.datamodule import ImageDataset
    from tl.data.sources import ImageSet
    from tl.predict_torch import FileDataset

    path = _save(Image.fromarray(np.tile(np.linspace(0, 4095, 32).astype(np.uint16), (32, 1))), tmp_path / "a.png")
    images = ImageSet(classes=["a"], targets=np.zeros(1, np.int64), paths=[str(path)])
    decoded = np.asarray(ImageDataset(images, np.array([0]), None).load_image(0))
    assert decoded.min() == 0 and decoded.max() == 255
    x, error = FileDataset([path], lambda im: np.asarray(im), [3, 32, 32])[0]
    assert error == "" and x.min() == 0 and x.max() == 255
