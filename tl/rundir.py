"""A run directory belongs to one run.

- While a run trains, it holds `RUN/.tl.lock` (host, pid and SLURM job id, created exclusively): a second run started
  into the same directory is refused with one line instead of both writing checkpoints and results over each other.
  A lock left by a process that no longer exists on this host (kill -9), or by an earlier run of the same SLURM job
  (requeued on another node), is taken over; one held from another machine is left alone.
- A directory that already holds a run (its results.json, or checkpoints/last.ckpt of an unfinished one) is not
  overwritten silently: resume it with `ckpt_path=last|auto`, choose another `hydra.run.dir`, or say
  `overwrite=true` (which removes the previous run's artifacts first).
Only global rank 0 claims the directory: the other processes of a DDP job share it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

from pytorch_lightning.utilities import rank_zero_only

from tl.errors import TLError

LOCK = ".tl.lock"
# What a run writes into its directory; `overwrite=true` removes the previous run's before the new run starts, so
# its checkpoints, snapshots and event files never mix with the new run's.
# A run's own states that ckpt_path=auto resumes (checkpoints/): the last epoch's, or one saved at an interruption
RESUMABLE = ("last.ckpt", "interrupted.ckpt")
RUN_ARTIFACTS = ("checkpoints", "export", "report", "tensorboard", "csv", "results.json", "evaluation.json",
                 "lr_find.png")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _holder() -> dict[str, str]:
    """Who holds a lock: host, pid and, under SLURM, the job id (a requeued job keeps its id, not its node or pid)."""
    return {"host": socket.gethostname(), "pid": str(os.getpid()), "job": os.environ.get("SLURM_JOB_ID", "")}


def _stale(holder: dict[str, str]) -> bool:
    """Whether a recorded holder is certainly gone: our own SLURM job requeued, or a dead process on this host."""
    ours = _holder()
    if holder.get("job") and holder.get("job") == ours["job"]:
        return True
    if holder.get("host") == ours["host"]:
        pid = int(holder.get("pid") or 0)
        return not pid or pid == os.getpid() or not _alive(pid)
    return False  # another machine's process: it cannot be checked from here


def _live_holder(path: Path) -> dict | None:
    """Who holds the lock file `path`, if it is held by a run that may still be alive (None: free or stale)."""
    try:
        holder = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) and holder and not _stale(holder) else None


def _in_use(path: Path, holder: dict) -> TLError:
    return TLError(f"hydra.run.dir={str(path.parent)!r} is in use by another run (pid {holder.get('pid')} on "
                   f"{holder.get('host')}): wait for it or choose another hydra.run.dir (if no run uses the "
                   f"folder, remove {str(path)!r})")


def _take_lock(path: Path) -> None:
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _live_holder(path)
            if holder is None:
                path.unlink(missing_ok=True)
                continue
            raise _in_use(path, holder) from None
        with os.fdopen(fd, "w") as f:
            json.dump(_holder(), f)
        return
    raise TLError(f"hydra.run.dir={str(path.parent)!r}: could not take {LOCK}; remove it if no run uses the folder")


def own_resume(ckpt_path, run_dir: Path) -> bool:
    """`ckpt_path` resumes the run in `run_dir` (last, auto, or a checkpoint inside it), rather than starting a new run
    there from another run's weights."""
    if ckpt_path in (None, "", "null", "None"):
        return False
    if str(ckpt_path) in ("last", "auto"):
        return True
    try:
        return Path(str(ckpt_path)).expanduser().resolve().is_relative_to(Path(run_dir).expanduser().resolve())
    except (OSError, RuntimeError):
        return False


def _is_tl_run(run_dir: Path) -> bool:
    """`run_dir` holds a training run of tl's: its config.yaml records a train task."""
    try:
        import yaml

        config = yaml.safe_load((run_dir / "config.yaml").read_text())
    except Exception:  # noqa: BLE001 - missing, unreadable, not YAML
        return False
    return isinstance(config, dict) and config.get("task_name") == "train" and "trainer" in config


def _check_previous_run(run_dir: Path, resuming: bool, overwrite: bool) -> None:
    if resuming:
        return
    if overwrite:
        present = [name for name in RUN_ARTIFACTS if (run_dir / name).exists() or (run_dir / name).is_symlink()]
        if present and not _is_tl_run(run_dir):
            raise TLError(f"hydra.run.dir={str(run_dir)!r} holds {', '.join(present[:4])} but no tl training run "
                          "(no config.yaml of one): overwrite=true replaces only a tl run's files; choose another "
                          "hydra.run.dir")
        return
    if (run_dir / "results.json").is_file():
        raise TLError(f"hydra.run.dir={str(run_dir)!r} holds a finished run (results.json): choose another "
                      "hydra.run.dir, continue it with ckpt_path=last trainer.max_epochs=N, or replace it "
                      "with overwrite=true")
    # what ckpt_path=auto resumes: last.ckpt, or interrupted.ckpt alone (a run stopped in its first epoch).
    # (Lightning's SLURM hpc_ckpt_N.ckpt is left to Lightning: it resumes it itself when ckpt_path is null.)
    saved = [name for name in RESUMABLE if (run_dir / "checkpoints" / name).is_file()]
    if saved:
        name = saved[0]
        raise TLError(f"hydra.run.dir={str(run_dir)!r} holds an unfinished run (checkpoints/{name}): "
                      "resume it with ckpt_path=auto, choose another hydra.run.dir, or replace it with "
                      "overwrite=true")


def check_free(run_dir: Path, resuming: bool, overwrite: bool) -> None:
    """Raise the TLError `claim_run_dir` would, without taking anything: the command line's early check, before
    Hydra writes its record of the new run (RUN/.hydra) over the previous run's."""
    holder = _live_holder(run_dir / LOCK)
    if holder is not None:
        raise _in_use(run_dir / LOCK, holder)
    _check_previous_run(run_dir, resuming, overwrite)


@contextlib.contextmanager
def claim_run_dir(run_dir: Path, resuming: bool, overwrite: bool) -> Iterator[None]:
    """Hold `run_dir` for this run (see the module docstring); refuse one that holds another run's results."""
    if rank_zero_only.rank != 0:
        yield
        return
    _take_lock(run_dir / LOCK)
    try:
        _check_previous_run(run_dir, resuming, overwrite)  # with overwrite: a folder holding no tl run is refused
        yield

    finally:
        with contextlib.suppress(OSError):
            (run_dir / LOCK).unlink()


def clear_previous_run(run_dir: Path) -> None:
    """overwrite=true: remove the previous run's files from `run_dir` (held by `claim_run_dir`). Called once the new
    run's data, model and weights have loaded, so that a command refused for its own input leaves the previous run
    whole."""
    if rank_zero_only.rank != 0:
        return
    for target in [*(run_dir / name for name in RUN_ARTIFACTS), *run_dir.glob("hpc_ckpt_*.ckpt")]:
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
