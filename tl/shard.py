"""`python -m tl.shard data=<source> output=DIR`: convert a dataset once into LitData shards (`tl.data.shards`).

Any tl data source (an image folder, digits, a torchvision dataset) is loaded as training would load it: unreadable
files are skipped and counted here, once, and the splits are made by tl's seeded stratified recipe (`seed`,
`data.val_fraction`, `data.test_fraction`, or the source's own split folders). Each split is written with LitData's
`optimize` (worker processes, records in input order), read back and checked (ids, labels), and only then installed:

- DIR/.tl-shards marks the folder as tl.shard's; a folder holding anything else is refused;
- a complete dataset has DIR/manifest.json, written last; an interrupted conversion (a signal, kill -9, a full
  disk) leaves none, so the folder never passes for complete (`data=shards` says so and a rerun finishes it);
- a second run on unchanged input (same source files, sizes and times, same recipe) writes nothing;
- a complete dataset of other input is replaced only with overwrite=true (runs may be reading it).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import signal
import time
from contextlib import contextmanager, suppress
from datetime import datetime, timezone
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from tl.cli import launch
from tl.data.audit import _digest as digest  # the digest the duplicate audit compares
from tl.data.images import LOSSLESS_FORMATS, to_netpbm, to_rgb
from tl.data.shards import FORMAT, MANIFEST, MARKER, META_FIELDS, SPLITS, VERSION, is_remote, meta_name
from tl.errors import Terminated, TLError
from tl.utils import atomic_write_text, check_required, file_identity, terminate_as_exception, user_errors

log = logging.getLogger(__name__)

LOCK = ".tl-shards.lock"
SKIPPED_LISTED = 10_000  # skipped files named in the manifest (all are counted)
RAW_MAX_RATIO = 1.5  # conf/shard.yaml's default
LOSSLESS_SUFFIXES = (".png", ".apng", ".bmp", ".dib", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm", ".tga",
                     ".qoi")


# -- what a record is ------------------------------------------------------------------------------------------
def encode_record(spec: tuple) -> dict:
    """One record from (id, label, name, path or None, uint8 HWC/HW array or None, raw_max_ratio); runs in
    optimize's workers. A file is stored as its own bytes, except a lossless one (PNG, BMP, TIFF, GIF, ...) whose
    decoded pixels (`to_rgb`: as the folder's loader makes them) take at most `raw_max_ratio` times its size: that
    is stored as a netpbm PGM/PPM, which reads back in microseconds. An in-memory image is stored as its pixels."""
    sid, label, name, path, array, raw_max_ratio = spec
    if path is not None:
        with open(path, "rb") as f:
            data = f.read()
        if raw_max_ratio > 0:
            try:
                with Image.open(io.BytesIO(data)) as img:
                    w, h = img.size
                    # a cheap bound first (a grayscale picture stores a byte a pixel), before decoding
                    if img.format in LOSSLESS_FORMATS and w * h <= raw_max_ratio * len(data):
                        raw = to_netpbm(to_rgb(img))
                        if len(raw) <= raw_max_ratio * len(data) + 16:
                            data = raw
            except Exception:  # noqa: BLE001 - it decoded at the scan; stored as it is, a read names it if it is bad
                pass
    else:
        data = to_netpbm(to_rgb(Image.fromarray(array)))
    return {"image": data, "label": int(label), "id": int(sid), "name": str(name)}


def _inputs(images, indices: np.ndarray, root: Path | None, raw_max_ratio: float) -> list[tuple]:
    out = []
    for j in indices:
        j = int(j)
        label = int(images.targets[j])
        if images.paths is not None:
            path = images.paths[j]
            name = os.path.relpath(path, root) if root is not None else path
            out.append((j, label, name, path, None, raw_max_ratio))
        else:
            arr = images.images[j].permute(1, 2, 0).numpy()
            out.append((j, label, f"#{j}", None, arr[..., 0] if arr.shape[-1] == 1 else arr, raw_max_ratio))
    return out


# -- fingerprints: is the output up to date? -------------------------------------------------------------------------
def folder_listing(root: Path) -> str:
    """A hash of every file's path and identity (size, mtime, ctime, inode: `tl.utils.file_identity`) under `root`
    (a stat each, no reads). Linked folders are followed, each real folder once (a link loop ends there)."""
    from tl.data.sources import walk_once

    h = hashlib.sha256()
    for dirpath, dirnames, filenames in walk_once(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = os.path.join(dirpath, name)
            try:
                st = os.stat(p)
                h.update(f"{os.path.relpath(p, root)}|{file_identity(st)}\n".encode("utf-8", "surrogateescape"))
            except OSError:
                h.update(f"{os.path.relpath(p, root)}|broken\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def content_hash(images) -> str:
    h = hashlib.sha256()
    h.update(images.images.contiguous().numpy().tobytes())
    h.update(np.asarray(images.targets, dtype=np.int64).tobytes())
    h.update(json.dumps(list(images.classes)).encode())
    return h.hexdigest()


def fingerprint(recipe: dict, data_hash: str) -> str:
    return hashlib.sha256(json.dumps({"recipe": recipe, "data": data_hash, "format": VERSION},
                                     sort_keys=True, default=str).encode()).hexdigest()


# -- the output folder -----------------------------------------------------------------------------------------
def inspect_output(out: Path) -> tuple[str, dict | None]:
    """(state, manifest): absent | empty | complete | incomplete (tl.shard's, no manifest) | foreign."""
    if not out.exists():
        return "absent", None
    if not out.is_dir():
        raise TLError(f"output={str(out)!r} exists and is not a folder: give a folder for the shard dataset")
    entries = [p for p in out.iterdir() if p.name != LOCK]
    if not entries:
        return "empty", None
    if not (out / MARKER).exists():
        return "foreign", None
    try:
        manifest = json.loads((out / MANIFEST).read_text())
        if manifest.get("format") != FORMAT:
            return "incomplete", None
    except (OSError, ValueError, AttributeError):
        return "incomplete", None
    from tl.data.shards import check_chunks, read_meta

    try:  # complete only if whole: a truncated or missing chunk, index or meta file is rewritten, not "up to date"
        for split in SPLITS:
            check_chunks(str(out), split)
            read_meta(str(out), split)
    except TLError as e:
        log.warning("%s is damaged (%s): writing it again", out, e)
        return "incomplete", None
    return "complete", manifest


@contextmanager
def output_lock(out: Path):
    """One tl.shard at a time per output folder (a lock file naming the process; a dead holder's lock is taken)."""
    from tl.rundir import _alive

    lock = out / LOCK
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and _alive(pid):
                raise TLError(f"output={str(out)!r} is being written by tl.shard process {pid}: wait for it, or "
                              "choose another output") from None
            lock.unlink(missing_ok=True)
    else:
        raise TLError(f"output={str(out)!r}: could not take {LOCK}; remove it if no tl.shard is running")
    try:
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        yield
    finally:
        lock.unlink(missing_ok=True)


def _remove_partials(out: Path) -> None:
    """Scratch folders of conversions that died (kill -9): their process is gone."""
    from tl.rundir import _alive

    for p in out.glob(".partial-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if not (pid.isdigit() and _alive(int(pid)) and int(pid) != os.getpid()):
            shutil.rmtree(p, ignore_errors=True)


def _install(partial: Path, out: Path, manifest: dict) -> None:
    """Replace the dataset in `out` by the one prepared in `partial`. The manifest goes first and comes back last:
    in between the folder reads as incomplete, never as a mix of two datasets that looks complete."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    try:  # a signal now would leave neither dataset: it is delivered once the new one is in place
        _replace_parts(partial, out, manifest)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _replace_parts(partial: Path, out: Path, manifest: dict) -> None:
    (out / MANIFEST).unlink(missing_ok=True)
    for split in SPLITS:
        if (out / split).exists():
            shutil.rmtree(out / split)
        (out / meta_name(split)).unlink(missing_ok=True)
    for split in SPLITS:
        os.replace(partial / split, out / split)
        os.replace(partial / meta_name(split), out / meta_name(split))
    fd = os.open(out, os.O_RDONLY)
    try:
        os.fsync(fd)  # the renames reach the disk before the manifest says complete
    finally:
        os.close(fd)
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1))


def _lossless_growth(paths, raw_max_ratio: float, sample: int = 256) -> float:
    """How many times their files' size the lossless images take as records, measured on an even sample of them
    (headers only): a record holds an image's pixels (at most 3 bytes each) where they take at most `raw_max_ratio`
    times its file, else the file. So a large ratio costs no more than the pixels; it is not a multiplier."""
    if raw_max_ratio <= 1.0:
        return 1.0
    lossless = [p for p in paths if str(p).lower().endswith(LOSSLESS_SUFFIXES)]
    files = stored = 0
    for p in lossless[:: max(1, len(lossless) // sample)][:sample]:
        with suppress(Exception):  # unreadable files are skipped at the scan; PIL raises many kinds
            size = os.stat(p).st_size
            with Image.open(p) as img:
                pixels = 3 * img.size[0] * img.size[1] + 20
            files += size
            stored += pixels if pixels <= raw_max_ratio * size + 20 else size
    return max(1.0, stored / files) if files else 1.0


def check_space(out: Path, images, chunk: int, raw_max_ratio: float = RAW_MAX_RATIO) -> None:
    """Refuse, in one line, to start a conversion that cannot fit: LitData's writer processes hang on a full disk
    instead of failing. Files are stored as they are, lossless ones as their pixels where those take at most
    `raw_max_ratio` times the file (`_lossless_growth` measures how much bigger that makes them); in-memory images as
    their pixels."""
    if images.paths is not None:
        need = lossless = 0
        for p in images.paths:
            with suppress(OSError):
                size = os.stat(p).st_size
                need += size
                lossless += size if str(p).lower().endswith(LOSSLESS_SUFFIXES) else 0
        need += int(lossless * (_lossless_growth(images.paths, raw_max_ratio) - 1.0))
    else:  # netpbm: the pixels and a header of about 15 bytes
        need = int(images.images.numel()) + 20 * len(images.images)
    need = int(need * 1.1) + 2 * chunk + (4 << 20)  # chunk headers and meta files, chunks in flight
    probe = out
    while not probe.exists():
        probe = probe.parent
    with suppress(OSError):
        if os.statvfs(probe).f_flag & os.ST_RDONLY:  # a read-only mount also reports 0 bytes free
            raise TLError(f"output={str(out)!r} is on a read-only file system ({probe}): choose another output; "
                          "nothing was written")
    usage = shutil.disk_usage(probe)
    if usage.total == 0:  # /proc, /sys, ...: nothing can be stored there
        raise TLError(f"output={str(out)!r} is not on a disk ({probe} is a virtual file system): choose another "
                      "output; nothing was written")
    free = usage.free
    if free < need:
        raise TLError(f"output={str(out)!r}: {free / 2**20:.0f} MiB free there, the shards need about "
                      f"{need / 2**20:.0f} MiB: free space or choose another output; nothing was written")


# -- writing one split -------------------------------------------------------------------------------------------
def _fsync_tree(folder: Path) -> None:
    for p in folder.iterdir():
        if p.is_dir():
            _fsync_tree(p)
        else:
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc), children first."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with suppress(OSError, ValueError, IndexError):
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop(0)
        out.append(p)
        todo += children.get(p, [])
    return out


# Signals received while LitData converts: a handler's exception raised while the signal lands inside a fork's
# callbacks (logging's at-fork lock release) is printed as "Exception ignored" and lost, and the conversion went on
# to replace the dataset with status 0. Each signal is also noted here and acted on at the next safe point.
_SIGNALLED: list[int] = []


def _kill_descendants() -> None:
    for pid in _descendants(os.getpid()):  # the workers and the processes they started (uploaders, removers)
        with suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def _raise_if_signalled() -> None:
    if _SIGNALLED:
        signum = _SIGNALLED[-1]
        _SIGNALLED.clear()
        _kill_descendants()
        raise KeyboardInterrupt if signum == signal.SIGINT else Terminated()


@contextmanager
def _interruptible_optimize():
    """LitData's `optimize` installs a Ctrl-C handler that stops its workers and calls `os._exit(0)`: the command
    would end with status 0, no message and no clean-up, and the handler stays installed afterwards. Here its
    handler stops and ends the workers, then raises KeyboardInterrupt (tl's one line, status 130, the scratch folder
    removed); the previous handler is back once `optimize` returns."""
    from litdata.processing.data_processor import DataProcessor

    main = os.getpid()

    def stop(self, signum, frame):
        _SIGNALLED.append(signum)
        for queue in self.stop_queues:
            queue.put(None)
        _kill_descendants()
        for w in self.workers:
            w.join(5)
        raise KeyboardInterrupt

    def terminate(signum, frame):
        if os.getpid() != main:  # a forked worker: die as before
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        _SIGNALLED.append(signum)
        _kill_descendants()
        raise Terminated()

    previous, original = signal.getsignal(signal.SIGINT), DataProcessor._signal_handler
    previous_term = signal.getsignal(signal.SIGTERM)
    DataProcessor._signal_handler = stop
    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    except BaseException:
        _kill_descendants()  # no worker left blocked on a pipe: the process exits instead of waiting for it
        _raise_if_signalled()  # a signal's exception, not what it broke inside LitData
        raise
    finally:
        DataProcessor._signal_handler = original
        signal.signal(signal.SIGINT, previous)
        signal.signal(signal.SIGTERM, previous_term)
    _raise_if_signalled()  # noted but its exception was lost: stop here, before anything is read or installed


def write_split(inputs: list[tuple], folder: Path, chunk_size: int, workers: int) -> dict[str, np.ndarray]:
    """optimize `inputs` into `folder` (in order), read every record back and check it; the meta arrays."""
    from litdata import StreamingDataset, optimize

    if not inputs:
        raise TLError(f"the {folder.name} split has no images: give it some (or remove its empty folder so that tl "
                      "carves it from train)")
    workers = max(1, min(workers, len(inputs)))
    with _interruptible_optimize():
        optimize(fn=encode_record, inputs=inputs, output_dir=str(folder), chunk_bytes=chunk_size,
                 num_workers=workers, keep_data_ordered=True, reorder_files=False, verbose=False,
                 start_method="fork")
    if not (folder / "index.json").is_file():
        raise TLError(f"LitData wrote no index into {str(folder)!r}: see its messages above; the previous dataset "
                      "in output, if any, is unchanged")
    _fsync_tree(folder)
    ds = StreamingDataset(str(folder), shuffle=False, drop_last=False)
    if len(ds) != len(inputs):
        raise TLError(f"LitData wrote {len(ds)} records into {str(folder)!r} for {len(inputs)} images: nothing "
                      "was installed; rerun python -m tl.shard")
    meta = {k: np.zeros(len(inputs), dtype=t) for k, t in
            zip(META_FIELDS, (np.int64, np.int64, "S16", np.int32, np.int32), strict=True)}
    for i, spec in enumerate(inputs):
        record = ds[i]
        if int(record["id"]) != spec[0] or int(record["label"]) != spec[1]:
            raise TLError(f"{str(folder)!r}: record {i} is image {record['id']}, expected {spec[0]} (LitData did not "
                          "keep the input order): nothing was installed; rerun python -m tl.shard")
        try:  # the size from the header; the content was decoded at the scan
            with Image.open(io.BytesIO(bytes(record["image"]))) as img:
                w, h = img.size
        except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, DecompressionBombError
            raise TLError(f"{str(folder)!r}: record {i} ({record.get('name')!r}) does not open ({type(e).__name__}: "
                          f"{(str(e).splitlines() or [''])[0][:120]}): nothing was installed; rerun python -m tl.shard"
                          ) from e
        meta["labels"][i], meta["ids"][i] = spec[1], spec[0]
        meta["digests"][i] = digest(bytes(record["image"]))
        meta["heights"][i], meta["widths"][i] = h, w
    return meta


# -- the command --------------------------------------------------------------------------------------------------
def _recipe(cfg: DictConfig) -> dict:
    data = OmegaConf.to_container(cfg.data, resolve=True)
    source = data.get("source")
    if isinstance(source, dict) and source.get("layout") == "auto":  # the default: shards made before it existed
        source = {k: v for k, v in source.items() if k != "layout"}  # keep their fingerprint
    ratio = float(cfg.get("raw_max_ratio", RAW_MAX_RATIO))
    return {"source": source, "seed": int(cfg.seed), "val_fraction": data.get("val_fraction"),
            "test_fraction": data.get("test_fraction"), "on_bad_file": data.get("on_bad_file"),
            "chunk_bytes": chunk_bytes(cfg.chunk_bytes),
            # shards made before raw pixels existed read alike (the same pixels): the default keeps their fingerprint
            **({} if ratio == RAW_MAX_RATIO else {"raw_max_ratio": ratio})}


def chunk_bytes(value) -> int:
    """`chunk_bytes` as bytes: an integer, or a size LitData reads (8MB, 512KB, 1GB)."""
    from litdata.utilities.format import _convert_bytes_to_int

    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    try:
        size = _convert_bytes_to_int(str(value))
    except ValueError:
        size = 0
    if size <= 0:
        raise TLError(f"chunk_bytes={value!r}: give a size such as 8MB, 512KB or 1GB (or a number of bytes)")
    return size


def check_settings(cfg: DictConfig) -> None:
    """One line for a bad value, before anything is read or written."""
    if not str(cfg.output or "").strip():
        raise TLError("output is empty: give the folder to write the shards to, e.g. output=/data/my_shards")
    chunk_bytes(cfg.chunk_bytes)
    if cfg.num_workers is not None and not (isinstance(cfg.num_workers, int) and cfg.num_workers >= 1):
        raise TLError(f"num_workers={cfg.num_workers!r}: give a positive number of processes, or null")
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool) or not 0 <= cfg.seed < 2**32:
        raise TLError(f"seed={cfg.seed!r}: give an integer from 0 to 2**32 - 1 (the split seed)")
    if not isinstance(cfg.overwrite, bool):
        raise TLError(f"overwrite={cfg.overwrite!r}: use true or false")
    ratio = cfg.raw_max_ratio
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < float("inf"):
        raise TLError(f"raw_max_ratio={ratio!r}: give a number >= 0 (store a lossless image's pixels where they take "
                      f"at most that many times its file; 0 keeps every file's bytes; default {RAW_MAX_RATIO})")


def shard(cfg: DictConfig) -> Path:
    """Convert `cfg.data` into shards in `cfg.output`; returns the output folder."""
    from tl.data.datamodule import build_datamodule
    from tl.data.shards import ShardSource
    from tl.data.sources import ImageFolderSource

    check_required(cfg)
    check_settings(cfg)
    if is_remote(cfg.output):
        raise TLError(f"output={cfg.output!r}: tl.shard writes to a local folder; copy it to object storage "
                      "afterwards (data=shards data.root=URL reads it there)")
    out = Path(str(cfg.output)).expanduser().absolute()
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    data_cfg["samples_per_class"] = None  # all of train is written; a subset is drawn when training
    datamodule = build_datamodule(data_cfg, preprocess={}, augment=None, seed=int(cfg.seed))
    source = datamodule.source
    if isinstance(source, ShardSource):
        raise TLError(f"data=shards data.root={source.root!r} is a shard dataset already: convert its source "
                      "instead (e.g. data=imagefolder data.root=DIR)")
    folder_root = Path(source.root).absolute() if isinstance(source, ImageFolderSource) else None
    real_out, real_root = Path(os.path.realpath(out)), Path(os.path.realpath(folder_root)) if folder_root else None
    if real_root is not None and (real_out == real_root or real_root in real_out.parents):
        raise TLError(f"output={str(out)!r} is inside data.root={str(folder_root)!r}: the shards would become part "
                      "of the images; write them elsewhere")
    state, manifest = inspect_output(out)
    if state == "foreign":
        raise TLError(f"output={str(out)!r} holds other files (it is not a tl shard dataset): choose a new or empty "
                      "folder")
    recipe = _recipe(cfg)
    quick = fingerprint(recipe, folder_listing(folder_root)) if folder_root is not None and folder_root.is_dir() \
        else None
    if state == "complete" and quick is not None and manifest.get("fingerprint") == quick:
        print(f"tl.shard: {out} is up to date with {folder_root} (nothing written)")
        return out

    started = time.time()
    datamodule.setup("fit")  # the scan (bad files skipped and counted), the split recipe, the audit
    images = datamodule.images
    fp = quick if quick is not None else fingerprint(recipe, content_hash(images))
    if state == "complete" and manifest.get("fingerprint") == fp:
        print(f"tl.shard: {out} is up to date (nothing written)")
        return out
    if state == "complete" and not cfg.overwrite:
        raise TLError(f"output={str(out)!r} holds shards of other input (written {manifest.get('created')}): add "
                      "overwrite=true to replace them (stop runs reading them first), or choose another output")

    check_space(out, images, chunk_bytes(cfg.chunk_bytes), float(cfg.raw_max_ratio))
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / MARKER).write_text("written by python -m tl.shard; complete when manifest.json is present\n")
    except OSError as e:
        raise TLError(f"output={str(out)!r} cannot be written ({e.strerror or e}): fix permissions there or choose "
                      "another output") from e
    workers = int(cfg.num_workers) if cfg.num_workers is not None else (
        min(8, os.cpu_count() or 1) if images.paths is not None else 1)
    with output_lock(out):
        state, manifest = inspect_output(out)  # again: another tl.shard may have finished meanwhile
        if state == "complete" and manifest.get("fingerprint") == fp:
            print(f"tl.shard: {out} is up to date (nothing written)")
            return out
        _remove_partials(out)
        partial = out / f".partial-{os.getpid()}"
        partial.mkdir()
        installing = False
        try:
            metas = {}
            rng = np.random.default_rng(int(cfg.seed))
            for split in SPLITS:
                indices = np.asarray(datamodule.split_indices[split])
                if split == "train":  # chunks must mix classes: LitData shuffles chunks, then within a chunk
                    indices = rng.permutation(indices)
                log.info("Writing %s: %d images", split, len(indices))
                inputs = _inputs(images, indices, folder_root, float(cfg.raw_max_ratio))
                metas[split] = write_split(inputs, partial / split, chunk_bytes(cfg.chunk_bytes), workers)
                np.savez(partial / meta_name(split), **metas[split])
            _fsync_tree(partial)
            classes = list(images.classes)
            counts = {s: dict(zip(classes, np.bincount(metas[s]["labels"], minlength=len(classes)).tolist(),
                                  strict=True)) for s in SPLITS}
            total = sum(f.stat().st_size for s in SPLITS for f in (partial / s).iterdir())
            import litdata

            import tl

            manifest = {
                "format": FORMAT, "version": VERSION, "fingerprint": fp,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "tl_version": getattr(tl, "__version__", None), "litdata_version": litdata.__version__,
                "source": {"name": type(source).__name__, "root": str(folder_root) if folder_root else None,
                           "config": recipe["source"]},
                "raw_max_ratio": float(cfg.raw_max_ratio),
                "split_recipe": {"seed": recipe["seed"], "val_fraction": recipe["val_fraction"],
                                 "test_fraction": recipe["test_fraction"],
                                 "given_by_source": sorted(images.given_splits),
                                 "train_order": f"shuffled with seed {recipe['seed']}"},
                "classes": classes, "sizes": {s: int(len(metas[s]["labels"])) for s in SPLITS}, "counts": counts,
                "skipped_files": {"count": len(images.skipped_files),
                                  "first": list(images.skipped_files[:SKIPPED_LISTED])},
                "ignored_files": {"count": len(images.ignored_files),
                                  "first": list(images.ignored_files[:SKIPPED_LISTED])},
                "audit": datamodule.audit, "chunk_bytes": str(cfg.chunk_bytes), "bytes": int(total),
                "seconds": round(time.time() - started, 1),
            }
            _raise_if_signalled()
            installing = True
            _install(partial, out, manifest)
        except OSError as e:
            before = ("the folder is now incomplete (no manifest.json); rerun this command" if installing else
                      "a previous dataset there is unchanged")
            raise TLError(f"could not write the shards in {str(out)!r} ({e.strerror or e}): free space or fix "
                          f"permissions there; {before}") from e
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    sizes = manifest["sizes"]
    print(f"tl.shard: {out}: train {sizes['train']}, val {sizes['val']}, test {sizes['test']} images, "
          f"{len(manifest['classes'])} classes, {manifest['bytes'] / 2**20:.1f} MiB, "
          f"{len(images.skipped_files)} unreadable file(s) skipped, "
          f"{len(images.ignored_files)} file(s) left out (not images, or outside class folders), "
          f"{manifest['seconds']:.1f}s")
    return out


@hydra.main(version_base="1.3", config_path="../conf", config_name="shard")
@user_errors
def _hydra_main(cfg: DictConfig) -> None:
    terminate_as_exception()
    shard(cfg)


def main() -> None:
    launch(_hydra_main, "shard")


if __name__ == "__main__":
    main()
