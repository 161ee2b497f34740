"""Sources, splits, subsets and transforms."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tl.data import DigitsSource, ImageFolderSource, SyntheticSource, TransferDataModule
from tl.data.splits import make_splits, subset_per_class
from tl.data.transforms import backbone_preprocess
from tl.errors import TLError


def write_images(folder: Path, n: int, size: int = 24, mode: str = "RGB", seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        shape = (size, size, 3) if mode == "RGB" else (size, size)
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode=mode).save(folder / f"img{i}.png")


def test_splits_are_deterministic_stratified_and_disjoint():
    targets = np.repeat(np.arange(5), 40)
    a = make_splits(targets, {}, 0.2, 0.2, seed=3)
    b = make_splits(targets, {}, 0.2, 0.2, seed=3)
    c = make_splits(targets, {}, 0.2, 0.2, seed=4)
    for s in ("train", "val", "test"):
        assert np.array_equal(a[s], b[s])
    assert not np.array_equal(a["test"], c["test"])
    assert len(set(a["train"]) | set(a["val"]) | set(a["test"])) == 200
    assert not set(a["train"]) & set(a["test"]) and not set(a["val"]) & set(a["test"])
    assert (len(a["val"]), len(a["test"])) == (40, 40)
    for s in ("val", "test"):  # stratified: each class gets its share
        assert np.all(np.bincount(targets[a[s]]) == 8)


def test_given_splits_are_kept():
    targets = np.repeat(np.arange(2), 10)
    given = {"train": np.arange(0, 20, 2), "test": np.arange(1, 20, 2)}
    s = make_splits(targets, given, 0.2, 0.2, seed=0)
    assert np.array_equal(s["test"], given["test"])
    assert set(s["train"]) | set(s["val"]) == set(given["train"])


def test_samples_per_class_draws_from_train_only_and_is_seeded():
    targets = np.repeat(np.arange(3), 50)
    s = make_splits(targets, {}, 0.2, 0.2, seed=0)
    sub = subset_per_class(s["train"], targets, 5, seed=0)
    assert np.all(np.bincount(targets[sub]) == 5)
    assert set(sub) <= set(s["train"])
    assert np.array_equal(sub, subset_per_class(s["train"], targets, 5, seed=0))
    with pytest.raises(TLError, match="samples_per_class=40 is more than class"):
        subset_per_class(s["train"], targets, 40, seed=0)
    # the class that limits it is named, with the largest value that works
    uneven = np.concatenate([np.full(30, 0), np.full(12, 1), np.full(20, 2)])
    with pytest.raises(TLError, match=r"samples_per_class=25 is more than class 'owl' has in train \(12; 2 classes "
                                      r"have fewer\): use at most 12"):
        subset_per_class(np.arange(len(uneven)), uneven, 25, seed=0, classes=["cat", "owl", "dog"])


def test_digits_source_is_bundled_uint8_grayscale():
    images = DigitsSource().load()
    assert images.images.shape == (1797, 1, 8, 8) and images.images.dtype == torch.uint8
    assert images.images.max() == 255 and len(images.classes) == 10


def test_preprocess_comes_from_the_backbone():
    p = backbone_preprocess("efficientnet_lite0")
    assert p["mean"] == pytest.approx([0.485, 0.456, 0.406]) and p["input_size"] == [3, 224, 224]
    p = backbone_preprocess("vit_base_patch16_clip_224")  # CLIP has its own mean/std
    assert p["mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])


def test_datamodule_grayscale_to_three_channels_normalised_with_backbone_stats():
    dm = TransferDataModule(DigitsSource(), backbone_preprocess("efficientnet_lite0"), image_size=32, crop_pct=1.0,
                            samples_per_class=3, seed=0)
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (30, 3, 32, 32)
    background = x[0, :, 0, 0]  # a digit's corner pixel is black: (0 - mean) / std per channel
    assert background.tolist() == pytest.approx([-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225], abs=1e-3)
    assert dm.num_classes == 10 and len(dm.split_indices["train"]) == 30


def test_synthetic_source_is_deterministic():
    a, b = SyntheticSource(seed=1).load(), SyntheticSource(seed=1).load()
    assert torch.equal(a.images, b.images) and a.images.shape == (120, 3, 32, 32)


def test_imagefolder_flat_layout(tmp_path):
    for c in ("cat", "dog"):
        write_images(tmp_path / c, 6)
    write_images(tmp_path / "gray", 6, mode="L")
    images = ImageFolderSource(tmp_path).load()
    assert images.classes == ["cat", "dog", "gray"] and len(images) == 18 and not images.given_splits


def test_imagefolder_split_layout(tmp_path):
    for split, n in (("train", 8), ("test", 3)):
        for c in ("a", "b"):
            write_images(tmp_path / split / c, n)
    images = ImageFolderSource(tmp_path).load()
    assert sorted(images.given_splits) == ["test", "train"]
    assert len(images.given_splits["test"]) == 6


@pytest.mark.parametrize("case", ["missing", "empty_root", "empty_class", "no_train"])
def test_imagefolder_bad_layouts_name_the_culprit(tmp_path, case):
    root = tmp_path / "data"
    if case == "empty_root":
        root.mkdir()
    if case == "empty_class":
        write_images(root / "a", 3)
        (root / "b").mkdir()
    if case == "no_train":
        write_images(root / "test" / "a", 3)
    with pytest.raises(TLError) as e:
        ImageFolderSource(root).load()
    msg = str(e.value)
    assert "\n" not in msg
    expected = {"missing": "does not exist", "empty_root": "no class folders", "empty_class": "has no readable images",
                "no_train": "no train/ folder"}[case]
    assert expected in msg and str(root) in msg


def test_imagefolder_skips_or_refuses_bad_files(tmp_path):
    write_images(tmp_path / "a", 4)
    write_images(tmp_path / "b", 4)
    (tmp_path / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    good = (tmp_path / "b" / "img0.png").read_bytes()
    (tmp_path / "b" / "truncated.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "b" / "notes.txt").write_text("not an image")
    (tmp_path / "b" / "gone.png").symlink_to(tmp_path / "no_such_file.png")  # a broken symlink is counted too
    images = ImageFolderSource(tmp_path).load()
    assert len(images) == 8 and len(images.skipped_files) == 3
    assert str(tmp_path / "b" / "gone.png") in images.skipped_files
    assert images.ignored_files == [str(tmp_path / "b" / "notes.txt")]  # not an image's name: ignored, reported
    with pytest.raises(TLError, match="unreadable image"):
        ImageFolderSource(tmp_path, on_bad_file="error").load()


def test_imagefolder_leaves_os_junk_out_and_reads_every_image_extension(tmp_path):
    write_images(tmp_path / "a", 3)
    write_images(tmp_path / "b", 3)
    (tmp_path / "a" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0 not an image")
    (tmp_path / "a" / "desktop.ini").write_text("[.ShellClassInfo]")
    (tmp_path / "a" / ".ipynb_checkpoints").mkdir()  # a notebook's copy would be a duplicate training image
    shutil.copy(tmp_path / "a" / "img0.png", tmp_path / "a" / ".ipynb_checkpoints" / "img0-checkpoint.png")
    (tmp_path / "__MACOSX" / "a").mkdir(parents=True)  # a zip made on a Mac: not a class
    (tmp_path / "__MACOSX" / "a" / "._img0.png").write_bytes(b"\x00\x05\x16\x07")
    Image.open(tmp_path / "b" / "img0.png").convert("RGB").save(tmp_path / "b" / "photo.jfif", "JPEG")
    images = ImageFolderSource(tmp_path, on_bad_file="error").load()
    assert images.classes == ["a", "b"] and len(images) == 7
    assert images.skipped_files == [] and images.ignored_files == []
    assert str(tmp_path / "b" / "photo.jfif") in images.paths


def test_a_class_folder_beside_train_is_refused(tmp_path):
    write_images(tmp_path / "train" / "a", 3)
    write_images(tmp_path / "train" / "b", 3)
    write_images(tmp_path / "c", 3)  # meant as a third class
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no images here")
    with pytest.raises(TLError, match=r"holds images beside .*train.*move it under train/") as e:
        ImageFolderSource(tmp_path).load()
    assert "\n" not in str(e.value) and str(tmp_path / "c") in str(e.value)
    shutil.rmtree(tmp_path / "c")
    assert ImageFolderSource(tmp_path).load().classes == ["a", "b"]  # a folder without images beside it is fine


def test_a_class_too_small_to_split_is_named():
    targets = np.array([0] * 10 + [1] + [2] * 10)
    with pytest.raises(TLError, match=r"class 'lonely' has only 1 example\(s\) to split: too few to carve a test"):
        make_splits(targets, {}, 0.15, 0.15, 0, ["cat", "lonely", "dog"])
