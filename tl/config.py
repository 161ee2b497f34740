"""Composing tl's Hydra configs outside `@hydra.main` (the advisor, tests, scripts)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from tl.errors import TLError

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose_config(overrides: list[str], config_name: str = "train") -> DictConfig:
    """`config_name` composed with `overrides` by Hydra's own rules, with or without a running Hydra app."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():  # inside @hydra.main (or a test's initialize): its search path
        return compose(config_name, overrides=overrides)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name, overrides=overrides)


def require_output_dir(cfg: DictConfig) -> None:
    """One line, not omegaconf's traceback, where `paths.output_dir` is Hydra's run directory and no Hydra app runs
    (a config composed in Python)."""
    try:
        value = OmegaConf.select(cfg, "paths.output_dir", throw_on_resolution_failure=True)
    except InterpolationResolutionError:
        value = None
    if value is None or not str(value).strip():
        raise TLError("paths.output_dir is not set: outside python -m tl.train there is no Hydra run directory; set "
                      "cfg.paths.output_dir = 'DIR' (or compose with paths.output_dir=DIR) before resolve/train")
