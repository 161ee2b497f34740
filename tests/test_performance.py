"""Trainer configs and performance add-ons: every trainer option composes, bf16/accumulation/channels_last/compile
train (slow), timm's synced BatchNorm plugin, the throughput benchmark (slow)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from distributed_helpers import REPO


# -- 1. trainer configs and add-ons -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["default", "cpu", "gpu", "ddp", "ddp_syncbn", "fsdp", "slurm"])
def test_trainer_configs_compose_and_their_parts_instantiate(tmp_path, name):
    """Every trainer option composes; plugins and the FSDP wrap policy instantiate; the CPU-capable ones build a
    Trainer (the GPU ones cannot without a GPU)."""
    from conftest import make_cfg
    from hydra.utils import instantiate

    cfg = make_cfg(tmp_path, [f"trainer={name}", "data=synthetic"])
    for plugin in cfg.trainer.plugins or []:
        if "SLURMEnvironment" not in plugin._target_:  # needs SLURM_* variables
            assert instantiate(plugin) is not None
    if name == "fsdp":
        policy = instantiate(cfg.trainer.strategy.auto_wrap_policy)
        assert "InvertedResidual" in {c.__name__ for c in policy._module_classes}
    if name in ("default", "cpu", "ddp"):
        trainer = instantiate(cfg.trainer, accelerator="cpu", devices=2 if name == "ddp" else 1, logger=False)
        assert trainer.world_size == (2 if name == "ddp" else 1)


@pytest.mark.slow
def test_channels_last_compile_bf16_and_accumulation_train_end_to_end(tiny_cfg):
    """The performance add-ons in one tiny CPU run: bf16 autocast, gradient accumulation, channels_last and
    torch.compile (the `eager` backend: checks the module compiles without paying for code generation).
    channels_last comes from the default callbacks."""
    from tl.train import train

    results, objects = train(tiny_cfg(
        "trainer.max_epochs=1", "trainer.precision=bf16-mixed", "trainer.accumulate_grad_batches=2", "logger=none",
        "+callbacks.compile._target_=tl.callbacks.performance.TorchCompile", "+callbacks.compile.backend=eager"))
    module = objects["module"]
    assert results["global_step"] == math.ceil(math.ceil(72 / 16) / 2)  # 5 batches, a step every 2
    conv = module.model.conv_stem.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert not module._forward_pre_hooks  # the input hook is gone with the trainer
    assert all("_orig_mod" not in k for k in module.state_dict())  # compiled in place: checkpoint keys unchanged
    assert 0.0 <= results["test/acc"] <= 1.0


def test_lightning_sync_batchnorm_breaks_timm_norm_act_and_the_timm_plugin_does_not():
    import timm
    from pytorch_lightning.plugins import TorchSyncBatchNorm

    from tl.callbacks.performance import TimmSyncBatchNorm

    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    model = timm.create_model("efficientnet_lite0", num_classes=4).eval()
    reference = model(x)
    with torch.no_grad():  # Lightning's default: the activation fused into BatchNormAct2d is silently dropped
        broken = TorchSyncBatchNorm().apply(timm.create_model("efficientnet_lite0", num_classes=4)).eval()
        broken.load_state_dict(model.state_dict())
        assert not torch.allclose(broken(x), reference, atol=1e-3)

    plugin = TimmSyncBatchNorm()
    synced = plugin.apply(model).eval()
    assert type(synced.bn1).__name__ == "SyncBatchNormAct"
    assert torch.allclose(synced(x), reference, atol=1e-6)
    reverted = plugin.revert(synced).eval()
    assert {type(m).__name__ for m in reverted.modules() if "Norm" in type(m).__name__} == {"BatchNormAct2d"}
    assert torch.allclose(reverted(x), reference, atol=1e-6)


@pytest.mark.slow
def test_bench_throughput_runs_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_throughput.py"), "--models",
                           "efficientnet_lite0", "--image-size", "64", "--batch-size", "4", "--steps", "2",
                           "--warmup", "1", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and "no CUDA GPU" in proc.stdout
    assert {r["runner"] for r in report["results"]} == {"tl", "timm-loop"}
    assert all(r["images_per_s"] > 0 for r in report["results"])


def test_progress_bar_reads_metrics_every_batch_on_the_cpu_and_shows_the_step_loss():
    """tl's RichProgressBar (the default) reads the logged metrics every `metrics_every` batches on a GPU only; on the
    CPU, where a read costs no device sync, every batch, as Lightning's own."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    from tl.callbacks.performance import RichProgressBar

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 2)

        def training_step(self, batch, batch_idx):
            loss = torch.nn.functional.cross_entropy(self.layer(batch[0]), batch[1])
            self.log("train/loss", loss, prog_bar=True)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class Counting(RichProgressBar):
        reads: list = []

        def get_metrics(self, trainer, pl_module):
            metrics = super().get_metrics(trainer, pl_module)
            self.reads.append(dict(metrics))
            return metrics

    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(24, 4, generator=g), torch.randint(0, 2, (24,), generator=g)),
                      batch_size=4)
    bar = Counting(metrics_every=3)
    pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, callbacks=[bar],
               enable_model_summary=False).fit(Tiny(), data)
    assert len(bar.reads) >= 6 and "train/loss" in bar.reads[-1]
    assert len({r["train/loss"] for r in bar.reads[:6]}) > 1  # a fresh value each batch, not one held for 3


@pytest.mark.parametrize("given, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_torch_threads_sleep_between_operators_unless_the_environment_says_otherwise(given, expected):
    """tl sets OMP_WAIT_POLICY=PASSIVE before torch loads libgomp (spinning threads are several times slower on cores
    shared with loader workers: scripts/bench_threads.py); a policy the user set is kept."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    code = "import os, tl, torch; print(os.environ['OMP_WAIT_POLICY'], torch.get_num_threads() >= 1)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.split() == [expected, "True"]
