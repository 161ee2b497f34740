"""What the bench_*.py scripts share: composing a run's config, device synchronisation, the machine report, the
load average, and writing the JSON report. Import it as `benchlib` (the scripts run from scripts/)."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, open_dict

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def compose_run(overrides: list[str], out_dir: Path, cache_dir: Path | None = None) -> DictConfig:
    """The train config for `overrides` as `python -m tl.train` would compose it, writing under `out_dir` (and
    registered as the running Hydra app, so `${hydra:...}` interpolations resolve)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"hydra.run.dir={out_dir}"], return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            cfg.paths.output_dir = str(out_dir)
            if cache_dir is not None:
                cfg.paths.cache_dir = str(cache_dir)
            del cfg["hydra"]
    return cfg


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so wall-clock timers measure it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clocks() -> tuple[float, float]:
    """(wall, process CPU) seconds."""
    return time.perf_counter(), time.process_time()


def machine(device: torch.device | None = None) -> dict:
    """What the figures were measured on: device, versions, threads, cores."""
    import pytorch_lightning as pl
    import timm

    device = device or torch.device("cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {"device": device.type, "device_name": name, "torch": torch.__version__, "lightning": pl.__version__,
            "timm": timm.__version__, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages: other work on a shared machine slows every figure."""
    return [round(x, 2) for x in os.getloadavg()]


def write_report(path: Path | None, report: dict) -> None:
    """The report as indented JSON at `path` (nothing when None), written atomically."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)
