"""The advisor behind scenario=auto: measurements, decisions on constructed cases, and the recorded evidence."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import TINY

from tl.errors import TLError
from tl.scenarios import decide, probe_accuracy
from tl.train import train


@pytest.mark.parametrize(("per_class", "feat", "pixel", "expected"), [
    (5, 0.95, 0.40, "small_similar"),      # few examples, features far better than pixels
    (5, 0.70, 0.85, "small_different"),    # few examples, features worse than pixels (digits-like)
    (500, 0.90, 0.30, "large_similar"),
    (500, 0.60, 0.58, "large_different"),  # features barely beat pixels: not enough to call it similar
])
def test_decide_on_constructed_measurements(per_class, feat, pixel, expected):
    assert decide(per_class, feat, pixel, small_max_per_class=100, similar_min_gain=0.1) == expected


def test_probe_separates_separable_features_and_not_noise():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 30)
    separable = rng.normal(size=(120, 32)) + 4.0 * np.eye(4, 32)[y]   # class means far apart
    noise = rng.normal(size=(120, 32))                               # nothing to find
    assert probe_accuracy(separable, y) > 0.95
    assert probe_accuracy(noise, y) < 0.45                           # about chance (0.25)


@pytest.mark.parametrize(("per_class", "size"), [(4, "small"), (None, "large")])
def test_auto_resolves_to_a_preset_and_records_evidence(auto_cfg, tmp_path, per_class, size):
    overrides = ["trainer.max_epochs=1", "scenario.small_max_per_class=10"]
    if per_class:
        overrides.append(f"data.samples_per_class={per_class}")
    cfg = auto_cfg(*overrides)
    assert cfg.scenario.name != "auto" and cfg.scenario.evidence.decision == cfg.scenario.name
    results, objects = train(cfg)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["scenario"] in ("small_similar", "small_different", "large_similar", "large_different")
    assert saved["scenario"].startswith(size)
    ev = saved["scenario_evidence"]
    assert ev["decision"] == saved["scenario"] and ev["thresholds"]["small_max_per_class"] == 10
    assert 0 <= ev["feature_probe_acc"] <= 1 and 0 <= ev["pixel_probe_acc"] <= 1
    assert ev["examples_per_class"] == (per_class or 18)
    # The run then trained with the chosen preset's policy.
    chosen = saved["scenario"]
    expected_strategy = {"small_similar": "linear_probe", "small_different": "partial"}.get(chosen, "full")
    assert saved["strategy"] == expected_strategy


def test_auto_keeps_command_line_overrides(auto_cfg):
    cfg = auto_cfg("trainer.max_epochs=1", "finetune.label_smoothing=0.3", "data.samples_per_class=4",
                   "scenario.small_max_per_class=10")
    assert cfg.scenario.name.startswith("small_") and cfg.finetune.label_smoothing == 0.3
    results, objects = train(cfg)
    assert objects["module"].hparams.label_smoothing == 0.3


def test_train_refuses_an_undecided_auto(tiny_cfg):
    with pytest.raises(TLError, match="scenario=auto is decided before train"):
        train(tiny_cfg("scenario=auto"))


def test_train_honours_every_edit_to_a_final_config(tiny_cfg, tmp_path):
    """train(cfg) from Python runs the config it is given: edits made after composing are not re-composed away."""
    cfg = tiny_cfg("scenario=small_different", "trainer.max_epochs=1", "export=false")
    cfg.finetune.label_smoothing = 0.25
    cfg.model.drop_rate = 0.05
    cfg.data.image_size = 40
    cfg.trainer.max_epochs = 2
    results, objects = train(cfg)
    hp = objects["module"].hparams
    assert (hp.label_smoothing, hp.drop_rate) == (0.25, 0.05)
    assert objects["datamodule"].preprocess["input_size"] == [3, 40, 40] and results["epochs"] == 2


def test_auto_decision_reaches_results_and_tensorboard(auto_cfg, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = auto_cfg("trainer.max_epochs=1", "export=false")
    train(cfg)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["scenario_evidence"]["decision"] == saved["scenario"] == cfg.scenario.name
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert "scenario/decision/text_summary" in acc.Tags()["tensors"]


@pytest.mark.slow
def test_python_api_decides_auto_then_trains_the_edited_config(tmp_path):
    """The README's Python recipe, in a fresh interpreter (no Hydra app, no HydraConfig): compose, resolve, edit,
    train."""
    import subprocess
    import sys

    run_dir = tmp_path / "py_run"
    code = f"""
from tl.config import compose_config
from tl.scenarios import resolve
from tl.train import train

overrides = ["data=synthetic", "model.pretrained=none", "callbacks.progress=null", "logger=none", "export=false",
             "scenario.small_max_per_class=10", "data.samples_per_class=4", "hydra.run.dir={run_dir}"]
cfg = compose_config(overrides)
cfg.paths.output_dir = "{run_dir}"
cfg.paths.cache_dir = "{tmp_path / 'cache'}"
cfg = resolve(cfg, overrides)
cfg.trainer.max_epochs = 1
results, objects = train(cfg)
print("RESULT", results["scenario"], results["epochs"], results["n_train"])
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    scenario, epochs, n_train = proc.stdout.split("RESULT ")[1].split()
    assert scenario.startswith("small_") and (epochs, n_train) == ("1", "16")
    assert json.loads((run_dir / "results.json").read_text())["scenario_evidence"]["decision"] == scenario


@pytest.mark.slow
def test_a_fixed_size_backbone_trains_at_its_own_side(tiny_cfg, tmp_path):
    """A ViT's position embeddings are sized to 224 px: auto planned 128 px for small images and the run died in a
    traceback after the measurement; it now keeps the backbone's side, and a preset given another side is refused in
    one line before anything runs."""
    from tl.checks import validate
    from tl.data.transforms import fixed_input_side

    assert fixed_input_side("vit_tiny_patch16_224") == 224 and fixed_input_side("efficientnet_lite0") is None
    from conftest import make_cfg, synthetic_pil

    from tl.scenarios import resolve

    folder = tmp_path / "images"  # 32 px files: auto would train a CNN at 4x native, 128 px
    for i, img in enumerate(synthetic_pil(samples_per_class=8)):
        (folder / f"c{i // 8}").mkdir(parents=True, exist_ok=True)
        img.save(folder / f"c{i // 8}" / f"{i}.png")
    overrides = [*TINY, "scenario=auto", "data=imagefolder", f"data.root={folder}", "model.name=vit_tiny_patch16_224",
                 "model.pretrained=none", "trainer.max_epochs=1", "export=false"]
    cfg = resolve(make_cfg(tmp_path / "run", overrides), overrides)
    assert cfg.scenario.name.startswith("small") and cfg.data.image_size in (None, 224)  # null: the backbone's
    assert "the only side vit_tiny_patch16_224 takes" in cfg.scenario.evidence.plan.reason
    with pytest.raises(TLError, match="takes only 224 px inputs .* data.image_size=64: set data.image_size=224"):
        validate(tiny_cfg("model.name=vit_tiny_patch16_224", "model.pretrained=none", "data.image_size=64"))
    results, objects = train(cfg)  # and trains (it died in a traceback at 128 px)
    assert objects["datamodule"].preprocess["input_size"] == [3, 224, 224] and results["n_test"] > 0


@pytest.mark.parametrize("counts, size", [([1001, 1001, 1], 2000), ([10, 10, 1], 15), ([2, 2, 2, 2], 3),
                                          ([50, 5], 54), ([7, 3], 10)])
def test_the_probe_sample_takes_any_class_sizes_in_proportion(counts, size):
    """Found by a hostile tester: auto's probe sample used sklearn's stratified split, a traceback before training
    when a class had one training image or the sample was smaller than the number of classes."""
    from tl.scenarios import stratified_subset

    targets = np.repeat(np.arange(len(counts)), counts)
    indices = np.arange(len(targets)) + 100
    picked = stratified_subset(indices, targets, size, seed=0)
    assert len(picked) == len(set(picked.tolist())) == min(size, len(targets))
    got = np.bincount(targets[picked - 100], minlength=len(counts))
    assert np.all(got <= counts)
    if size >= len(counts):
        assert np.all(got >= 1)  # every class is in the sample
    assert np.all(np.abs(got - np.array(counts) * size / sum(counts)) <= 1.0 + (np.array(counts) < 2))
    assert np.array_equal(np.sort(picked), np.sort(stratified_subset(indices, targets, size, seed=0)))
