"""What scenario=auto plans beyond the preset (tl/planning.py): resolution from the images' native size, a schedule
that fits the time budget, and small data fine-tuning whatever the domain."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tl.data.sources import ImageSet
from tl.inference import choose_delivery
from tl.planning import (
    ENSEMBLE_EXPORT_S,
    FINISH_S,
    fit_budget,
    forward_seconds,
    native_side,
    schedules,
    small_budget,
    small_side,
)
from tl.scenarios import decide
from tl.train import train


@pytest.mark.parametrize(("native", "expected"), [
    (8, 64),      # digits-like: 4x is 32, floor at 64
    (28, 128),    # MNIST-like: 112 rounded up to a multiple of 32
    (32, 128),
    (64, 224),    # 256 capped at the backbone's side
    (500, 224),   # photos: the backbone's own
    (0, 224),     # unknown: the backbone's own
])
def test_small_images_train_at_four_times_their_side(native, expected):
    assert small_side(native, 224) == expected


def test_native_side_reads_headers_and_memory(tmp_path):
    from PIL import Image

    paths = []
    for i, size in enumerate([(40, 30), (50, 30), (60, 31)]):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.new("RGB", size).save(paths[-1])
    on_disk = ImageSet(classes=["a"], targets=np.zeros(3, dtype=np.int64), paths=paths)
    assert native_side(on_disk, np.arange(3)) == 30
    in_memory = ImageSet(classes=["a"], targets=np.zeros(2, dtype=np.int64), images=torch.zeros(2, 1, 8, 9))
    assert native_side(in_memory, np.arange(2)) == 8


def test_the_budget_cuts_validation_then_epochs_then_the_side():
    common = {"spent_s": 10.0, "per_image_s": 0.01, "n_train": 100, "n_val": 300, "n_test": 100, "epochs": 30,
              "side": 224, "backbone_side": 224}
    free = fit_budget(None, **common, can_shrink=True)
    assert (free["epochs"], free["val_every"], free["side"]) == (30, 1, 224) and free["fits"]
    # 30 epochs: 120 s of training steps (4 passes per image), 90 s of validation, 5 s of test and report, 10 s
    # spent, and the fixed start-up and export
    assert free["estimated_s"] == pytest.approx(10 + FINISH_S + 0.01 * (30 * 4 * 100 + 30 * 300 + 300 + 2 * 100))
    fewer_checks = fit_budget(200.0, **common, can_shrink=True)
    assert fewer_checks["epochs"] == 30 and fewer_checks["val_every"] > 1 and fewer_checks["estimated_s"] <= 200
    fewer_epochs = fit_budget(160.0, **common, can_shrink=True)
    assert fewer_epochs["val_every"] == 5 and 15 <= fewer_epochs["epochs"] < 30 and fewer_epochs["estimated_s"] <= 160
    smaller = fit_budget(60.0, **common, can_shrink=True)
    assert smaller["epochs"] == 15 and smaller["side"] < 224 and smaller["estimated_s"] <= 60
    impossible = fit_budget(15.0, **common, can_shrink=False)
    assert not impossible["fits"] and (impossible["epochs"], impossible["side"]) == (15, 224)


def test_a_probe_on_cached_features_keeps_its_schedule_under_any_budget():
    """Found by a hostile tester: on cached features the epochs train the head alone, so the cost does not depend on
    them; the plan still halved a probe's epochs under a tight budget and said "does not fit". Now only the side
    (every image's one pass through the backbone) is cut; the schedule stays the preset's."""
    common = {"spent_s": 21.6, "per_image_s": 0.036, "n_train": 22, "n_val": 4, "n_test": 4, "epochs": 60,
              "backbone_side": 224, "features_cached": True}
    free = fit_budget(None, **common, side=224, can_shrink=False)
    tight = fit_budget(30.0, **common, side=224, can_shrink=False)
    assert (tight["epochs"], tight["val_every"]) == (free["epochs"], free["val_every"]) == (60, 1)
    assert not tight["fits"] and tight["estimated_s"] == free["estimated_s"]
    shrunk = fit_budget(30.0, **common, side=160, can_shrink=True)
    assert (shrunk["epochs"], shrunk["val_every"]) == (60, 1) and shrunk["side"] < 160


@pytest.mark.parametrize("epochs", [30, 23, 12, 7, 2, 1])
def test_every_planned_schedule_validates_its_last_epoch(epochs):
    # Lightning validates (and keeps checkpoints) every check_val_every_n_epoch epochs only: a plan of 29 epochs
    # validating every 5 trained epochs 26-29 and threw them away
    for fixed in (False, True):
        for e, every, side in schedules(epochs, 224, epochs_fixed=fixed, can_shrink=True):
            assert e % every == 0 and e >= every and side >= 64
            assert e == epochs if fixed else epochs / 2 <= e <= epochs
    assert schedules(30, 224)[3:] == [(30, 5, 224), (25, 5, 224), (20, 5, 224), (15, 5, 224)]
    # the user's interval is the only one tried
    assert {every for _, every, _ in schedules(30, 224, intervals=(3,))} == {3}


def test_an_interval_that_does_not_divide_the_epochs_is_refused(tiny_cfg):
    from tl.checks import validate
    from tl.errors import TLError

    with pytest.raises(TLError, match=r"check_val_every_n_epoch=2 does not divide trainer.max_epochs=3.*after epoch 2"):
        validate(tiny_cfg("trainer.max_epochs=3", "trainer.check_val_every_n_epoch=2"))
    with pytest.raises(TLError, match="check_val_every_n_epoch=5 does not divide trainer.max_epochs=1"):
        validate(tiny_cfg("trainer.max_epochs=1", "trainer.check_val_every_n_epoch=5"))
    validate(tiny_cfg("trainer.max_epochs=4", "trainer.check_val_every_n_epoch=2"))


def test_a_snapshot_ensemble_costs_its_members_scoring_and_export():
    common = {"spent_s": 10.0, "per_image_s": 0.01, "n_train": 100, "n_val": 300, "n_test": 100, "epochs": 30,
              "side": 224, "backbone_side": 224, "can_shrink": False}
    one, three = fit_budget(None, **common), fit_budget(None, **common, members=3)
    # three members: each scores val and test once more, and the export holds two more models
    assert three["estimated_s"] - one["estimated_s"] == pytest.approx(0.01 * 3 * 400 + 2 * ENSEMBLE_EXPORT_S)


@pytest.mark.parametrize(("deliver", "ensemble_val", "best_val", "expected"), [
    ("val", 0.90, 0.90, "ensemble"),  # a tie: the ensemble (the best checkpoint's score is the max of many looks)
    ("val", 0.90, 0.92, "best"),
    ("val", None, 0.92, "best"),      # no validation split: nothing to compare on
    ("ensemble", 0.50, 0.92, "ensemble"),
    ("best", 0.99, 0.92, "best"),
])
def test_what_a_snapshot_run_delivers(deliver, ensemble_val, best_val, expected):
    model, reason = choose_delivery(deliver, ensemble_val, best_val, 3)
    assert model == expected and reason


def test_the_default_small_data_budget_grows_with_examples_per_class():
    assert small_budget(4.5, 3) == small_budget(4.5, 10) == 4.5  # few-shot: the bound itself
    assert small_budget(4.5, 60) == pytest.approx(27.0) and small_budget(4.5, 100) == pytest.approx(45.0)


def test_forward_timing_leaves_the_model_as_it_was():
    import timm

    model = timm.create_model("efficientnet_lite0", num_classes=3)
    assert forward_seconds(model, 64, batch=2) > 0 and model.training  # the model's mode is left as it was


def test_forward_timing_ignores_a_burst_of_load_beside_it():
    """A burst of another process's load during one timed batch must not make the machine read slow (the plan
    would cut the side and the epochs for it)."""
    import time

    class Bursty(torch.nn.Module):  # the second timed batch hits a burst: 20x slower
        def __init__(self):
            super().__init__()
            self.weight, self.calls = torch.nn.Parameter(torch.zeros(1)), 0

        def forward(self, x):
            self.calls += 1
            time.sleep(0.4 if self.calls == 3 else 0.02)
            return x.mean() + self.weight

    model = Bursty()
    per_image = forward_seconds(model, 8, batch=2)
    assert model.calls == 4  # a warm-up and three timed batches
    assert 0.01 <= per_image < 0.02  # 0.02 s per batch of 2: the burst is not in it (the mean would read 0.075)


@pytest.mark.parametrize(("feat", "pixel", "finetune", "expected"), [
    (0.95, 0.40, True, "small_different"),   # similar, but small data fine-tunes (measured across datasets)
    (0.95, 0.40, False, "small_similar"),    # the textbook rule, when asked for
    (0.70, 0.85, True, "small_different"),
])
def test_small_data_fine_tunes_whatever_the_domain(feat, pixel, finetune, expected):
    assert decide(5, feat, pixel, 100, 0.1, small_finetune=finetune) == expected
    assert decide(500, feat, pixel, 100, 0.1, small_finetune=finetune).startswith("large")


@pytest.mark.parametrize(("per_class", "feat", "samples", "expected"), [
    (60, 0.99, 600, "small_similar"),     # the probe is all but perfect on many images: nothing left to fine-tune
    (60, 0.97, 600, "small_different"),   # errors left for fine-tuning to remove
    (10, 1.00, 100, "small_different"),   # perfect on 100 images is luck as often as not: fine-tune
    (500, 0.99, 2000, "large_similar"),   # large data follows the textbook's quadrants
])
def test_a_probe_with_nothing_left_to_win_is_trained_as_a_probe(per_class, feat, samples, expected):
    assert decide(per_class, feat, 0.5, 100, 0.1, small_finetune=True, probe_samples=samples,
                  probe_enough_acc=0.98, probe_enough_samples=200) == expected
    assert decide(per_class, feat, 0.5, 100, 0.1, small_finetune=True, probe_samples=samples,
                  probe_enough_acc=None) != "small_similar"  # null: small data always fine-tunes


def _small_folder(root, n=10):
    from PIL import Image

    rng = np.random.default_rng(0)
    for k, c in enumerate("abc"):  # a folder of 32 px images, no image size in its data config
        (root / c).mkdir(parents=True)
        for i in range(n):
            pixels = (rng.random((32, 32, 3)) * 80 + 80 * k).astype(np.uint8)
            Image.fromarray(pixels).save(root / c / f"{i}.png")
    return root


@pytest.mark.slow
def test_auto_trains_a_probe_that_is_enough_at_the_side_it_measured(auto_cfg, tmp_path):
    common = ["data=imagefolder", f"data.root={_small_folder(tmp_path / 'data')}", "data.samples_per_class=4",
              "export=false", "logger=none"]
    assert auto_cfg(*common).scenario.name == "small_different"  # 12 images: too few to trust a perfect probe
    cfg = auto_cfg(*common, "scenario.probe_enough_samples=12")
    ev = cfg.scenario.evidence
    assert ev.feature_probe_acc >= 0.98 and cfg.scenario.name == "small_similar"
    assert "probe_enough_acc" in ev.reason and ev.thresholds.probe_enough_samples == 12
    side = ev.input_side
    assert cfg.data.image_size is None and ev.plan.side == side
    assert "the side the probe was measured at" in ev.plan.reason
    # the cost is one pass over the images (the features are cached), not the epochs' training steps
    per_image = ev.forward_ms_per_image / 1000
    assert ev.plan.estimated_s < 60 + 10 * per_image * (ev.n_train + ev.n_val + ev.n_test)
    results, _ = train(cfg)
    assert results["strategy"] == "linear_probe" and results["test/acc"] > 0.9


@pytest.mark.slow
def test_auto_plans_the_side_and_a_budget_and_records_why(auto_cfg, tmp_path):
    common = ["data=imagefolder", f"data.root={_small_folder(tmp_path / 'data')}", "data.samples_per_class=4",
              "export=false", "logger=none"]
    free = auto_cfg(*common)
    plan = free.scenario.evidence.plan
    assert free.scenario.name == "small_different" and free.data.image_size == plan.side == 128  # 32 px images
    assert free.trainer.max_epochs == plan.epochs == plan.preset_epochs and plan.fits
    assert free.snapshots.cycles == 0 and "snapshot" not in plan.reason  # off by default (measured: README)
    # asked for: a snapshot ensemble inside those epochs (one cycle per epoch at most: TINY's 2), delivered
    snap = auto_cfg(*common, "scenario.small_snapshots=3", "scenario.small_deliver=val")
    assert (snap.snapshots.cycles, snap.snapshots.deliver) == (2, "val")
    assert "snapshot ensemble of 2 cosine cycles" in snap.scenario.evidence.plan.reason
    # a schedule without the snapshots' restarts gets none (scheduler=warm_restarts has cycles of its own)
    assert auto_cfg(*common, "scenario.small_snapshots=3", "scheduler=warm_restarts").snapshots.cycles == 0
    # the command line's snapshots stand
    assert auto_cfg(*common, "scenario.small_snapshots=3", "snapshots.cycles=0").snapshots.cycles == 0
    # small data is bounded by default (scenario.small_budget_minutes), and says so
    assert plan.budget_minutes == 4.0 and plan.budget_from.startswith("scenario.small_budget_minutes")
    tight = auto_cfg(*common, "scenario.small_budget_minutes=0.01").scenario.evidence.plan
    assert not tight.fits and tight.side == 64 and "small_budget_minutes" in tight.reason
    assert "is 128 px; smaller to fit the budget" in tight.reason
    assert "4x native, within 64..224;" in free.scenario.evidence.plan.reason
    assert "no measured benefit" in free.scenario.evidence.plan.reason  # 12 images: no significant side gain
    unbounded = auto_cfg(*common, "scenario.small_budget_minutes=null").scenario.evidence.plan
    assert unbounded.budget_minutes is None and unbounded.budget_from is None and unbounded.side == 128
    cfg = auto_cfg(*common, "scenario.budget_minutes=0.01")  # 0.6 s: less than the measurement took
    plan = cfg.scenario.evidence.plan
    assert not plan.fits and cfg.trainer.max_epochs == plan.epochs == 2  # the command line's epochs (TINY) stand
    # validating every 2 of the 2 epochs: the last epoch is validated (every 5 never validated them)
    assert cfg.data.image_size == plan.side == 64 and cfg.trainer.check_val_every_n_epoch == 2
    assert "does not fit" in plan.reason
    given = auto_cfg(*common, "data.image_size=48", "trainer.max_epochs=3", "scenario.budget_minutes=0.01",
                     "scenario.small_snapshots=3")
    assert given.data.image_size == 48 and given.trainer.max_epochs == 3  # the command line wins over the plan
    results, _ = train(given)
    saved = json.loads((tmp_path / "results.json").read_text())["scenario_evidence"]["plan"]
    assert results["epochs"] == 3 and saved["side"] == 48 and "budget" in saved["reason"]
    assert results["delivered"]["model"] == "ensemble" and results["ensemble/size"] == 3
    assert results["test/acc"] == results["ensemble/test/acc"]


@pytest.mark.parametrize(("discordant", "expected_side", "why"), [
    ((30, 5), 224, "-> 224 px"),                  # the backbone's side gets 25 more of 160 right: p ~ 1e-5
    ((15, 10), 128, "no measured benefit"),       # +5 of 160: p 0.21, within the probe's noise (fonts at 10/class)
    ((6, 2), 128, "no measured benefit"),         # gain 0.025 >= side_min_gain, but 8 images decide it: p 0.14
    ((0, 12), 128, "no measured benefit"),        # the small side is better
])
def test_the_side_follows_a_measured_benefit_only(tmp_path, discordant, expected_side, why):
    from conftest import TINY, make_cfg

    from tl.config import compose_config
    from tl.scenarios import plan

    overrides = [*TINY, "data=imagefolder", f"data.root={tmp_path}"]
    cfg = make_cfg(tmp_path, [*overrides, "scenario=auto", "scenario.small_budget_minutes=null"])
    final = compose_config([*overrides, "scenario=small_different"])
    m = {"native_side": 32, "input_side": 224, "forward_ms_per_image": 10.0, "n_train": 160, "n_val": 320,
         "n_test": 320, "examples_per_class": 10.0, "probe_samples": 160, "feature_probe_acc": 0.9,
         "small_side": 128, "small_side_probe_acc": 0.9 - (discordant[0] - discordant[1]) / 160,
         "side_probe_discordant": list(discordant)}
    out, result = plan(cfg, final, m, overrides, 1.0)
    assert result["side"] == expected_side and f"data.small_data_image_size={expected_side}" in out
    assert why in result["reason"] and f"got {discordant[0]} training images right at 224 px" in result["reason"]
    assert result["side_gain"] == pytest.approx((discordant[0] - discordant[1]) / 160, abs=1e-4)
    # null: 4x native, unmeasured
    cfg = make_cfg(tmp_path, [*overrides, "scenario=auto", "scenario.side_min_gain=null"])
    out, result = plan(cfg, final, m, overrides, 1.0)
    assert result["side"] == 128 and "side_gain" not in result and "probe got" not in result["reason"]


def test_auto_measures_the_probe_at_both_sides_on_the_same_images(auto_cfg, tmp_path):
    common = ["data=imagefolder", f"data.root={_small_folder(tmp_path / 'data')}", "data.samples_per_class=4",
              "export=false", "logger=none"]
    ev = auto_cfg(*common).scenario.evidence
    assert ev.small_side == 128 and 0 <= ev.small_side_probe_acc <= 1
    big, little = ev.side_probe_discordant
    assert 0 <= big + little <= ev.probe_samples == 12
    assert ev.plan.side == 128 and "sign test" in ev.plan.reason  # 12 images cannot show a significant benefit
    # a side given on the command line is not measured
    given = auto_cfg(*common, "data.image_size=96").scenario.evidence
    assert "small_side" not in given and "side_probe_discordant" not in given and given.plan.side == 96


def test_a_resumed_auto_run_keeps_its_first_plan(auto_cfg, tmp_path):
    """Found by a hostile tester: a resume (ckpt_path=auto) measured and planned again, from the machine's speed at
    that moment, and changed the run's epochs and validation interval half-way without a word. Now it goes on under
    the plan its config.yaml records (nothing measured again), the command line's keys still winning."""
    from omegaconf import OmegaConf

    common = ["data=imagefolder", f"data.root={_small_folder(tmp_path / 'data')}", "data.samples_per_class=4",
              "export=false", "logger=none"]
    first = auto_cfg(*common, "scenario.small_budget_minutes=0.01")  # planned small: 64 px, validating every 2
    assert (first.data.image_size, first.trainer.check_val_every_n_epoch) == (64, 2)
    OmegaConf.save(first, tmp_path / "config.yaml")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
    fresh = auto_cfg(*common)  # no ckpt_path: a new plan (128 px under the default budget)
    assert fresh.data.image_size == 128 and "resumed" not in fresh.scenario.evidence.plan
    resumed = auto_cfg(*common, "ckpt_path=auto")
    assert (resumed.scenario.name, resumed.data.image_size, resumed.trainer.check_val_every_n_epoch) == \
        (first.scenario.name, 64, 2)
    assert resumed.scenario.evidence.plan.resumed.startswith("the run's first plan")
    assert resumed.scenario.evidence.plan.reason == first.scenario.evidence.plan.reason
    extended = auto_cfg(*common, "ckpt_path=last", "data.image_size=96")  # the command line wins
    assert extended.data.image_size == 96 and extended.trainer.check_val_every_n_epoch == 2


def test_no_side_costs_less_per_image_than_the_pass_measured_at_the_smallest():
    """At small sides a forward pass costs more than its share of pixels (fixed per-layer costs: EfficientNet-Lite0 at
    64 px took 1.4x its pixel share here): the estimate takes the pass measured at MIN_SIDE as a floor, so 64 px
    plans of many small classes no longer ran 1.6-1.8x their estimate (found by a hostile tester). At the backbone's
    side the floor changes nothing."""
    common = {"spent_s": 0.0, "per_image_s": 0.04, "n_train": 600, "n_val": 0, "n_test": 0, "epochs": 10,
              "backbone_side": 224, "can_shrink": False}
    plain = fit_budget(None, **common, side=64)
    floored = fit_budget(None, **common, side=64, floor_per_image_s=0.004)
    assert floored["estimated_s"] - FINISH_S == pytest.approx(0.004 * 10 * 4 * 600)
    assert plain["estimated_s"] - FINISH_S == pytest.approx(0.04 * (64 / 224) ** 2 * 10 * 4 * 600, abs=0.1)
    assert fit_budget(None, **common, side=224, floor_per_image_s=0.004)["estimated_s"] == \
        fit_budget(None, **common, side=224)["estimated_s"]
