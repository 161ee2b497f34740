"""The one validation layer: a composed config is checked before anything runs, so wrong types, out-of-range values
and contradictory settings fail in one line, not an hour in. Constructors trust it (they check only what depends on
the model or the data, e.g. a stage count against the backbone's stages).

Unknown group options (optimizer=foo, scenario=bar) are caught earlier, on the command line itself
(`tl.cli.check_group_choices`): Hydra cannot compose a config with them.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
from collections.abc import Callable

from omegaconf import DictConfig, ListConfig, OmegaConf

from tl.errors import TLError
from tl.models.strategies import STAGED, STRATEGIES
from tl.utils import check_required, check_resolvable, to_plain

Rule = tuple[str, Callable[[object], bool], str]


def _number(v) -> bool:
    """A finite int or float (inf passes `> 0` and would train: lr=inf is a NaN loss one step later)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _boolean(v) -> bool:
    return isinstance(v, bool)


def _count0(v) -> bool:
    return _integer(v) and v >= 0


def _count1(v) -> bool:
    return _integer(v) and v >= 1


def _fraction_or_count(v) -> bool:
    return _count0(v) or (_number(v) and not _integer(v) and 0 <= v <= 1)


def _size(v) -> bool:
    return _integer(v) and 16 <= v <= 4096


def _optional(rule: Callable[[object], bool]) -> Callable[[object], bool]:
    return lambda v: v is None or rule(v)


def _devices(v) -> bool:
    if isinstance(v, str):
        return v == "auto" or (v.strip() != "" and all(p.strip().isdigit() for p in v.strip(",").split(",")))
    if OmegaConf.is_list(v) or isinstance(v, (list, tuple)):
        return len(v) > 0 and all(_count0(i) for i in v)
    return _integer(v) and (v >= 1 or v == -1)


ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu", "hpu")
# not 64-true: images, metrics and the loss are float32 (it failed with a Float/Double mismatch after the first step)
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "transformer-engine",
              "transformer-engine-float16", "32", "16", "bf16", 32, 16)
DEVICES_HINT = "auto, a number of devices (-1: all), a list of indices [0,1], or a string '0,1'"

# Values Lightning would otherwise reject with a traceback or accept as nonsense; the same in every entry point.
TRAINER_RULES: list[Rule] = [
    ("trainer.accelerator", lambda v: v in ACCELERATORS, f"one of {', '.join(ACCELERATORS)}"),
    ("trainer.devices", _devices, DEVICES_HINT),
    ("trainer.num_nodes", _count1, "an integer >= 1"),
    ("trainer.precision", lambda v: v in PRECISIONS, "32-true, bf16-mixed, 16-mixed (GPU) or bf16-true"),
    ("trainer.accumulate_grad_batches", _count1, "an integer >= 1"),
    ("trainer.gradient_clip_val", _optional(lambda v: _number(v) and v >= 0), "null (off) or a number >= 0"),
    ("trainer.log_every_n_steps", _count1, "an integer >= 1"),
    ("trainer.check_val_every_n_epoch", _optional(_count1), "null or an integer >= 1"),
    ("trainer.min_epochs", _optional(_count0), "null or an integer >= 0"),
    ("trainer.deterministic", lambda v: v in (True, False, "warn"), "true, false or warn"),
    # Lightning's own meaning: a number of batches, or a fraction of them (0: none, e.g. to test the initial weights)
    *[(f"trainer.limit_{stage}_batches", _optional(_fraction_or_count),
       "null, a number of batches >= 0 or a fraction in [0, 1]") for stage in ("train", "val", "test", "predict")],
]

def _input_size(v) -> bool:
    return v is None or (isinstance(v, (list, tuple, ListConfig)) and len(v) == 2 and all(_size(s) for s in v))


# the ONNX export's options: conf/train.yaml `onnx` and conf/export.yaml `onnx`
ONNX_RULES: list[Rule] = [
    ("onnx.quantize", lambda v: v in (True, False, "static", "dynamic"),
     "false, true (static int8 calibrated on validation images), static or dynamic"),
    ("onnx.parity_images", lambda v: _integer(v) and 1 <= v <= 100_000, "an integer from 1 to 100000"),
    ("onnx.tolerance", lambda v: _number(v) and 0 < v <= 1, "a probability difference in (0, 1], e.g. 1e-4"),
    ("onnx.min_int8_agreement", lambda v: _number(v) and 0 <= v <= 1, "a fraction in [0, 1], e.g. 0.97"),
    ("onnx.input_size", _input_size, "null (the model's own input size) or [H, W] in pixels from 16 to 4096"),
    ("onnx.opset", lambda v: _integer(v) and 17 <= v <= 23, "an ONNX opset from 17 to 23"),
    ("onnx.exporter", lambda v: v in ("auto", "dynamo", "torchscript"),
     "auto (torch.export, falling back to TorchScript), dynamo or torchscript"),
]

BUDGET_HINT = "null (no bound) or a finite number of minutes > 0"
# scenario=auto's own knobs (conf/scenario/auto.yaml): checked before anything is measured
AUTO_RULES: list[Rule] = [
    ("scenario.small_max_per_class", lambda v: _integer(v) and v >= 1, "an integer >= 1 (examples per class)"),
    ("scenario.similar_min_gain", lambda v: _number(v) and -1 <= v <= 1, "a probe-accuracy gain in [-1, 1], e.g. 0.1"),
    ("scenario.probe_max_samples", lambda v: _integer(v) and v >= 2, "an integer >= 2"),
    ("scenario.pixel_size", lambda v: _integer(v) and 1 <= v <= 256, "an integer side from 1 to 256, e.g. 16"),
    ("scenario.small_finetune", lambda v: isinstance(v, bool), "true or false"),
    ("scenario.side_min_gain", _optional(lambda v: _number(v) and -1 <= v <= 1),
     "null (4x native, unmeasured) or a probe-accuracy gain in [-1, 1], e.g. 0.02"),
    ("scenario.side_max_p", lambda v: _number(v) and 0 < v <= 1, "a p-value in (0, 1], e.g. 0.05"),
    ("scenario.probe_enough_acc", _optional(lambda v: _number(v) and 0 < v <= 1),
     "null (always fine-tune small data) or a probe accuracy in (0, 1], e.g. 0.98"),
    ("scenario.probe_enough_samples", lambda v: _integer(v) and v >= 2, "an integer >= 2 (training images probed)"),
    ("scenario.budget_minutes", _optional(lambda v: _number(v) and v > 0), BUDGET_HINT),
    ("scenario.small_budget_minutes", _optional(lambda v: _number(v) and v > 0), BUDGET_HINT),
    ("scenario.small_snapshots", _optional(lambda v: _integer(v) and (v == 0 or v >= 2)),
     "null or 0 (no snapshot ensemble) or a number of cosine cycles >= 2, e.g. 3"),
    ("scenario.small_deliver", lambda v: v in ("val", "ensemble", "best"), "ensemble, val or best (snapshots.deliver)"),
]

def _pair(lo: float, hi: float | None) -> Callable[[object], bool]:
    """Two numbers, smallest first, within (lo, hi] (no upper bound: hi None)."""
    def ok(v) -> bool:
        if not isinstance(v, (list, tuple, ListConfig)) or len(v) != 2 or not all(_number(x) for x in v):
            return False
        a, b = float(v[0]), float(v[1])
        return lo < a <= b and (hi is None or b <= hi)
    return ok


def _probability(v) -> bool:
    return _number(v) and 0 <= v <= 1


# The augmentation policy's values (found by a hostile tester: a reversed scale trained with a buried timm warning,
# ratio [0, 1] and a negative mixup alpha were tracebacks at the first step, after the run folder was made)
AUGMENT_RULES: list[Rule] = [
    ("augment.scale", _optional(_pair(0.0, 1.0)), "null or [min, max] area fractions with 0 < min <= max <= 1, "
     "e.g. [0.6, 1.0]"),
    ("augment.ratio", _optional(_pair(0.0, None)), "null or [min, max] aspect ratios with 0 < min <= max, e.g. "
     "[0.75, 1.3333]"),
    ("augment.hflip", _optional(_probability), "a probability in [0, 1], e.g. 0.5 (0: off)"),
    ("augment.vflip", _optional(_probability), "a probability in [0, 1] (0: off)"),
    ("augment.re_prob", _optional(_probability), "a probability in [0, 1], e.g. 0.25 (0: off)"),
    ("augment.mixup.mixup_alpha", lambda v: _number(v) and v >= 0, "a number >= 0, e.g. 0.2 (0: off)"),
    ("augment.mixup.cutmix_alpha", lambda v: _number(v) and v >= 0, "a number >= 0, e.g. 1.0 (0: off)"),
    ("augment.mixup.prob", _probability, "a probability in [0, 1], e.g. 1.0"),
    ("augment.mixup.switch_prob", _probability, "a probability in [0, 1], e.g. 0.5"),
]

RULES: list[Rule] = [
    # above 10 no optimizer trains (and float32 overflows past 3e38): a typo's exponent, not a learning rate
    ("optimizer.lr", lambda v: _number(v) and 0 < v <= 10, "a positive number up to 10, e.g. 1e-3"),
    ("optimizer.weight_decay", lambda v: v is None or (_number(v) and v >= 0), "a number >= 0 (null or 0: none)"),
    ("optimizer.betas", lambda v: isinstance(v, (list, tuple, ListConfig)) and len(v) == 2
     and all(_number(b) and 0 <= b < 1 for b in v), "two coefficients in [0, 1), e.g. [0.9, 0.999]"),
    # torch.optim's own arguments (a bad one fails only when the optimizer is built, after the run folder is made)
    ("optimizer.momentum", lambda v: _number(v) and 0 <= v < 1, "a coefficient in [0, 1), e.g. 0.9 (0: none)"),
    ("optimizer.dampening", lambda v: _number(v) and 0 <= v <= 1, "a value in [0, 1]"),
    ("optimizer.alpha", lambda v: _number(v) and 0 <= v <= 1, "a smoothing constant in [0, 1], e.g. 0.9"),
    ("optimizer.eps", lambda v: _number(v) and 0 < v < 1, "a small positive number, e.g. 1e-8"),
    ("optimizer.nesterov", _boolean, "true or false"),
    # the schedule's factors (a negative floor or factor would turn the LR negative: gradient ascent, in silence)
    ("scheduler.min_lr_ratio", lambda v: _number(v) and 0 <= v <= 1,
     "a fraction of the starting LR in [0, 1], e.g. 0.01"),
    ("scheduler.gamma", lambda v: _number(v) and 0 < v <= 1, "a decay factor in (0, 1], e.g. 0.1 or 0.9"),
    ("scheduler.warmup_epochs", lambda v: _number(v) and 0 <= v <= 100_000, "a number of epochs >= 0"),
    ("scheduler.step_epochs", lambda v: _number(v) and 0 < v <= 100_000, "a positive number of epochs, e.g. 3"),
    ("scheduler.cycles", lambda v: _integer(v) and v >= 0, "an integer >= 0 (cosine cycles)"),
    ("callbacks.model_checkpoint.save_top_k", lambda v: _integer(v) and v >= -1,
     "an integer >= -1 (-1: keep all, 0: none, k: the k best)"),
    ("callbacks.last_checkpoint.every_n_steps", _optional(_count1),
     "null (epoch ends only) or an integer >= 1 (optimizer steps)"),
    ("callbacks.initial_loss_check.tolerance", lambda v: _number(v) and v > 0,
     "a positive fraction of ln(number of classes), e.g. 0.25"),
    ("callbacks.lr_monitor.logging_interval", _optional(lambda v: v in ("step", "epoch")),
     "step, epoch or null (both)"),
    ("model.drop_rate", lambda v: _number(v) and 0 <= v < 1, "a rate in [0, 1)"),
    ("model.drop_path_rate", lambda v: _number(v) and 0 <= v < 1, "a rate in [0, 1)"),
    ("model.head_init_std", lambda v: _number(v) and v > 0, "a positive number, e.g. 0.01"),
    ("finetune.strategy", lambda v: v in STRATEGIES, f"one of {', '.join(STRATEGIES)}"),
    ("finetune.trainable_stages", lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    ("finetune.lp_epochs", lambda v: _integer(v) and v >= 0, "an integer >= 0 (head-only epochs)"),
    ("finetune.unfreeze_every", lambda v: _integer(v) and v >= 1, "an integer >= 1 (epochs per stage)"),
    ("finetune.backbone_lr_mult", lambda v: _number(v) and v >= 0, "a number >= 0"),
    ("finetune.layer_decay", lambda v: v is None or (_number(v) and 0 < v <= 1), "null or a factor in (0, 1]"),
    ("finetune.label_smoothing", lambda v: _number(v) and 0 <= v < 1, "a value in [0, 1)"),
    ("finetune.head_init", lambda v: v in ("random", "probe"),
     "random, or probe (start from the best linear probe on frozen features)"),
    ("trainer.max_epochs", lambda v: _integer(v) and 1 <= v <= 100_000, "an integer from 1 to 100000"),
    ("data.batch_size", lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    ("data.samples_per_class", lambda v: v is None or (_integer(v) and v >= 1), "null or an integer >= 1"),
    # null only with data=shards (whose splits were made at conversion; checked in validate)
    ("data.val_fraction", lambda v: v is None or (_number(v) and 0 < v < 1), "a fraction in (0, 1)"),
    ("data.test_fraction", lambda v: v is None or (_number(v) and 0 < v < 1), "a fraction in (0, 1)"),
    ("data.on_bad_file", lambda v: v in ("skip", "error"), "skip or error"),
    ("data.balance", lambda v: v in ("none", "weights", "sampler", "auto"),
     "none, weights (class-weighted loss), sampler (class-balanced sampler) or auto"),
    ("data.balance_auto_ratio", lambda v: _number(v) and v >= 1,
     "a ratio >= 1 (largest / smallest training class at which auto balances)"),
    ("early_stopping.patience", lambda v: v is None or (_integer(v) and v >= 1),
     "null (off) or an integer >= 1 (validations without improvement before stopping)"),
    ("early_stopping.min_delta", lambda v: _number(v) and v >= 0, "a number >= 0"),
    ("report.top_losses", lambda v: _integer(v) and 0 <= v <= 1000, "an integer from 0 (off) to 1000"),
    ("snapshots.cycles", lambda v: _integer(v) and v >= 0, "0 (off) or a number of cycles"),
    ("snapshots.ensemble_last", lambda v: v is None or (_integer(v) and v >= 1), "null (all) or an integer >= 1"),
    ("snapshots.first_cycle", lambda v: v is None or (_number(v) and 0 < v < 1),
     "null (equal cycles) or the first cycle's share of the run, in (0, 1)"),
    ("snapshots.deliver", lambda v: v in ("val", "ensemble", "best"),
     "val (the ensemble unless the best checkpoint scores higher on validation), ensemble or best"),
    ("seed", lambda v: _integer(v) and 0 <= v < 2**32, "an integer from 0 to 2**32 - 1"),
    # Switches: a typo'd value must not read as true (overwrite=tru would delete the previous run's artifacts).
    *((key, _boolean, "true or false")
      for key in ("overwrite", "test", "export", "cache_features", "data.mirror_invariant",
                  "finetune.freeze_bn_stats", "report.calibrate")),
    *ONNX_RULES,
    ("onnx.enabled", lambda v: v in (True, False, "auto"),
     "auto (where onnx and onnxruntime are installed), true (required) or false"),
    ("data.image_size", _optional(_size), "null (the backbone's own) or a side in pixels from 16 to 4096"),
    ("data.small_data_image_size", _optional(_size), "null (the backbone's own) or a side in pixels from 16 to 4096"),
    # below 0.25 the evaluation resize (image_size / crop_pct) grows past 4x the side: a typo, and a memory hazard
    ("data.crop_pct", _optional(lambda v: _number(v) and 0.25 <= v <= 1),
     "null (the backbone's own) or a fraction from 0.25 to 1"),
    ("data.num_workers", _optional(_count0), "null (automatic) or an integer >= 0"),
    ("data.eval_batch_size", _optional(_count1), "null (2 x data.batch_size) or an integer >= 1"),
    *TRAINER_RULES,
]


# python -m tl.predict, tl.evaluate and tl.export
DEVICE_RULE: Rule = ("device", lambda v: isinstance(v, str) and v != "", "auto, cpu, cuda or cuda:N")
CKPT_RULE: Rule = ("ckpt", lambda v: isinstance(v, str) and v.strip() != "",
                   "a .ckpt written by python -m tl.train, a run directory or an export directory")
EXPORT_RULES: list[Rule] = [
    CKPT_RULE,
    ("output", lambda v: v is None or (isinstance(v, str) and v.strip() != ""), "null (RUN/export) or a folder"),
    ("format", lambda v: v in ("onnx", "safetensors", "all"), "onnx, safetensors or all"),
    ("ensemble.last", lambda v: v is None or (_integer(v) and v >= 1), "null (all snapshots) or an integer >= 1"),
    ("seed", _optional(lambda v: _integer(v) and 0 <= v < 2**32), "null (the training run's) or an integer >= 0"),
    ("batch_size", _optional(_count1), "null or an integer >= 1"),
    ("num_workers", _optional(_count0), "null or an integer >= 0"),
    *ONNX_RULES,
]
PREDICT_RULES: list[Rule] = [
    CKPT_RULE,
    ("inputs", lambda v: isinstance(v, str) and v.strip() != "", "an image file, a folder or a .txt list of files"),
    ("output", lambda v: isinstance(v, str) and v.strip() != "", "a .csv file path"),
    ("topk", _count1, "an integer >= 1 (how many labels per file)"),
    ("batch_size", _count1, "an integer >= 1"),
    ("num_workers", _optional(_count0), "null (automatic) or an integer >= 0"),
    ("threads", _optional(_count1), "null (automatic) or an integer >= 1"),
    ("optimize", _boolean, "true or false"),
    ("min_prob", _optional(lambda v: _number(v) and 0 <= v <= 1),
     "null (always label) or a probability in [0, 1] below which the label is left empty"),
    DEVICE_RULE,
]
EVALUATE_RULES: list[Rule] = [
    CKPT_RULE,
    ("ensemble.last", _optional(_count1), "null (all snapshots) or an integer >= 1"),
    ("seed", _optional(lambda v: _integer(v) and 0 <= v < 2**32), "null (the training run's) or an integer >= 0"),
    ("batch_size", _optional(_count1), "null or an integer >= 1"),
    ("num_workers", _optional(_count0), "null or an integer >= 0"),
    DEVICE_RULE,
]


def check_rules(cfg: DictConfig, rules: list[Rule]) -> None:
    """Raise a one-line TLError for the first value in `cfg` that breaks one of `rules`."""
    for key, ok, expected in rules:
        try:
            value = OmegaConf.select(cfg, key, default="<absent>")
        except Exception as e:  # noqa: BLE001 - an interpolation that does not resolve
            raise TLError(f"{key} cannot be resolved ({type(e).__name__}: {(str(e).splitlines() or [''])[0]}): "
                          f"use {expected}") from e
        if isinstance(value, str) and value == "<absent>":
            continue
        if not ok(value):
            raise TLError(f"{key}={value!r} is invalid: use {expected}")


def check_hardware(trainer: DictConfig) -> None:
    """What this machine cannot run, said before Lightning fails with a traceback: a GPU where there is none, more
    GPUs than there are, a half precision the CPU does not do."""
    import torch

    accelerator, devices = trainer.get("accelerator", "auto"), trainer.get("devices", 1)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if accelerator in ("gpu", "cuda") and gpus == 0:
        raise TLError(f"trainer.accelerator={accelerator} but this machine has no CUDA GPU: use trainer=cpu "
                      "(or trainer.accelerator=cpu)")
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and gpus > 0)
    if on_gpu:
        wanted = (len(devices) if OmegaConf.is_list(devices) or isinstance(devices, (list, tuple)) else
                  len(devices.strip(",").split(",")) if isinstance(devices, str) and devices != "auto" else
                  devices if _integer(devices) and devices > 0 else 0)
        if wanted > gpus:
            raise TLError(f"trainer.devices={devices} asks for {wanted} GPUs but this machine has {gpus}: use "
                          f"trainer.devices={gpus} or fewer")
    else:
        if not (devices == "auto" or (_integer(devices) and devices > 0)):  # -1, [0], "0,1": GPU indices
            raise TLError(f"trainer.devices={devices} selects GPUs, and this run is on the CPU: use a number of "
                          "processes (trainer.devices=1, or 2 with trainer=ddp) or auto")
        wanted = devices if _integer(devices) and devices > 0 else 0
        cores = os.cpu_count() or 1
        if wanted > max(2, cores):  # one process per device, each with its model and loaders: past the cores it hangs
            raise TLError(f"trainer.devices={devices} starts {wanted} processes on the CPU but this machine has "
                          f"{cores} cores: use trainer.devices={max(2, cores)} or fewer")
    plugins = trainer.get("plugins") or []
    targets = {str(p.get("_target_", "")).rsplit(".", 1)[-1] for p in plugins if hasattr(p, "get")}
    strategy = trainer.get("strategy")
    if hasattr(strategy, "get"):
        targets.add(str(strategy.get("_target_", "")).rsplit(".", 1)[-1])
    if not on_gpu and targets & {"TimmSyncBatchNorm", "FSDPStrategy"}:
        what = "trainer=ddp_syncbn (SyncBatchNorm)" if "TimmSyncBatchNorm" in targets else "trainer=fsdp"
        raise TLError(f"{what} runs on GPUs only (torch has no CPU kernel for it): on the CPU use trainer=ddp "
                      "trainer.accelerator=cpu")
    if "SLURMEnvironment" in targets and not os.environ.get("SLURM_JOB_ID"):
        raise TLError("trainer=slurm takes its ranks from a SLURM job (SLURM_JOB_ID, SLURM_NODEID, ... are not set "
                      "here): submit it with sbatch scripts/slurm/train.sbatch, or outside SLURM use trainer=ddp "
                      "(or trainer=cpu)")
    if not on_gpu and accelerator in ("cpu", "auto") and str(trainer.get("precision")) in ("16-mixed", "16"):
        raise TLError(f"trainer.precision={trainer.get('precision')} needs a GPU: on the CPU use bf16-mixed or 32-true")


# What model selection and early stopping can monitor (logged every validation by TransferModule), and which way is
# better.
MONITORS = {"val/acc": "max", "val/balanced_acc": "max", "val/macro_f1": "max", "val/acc_top5": "max",
            "val/loss": "min", "val/ece": "min", "train/acc": "max", "train/loss": "min",
            "train/loss_epoch": "min"}


def check_monitor(callbacks) -> None:
    """The checkpoint callback's monitored metric is one the module logs, watched in the direction that is better."""
    for name in ("model_checkpoint", "early_stopping"):  # early stopping's too, also without model checkpointing
        watcher = callbacks.get(name)
        if watcher is not None and watcher.get("monitor") is not None:
            _check_watched(name, str(watcher.monitor), watcher.get("mode", "min"))
    ckpt = callbacks.get("model_checkpoint")
    if ckpt is None or ckpt.get("monitor") is None:
        return
    if ckpt.get("ties", "first") not in ("first", "last"):
        raise TLError(f"callbacks.model_checkpoint.ties={ckpt.get('ties')!r} is invalid: use first (the earliest of "
                      "equally scored checkpoints) or last (the latest)")
    if ckpt.get("ties", "first") == "last" and ckpt.get("save_top_k", 1) != 1:
        raise TLError(f"callbacks.model_checkpoint.ties=last needs save_top_k=1 (it is "
                      f"{ckpt.get('save_top_k')}): among several kept checkpoints Lightning names the earliest best")


def _check_watched(name: str, monitor: str, mode: str) -> None:
    """A metric tl logs (MONITORS), in its better direction. A name like one of them (`acc`, `val_acc`,
    `val/balanced_ac`, `test/acc`) fails in one line now, not after the first epoch; any other name is taken for a
    metric that a callback of the user's own logs."""
    if monitor not in MONITORS:
        close = [m for m in MONITORS if m.endswith("/" + monitor)][:1] or \
            difflib.get_close_matches(monitor, MONITORS, n=1, cutoff=0.75)
        if not close and not monitor.startswith(("val", "train/", "train_", "test/", "test_")):
            return
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise TLError(f"callbacks.{name}.monitor={monitor!r} is not logged{hint}: use one of {', '.join(MONITORS)} "
                      "(test/ metrics exist only after training)")
    if mode != MONITORS[monitor]:
        better = "higher" if MONITORS[monitor] == "max" else "lower"
        raise TLError(f"callbacks.{name}.monitor={monitor} is better when {better} but callbacks.{name}.mode={mode}: "
                      f"add callbacks.{name}.mode={MONITORS[monitor]}")


# Top-level groups of settings that the run reads key by key: null would fail deep inside, after the data is measured.
SECTIONS = {"data": "data=digits", "model": "model=efficientnet_lite0", "trainer": "trainer=default",
            "optimizer": "optimizer=adamw", "augment": "augment=none", "finetune": "finetune.strategy=full",
            "snapshots": "snapshots.cycles=0 (off)", "early_stopping": "early_stopping.patience=null (off)",
            "report": "report.calibrate=false report.top_losses=0 (off)", "paths": "paths.cache_dir=DIR"}


def validate(cfg: DictConfig, final: bool = True) -> None:
    """Raise a one-line TLError for the first value that breaks a rule, before any work.

    `final`: the config `train()` runs, where `scenario=auto` has already been decided (`tl.scenarios.resolve`).
    """
    check_required(cfg)
    for key, example in SECTIONS.items():
        if key in cfg and cfg.get(key) is None:
            raise TLError(f"{key}=null: {key} is a group of settings, not a switch: set its keys instead, e.g. "
                          f"{example}")
    check_resolvable(cfg)  # after: a section set to null breaks the interpolations into it, which say less
    check_rules(cfg, RULES)
    check_rules(cfg, AUGMENT_RULES)
    mixup = OmegaConf.select(cfg, "augment.mixup")
    if isinstance(mixup, DictConfig) and not (mixup.get("mixup_alpha") or mixup.get("cutmix_alpha")
                                              or mixup.get("cutmix_minmax")):
        raise TLError("augment.mixup mixes nothing with mixup_alpha=0 and cutmix_alpha=0: set one above 0 (e.g. "
                      "augment.mixup.mixup_alpha=0.2), or use augment=strong for no mixing")
    if cfg.scenario.get("name") == "auto":
        check_rules(cfg, AUTO_RULES)
    check_hardware(cfg.trainer)
    min_epochs = OmegaConf.select(cfg, "trainer.min_epochs")
    if min_epochs is not None and (not _integer(min_epochs) or not 0 <= min_epochs <= cfg.trainer.max_epochs):
        raise TLError(f"trainer.min_epochs={min_epochs} is invalid: use null or an integer from 0 to "
                      f"trainer.max_epochs={cfg.trainer.max_epochs} (Lightning would train past max_epochs)")
    every = OmegaConf.select(cfg, "trainer.check_val_every_n_epoch")
    if final and _integer(every) and every > 1 and cfg.trainer.max_epochs % every:
        last = cfg.trainer.max_epochs - cfg.trainer.max_epochs % every
        raise TLError(f"trainer.check_val_every_n_epoch={every} does not divide trainer.max_epochs="
                      f"{cfg.trainer.max_epochs}: Lightning validates, and keeps checkpoints, only every {every} "
                      f"epochs, so the epochs after epoch {last} would be trained and lost; use a divisor of "
                      "max_epochs, or max_epochs a multiple of it")
    if final and cfg.scenario.name == "auto":
        raise TLError("scenario=auto is decided before train(): run python -m tl.train, or pass the config through "
                      "tl.scenarios.resolve(cfg, overrides) first")
    import timm  # here, not at the top: tl.predict's ONNX Runtime path imports this module without timm

    if not timm.is_model(cfg.model.name):
        from tl.data.transforms import _unknown_model_message

        raise TLError(_unknown_model_message(cfg.model.name))
    from tl.data.transforms import fixed_input_side

    fixed, side = fixed_input_side(cfg.model.name), cfg.data.get("image_size")
    if fixed is not None and side is not None and int(side) != fixed:
        raise TLError(f"model.name={cfg.model.name} takes only {fixed} px inputs (its position embeddings or windows "
                      f"are sized to them), but data.image_size={side}: set data.image_size={fixed} (for a "
                      f"small-data preset, data.small_data_image_size={fixed}), or pick a model that takes any size "
                      "(a CNN such as efficientnet_lite0)")
    callbacks = cfg.get("callbacks") or {}
    check_monitor(callbacks)
    cycles, epochs = cfg.snapshots.cycles, cfg.trainer.max_epochs
    if cycles > epochs:
        raise TLError(f"snapshots.cycles={cycles} exceeds trainer.max_epochs={epochs}: use at most one cycle per epoch")
    if cycles and OmegaConf.select(cfg, "scheduler.cycles") != cycles:
        raise TLError(f"snapshots.cycles={cycles} needs a schedule whose cycles end at the snapshots: use "
                      "scheduler=cosine (its cycles follow snapshots.cycles)")
    if cycles and callbacks.get("snapshots") is None:
        raise TLError(f"snapshots.cycles={cycles} but callbacks.snapshots is off: keep the callback, or set "
                      "snapshots.cycles=0")
    if OmegaConf.select(cfg, "early_stopping.patience") is not None and callbacks.get("early_stopping") is None:
        raise TLError(f"early_stopping.patience={cfg.early_stopping.patience} but callbacks.early_stopping is off: "
                      "keep the callback, or set early_stopping.patience=null")
    if final and cfg.finetune.strategy in STAGED and cfg.trainer.max_epochs <= cfg.finetune.lp_epochs:
        logging.getLogger("tl.checks").warning(
            "finetune.strategy=%s trains the head alone for finetune.lp_epochs=%d epochs, and trainer.max_epochs=%d "
            "ends the run before the backbone opens: this run is a linear probe (raise trainer.max_epochs or lower "
            "finetune.lp_epochs to fine-tune)", cfg.finetune.strategy, cfg.finetune.lp_epochs, cfg.trainer.max_epochs)
    if cfg.finetune.strategy in STAGED and callbacks.get("unfreezing") is None:
        raise TLError(f"finetune.strategy={cfg.finetune.strategy} opens the backbone on a schedule, but "
                      "callbacks.unfreezing is off: keep the callback, or pick a static strategy")
    if cfg.trainer.get("enable_progress_bar") is False and callbacks.get("progress") is not None:
        raise TLError("trainer.enable_progress_bar=false but callbacks.progress is set: turn the bar off with "
                      "callbacks.progress=null")
    optimizer = cfg.get("optimizer") or {}
    if optimizer.get("nesterov") is True and (optimizer.get("momentum") == 0 or optimizer.get("dampening", 0) != 0):
        raise TLError(f"optimizer.nesterov=true needs momentum and no dampening (optimizer.momentum="
                      f"{optimizer.get('momentum')}, optimizer.dampening={optimizer.get('dampening', 0)}): add "
                      "optimizer.nesterov=false for plain SGD, or give a momentum such as 0.9")
    lr_find = cfg.get("lr_find", False)
    if lr_find not in (False, True, "apply"):
        raise TLError(f"lr_find={lr_find!r}: use false, true (suggest and plot) or apply (also train with it)")
    if lr_find and (str(cfg.trainer.get("devices", 1)) != "1" or int(cfg.trainer.get("num_nodes", 1)) != 1):
        raise TLError("lr_find runs on one device: run it with trainer.devices=1, then train with optimizer.lr=<lr>")
    shards = OmegaConf.select(cfg, "data.source._target_") == "tl.data.shards.ShardSource"
    for key in ("val_fraction", "test_fraction"):
        value = cfg.data.get(key)
        if shards and value is not None:
            raise TLError(f"data.{key}={value} does not apply to data=shards: its splits were made at conversion; "
                          f"convert again with python -m tl.shard ... data.{key}={value} (or leave it out)")
        if not shards and value is None:
            raise TLError(f"data.{key}=None is invalid: use a fraction in (0, 1)")
    if not shards and (cfg.data.val_fraction + cfg.data.test_fraction) >= 0.9:
        raise TLError(f"data.val_fraction + data.test_fraction = {cfg.data.val_fraction + cfg.data.test_fraction:g} "
                      "leaves too little to train on: keep their sum below 0.9")


def load_training_checkpoint(ckpt_path: str) -> dict:
    """The checkpoint at `ckpt_path` (memory-mapped, tensors and plain values only: cheap, and never runs code), if it
    is a Lightning training checkpoint; else one line. Checked before the run directory is touched."""
    import torch

    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - UnpicklingError, RuntimeError for junk
        raise TLError(f"ckpt_path={ckpt_path!r} is not a checkpoint that loads with weights_only=True "
                      f"({type(e).__name__}); resume from the run's checkpoints/last.ckpt") from e
    # A weights file (a plain state_dict, a timm .pth, torch.save of anything) loads above but holds no training
    # state: Lightning would fail on it with a traceback, after the run directory was rewritten.
    missing = [k for k in ("state_dict", "epoch", "global_step", "pytorch-lightning_version")
               if not isinstance(ckpt, dict) or k not in ckpt]
    if missing or not isinstance(ckpt.get("state_dict"), dict):
        raise TLError(f"ckpt_path={ckpt_path!r} holds weights, not a training checkpoint (no "
                      f"{', '.join(missing) or 'state_dict'}): resume from a run's checkpoints/last.ckpt; to start "
                      "from these weights use model.pretrained=PATH")
    if not isinstance(ckpt.get("hyper_parameters") or {}, dict):
        raise TLError(f"ckpt_path={ckpt_path!r} has no readable hyper_parameters: resume from a tl run's "
                      "checkpoints/last.ckpt")
    return ckpt


def _same_setting(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_setting(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) \
            and not isinstance(b, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0) or a == b
    return a == b


def _check_optimizer_settings(ckpt_path: str, hp: dict, ours, lr_found: bool = False) -> None:
    """Found by a hostile tester: a resume with another `optimizer.lr` (or weight decay, betas, backbone LR
    multiplier) trained on at the checkpoint's, since Lightning restores the optimizer's state with its parameter
    groups' rates, while config.yaml recorded the new value. The scheduler is rebuilt from the config (its changes
    do apply); the optimizer's settings would not, so they are refused. `lr_found`: the run has lr_find=apply, so
    the checkpoint's rate is the finder's, not the config's (tl.train takes it over)."""
    saved, now = hp.get("optimizer"), ours.get("optimizer")
    if not isinstance(saved, dict) or now is None:
        return
    now = dict(to_plain(now))
    pairs = [(f"optimizer.{k}", saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now))
             if k not in ("_target_", "_partial_") and not (lr_found and k == "lr")]
    if "backbone_lr_mult" in hp:
        pairs.append(("finetune.backbone_lr_mult", hp["backbone_lr_mult"], ours.get("backbone_lr_mult")))
    # a snapshot ensemble's cycles are laid out over the whole run: another count or first cycle on a resume made a
    # "cycle" that never restarted its rate, delivered as an ensemble member (found by a hostile tester)
    saved_sched, our_sched = hp.get("scheduler"), ours.get("scheduler")
    if isinstance(saved_sched, dict) and our_sched is not None:
        our_sched = dict(to_plain(our_sched))
        group = "snapshots" if str(our_sched.get("_target_", "")).endswith(".cosine") else "scheduler"
        for key, setting in (("cycles", f"{group}.cycles"), ("first_cycle", f"{group}.first_cycle")):
            if key in saved_sched and not _same_setting(saved_sched.get(key), our_sched.get(key)):
                raise TLError(f"ckpt_path={ckpt_path!r} was trained with {setting}={saved_sched.get(key)!r} but this "
                              f"run has {setting}={our_sched.get(key)!r}: the learning-rate cycles are laid out over "
                              f"the whole run, so the rest of it would not restart where a cycle should; resume with "
                              f"{setting}={saved_sched.get(key)!r} (the run's config.yaml), or start a new run in "
                              "another hydra.run.dir")
    for setting, before, after in pairs:
        if not _same_setting(before, after):
            raise TLError(f"ckpt_path={ckpt_path!r} was trained with {setting}={before!r} but this run has "
                          f"{setting}={after!r}: a resume goes on with the checkpoint's optimizer state and learning "
                          f"rates, so the new value would be ignored; resume without changing {setting}, or train "
                          "on from these weights at the new setting in a new run: model.pretrained=CKPT (its "
                          "classifier is kept) in another hydra.run.dir")


def check_resume(ckpt_path: str, module, max_epochs: int | None = None, finished: bool = False,
                 planned: bool = False, lr_found: bool = False) -> dict:
    """A checkpoint to resume from must be a tl checkpoint of the same architecture and classes as the run, with
    epochs left to train, checked before anything in the run directory is rewritten. Returns its hyperparameters."""
    ckpt = load_training_checkpoint(ckpt_path)
    hp = ckpt.get("hyper_parameters") or {}
    from tl.models.module import check_calibration

    check_calibration(ckpt.get("calibration"), f"ckpt_path={ckpt_path!r}")
    ours = module.hparams
    for key in ("name", "num_classes", "class_names"):
        if key in hp and hp[key] != ours.get(key):
            raise TLError(f"ckpt_path={ckpt_path!r} was trained with {key}={hp[key]!r} but this run has "
                          f"{key}={ours.get(key)!r}: resume with the run's own settings, or start a new run in "
                          "another hydra.run.dir")
    # The optimizer's state (its class, and one parameter group per frozen/trainable split and LR) only loads into
    # an optimizer of the same kind over the same groups: another scenario or optimizer would fail in Lightning,
    # after the run's files were rewritten.
    saved_opt = (hp.get("optimizer") or {}).get("_target_") if isinstance(hp.get("optimizer"), dict) else None
    our_opt = (ours.get("optimizer") or {}).get("_target_")
    if saved_opt and our_opt and saved_opt != our_opt:
        raise TLError(f"ckpt_path={ckpt_path!r} was trained with the optimizer {saved_opt} but this run has {our_opt}: "
                      "resume with the run's own settings (its config.yaml), or start a new run in another "
                      "hydra.run.dir")
    _check_optimizer_settings(ckpt_path, hp, ours, lr_found)
    for key, setting in (("strategy", "finetune.strategy"), ("trainable_stages", "finetune.trainable_stages"),
                         ("layer_decay", "finetune.layer_decay"), ("lp_epochs", "finetune.lp_epochs"),
                         ("unfreeze_every", "finetune.unfreeze_every")):
        if key in hp and hp[key] != ours.get(key):
            raise TLError(f"ckpt_path={ckpt_path!r} was trained with {setting}={hp[key]!r} but this run has "
                          f"{ours.get(key)!r} (another scenario?): resume with the run's own settings (its "
                          "config.yaml), or start a new run in another hydra.run.dir")
    saved_pre, our_pre = hp.get("preprocess"), ours.get("preprocess")
    if isinstance(saved_pre, dict) and isinstance(our_pre, dict):  # tuples and lists alike
        saved_pre, our_pre = ({k: list(v) if isinstance(v, (list, tuple)) else v for k, v in d.items()}
                              for d in (saved_pre, dict(our_pre)))
    if isinstance(saved_pre, dict) and isinstance(our_pre, dict) and saved_pre != our_pre:
        changed = sorted(k for k in set(saved_pre) | set(our_pre) if saved_pre.get(k) != our_pre.get(k))
        if planned:  # scenario=auto planned again on resume (timings differ): a requeued job must not be refused
            import logging

            logging.getLogger("tl.train").warning(
                "Resuming with other preprocessing than the checkpoint's (%s: %s now %s): scenario=auto planned "
                "again; pin data.image_size / data.small_data_image_size to keep it", ", ".join(changed),
                [saved_pre.get(k) for k in changed], [our_pre.get(k) for k in changed])
        else:
            raise TLError(f"ckpt_path={ckpt_path!r} was trained with other preprocessing ({', '.join(changed)}: "
                          f"{[saved_pre.get(k) for k in changed]} now {[our_pre.get(k) for k in changed]}): the "
                          "rest of the run would train on other inputs; resume with the run's own data settings "
                          "(its config.yaml), or start a new run in another hydra.run.dir")
    epoch = ckpt.get("epoch")  # 0-based: a finished run's last.ckpt holds max_epochs - 1
    if finished and max_epochs is not None and isinstance(epoch, int) and max_epochs <= epoch + 1:
        # nothing left to train: testing again would only rewrite the finished run's figures and export
        raise TLError(f"ckpt_path={ckpt_path!r}: the run finished its {epoch + 1} epochs and holds its results.json: "
                      f"to train further set trainer.max_epochs above {epoch + 1}; to export again use python -m "
                      "tl.export ckpt=RUN")
    if max_epochs is not None and isinstance(epoch, int) and epoch == max_epochs:
        return hp  # saved after the last epoch (a signal during test or the report): the resumed run tests, reports
    if max_epochs is not None and isinstance(epoch, int) and max_epochs < epoch + 1:
        raise TLError(f"ckpt_path={ckpt_path!r} was saved in epoch {epoch + 1} but trainer.max_epochs={max_epochs}: "
                      f"to continue training, set trainer.max_epochs to more than {epoch + 1}")
    return hp

