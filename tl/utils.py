"""Small helpers shared by the entry points: config printing, instantiation with clean errors, atomic files."""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import shutil
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from functools import wraps
from pathlib import Path
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from tl.errors import ENVIRONMENT, NO_SPACE, Interrupted, Terminated, TLError, os_error

log = logging.getLogger("tl")


def file_identity(st: os.stat_result) -> str:
    """What says a file is the one seen before, from a stat alone (as git's index does): its size and modification
    time, and also its inode, device and change time. Size and mtime alone were fooled by a relabelling: class folders
    swapped after a `tar x` (every file the same size, one shared mtime) kept their paths' old features and shards,
    and the run trained on the old labels with exit 0; the swap gives every path another inode, and `touch -d` or
    any rewrite moves the ctime. A copy (`cp -a`) gets new ones too, so it only costs a recomputation."""
    return f"{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_dev}|{st.st_ino}"


def _is_lightning_sigterm(e: BaseException) -> bool:
    """Lightning's SIGTERMException, looked up only where Lightning is loaded (nothing else could have raised it):
    tl.predict's ONNX Runtime path runs without Lightning."""
    module = sys.modules.get("pytorch_lightning.utilities.exceptions")
    return module is not None and isinstance(e, module.SIGTERMException)


def worker_terminated(e: BaseException) -> bool:
    """Is `e` torch's report of a DataLoader worker ended by SIGTERM? A job scheduler (SLURM's scancel or
    preemption, `kill` of a process group, `pkill -f`) signals the loader processes with the main one, and the main
    process then meets the dead worker before, or instead of, its own SIGTERM: the run was terminated, not broken."""
    return isinstance(e, RuntimeError) and "DataLoader worker" in str(e) and "signal: Terminated" in str(e)


def run_terminated(e: BaseException, trainer=None) -> bool:
    """Did `e` end a fit because the job was terminated? A worker killed by SIGTERM (`worker_terminated`), or any
    RuntimeError raised after the trainer's own SIGTERM arrived (Lightning's `received_sigterm`)."""
    return worker_terminated(e) or (isinstance(e, RuntimeError) and bool(getattr(trainer, "received_sigterm", False)))


def terminate_as_exception() -> None:
    """From now on a SIGTERM raises `Terminated` in this process's main thread, so `finally` blocks and atomic writes
    clean up (the default action kills at once and leaves scratch files). A forked child (a DataLoader worker)
    that inherits the handler dies as before."""
    pid = os.getpid()

    def handler(signum, frame):
        if os.getpid() != pid:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise Terminated()

    signal.signal(signal.SIGTERM, handler)


@contextmanager
def sigterm_as_exception() -> Iterator[None]:
    """`terminate_as_exception` for a phase of a longer command (tl.train after fitting: test, report, export, where
    Lightning's own handler is not installed or only takes note), then the previous handler back."""
    import threading

    if threading.current_thread() is not threading.main_thread():  # train() in a worker thread: signals are not its
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    terminate_as_exception()
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


@contextmanager
def default_sigterm() -> Iterator[None]:
    """SIGTERM's default action for a phase whose library installs its own handler and chains any it finds
    (Lightning's fit: it saves interrupted.ckpt and raises its SIGTERMException; a chained `Terminated` could cut that
    short), then the previous handler back."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def rank_zero_only(fn: Callable) -> Callable:
    """Lightning's `rank_zero_only`, applied at call time so importing this module does not import Lightning."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        from pytorch_lightning.utilities import rank_zero_only as lightning_rank_zero_only

        return lightning_rank_zero_only(fn)(*args, **kwargs)

    return wrapper


def pyplot():
    """matplotlib.pyplot without a display, reading text as text: class and file names are user data, and a name
    with two `$` signs (cost_$5_$10) is not a formula to typeset (matplotlib failed on it)."""
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["text.parse_math"] = False
    import matplotlib.pyplot as plt

    return plt


HYDRA_RECORDS = {"config.yaml", "hydra.yaml", "overrides.yaml"}


def discard_bare_run_dir() -> None:
    """After a refused command: remove the run folder Hydra made for it if it holds nothing but Hydra's own records
    (.hydra/ and the job's log), so refused commands do not pile up empty runs under logs/. A folder with anything
    else in it (an earlier run's files, a user's) is left as it is."""
    with suppress(Exception):  # best effort: the error message matters more
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return
        hc = HydraConfig.get()
        run_dir = Path(hc.runtime.output_dir)
        log_file = f"{hc.job.name}.log"
        entries = {p.name for p in run_dir.iterdir()}
        records = run_dir / ".hydra"
        if not entries <= {".hydra", log_file} or (records.exists() and (
                not records.is_dir() or not {p.name for p in records.iterdir()} <= HYDRA_RECORDS)):
            return
        root = logging.getLogger()
        for handler in list(root.handlers):  # Hydra's file handler holds the log open (and would reopen it)
            if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == run_dir:
                root.removeHandler(handler)
                handler.close()
        shutil.rmtree(run_dir)


def _back_to_launch_dir() -> None:
    """Relative paths (data.root, paths.cache_dir, ckpt, inputs, model.pretrained) mean the folder the command was
    run from, also with `hydra.job.chdir=true`, under which Hydra runs the job inside its output folder (found by a
    hostile tester: `data.root=ds/tex` was then reported missing without a word on why). The outputs do not move:
    they go to the run directory, an absolute path. Hydra returns to its own folder after the job."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized() and HydraConfig.get().job.chdir:
            os.chdir(HydraConfig.get().runtime.cwd)
    except (ImportError, ValueError, OSError, AttributeError):  # outside Hydra, or the folder is gone: stay
        pass


def user_errors(fn: Callable) -> Callable:
    """Turn bad input (a TLError) into one line on stderr and exit status 2, and a SIGTERM or Ctrl-C into one line
    and status 143 or 130 (128 + the signal, as a killed process reports it)."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            _back_to_launch_dir()
            return fn(*args, **kwargs)
        except TLError as e:
            message = str(e).strip()
            if "\n" in message:  # raised in a DataLoader worker: torch re-raises it with the worker's traceback
                message = message.splitlines()[-1].split("TLError: ", 1)[-1]
            discard_bare_run_dir()
            print(f"tl: error: {message}", file=sys.stderr)
            sys.exit(2)
        except SystemExit as e:  # Lightning's SIGTERMException, status 0: a preempted job must not look finished
            if not _is_lightning_sigterm(e):
                raise
            print("tl: interrupted by SIGTERM: the state is saved as checkpoints/interrupted.ckpt in the run "
                  "directory; resume with the same hydra.run.dir and ckpt_path=auto", file=sys.stderr)
            sys.exit(128 + signal.SIGTERM)
        except Interrupted:
            print("tl: interrupted by Ctrl-C: the state is saved as checkpoints/interrupted.ckpt in the run "
                  "directory; resume with the same hydra.run.dir and ckpt_path=auto", file=sys.stderr)
            sys.exit(128 + signal.SIGINT)
        except (KeyboardInterrupt, Terminated, RuntimeError) as e:  # outside fitting: what was being written goes
            if isinstance(e, RuntimeError) and not worker_terminated(e):
                _exit_if_environment(e)
                raise
            name = "Ctrl-C" if isinstance(e, KeyboardInterrupt) else "SIGTERM"
            after = getattr(e, "tl_after", "")  # what is left to do, where the command knows (tl.train after fitting)
            print(f"tl: interrupted by {name}: files being written were discarded, earlier ones are unchanged"
                  f"{after}", file=sys.stderr)
            sys.exit(128 + (signal.SIGINT if isinstance(e, KeyboardInterrupt) else signal.SIGTERM))
        except Exception as e:
            _exit_if_environment(e)
            raise

    return wrapper


def _exit_if_environment(e: Exception) -> None:
    """A failure of the environment that no code path turned into a TLError (a full disk, a file size limit, a
    read-only folder, met by a library's write): one line naming it and exit status 2, the traceback going to the run's
    log file only. Anything else is a bug and keeps its traceback."""
    cause = os_error(e)
    if cause is None or cause.errno not in ENVIRONMENT:
        return
    with suppress(Exception):  # best effort: the disk may be full
        record = logging.LogRecord("tl", logging.ERROR, __file__, 0, "failed: %s", (cause,),
                                   (type(e), e, e.__traceback__))
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.FileHandler):
                handler.handle(record)
    where = f" ({cause.filename})" if cause.filename else ""
    fix = ("free space there" if cause.errno in NO_SPACE else "fix permissions there or choose another folder")
    print(f"tl: error: {cause.strerror or cause}{where}: {fix}, then run again (a training run resumes from its last "
          "checkpoint with the same hydra.run.dir and ckpt_path=auto; the traceback is in the run's log)",
          file=sys.stderr)
    sys.exit(2)


def build(cfg: DictConfig, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate`, re-raising a TLError from the target as itself (Hydra wraps it otherwise)."""
    try:
        return instantiate(cfg, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        while cause is not None and not isinstance(cause, TLError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise


def check_required(cfg: DictConfig) -> None:
    """Fail on a mandatory value (`???`) left unset, before anything runs.

    Not `OmegaConf.missing_keys`: it resolves interpolations on its way and raises on one that points at a missing
    value (`data.source.root: ${..root}` with `data.root: ???`), which is exactly the case to report.
    """
    def walk(node: DictConfig, prefix: str):
        for key in node.keys():
            if OmegaConf.is_missing(node, key):
                yield f"{prefix}{key}"
            else:
                child = node._get_node(key)  # the node itself: no interpolation is resolved
                if isinstance(child, DictConfig):
                    yield from walk(child, f"{prefix}{key}.")

    missing = sorted(k for k in walk(cfg, "") if not k.startswith("hydra"))
    if missing:
        raise TLError(f"{missing[0]} is required: set it on the command line, e.g. {missing[0]}=...")


def check_resolvable(cfg: DictConfig) -> None:
    """Fail in one line on a value whose interpolation does not resolve (`data.root=${oc.env:DATA_DIR}` with the
    variable unset in a batch script, `${nope}`), naming the key, before it is read mid-run as a traceback.
    Hydra's own `${hydra:...}` values are left alone: outside a running Hydra app they cannot resolve yet."""
    from omegaconf import ListConfig
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

    def walk(node, prefix: str) -> None:
        keys = node.keys() if isinstance(node, DictConfig) else range(len(node))
        for key in keys:
            path = f"{prefix}{key}"
            if path == "hydra" or (isinstance(node, DictConfig) and OmegaConf.is_missing(node, key)):
                continue  # Hydra's own settings; `???` is check_required's to report
            try:
                value = node[key]
            except MissingMandatoryValue:
                continue
            except OmegaConfBaseException as e:
                chain, cause = [], e
                while cause is not None:
                    chain.append(str(cause))
                    cause = cause.__cause__ or cause.__context__
                if any("HydraConfig" in c for c in chain):
                    continue
                raw = node._get_node(key)._value()  # the value as written, interpolation and all
                first = (str(e).splitlines() or [type(e).__name__])[0]
                raise TLError(f"{path}={raw} cannot be resolved ({first}): set what it refers to (an environment "
                              "variable: export it), or give the value itself") from None
            if isinstance(value, (DictConfig, ListConfig)):
                walk(value, f"{path}.")

    walk(cfg, "")


def to_plain(cfg: Any) -> Any:
    """A resolved plain Python container from an OmegaConf node (anything else passes through)."""
    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg


def ensure_writable(path: Path, min_free_mb: int = 200, setting: str = "hydra.run.dir=DIR") -> Path:
    """Create `path` and prove it takes a file now, not after an hour of training; `setting` is what the user sets to
    choose another place (named in the error). Refused, it leaves no folder it made behind."""
    made = [p for p in (path, *path.parents) if not p.exists()]  # the folders this call creates, deepest first
    try:
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / f".write_test.{os.getpid()}"  # per process: all ranks of a job may start at once
            probe.write_bytes(b"0" * 4096)
            probe.unlink()
        except OSError as e:
            raise TLError(f"output directory {str(path)!r} is not writable ({e.strerror}): set {setting} "
                          "to a writable place with free space") from e
        free = shutil.disk_usage(path).free
        if free < min_free_mb * 2**20:  # checkpoints and event files need room; fail now, not at the first save
            raise TLError(f"output directory {str(path)!r} has {free / 2**20:.0f} MB free, and this needs about "
                          f"{min_free_mb} MB: free space or set {setting} elsewhere")
    except TLError:
        for folder in made:
            with suppress(OSError):
                folder.rmdir()  # only if still empty
        raise
    return path


def megabytes(n_bytes: float, slack: float = 1.5) -> int:
    """`n_bytes` with `slack` for what an estimate misses, in whole MB (at least 1): a free-space requirement sized to
    what will be written (found by a hostile tester: a fixed 200 MB refused a 10 KB prediction CSV)."""
    return max(1, math.ceil(n_bytes * slack / 2**20))


def output_target(output: Path, setting: str, default_name: str) -> Path:
    """Where writing the file `output` (`setting=...`, e.g. `default_name` predictions.csv) goes: a symbolic link's
    target (the link is kept, not replaced by the file); a folder, a device or a pipe is refused (the atomic write
    would replace it)."""
    suffix = Path(default_name).suffix
    output = Path(output).expanduser()
    if output.is_dir():
        raise TLError(f"{setting}={str(output)!r} is a folder: give a file path, e.g. "
                      f"{setting}={output / default_name}")
    if output.is_symlink():
        try:
            output = output.resolve(strict=False)
        except (RuntimeError, OSError) as e:  # a link loop
            raise TLError(f"{setting}={str(output)!r} is a symbolic link that does not resolve ({e}): give a {suffix} "
                          "file path") from None
    if output.exists() and not output.is_file():
        raise TLError(f"{setting}={str(output)!r} exists and is not a regular file (a device, a pipe, ...): give a "
                      f"{suffix} file path")
    return output


# file types an output is not (x.json would hold CSV); a name like preds_lr0.001 has no format in it
OTHER_FORMATS = {".json", ".csv", ".tsv", ".txt", ".yaml", ".yml", ".onnx", ".ckpt", ".pt", ".pth", ".safetensors",
                 ".npz", ".npy", ".png", ".jpg", ".jpeg", ".html", ".md", ".xlsx", ".parquet"}


def _resolved(path: Path) -> Path | None:
    """`path` resolved, or None where it cannot be (a symbolic-link loop: Python raises RuntimeError or OSError)."""
    try:
        return path.expanduser().resolve(strict=False)
    except (RuntimeError, OSError):
        return None


def check_output_file(output: Path, setting: str, suffix: str, reads: list[Path] = (),
                      inside: list[Path] = ()) -> None:
    """`output` (what the command writes, `setting=...`) must not replace what the user has: a file the command
    reads (`reads`: the model, the inputs), anything in `inside` (a run's checkpoints and export), or an existing file
    other than an earlier output of its kind (`suffix`, e.g. ".csv"). Checked before the work."""
    try:
        target = output.expanduser().resolve(strict=False)
    except (RuntimeError, OSError) as e:  # a link loop
        raise TLError(f"{setting}={str(output)!r} does not resolve ({e}): give a new {suffix} file path") from None
    for path in reads:
        if path is not None and _resolved(Path(path)) == target:  # an input that is a link loop: not the output
            raise TLError(f"{setting}={str(output)!r} is {str(path)!r}, which this command reads or the run keeps: "
                          f"give another {suffix} file path")
    for folder in inside:
        folder = Path(folder).expanduser().resolve(strict=False)
        if target.is_relative_to(folder):
            raise TLError(f"{setting}={str(output)!r} is inside {str(folder)!r}, which holds the model: give a "
                          f"{suffix} file path elsewhere")
    if not target.exists() and target.suffix.lower() in OTHER_FORMATS and target.suffix.lower() != suffix:
        raise TLError(f"{setting}={str(output)!r} names a {target.suffix} file but this command writes {suffix}: give "
                      f"a {suffix} file path")
    if target.is_file() and target.suffix.lower() != suffix:
        raise TLError(f"{setting}={str(output)!r} exists and is not a {suffix} file: it would be overwritten; give a "
                      f"new {suffix} file path")
    if target.is_file() and not _earlier_output(target, suffix):
        raise TLError(f"{setting}={str(output)!r} exists and was not written by this command (a run's results, a "
                      f"report, a dataset's list?): it would be overwritten; give a new {suffix} file path, or remove "
                      "the file first if it is yours to replace")


PREDICTIONS_HEADER = "path,label,prob,error"  # tl.predict's first CSV columns: how an earlier output is known


def check_sweep_output(output: Path, setting: str = "output") -> None:
    """Under -m, every job of the sweep must write its own `output`: one outside the job's folder would be written
    by each job in turn, and only the last job's would be left."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    job_dir = Path(HydraConfig.get().runtime.output_dir).resolve()
    if not Path(output).expanduser().resolve(strict=False).is_relative_to(job_dir):
        raise TLError(f"{setting}={str(output)!r} under -m: every job of the sweep would write it and only the last "
                      f"job's would be kept; set {setting}=${{hydra:runtime.output_dir}}/{Path(output).name} (each "
                      "job's own folder) or run without -m")


def _earlier_output(path: Path, suffix: str) -> bool:
    """`path` is an earlier output of the command that writes `suffix` files: tl.predict's CSV (its header) or
    tl.evaluate's JSON (its `tool` key, or the shape of one written before the key existed)."""
    try:
        if suffix == ".csv":
            with open(path, encoding="utf-8", errors="replace") as f:
                return f.readline().startswith(PREDICTIONS_HEADER)
        if path.stat().st_size > 64 * 2**20:
            return False
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and (data.get("tool") == "tl.evaluate" or (
        "ckpt" in data and "test/acc" in data and "best_ckpt" not in data and "fit_seconds" not in data))




@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """A temporary path beside `path` to write to; on success it is flushed to disk and renamed over `path`.

    Every artifact tl writes goes through here: a reader never sees half a file, and on any failure (a full disk, a
    signal, an encoding error in a late row) the temporary file is removed and the previous `path` stays as it was.
    An OSError becomes one line naming the file (TLError); anything else propagates after the clean-up.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # same folder: the rename is atomic
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        with suppress(OSError):  # a file replaced keeps its permissions (a private 0600 CSV stays private)
            os.chmod(tmp, os.stat(path).st_mode & 0o7777)
        os.replace(tmp, path)
    except BaseException as e:
        with suppress(OSError):
            tmp.unlink()
        cause = os_error(e) if isinstance(e, Exception) and not isinstance(e, TLError) else None
        if cause is not None:  # (torch.save raises a RuntimeError over the OSError)
            fix = ("a part of that path is a file, not a folder: move it away"
                   if cause.errno in (errno.ENOTDIR, errno.EISDIR) else "free space or fix permissions there")
            raise TLError(f"could not write {str(path)!r} ({cause.strerror or cause}): {fix}; its previous version, "
                          "if any, is unchanged") from e
        raise


def atomic_write_text(path: Path | str, text: str) -> None:
    """`path.write_text(text)` (UTF-8), atomically (`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", errors="surrogateescape")


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """`path.write_bytes(data)`, atomically (`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _strict(value: Any) -> Any:
    """NaN and infinities as null: strict JSON readers (jq, JavaScript, most languages' parsers) refuse them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def write_json(path: Path, data: dict) -> None:
    """Write JSON atomically (a reader never sees half a file, a failed write keeps the previous one), strict: a NaN
    or infinite figure (a metric of a run with one example per class, a diverged loss) is written as null."""
    atomic_write_text(path, json.dumps(_strict(data), indent=2, sort_keys=True, default=str, allow_nan=False) + "\n")


@rank_zero_only
def print_config(cfg: DictConfig, save_to: Path | None = None) -> None:
    """Print the resolved config as a rich tree once (rank zero) and save it beside the run."""
    import rich
    import rich.syntax
    import rich.tree

    tree = rich.tree.Tree("config", style="dim")
    for key, node in cfg.items():
        branch = tree.add(str(key), style="bold")
        text = OmegaConf.to_yaml(node, resolve=True) if OmegaConf.is_config(node) else str(node)
        branch.add(rich.syntax.Syntax(text, "yaml"))
    rich.print(tree)
    if save_to is not None:
        atomic_write_text(save_to, OmegaConf.to_yaml(cfg, resolve=True))


@rank_zero_only
def print_results(results: dict, title: str = "results") -> None:
    import rich
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in results.items():
        if isinstance(v, (int, float, str)) and not isinstance(v, bool):
            table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    rich.print(table)
