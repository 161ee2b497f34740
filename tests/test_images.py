"""Every image mode PIL reads decodes to the picture a person would see (tl/data/images.py), from a file on disk."""

from __future__ import annotations

import numpy as np
import pytest
import torch
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


def test_a_float_image_with_no_finite_pixel_is_an_error_not_a_black_image(tmp_path):
    """Found by a hostile tester: an all-NaN float TIFF was predicted as if it were black (exit 0)."""
    nan = Image.fromarray(np.full((8, 8), np.nan, np.float32), mode="F")
    with pytest.raises(ValueError, match="no finite pixel value"):
        roundtrip(nan, tmp_path / "nan.tif")
    some = np.full((8, 8), np.nan, np.float32)
    some[0, :4] = [0, 1, 2, 3]
    rgb = np.asarray(roundtrip(Image.fromarray(some, mode="F"), tmp_path / "some.tif"))
    assert rgb[0, 3, 0] == 255 and rgb[0, 0, 0] == 0  # the finite pixels stretched; NaN shown as the lowest


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


# -- large files: decoded no larger than the transform needs (tl.data.images.decode) -------------------------------
def _photo(width: int, height: int) -> Image.Image:
    """A real photograph (scikit-image's astronaut, 512 px) enlarged to a camera-sized file."""
    skimage_data = pytest.importorskip("skimage.data")
    return Image.fromarray(skimage_data.astronaut()).resize((width, height), Image.BICUBIC)


def test_decode_side_is_what_the_transforms_need():
    from tl.data.transforms import backbone_preprocess, decode_side

    pre = backbone_preprocess("efficientnet_lite0")  # 224 px, crop_pct 0.875: timm resizes to 256 first
    assert decode_side(pre) == 256
    strong = {"name": "strong", "scale": [0.6, 1.0], "ratio": [0.75, 1.3333]}
    assert decode_side(pre, strong) == 334  # the smallest crop (60% of the area at 3:4) upsampled to 224
    assert decode_side(pre, {"name": "none"}) == 256 and decode_side(pre, {"name": "x"}) == 915  # timm's 8% crops


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_large_files_are_reduced_to_what_the_transform_needs_and_look_the_same(tmp_path, suffix):
    from tl.data.images import decode
    from tl.data.transforms import backbone_preprocess, decode_side, eval_transform

    pre = backbone_preprocess("efficientnet_lite0")
    path = _save(_photo(2400, 1600), tmp_path / f"big{suffix}", **({"quality": 95} if suffix == ".jpg" else {}))
    side = decode_side(pre)
    img, reduced = decode(path, side)
    assert reduced and img.size == (384, 256) and img.mode == "RGB"  # timm's first step: shorter side to 256
    with Image.open(path) as f:
        full = to_rgb(f)
    tf = eval_transform(pre)
    if suffix == ".png":  # the transform's own resize, done at decoding: the very same pixels
        assert torch.equal(tf(img), tf(full))
    else:  # libjpeg's DCT scaling first: the same picture to within a grey level or two
        assert (tf(img) - tf(full)).abs().mean() < 0.03  # normalised units (1 / std ~ 4.4 per unit of [0, 1])
    small = _save(_photo(200, 150), tmp_path / f"small{suffix}")
    img, reduced = decode(small, side)
    with Image.open(small) as f:
        assert not reduced and np.array_equal(np.asarray(img), np.asarray(to_rgb(f)))  # small files untouched


def test_the_training_dataset_decodes_a_large_file_once(tmp_path):
    """A large PNG has no cheap reduced decoding: the reduced picture is kept, so later epochs read no file."""
    from tl.data.datamodule import ImageDataset
    from tl.data.sources import ImageSet

    path = _save(_photo(1800, 1200), tmp_path / "big.png")
    small = _save(_photo(64, 48), tmp_path / "small.png")
    images = ImageSet(classes=["a"], targets=np.zeros(2, np.int64), paths=[str(path), str(small)])
    ds = ImageDataset(images, np.array([0, 1]), None, min_side=256)
    first = ds.load_image(0)
    assert first.size == (384, 256)
    ds.load_image(1)
    path.unlink()
    small.unlink()
    assert ds.load_image(0) is first  # no file read for the large one
    with pytest.raises(FileNotFoundError):
        ds.load_image(1)  # small files are read each time (cheap; memory stays bounded by the large ones)
    assert ds.__getstate__()["_decoded"] == {}  # a loader process started by pickling starts empty


def test_truncated_large_files_are_still_found_at_the_scan(tmp_path):
    """The scan decodes JPEGs at 1/8 scale (5x faster; that still reads the whole stream) and checks large PNGs by
    their chunks' CRCs (20x faster than inflating them)."""
    from tl.data.sources import ImageFolderSource

    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(5):
            _save(_photo(64 + i, 64), tmp_path / c / f"{i}.jpg")
    whole = _save(_photo(1600, 1200), tmp_path / "a" / "big.jpg", quality=90).read_bytes()
    (tmp_path / "b" / "cut.jpg").write_bytes(whole[: len(whole) // 2])
    png = _save(_photo(2500, 1700), tmp_path / "a" / "big.png").read_bytes()  # 4.25 megapixels
    (tmp_path / "b" / "cut.png").write_bytes(png[: len(png) * 2 // 3])
    flipped = bytearray(png)
    flipped[len(png) // 2] ^= 0xFF  # one damaged byte inside the image data
    (tmp_path / "b" / "flipped.png").write_bytes(bytes(flipped))
    images = ImageFolderSource(tmp_path).load()
    assert len(images.paths) == 12
    bad = ("cut.jpg", "cut.png", "flipped.png")
    assert sorted(images.skipped_files) == sorted(str(tmp_path / "b" / f) for f in bad)


def test_slivers_are_cut_to_their_centre_and_look_the_same(tmp_path):
    """A 1:333 scan line is cut to 1:32 before any resize (uncut, a 1x100000 px file would be blown up to 34 GB by
    the evaluation resize); the model sees the same centre square."""
    from tl.data.images import MAX_ASPECT, decode
    from tl.data.transforms import backbone_preprocess, decode_side, eval_transform

    rows = np.linspace(0, 255, 1000)[:, None] * np.ones((1, 3))
    rows[480:520] = 255 - rows[480:520]  # a feature at the centre
    path = _save(Image.fromarray(rows.astype(np.uint8)), tmp_path / "line.png")
    pre = backbone_preprocess("efficientnet_lite0")
    img, _ = decode(path, decode_side(pre))
    assert img.size == (3, 3 * MAX_ASPECT)
    with Image.open(path) as f:
        uncut = f.convert("RGB")
    tf = eval_transform(pre)
    assert (tf(img) - tf(uncut)).abs().max() < 0.05
    wide = _save(Image.fromarray(np.zeros((1, 200_000), np.uint8)), tmp_path / "wide.png")
    assert decode(wide, decode_side(pre))[0].size == (MAX_ASPECT, 1)


def test_a_damaged_image_stream_fails_the_image_instead_of_decoding_black(tmp_path):
    """Found by a hostile tester: bytes flipped inside a PNG's image data raised PIL's decode error inside the EXIF
    turn, where it was swallowed, and PIL's next `convert` returned the zero-filled buffer: tl.predict labelled a
    black picture with exit 0. Now the file fails as unreadable (an error row in tl.predict, skipped in training)."""
    from tl.data.images import open_image

    rng = np.random.default_rng(0)
    path = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    assert open_image(path).size == (64, 64)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 50] = bytes(b ^ 0xFF for b in data[middle:middle + 50])
    path.write_bytes(bytes(data))
    with pytest.raises(OSError):
        open_image(path)


def test_a_large_png_with_a_garbled_stream_and_good_checksums_is_unreadable_to_the_scan(tmp_path):
    """Found by a hostile tester: above 4 Mpx the scan checked a PNG's chunk CRCs only, so a garbled image stream
    whose CRCs were recomputed passed, and tl.shard stored it. The scan now inflates the stream too."""
    import struct
    import zlib
    from pathlib import Path

    from tl.data.sources import _is_readable_image

    good = tmp_path / "good.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (1500, 3000, 3), dtype=np.uint8)).save(good)
    assert _is_readable_image(Path(good))
    data = good.read_bytes()
    out, pos = bytearray(data[:8]), 8
    while pos < len(data):  # every IDAT's payload replaced by noise of the same length, its CRC recomputed
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        payload = data[pos + 8:pos + 8 + length]
        if kind == b"IDAT":
            payload = rng.integers(0, 255, length, dtype=np.uint8).tobytes()
        out += struct.pack(">I4s", length, kind) + payload + struct.pack(">I", zlib.crc32(kind + payload))
        pos += 12 + length
    garbled = tmp_path / "garbled.png"
    garbled.write_bytes(bytes(out))
    with Image.open(garbled) as img:
        img.verify()  # the CRCs alone pass it
    assert not _is_readable_image(Path(garbled))


def test_an_image_over_the_decompression_bomb_guard_says_what_to_do():
    """A legitimate 20000x20000 scan was an error row with PIL's message only (found by a hostile tester)."""
    from tl.onnx_runtime import read_error

    error = Image.DecompressionBombError("Image size (400000000 pixels) exceeds limit of 178956970 pixels")
    assert read_error(error).startswith("DecompressionBombError: Image size") and "tile the image" in read_error(error)
    assert read_error(OSError("truncated")) == "OSError: truncated"
