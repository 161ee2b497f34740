"""scripts/make_datasets.py: deterministic, loadable by ImageFolderSource, and no train/test leakage."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from itertools import combinations
from pathlib import Path

import pytest
from PIL import Image

from tl.data.sources import ImageFolderSource

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_datasets.py"
DATASETS = ["fonts", "photo_patches", "textures"]
PER_CLASS = 5  # 3 train, 1 val, 1 test per class


@pytest.fixture(scope="module")
def md():
    spec = importlib.util.spec_from_file_location("make_datasets", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def _needs(name: str) -> None:
    if name in ("photo_patches", "textures"):
        pytest.importorskip("skimage")


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _overlap(a: dict, b: dict) -> bool:
    return a["x0"] < b["x1"] and b["x0"] < a["x1"] and a["y0"] < b["y1"] and b["y0"] < a["y1"]


@pytest.mark.parametrize("name", DATASETS)
def test_same_seed_same_bytes(md, tmp_path, name):
    _needs(name)
    first = md.build(name, tmp_path / "a", PER_CLASS, seed=3)
    second = md.build(name, tmp_path / "b", PER_CLASS, seed=3)
    a, b = _digests(first.root), _digests(second.root)
    assert len(a) == len(first.classes) * PER_CLASS + 1  # the images and manifest.csv
    assert a == b
    other = md.build(name, tmp_path / "c", PER_CLASS, seed=4)
    assert _digests(other.root).keys() == a.keys() and _digests(other.root) != a  # the seed matters


@pytest.mark.parametrize("name", DATASETS)
def test_layout_counts_and_imagefolder_source(md, tmp_path, name):
    _needs(name)
    built = md.build(name, tmp_path, PER_CLASS, seed=0)
    root = tmp_path / name
    assert built.root == root
    expected = md.split_counts(PER_CLASS)
    assert sum(expected.values()) == PER_CLASS
    for split in md.SPLITS:
        assert sorted(p.name for p in (root / split).iterdir()) == sorted(built.classes)
        for cls in built.classes:
            files = sorted((root / split / cls).glob("*.png"))
            assert len(files) == expected[split] == built.count(split, cls)
    with Image.open(next((root / "train").rglob("*.png"))) as img:
        assert (img.size, img.mode) == (built.image_size, built.mode)

    data = ImageFolderSource(root, on_bad_file="error").load()
    assert data.classes == sorted(built.classes)
    assert len(data) == len(built.classes) * PER_CLASS and not data.skipped_files
    assert {s: len(i) for s, i in data.given_splits.items()} == {
        s: n * len(built.classes) for s, n in expected.items()}
    assert built.summary().startswith(f"{name}: {len(built.classes)} classes, {len(data)} images")


@pytest.mark.parametrize("name", ["photo_patches", "textures"])
def test_patch_splits_come_from_disjoint_regions(md, tmp_path, name):
    _needs(name)
    built = md.build(name, tmp_path, 10, seed=0)
    for cls in built.classes:
        rows = [r for r in built.records if r["class"] == cls]
        bands = {}
        for r in rows:
            bx0, by0, bx1, by1 = map(int, r["band"].split(","))
            bands.setdefault(r["split"], (bx0, by0, bx1, by1))
            assert bx0 <= r["x0"] < r["x1"] <= bx1 and by0 <= r["y0"] < r["y1"] <= by1  # crop inside its band
        assert set(bands) == set(md.SPLITS)
        for s, t in combinations(md.SPLITS, 2):
            band_s = dict(zip(("x0", "y0", "x1", "y1"), bands[s], strict=True))
            band_t = dict(zip(("x0", "y0", "x1", "y1"), bands[t], strict=True))
            assert not _overlap(band_s, band_t), (cls, s, t)
            for a in (r for r in rows if r["split"] == s):
                for b in (r for r in rows if r["split"] == t):
                    assert not _overlap(a, b), (cls, a, b)


def test_fonts_are_real_distinct_and_split_by_font(md, tmp_path):
    fonts, skipped = md.usable_fonts()
    names = {f.name for f in fonts}
    assert len(fonts) >= 3 and len(names) == len(fonts)
    assert "DejaVu Sans" in names  # matplotlib ships it
    reasons = dict(skipped)
    for symbol_font in ("cmsy10.ttf", "cmex10.ttf", "LastResortHE-Regular.ttf", "STIXSizOneSymReg.ttf"):
        hits = [why for label, why in reasons.items() if label.endswith(symbol_font)]
        assert all(hits), symbol_font  # when the file is installed, it is skipped with a reason
        assert not any(f.file == symbol_font for f in fonts)

    built = md.build("fonts", tmp_path, 8, seed=0)
    used = {s: {r["source"] for r in built.records if r["split"] == s} for s in md.SPLITS}
    for s, t in combinations(md.SPLITS, 2):
        assert not used[s] & used[t], (s, t)
    for cls in built.classes:  # within a class and split, images cycle through different fonts
        train = [r["source"] for r in built.records if r["class"] == cls and r["split"] == "train"]
        assert len(set(train)) == min(len(train), len(md.split_fonts(fonts, 0)["train"]))


def test_rebuild_replaces_own_output_and_refuses_foreign_folder(md, tmp_path, capsys):
    pytest.importorskip("skimage")
    md.main(["--out", str(tmp_path), "--datasets", "textures", "--per-class", "6", "--seed", "1"])
    assert capsys.readouterr().out.startswith("textures: 3 classes, 18 images")
    md.build("textures", tmp_path, 3, seed=1)  # smaller: nothing of the first build is left
    assert len(list((tmp_path / "textures").rglob("*.png"))) == 9
    (tmp_path / "foreign" / "textures").mkdir(parents=True)
    with pytest.raises(FileExistsError):
        md.build("textures", tmp_path / "foreign", 3, seed=1)
    with pytest.raises(ValueError):
        md.build("textures", tmp_path, 2, seed=1)


def test_a_rebuild_replaces_only_an_untouched_earlier_build(md, tmp_path):
    """A folder the script did not write (or one a user added files to) is never deleted: found by a hostile tester,
    whose folder with a stray manifest.csv lost its images."""
    _needs("textures")
    foreign = tmp_path / "a" / "textures" / "precious"
    foreign.mkdir(parents=True)
    (foreign / "x.png").write_bytes(b"mine")
    (foreign.parent / "manifest.csv").write_text("id,label\n")
    with pytest.raises(FileExistsError, match="holds files this script did not write"):
        md.build("textures", tmp_path / "a", 5, 0)
    assert (foreign / "x.png").read_bytes() == b"mine"
    built = md.build("textures", tmp_path / "b", 5, 0)
    (built.root / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="'notes.txt'"):
        md.build("textures", tmp_path / "b", 5, 1)
    (built.root / "notes.txt").unlink()
    assert md.build("textures", tmp_path / "b", 5, 1).root == built.root  # an untouched build of its own: replaced


def test_export_digits_writes_a_new_folder_and_never_over_another(tmp_path):
    """Found by a hostile tester: scripts/export_digits.py into an existing dataset overwrote 49 of its images with
    digits and added 1,748 more, exit 0. Now a folder that is not new or empty is refused, untouched."""
    import subprocess

    script = Path(__file__).resolve().parents[1] / "scripts" / "export_digits.py"
    out = tmp_path / "digits"
    done = subprocess.run([sys.executable, str(script), str(out), "--split"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert len(ImageFolderSource(out).load().targets) == 1797
    other = tmp_path / "fonts" / "train" / "0"
    other.mkdir(parents=True)
    Image.new("L", (32, 32), 7).save(other / "0000.png")
    before = (other / "0000.png").read_bytes()
    refused = subprocess.run([sys.executable, str(script), str(tmp_path / "fonts"), "--split"], capture_output=True,
                             text=True, timeout=120)
    assert refused.returncode != 0 and "is not an empty folder" in refused.stderr
    assert (other / "0000.png").read_bytes() == before and len(list((tmp_path / "fonts").rglob("*"))) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits", "fonts"]  # no scratch folder left
