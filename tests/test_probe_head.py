"""finetune.head_init=probe: the classifier starts as the cross-validated linear probe (LP-FT); with
finetune.freeze_bn_stats=true the features it was fitted on stay what the backbone computes while it fine-tunes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from tl.models.probe_head import fit_probe
from tl.train import train


def test_folded_weights_give_the_probe_own_probabilities():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 8)) * rng.uniform(0.1, 10, size=8) + rng.normal(size=8) * 5  # unscaled, off-centre
    y = np.repeat(np.arange(3), 20)
    x[y == 1, 0] += 8
    x[y == 2, 1] += 8
    weight, bias, evidence = fit_probe(x, y, seed=0, n_classes=3)
    reference = LogisticRegression(C=evidence["C"], max_iter=2000).fit(StandardScaler().fit_transform(x), y)
    ours = torch.softmax(torch.as_tensor(x @ weight.T + bias), dim=1).numpy()
    theirs = reference.predict_proba(StandardScaler().fit(x).transform(x))
    assert np.allclose(ours, theirs, atol=2e-3)  # the same fit up to the solver tolerance
    assert evidence["cv_acc"] > 0.5  # chance: 1/3


def test_binary_and_absent_classes_map_to_softmax_rows():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 5))
    y = np.repeat([0, 2], 20)  # class 1 has no training example
    x[y == 2, 0] += 4
    weight, bias, _ = fit_probe(x, y, seed=0, n_classes=3)
    probs = torch.softmax(torch.as_tensor(x @ weight.T + bias), dim=1).numpy()
    assert probs[:, 1].max() < 1e-6 and (probs.argmax(1) == y).mean() > 0.9


@pytest.mark.slow
def test_a_run_starts_from_the_probe_and_records_it(tiny_cfg, tmp_path):
    # Steps too small to move anything: the test accuracy is the starting head's, against a random head's
    common = ["scenario=small_different", "trainer.max_epochs=1", "optimizer.lr=1e-7", "export=false", "logger=none"]
    results, _ = train(tiny_cfg(*common, "finetune.head_init=probe", "finetune.freeze_bn_stats=true"))
    init = results["head_init"]
    assert init["cv_acc"] > 0.5 and init["C"] > 0  # 4 synthetic classes: chance 0.25
    assert "sanity/initial_loss" not in results  # the ln(C) check does not apply to a fitted head
    control, _ = train(tiny_cfg(*common, "finetune.freeze_bn_stats=true", run_dir=tmp_path / "control"))
    assert "head_init" not in control and "sanity/initial_loss" in control
    assert results["test/acc"] > 0.6 and results["test/acc"] > control["test/acc"] + 0.2
