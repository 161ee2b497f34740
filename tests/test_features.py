"""The frozen-feature cache: used when (and only when) it is exact, keyed so that any change invalidates it."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from tl.data import SyntheticSource, TransferDataModule
from tl.data.features import FeatureCache, extract_features
from tl.data.transforms import backbone_preprocess
from tl.models import TransferModule
from tl.models.backbone import classifier_names
from tl.train import train


@pytest.mark.slow
@pytest.mark.parametrize(("overrides", "cached"), [
    (["scenario=small_similar", "augment=none"], True),
    (["scenario=small_similar", "augment=light"], False),                 # augmentation: features change per epoch
    (["scenario=small_similar", "augment=none", "finetune.strategy=partial"], False),  # trainable backbone
    (["scenario=small_similar", "augment=none", "cache_features=false"], False),
])
def test_cache_is_used_only_where_exact(tiny_cfg, tmp_path, overrides, cached):
    results, _ = train(tiny_cfg(*overrides, "trainer.max_epochs=8", "optimizer.lr=0.02"))
    assert results["feature_cache"] is cached
    assert bool(list((tmp_path / "cache").glob("*.pt"))) is cached
    assert results["test/acc"] > 0.25  # it learns, on features or on images (4 classes, chance 0.25)


def test_second_run_hits_the_cache_and_changed_weights_miss_it(tmp_path):
    dm = TransferDataModule(SyntheticSource(), backbone_preprocess("efficientnet_lite0"), image_size=32, seed=0)
    dm.setup()
    module = TransferModule("efficientnet_lite0", num_classes=4, pretrained="package", strategy="linear_probe")
    module.load_pretrained()
    cache = FeatureCache(tmp_path)
    head = classifier_names(module.model)
    first = cache.get(module.model, head, dm)
    assert not list(tmp_path.glob("*.pt"))  # lazy: nothing is computed before a split is looked up
    first = dict(first)
    files = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*.pt")}
    assert len(files) == 3
    again = dict(cache.get(module.model, head, dm))
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("*.pt")} == files  # read, not rewritten
    assert torch.equal(first["train"][0], again["train"][0])

    key = cache.key(module.model, head, dm, "train")
    with torch.no_grad():
        module.model.conv_stem.weight[0, 0, 0, 0] += 1e-3
    assert cache.key(module.model, head, dm, "train") != key
    module.model.classifier.weight.data.add_(1.0)  # the head is not part of the key: it is what trains
    with torch.no_grad():
        module.model.conv_stem.weight[0, 0, 0, 0] -= 1e-3
    assert cache.key(module.model, head, dm, "train") == key

    other = TransferDataModule(SyntheticSource(seed=1), dm.preprocess, seed=0)  # other images
    other.setup()
    assert cache.key(module.model, head, other, "train") != key
    resized = TransferDataModule(SyntheticSource(), dm.preprocess, image_size=40, seed=0)  # other transform
    resized.setup()
    assert cache.key(module.model, head, resized, "train") != key


def test_cached_and_uncached_paths_give_the_same_logits():
    dm = TransferDataModule(SyntheticSource(), backbone_preprocess("efficientnet_lite0"), image_size=32, seed=0)
    dm.setup()
    module = TransferModule("efficientnet_lite0", num_classes=4, pretrained="package", strategy="linear_probe",
                            drop_rate=0.3).eval()
    module.load_pretrained()
    loader = DataLoader(dm.dataset("val", augmented=False), batch_size=16)
    feats, _ = extract_features(module.model, loader)
    images = torch.cat([x for x, _ in loader])
    with torch.no_grad():
        direct = module(images)
        cached = module(feats)  # (N, F) features go straight to the head
    assert torch.allclose(direct, cached, atol=1e-5)


def test_cached_and_uncached_runs_train_the_same_head(tiny_cfg, tmp_path):
    """Same batches, same dropout draws, same features: the head ends where it would have ended on images."""
    runs = {}
    for flag in ("false", "true"):
        cfg = tiny_cfg("scenario=small_similar", "augment=none", "model.drop_rate=0.3", "export=false",
                       f"cache_features={flag}", run_dir=tmp_path / flag)
        results, objects = train(cfg)
        runs[flag] = (results, objects["module"].model.get_classifier().weight.detach())
    (uncached, w_uncached), (cached, w_cached) = runs["false"], runs["true"]
    assert cached["feature_cache"] and not uncached["feature_cache"]
    assert torch.allclose(w_cached, w_uncached, atol=1e-5)
    for key in ("test/acc", "test/loss", "val/acc"):
        assert cached[key] == pytest.approx(uncached[key], abs=1e-4), key


def test_extraction_leaves_rng_and_module_modes_alone():
    dm = TransferDataModule(SyntheticSource(samples_per_class=4), backbone_preprocess("efficientnet_lite0"),
                            image_size=32, seed=0)
    dm.setup()
    module = TransferModule("efficientnet_lite0", num_classes=4, pretrained="none", strategy="linear_probe")
    module.train()  # frozen backbone in eval, head in train
    modes = {name: m.training for name, m in module.named_modules()}
    assert len(set(modes.values())) == 2
    state = torch.get_rng_state()
    extract_features(module.model, DataLoader(dm.dataset("train", augmented=False), batch_size=8, shuffle=True))
    assert torch.equal(torch.get_rng_state(), state)
    assert {name: m.training for name, m in module.named_modules()} == modes


@pytest.mark.parametrize("damage", ["truncate", "garble", "foreign"])
def test_a_damaged_cache_entry_is_recomputed_not_fatal(tmp_path, damage):
    dm = TransferDataModule(SyntheticSource(samples_per_class=4), backbone_preprocess("efficientnet_lite0"),
                            image_size=32, seed=0)
    dm.setup()
    module = TransferModule("efficientnet_lite0", num_classes=4, pretrained="none", strategy="linear_probe")
    head = classifier_names(module.model)
    feats, targets = FeatureCache(tmp_path).get(module.model, head, dm)["train"]
    entry = next(tmp_path.glob("train-*.pt"))
    if damage == "truncate":
        entry.write_bytes(entry.read_bytes()[:100])
    elif damage == "garble":
        entry.write_bytes(b"\x00" * 4096)
    else:
        torch.save({"features": torch.zeros(3, 7), "targets": torch.zeros(3)}, entry)
    again, again_targets = FeatureCache(tmp_path).get(module.model, head, dm)["train"]
    assert torch.allclose(again, feats) and torch.equal(again_targets, targets)
    assert torch.load(entry, weights_only=True)["features"].shape == feats.shape  # rewritten whole



def test_a_cache_inside_a_runs_results_or_an_export_is_refused(tmp_path):
    """Found by a hostile tester: paths.cache_dir=OTHER_RUN/export wrote feature files among that run's model files,
    exit 0. Refused in one line now; a folder of its own (also inside a run, beside its parts) is fine."""
    from tl.data.features import FeatureCache
    from tl.errors import TLError

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "export").mkdir()
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.json").write_text('{"format": "tl-export/1"}')
    for bad in (run / "export", run / "checkpoints" / "cache", tmp_path / "model"):
        with pytest.raises(TLError, match="the feature files would be written among its results"):
            FeatureCache(bad)
    FeatureCache(run / "cache")
    FeatureCache(tmp_path / "cache")
