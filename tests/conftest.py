"""Fixtures: compose the real Hydra config in-process, shrunk to seconds on the CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import pytorch_lightning as pl
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")

if os.environ.get("PYTEST_XDIST_WORKER"):  # one of N test processes on N cores (pytest -n N): one thread each,
    import torch  # and the runs it starts too; N processes x all cores each made every one of them crawl

    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"

# A tiny run: 4 synthetic classes of 32x32 gratings, 2 epochs, no progress bar.
TINY = [
    "data=synthetic",
    "trainer.max_epochs=2",
    "trainer.accelerator=cpu",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "~callbacks.progress",
    "onnx.enabled=false",  # ONNX export (seconds per run) is tested in test_onnx.py
    "report.top_losses=0",  # the top-loss lists and their image grids (seconds per run) are tested in test_trust.py
]


def make_cfg(tmp_path: Path, overrides: list[str] = (), config_name: str = "train"):
    """Compose `config_name` with `overrides`, outputs under `tmp_path`, and register it as the running Hydra app."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name, overrides=[*overrides, f"hydra.run.dir={tmp_path}"], return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path)
            cfg.paths.cache_dir = str(tmp_path / "cache")
            del cfg["hydra"]
    return cfg


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: on a shared 2-core machine, 2 threads waiting on each other made training 20x slower.
    Modules that train shared runs use it: `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def tiny_cfg(tmp_path):
    """A factory: tiny_cfg(*extra_overrides) -> config for a seconds-long synthetic run in tmp_path."""

    def factory(*extra: str, run_dir: Path | None = None):
        # The default scenario is auto (it measures the data first); tiny runs pin a preset unless they pick one.
        scenario = [] if any(e.startswith("scenario=") for e in extra) else ["scenario=large_similar"]
        return make_cfg(run_dir or tmp_path, [*TINY, *scenario, *extra])

    return factory


@pytest.fixture
def auto_cfg(tmp_path):
    """A factory: auto_cfg(*extra_overrides) -> the final config of a tiny `scenario=auto` run, decided as the entry
    point decides it (`tl.scenarios.resolve`: measure, then compose once more with the chosen preset)."""
    from tl.scenarios import resolve

    def factory(*extra: str):
        overrides = [*TINY, "scenario=auto", *extra]
        return resolve(make_cfg(tmp_path, overrides), overrides)

    return factory


class RecordWeights(pl.Callback):
    """Injected through the config (`+callbacks.record._target_=conftest.RecordWeights`): the backbone's state and the
    head's weights as fit starts, i.e. after the pretrained weights are loaded and before any step."""

    def on_fit_start(self, trainer, pl_module) -> None:
        from tl.models.backbone import classifier_names

        head = classifier_names(pl_module.model)
        self.backbone = {k: v.clone() for k, v in pl_module.model.state_dict().items() if k not in head}
        self.head = pl_module.model.get_classifier().weight.clone()


class LogEpoch(pl.Callback):
    """Injected through the config (`+callbacks.epoch_index._target_=conftest.LogEpoch`): logs the epoch number as a
    validation metric, a checkpoint monitor whose best epoch is known in advance (a loss's is not: it depends on the
    CPU's kernels)."""

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        pl_module.log("epoch_index", float(trainer.current_epoch))


class LogConstant(pl.Callback):
    """Injected like LogEpoch: logs the same validation score every epoch (`constant_score`), a monitor whose every
    checkpoint ties."""

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        pl_module.log("constant_score", 0.5)


def synthetic_pil(samples_per_class: int = 3, seed: int = 1) -> list:
    """Images like TINY runs' (4 synthetic classes, 32 px; another seed than theirs) as RGB PIL images."""
    from PIL import Image

    from tl.data.sources import SyntheticSource

    images = SyntheticSource(num_classes=4, samples_per_class=samples_per_class, image_size=32, seed=seed).load()
    return [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in images.images]
