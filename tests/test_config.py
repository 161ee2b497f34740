"""Every option of every config group composes, and the scenario presets set the policies they promise."""

from pathlib import Path

import pytest

from tests.conftest import CONF_DIR, make_cfg

GROUPS = ["data", "model", "scenario", "trainer", "logger", "callbacks", "augment", "optimizer", "scheduler",
          "weight_averaging", "debug"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted(Path(CONF_DIR, g).glob("*.yaml")) if not p.stem.startswith("_")]


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes(tmp_path, group, option):
    cfg = make_cfg(tmp_path, [f"{group}={option}"])
    assert cfg.paths.output_dir == str(tmp_path)
    assert cfg.scenario.name
    if group == "scenario":
        assert cfg.scenario.name == option


def test_default_is_the_embedded_digits_run(tmp_path):
    cfg = make_cfg(tmp_path)
    assert cfg.data.source._target_.endswith("DigitsSource")
    assert (cfg.model.name, cfg.model.pretrained) == ("efficientnet_lite0", "package")


def test_scenario_sets_policy_and_command_line_wins(tmp_path):
    cfg = make_cfg(tmp_path, ["scenario=small_similar"])
    assert cfg.finetune.strategy == "linear_probe"
    assert cfg.augment.name == "none"
    cfg = make_cfg(tmp_path, ["scenario=small_similar", "augment=strong", "trainer.max_epochs=3",
                              "finetune.strategy=full"])
    assert (cfg.augment.name, cfg.trainer.max_epochs, cfg.finetune.strategy) == ("strong", 3, "full")


def test_large_different_turns_on_strong_regularisation(tmp_path):
    cfg = make_cfg(tmp_path, ["scenario=large_different"])
    assert cfg.finetune.strategy == "full" and cfg.augment.name == "strong"
    assert cfg.model.drop_path_rate > 0 and cfg.finetune.label_smoothing > 0


@pytest.mark.parametrize(("overrides", "size"), [
    (["scenario=small_different"], 128),               # digits: few examples, train nearer the pretraining scale
    (["scenario=small_similar"], 128),
    (["scenario=large_different"], 64),
    (["scenario=small_different", "data.small_data_image_size=96"], 96),
    (["scenario=small_different", "data.image_size=80"], 80),   # the command line wins over the preset
    (["scenario=small_different", "data=synthetic"], 32),  # a dataset whose small-data size is its own
])
def test_small_data_presets_train_at_the_datasets_small_data_size(tmp_path, overrides, size):
    from tl.data.datamodule import build_datamodule
    from tl.data.transforms import backbone_preprocess

    cfg = make_cfg(tmp_path, overrides)
    dm = build_datamodule(cfg.data, backbone_preprocess(cfg.model.name), cfg.augment, cfg.seed)
    assert dm.preprocess["input_size"] == [3, size, size]


def test_every_callback_a_run_uses_is_listed_in_the_config(tmp_path):
    """train() adds and filters nothing: the callbacks are the config's entries, options switch them in YAML."""
    from tl.train import build_trainer

    cfg = make_cfg(tmp_path, ["scenario=large_similar", "weight_averaging=ema", "logger=none"])
    assert cfg.callbacks.lr_monitor is None and cfg.callbacks.weight_averaging._target_.endswith("EMA")
    trainer = build_trainer(cfg)
    listed = {c._target_.rsplit(".", 1)[-1] for c in cfg.callbacks.values() if c is not None}
    built = {type(c).__name__ for c in trainer.callbacks}
    assert listed <= built
    assert built - listed <= {"ModelSummary", "RichModelSummary", "TQDMProgressBar"}  # Lightning's own defaults


@pytest.mark.parametrize(("overrides", "culprit"), [
    (["snapshots.cycles=3", "scheduler=step"], "scheduler=cosine"),
    (["finetune.strategy=gradual", "~callbacks.unfreezing"], "callbacks.unfreezing"),
    (["trainer.enable_progress_bar=false"], "callbacks.progress=null"),
])
def test_contradictory_settings_fail_in_one_line(tmp_path, overrides, culprit):
    from tl.checks import validate
    from tl.errors import TLError

    with pytest.raises(TLError, match=culprit.replace(".", r"\.")):
        validate(make_cfg(tmp_path, ["scenario=large_similar", *overrides]))


def test_progress_null_means_no_bar_at_all(tmp_path):
    from tl.train import build_trainer

    cfg = make_cfg(tmp_path, ["data=synthetic", "callbacks.progress=null", "logger=none"])
    assert build_trainer(cfg).progress_bar_callback is None  # not Lightning's own TQDM bar in its place
    cfg = make_cfg(tmp_path, ["data=synthetic", "logger=none"])
    assert type(build_trainer(cfg).progress_bar_callback).__name__ == "RichProgressBar"


def test_python_api_without_an_output_dir_says_so():
    from hydra.core.global_hydra import GlobalHydra

    from tl.config import compose_config
    from tl.errors import TLError
    from tl.scenarios import resolve
    from tl.train import train

    GlobalHydra.instance().clear()  # a plain Python session: no Hydra app, no run directory
    cfg = compose_config(["data=synthetic", "scenario=small_similar"])
    with pytest.raises(TLError, match=r"paths.output_dir is not set.*cfg.paths.output_dir"):
        train(cfg)
    auto = compose_config(["data=synthetic"])
    with pytest.raises(TLError, match="paths.output_dir is not set"):
        resolve(auto, ["data=synthetic"])
