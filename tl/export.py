"""`python -m tl.export ckpt=RUN|CKPT format=onnx|safetensors|all [output=DIR]`: a trained model as plain files.

The directory holds, by format:
- `model.onnx` (onnx, all; where onnx and onnxruntime are installed): one graph from uint8 RGB images to calibrated
  probabilities, preprocessing inside, dynamic batch; checked against PyTorch on real validation images at export
  (`tl.onnx_export`). Optional `model.int8.onnx` (`onnx.quantize=true`). Runs anywhere ONNX Runtime does, without tl:
  README, "Deploying". `ckpt=RUN` of a snapshot-ensemble run exports the ensemble, the graph averaging its members.
- `model.safetensors` (safetensors, all): the timm model's state dict (tensors only, no pickle) of the tested
  checkpoint. To rebuild it: `timm.create_model(meta["name"], num_classes=meta["num_classes"])` and
  `load_state_dict(safetensors.torch.load_file("model.safetensors"))`.
- `model.json`: timm model name, classes, preprocessing, drop rates, the calibration temperature T where the run
  fitted one (probabilities are softmax(logits / T)), and `onnx`: the graph's input contract, the preprocessing left
  outside it, the members and the parity figures.

`python -m tl.predict ckpt=DIR` reads the safetensors export (PyTorch); `ckpt=DIR/model.onnx` runs ONNX Runtime.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import tempfile
from contextlib import contextmanager, suppress
from pathlib import Path

import hydra
from omegaconf import DictConfig
from torch import nn

from tl.checks import EXPORT_RULES, check_rules
from tl.cli import launch
from tl.errors import TLError
from tl.inference import EXPORT_CONFIG, EXPORT_WEIGHTS, load_module, run_dir_of
from tl.utils import (
    check_required,
    ensure_writable,
    megabytes,
    terminate_as_exception,
    user_errors,
)

log = logging.getLogger("tl.export")

FORMAT = "tl-export/1"
FORMATS = ("onnx", "safetensors", "all")
# a run's own folders (tl.rundir.RUN_ARTIFACTS), which an export must not land in; RUN/export is the export's place
RUN_PARTS = ("checkpoints", "report", "tensorboard", "csv", "snapshots", ".hydra")


def export_meta(module: nn.Module) -> dict:
    """model.json's common part, from a `TransferModule`; a bad calibration is refused before anything is written."""
    from tl.models.module import check_calibration

    hp = module.hparams
    meta = {
        "format": FORMAT,
        "name": hp.name,
        "num_classes": int(hp.num_classes),
        "class_names": list(hp.class_names or [str(i) for i in range(hp.num_classes)]),
        "preprocess": dict(hp.preprocess),
        "drop_rate": float(hp.drop_rate),
        "drop_path_rate": float(hp.drop_path_rate),
    }
    calibration = check_calibration(getattr(module, "calibration", None), "the model")
    if calibration:  # probabilities are softmax(logits / temperature)
        meta["calibration"] = {k: v for k, v in calibration.items() if isinstance(v, (int, float, str))}
    return meta


def ensemble_members(paths: list) -> list[nn.Module]:
    """The models of a snapshot ensemble for `export_model(members=...)`, each with its calibration temperature."""
    from tl.inference import load_classifier

    members = []
    for path in paths:
        clf = load_classifier(path)
        clf.model.temperature = clf.temperature
        members.append(clf.model)
    return members


def export_model(module: nn.Module, out_dir: str | Path, formats: str = "safetensors", onnx: dict | None = None,
                 members: list[nn.Module] | None = None, parity_data=None, sources: dict | None = None,
                 remove_others: bool = True) -> Path:
    """Write `module` (a `TransferModule`) to `out_dir` in `formats` (onnx | safetensors | all); return `out_dir`.

    Args:
        onnx: the ONNX options (conf/train.yaml `onnx`: quantize, input_size, parity_images, tolerance,
            min_int8_agreement, opset).
        members: the models of a snapshot ensemble for the ONNX graph (their calibration temperatures on them as
            `.temperature`); None: `module.model` alone.
        parity_data: a set-up data module whose validation images check the ONNX model; None: synthetic images.
        sources: where the weights came from, recorded in model.json (checkpoint paths).
        remove_others: an earlier tl export's files of a format not written this time are removed (a training run
            replacing its own export with new weights); False: refused instead, before any work (`tl.export`: a
            user asking for one format must not lose the other without a word).

    Everything is computed in a scratch folder first; the files are moved into place only when all of them are
    ready, model.json last, so a failure (a parity check, a full disk) leaves the previous export as it was. A format
    not written this time is removed, so model.json never describes a stale file beside it.
    """
    from tl.onnx_export import INT8_FILE, ONNX_FILE, build_onnx, parity_images_from, quantize_mode, synthetic_images

    if formats not in FORMATS:
        raise TLError(f"format={formats!r} is not a choice: use {', '.join(FORMATS)}")
    onnx = dict(onnx or {})
    quantize_as = quantize_mode(onnx.get("quantize"))
    meta = export_meta(module)
    if sources:
        meta["weights_from"] = sources
    out_dir = Path(out_dir)
    if _is_run(out_dir) or (_is_run(out_dir.parent) and out_dir.name in RUN_PARTS):
        raise TLError(f"output={str(out_dir)!r} is a training run's folder or one of its parts: export into RUN/export "
                      "(the default) or another folder")
    created = not out_dir.exists()
    writes = (EXPORT_CONFIG, *((EXPORT_WEIGHTS,) if formats in ("safetensors", "all") else ()),
              *((ONNX_FILE,) if formats in ("onnx", "all") else ()),
              *((INT8_FILE,) if formats in ("onnx", "all") and quantize_as else ()))
    _check_not_foreign(out_dir, writes)
    others = [n for n in (ONNX_FILE, INT8_FILE, EXPORT_WEIGHTS) if n not in writes and (out_dir / n).is_file()]
    if not remove_others and others and _is_tl_export(out_dir / EXPORT_CONFIG):
        wanted = "format=all" + (" onnx.quantize=true" if INT8_FILE in others else "")
        raise TLError(f"output={str(out_dir)!r} holds an earlier export's {' and '.join(others)}, which this one "
                      f"(format={formats}{'' if INT8_FILE not in others else ', onnx.quantize=false'}) does not write: "
                      f"it would be removed, not to sit beside a model.json that no longer describes it; export "
                      f"{wanted} there, or into another folder with output=DIR; nothing was written")
    # the weights once per file written (ONNX: once per ensemble member; int8 a quarter), scratch copies moved in
    model_bytes = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    copies = (EXPORT_WEIGHTS in writes) + (ONNX_FILE in writes) * len(members or [None]) + (INT8_FILE in writes) / 4
    out_dir = ensure_writable(out_dir, min_free_mb=megabytes(model_bytes * copies + 2**20), setting="output=DIR")
    _remove_abandoned_scratch(out_dir)
    work = Path(tempfile.mkdtemp(prefix=f".export-{os.getpid()}-", dir=out_dir))
    done = False
    try:
        moves: list[tuple[Path, str]] = []
        if formats in ("onnx", "all"):
            from tl.onnx_export import onnx_available

            missing = onnx_available()
            if missing:
                raise TLError(f"format={formats} needs ONNX: {missing}; or export format=safetensors")
            n = int(onnx.get("parity_images", 64))
            images, split = parity_images_from(parity_data, n) if parity_data is not None else ([], "no")
            images_from = f"{split} split"
            if not images:
                h, w = meta["preprocess"]["input_size"][1:]
                images, images_from = synthetic_images(n, h, w), "synthetic (the run's data was not reachable)"
                log.warning("ONNX parity is checked on synthetic images: the run's data could not be loaded")
            models = members or [module.model]
            temperatures = [float(getattr(m, "temperature", None) or 1.0) for m in members] if members \
                else [float((meta.get("calibration") or {}).get("temperature", 1.0))]
            with _write_errors(out_dir / ONNX_FILE):
                section, files = build_onnx(
                    models, temperatures, meta["preprocess"], meta, work, images, images_from,
                    tolerance=float(onnx.get("tolerance", 1e-4)), quantize_as=quantize_as,
                    min_int8_agreement=float(onnx.get("min_int8_agreement", 0.97)),
                    input_size=onnx.get("input_size"), opset=int(onnx.get("opset", 18)),
                    exporter=str(onnx.get("exporter", "auto")))
            meta["onnx"] = section
            moves += files
        if formats in ("safetensors", "all"):
            from safetensors.torch import save_file

            # safetensors wants contiguous tensors that share no memory: plain detached copies
            state = {k: v.detach().cpu().contiguous().clone() for k, v in module.model.state_dict().items()}
            with _write_errors(out_dir / EXPORT_WEIGHTS):
                save_file(state, str(work / EXPORT_WEIGHTS), metadata={"format": FORMAT, "name": meta["name"]})
            meta["safetensors"] = {"file": EXPORT_WEIGHTS, "members": 1}
            moves.append((work / EXPORT_WEIGHTS, EXPORT_WEIGHTS))
        (work / EXPORT_CONFIG).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        moves.append((work / EXPORT_CONFIG, EXPORT_CONFIG))  # last: it describes the files moved before it
        stale = {ONNX_FILE, INT8_FILE, EXPORT_WEIGHTS} - {name for _, name in moves}  # an earlier export's
        install(moves, stale, out_dir)
        done = True
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if created and not done:
            with suppress(OSError):
                out_dir.rmdir()  # only if still empty
    return out_dir


def install(moves: list[tuple[Path, str]], stale: set[str], out_dir: Path) -> None:
    """Put the finished scratch files in place (same folder: each rename is atomic), model.json last, then remove the
    files an earlier tl export left that this one does not replace (only where the folder holds a tl export).

    Every destination is checked first, so a folder or other non-file in the way stops it before anything changes;
    every file is on disk before the first rename; SIGTERM and Ctrl-C wait while the renames run (milliseconds), so
    the folder never holds a mix of two exports.
    """
    mask = os.umask(0)
    os.umask(mask)
    previous = _is_tl_export(out_dir / EXPORT_CONFIG)
    stale = {name for name in stale if previous and (out_dir / name).exists()}
    for name in [*(name for _, name in moves), *stale]:
        target = out_dir / name
        if (target.exists() and not target.is_file()) or target.is_symlink():
            raise TLError(f"{str(target)!r} is in the way (not a regular file): move it away and export again; "
                          "nothing was written")
    for scratch, name in moves:
        with _write_errors(out_dir / name):
            with open(scratch, "rb") as f:
                os.fsync(f.fileno())
            os.chmod(scratch, 0o666 & ~mask)  # as a plain open() would create it (safetensors writes 0600)
    signals = {signal.SIGTERM, signal.SIGINT}
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        for scratch, name in moves:
            with _write_errors(out_dir / name):
                os.replace(scratch, out_dir / name)
        for name in stale:
            (out_dir / name).unlink(missing_ok=True)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)  # a signal that came meanwhile is delivered now


def _check_not_foreign(out_dir: Path, names: tuple[str, ...]) -> None:
    """Refuse a folder where this export would replace files (`names`) that are not a tl export's (another tool's
    model.json or model.onnx), or that holds images: an export would replace or sit among what is not its own."""
    from tl.data.images import IMAGE_EXTENSIONS

    if not out_dir.is_dir():
        return
    theirs = [n for n in names if (out_dir / n).is_file()]  # a folder in the way: install() names it
    if theirs and not _is_tl_export(out_dir / EXPORT_CONFIG):
        raise TLError(f"output={str(out_dir)!r} holds {', '.join(theirs)} that are not a tl export (no model.json of "
                      "format tl-export/): they would be replaced; export into a new or empty folder")
    try:
        images = sum(1 for f in out_dir.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())
    except OSError:
        return
    if images:
        raise TLError(f"output={str(out_dir)!r} holds {images} image file(s): the model files would sit among them; "
                      "export into a new or empty folder")


def _is_run(folder: Path) -> bool:
    return (folder / "config.yaml").is_file() or (folder / ".hydra" / "config.yaml").is_file() or \
        (folder / "checkpoints").is_dir()


def _is_tl_export(config: Path) -> bool:
    try:
        return json.loads(config.read_text()).get("format", "").startswith("tl-export/")
    except (OSError, ValueError, AttributeError):
        return False


def _remove_abandoned_scratch(out_dir: Path) -> None:
    """Scratch folders of exports that were killed outright (SIGKILL, power loss): their process is gone."""
    for folder in out_dir.glob(".export-*-*"):
        try:
            pid = int(folder.name.split("-")[1])
            os.kill(pid, 0)  # raises if no such process
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except (ValueError, IndexError, PermissionError, OSError):
            continue


@contextmanager
def _write_errors(path: Path):
    """An OSError while a file for `path` is prepared (a full disk, permissions): one line naming it."""
    try:
        yield
    except OSError as e:
        raise TLError(f"could not write {str(path)!r} ({e.strerror or e}): free space or fix permissions there; the "
                      "previous export, if any, is unchanged") from e


def export(cfg: DictConfig) -> Path:
    """Export the checkpoint, run or snapshot ensemble `cfg.ckpt` to `cfg.output` (default: RUN/export)."""
    from tl.evaluate import resolve_members

    check_required(cfg)
    check_rules(cfg, EXPORT_RULES)
    if cfg.get("output") and Path(cfg.output).expanduser().exists() and not Path(cfg.output).expanduser().is_dir():
        raise TLError(f"output={cfg.output!r} exists and is not a folder: give a folder for the model files")
    if cfg.format not in FORMATS:
        raise TLError(f"format={cfg.format!r} is not a choice: use {', '.join(FORMATS)}")
    paths = resolve_members(cfg.ckpt, (cfg.get("ensemble") or {}).get("last"))
    if any(p.is_dir() for p in paths):
        raise TLError(f"ckpt={cfg.ckpt!r} is an export already: export from the training run's checkpoint "
                      "(RUN or RUN/checkpoints/<best>.ckpt)")
    module = load_module(paths[-1])  # an ensemble's last member carries the common metadata
    members = None
    if len(paths) > 1:
        members = ensemble_members(paths)
        if cfg.format == "safetensors":
            raise TLError(f"ckpt={cfg.ckpt!r} is a snapshot ensemble of {len(paths)} members: format=safetensors "
                          "holds one model; export format=onnx (one graph averaging them) or one member's .ckpt")
    run_dir = run_dir_of(paths[0])
    output = cfg.get("output") or (_default_output(run_dir, paths) if run_dir else
                                   Path(cfg.paths.output_dir) / "export")
    target = Path(output).expanduser().resolve(strict=False)
    if target.name == "export" and _is_run(target.parent) and (
            run_dir is None or target.parent != Path(run_dir).resolve()):
        raise TLError(f"output={str(output)!r} is the export of another training run ({str(target.parent)!r}): it "
                      "would replace that run's model; export into this run's own RUN/export (the default) or a new "
                      "folder")
    parity_data = None
    if cfg.format in ("onnx", "all"):
        parity_data = _parity_data(cfg, paths[0], dict(module.hparams.preprocess))
    formats = cfg.format if members is None else "onnx"
    out_dir = export_model(module, output, formats, dict(cfg.onnx), members, parity_data,
                           sources={"checkpoints": [str(p) for p in paths]}, remove_others=False)
    meta = json.loads((out_dir / EXPORT_CONFIG).read_text())
    written = [name for name in ("model.onnx", "model.int8.onnx", EXPORT_WEIGHTS) if (out_dir / name).is_file()]
    print(f"tl.export: {cfg.ckpt} -> {out_dir} ({', '.join(written)}, {EXPORT_CONFIG})")
    if "onnx" in meta:
        check = meta["onnx"]["parity"]
        print(f"  onnx parity on {check['images']} {check['inputs']} images: max |dp| {check['max_abs_prob_diff']:.2e},"
              f" top-1 agreement {check['top1_agreement']:.2%} ({meta['onnx']['members']} member(s), "
              f"{meta['onnx']['exporter']} exporter, {meta['onnx']['seconds']:.1f}s)")
        if "int8" in meta["onnx"]:
            q = meta["onnx"]["int8"]["parity"]
            print(f"  int8 ({meta['onnx']['int8']['mode']}) parity: max |dp| {q['max_abs_prob_diff']:.2e}, top-1 "
                  f"agreement {q['top1_agreement']:.2%}")
    return out_dir


def _default_output(run_dir: Path, paths: list[Path]) -> Path:
    """RUN/export for the model the run delivered (what tl.train exported there, what results.json reports); any other
    checkpoint or ensemble goes beside it, RUN/export-<name>, and never replaces the delivered model (with its
    calibration) that `tl.predict ckpt=RUN/export` serves."""
    from tl.evaluate import resolve_members

    try:
        delivered = [p.resolve() for p in resolve_members(str(run_dir), None)]
    except TLError:
        delivered = None
    if delivered == [p.resolve() for p in paths]:
        return Path(run_dir) / "export"
    name = paths[0].stem if len(paths) == 1 else f"last{len(paths)}"
    return Path(run_dir) / f"export-{name}"


def _parity_data(cfg: DictConfig, ckpt: Path, preprocess: dict):
    """The training run's data module, set up, for the parity images; None (synthetic images) when unreachable."""
    from tl.data.datamodule import build_datamodule
    from tl.evaluate import data_config

    try:
        data, seed = data_config(cfg, ckpt)
        datamodule = build_datamodule(data, preprocess, augment=None, seed=seed)
        datamodule.setup("validate")
        return datamodule
    except TLError as e:
        if cfg.get("data") is not None:  # named on the command line: it must be there
            raise
        log.warning("the run's data is not reachable (%s): checking ONNX parity on synthetic images", e)
        return None


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
@user_errors
def _hydra_main(cfg: DictConfig) -> None:
    terminate_as_exception()
    export(cfg)


def main() -> None:
    launch(_hydra_main, "export")


if __name__ == "__main__":
    main()
