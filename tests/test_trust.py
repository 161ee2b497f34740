"""Imbalance, metrics beyond accuracy, calibration, the errors worth a look, early stopping (tl.data.balance,
tl.report, tl.callbacks.checkpoint.PatientEarlyStopping)."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, make_cfg
from PIL import Image
from torch.nn import functional as F

from tl.data.balance import ClassBalancedSampler, class_weights, imbalance_ratio, resolve_balance
from tl.errors import TLError
from tl.models.module import weighted_cross_entropy, weighted_soft_cross_entropy
from tl.report import fit_temperature, per_class_metrics, rank_errors
from tl.train import train

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread

SKEWED = [0] * 900 + [1] * 90 + [2] * 10


# -- balance ----------------------------------------------------------------------------------------------------
def test_balanced_sampler_draws_every_class_equally_often():
    sampler = ClassBalancedSampler(SKEWED, 3, seed=0)
    draws = []
    for epoch in range(5):
        sampler.set_epoch(epoch)
        draws += list(sampler)
    assert len(draws) == 5 * len(SKEWED)
    frequencies = np.bincount(np.asarray(SKEWED)[draws], minlength=3) / len(draws)
    assert frequencies == pytest.approx([1 / 3] * 3, abs=0.02)  # shuffling alone: 0.90 / 0.09 / 0.01


def test_balanced_sampler_deals_one_seeded_draw_out_to_the_ranks():
    whole = ClassBalancedSampler(SKEWED, 3, num_replicas=1, rank=0, seed=3)
    whole.set_epoch(2)
    shares = []
    for rank in range(2):
        sampler = ClassBalancedSampler(SKEWED, 3, num_replicas=2, rank=rank, seed=3)
        sampler.set_epoch(2)
        shares.append(list(sampler))
    drawn = list(whole)
    assert shares[0] == drawn[0::2] and shares[1] == drawn[1::2] and len(shares[0]) == len(shares[1]) == 500
    assert list(whole) == drawn  # the same epoch draws the same examples (a resumed epoch too)
    whole.set_epoch(3)
    assert list(whole) != drawn


def test_class_weights_give_every_class_the_same_total_weight():
    counts = [900, 90, 10]
    totals = [n * w for n, w in zip(counts, class_weights(counts), strict=True)]
    assert totals == pytest.approx([1000 / 3] * 3)
    assert imbalance_ratio(counts) == 90 and imbalance_ratio([5, 0]) == math.inf


def test_auto_balances_from_the_documented_ratio_on():
    assert resolve_balance("auto", [30, 10], 3.0) == "weights"
    assert resolve_balance("auto", [29, 10], 3.0) == "none"
    assert resolve_balance("weights", [10, 10], 3.0) == "weights"
    with pytest.raises(TLError, match="data.balance='sampled' is unknown"):
        resolve_balance("sampled", [10, 10], 3.0)


def test_weighted_soft_cross_entropy_is_weighted_cross_entropy_on_hard_labels():
    logits, y = torch.randn(6, 3), torch.tensor([0, 1, 2, 2, 1, 0])
    w = torch.tensor(class_weights([900, 90, 10]), dtype=torch.float32)
    hard = F.one_hot(y, 3).float()
    assert weighted_soft_cross_entropy(logits, hard, w) == pytest.approx(float(F.cross_entropy(logits, y, weight=w)))
    mixed = 0.7 * hard + 0.3 * hard.flip(0)  # mixup pairs a batch with its mirror
    # each example weighted by its targets' class weights; its own cross-entropy unweighted within
    by_hand = -sum(float((w * mixed[i]).sum() * (mixed[i] * logits[i].log_softmax(-1)).sum()) for i in range(6)) / \
        float((mixed * w).sum())
    assert weighted_soft_cross_entropy(logits, mixed, w) == pytest.approx(by_hand)
    assert weighted_cross_entropy(logits, y, w) == pytest.approx(float(F.cross_entropy(logits, y, weight=w)))


@pytest.mark.parametrize("soft", [False, True])
def test_class_weights_with_label_smoothing_keep_each_examples_best_prediction_its_label(soft):
    """PyTorch's cross_entropy(weight=w, label_smoothing=0.1) weights the smoothing term by every class's weight:
    with 120/3/120 training images the loss-minimising prediction for a brick image was grass (p 0.58), and a default
    run on such data (balance=auto, smoothing 0.1) scored 0.47 balanced accuracy against 0.78 without smoothing."""
    w = torch.tensor(class_weights([120, 3, 120]), dtype=torch.float32)
    y = torch.tensor([0, 2])
    assert float(F.cross_entropy(torch.zeros(1, 3), y[:1], weight=w, label_smoothing=0.1)) > 0  # the flawed one...
    logits = torch.zeros(2, 3, requires_grad=True)
    opt = torch.optim.LBFGS([logits], max_iter=200)
    target = (F.one_hot(y, 3).float() * 0.9 + 0.1 / 3)

    def closure():
        opt.zero_grad()
        loss = weighted_soft_cross_entropy(logits, target, w) if soft else weighted_cross_entropy(logits, y, w, 0.1)
        loss.backward()
        return loss

    opt.step(closure)
    probs = logits.detach().softmax(-1)
    assert probs.argmax(-1).tolist() == [0, 2]
    assert probs[0].tolist() == pytest.approx([0.9 + 0.1 / 3, 0.1 / 3, 0.1 / 3], abs=1e-3)  # the smoothed target
    flawed = torch.zeros(1, 3, requires_grad=True)  # ...whose optimum for the same brick image is the rare class
    opt = torch.optim.LBFGS([flawed], max_iter=200)

    def flawed_closure():
        opt.zero_grad()
        loss = F.cross_entropy(flawed, y[:1], weight=w, label_smoothing=0.1)
        loss.backward()
        return loss

    opt.step(flawed_closure)
    assert flawed.detach().argmax().item() == 1


# -- metrics and calibration ------------------------------------------------------------------------------------
def test_per_class_metrics_equal_a_hand_computation():
    targets = torch.tensor([0, 0, 0, 1, 1, 2])
    predicted = torch.tensor([0, 0, 1, 1, 2, 2])  # confusion rows (true): [2 1 0], [0 1 1], [0 0 1]
    rows = per_class_metrics(F.one_hot(predicted, 3).float(), targets, ["a", "b", "c"])
    assert [r["class"] for r in rows] == ["a", "b", "c"] and [r["support"] for r in rows] == [3, 2, 1]
    assert [r["precision"] for r in rows] == pytest.approx([1.0, 0.5, 0.5])
    assert [r["recall"] for r in rows] == pytest.approx([2 / 3, 0.5, 1.0])
    assert rows[0]["f1"] == pytest.approx(2 * 1.0 * (2 / 3) / (1 + 2 / 3))

    from tl.inference import classification_metrics

    m = classification_metrics(F.one_hot(predicted, 3).float(), targets, ["a", "b", "c"])
    assert m["test/balanced_acc"] == pytest.approx((2 / 3 + 0.5 + 1.0) / 3)
    assert m["test/macro_f1"] == pytest.approx(np.mean([r["f1"] for r in rows]))
    assert m["test/acc"] == pytest.approx(4 / 6)


def test_temperature_undoes_overconfidence_and_lowers_the_nll_it_was_fitted_on():
    g = torch.Generator().manual_seed(0)
    true_logits = 2 * torch.randn(4000, 5, generator=g)
    targets = torch.multinomial(true_logits.softmax(-1), 1, generator=g).squeeze(1)  # calibrated by construction
    fitted = fit_temperature(3 * true_logits, targets)  # an overconfident model: logits 3x too large
    assert fitted["temperature"] == pytest.approx(3.0, rel=0.1)
    assert fitted["val_nll_after"] < fitted["val_nll_before"]
    already = fit_temperature(true_logits, targets)
    assert already["temperature"] == pytest.approx(1.0, abs=0.1)


def test_without_validation_errors_the_temperature_matches_laplaces_accuracy_estimate():
    g = torch.Generator().manual_seed(2)
    logits = 2 * torch.randn(200, 4, generator=g)
    targets = logits.argmax(dim=1)  # no errors: the NLL alone would push T to its sharpest bound
    logits[torch.arange(200), targets] += 1.0  # every margin at least 1: the target is reachable within the bounds
    fitted = fit_temperature(logits, targets)
    assert fitted["method"] == "confidence_match" and fitted["val_errors"] == 0
    confidence = (logits / fitted["temperature"]).softmax(-1).max(-1).values.mean()
    assert float(confidence) == pytest.approx(201 / 202, abs=1e-4)
    assert fit_temperature(3 * logits, (targets + 1) % 4)["method"] == "nll"


def test_top_losses_are_the_highest_loss_rows():
    g = torch.Generator().manual_seed(1)
    probs = torch.rand(200, 4, generator=g).softmax(-1)
    targets = torch.randint(0, 4, (200,), generator=g)
    wrong = rank_errors(probs, targets, 10, "wrong")
    predicted, confidence = probs.argmax(1), probs.max(1).values
    candidates = sorted((i for i in range(200) if predicted[i] != targets[i]), key=lambda i: -confidence[i])
    assert wrong == candidates[:10]
    unlikely = rank_errors(probs, targets, 10, "unlikely")
    p_given = probs[torch.arange(200), targets]
    assert unlikely == sorted(range(200), key=lambda i: p_given[i])[:10]
    assert rank_errors(probs, targets, 0, "wrong") == []


# -- an imbalanced run, end to end ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def skewed_folder(tmp_path_factory):
    """Synthetic gratings as an image folder: classes 0 and 1 with 60 images, 2 and 3 with 12 (ratio 5)."""
    from tl.data.sources import SyntheticSource

    folder = tmp_path_factory.mktemp("skewed")
    data = SyntheticSource(num_classes=4, samples_per_class=60, image_size=32, seed=0).load()
    for c in range(4):
        members = np.flatnonzero(data.targets == c)[: 60 if c < 2 else 12]
        (folder / f"class_{c}").mkdir()
        for n, i in enumerate(members):
            Image.fromarray(data.images[i].permute(1, 2, 0).numpy()).save(folder / f"class_{c}" / f"{n:03d}.png")
    return folder


@pytest.fixture(scope="module")
def skewed_run(skewed_folder, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("skewed_run")
    cfg = make_cfg(run_dir, [*TINY, "data=imagefolder", f"data.root={skewed_folder}", "data.num_workers=0",
                             "data.image_size=32", "data.crop_pct=1.0", "scenario=large_similar", "augment=none",
                             "optimizer.lr=3e-3", "trainer.max_epochs=3",
                             "report.top_losses=5"])
    results, objects = train(cfg)
    return run_dir, results, objects


def test_auto_balance_measures_the_imbalance_and_weights_the_small_classes(skewed_run):
    run_dir, results, objects = skewed_run
    assert results["imbalance_ratio"] == pytest.approx(5.0, rel=0.15)
    assert results["balance"]["asked"] == "auto" and results["balance"]["mode"] == "weights"
    dm, module = objects["datamodule"], objects["module"]
    counts = np.asarray(dm.class_counts)
    weights = module.class_weights.numpy()
    assert counts * weights == pytest.approx([counts.sum() / 4] * 4, rel=1e-5)  # every class the same total weight

    dm.balance_mode = "sampler"  # the other correction, on the same split: classes drawn evenly
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, ClassBalancedSampler)
    drawn = np.asarray(dm.images.targets)[dm.split_indices["train"]][list(loader.sampler)]
    assert np.bincount(drawn, minlength=4).min() > 0.15 * len(drawn)  # ~25% each, not 8% for the small classes
    dm.balance_mode = "weights"


def test_balance_works_with_the_feature_cache_and_with_mixup(skewed_folder, tmp_path):
    common = [*TINY, "data=imagefolder", f"data.root={skewed_folder}", "data.num_workers=0", "report.top_losses=0",
              "data.image_size=32", "data.crop_pct=1.0", "logger=none", "trainer.max_epochs=1"]
    cached, objects = train(make_cfg(tmp_path / "probe", [*common, "scenario=small_similar", "data.balance=sampler"]))
    assert cached["feature_cache"] and cached["balance"]["mode"] == "sampler"
    fit_data = objects["trainer"].datamodule  # the cached-feature data module the run trained on
    assert type(fit_data).__name__ == "FeatureDataModule"
    assert isinstance(fit_data.train_dataloader().sampler, ClassBalancedSampler)

    mixed, objects = train(make_cfg(tmp_path / "mix", [*common, "scenario=large_different", "augment=mix",
                                                       "data.balance=weights"]))
    weights = objects["module"].class_weights
    assert objects["module"].mixup is not None and weights is not None
    assert float(weights[3]) > 3 * float(weights[0])  # the small classes weigh ~5x more
    assert math.isfinite(mixed["test/loss"]) and mixed["balance"]["mode"] == "weights"


def test_results_carry_calibrated_and_per_class_metrics(skewed_run):
    run_dir, results, _ = skewed_run
    for key in ("test/acc", "test/balanced_acc", "test/macro_f1", "test/ece", "test/ece_uncalibrated",
                "calibration/temperature", "test/nll", "test/nll_uncalibrated"):
        assert isinstance(results[key], float), key
    assert [r["class"] for r in results["test/per_class"]] == [f"class_{c}" for c in range(4)]
    assert sum(r["support"] for r in results["test/per_class"]) == results["n_test"]
    recall = np.mean([r["recall"] for r in results["test/per_class"]])
    assert results["test/balanced_acc"] == pytest.approx(recall, abs=1e-6)
    assert results["calibration/val_nll_after"] <= results["calibration/val_nll_before"]
    assert results["test/nll"] <= results["test/nll_uncalibrated"] + 0.05  # fitted on val, tested on test
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["calibration/temperature"] == results["calibration/temperature"]


def test_the_temperature_travels_with_checkpoint_and_export_into_predict_and_evaluate(skewed_run, skewed_folder,
                                                                                    tmp_path):
    from tl.evaluate import evaluate
    from tl.inference import load_classifier
    from tl.predict import predict

    run_dir, results, _ = skewed_run
    t = results["calibration/temperature"]
    ckpt = torch.load(results["best_ckpt"], weights_only=True)
    assert ckpt["calibration"]["temperature"] == t and ckpt["calibration"]["fitted_on"] == "val"
    meta = json.loads((run_dir / "export" / "model.json").read_text())
    assert meta["calibration"]["temperature"] == t
    assert load_classifier(run_dir / "export").temperature == t == load_classifier(results["best_ckpt"]).temperature

    files = sorted(skewed_folder.rglob("*.png"))[::9]
    clf = load_classifier(results["best_ckpt"])
    from tl.data.transforms import eval_transform

    x = torch.stack([eval_transform(clf.preprocess)(Image.open(f).convert("RGB")) for f in files])
    with torch.no_grad():
        expected = (clf.model(x) / t).softmax(-1).max(-1).values
    rows, summary = predict(make_cfg(tmp_path, [f"ckpt={run_dir / 'export'}", f"inputs={skewed_folder}",
                                                "num_workers=0"], config_name="predict"))
    by_path = {r["path"]: r for r in rows}
    assert [float(by_path[str(f)]["prob"]) for f in files] == pytest.approx(expected.tolist(), abs=1e-5)

    evaluated, _ = evaluate(make_cfg(tmp_path, [f"ckpt={results['best_ckpt']}", f"output={tmp_path / 'e.json'}"],
                                     config_name="evaluate"))
    assert evaluated["calibration/temperature"] == t
    for key in ("test/acc", "test/balanced_acc", "test/ece", "test/ece_uncalibrated"):
        assert evaluated[key] == pytest.approx(results[key], abs=1e-5), key


def test_predict_abstains_below_min_prob(skewed_run, skewed_folder, tmp_path):
    from tl.predict import predict

    _, results, _ = skewed_run
    common = [f"ckpt={results['best_ckpt']}", f"inputs={skewed_folder}", "num_workers=0"]
    rows, _ = predict(make_cfg(tmp_path, common, config_name="predict"))
    probs = np.unique([float(r["prob"]) for r in rows])  # the printed (rounded) probabilities, distinct, sorted
    middle = len(probs) // 2
    cut = float((probs[middle - 1] + probs[middle]) / 2)  # between two printed values: no row sits on the cut
    abstained, summary = predict(make_cfg(tmp_path, [*common, f"min_prob={cut}", f"output={tmp_path / 'a.csv'}"],
                                          config_name="predict"))
    for plain, row in zip(rows, abstained, strict=True):
        if float(plain["prob"]) < cut:
            assert row["label"] == "" and "< min_prob" in row["abstained"] and plain["label"] in row["abstained"]
        else:
            assert row["label"] == plain["label"] and not row.get("abstained")
    assert 0 < summary["abstained"] < len(rows)
    with (tmp_path / "a.csv").open() as f:
        assert "abstained" in next(csv.reader(f))


def test_top_losses_csv_and_grids_hold_the_worst_images(skewed_run):
    from tl.report import split_logits

    run_dir, results, objects = skewed_run
    with (run_dir / "report" / "top_losses.csv").open() as f:
        rows = list(csv.DictReader(f))
    train_rows = [r for r in rows if r["split"] == "train"]
    assert len(train_rows) == 5 and all(r["kind"] == "least_likely_label" for r in train_rows)
    module, dm = objects["module"], objects["datamodule"]
    logits, targets, _ = split_logits(module, dm, dm, "train")
    p_given = (logits / results["calibration/temperature"]).softmax(-1)[torch.arange(len(targets)), targets]
    assert [float(r["prob_given"]) for r in train_rows] == pytest.approx(sorted(p_given.tolist())[:5], abs=1e-5)
    assert all(Path(r["path"]).is_file() and Path(r["path"]).parent.name == r["given"] for r in train_rows)
    for r in rows:
        if r["kind"] == "confidently_wrong":
            assert r["given"] != r["predicted"]
    for name in ("reliability.png", "top_losses_train.png"):
        assert Image.open(run_dir / "report" / name).size[0] > 100

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((run_dir / "tensorboard").rglob("events.out.*")).parent))
    events.Reload()
    assert "report/reliability" in events.Tags()["images"]
    assert {"test/ece", "test/balanced_acc", "calibration/temperature", "val/balanced_acc", "val/ece"} <= set(
        events.Tags()["scalars"])


# -- early stopping ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_early_stopping_stops_and_resumes_with_its_patience_spent(tmp_path, tiny_cfg):
    never_better = ["early_stopping.min_delta=1.0", "augment=none", "report.top_losses=0"]  # val/acc cannot gain 1.0
    stopped, _ = train(tiny_cfg(*never_better, "early_stopping.patience=1", "trainer.max_epochs=6",
                                run_dir=tmp_path / "a"))
    assert stopped["epochs"] == 2 and stopped["early_stopping"]["stopped"]

    first, _ = train(tiny_cfg(*never_better, "early_stopping.patience=3", "trainer.max_epochs=2",
                              run_dir=tmp_path / "b"))
    assert first["epochs"] == 2 and not first["early_stopping"]["stopped"]  # one validation without gain so far
    resumed, _ = train(tiny_cfg(*never_better, "early_stopping.patience=3", "trainer.max_epochs=10",
                                "ckpt_path=last", run_dir=tmp_path / "b"))
    # 2 more validations without gain make 3: a fresh count would have run to epoch 6
    assert resumed["epochs"] == 4 and resumed["early_stopping"]["stopped"]


def test_early_stopping_stays_off_under_a_snapshot_ensemble():
    from tl.callbacks.checkpoint import PatientEarlyStopping

    assert not PatientEarlyStopping(patience=2, snapshot_cycles=2).enabled
    assert PatientEarlyStopping(patience=2).enabled and not PatientEarlyStopping(patience=None).enabled


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), "abc", True, None, [1, 2]])
def test_a_bad_temperature_in_a_checkpoint_or_export_is_refused_in_one_line(skewed_run, tmp_path, bad):
    from tl.export import export_model
    from tl.inference import load_classifier, load_module

    run_dir, results, _ = skewed_run
    ckpt = torch.load(results["best_ckpt"], weights_only=True)
    ckpt["calibration"] = {"temperature": bad} if bad is not None else "hello"
    torch.save(ckpt, tmp_path / "bad.ckpt")
    with pytest.raises(TLError, match="not a temperature from 0.001 to 1000"):
        load_classifier(tmp_path / "bad.ckpt")
    meta = json.loads((run_dir / "export" / "model.json").read_text())
    meta["calibration"] = {"temperature": bad}
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "model.json").write_text(json.dumps(meta))
    (folder / "model.safetensors").write_bytes((run_dir / "export" / "model.safetensors").read_bytes())
    with pytest.raises(TLError, match="not a temperature from 0.001 to 1000"):
        load_classifier(folder)
    module = load_module(Path(results["best_ckpt"]))
    module.calibration = {"temperature": bad}
    with pytest.raises(TLError, match="not a temperature from 0.001 to 1000"):
        export_model(module, tmp_path / "again")
    assert not (tmp_path / "again" / "model.safetensors").exists()  # nothing written for a bad model


@pytest.mark.parametrize(("override", "message"), [
    ("callbacks.model_checkpoint.monitor=val/balanced_ac",
     "is not logged (did you mean val/balanced_acc?): use one of val/acc, val/balanced_acc"),
    ("callbacks.model_checkpoint.monitor=acc", "monitor='acc' is not logged (did you mean val/acc?)"),
    ("callbacks.model_checkpoint.monitor=test/acc", "monitor='test/acc' is not logged"),
    ("callbacks.model_checkpoint.monitor=train/loss", "add callbacks.model_checkpoint.mode=min"),
    ("callbacks.model_checkpoint.monitor=val/loss callbacks.model_checkpoint.mode=min "
     "callbacks.early_stopping.mode=max",
     "callbacks.early_stopping.monitor=val/loss is better when lower but callbacks.early_stopping.mode=max"),
    ("optimizer.betas=[0.9]", "optimizer.betas=[0.9] is invalid"),
    ("trainer.precision=64-true", "trainer.precision='64-true' is invalid"),
    ("callbacks.model_checkpoint.monitor=val/loss", "add callbacks.model_checkpoint.mode=min"),
    ("data.balance=weighted", "data.balance='weighted' is invalid"),
    ("early_stopping.patience=0", "early_stopping.patience=0 is invalid"),
    ("report.calibrate=yes", "report.calibrate='yes' is invalid"),
    ("early_stopping=null", "early_stopping=null: early_stopping is a group of settings"),
    ("report=null", "report=null: report is a group of settings"),
    ("callbacks.model_checkpoint.monitor=val_acc", "monitor='val_acc' is not logged"),
    ("callbacks.early_stopping=null early_stopping.patience=3", "callbacks.early_stopping is off"),
    # a negative floor or factor turned the LR negative (gradient ascent) with exit 0
    ("scheduler.min_lr_ratio=-1", "scheduler.min_lr_ratio=-1 is invalid: use a fraction of the starting LR in [0, 1]"),
    ("scheduler.min_lr_ratio=2", "scheduler.min_lr_ratio=2 is invalid"),
    ("scheduler=exponential scheduler.gamma=-1", "scheduler.gamma=-1 is invalid: use a decay factor in (0, 1]"),
    ("scheduler=step scheduler.gamma=0", "scheduler.gamma=0 is invalid"),
    ("scheduler=step scheduler.gamma=100", "scheduler.gamma=100 is invalid"),
    ("scheduler.warmup_epochs=-2", "scheduler.warmup_epochs=-2 is invalid"),
    ("scheduler=step scheduler.step_epochs=-1", "scheduler.step_epochs=-1 is invalid"),
    # torch.optim's and Lightning's own arguments failed after the run folder was made, in a traceback
    ("optimizer=sgd optimizer.momentum=0", "add optimizer.nesterov=false for plain SGD"),
    ("optimizer=sgd optimizer.momentum=-1", "optimizer.momentum=-1 is invalid"),
    ("optimizer=rmsprop optimizer.alpha=2", "optimizer.alpha=2 is invalid"),
    ("callbacks.model_checkpoint.save_top_k=-5", "callbacks.model_checkpoint.save_top_k=-5 is invalid"),
    ("callbacks.last_checkpoint.every_n_steps=0", "callbacks.last_checkpoint.every_n_steps=0 is invalid"),
    # GPU-only strategies and SLURM's environment: Lightning's traceback or KeyError('SLURM_NODEID') after the folder
    ("trainer=ddp_syncbn trainer.accelerator=cpu trainer.devices=1", "(SyncBatchNorm) runs on GPUs only"),
    ("trainer=fsdp trainer.accelerator=cpu trainer.devices=1", "trainer=fsdp runs on GPUs only"),
    ("trainer=slurm trainer.accelerator=cpu trainer.precision=32-true", "takes its ranks from a SLURM job"),
    # the augmentation policy: a reversed scale trained under a buried warning; ratio 0 and a negative mixup alpha
    # were tracebacks at the first step (hostile round 39)
    ("augment=light augment.scale=[1.5,0.2]", "augment.scale=[1.5, 0.2] is invalid: use null or [min, max]"),
    ("augment=light augment.ratio=[0,1]", "augment.ratio=[0, 1] is invalid"),
    ("augment=light augment.hflip=2", "augment.hflip=2 is invalid: use a probability in [0, 1]"),
    ("augment=strong augment.re_prob=-1", "augment.re_prob=-1 is invalid"),
    ("augment=mix augment.mixup.mixup_alpha=-1", "augment.mixup.mixup_alpha=-1 is invalid"),
    ("augment=mix augment.mixup.mixup_alpha=0 augment.mixup.cutmix_alpha=0", "augment.mixup mixes nothing"),
])
def test_bad_trust_settings_fail_in_one_line(tiny_cfg, override, message, monkeypatch):
    from tl.checks import validate

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)

    with pytest.raises(TLError, match=re.escape(message)):
        validate(tiny_cfg(*override.split()))


def test_a_staged_strategy_that_never_opens_the_backbone_is_warned_of(tiny_cfg, caplog):
    from tl.checks import validate

    validate(tiny_cfg("finetune.strategy=gradual", "finetune.lp_epochs=2", "trainer.max_epochs=2"))
    assert "this run is a linear probe" in caplog.text
    caplog.clear()
    validate(tiny_cfg("finetune.strategy=gradual", "finetune.lp_epochs=2", "trainer.max_epochs=3"))
    assert "linear probe" not in caplog.text
