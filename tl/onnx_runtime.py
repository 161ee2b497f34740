"""A tl ONNX model run by ONNX Runtime, with numpy and PIL only: no torch, Lightning or timm on this path.

The file written by `tl.export` (see `tl.onnx_export`) takes uint8 RGB images, NHWC, at the model's input size,
and holds the rest of the preprocessing (scaling, mean/std) and the calibration temperature in its graph. What cannot
live in the graph (decoding, resizing an image of any size, cropping) is described as steps in its metadata
(`preprocess_steps`) and applied here exactly as torchvision applies them to a PIL image at evaluation time, so this
path and the PyTorch one see the same pixels.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from tl.data.images import RESAMPLE, open_image
from tl.errors import TLError

META_KEY = "tl"  # the ONNX metadata_props entry holding the export's JSON (the same as model.json's "onnx" view)
EXPORT_HINT = "export it again with python -m tl.export ckpt=RUN format=onnx"


# -- the preprocessing steps outside the graph ----------------------------------------------------------------------
def resized_size(height: int, width: int, size: int | list[int], max_size: int | None = None) -> tuple[int, int]:
    """torchvision's output size for Resize(size): an int resizes the shorter side, keeping the aspect ratio."""
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return int(size[0]), int(size[1])
    requested = int(size[0] if isinstance(size, (list, tuple)) else size)
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = requested, int(requested * long / short)
    if max_size is not None and new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    return (new_long, new_short) if width <= height else (new_short, new_long)


def keep_ratio_size(height: int, width: int, size: list[int], longest: float) -> tuple[int, int]:
    """timm's ResizeKeepRatio at evaluation time (no random scale or aspect)."""
    ratio_h, ratio_w = height / size[0], width / size[1]
    ratio = max(ratio_h, ratio_w) * longest + min(ratio_h, ratio_w) * (1.0 - longest)
    return round(height / ratio), round(width / ratio)


def center_crop(img: Image.Image, size: list[int]) -> Image.Image:
    """torchvision's center_crop on a PIL image: zero padding where the image is smaller, then the centred box."""
    crop_h, crop_w = int(size[0]), int(size[1])
    width, height = img.size
    if crop_w > width or crop_h > height:
        left, top = max(0, (crop_w - width) // 2), max(0, (crop_h - height) // 2)
        padded = Image.new(img.mode, (width + max(0, crop_w - width), height + max(0, crop_h - height)), 0)
        padded.paste(img, (left, top))
        img, (width, height) = padded, padded.size
        if (width, height) == (crop_w, crop_h):
            return img
    top, left = int(round((height - crop_h) / 2.0)), int(round((width - crop_w) / 2.0))
    return img.crop((left, top, left + crop_w, top + crop_h))


def apply_steps(img: Image.Image, steps: list[dict]) -> np.ndarray:
    """An RGB PIL image through the export's `preprocess_steps`: a uint8 array (H, W, 3) for the graph."""
    for step in steps:
        op = step["op"]
        if op in ("resize", "resize_keep_ratio"):
            height, width = img.height, img.width
            size = (resized_size(height, width, step["size"], step.get("max_size")) if op == "resize"
                    else keep_ratio_size(height, width, step["size"], float(step.get("longest", 0.0))))
            if size != (height, width):  # torchvision returns the image itself when the size is unchanged
                img = img.resize((size[1], size[0]), RESAMPLE[step["interpolation"]])
        elif op == "center_crop":
            img = center_crop(img, step["size"])
        else:
            raise TLError(f"preprocessing step {op!r} is unknown to this tl: {EXPORT_HINT}")
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


# -- the model --------------------------------------------------------------------------------------------------------
@dataclass
class OnnxClassifier:
    """An ONNX Runtime session over a tl export, with its class names, input contract and preprocessing steps."""

    session: object
    meta: dict
    source: str

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    @property
    def num_classes(self) -> int:
        return len(self.meta["class_names"])

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) the graph takes."""
        shape = self.meta["onnx"]["input"]["shape"]
        return int(shape[1]), int(shape[2])

    @property
    def temperature(self) -> float:
        return float((self.meta.get("calibration") or {}).get("temperature", 1.0))

    @property
    def decode_side(self) -> tuple[int | None, str]:
        """(shorter side, interpolation) that `tl.data.images.open_image` resizes larger files to before the steps:
        the first resize's size, as the PyTorch path has it (`tl.data.transforms.decode_side`), so both see the same
        pixels."""
        for step in self.meta["onnx"]["preprocess_steps"]:
            if step["op"] in ("resize", "resize_keep_ratio"):
                size = step["size"]
                return int(max(size) if isinstance(size, (list, tuple)) else size), str(step["interpolation"])
        return None, "bicubic"

    def prepare(self, img: Image.Image) -> np.ndarray:
        return apply_steps(img, self.meta["onnx"]["preprocess_steps"])

    def probs(self, images: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities (N, C) for uint8 images (N, H, W, 3)."""
        return self.session.run(["probs"], {self.meta["onnx"]["input"]["name"]: images})[0]


def providers_for(device: str) -> list[str]:
    """ONNX Runtime execution providers for `device=auto|cpu|cuda|cuda:N` (CUDA needs the onnxruntime-gpu package)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "auto":
        return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in available:
            raise TLError(f"device={device!r} but this ONNX Runtime has no CUDA provider ({', '.join(available)}): "
                          "pip install onnxruntime-gpu, or use device=cpu")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise TLError(f"device={device!r} is not a device for ckpt=*.onnx: use auto, cpu, cuda or cuda:N")


def load_onnx(path: str | Path, threads: int | None = None, device: str = "cpu") -> OnnxClassifier:
    """An ONNX Runtime session for a .onnx file written by `tl.export`; anything else is refused in one line."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise TLError(f"ckpt={str(path)!r} is a folder: give the model.onnx file written by python -m tl.export")
    if not path.is_file():
        raise TLError(f"ckpt={str(path)!r} not found: give a model.onnx written by python -m tl.export")
    try:
        import onnxruntime as ort
    except ImportError:
        raise TLError("ckpt=*.onnx needs onnxruntime: pip install onnxruntime (or predict with the export folder "
                      "or a .ckpt through PyTorch)") from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads or os.cpu_count() or 1)
    options.log_severity_level = 3  # errors only: ORT's warnings about unused initializers are not the user's
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads leave decoding the cores
    providers: list = providers_for(device)
    if device.startswith("cuda:"):  # a given GPU
        index = device.split(":", 1)[1]
        if not index.isdigit():
            raise TLError(f"device={device!r} is not a device: use cuda or cuda:N")
        providers[0] = ("CUDAExecutionProvider", {"device_id": int(index)})
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as e:  # noqa: BLE001 - InvalidProtobuf, Fail, InvalidGraph, NoSuchFile, ...
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise TLError(f"ckpt={str(path)!r} is not a readable ONNX model ({type(e).__name__}: {first}): "
                      f"{EXPORT_HINT}") from None
    raw = session.get_modelmeta().custom_metadata_map.get(META_KEY)
    try:
        meta = json.loads(raw) if raw else None
        ok = meta is not None and "class_names" in meta and {"input", "preprocess_steps"} <= meta["onnx"].keys()
        inputs = {i.name for i in session.get_inputs()}
        ok = ok and meta["onnx"]["input"]["name"] in inputs and "probs" in {o.name for o in session.get_outputs()}
    except (ValueError, TypeError, KeyError, AttributeError):
        ok = False
    if not ok:
        raise TLError(f"ckpt={str(path)!r} is an ONNX model but not one written by tl.export (no class names, input "
                      f"contract or preprocessing in its metadata): {EXPORT_HINT}")
    problem = check_meta(meta, session)
    if problem:
        raise TLError(f"ckpt={str(path)!r} has tl metadata that does not fit its graph ({problem}): {EXPORT_HINT}")
    return OnnxClassifier(session, meta, str(path))


def _side(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 65536


def check_meta(meta: dict, session) -> str | None:
    """What is wrong with an export's metadata against its graph (an edited or mismatched file), or None."""
    names = meta.get("class_names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        return "class_names is not a list of names"
    probs = next(o for o in session.get_outputs() if o.name == "probs")
    classes = probs.shape[-1] if probs.shape else None
    if isinstance(classes, int) and classes != len(names):
        return f"{len(names)} class names for {classes} outputs"
    shape = meta["onnx"]["input"].get("shape")
    if not isinstance(shape, list) or len(shape) != 4 or not all(_side(v) for v in shape[1:]) or shape[3] != 3:
        return f"input shape {shape!r} is not [batch, H, W, 3]"
    graph_input = next(i for i in session.get_inputs() if i.name == meta["onnx"]["input"]["name"])
    if graph_input.type != "tensor(uint8)" or len(graph_input.shape) != 4 or any(
            isinstance(g, int) and g != m for g, m in zip(graph_input.shape[1:], shape[1:], strict=True)):
        return f"the graph takes {graph_input.type} {graph_input.shape}, the metadata says uint8 {shape}"
    calibration = meta.get("calibration")
    if calibration is not None:
        t = calibration.get("temperature", 1.0) if isinstance(calibration, dict) else None
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not 0 < t < float("inf"):
            return f"calibration {calibration!r} has no positive temperature"
    steps = meta["onnx"]["preprocess_steps"]
    if not isinstance(steps, list) or not steps:
        return "preprocess_steps is not a list of steps"
    for step in steps:
        op = step.get("op") if isinstance(step, dict) else None
        size = step.get("size") if isinstance(step, dict) else None
        pair = isinstance(size, list) and len(size) == 2 and all(_side(v) for v in size)
        if op not in ("resize", "resize_keep_ratio", "center_crop"):
            return f"preprocessing step {step!r} is unknown"
        if not (pair or (op == "resize" and (_side(size) or (isinstance(size, list) and len(size) == 1
                                                               and _side(size[0]))))):
            return f"step {op} has size {size!r}"
        if op != "center_crop" and not (isinstance(step.get("interpolation"), str)
                                        and step["interpolation"] in RESAMPLE):
            return f"step {op} has interpolation {step.get('interpolation')!r}"
        if op == "resize_keep_ratio" and not (isinstance(step.get("longest", 0.0), (int, float))
                                              and 0 <= step.get("longest", 0.0) <= 1):
            return f"step {op} has longest {step.get('longest')!r}"
        if op == "resize" and step.get("max_size") is not None and not _side(step.get("max_size")):
            return f"step {op} has max_size {step.get('max_size')!r}"
    last = steps[-1]
    if last["op"] == "resize_keep_ratio":
        return "the steps end with resize_keep_ratio, whose output size depends on the image"
    if not isinstance(last["size"], list) or len(last["size"]) != 2 or list(last["size"]) != shape[1:3]:
        return f"the steps end at {last['size']!r}, not at the graph's input size {shape[1:3]}"
    return None


# -- tl.predict's ONNX Runtime path ------------------------------------------------------------------------------------
def check_regular(path: Path) -> None:
    """Refuse a pipe, a device or a folder before opening it (opening a FIFO blocks until a writer comes)."""
    if path.exists() and not path.is_file():
        raise OSError(f"not a regular file (a pipe, a device or a folder): {path}")


def read_error(e: Exception) -> str:
    """A file's read error for its CSV row: the exception's name and first line (for an image over PIL's guard
    against decompression bombs, a real one such as a 20000x20000 satellite scene, what to do)."""
    text = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
    if isinstance(e, Image.DecompressionBombError):
        text += " (downscale or tile the image below that many pixels first)"
    return text


def read_image(path: Path, clf: OnnxClassifier) -> tuple[np.ndarray | None, str]:
    """A file decoded (any mode, EXIF orientation applied) and prepared for the graph, or the error that stopped it."""
    try:
        check_regular(path)
        return clf.prepare(open_image(path, *clf.decode_side)), ""
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, DecompressionBombError
        return None, read_error(e)


class OnnxPredictor:
    """The ONNX Runtime model behind tl.predict for a .onnx file: decoding in threads, then the batch in the graph.

    Decoding and inference take turns (each with every core) rather than overlapping: on a small CPU two thread pools
    spinning at once slow each other down.
    """

    backend = "onnxruntime"

    def __init__(self, ckpt: str, device: str = "auto"):
        self.ckpt, self.device = ckpt, device
        self.clf: OnnxClassifier | None = None
        self.source = str(Path(ckpt).expanduser())
        self._load(None)

    def _load(self, threads: int | None) -> None:
        self.clf = load_onnx(self.ckpt, threads, self.device)
        self.class_names, self.temperature = self.clf.class_names, self.clf.temperature

    def settings(self, n_files: int, batch_size: int, workers: int | None, threads: int | None) -> tuple[int, int]:
        cores = os.cpu_count() or 1
        workers = (1 if n_files <= 1 else cores) if workers is None else int(workers)
        threads = int(threads or cores)
        if threads != cores:
            self._load(threads)
        return workers, threads

    def run(self, paths: list[Path], batch_size: int, workers: int, threads: int):
        from concurrent.futures import ThreadPoolExecutor

        height, width = self.clf.input_size
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for start in range(0, len(paths), batch_size):
                read = list(pool.map(lambda p: read_image(p, self.clf), paths[start:start + batch_size]))
                images = np.stack([x if x is not None else np.zeros((height, width, 3), np.uint8) for x, _ in read])
                yield self.clf.probs(images), [error for _, error in read]
