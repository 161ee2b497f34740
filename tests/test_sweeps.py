"""Optuna sweeps and submitit launchers: presets compose, a 2-trial sweep runs (slow), results are collected."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from distributed_helpers import REPO, TINY_CLI, run_tl


# -- 5. sweeps --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, sampler", [("tpe", "TPESampler"), ("random", "RandomSampler")])
def test_hparams_search_presets_compose(name, sampler):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"hparams_search={name}"], return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.sampler._target_ == f"optuna.samplers.{sampler}"
    assert sweeper.direction == "maximize" and cfg.hydra.mode == RunMode.MULTIRUN
    assert sweeper.params["optimizer.lr"] == "tag(log, interval(1e-4, 1e-1))"
    assert {"optimizer.weight_decay", "finetune.backbone_lr_mult", "model.drop_rate",
            "finetune.label_smoothing"} <= set(sweeper.params)


@pytest.mark.parametrize("launcher, target", [("slurm", "SlurmLauncher"), ("local", "LocalLauncher")])
def test_submitit_launchers_compose_and_follow_the_trainer(launcher, target):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"hydra/launcher={launcher}", "trainer=slurm", "trainer.devices=4",
                                          "trainer.num_nodes=2"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith(target)
    if launcher == "slurm":  # one task per GPU on every node: what SLURMEnvironment expects
        assert (cfg.hydra.launcher.nodes, cfg.hydra.launcher.tasks_per_node, cfg.hydra.launcher.gpus_per_node) == \
            (2, 4, 4)


@pytest.mark.slow
def test_two_trial_sweep_runs_and_collects(tmp_path):
    sweep_dir = tmp_path / "sweep"
    run_tl(["-m", "hparams_search=tpe", "hydra.sweeper.n_trials=2", *TINY_CLI, "logger=none",
            f"hydra.sweep.dir={sweep_dir}"])
    trials = sorted(p.parent.name for p in sweep_dir.glob("*/results.json"))
    assert trials == ["0", "1"] and (sweep_dir / "optimization_results.yaml").is_file()

    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "collect_sweep.py"), str(sweep_dir)],
                          capture_output=True, text=True, check=True)
    assert "optimizer.lr" in proc.stdout
    import csv

    rows = list(csv.DictReader((sweep_dir / "sweep.csv").open()))
    assert len(rows) == 2 and float(rows[0]["val/acc"]) >= float(rows[1]["val/acc"])
    assert (sweep_dir / "sweep.md").read_text().startswith("| run | val/acc | test/acc |")


def test_collect_sweep_sorts_by_val_acc_and_keeps_only_swept_keys(tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import collect_sweep
    finally:
        sys.path.remove(str(REPO / "scripts"))
    for i, (lr, val, test) in enumerate([(0.1, 0.5, 0.9), (0.01, 0.8, 0.6), (0.001, float("nan"), 0.7)]):
        run = tmp_path / str(i)
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "overrides.yaml").write_text(f"- optimizer.lr={lr}\n- data=synthetic\n")
        (run / "results.json").write_text(json.dumps({"val/acc": val, "test/acc": test, "epochs": 1}))
    (tmp_path / "notes").mkdir()  # a directory without results.json is not a trial
    rows, swept = collect_sweep.collect(tmp_path)
    assert swept == ["optimizer.lr"]
    assert [r["run"] for r in rows] == ["1", "0", "2"]  # best val/acc first, NaN last; test/acc plays no part
    assert collect_sweep.main([str(tmp_path)]) == 0 and (tmp_path / "sweep.csv").is_file()
    assert collect_sweep.main([str(tmp_path)]) == 0  # its own tables: replaced
    # someone else's sweep.md, or --out that is a file: one line, status 2, nothing replaced
    (tmp_path / "sweep.md").write_text("my notes\n")
    assert collect_sweep.main([str(tmp_path)]) == 2 and (tmp_path / "sweep.md").read_text() == "my notes\n"
    (tmp_path / "afile").write_text("x")
    assert collect_sweep.main([str(tmp_path), "--out", str(tmp_path / "afile")]) == 2
