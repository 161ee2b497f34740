"""The LightningModule: a timm backbone with a new head, a freeze policy, param groups, optimizer and schedule."""

from __future__ import annotations

import math
import time

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError, MulticlassF1Score

from tl.errors import TLError
from tl.models.backbone import create_backbone, init_head, load_pretrained
from tl.models.finetune import apply_strategy, param_groups, set_frozen_modules_eval
from tl.models.schedules import epoch_steps


def check_calibration(entry, where: str) -> dict | None:
    """A calibration entry as read from a checkpoint or an export: None, or a dict whose `temperature` is a finite
    positive number; anything else is refused in one line naming `where` (a bad temperature would flip or NaN every
    probability)."""
    if entry is None:
        return None
    t = entry.get("temperature") if isinstance(entry, dict) else None
    # tl fits the temperature on [0.05, 20] (tl.report); far outside, softmax(logits / T) overflows to NaN
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or not 1e-3 <= t <= 1e3:
        raise TLError(f"{where} holds a calibration entry that is not a temperature from 0.001 to 1000 "
                      f"({str(entry)[:80]}): use the file as tl wrote it, or export it again from the run's checkpoint")
    return dict(entry)


# On a GPU the training loss's NaN check is read this many steps late (Module._check_finite_loss)
LOSS_CHECK_LAG = 2


class NonFiniteLossError(TLError):
    """Training diverged: stop at once rather than train on NaNs (the last good checkpoints stay as they are)."""


def weighted_soft_cross_entropy(logits: torch.Tensor, soft: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against soft targets (mixup, cutmix, label smoothing) with per-class weights that reweight the
    *examples*: example i counts w_i = sum_c w_c s_ic times, and its own cross-entropy sum_c s_ic (-log p_ic) is not
    reweighted within, so its best prediction stays its target. (Weighting each class's term instead, as PyTorch's
    `cross_entropy(weight=, label_smoothing=)` does, moves the smoothing mass toward the rare classes: with 120/3/120
    images, a brick image's best prediction became grass.) For one-hot targets it is PyTorch's weighted
    cross-entropy."""
    per_example = -(soft * logits.log_softmax(dim=-1)).sum(dim=-1)
    w = (soft * weights).sum(dim=-1)
    return (w * per_example).sum() / w.sum()


def weighted_cross_entropy(logits: torch.Tensor, y: torch.Tensor, weights: torch.Tensor,
                           label_smoothing: float = 0.0) -> torch.Tensor:
    """Class-weighted cross-entropy with label smoothing, the examples reweighted by their class (see
    `weighted_soft_cross_entropy`); without smoothing, PyTorch's `cross_entropy(weight=)`."""
    per_example = F.cross_entropy(logits, y, reduction="none", label_smoothing=label_smoothing)
    w = weights[y]
    return (w * per_example).sum() / w.sum()


class TransferModule(pl.LightningModule):
    """Image classifier fine-tuned from a pretrained timm backbone.

    Everything needed to rebuild it (names, sizes, class names, preprocessing) is saved as plain hyperparameters, so
    a checkpoint loads with `weights_only=True` and without the training config. The constructor builds the
    architecture with random weights; pretrained weights are state, loaded when a run starts from them
    (`module.load_pretrained()`, as `tl.train` does) and restored from a checkpoint otherwise, so reloading a
    checkpoint never fetches pretrained weights first.

    Inputs are images (N, C, H, W), or pooled pre-logit features (N, F) cached from the frozen backbone
    (`tl.data.features`), which go straight to the head.

    Args:
        name: timm model name.
        num_classes: width of the new head.
        pretrained: where the backbone's initial weights come from (`package`, `hub`, `none` or a path): recorded
            here, loaded by `load_pretrained()`.
        drop_rate: dropout before the head.
        drop_path_rate: stochastic depth rate.
        head_init_std: std of the new head's initial weights (small: initial loss near ln(num_classes)).
        strategy, trainable_stages: the freeze policy (`tl.models.finetune`).
        lp_epochs, unfreeze_every: the schedule of the staged strategies `gradual` and `lp_ft` (head-only epochs
            first, then one more stage every `unfreeze_every` epochs, or everything at once), carried out by
            `tl.callbacks.unfreezing.ScheduledUnfreezing`.
        backbone_lr_mult: backbone LR relative to the head's.
        layer_decay: optional layer-wise LR decay on top of `backbone_lr_mult`.
        label_smoothing: cross-entropy label smoothing.
        freeze_bn_stats: BatchNorm layers stay in eval mode while training (their pretrained running statistics are
            kept; their affine weights still train where the strategy trains them): for small batches, and for a
            head fitted to features under those statistics (`finetune.head_init=probe`).
        mixup: batch mixing (timm's Mixup): `mixup_alpha`, `cutmix_alpha`, `prob`, `switch_prob`; off when both
            alphas are 0 or None.
        optimizer: a `_partial_` optimizer config (conf/optimizer/); needs `lr` and may carry `weight_decay`.
        scheduler: a `_partial_` schedule config (conf/scheduler/), or None for a constant LR.
        class_names: label names, saved for prediction.
        preprocess: the input pipeline's size, interpolation and mean/std, saved for prediction.
        class_weights: per-class cross-entropy weights (`data.balance=weights`, `tl.data.balance`), or None.

    Metrics per epoch: `{stage}/acc` and `{stage}/loss`; on val and test also `balanced_acc` (mean per-class
    recall), `macro_f1`, `acc_top5` (more than 5 classes) and the expected calibration error (`val/ece`; at test
    `test/ece_uncalibrated`: `tl.report` adds the calibrated `test/ece`). A temperature fitted after training
    (`calibration`, by `tl.report`) is saved in checkpoints under "calibration" and read back on loading.
    """

    def __init__(self, name: str, num_classes: int, pretrained: str = "none", drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, head_init_std: float = 0.01, strategy: str = "full",
                 trainable_stages: int = 1, lp_epochs: int = 0, unfreeze_every: int = 1,
                 backbone_lr_mult: float = 1.0, layer_decay: float | None = None,
                 label_smoothing: float = 0.0, freeze_bn_stats: bool = False, mixup: dict | None = None,
                 optimizer: dict | None = None,
                 scheduler: dict | None = None,
                 class_names: list[str] | None = None, preprocess: dict | None = None,
                 class_weights: list[float] | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.model = create_backbone(name, num_classes, drop_rate, drop_path_rate)
        init_head(self.model, head_init_std)
        self.head_init: dict | None = None  # what fitted the head instead, when it starts as a probe (train.py)
        apply_strategy(self.model, strategy, trainable_stages, lp_epochs, unfreeze_every)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        weights = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
        self.register_buffer("class_weights", weights, persistent=False)  # rebuilt from hparams, not in state_dict
        self.calibration: dict | None = None  # {"temperature": T, ...} once fitted on val (tl.report)
        self.mixup = None
        self._loss_checks: list[tuple[torch.cuda.Event, torch.Tensor, int]] = []  # deferred on a GPU (_step)
        # training time carried across resumes: saved in every checkpoint, so that a resumed run reports the whole
        # fit (up to each earlier attempt's last checkpoint), not only its own last part
        self._fit_seconds_before = self._fit_seconds_carried = 0.0
        self._fit_seconds_loaded: float | None = None
        self._fit_clock: float | None = None
        if mixup and (mixup.get("mixup_alpha") or mixup.get("cutmix_alpha")):
            self.mixup = Mixup(
                mixup_alpha=mixup.get("mixup_alpha") or 0.0, cutmix_alpha=mixup.get("cutmix_alpha") or 0.0,
                prob=mixup.get("prob", 1.0), switch_prob=mixup.get("switch_prob", 0.5),
                label_smoothing=label_smoothing, num_classes=num_classes)
            self.soft_criterion = SoftTargetCrossEntropy()
        # validate_args=False: the labels come from tl's data module, and each update's checks would sync a GPU
        self.metrics = nn.ModuleDict({
            f"{stage}_acc": MulticlassAccuracy(num_classes, average="micro", validate_args=False)
            for stage in ("train", "val", "test")})
        for stage in ("val", "test"):
            self.metrics[f"{stage}_balanced_acc"] = MulticlassAccuracy(num_classes, average="macro",
                                                                       validate_args=False)
            self.metrics[f"{stage}_macro_f1"] = MulticlassF1Score(num_classes, average="macro", validate_args=False)
            # fed probabilities (see _step); on test the raw model's: tl.report adds the calibrated test/ece
            self.metrics["val_ece" if stage == "val" else "test_ece_uncalibrated"] = MulticlassCalibrationError(
                num_classes, n_bins=15, validate_args=False)
        if num_classes > 5:
            self.metrics.update({
                f"{stage}_acc_top5": MulticlassAccuracy(num_classes, top_k=5, average="micro", validate_args=False)
                for stage in ("val", "test")})

    def load_pretrained(self) -> str:
        """Load the backbone's pretrained weights (`pretrained`) into the model, head excluded; return their source."""
        return load_pretrained(self.model, self.hparams.pretrained, self.hparams.name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify_features(x) if x.ndim == 2 else self.model(x)

    def classify_features(self, features: torch.Tensor) -> torch.Tensor:
        """The head on pooled pre-logit features: dropout, then the classifier, as timm's `forward_head` does."""
        features = F.dropout(features, p=self.hparams.drop_rate, training=self.training)
        return self.model.get_classifier()(features)

    def train(self, mode: bool = True):
        """Frozen parts stay in eval mode while the rest trains (BatchNorm statistics must not drift)."""
        super().train(mode)
        if mode:
            self._eval_fixed_parts()
        return self

    def on_train_epoch_start(self) -> None:
        # Lightning does not call .train() at fit start (it keeps modes as found, and restores them after
        # validation), so the frozen parts are put in eval here, every epoch, after any unfreezing.
        self._eval_fixed_parts()

    def _eval_fixed_parts(self) -> None:
        set_frozen_modules_eval(self.model)
        if self.hparams.get("freeze_bn_stats"):
            for m in self.model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    # -- steps ------------------------------------------------------------------------------------------------
    def _step(self, batch, stage: str) -> torch.Tensor | None:
        if batch is None:  # every file of the batch unreadable since the scan: skipped and counted by the dataset
            return None
        x, y = batch[0], batch[1]  # (images, labels), or (images, labels, record ids) streamed from shards
        if stage == "train" and self.mixup is not None and x.ndim == 4:
            if len(y) % 2:  # timm's Mixup pairs the batch with its mirror: it needs an even count
                x, y = x[:-1], y[:-1]
            mixed, soft = self.mixup(x, y)
            logits = self(mixed)
            if self.class_weights is None:
                loss = self.soft_criterion(logits, soft)  # accuracy below is against the unmixed labels
            else:
                loss = weighted_soft_cross_entropy(logits, soft, self.class_weights)
        else:
            logits = self(x)
            if stage == "train" and self.class_weights is not None:
                loss = weighted_cross_entropy(logits, y, self.class_weights, self.hparams.label_smoothing)
            else:  # val/test losses stay unweighted: comparable across balance settings
                loss = self.criterion(logits, y)
        if stage == "train":
            self._check_finite_loss(loss)
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, batch_size=len(y),
                 sync_dist=stage != "train")
        with torch.no_grad():
            probs = None
            for key, metric in self.metrics.items():
                if key.startswith(stage):  # logged once per epoch (_log_metrics): self.log costs ~0.3 ms a call
                    if isinstance(metric, MulticlassCalibrationError):  # it would guess whether these are logits
                        probs = logits.float().softmax(dim=-1) if probs is None else probs
                        metric.update(probs, y)
                    else:
                        metric.update(logits, y)
        return loss

    def _check_finite_loss(self, loss: torch.Tensor) -> None:
        """Stop training at a NaN or infinite loss. On the CPU the loss is checked at once, before the step's update.
        On a GPU, reading it now would make the host wait for the step's forward pass every step, so the next step's
        kernels could not be queued while this one's run (measured on an H200: tl 0.79-0.87x timm's own loop with
        this and torchmetrics' argument checks syncing each step). There the loss is copied to pinned host memory
        without waiting (`_loss_checks`) and read `LOSS_CHECK_LAG` steps later, when the device is long past it: a
        fixed lag, so that under DDP every rank reads the same step's verdict at the same step. The bad step's
        update is applied and the run stops two steps later, before any checkpoint: the epoch's end and every
        checkpoint save read all pending verdicts first."""
        if loss.device.type != "cuda":
            if not torch.isfinite(loss):
                self._raise_nonfinite_loss(loss.item(), self.global_step)
            return
        bad = self._read_loss_checks(upto=self.global_step - LOSS_CHECK_LAG)
        if bad is not None:
            self._raise_nonfinite_loss(*bad)
        value = torch.empty((), dtype=loss.dtype, pin_memory=True)
        value.copy_(loss.detach(), non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        self._loss_checks.append((done, value, self.global_step))

    def _read_loss_checks(self, upto: int | None = None) -> tuple[float, int] | None:
        """Read the deferred loss verdicts of steps up to `upto` (all with None), waiting for the device where it has
        not got there; the first NaN or infinite one as (value, step), else None. Read verdicts are dropped."""
        bad = None
        while self._loss_checks and (upto is None or self._loss_checks[0][2] <= upto):
            done, value, step = self._loss_checks.pop(0)
            done.synchronize()
            if bad is None and not math.isfinite(value.item()):
                bad = (value.item(), step)
        return bad

    def _raise_nonfinite_loss(self, value: float, step: int) -> None:
        lr = (self.hparams.optimizer or {}).get("lr", "?")
        raise NonFiniteLossError(
            f"training loss is {value} at step {step} (epoch {self.current_epoch}): likely a learning rate too high "
            f"(optimizer.lr={lr}; try 10x lower) or bad input (NaN/inf pixels); checkpoints from earlier epochs are "
            "kept")

    def __getstate__(self) -> dict:
        # CUDA events cannot be pickled or deep-copied (EMA/SWA copy the module); pending verdicts stay with the run
        return {**super().__getstate__(), "_loss_checks": []}

    def _log_metrics(self, stage: str) -> None:
        """Log the stage's accuracy metrics for the epoch (computed over every process's updates) and reset them."""
        for key, metric in self.metrics.items():
            if key.startswith(stage) and metric.update_called:
                self.log(f"{stage}/{key.split('_', 1)[1]}", metric, prog_bar=key == f"{stage}_acc")

    def on_train_epoch_end(self) -> None:
        self._log_metrics("train")
        self._check_finite_weights()

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")
        if self.trainer.training:
            self._check_finite_weights()

    def _check_finite_weights(self) -> None:
        """Stop before any checkpoint of this epoch is written if an update left a weight (or a BatchNorm statistic)
        NaN or infinite: the step's loss was finite, so the per-step loss check could not see it, and `last.ckpt`
        must keep the last good state. Runs where the module hooks run, before Lightning's checkpoint callbacks."""
        bad_loss = self._read_loss_checks()  # a NaN loss not yet reported (on a GPU): the more telling message
        tensors = [t.detach() for t in (*self.parameters(), *self.buffers()) if t.is_floating_point()]
        finite = bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()) if tensors else True
        # one decision for every rank (a rank that raised alone would leave the others waiting in a collective)
        if not self.trainer.strategy.reduce_boolean_decision(finite and bad_loss is None, all=True):
            if bad_loss is not None:
                self._raise_nonfinite_loss(*bad_loss)
            lr = (self.hparams.optimizer or {}).get("lr", "?")
            raise NonFiniteLossError(
                f"the weights became NaN or infinite by step {self.global_step} (epoch {self.current_epoch}) while "
                f"the loss stayed finite (or another process's loss did not): likely a learning rate too high "
                f"(optimizer.lr={lr}; try 10x lower); no checkpoint of this epoch is written, last.ckpt keeps the "
                "previous epoch's state")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        bad = self._read_loss_checks()  # never save the state after a NaN loss that a GPU has not reported yet
        if bad is not None:
            self._raise_nonfinite_loss(*bad)
        if self.calibration is not None:
            checkpoint["calibration"] = dict(self.calibration)
        if self._fit_clock is not None:  # during a fit (not a checkpoint written after it, e.g. by tl.export)
            checkpoint["fit_seconds"] = self.fit_seconds

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.calibration = check_calibration(checkpoint.get("calibration"), "the checkpoint")
        seconds = checkpoint.get("fit_seconds")
        self._fit_seconds_loaded = (float(seconds) if isinstance(seconds, (int, float)) and math.isfinite(seconds)
                                    and seconds >= 0 else None)

    def on_fit_start(self) -> None:
        self._loss_checks.clear()  # verdicts left by an earlier fit that ended otherwise (a reused module)
        self.calibration = None  # training moves the weights: a temperature fitted to earlier ones no longer holds
        # a fit resumed from a checkpoint goes on counting from its time; a fresh one (no checkpoint loaded) from 0
        self._fit_seconds_carried, self._fit_seconds_loaded = self._fit_seconds_loaded or 0.0, None
        self._fit_seconds_before, self._fit_clock = self._fit_seconds_carried, time.perf_counter()

    def on_fit_end(self) -> None:
        self._fit_seconds_before, self._fit_clock = self.fit_seconds, None

    @property
    def fit_seconds(self) -> float:
        """Seconds of training over every attempt of this run: earlier attempts' (up to the checkpoint this fit
        resumed) plus this fit's so far."""
        running = time.perf_counter() - self._fit_clock if self._fit_clock is not None else 0.0
        return self._fit_seconds_before + running

    @property
    def fit_seconds_earlier(self) -> float:
        """The earlier attempts' share of `fit_seconds` (0 for a run trained in one go)."""
        return self._fit_seconds_carried

    def on_train_start(self) -> None:
        restore_loader_state(self.trainer)

    @property
    def temperature(self) -> float:
        """The fitted calibration temperature (1.0 before one is fitted): probabilities are softmax(logits / T)."""
        return float((self.calibration or {}).get("temperature", 1.0))

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    # Scores are computed in float32 under a mixed precision too (trainer.precision=bf16-mixed, which `auto` picks on
    # CPUs with bf16 matrix units): model selection, test accuracy, calibration and tl.evaluate / tl.predict / the
    # ONNX graph then agree to float32 rounding; only the training steps run in bfloat16.
    def validation_step(self, batch, batch_idx: int) -> None:
        with torch.autocast(self.device.type, enabled=False):
            self._step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        with torch.autocast(self.device.type, enabled=False):
            self._step(batch, "test")

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        with torch.autocast(self.device.type, enabled=False):
            return self(x).softmax(dim=-1)

    # -- optimisation -----------------------------------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        opt_cfg = dict(hp.optimizer or {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3})
        lr, weight_decay = float(opt_cfg.pop("lr")), float(opt_cfg.pop("weight_decay", None) or 0.0)  # null: none
        groups = param_groups(self.model, lr, hp.backbone_lr_mult, weight_decay, hp.layer_decay)
        optimizer = instantiate(opt_cfg, _convert_="all")(groups, lr=lr)
        if not hp.scheduler:
            return optimizer
        scheduler = instantiate(dict(hp.scheduler), _convert_="all")(
            optimizer, steps_per_epoch=epoch_steps(self.trainer), max_epochs=self.trainer.max_epochs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def restore_loader_state(trainer: pl.Trainer) -> None:
    """Give a resumed run's stateful training loader (LitData's StreamingDataLoader, `data=shards`) the position saved
    in the checkpoint. Lightning 2.6 drops it when `trainer.estimated_stepping_batches` was read before the checkpoint
    was restored (tl's schedules read it in `configure_optimizers`): the loader is then built early and never loads
    the state (Lightning issue #20550). Here, before the first training batch, the pending state is loaded and the
    fetcher's iterator made again (it had already prefetched a batch from the start of the epoch); with Lightning's
    own fix the state is loaded already, nothing is pending, and this does nothing."""
    loop = trainer.fit_loop
    if not loop.restarting or not loop._combined_loader_states_to_load or loop._combined_loader is None:
        return
    from lightning_fabric.utilities.types import _Stateful

    stateful = [dl for dl in loop._combined_loader.flattened if isinstance(dl, _Stateful)]
    for dl, state in zip(stateful, loop._combined_loader_states_to_load, strict=False):
        # The same shards (the data module checked their fingerprint) moved or mounted elsewhere: LitData refuses a
        # position saved under another path, so the position is carried over to where they are now.
        saved, now = state.get("dataset"), getattr(getattr(dl, "dataset", None), "input_dir", None)
        if isinstance(saved, dict) and now is not None and saved.get("input_dir_path") != now.path:
            saved["input_dir_path"], saved["input_dir_url"] = now.path, now.url
    loop._load_combined_loader_states()
    iter(loop._data_fetcher)
