"""Many processes, cluster jobs and sweeps: DDP on CPU (gloo), resume, SLURM requeue, Optuna sweeps, trainer add-ons.

DDP runs go through `python -m tl.train` in a subprocess, the way users start them: Lightning re-launches the same
command for rank 1 with the run directory pinned. Helpers those subprocesses load by `_target_` (probes, a pause
for signals, the unpadded-evaluation data module) live here and are importable there through PYTHONPATH=tests/.
Slow ones (-m slow): staged unfreezing under DDP, SIGUSR1 requeue, a 2-trial Optuna sweep, compile, the benchmark.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BaseFinetuning
from torch.utils.data import DataLoader

from tl.data.datamodule import TransferDataModule

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

# A tiny DDP-able run: synthetic 32x32 gratings, random init (weights don't matter here), no progress bar.
TINY_CLI = [
    "data=synthetic",
    "model.pretrained=none",
    "trainer.max_epochs=1",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "~callbacks.progress",
]
DDP_CPU = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]


# -- helpers loaded by the subprocesses -------------------------------------------------------------------------------
def _digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class RankProbe(pl.Callback):
    """Writes, per rank, what DDP must keep identical across ranks: param groups and the weights after training."""

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)
        self.record: dict = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        named = list(pl_module.named_parameters())
        self.record.update({
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "param_groups": [[g.get("name"), sum(p.numel() for p in g["params"]), g["lr"]]
                             for g in trainer.optimizers[0].param_groups],
            "trainable": sorted(n for n, p in named if p.requires_grad),
            "frozen_before": _digest(p for _, p in named if not p.requires_grad),
        })

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        named = list(pl_module.named_parameters())
        self.record.update({
            "trainable_after": _digest(p for _, p in named if p.requires_grad),
            "frozen_after": _digest(p for _, p in named if not p.requires_grad),
            "all_after": _digest(p for _, p in named),
            "trainable_names_after": sorted(n for n, p in named if p.requires_grad),
            "param_groups_after": [[g.get("name"), sum(p.numel() for p in g["params"]), g["lr"]]
                                   for g in trainer.optimizers[0].param_groups],
        })
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.record))


class UnfreezeLastBlock(BaseFinetuning):
    """Staged unfreezing done naively with Lightning's BaseFinetuning: the backbone's last block joins at `epoch`
    and nothing else happens (the control for tl's ScheduledUnfreezing, which also re-wraps DDP)."""

    def __init__(self, epoch: int = 1):
        super().__init__()
        self.epoch = epoch

    def freeze_before_training(self, pl_module: pl.LightningModule) -> None:
        pass  # finetune.strategy=linear_probe froze the backbone already

    def finetune_function(self, pl_module: pl.LightningModule, epoch: int, optimizer) -> None:
        if epoch == self.epoch:
            self.unfreeze_and_add_param_group(pl_module.model.blocks[-1], optimizer, initial_denom_lr=1.0)


class PauseAt(pl.Callback):
    """Touch `marker` and sleep at one point of training, so a signal sent from outside lands exactly there.

    Args:
        marker: file created when the pause starts.
        epoch: the epoch to pause in.
        batch: pause after this training batch; None pauses in `on_train_epoch_start` (an epoch boundary).
        seconds: how long to wait for the signal (the test kills the process long before).
    """

    def __init__(self, marker: str, epoch: int = 1, batch: int | None = None, seconds: float = 120.0):
        self.marker, self.epoch, self.batch, self.seconds = Path(marker), epoch, batch, seconds

    def _pause(self) -> None:
        self.marker.touch()
        time.sleep(self.seconds)  # the signal handler runs during the sleep (PEP 475 resumes it afterwards)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.batch is None and trainer.current_epoch == self.epoch:
            self._pause()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.batch == batch_idx and trainer.current_epoch == self.epoch:
            self._pause()


class EpochSeededShuffle(pl.Callback):
    """Shuffle each epoch's training data with a generator seeded from (seed, epoch), as DistributedSampler.set_epoch
    does under DDP, instead of from the global RNG, whose state depends on how many epochs this process ran: a resumed
    single-device run then repeats an uninterrupted one bit for bit (with augmentation and dropout off)."""

    def __init__(self, seed: int = 0):
        self.seed = seed

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The sampler draws its permutation at the epoch's first batch, after this hook, also when resuming.
        trainer.train_dataloader.sampler.generator = torch.Generator().manual_seed(self.seed + trainer.current_epoch)


class StopAfterEpochs(pl.Callback):
    """Interrupt a run after `epochs` epochs, as a killed job would after its epoch-end checkpoint."""

    def __init__(self, epochs: int):
        self.epochs = epochs

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


class UnpaddedEvalDataModule(TransferDataModule):
    """TransferDataModule with the evaluation fix proposed for tl/data/datamodule.py (see `_loader` there).

    Lightning's default DistributedSampler pads val/test so that every rank gets as many samples, duplicating a few;
    the synced torchmetrics then count the duplicates. Lightning leaves a DistributedSampler it finds in a loader
    alone, so evaluation gets Lightning's UnrepeatedDistributedSampler (no padding; ranks may differ by one sample).
    """

    def _loader(self, ds, batch_size: int, shuffle: bool) -> DataLoader:
        from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler

        loader = super()._loader(ds, batch_size, shuffle)
        dist = self.trainer.distributed_sampler_kwargs if self.trainer is not None else None
        if shuffle or not dist or dist["num_replicas"] == 1:
            return loader
        sampler = UnrepeatedDistributedSampler(ds, shuffle=False, **dist)
        return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=loader.num_workers,
                          persistent_workers=loader.persistent_workers, pin_memory=loader.pin_memory)


# -- running tl.train -------------------------------------------------------------------------------------------------
def run_tl(args: list[str], cwd: Path = REPO, env: dict | None = None,
           timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m tl.train ARGS` with this file's helpers importable; fails the test with the output on error."""
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
                "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "tl.train", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc


def probe(out_dir: Path) -> list[str]:
    return [f"+callbacks.probe._target_={__name__}.RankProbe", f"+callbacks.probe.out_dir={out_dir}"]


def read_ranks(out_dir: Path) -> list[dict]:
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in (0, 1)]


# -- 1-2. DDP end to end, frozen and partially frozen -----------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["linear_probe", "partial"])
def test_ddp_two_cpu_processes_end_to_end(tmp_path, strategy):
    """The contract command runs two gloo processes; one run dir (Lightning pins hydra.run.dir for rank 1), one
    config print and one results.json (rank zero); identical param groups and weights on both ranks; frozen weights
    untouched and no unused-parameter error with strategy=ddp (frozen parameters are invisible to DDP)."""
    ranks_dir = tmp_path / "ranks"
    # No hydra.run.dir: the default logs/train/runs/<time> under the working directory, which must be shared.
    proc = run_tl([*DDP_CPU, *TINY_CLI, f"finetune.strategy={strategy}", "finetune.trainable_stages=2",
                   "logger=none", f"paths.cache_dir={tmp_path / 'cache'}", *probe(ranks_dir)], cwd=tmp_path)

    run_dirs = list((tmp_path / "logs" / "train" / "runs").iterdir())
    assert len(run_dirs) == 1, f"ranks wrote to different run dirs: {run_dirs}"
    run_dir = run_dirs[0]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["epochs"] == 1 and 0.0 <= results["test/acc"] <= 1.0
    assert (run_dir / "train_ddp_process_1.log").exists()  # rank 1 ran as a Hydra job in the same directory
    out = proc.stdout
    assert sum(line.strip() == "config" for line in out.splitlines()) == 1, "config printed by more than one rank"
    assert out.count("results") == 1 and not list(run_dir.glob("*.tmp"))

    r0, r1 = read_ranks(ranks_dir)
    assert (r0["world_size"], r0["rank"], r1["rank"]) == (2, 0, 1)
    assert r0["param_groups"] == r1["param_groups"] and r0["trainable"] == r1["trainable"]
    assert all(not n.startswith("model.conv_stem") for n in r0["trainable"])  # the stem stays frozen in both
    assert r0["all_after"] == r1["all_after"], "ranks diverged: gradients were not averaged"
    assert r0["frozen_before"] == r0["frozen_after"], "a frozen parameter changed"


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["naive_basefinetuning", "gradual", "lp_ft"])
def test_ddp_parameters_unfrozen_later_are_averaged_across_ranks(tmp_path, strategy):
    """DDP registers only parameters trainable when it wraps the model. A block unfrozen later by a plain
    BaseFinetuning callback trains, but its gradients are never averaged, so the ranks drift apart silently (the
    control). tl's staged strategies re-wrap the module after unfreezing: the ranks stay identical, with the same
    param groups."""
    ranks_dir = tmp_path / "ranks"
    if strategy == "naive_basefinetuning":
        # (~scheduler: torch's schedulers refuse an optimizer that grew groups they don't know; tl extends them)
        policy = ["finetune.strategy=linear_probe", f"+callbacks.unfreeze._target_={__name__}.UnfreezeLastBlock",
                  "~scheduler"]
    else:
        policy = [f"finetune.strategy={strategy}", "finetune.lp_epochs=1", "finetune.unfreeze_every=1"]
    run_tl([*DDP_CPU, *TINY_CLI, *policy, "augment=light", "trainer.max_epochs=3", "logger=none", "test=false",
            f"hydra.run.dir={tmp_path / 'run'}", *probe(ranks_dir)])
    r0, r1 = read_ranks(ranks_dir)
    assert r0["trainable_names_after"] == r1["trainable_names_after"]
    assert len(r0["trainable_names_after"]) > len(r0["trainable"])  # something was unfrozen during training
    if strategy == "naive_basefinetuning":
        assert r0["all_after"] != r1["all_after"]
    else:
        assert r0["all_after"] == r1["all_after"], "ranks diverged: unfrozen parameters were not averaged"
        assert r0["param_groups_after"] == r1["param_groups_after"]


# -- 3. the same test accuracy on 1 and 2 processes -------------------------------------------------------------------
# 31 images per class: 25 test images, which 2 ranks cannot split evenly (Lightning's sampler would repeat one).
ODD_EVAL = ["data.source.samples_per_class=31", "+trainer.limit_train_batches=0", "logger=none"]


def _test_acc(tmp_path: Path, name: str, args: list[str]) -> float:
    run_tl([*TINY_CLI, *ODD_EVAL, f"hydra.run.dir={tmp_path / name}", *args])
    results = json.loads((tmp_path / name / "results.json").read_text())
    assert results["n_test"] == 25
    return results["test/acc"]


def test_ddp_test_accuracy_equals_single_process_with_unpadded_eval_sampler(tmp_path):
    """No training (limit_train_batches=0): the seeded initial weights are tested on 1 process and on 2; with the
    unpadded sampler every test image counts once, so the accuracies are equal (25 images: steps of 1/25)."""
    single = _test_acc(tmp_path, "single", ["trainer=cpu"])
    ddp = _test_acc(tmp_path, "ddp", [*DDP_CPU, f"data._target_={__name__}.UnpaddedEvalDataModule"])
    assert ddp == pytest.approx(single, abs=1e-6)
    assert round(single * 25, 4) == round(single * 25)  # a count over 25 images, not 26


@pytest.mark.slow
def test_ddp_test_accuracy_equals_single_process_with_tl_datamodule(tmp_path):
    single = _test_acc(tmp_path, "single", ["trainer=cpu"])
    ddp = _test_acc(tmp_path, "ddp", DDP_CPU)
    assert ddp == pytest.approx(single, abs=1e-6)


# -- 6. resume == uninterrupted ---------------------------------------------------------------------------------------
def _last_ckpt(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")


def test_resume_matches_an_uninterrupted_run(tiny_cfg, tmp_path):
    """2 epochs straight vs 1 epoch, stop, `ckpt_path=last` to 2: the same epoch, step, LR schedule position,
    optimizer state, best validation score and final weights (data order seeded per epoch, see EpochSeededShuffle)."""
    from tl.train import train

    common = ["trainer.max_epochs=2", "data.batch_size=16", "augment=none", "model.drop_rate=0", "logger=none",
              "model.drop_path_rate=0",
              "test=false",
              f"+callbacks.reseed._target_={__name__}.EpochSeededShuffle"]
    straight, _ = train(tiny_cfg(*common, run_dir=tmp_path / "straight"))
    first, _ = train(tiny_cfg(*common, f"+callbacks.stop._target_={__name__}.StopAfterEpochs",
                              "+callbacks.stop.epochs=1", run_dir=tmp_path / "resumed"))
    assert first["epochs"] == 1
    resumed, _ = train(tiny_cfg(*common, "ckpt_path=last", run_dir=tmp_path / "resumed"))

    assert (resumed["epochs"], resumed["global_step"]) == (straight["epochs"], straight["global_step"]) == (2, 10)
    a, b = _last_ckpt(tmp_path / "straight"), _last_ckpt(tmp_path / "resumed")
    assert a["lr_schedulers"] == b["lr_schedulers"]  # the schedule continued, not restarted
    steps_a = [s["step"] for s in a["optimizer_states"][0]["state"].values()]
    assert steps_a == [s["step"] for s in b["optimizer_states"][0]["state"].values()]
    for k, v in a["state_dict"].items():
        assert torch.allclose(v.float(), b["state_dict"][k].float(), atol=1e-5), k
    assert resumed["val/acc"] == pytest.approx(straight["val/acc"], abs=1e-6)


# -- 4 + 7. SLURM: SIGUSR1 -> hpc checkpoint + requeue -> restart resumes ---------------------------------------------
def _fake_slurm_bin(tmp_path: Path) -> Path:
    """`srun` that runs its command in place (recording its pid) and `scontrol` that records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nwhile [[ "$1" == -* ]]; do shift; done\n'
                                  'echo $$ > "$FAKE_SRUN_PIDFILE"\nexec "$@"\n')
    (bin_dir / "scontrol").write_text('#!/usr/bin/env bash\necho "$@" >> "$FAKE_SCONTROL_LOG"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir


def _wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the job ended (exit {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize(("pause", "hold_batch"), [("batch=2", 3), ("batch=null", 0)],
                         ids=["mid_epoch", "epoch_boundary"])
def test_sigusr1_saves_hpc_checkpoint_requeues_and_the_restarted_job_finishes(tmp_path, pause, hold_batch):
    """scripts/slurm/train.sbatch under a simulated SLURM allocation: SIGUSR1 during training makes tl's
    DeferredRequeue save hpc_ckpt_1.ckpt at the next batch end (Lightning's own handler would save on the spot, which
    at an epoch boundary, Lightning 2.6, leaves progress counters that skip the epoch on resume) and call
    `scontrol requeue <job>`; the job is killed as SLURM would; the restarted job resumes from that checkpoint and
    ends at the planned epoch and step, as an uninterrupted run does. A second pause after the save (`hold`) keeps the
    job from writing a newer last.ckpt before the kill."""
    run_dir, job_id, max_epochs, batch_size = tmp_path / "run", str(random.randint(10000, 99999)), 3, 16
    marker = tmp_path / "paused"
    env = {
        **os.environ,
        "PATH": f"{_fake_slurm_bin(tmp_path)}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        "FAKE_SRUN_PIDFILE": str(tmp_path / "srun.pid"), "FAKE_SCONTROL_LOG": str(tmp_path / "scontrol.log"),
        "SLURM_JOB_ID": job_id, "SLURM_JOB_NAME": "tl-test", "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_NNODES": "1", "SLURM_JOB_NUM_NODES": "1", "SLURM_NODELIST": "localhost", "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_SUBMIT_DIR": str(REPO), "RUN_DIR": str(run_dir),
    }
    args = ["bash", str(REPO / "scripts" / "slurm" / "train.sbatch"), *TINY_CLI, "trainer.accelerator=cpu",
            "trainer.precision=32-true", f"trainer.max_epochs={max_epochs}", f"data.batch_size={batch_size}",
            "logger=none", "test=false"]
    pause_args = [f"+callbacks.pause._target_={__name__}.PauseAt", f"+callbacks.pause.marker={marker}",
                  f"+callbacks.pause.{pause}", "+callbacks.pause.seconds=10",
                  f"+callbacks.hold._target_={__name__}.PauseAt", f"+callbacks.hold.marker={tmp_path / 'held'}",
                  f"+callbacks.hold.batch={hold_batch}"]

    with (tmp_path / "job1.log").open("w") as log:
        job = subprocess.Popen([*args, *pause_args], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_for(marker.exists, 300, "the pause in epoch 1", job)
            pid = int((tmp_path / "srun.pid").read_text())
            os.kill(pid, signal.SIGUSR1)  # what `#SBATCH --signal=SIGUSR1@90` delivers to the task
            _wait_for((tmp_path / "scontrol.log").exists, 120, "scontrol requeue", job)
            os.kill(pid, signal.SIGKILL)  # SLURM ends the requeued job (Lightning ignores its SIGTERM)
        finally:
            job.kill() if job.poll() is None else None
            job.wait(60)
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", job_id]
    assert (run_dir / "hpc_ckpt_1.ckpt").is_file(), (tmp_path / "job1.log").read_text()[-3000:]
    assert not (run_dir / "results.json").exists()
    steps_per_epoch = math.ceil(72 / batch_size)
    interrupted = torch.load(run_dir / "hpc_ckpt_1.ckpt", weights_only=True, map_location="cpu")
    assert steps_per_epoch <= interrupted["global_step"] < 2 * steps_per_epoch  # in (or at the start of) epoch 1

    env["SLURM_RESTART_COUNT"] = "1"  # the requeued job: same id, same run directory, no pause this time
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert f"resuming from {run_dir / 'hpc_ckpt_1.ckpt'}" in proc.stdout
    results = json.loads((run_dir / "results.json").read_text())
    assert (results["epochs"], results["global_step"]) == (max_epochs, max_epochs * steps_per_epoch)


# -- 5. sweeps --------------------------------------------------------------------------------------------------------
def _search_override(name: str) -> str:
    # `hparams_search=X` once conf/train.yaml lists `optional hparams_search: null` in its defaults; until then the
    # group has to be appended.
    listed = "hparams_search" in (REPO / "conf" / "train.yaml").read_text()
    return f"{'' if listed else '+'}hparams_search={name}"


@pytest.mark.parametrize("name, sampler", [("tpe", "TPESampler"), ("random", "RandomSampler")])
def test_hparams_search_presets_compose(name, sampler):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[_search_override(name)], return_hydra_config=True)
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
    run_tl(["-m", _search_override("tpe"), "hydra.sweeper.n_trials=2", *TINY_CLI, "logger=none",
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
