"""SLURM preemption: SIGUSR1 -> an hpc checkpoint at a consistent point -> requeue -> the restarted job finishes."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from distributed_helpers import REPO, TESTS, TINY_CLI


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
    pause_args = ["+callbacks.pause._target_=distributed_helpers.PauseAt", f"+callbacks.pause.marker={marker}",
                  f"+callbacks.pause.{pause}", "+callbacks.pause.seconds=10",
                  "+callbacks.hold._target_=distributed_helpers.PauseAt", f"+callbacks.hold.marker={tmp_path / 'held'}",
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
