"""The 2x2 transfer scenarios (conf/scenario/) and the advisor behind `scenario=auto`.

auto measures the target data through the pretrained backbone and picks a preset:
- small or large: the median number of labelled training examples per class against `small_max_per_class`;
- similar or different: do the backbone's frozen features separate the target classes better than the raw pixels
  do? Both get the same cross-validated logistic-regression probe on the training split (test data is never
  looked at). Features that beat pixels by at least `similar_min_gain` carry over from the pretraining data
  ("similar"); features that don't are the wrong ones for this domain ("different"), whatever their absolute score.
  Comparing against pixels makes the measure relative to how hard the task is, so one threshold serves easy and
  hard datasets.
The entry point resolves auto before `train()` runs (`resolve`): the config is composed once more with the chosen
preset, so `train()` only ever sees a final config. The decision, the measured numbers and the thresholds travel in
that config as `scenario.evidence`, and from there to results.json (`scenario_evidence`) and TensorBoard.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from tl.checks import validate
from tl.config import compose_config, require_output_dir
from tl.data.datamodule import ImageDataset, build_datamodule, collate_readable
from tl.data.features import FeatureCache, extract_features, feature_cache_applies
from tl.data.transforms import backbone_preprocess, decode_side, eval_transform, fixed_input_side
from tl.models.backbone import classifier_names, create_backbone, load_pretrained
from tl.planning import MIN_SIDE, VAL_EVERY, fit_budget, forward_seconds, native_side, small_budget, small_side

log = logging.getLogger(__name__)
# Precisions whose training steps run under bfloat16 autocast: the plan then times the forward pass that way too
BF16_MIXED = ("bf16-mixed", "bf16")

PRESETS = ("small_similar", "small_different", "large_similar", "large_different")


def _probe_cv(y: np.ndarray, seed: int, folds: int):
    """The standardised logistic-regression probe and its stratified folds for `y`; None with fewer than 2 examples
    in some class (nothing to cross-validate)."""
    folds = int(min(folds, np.bincount(y)[np.unique(y)].min()))
    if folds < 2:
        return None
    return (make_pipeline(StandardScaler(), LogisticRegression(max_iter=500, C=0.5)),
            StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed))


def probe_accuracy(x: np.ndarray, y: np.ndarray, seed: int = 0, folds: int = 3) -> float:
    """Cross-validated accuracy of a standardised logistic-regression probe."""
    probe_cv = _probe_cv(y, seed, folds)
    return float("nan") if probe_cv is None else float(cross_val_score(probe_cv[0], x, y, cv=probe_cv[1]).mean())


def probe_correct(x: np.ndarray, y: np.ndarray, seed: int = 0, folds: int = 3) -> np.ndarray | None:
    """Which examples the probe of `probe_accuracy` gets right when each is held out (the same folds for the same
    `y` and `seed`, so two feature sets of the same images compare example by example); None where it cannot be
    cross-validated."""
    probe_cv = _probe_cv(y, seed, folds)
    return None if probe_cv is None else cross_val_predict(probe_cv[0], x, y, cv=probe_cv[1]) == y


def side_benefit(big: int, little: int, n: int) -> tuple[float, float]:
    """The larger side's measured benefit from the probe's paired outcomes: `big` images right only at the larger
    side, `little` only at the smaller, of `n`. (accuracy gain, one-sided sign-test p-value that the larger side is
    no better)."""
    from scipy.stats import binomtest

    gain = (big - little) / max(1, n)
    p = binomtest(big, big + little, 0.5, alternative="greater").pvalue if big + little else 1.0
    return float(gain), float(p)


def decide(examples_per_class: float, feature_acc: float, pixel_acc: float, small_max_per_class: int,
           similar_min_gain: float, small_finetune: bool = False, probe_samples: int = 0,
           probe_enough_acc: float | None = None, probe_enough_samples: int = 200) -> str:
    """The preset for the measured data (see the module docstring). `small_finetune`: small data fine-tunes the top
    stages with strong augmentation (small_different) whatever the domain, instead of the textbook's linear probe
    for similar data, unless the frozen features already classify the training split almost perfectly
    (`probe_enough_acc`, measured on at least `probe_enough_samples` images): then the linear probe has no errors
    left for fine-tuning to remove, at a fraction of its time."""
    size = "small" if examples_per_class <= small_max_per_class else "large"
    domain = "similar" if feature_acc - pixel_acc >= similar_min_gain else "different"
    if size == "small" and small_finetune:
        return "small_similar" if probe_enough(feature_acc, probe_samples, probe_enough_acc,
                                               probe_enough_samples) else "small_different"
    return f"{size}_{domain}"


def probe_enough(feature_acc: float, probe_samples: int, enough_acc: float | None, enough_samples: int) -> bool:
    """Does the frozen-feature probe leave fine-tuning nothing to win (see `decide`)?"""
    return enough_acc is not None and probe_samples >= enough_samples and feature_acc >= enough_acc


def _probe_indices(datamodule, max_samples: int, seed: int) -> np.ndarray:
    train = datamodule.split_indices["train"]
    if len(train) <= max_samples:
        return train
    return np.sort(stratified_subset(train, datamodule.images.targets[train], max_samples, seed))


def stratified_subset(indices: np.ndarray, targets: np.ndarray, size: int, seed: int) -> np.ndarray:
    """`size` of `indices`, each class's share in proportion to its count (largest remainders), every class with at
    least one where `size` allows, drawn with `seed`. Unlike sklearn's stratified split it takes a class of one image
    and a size below the number of classes (found by a hostile tester: both were tracebacks before training)."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(targets, return_counts=True)
    size = min(int(size), len(indices))
    share = counts * size / counts.sum()
    take = np.minimum(counts, np.floor(share).astype(int))
    if size >= len(classes):
        take = np.maximum(take, 1)
    while take.sum() > size:  # the floor of one for small classes overshot: trim the largest shares
        take[np.argmax(take - share)] -= 1
    for c in np.argsort(-(share - take)):  # largest remainders first, within each class's count
        if take.sum() >= size:
            break
        if take[c] < counts[c]:
            take[c] += 1
    while take.sum() < size:  # a class ran out: the rest from any class with images left
        c = int(np.argmax(counts - take))
        take[c] += 1
    return np.concatenate([rng.choice(indices[targets == c], int(k), replace=False)
                           for c, k in zip(classes, take, strict=True) if k > 0])


def measure(cfg: DictConfig, datamodule) -> dict:
    """Examples per class, and frozen-feature vs pixel probe accuracy on (at most `probe_max_samples` of) train."""
    s = cfg.scenario
    targets = datamodule.images.targets
    counts = np.bincount(targets[datamodule.split_indices["train"]], minlength=datamodule.num_classes)
    idx = _probe_indices(datamodule, int(s.probe_max_samples), cfg.seed)

    model = create_backbone(cfg.model.name, datamodule.num_classes)
    load_pretrained(model, cfg.model.pretrained, cfg.model.name)
    if len(idx) == len(datamodule.split_indices["train"]):  # the whole split: share the linear probe's cache entry
        cache = FeatureCache(cfg.paths.cache_dir)
        feats, y = cache.get(model, classifier_names(model), datamodule, ("train",))["train"]
    else:
        plain = datamodule.dataset("train", False)
        loader = DataLoader(ImageDataset(datamodule.images, idx, plain.transform, min_side=plain.min_side,
                                         interpolation=plain.interpolation),
                            batch_size=datamodule.eval_batch_size, num_workers=datamodule._workers(),
                            collate_fn=collate_readable)
        feats, y = extract_features(model, loader)
    side = int(s.pixel_size)
    to_pixels = v2.Compose([v2.PILToTensor(), v2.Resize((side, side), antialias=True),
                            v2.ToDtype(torch.float32, scale=True)])
    small = ImageDataset(datamodule.images, idx, None, min_side=side, interpolation="bilinear")
    pixels, pixel_y = [], []
    for i in range(len(idx)):
        try:
            pixels.append(to_pixels(small.load_image(i)))
        except Exception:  # noqa: BLE001 - a file broken since the scan: the loaders skip and count it too
            continue
        pixel_y.append(int(targets[idx[i]]))
    pixels = torch.stack(pixels).flatten(1)
    y = y.numpy()
    backbone_side = int(datamodule.preprocess["input_size"][-1])
    native = native_side(datamodule.images, datamodule.split_indices["train"])
    side_probe = _side_probe(cfg, datamodule, model, idx, native, backbone_side, counts, feats.numpy(), y)
    return {
        "n_train": int(len(datamodule.split_indices["train"])), "n_val": int(len(datamodule.split_indices["val"])),
        "n_test": int(len(datamodule.split_indices["test"])),
        "native_side": native,
        "input_side": backbone_side,
        "forward_ms_per_image": round(1000 * forward_seconds(model, backbone_side), 3),
        # the floor of the per-image cost: at small sides a pass costs more than its share of pixels says
        "forward_ms_per_image_min_side": round(1000 * forward_seconds(model, min(MIN_SIDE, backbone_side)), 3),
        **({"forward_ms_per_image_bf16": round(1000 * forward_seconds(model, backbone_side, bf16=True), 3)}
           if str(cfg.trainer.get("precision")) in BF16_MIXED else {}),
        "examples_per_class": float(np.median(counts)),
        "min_examples_per_class": int(counts.min()),
        "probe_samples": int(len(idx)),
        "feature_probe_acc": round(probe_accuracy(feats.numpy(), y, cfg.seed), 4),
        "pixel_probe_acc": round(probe_accuracy(pixels.numpy(), np.asarray(pixel_y), cfg.seed), 4),
        "pixel_size": side,
        **side_probe,
    }


def side_choice_open(cfg: DictConfig) -> bool:
    """Is the small-data training side auto's to choose? Not where the command line or the dataset's config set
    one (`data.image_size`, `data.small_data_image_size`), nor for a backbone that takes one side only (ViT)."""
    return cfg.data.get("image_size") is None and cfg.data.get("small_data_image_size") is None \
        and fixed_input_side(str(cfg.model.name)) is None


def _side_probe(cfg: DictConfig, datamodule, model, idx: np.ndarray, native: int, backbone_side: int,
                counts: np.ndarray, feats: np.ndarray, y: np.ndarray) -> dict:
    """The frozen-feature probe at the small-data side (4x native, `tl.planning.small_side`) on the same images and
    folds as the probe at the backbone's side, where that side is smaller than the backbone's and auto chooses it:
    the measured benefit of the larger side (`plan`). {} where there is nothing to compare."""
    s = cfg.scenario
    if s.get("side_min_gain") is None or not side_choice_open(cfg) \
            or float(np.median(counts)) > int(s.small_max_per_class):
        return {}
    small = small_side(native, backbone_side)
    if small >= backbone_side:
        return {}
    pre = {**datamodule.preprocess, "input_size": [3, small, small]}
    loader = DataLoader(ImageDataset(datamodule.images, idx, eval_transform(pre), min_side=decode_side(pre),
                                     interpolation=str(pre.get("interpolation") or "bicubic")),
                        batch_size=datamodule.eval_batch_size, num_workers=datamodule._workers(),
                        collate_fn=collate_readable)
    small_feats, small_y = extract_features(model, loader)
    out = {"small_side": small,
           "small_side_probe_acc": round(probe_accuracy(small_feats.numpy(), small_y.numpy(), cfg.seed), 4)}
    if np.array_equal(small_y.numpy(), y):  # the same images read at both sides: compare them one by one
        big, little = probe_correct(feats, y, cfg.seed), probe_correct(small_feats.numpy(), y, cfg.seed)
        if big is not None and little is not None:
            # training images only the backbone's side gets right, and only the small side gets right
            out["side_probe_discordant"] = [int((big & ~little).sum()), int((little & ~big).sum())]
    return out


def advise(cfg: DictConfig) -> tuple[str, dict]:
    """Measure the training split as `cfg` describes it, decide, and explain: (preset name, evidence)."""
    s = cfg.scenario
    datamodule = build_datamodule(cfg.data, backbone_preprocess(cfg.model.name), None, cfg.seed)
    datamodule.setup("fit")
    m = measure(cfg, datamodule)
    small_finetune = bool(s.get("small_finetune", False))
    enough_acc = s.get("probe_enough_acc")
    enough_acc = None if enough_acc is None else float(enough_acc)
    enough_samples = int(s.get("probe_enough_samples", 200))
    chosen = decide(m["examples_per_class"], m["feature_probe_acc"], m["pixel_probe_acc"],
                    int(s.small_max_per_class), float(s.similar_min_gain), small_finetune, m["probe_samples"],
                    enough_acc, enough_samples)
    gain = m["feature_probe_acc"] - m["pixel_probe_acc"]
    domain = "similar" if gain >= float(s.similar_min_gain) else "different"
    size = chosen.split("_")[0]
    reason = (f"{m['examples_per_class']:g} examples per class {'<=' if size == 'small' else '>'} "
              f"{int(s.small_max_per_class)} -> {size}; ")
    if np.isnan(gain):  # fewer than 2 training images in some class: no cross-validated probe to compare
        reason += (f"the probes cannot be measured with {m['min_examples_per_class']} training image(s) in a class "
                   "(a 2-fold cross-validation needs 2) -> different (the safer guess: no claim of similarity)")
    else:
        reason += (f"frozen features {m['feature_probe_acc']:.3f} vs pixels {m['pixel_probe_acc']:.3f} (gain "
                   f"{gain:+.3f} {'>=' if domain == 'similar' else '<'} {float(s.similar_min_gain)}) -> {domain}")
    if chosen == "small_similar" and small_finetune:
        reason += (f"; the frozen features' probe already scores {m['feature_probe_acc']:.3f} >= "
                   f"{enough_acc:g} on {m['probe_samples']} training images (scenario.probe_enough_acc, "
                   f"probe_enough_samples {enough_samples}): a linear probe at {m['input_side']} px, the side "
                   "measured, leaves fine-tuning next to nothing to win")
    elif size == "small" and small_finetune:
        reason += ("; small data fine-tunes the top stages with strong augmentation "
                   + ("even when similar " if domain == "similar" else "")
                   + "(scenario.small_finetune: it beat the linear probe on every dataset measured at 10 per class)")
    evidence = {
        **m,
        "feature_gain": None if np.isnan(gain) else round(gain, 4),
        "domain": domain,
        "thresholds": {"small_max_per_class": int(s.small_max_per_class),
                       "similar_min_gain": float(s.similar_min_gain), "small_finetune": small_finetune,
                       "probe_enough_acc": enough_acc, "probe_enough_samples": enough_samples},
        "decision": chosen,
        "reason": reason,
    }
    log.info("scenario=auto chose %s: %s", chosen, evidence["reason"])
    return chosen, evidence


def plan(cfg: DictConfig, final: DictConfig, m: dict, overrides: list[str], spent_s: float) -> tuple[list[str], dict]:
    """Resolution and schedule for the chosen preset (`tl.planning`): (overrides for what the command line left
    open, the plan with its reasons)."""
    given = {o.lstrip("+~").split("=", 1)[0] for o in overrides}
    small = final.scenario.name.startswith("small")
    backbone_side = int(m["input_side"])
    # the side is auto's to choose only where neither the command line nor the dataset's config chose one, and the
    # backbone takes any side (a ViT's position embeddings are sized to one)
    fixed = fixed_input_side(str(final.model.name))
    choose_side = small and "data.image_size" not in given and cfg.data.get("image_size") is None \
        and cfg.data.get("small_data_image_size") is None and fixed is None
    # a linear probe chosen because the probe measured at the backbone's side was enough trains at that side
    probe_side = choose_side and final.scenario.name == "small_similar" and bool(
        cfg.scenario.get("small_finetune", False))
    choose_side = choose_side and not probe_side
    side = small_side(int(m["native_side"]), backbone_side) if choose_side else \
        int(final.data.get("image_size") or backbone_side)
    # measured benefit: the frozen features at the backbone's side separate the training split clearly better than
    # at the small side (same images, same folds) -> start from the backbone's side (the budget may shrink it)
    side_gain = side_p = None
    if choose_side and m.get("small_side") == side and m.get("side_probe_discordant") is not None \
            and cfg.scenario.get("side_min_gain") is not None:
        side_gain, side_p = side_benefit(*m["side_probe_discordant"], int(m["probe_samples"]))
        if side_gain >= float(cfg.scenario.side_min_gain) and side_p <= float(cfg.scenario.side_max_p):
            side = backbone_side
    # the dataset's own small-data side (digits: 128 px) does not fit a fixed-size backbone: its own side instead
    fixed_side = fixed is not None and small and side != fixed and "data.image_size" not in given \
        and "data.small_data_image_size" not in given
    side = fixed if fixed_side else side
    budget = cfg.scenario.get("budget_minutes")
    budget_from = "scenario.budget_minutes"
    if budget is None and small and cfg.scenario.get("small_budget_minutes") is not None:
        # per 10 labelled images per class: a few-shot run is bounded to minutes, 100 per class gets 10x that
        budget = small_budget(cfg.scenario.small_budget_minutes, m["examples_per_class"])
        scale = budget / float(cfg.scenario.small_budget_minutes)
        budget_from = "scenario.small_budget_minutes (small data" + (
            f", x{scale:g} for {m['examples_per_class']:g} examples per class)" if scale > 1 else ")")
    fixed_epochs = "trainer.max_epochs" in given
    # small data fine-tuned: a snapshot ensemble inside the same epochs, unless the command line set the snapshots
    cycles = int(cfg.scenario.get("small_snapshots") or 0)
    # (the cosine schedule's restarts end at the snapshots: another schedule has no snapshot ensemble)
    snapshot_plan = small and final.scenario.name != "small_similar" and cycles > 1 and not any(
        k.startswith("snapshots.") for k in given) and (OmegaConf.to_container(final.scheduler, resolve=False) or {}
                                                        ).get("cycles") == "${snapshots.cycles}"
    schedule = fit_budget(None if budget is None else 60.0 * float(budget), spent_s,
                          float(m["forward_ms_per_image"]) / 1000, m["n_train"], m["n_val"], m["n_test"],
                          int(final.trainer.max_epochs), side, backbone_side, can_shrink=choose_side,
                          epochs_fixed=fixed_epochs,  # the user's epochs stand
                          train_per_image_s=float(m.get("forward_ms_per_image_bf16", m["forward_ms_per_image"]))
                          / 1000 if str(final.trainer.get("precision")) in BF16_MIXED else None,
                          features_cached=feature_cache_applies(final),
                          floor_per_image_s=float(m["forward_ms_per_image_min_side"]) / 1000
                          if m.get("forward_ms_per_image_min_side") else None,
                          members=cycles if snapshot_plan else int(final.snapshots.get("cycles") or 0) or 1,
                          intervals=(int(final.trainer.check_val_every_n_epoch),)
                          if "trainer.check_val_every_n_epoch" in given
                          and final.trainer.get("check_val_every_n_epoch") is not None else VAL_EVERY)
    out: list[str] = []
    if choose_side:
        out.append(f"data.small_data_image_size={schedule['side']}")
    elif fixed_side:
        out.append(f"data.small_data_image_size={fixed}")
    if schedule["epochs"] != int(final.trainer.max_epochs) and not fixed_epochs:
        out.append(f"trainer.max_epochs={schedule['epochs']}")
    if schedule["val_every"] != 1 and "trainer.check_val_every_n_epoch" not in given:
        out.append(f"trainer.check_val_every_n_epoch={schedule['val_every']}")
    cycles = min(cycles, int(schedule["epochs"]))  # the user's epochs when fixed
    snapshot_plan = snapshot_plan and cycles > 1  # at most one cycle per epoch
    if snapshot_plan:
        out += [f"snapshots.cycles={cycles}", f"snapshots.deliver={cfg.scenario.get('small_deliver', 'ensemble')}"]
    side_why = " (the side the probe was measured at)" if probe_side else (
        f" (the only side {final.model.name} takes)" if fixed is not None else "")
    if choose_side:
        measured = ""
        if side_gain is not None:
            big, little = m["side_probe_discordant"]
            measured = (f"; the frozen-feature probe got {big} training images right at {backbone_side} px that it "
                        f"got wrong at {m['small_side']} px, and {little} the other way: gain {side_gain:+.3f} "
                        f"(scenario.side_min_gain {float(cfg.scenario.side_min_gain):g}), one-sided sign test p "
                        f"{side_p:.3f} (scenario.side_max_p {float(cfg.scenario.side_max_p):g}) -> " + (
                            f"{backbone_side} px" if side == backbone_side else "no measured benefit"))
        side_why = f" (images {m['native_side']} px: 4x native, within {MIN_SIDE}..{backbone_side}{measured}" + (
            ")" if schedule["side"] == side else f", is {side} px; smaller to fit the budget)")
    why = [f"train at {schedule['side']} px" + side_why,
           f"{schedule['epochs']} epochs, validating every {schedule['val_every']}" + (
               f", a snapshot ensemble of {cycles} cosine cycles delivered as "
               f"snapshots.deliver={cfg.scenario.get('small_deliver', 'ensemble')} (scenario.small_snapshots)"
               if snapshot_plan else ""),
           f"estimated {schedule['estimated_s'] / 60:.1f} min" + (
               "" if budget is None else f" of a {float(budget):g} min budget ({budget_from})" +
               ("" if schedule["fits"] else " (does not fit: the smallest schedule runs; raise "
                                            "scenario.budget_minutes or set trainer.max_epochs)"))]
    measured_side = {} if side_gain is None else {"side_gain": round(side_gain, 4), "side_p": round(side_p, 4)}
    result = {**schedule, **measured_side,
              "spent_s": round(spent_s, 1),  # start-up (from the process start, single runs) and the measurement
              "budget_minutes": budget, "budget_from": budget_from if budget is not None else None,
              "preset_epochs": int(final.trainer.max_epochs),
              "overrides": out, "reason": "; ".join(why)}
    log.info("scenario=auto plan: %s", result["reason"])
    return out, result


def earlier_plan(cfg: DictConfig) -> tuple[str, dict] | None:
    """The preset, evidence and plan an auto run was started with, where this command resumes it
    (`ckpt_path=auto|last` with a checkpoint of its own in the run folder, whose config.yaml records them); else
    None.

    Planned afresh, a resume was planned from the machine's speed at that moment, so it could change the run's
    epochs, validation interval and side half-way, without a word (found by a hostile tester: a 30-epoch run resumed
    as a 15-epoch one, its cosine schedule jumping from 0.74 to 0.16 of the learning rate)."""
    from tl.rundir import RESUMABLE

    if str(cfg.get("ckpt_path")) not in ("auto", "last"):
        return None
    run = Path(str(cfg.paths.output_dir))
    if not any((run / "checkpoints" / name).is_file() for name in RESUMABLE) and not any(run.glob("hpc_ckpt_*.ckpt")):
        return None
    try:
        earlier = OmegaConf.load(run / "config.yaml")
        chosen = str(earlier.scenario.name)
        evidence = OmegaConf.to_container(earlier.scenario.evidence, resolve=True)
    except Exception:  # noqa: BLE001 - no record (another tool's folder, an old run): plan afresh
        return None
    if not isinstance(evidence, dict) or not isinstance(evidence.get("plan"), dict) or chosen in ("auto", "None"):
        return None
    return chosen, evidence


def resolve(cfg: DictConfig, overrides: list[str], config_name: str = "train", started: float | None = None
            ) -> DictConfig:
    """The final config for `cfg`: itself for a named preset; for `scenario=auto`, the config composed once more
    from the same `overrides` with `scenario=<chosen>` in place of auto (Hydra's own precedence: the command line
    still wins over the preset), carrying the evidence as `scenario.evidence` and the original `paths`."""
    if cfg.scenario.name != "auto":
        return cfg
    require_output_dir(cfg)
    # the budget counts from `started` (a time.perf_counter() value: the entry point's process start), else from now
    started = time.perf_counter() if started is None else float(started)
    validate(cfg, final=False)  # measuring costs time: bad values fail first
    # scenario=auto and auto's own knobs (scenario.small_max_per_class, ...) have done their part: the evidence
    # records them, and the chosen preset has no such keys.
    kept = [o for o in overrides if o.lstrip("+~").split("=", 1)[0].split(".", 1)[0] != "scenario"]
    earlier = earlier_plan(cfg)
    if earlier is not None:  # a resume: the run goes on under the plan it was started with
        chosen, evidence = earlier
        given = {o.lstrip("+~").split("=", 1)[0] for o in kept}
        planned = list(evidence["plan"].get("overrides") or [])
        plan_overrides = [o for o in planned if o.split("=", 1)[0] not in given]  # the command line still wins
        replaced = sorted(given & {o.split("=", 1)[0] for o in planned})
        evidence["plan"]["resumed"] = "the run's first plan (its config.yaml), not measured again" + (
            f"; the command line's {', '.join(replaced)} in place of the plan's" if replaced else "")
        log.info("scenario=auto: resuming under the run's first plan (%s): %s", chosen, evidence["plan"].get("reason"))
    else:
        chosen, evidence = advise(cfg)
        preset = compose_config([*kept, f"scenario={chosen}"], config_name)
        plan_overrides, evidence["plan"] = plan(cfg, preset, evidence, kept, time.perf_counter() - started)
    final = compose_config([*kept, f"scenario={chosen}", *plan_overrides], config_name)
    with open_dict(final):
        final.paths = OmegaConf.create(OmegaConf.to_container(cfg.paths, resolve=True))
        final.scenario.evidence = evidence
    return final
