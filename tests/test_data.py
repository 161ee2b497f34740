"""Sources, splits, subsets and transforms."""

from __future__ import annotations

import os
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


def test_loader_workers_none_for_in_memory_data_on_the_cpu_a_share_of_the_cores_on_gpus(tmp_path):
    """In-memory images are augmented in the main process when the model trains on the CPU (workers would compete
    with it for cores), by workers when it trains on GPUs (one process augmenting cannot feed a GPU: the default
    digits run fit in the same 85 s on an H200 as on this 2-core CPU); files always get workers."""
    from types import SimpleNamespace

    import pytorch_lightning as pl

    dm = TransferDataModule(DigitsSource(), backbone_preprocess("efficientnet_lite0"), image_size=32, crop_pct=1.0,
                            samples_per_class=3, seed=0)
    dm.setup()
    assert dm._workers() == 0  # no trainer (scripts, the feature cache)
    dm.trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    assert dm.train_dataloader().num_workers == 0 and dm.val_dataloader().num_workers == 0
    # The rule for a CUDA trainer (no GPU here): the node's cores shared among its GPUs, at most 8 each
    cores = os.cpu_count() or 1
    for gpus in (1, 2, 64):
        dm.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda", 0)), num_devices=gpus)
        assert dm._workers() == max(1, min(8, cores // gpus))
    for c in ("a", "b"):
        write_images(tmp_path / c, 4)
    files = TransferDataModule(ImageFolderSource(tmp_path), preprocess={}, seed=0)
    files.setup()
    assert files._workers() == min(8, cores)


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


# -- layouts and names other tools and systems produce (hostile round 4) ---------------------------------------------
def test_split_folders_other_tools_name_are_read_and_two_for_one_split_are_refused(tmp_path):
    for split, n in (("Train", 6), ("valid", 2), ("TEST", 2)):  # Kaggle / Roboflow naming, any case
        write_images(tmp_path / split / "a", n)
        write_images(tmp_path / split / "b", n, seed=1)
    images = ImageFolderSource(tmp_path).load()
    assert images.classes == ["a", "b"]
    assert {s: len(i) for s, i in images.given_splits.items()} == {"train": 12, "val": 4, "test": 4}
    write_images(tmp_path / "val" / "a", 2)
    with pytest.raises(TLError, match=r"has val/ and valid/: both would be the val split"):
        ImageFolderSource(tmp_path).load()


@pytest.mark.parametrize("split", ["val", "test"])
def test_an_empty_given_split_is_refused_before_training(split, tmp_path):
    write_images(tmp_path / "train" / "a", 6)
    write_images(tmp_path / "train" / "b", 6, seed=1)
    (tmp_path / split / "a").mkdir(parents=True)  # class folders without images, or none at all
    (tmp_path / split / "a" / "notes.txt").write_text("later")
    with pytest.raises(TLError, match=f"'{tmp_path / split}' holds no readable images: .*the {split} split is then "
                                      "carved from train"):
        ImageFolderSource(tmp_path).load()


def test_pipes_named_like_images_are_counted_not_opened(tmp_path):
    write_images(tmp_path / "a", 3)
    write_images(tmp_path / "b", 3)
    os.mkfifo(tmp_path / "a" / "pipe.png")  # opening it would block the scan for ever
    (tmp_path / "b" / "pipe_link.png").symlink_to(tmp_path / "a" / "pipe.png")
    images = ImageFolderSource(tmp_path).load()
    assert len(images) == 6 and sorted(Path(p).name for p in images.skipped_files) == ["pipe.png", "pipe_link.png"]


def test_linked_subfolders_are_followed_once(tmp_path):
    write_images(tmp_path / "data" / "a", 3)
    write_images(tmp_path / "data" / "b", 3)
    write_images(tmp_path / "more", 4, seed=2)
    (tmp_path / "data" / "a" / "more").symlink_to(tmp_path / "more")
    (tmp_path / "more" / "loop").symlink_to(tmp_path / "more")  # a link loop ends
    images = ImageFolderSource(tmp_path / "data").load()
    assert np.bincount(images.targets).tolist() == [7, 3]


def test_class_names_that_are_not_utf8_are_refused_and_file_names_are_kept(tmp_path):
    from tl.data.features import data_fingerprint

    write_images(tmp_path / "a", 3)
    write_images(tmp_path / "b", 3)
    latin1 = os.fsdecode(b"na\xefve.png")
    Image.new("RGB", (24, 24), (9, 99, 199)).save(tmp_path / "b" / latin1, "PNG")  # unique: no warning names it
    dm = TransferDataModule(ImageFolderSource(tmp_path), preprocess={}, seed=0, val_fraction=0.25,
                            test_fraction=0.25)
    dm.setup("fit")
    assert any(p.endswith(latin1) for p in dm.images.paths) and len(data_fingerprint(dm)) == 64
    (tmp_path / "b").rename(tmp_path / os.fsdecode(b"caf\xe9"))
    with pytest.raises(TLError, match="has a name that is not valid UTF-8 .*rename it"):
        ImageFolderSource(tmp_path).load()


def test_the_runs_own_folders_inside_data_root_are_left_out(tmp_path):
    write_images(tmp_path / "a", 3)
    write_images(tmp_path / "b", 3)
    cache = tmp_path / "logs" / "cache" / "features"
    cache.mkdir(parents=True)
    write_images(tmp_path / "logs" / "report", 2)  # e.g. report images of an earlier run, written under logs/
    write_images(tmp_path / "myrun" / "report", 2)
    (tmp_path / "myrun" / ".hydra").mkdir()  # hydra.run.dir=myrun inside data.root
    images = ImageFolderSource(tmp_path, exclude=[str(cache), None]).load()
    assert images.classes == ["a", "b"]
    # the run written into a class folder, or below one: that class would vanish from the data with exit 0
    for run in (tmp_path / "a", tmp_path / "b" / "run"):
        with pytest.raises(TLError, match="inside class folder .*which holds images: that class would be left out"):
            ImageFolderSource(tmp_path, exclude=[str(run)]).load()


def test_a_camera_exif_block_pil_cannot_rewrite_still_turns_the_picture(tmp_path):
    import io

    from PIL import ImageOps

    from tl.data.images import to_rgb

    exif = Image.Exif()
    exif[0x0112], exif[0x010F], exif[0x8769] = 6, "cam", {0x9003: "2020:01:01 00:00:00"}  # 6: turn 90 degrees
    buf = io.BytesIO()
    Image.new("RGB", (24, 16), (200, 30, 30)).save(buf, "JPEG", exif=exif.tobytes())
    base, at = buf.getvalue(), buf.getvalue().find(b"Exif\x00\x00")
    rng = np.random.default_rng(0)
    for _ in range(5000):  # damage the EXIF block until PIL still decodes the file but cannot write its EXIF back
        data = bytearray(base)
        for _ in range(rng.integers(1, 6)):
            data[at + 6 + int(rng.integers(0, 80))] = int(rng.integers(0, 256))
        try:
            with Image.open(io.BytesIO(bytes(data))) as img:
                img.load()
                if img.getexif().get(0x0112) != 6:
                    continue
                ImageOps.exif_transpose(img)
        except Exception:  # noqa: BLE001
            try:
                with Image.open(io.BytesIO(bytes(data))) as img:
                    img.load()
            except Exception:  # noqa: BLE001 - not decodable at all: not the case wanted
                continue
            break
    else:
        pytest.skip("no damaged EXIF block of that kind found")
    with Image.open(io.BytesIO(bytes(data))) as img:
        assert to_rgb(img).size == (16, 24)


def test_the_same_image_under_two_classes_is_reported(tmp_path, caplog):
    write_images(tmp_path / "a", 4)
    write_images(tmp_path / "b", 4, seed=1)
    shutil.copy(tmp_path / "a" / "img0.png", tmp_path / "b" / "copy.png")
    dm = TransferDataModule(ImageFolderSource(tmp_path), preprocess={}, seed=0, val_fraction=0.2, test_fraction=0.2)
    with caplog.at_level("WARNING"):
        dm.setup("fit")
    assert dm.audit["same_image_two_classes"] == 1
    assert sorted(dm.audit["same_image_two_classes_first"][0]) == ["a/img0.png (a)", "b/copy.png (b)"]
    assert "under more than one class" in caplog.text


def test_class_names_that_differ_only_in_unicode_form_are_refused_and_case_counts(tmp_path):
    import unicodedata

    write_images(tmp_path / unicodedata.normalize("NFC", "café"), 2)
    write_images(tmp_path / unicodedata.normalize("NFD", "café"), 2, seed=1)
    with pytest.raises(TLError, match="differ only in Unicode form"):
        ImageFolderSource(tmp_path).load()
    shutil.rmtree(tmp_path / unicodedata.normalize("NFD", "café"))
    write_images(tmp_path / "a", 2)
    write_images(tmp_path / "A", 2, seed=2)  # letters of a handwriting set: two classes
    assert ImageFolderSource(tmp_path).load().classes == ["A", "a", "café"]


def test_a_failed_download_leaves_no_empty_folders(tmp_path):
    from urllib.error import URLError

    from tl.data.sources import TorchvisionSource
    from tl.errors import TLError

    class Offline:  # what torchvision does offline: makes its folders, then cannot reach the server
        def __init__(self, root, download, **kwargs):
            (Path(root) / "cifar-10-batches-py").mkdir(parents=True, exist_ok=True)
            raise URLError("[Errno -3] Temporary failure in name resolution")

    root = tmp_path / "data" / "CIFAR10"
    source = TorchvisionSource("CIFAR10", root, {"train": {"train": True}})
    source.cls = Offline
    with pytest.raises(TLError, match="could not load or download torchvision CIFAR10"):
        source.load()
    assert list(tmp_path.iterdir()) == []  # data/ and data/CIFAR10 were made by the attempt: gone again
    # a folder that was there before is the user's: left as it is, with what it held
    (root / "mine").mkdir(parents=True)
    with pytest.raises(TLError):
        source.load()
    assert (root / "mine").is_dir()


def test_swapped_class_folders_with_same_sizes_and_times_are_new_data_to_the_caches(tmp_path):
    """Found by a hostile tester: the feature cache and tl.shard's "up to date" knew a file by its path, size and
    mtime. Class folders swapped after a `tar x` (every BMP the same size, one shared mtime) kept the old features
    and shards: the run trained on the old labels and reported them, exit 0. Swapped now, the data is new to both."""
    from tl.data.features import data_fingerprint
    from tl.shard import folder_listing

    rng = np.random.default_rng(0)
    for c in ("brick", "grass"):
        (tmp_path / "d" / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "d" / c / f"{i}.bmp")
    files = list((tmp_path / "d").rglob("*.bmp"))
    assert len({f.stat().st_size for f in files}) == 1
    for f in files:
        os.utime(f, ns=(10**18, 10**18))

    def fingerprints():
        dm = TransferDataModule(ImageFolderSource(tmp_path / "d"), preprocess={}, seed=0, val_fraction=0.25,
                                test_fraction=0.25)
        dm.setup("fit")
        return data_fingerprint(dm), folder_listing(tmp_path / "d")

    before = fingerprints()
    assert fingerprints() == before  # nothing changed: a cache hit, "up to date"
    (tmp_path / "d" / "brick").rename(tmp_path / "d" / "tmp")
    (tmp_path / "d" / "grass").rename(tmp_path / "d" / "brick")
    (tmp_path / "d" / "tmp").rename(tmp_path / "d" / "grass")
    for f in (tmp_path / "d").rglob("*.bmp"):
        os.utime(f, ns=(10**18, 10**18))
    after = fingerprints()
    assert after[0] != before[0] and after[1] != before[1]


@pytest.mark.parametrize("layout", ["flat", "splits"])
def test_images_outside_every_class_folder_are_counted_and_named(tmp_path, caplog, layout):
    """Found by a hostile tester: images lying loose in data.root or in train/ (not in a class folder) were left out
    without a word. They are still left out (their class is unknown), now with a warning naming them, and counted
    with the ignored files (results.json, tl.shard's manifest)."""
    base = tmp_path / "train" if layout == "splits" else tmp_path
    write_images(base / "a", 3)
    write_images(base / "b", 3)
    Image.new("RGB", (8, 8)).save(base / "loose.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "preview.jpg") if layout == "splits" else None
    (tmp_path / "README.txt").write_text("about")  # not an image: not named in this warning
    with caplog.at_level("WARNING"):
        images = ImageFolderSource(tmp_path).load()
    loose = sorted(Path(p).name for p in images.ignored_files if Path(p).suffix != ".txt")
    assert loose == (["loose.png", "preview.jpg"] if layout == "splits" else ["loose.png"])
    assert "outside every class folder" in caplog.text and "loose.png" in caplog.text
    assert len(images.targets) == 6
