"""LitData shards: `python -m tl.shard` conversion and `data=shards` training (tl/shard.py, tl/data/shards.py).

Conversion round trip (labels, class names, counts, skipped files, pixels); a second run is a no-op; an interrupted
conversion never looks complete and leaves an earlier dataset whole; a truncated shard is one line naming it;
streaming train covers each record once per epoch, a `samples_per_class` subset reads by index; a run killed with
SIGKILL mid-epoch and resumed sees exactly the uninterrupted run's sample sequence; two-process DDP reads disjoint
train shares and tests exactly (its test accuracy equals a single-process evaluation of the same checkpoint).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, make_cfg, synthetic_pil
from distributed_helpers import DDP_CPU, REPO, TESTS, run_tl
from PIL import Image

from tl.data.datamodule import TransferDataModule
from tl.data.images import to_rgb
from tl.data.shards import MANIFEST, ShardSource
from tl.data.sources import ImageFolderSource
from tl.data.transforms import backbone_preprocess
from tl.errors import TLError

pytestmark = pytest.mark.usefixtures("one_thread")


def shard_cfg(tmp_path: Path, *overrides: str):
    return make_cfg(tmp_path / "hydra", list(overrides), config_name="shard")


def make_folder(root: Path, per_class: int = 6) -> Path:
    """4 classes of real PNG and JPEG files, plus a truncated image and a text file (both to be skipped)."""
    images = synthetic_pil(samples_per_class=per_class)
    for i, img in enumerate(images):
        folder = root / f"class_{i // per_class}"
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"img{i}.{'jpg' if i % 2 else 'png'}")
    data = (root / "class_0" / "img0.png").read_bytes()
    (root / "class_1" / "broken.png").write_bytes(data[: len(data) // 2])
    (root / "class_2" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def synthetic_shards(tmp_path_factory) -> Path:
    """Shards of synthetic data like the TINY runs' (4 classes x 60: train 144, val 48, test 48), in small chunks so
    that loader processes and ranks get several."""
    from tl.shard import shard

    tmp = tmp_path_factory.mktemp("shards")
    out = tmp / "synthetic"
    shard(shard_cfg(tmp, "data=synthetic", "data.source.samples_per_class=60", f"output={out}", "chunk_bytes=16KB"))
    return out


# -- conversion -----------------------------------------------------------------------------------------------------
def test_image_folder_round_trip_labels_counts_pixels_and_skipped_files(tmp_path, capsys):
    from tl.shard import shard

    folder = make_folder(tmp_path / "images")
    out = tmp_path / "shards"
    shard(shard_cfg(tmp_path, "data=imagefolder", f"data.root={folder}", f"output={out}"))
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["classes"] == ["class_0", "class_1", "class_2", "class_3"]
    assert sum(manifest["sizes"].values()) == 24
    assert manifest["skipped_files"]["count"] == 1 and manifest["ignored_files"]["count"] == 1
    assert [Path(p).name for p in manifest["skipped_files"]["first"]] == ["broken.png"]
    assert [Path(p).name for p in manifest["ignored_files"]["first"]] == ["notes.txt"]
    for split in ("train", "val", "test"):
        assert sum(manifest["counts"][split].values()) == manifest["sizes"][split]

    # The same splits as training on the folder itself with the same seed, and the same pixels and labels.
    shards = ShardSource(str(out)).load()
    direct = TransferDataModule(ImageFolderSource(folder), preprocess={}, seed=42)
    direct.setup("fit")
    assert len(shards.skipped_files) == 1
    for split in ("train", "val", "test"):
        idx = np.asarray(shards.given_splits[split])
        names = sorted(shards.store.name(int(j)) for j in idx)
        expected = sorted(os.path.relpath(direct.images.paths[int(j)], folder) for j in direct.split_indices[split])
        assert names == expected, split
        for j in idx:
            name = shards.store.name(int(j))
            assert shards.classes[shards.targets[int(j)]] == Path(name).parent.name
            with Image.open(folder / name) as f:
                assert np.array_equal(np.asarray(shards.store.open(int(j))), np.asarray(to_rgb(f)))

    # Train is written in a seeded random order, not class by class (LitData shuffles within chunks).
    train_labels = shards.targets[shards.given_splits["train"]]
    assert not np.all(np.diff(train_labels) >= 0)

    # Unchanged input: nothing written (not a file touched).
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    capsys.readouterr()
    shard(shard_cfg(tmp_path, "data=imagefolder", f"data.root={folder}", f"output={out}"))
    assert "up to date" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before

    # Changed input: refused without overwrite=true, converted with it.
    synthetic_pil(1, seed=5)[0].save(folder / "class_3" / "new.png")
    with pytest.raises(TLError, match="overwrite=true"):
        shard(shard_cfg(tmp_path, "data=imagefolder", f"data.root={folder}", f"output={out}"))
    assert json.loads((out / MANIFEST).read_text()) == manifest
    shard(shard_cfg(tmp_path, "data=imagefolder", f"data.root={folder}", f"output={out}", "overwrite=true"))
    assert sum(json.loads((out / MANIFEST).read_text())["sizes"].values()) == 25


def test_large_jpegs_decode_reduced_and_identical_from_shards_and_their_folder(tmp_path):
    """Shards decode a record as the folder's loader decodes its file (tl.data.images.decode): a large JPEG at a
    reduced DCT scale, then resized to what the transform needs; the same pixels at the same cost either way."""
    skdata = pytest.importorskip("skimage.data")  # the dev extra's real photographs

    from tl.data.images import decode
    from tl.data.transforms import decode_side
    from tl.shard import shard

    photo = skdata.astronaut()  # a real 512x512 photograph
    folder = tmp_path / "photos"
    for c in range(2):
        (folder / f"c{c}").mkdir(parents=True)
        for i in range(6):
            Image.fromarray(photo[24 * i:24 * i + 240, 96 * c:96 * c + 320]).save(folder / f"c{c}" / f"{i}.jpg")
    out = tmp_path / "shards"
    shard(shard_cfg(tmp_path, "data=imagefolder", f"data.root={folder}", f"output={out}"))
    kw = {"preprocess": backbone_preprocess("efficientnet_lite0"), "image_size": 32, "crop_pct": 1.0,
          "batch_size": 4, "num_workers": 0, "seed": 42}
    dm = TransferDataModule(ShardSource(str(out)), **kw)
    dm.setup("fit")
    side = decode_side(dm.preprocess)  # 32: every 240x320 file is reduced
    store = dm.images.store
    for j in range(12):
        from_shards = store.open(j, side)
        from_folder, reduced = decode(folder / store.name(j), side)
        assert reduced and min(from_shards.size) == side == min(from_folder.size)
        assert np.array_equal(np.asarray(from_shards), np.asarray(from_folder))
    # Evaluation batches are equal from either source; training streams records through the same reduced decoding
    direct = TransferDataModule(ImageFolderSource(folder), **kw)
    direct.setup("fit")
    x_shards = {store.name(int(j)): x for (x, _), j in zip(dm.val_dataloader().dataset, dm.split_indices["val"],
                                                             strict=True)}
    x_folder = {os.path.relpath(direct.images.paths[int(j)], folder): x
                for (x, _), j in zip(direct.val_dataloader().dataset, direct.split_indices["val"], strict=True)}
    assert x_shards.keys() == x_folder.keys() and all(torch.equal(x_shards[k], x_folder[k]) for k in x_shards)
    sample = dm.train_dataloader().dataset.transform  # LitData keeps a list of transforms
    sample = sample[0] if isinstance(sample, list) else sample
    assert sample.min_side == decode_side(dm.preprocess, dm.augment) and sample.min_side is not None


def test_small_lossless_images_are_stored_as_their_pixels_and_read_back_identical(tmp_path):
    """A lossless file whose decoded pixels take at most raw_max_ratio times its size is stored as a netpbm PGM
    (grayscale) or PPM: any mode (16-bit, palette with transparency, gray+alpha, EXIF-turned) reads back as the
    folder's loader decodes it; a file that compresses well (a gradient, 16 colours) and a JPEG keep their bytes;
    raw_max_ratio=0 keeps all."""
    from litdata import StreamingDataset

    from tl.data.images import decode, from_netpbm
    from tl.shard import shard

    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)
    files = {
        "rgb.png": Image.fromarray(noise),
        "gray16.png": Image.fromarray((rng.integers(200, 4000, (20, 24))).astype(np.uint16)),
        "palette_alpha.png": Image.fromarray(noise).convert("P", palette=Image.Palette.ADAPTIVE, colors=16),
        "gray_alpha.png": Image.fromarray(np.dstack([noise[..., 0], noise[..., 1]]), mode="LA"),
        "gray.bmp": Image.fromarray(noise[..., 2]),
        "smooth.png": Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), (256, 1))),  # compresses 100x
        "photo.jpg": Image.fromarray(noise),
    }
    files["palette_alpha.png"].info["transparency"] = 3
    turned = Image.fromarray(noise[:, :12])
    exif = turned.getexif()
    exif[0x0112] = 6  # rotate 90 degrees to be upright
    folder = tmp_path / "images"
    for c in ("a", "b"):
        (folder / c).mkdir(parents=True)
        for name, img in files.items():
            for k in range(3):
                kw = {"transparency": 3} if name == "palette_alpha.png" else {}
                img.save(folder / c / f"{k}_{name}", **kw)
        for k in range(3):
            turned.save(folder / c / f"{k}_turned.png", exif=exif)
    stored = {}
    for ratio in ("1.5", "0"):
        out = tmp_path / f"shards_{ratio}"
        shard(shard_cfg(tmp_path, "data=imagefolder", f"data.root={folder}", f"output={out}",
                        f"raw_max_ratio={ratio}"))
        store = ShardSource(str(out)).load().store
        kinds = {}
        for j in range(sum(store.sizes.values())):
            record, name = store.record(j), store.name(j)
            with Image.open(folder / name) as f:
                expected = to_rgb(f)
            assert np.array_equal(np.asarray(store.open(j)), np.asarray(expected)), name
            side = min(expected.size) // 2  # and reduced as the folder's loader reduces it
            assert np.array_equal(np.asarray(store.open(j, side)), np.asarray(decode(folder / name, side)[0])), name
            head = bytes(record["image"][:2])
            kinds[name.split("_", 1)[1]] = head.decode() if head in (b"P5", b"P6") else "file"
            if head not in (b"P5", b"P6"):
                assert bytes(record["image"]) == (folder / name).read_bytes()
        stored[ratio] = kinds
    assert stored["1.5"] == {"rgb.png": "P6", "gray16.png": "P5", "palette_alpha.png": "file", "gray_alpha.png": "P5",
                             "gray.bmp": "P5", "turned.png": "P6", "smooth.png": "file", "photo.jpg": "file"}
    assert set(stored["0"].values()) == {"file"}
    # a raw record cut short is named, not misread
    with pytest.raises(ValueError, match="netpbm data of"):
        from_netpbm(b"P6\n4 4\n255\n" + bytes(40))
    ds = StreamingDataset(str(tmp_path / "shards_1.5" / "train"))
    record = dict(ds[0])
    assert bytes(record["image"][:2]) in (b"P5", b"P6", b"\x89P", b"\xff\xd8")
    record["image"] = bytes(record["image"])[:-5]
    from tl.data.shards import decode as decode_record
    if bytes(record["image"][:2]) in (b"P5", b"P6"):
        with pytest.raises(TLError, match="does not decode.*rerun python -m tl.shard"):
            decode_record(record, "somewhere")


def test_interrupted_conversion_never_looks_complete_and_keeps_the_earlier_dataset(tmp_path, monkeypatch):
    import tl.shard as shard_mod

    out = tmp_path / "shards"
    shard_mod.shard(shard_cfg(tmp_path, "data=synthetic", f"output={out}"))
    manifest = (out / MANIFEST).read_text()
    chunks = {p: p.read_bytes() for p in (out / "train").iterdir()}

    calls = []
    real = shard_mod.write_split

    def dies_on_val(inputs, folder, chunk_bytes, workers):
        calls.append(folder.name)
        if folder.name == "val":
            raise OSError(28, "No space left on device")
        return real(inputs, folder, chunk_bytes, workers)

    monkeypatch.setattr(shard_mod, "write_split", dies_on_val)
    with pytest.raises(TLError, match="No space left.*previous dataset there is unchanged"):
        shard_mod.shard(shard_cfg(tmp_path, "data=synthetic", "data.source.seed=3", f"output={out}",
                                  "overwrite=true"))
    assert calls == ["train", "val"]
    assert (out / MANIFEST).read_text() == manifest  # the earlier dataset, whole
    assert {p: p.read_bytes() for p in (out / "train").iterdir()} == chunks
    assert not list(out.glob(".partial-*"))

    # Killed while installing (after the old manifest went, before the new one): incomplete, said so, then finished.
    monkeypatch.setattr(shard_mod, "write_split", real)
    monkeypatch.setattr(shard_mod, "atomic_write_text", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        shard_mod.shard(shard_cfg(tmp_path, "data=synthetic", "data.source.seed=3", f"output={out}",
                                  "overwrite=true"))
    with pytest.raises(TLError, match="incomplete shard dataset.*rerun"):
        ShardSource(str(out)).load()
    monkeypatch.undo()
    shard_mod.shard(shard_cfg(tmp_path, "data=synthetic", "data.source.seed=3", f"output={out}"))
    assert ShardSource(str(out)).load().store.sizes["train"] > 0


def test_output_folder_of_other_files_is_refused(tmp_path):
    from tl.shard import shard

    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("keep me")
    with pytest.raises(TLError, match="holds other files"):
        shard(shard_cfg(tmp_path, "data=synthetic", f"output={out}"))
    assert (out / "thesis.tex").read_text() == "keep me" and len(list(out.iterdir())) == 1


@pytest.mark.parametrize("disk, says", [
    ("full", r"1 MiB free there, the shards need about \d+ MiB: free space or choose another output"),
    ("read-only", "is on a read-only file system"),
    ("virtual", "is not on a disk"),
])
def test_an_output_that_cannot_hold_the_shards_is_refused_before_writing(disk, says, tmp_path, monkeypatch):
    """LitData's writer processes hang on a full disk: a conversion that cannot fit is refused up front, and a
    read-only or virtual file system (which report 0 bytes free) is named as such."""
    import tl.shard as tl_shard

    usage = shutil.disk_usage(tmp_path)
    if disk == "full":
        monkeypatch.setattr(tl_shard.shutil, "disk_usage", lambda p: usage._replace(free=1 << 20))
    elif disk == "virtual":
        monkeypatch.setattr(tl_shard.shutil, "disk_usage", lambda p: usage._replace(total=0, used=0, free=0))
    else:
        flags = os.statvfs(tmp_path).f_flag | os.ST_RDONLY
        monkeypatch.setattr(tl_shard.os, "statvfs", lambda p: type("V", (), {"f_flag": flags})())
    out = tmp_path / "out" / "shards"
    with pytest.raises(TLError, match=says):
        tl_shard.shard(shard_cfg(tmp_path, "data=synthetic", f"output={out}"))
    assert not (tmp_path / "out").exists()


def test_the_space_estimate_bounds_lossless_records_by_their_pixels_not_by_the_ratio(tmp_path):
    """A record is at most its pixels: raw_max_ratio=1e308 (always store pixels) is neither an overflow nor a claim
    that a 1 MB folder needs terabytes; below the pixels' ratio, files keep their size."""
    from tl.data.sources import ImageFolderSource
    from tl.shard import _lossless_growth, check_space

    for c in ("a", "b"):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(3):  # flat 200x200 PNGs: ~120 KB of pixels in a file of well under 1 KB
            Image.new("RGB", (200, 200), (40 * i, 80, 120)).save(tmp_path / "data" / c / f"{i}.png")
    images = ImageFolderSource(tmp_path / "data").load()
    files = sum(os.stat(p).st_size for p in images.paths)
    pixels = 6 * (3 * 200 * 200 + 20)
    assert _lossless_growth(images.paths, 1.5) == 1.0  # the pixels take far more than 1.5x: files kept
    assert _lossless_growth(images.paths, 1e308) == pytest.approx(pixels / files)
    check_space(tmp_path / "out", images, 1 << 16, 1e308)  # fits: no OverflowError, no false refusal


@pytest.mark.slow
def test_truncated_shard_is_one_line_naming_it(tmp_path, synthetic_shards):
    damaged = tmp_path / "damaged"
    shutil.copytree(synthetic_shards, damaged)
    chunk = sorted((damaged / "val").glob("chunk-*.bin"))[0]
    chunk.write_bytes(chunk.read_bytes()[:100])
    with pytest.raises(TLError, match=f"shard file '{chunk}' is 100 bytes.*truncated"):
        ShardSource(str(damaged)).load()
    proc = subprocess.run([sys.executable, "-m", "tl.train", "data=shards", f"data.root={damaged}",
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(chunk) in lines[0] and lines[0].startswith("tl: error:")


def _blank_pixels(chunk: Path) -> int:
    """Zeroes the pixels of every record stored as a PPM in `chunk`, keeping its size (a copy cut short and padded,
    a bad block): the headers and LitData's index still read."""
    data, n, i = bytearray(chunk.read_bytes()), 0, 0
    while (i := data.find(b"P6\n", i)) >= 0:
        width, height = (int(v) for v in data[i + 3:data.index(b"\n", i + 3)].split())
        start = data.index(b"255\n", i) + 4
        data[start:start + 3 * width * height] = bytes(3 * width * height)
        n, i = n + 1, start
    chunk.write_bytes(bytes(data))
    return n


def test_a_shard_damaged_in_place_is_one_line_naming_it_not_black_images(tmp_path, synthetic_shards):
    """Records stored as pixels have no checksum of their own: zeroed bytes of the same length would read as black
    images. Every record read (streamed train and val/test by index) is checked against its digest in meta.npz."""
    damaged = tmp_path / "damaged"
    shutil.copytree(synthetic_shards, damaged)
    for split in ("train", "val"):
        chunk = sorted((damaged / split).glob("chunk-*.bin"))[0]
        size = chunk.stat().st_size
        assert _blank_pixels(chunk) > 0 and chunk.stat().st_size == size
    dm = TransferDataModule(ShardSource(str(damaged)), backbone_preprocess("efficientnet_lite0"), image_size=32,
                            crop_pct=1.0, batch_size=8, num_workers=0, seed=42)
    dm.setup("fit")  # the chunks' sizes are right: the damage shows when a record is read
    with pytest.raises(TLError, match=r"train image .* is not the bytes tl.shard wrote .*train.meta.npz"):
        list(dm.train_dataloader())
    with pytest.raises(TLError, match=r"val image .* is not the bytes tl.shard wrote .*val.meta.npz"):
        list(dm.val_dataloader())
    intact = TransferDataModule(ShardSource(str(synthetic_shards)), backbone_preprocess("efficientnet_lite0"),
                                image_size=32, crop_pct=1.0, batch_size=8, num_workers=0, seed=42)
    intact.setup("fit")
    assert sum(len(y) for _, y, _ in intact.train_dataloader()) == intact.images.store.sizes["train"]
    assert sum(len(y) for _, y in intact.val_dataloader()) == intact.images.store.sizes["val"]


# -- reading ----------------------------------------------------------------------------------------------------
def test_streaming_train_reads_each_record_once_per_epoch_and_a_subset_reads_by_index(synthetic_shards):
    from litdata import StreamingDataLoader
    from torch.utils.data import DataLoader

    def module(**kw):
        dm = TransferDataModule(ShardSource(str(synthetic_shards)), backbone_preprocess("efficientnet_lite0"),
                                image_size=32, crop_pct=1.0, batch_size=16, num_workers=2, seed=42, **kw)
        dm.setup("fit")
        return dm

    dm = module()
    loader = dm.train_dataloader()
    assert isinstance(loader, StreamingDataLoader)
    train_ids = set(dm.images.store.record(int(j))["id"] for j in dm.split_indices["train"])
    epochs = []
    for _ in range(2):
        seen = [int(i) for x, y, ids in loader for i in ids]
        assert sorted(seen) == sorted(train_ids)  # every record once, nothing from val or test
        epochs.append(seen)
    assert epochs[0] != epochs[1]  # reshuffled each epoch

    small = module(samples_per_class=5)
    loader = small.train_dataloader()
    assert isinstance(loader, DataLoader) and not isinstance(loader, StreamingDataLoader)
    assert sorted(np.bincount([int(t) for _, y in loader for t in y])) == [5, 5, 5, 5]


def _read_ids(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_kill_9_mid_epoch_resume_sees_the_uninterrupted_sample_sequence(tmp_path, synthetic_shards):
    """SIGKILL at step 13 (epoch 2 of 2, 9 steps each); last.ckpt every 4 steps, so the resumed run starts after step
    12, mid-epoch: the ids it trains on, after the killed run's first 12 batches, are the uninterrupted run's (also
    from a copy of the shards in another folder)."""
    common = ["data=shards", f"data.root={synthetic_shards}", "data.image_size=32", "data.crop_pct=1.0",
              "data.batch_size=16", "model.pretrained=none", "trainer.max_epochs=2", "trainer.log_every_n_steps=1",
              "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "~callbacks.progress",
              "onnx.enabled=false", "logger=none", "test=false", "report.top_losses=0", "scenario=large_different",
              "callbacks.last_checkpoint.every_n_steps=4", "+callbacks.ids._target_=distributed_helpers.SampleLog"]
    run_tl([*common, f"+callbacks.ids.out_dir={tmp_path / 'full'}", f"hydra.run.dir={tmp_path / 'full_run'}"])
    killed = subprocess.run(
        [sys.executable, "-m", "tl.train", *common, f"+callbacks.ids.out_dir={tmp_path / 'a'}",
         f"hydra.run.dir={tmp_path / 'run'}", "+callbacks.kill._target_=distributed_helpers.SignalAt",
         "+callbacks.kill.step=13", "+callbacks.kill.signum=9"], cwd=REPO, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(TESTS)}, timeout=600)
    assert killed.returncode == -9, killed.stderr[-3000:]
    moved = tmp_path / "moved"  # the same shards, elsewhere (copied to a node's disk): the position carries over
    shutil.copytree(synthetic_shards, moved)
    run_tl([*common, f"data.root={moved}", f"+callbacks.ids.out_dir={tmp_path / 'b'}",
            f"hydra.run.dir={tmp_path / 'run'}", "ckpt_path=last"])

    full, a, b = (_read_ids(tmp_path / d / "ids0.jsonl") for d in ("full", "a", "b"))
    assert [x["step"] for x in full] == list(range(1, 19))
    assert b[0]["step"] == 13 and len(a) == 13  # resumed after step 12; the killed run had trained step 13
    resumed = [x["ids"] for x in a if x["step"] <= 12] + [x["ids"] for x in b]
    assert resumed == [x["ids"] for x in full]
    second_epoch = [i for x in full if x["epoch"] == 1 for i in x["ids"]]
    assert len(second_epoch) == len(set(second_epoch)) == 144


@pytest.mark.slow
def test_ddp_two_processes_disjoint_train_shares_and_exact_test(tmp_path, synthetic_shards):
    """Two gloo processes: each epoch the ranks' train shares are disjoint; the DDP run's test accuracy (metrics
    synced over both ranks' shares of test) equals a single-process evaluation of the same checkpoint."""
    from tl.evaluate import evaluate

    run = tmp_path / "run"
    run_tl([*DDP_CPU, "data=shards", f"data.root={synthetic_shards}", "data.image_size=32", "data.crop_pct=1.0",
            "data.batch_size=16", "trainer.max_epochs=4", "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false", "~callbacks.progress", "onnx.enabled=false", "logger=none",
            "report.top_losses=0", "scenario=large_similar", "optimizer.lr=3e-3", "augment=none",
            "scheduler.warmup_epochs=0",
            "+callbacks.ids._target_=distributed_helpers.SampleLog", f"+callbacks.ids.out_dir={tmp_path / 'ids'}",
            f"hydra.run.dir={run}", f"paths.cache_dir={tmp_path / 'cache'}"], cwd=tmp_path)
    r0, r1 = (_read_ids(tmp_path / "ids" / f"ids{r}.jsonl") for r in (0, 1))
    for epoch in range(4):
        a = [i for x in r0 if x["epoch"] == epoch for i in x["ids"]]
        b = [i for x in r1 if x["epoch"] == epoch for i in x["ids"]]
        # 144 train records, 72 per rank, cut to whole batches (LitData's drop_last under DDP: equal step counts)
        assert len(a) == len(b) == 64 and len(set(a)) == len(set(b)) == 64 and not set(a) & set(b)
    results = json.loads((run / "results.json").read_text())
    single, _ = evaluate(make_cfg(tmp_path / "eval", [f"ckpt={run}"], config_name="evaluate"))
    assert results["n_test"] == single["n_test"] == 48
    assert results["test/acc"] > 0.3  # learned something (chance: 0.25): the equality is not two uniform guesses
    assert single["test/acc"] == pytest.approx(results["test/acc"], abs=1e-9)


@pytest.mark.slow
def test_scenario_auto_feature_cache_and_report_run_from_shards(tmp_path, synthetic_shards):
    """scenario=auto measures the shards (native size, a linear probe on cached features) and the run trains,
    tests and writes its report (top losses: records named and drawn) from them."""
    from tl.scenarios import resolve
    from tl.train import train

    overrides = [*TINY, "scenario=auto", "data=shards", f"data.root={synthetic_shards}", "data.image_size=32",
                 "data.crop_pct=1.0", "trainer.max_epochs=1", "report.top_losses=16"]
    cfg = resolve(make_cfg(tmp_path, overrides), overrides)
    results, _ = train(cfg)
    assert results["n_train"] == 144 and results["n_test"] == 48
    measured = results["scenario_evidence"]
    assert measured["native_side"] == 32 and measured["n_train"] == 144  # from the sizes recorded at conversion
    assert measured["feature_probe_acc"] > 0.5  # the cached features of records read by index carry the classes
    assert (tmp_path / "report" / "top_losses.csv").is_file()


@pytest.mark.slow
def test_slurm_shard_template_converts_with_the_allocated_cpus(tmp_path):
    """scripts/slurm/shard.sbatch as SLURM runs it (from the submit directory, with the job's CPU count)."""
    out = tmp_path / "shards"
    env = {**os.environ, "SLURM_SUBMIT_DIR": str(tmp_path), "SLURM_JOB_ID": "4242", "SLURM_CPUS_PER_TASK": "2"}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "slurm" / "shard.sbatch"), "data=synthetic",
                           f"output={out}"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["sizes"] == {"train": 72, "val": 24, "test": 24}
    assert (tmp_path / "logs" / "slurm" / "4242-shard" / ".hydra" / "config.yaml").is_file()


def test_split_settings_given_with_shards_are_refused(synthetic_shards, tmp_path):
    """Found by a hostile tester: data.val_fraction=0.4 with data=shards was ignored in silence (the splits are the
    conversion's)."""
    from tl.checks import validate

    common = [*TINY, "scenario=large_similar", "data=shards", f"data.root={synthetic_shards}"]
    cfg = make_cfg(tmp_path, [*common, "data.val_fraction=0.4"])
    with pytest.raises(TLError, match="data.val_fraction=0.4 does not apply to data=shards"):
        validate(cfg)
    validate(make_cfg(tmp_path, common))


def test_resuming_on_other_shards_is_refused(synthetic_shards, tmp_path):
    """A checkpoint records the shards' fingerprint: shards converted again from other input (other splits) are
    refused in one line instead of resuming silently on different data."""
    dm = TransferDataModule(ShardSource(str(synthetic_shards)), backbone_preprocess("efficientnet_lite0"), seed=42)
    dm.setup("fit")
    state = dm.state_dict()
    assert state == {"shards_fingerprint": dm.images.store.fingerprint, "splits_digest": dm.splits_digest()}
    dm.load_state_dict(state)  # the same shards: fine
    with pytest.raises(TLError, match="other shards"):
        dm.load_state_dict({"shards_fingerprint": "0" * 64})

    # tl.evaluate compares too (found by a hostile tester: it reported on re-converted shards in silence)
    import torch

    from tl.evaluate import check_same_shards

    for fingerprint, name in ((dm.images.store.fingerprint, "same.ckpt"), ("0" * 64, "other.ckpt")):
        torch.save({"state_dict": {}, "TransferDataModule": {"shards_fingerprint": fingerprint}}, tmp_path / name)
    check_same_shards([tmp_path / "same.ckpt"], dm)
    with pytest.raises(TLError, match="was trained on other shards .* evaluate on the shards it was trained on"):
        check_same_shards([tmp_path / "same.ckpt", tmp_path / "other.ckpt"], dm)
    # a linear probe trains on cached features: their data module carries the image data module's state
    torch.save({"state_dict": {}, "FeatureDataModule": {"shards_fingerprint": "0" * 64}}, tmp_path / "probe.ckpt")
    with pytest.raises(TLError, match="was trained on other shards"):
        check_same_shards([tmp_path / "probe.ckpt"], dm)


@pytest.mark.parametrize(("classes", "says"), [
    (["class_0", "class_1"], "labels run outside its 2 classes"),
    (["same"] * 4, "its classes repeat a name"),
    (["class_0", "class_1", "class_2", "class_3", "extra"], "a class has no training record"),
])
def test_an_edited_manifest_is_refused_in_one_line(classes, says, synthetic_shards, tmp_path):
    """Found by a hostile tester (round 5): classes cut from the manifest crashed training (IndexError), repeated
    names trained to an unusable export, and an added class trained an 11-way head with exit 0."""
    edited = tmp_path / "edited"
    shutil.copytree(synthetic_shards, edited)
    manifest = json.loads((edited / MANIFEST).read_text())
    manifest["classes"] = classes
    (edited / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(TLError, match=re.escape(says)) as e:
        ShardSource(str(edited)).load()
    assert "\n" not in str(e.value)


def test_the_wrong_data_kind_for_a_folder_names_the_right_one(tmp_path, synthetic_shards):
    """Found by a hostile tester: data=imagefolder on a shard dataset said "no class folders", and data=shards on an
    image folder advised tl.shard with output= that very folder (which tl.shard refuses)."""
    with pytest.raises(TLError, match=r"is a tl shard dataset .*: train on it with data=shards data.root="):
        ImageFolderSource(synthetic_shards).load()
    folder = make_folder(tmp_path / "images")
    with pytest.raises(TLError, match=r"use data=imagefolder data.root=.*or convert it first with python -m tl.shard "
                                      r"data=imagefolder data.root=.* output=<a new folder>") as e:
        ShardSource(str(folder)).load()
    assert f"output={folder}" not in str(e.value)
