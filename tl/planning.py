"""What `scenario=auto` plans beyond the preset: the training resolution and a schedule that fits a time budget.

- Resolution (small-data presets, when neither `data.image_size` nor the dataset's `small_data_image_size` is set):
  images far smaller than the backbone's input are upsampled to 4x their native side (at least 64 px, at most the
  backbone's size), not to the backbone's full size: a 32 px glyph carries no more detail at 224 px than at 128 px,
  and a step costs about (side / 224)^2 of one at 224 px (digits, 8 px, was measured best at 128 px).
- Budget (`scenario.budget_minutes`; null: `scenario.small_budget_minutes` per 10 examples per class for small data,
  none for large): the run's cost is estimated from a timed forward pass of the backbone on the target images at the
  chosen side (a training step ~ 4 forward passes, augmentation included; each validation pass one per image; test and
  the report after it two per val/test image) plus what the process start-up and the measurement already took
  (`python -m tl.train` counts from the process start: the imports alone take 10-20 s on a slow CPU) and a fixed
  `FINISH_S` for the rest of the start-up and the export (measured on the 2-core CPU with EfficientNet-Lite0 at 10
  images per class: fit took 1.05-1.25x the 3-pass estimate, report 10-18 s, ONNX export with its parity check 19 s;
  on 2026-12-05's slower machine, 40 s). When the preset's schedule would not fit, validation runs less often first
  (every 2, 3, 5 epochs: model selection needs fewer looks than training needs steps), then epochs are cut, down to
  half of the preset's and to a multiple of the interval, then the side shrinks (by 32 px, not below 64). If even that
  does not fit, the plan says so and runs the smallest schedule: a schedule cut further would not be the recipe any
  more.
Every choice and the numbers behind it go to the evidence (results.json `scenario_evidence.plan`, TensorBoard).
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from PIL import Image

MIN_SIDE = 64
VAL_EVERY = (1, 2, 3, 5)
TRAIN_FORWARDS = 4  # a training step costs about this many forward passes per image (backward, optimizer, augmentation)
FINISH_S = 25.0     # process start-up and the export (ONNX and its parity check), outside the per-image cost
ENSEMBLE_EXPORT_S = 7.0  # each snapshot-ensemble member past the first in the ONNX export (3 members: +14 s, measured)


def native_side(images, indices: np.ndarray, limit: int = 200) -> int:
    """Median of the shorter side of (up to `limit` of) the images at `indices`, read from headers only."""
    if images.images is not None:
        return int(min(images.images.shape[-2:]))
    if images.store is not None:  # shards: sizes recorded at conversion
        chosen = np.asarray(indices[:limit], dtype=np.int64)
        sides = np.minimum(images.store.heights[chosen], images.store.widths[chosen])
        return int(np.median(sides)) if len(sides) else 0
    sides = []
    for i in indices[:limit]:
        try:
            with Image.open(images.paths[int(i)]) as f:
                sides.append(min(f.size))
        except Exception:  # noqa: BLE001 - unreadable: the loader skips and counts it
            continue
    return int(np.median(sides)) if sides else 0


def small_side(native: int, backbone_side: int) -> int:
    """The small-data training side for images of `native` pixels (see the module docstring)."""
    if native <= 0:
        return backbone_side
    side = int(math.ceil(4 * native / 32) * 32)
    return int(min(backbone_side, max(MIN_SIDE, side)))


def small_budget(minutes: float, examples_per_class: float) -> float:
    """The default budget of a small-data run: `minutes` per 10 labelled images per class (at least `minutes`)."""
    return float(minutes) * max(1.0, float(examples_per_class) / 10)


@torch.no_grad()
def forward_seconds(model: torch.nn.Module, side: int, batch: int = 16, repeats: int = 3, bf16: bool = False) -> float:
    """Seconds per image of the backbone's forward pass at `side` px (eval mode, channels-last, this machine; `bf16`:
    under bfloat16 autocast, as training steps run with trainer.precision=bf16-mixed).

    The fastest of `repeats` timed batches, as `timeit` advises: another process's burst slows some of them and
    never speeds one up. (Found on a shared machine: with the mean of two batches, a test suite running beside the
    measurement made one batch read 8x slow, and the plan cut a fonts run to 64 px and half its epochs: 0.89 test
    accuracy against 0.97.) Load that lasts the whole measurement still counts: the run will share the CPU too."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    device = next(model.parameters()).device
    x = torch.randn(batch, 3, side, side, device=device).contiguous(memory_format=torch.channels_last)
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            model(x)  # warm-up: kernel selection, allocation
            times = []
            for _ in range(max(1, repeats)):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                started = time.perf_counter()
                model(x)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - started)
        return min(times) / batch
    finally:
        for m, training in modes.items():
            m.training = training


def schedules(epochs: int, side: int, epochs_fixed: bool = False, can_shrink: bool = False,
              intervals: tuple[int, ...] = VAL_EVERY) -> list[tuple[int, int, int]]:
    """The (epochs, validation interval, side) schedules `fit_budget` tries, dearest first: validation less often,
    then fewer epochs (down to half the preset's), then a smaller side. Every one validates its last epoch (the
    epochs are a multiple of the interval): Lightning validates, and so keeps checkpoints, only every
    check_val_every_n_epoch epochs, so epochs after the last validation would be trained and then thrown away."""
    min_epochs = epochs if epochs_fixed else max(1, math.ceil(epochs / 2))
    out: list[tuple[int, int, int]] = []
    for every in intervals:
        e = epochs if epochs_fixed else epochs - epochs % every
        if e >= max(every, min_epochs) and e % every == 0:
            out.append((e, every, side))
    if not out:  # the user's interval and epochs: as given (validation refuses what does not fit together)
        out.append((epochs, intervals[0], side))
    every = out[-1][1]
    out += [(e, every, side) for e in range(out[-1][0] - 1, min_epochs - 1, -1) if e % every == 0]
    if can_shrink:
        out += [(out[-1][0], every, s) for s in range(side - 32, MIN_SIDE - 1, -32)]
    return out


def fit_budget(budget_s: float | None, spent_s: float, per_image_s: float, n_train: int, n_val: int, n_test: int,
               epochs: int, side: int, backbone_side: int, can_shrink: bool, epochs_fixed: bool = False,
               train_per_image_s: float | None = None, features_cached: bool = False, members: int = 1,
               intervals: tuple[int, ...] = VAL_EVERY, floor_per_image_s: float | None = None) -> dict:
    """The schedule (epochs, validation interval, side) that fits `budget_s`, with its estimated cost.
    `per_image_s`: a forward pass as validation and test run it (float32); `train_per_image_s`: as training steps
    run it (bfloat16 under trainer.precision=bf16-mixed; default: the same). `can_shrink`: the side is the plan's to
    choose; `epochs_fixed`: the epochs are the user's; `features_cached`: a linear probe on cached features (every
    image goes through the backbone once; the epochs train the head alone, next to free); `members`: a snapshot
    ensemble of this many members is scored on val and test and exported (each member one more forward pass per
    val and test image, and one more model in the ONNX export: ENSEMBLE_EXPORT_S each); `intervals`: the validation
    intervals to choose from (the user's own, where given); `floor_per_image_s`: a forward pass measured at the
    smallest side (MIN_SIDE): no side costs less per image. (The cost scales with the pixels from the backbone's side
    down to that floor: found by a hostile tester, 64 px runs of many small classes took 1.6-1.8x their estimate, the
    fixed per-layer costs of a pass outweighing its pixels there; at 128 px and above the pixels still dominate.)"""
    train_s = per_image_s if train_per_image_s is None else train_per_image_s
    floor = float(floor_per_image_s or 0.0)
    train_floor = floor * train_s / per_image_s if per_image_s > 0 else floor

    extra = (members - 1) * ENSEMBLE_EXPORT_S if members > 1 else 0.0
    scored = members * (n_val + n_test) if members > 1 else 0

    def cost(e: int, every: int, s: int) -> float:
        scale = (s / backbone_side) ** 2
        fwd, train = max(scale * per_image_s, floor), max(scale * train_s, train_floor)
        if features_cached:
            return FINISH_S + fwd * (n_train + n_val + 3 * n_test)
        return FINISH_S + extra + train * e * TRAIN_FORWARDS * n_train + fwd * (
            math.ceil(e / every) * n_val + n_val + 2 * n_test + scored)

    plan = {"epochs": epochs, "val_every": 1, "side": side}
    if budget_s is None:
        plan.update(estimated_s=round(spent_s + cost(epochs, 1, side), 1), fits=True)
        return plan
    left = budget_s - spent_s
    candidates = schedules(epochs, side, epochs_fixed, can_shrink, intervals)
    if features_cached:  # the epochs train the head alone: cutting them saves nothing (found by a hostile tester:
        # the plan halved a probe's epochs and still said "does not fit"); only a smaller side costs less
        e0, every0, _ = candidates[0]
        candidates = [(e0, every0, s) for s in dict.fromkeys(c[2] for c in candidates)]
    for e, every, s in candidates:
        if cost(e, every, s) <= left:
            plan.update(epochs=e, val_every=every, side=s, estimated_s=round(spent_s + cost(e, every, s), 1),
                        fits=True)
            return plan
    e, every, s = candidates[-1]
    plan.update(epochs=e, val_every=every, side=s, estimated_s=round(spent_s + cost(e, every, s), 1), fits=False)
    return plan
