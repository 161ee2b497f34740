"""The advisor behind scenario=auto: measurements, decisions on constructed cases, and the recorded evidence."""

from __future__ import annotations

import json

import numpy as np
import pytest

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
def test_auto_resolves_to_a_preset_and_records_evidence(tiny_cfg, tmp_path, per_class, size):
    overrides = ["scenario=auto", "trainer.max_epochs=1", "scenario.small_max_per_class=10"]
    if per_class:
        overrides.append(f"data.samples_per_class={per_class}")
    results, objects = train(tiny_cfg(*overrides))
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


def test_auto_keeps_command_line_overrides(tiny_cfg):
    results, objects = train(tiny_cfg("scenario=auto", "trainer.max_epochs=1", "finetune.label_smoothing=0.3"))
    assert objects["module"].hparams.label_smoothing == 0.3
