"""A trained classifier (or a snapshot ensemble) as one ONNX graph with its preprocessing, checked against PyTorch.

The graph's contract (also in its metadata and in model.json, `onnx`):
- input `image`: uint8, NHWC, RGB, 0-255, shape (batch, H, W, 3) with a dynamic batch; H x W is the model's input
  size, or `input_size` when the graph resizes itself (bilinear, antialiased);
- in the graph: NHWC -> NCHW, /255, (x - mean) / std (the backbone's own), the model(s), softmax(logits / T);
- outputs `logits` (N, C) and `probs` (N, C): probs = softmax(logits / T) with the calibration temperature T the run
  fitted; an ensemble outputs the mean of its members' calibrated softmaxes as `probs` and its log as `logits`;
- outside the graph, as `preprocess_steps`: decoding, the evaluation resize and centre crop (torchvision's, on a PIL
  image), which `tl.onnx_runtime.apply_steps` replays with PIL alone.

Export is checked before anything is written: the ONNX model (through ONNX Runtime, fed by `apply_steps`) and the
PyTorch model (fed by the training run's own evaluation transform) on the same real validation images; the largest
probability difference and the top-1 agreement go into the JSON, and above `tolerance` the export fails. Optional
int8 quantisation (`quantize`) gets its own figures.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from tl.errors import TLError
from tl.onnx_runtime import META_KEY, apply_steps

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
QUANTIZE_MODES = ("static", "dynamic")
# quantize=static: convolutions with their activations (Clip/Relu) and residual adds, pooling, linear layers; the
# scaling, normalisation and softmax stay in float. On EfficientNet-Lite0 (digits, test split) this set kept 99.6% of
# the fp32 answers at 1.5x ONNX Runtime fp32's speed; adding Mul and leaving out Clip/Relu cost speed (README).
QUANTIZED_OPS = ["Conv", "Clip", "Relu", "Add", "GlobalAveragePool", "Gemm", "MatMul"]
# quantize=dynamic: linear layers only (activation ranges per batch); dynamic convolutions (ConvInteger) changed
# 24-86% of the answers and ran at 0.04-0.07x fp32 here
INSTALL_HINT = "pip install onnx onnxruntime onnxscript"


def onnx_available() -> str | None:
    """None when ONNX export can run here, else what is missing (as an install hint)."""
    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    return f"{', '.join(missing)} not installed ({INSTALL_HINT})" if missing else None


def quantize_mode(value) -> str | None:
    """`quantize=false|true|static|dynamic` -> None, 'static' or 'dynamic' (true means static: see the README)."""
    if value in (None, False, "false", "none"):
        return None
    if value is True or value == "true":
        return "static"
    if value in QUANTIZE_MODES:
        return str(value)
    raise TLError(f"quantize={value!r} is not a choice: use false, true (static int8, calibrated on validation "
                  "images), static or dynamic")


# -- preprocessing: what stays outside the graph ---------------------------------------------------------------
def eval_steps(preprocess: dict) -> list[dict]:
    """The evaluation transform's geometric steps (before ToTensor), read off the transform the training run used."""
    from timm.data.transforms import MaybeToTensor, ResizeKeepRatio
    from torchvision import transforms as T

    from tl.data.transforms import eval_transform

    steps: list[dict] = []
    for step in eval_transform(preprocess).transforms:
        if isinstance(step, T.Resize):
            size = step.size if isinstance(step.size, int) else [int(s) for s in step.size]
            steps.append({"op": "resize", "size": size, "interpolation": step.interpolation.value,
                          "max_size": step.max_size})
        elif isinstance(step, ResizeKeepRatio) and not (step.random_scale_prob or step.random_aspect_prob) \
                and not isinstance(step.interpolation, (list, tuple)):
            steps.append({"op": "resize_keep_ratio", "size": [int(s) for s in step.size],
                          "interpolation": step.interpolation.value, "longest": float(step.longest)})
        elif isinstance(step, T.CenterCrop):
            steps.append({"op": "center_crop", "size": [int(s) for s in step.size]})
        elif isinstance(step, (MaybeToTensor, T.ToTensor)):
            break  # from here on the graph takes over (scaling, then Normalize)
        else:
            raise TLError(f"the evaluation transform has a step ONNX export cannot describe ({step!r}): export "
                          f"format=safetensors, or use a preprocessing with crop_mode=center")
    return steps


class ExportGraph(nn.Module):
    """uint8 NHWC RGB images -> (logits, probs): the scaling and normalisation, the member models, the temperatures.

    `resize_to` (H, W): resize the input to the model's size inside the graph (bilinear, antialiased).
    """

    def __init__(self, models: Sequence[nn.Module], preprocess: dict, temperatures: Sequence[float],
                 resize_to: Sequence[int] | None = None):
        super().__init__()
        self.members = nn.ModuleList(models)
        self.register_buffer("mean", torch.tensor(preprocess["mean"], dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(preprocess["std"], dtype=torch.float32).view(1, 3, 1, 1))
        self.temperatures = [float(t) for t in temperatures]
        self.resize_to = [int(s) for s in resize_to] if resize_to else None

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = image.permute(0, 3, 1, 2).float()
        if self.resize_to is not None:
            x = F.interpolate(x, size=self.resize_to, mode="bilinear", align_corners=False, antialias=True)
        x = (x / 255.0 - self.mean) / self.std  # ToTensor, then Normalize: the order the PyTorch pipeline uses
        if len(self.members) == 1:
            logits = self.members[0](x)
            return logits, (logits / self.temperatures[0]).softmax(dim=-1)
        probs = torch.stack([(m(x) / t).softmax(dim=-1) for m, t in zip(self.members, self.temperatures,
                                                                         strict=True)]).mean(dim=0)
        return probs.clamp_min(1e-30).log(), probs


EXPORTERS = ("auto", "dynamo", "torchscript")


def trace_to_onnx(graph: ExportGraph, height: int, width: int, opset: int,
                  exporter: str = "auto") -> tuple[object, str]:
    """The ONNX ModelProto of `graph` with a dynamic batch axis, and which exporter made it.

    `auto`: torch.export (the `dynamo` exporter, torch's supported one; ~5 s for EfficientNet-Lite0 here) first, and a
    model it cannot capture falls back to the TorchScript exporter (deprecated by torch, ~1 s). `dynamo` or
    `torchscript`: that one only.
    """
    import onnx

    for name in ("onnx_ir", "onnxscript", "torch.onnx", "torch.export", "torch._dynamo"):  # their INFO is not ours
        logging.getLogger(name).setLevel(logging.WARNING)
    example = torch.randint(0, 256, (2, height, width, 3), dtype=torch.uint8)
    names = {"input_names": ["image"], "output_names": ["logits", "probs"]}
    errors = []
    if exporter in ("auto", "dynamo") and importlib.util.find_spec("onnxscript") is None:
        errors.append("dynamo: onnxscript not installed")
    elif exporter in ("auto", "dynamo"):
        try:
            with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                program = torch.onnx.export(graph, (example,), dynamo=True, external_data=False, opset_version=opset,
                                            dynamic_shapes={"image": {0: torch.export.Dim("batch", min=1)}},
                                            verbose=False, **names)
            return program.model_proto, "dynamo"
        except Exception as e:  # noqa: BLE001 - torch.export raises many kinds for graphs it cannot capture
            errors.append(f"dynamo: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}")
            log.warning("torch.export could not capture the model (%s); trying the TorchScript exporter", errors[-1])
    if exporter == "dynamo":
        raise TLError(f"the model could not be exported to ONNX ({'; '.join(errors)}): try onnx.exporter=torchscript, "
                      "or export format=safetensors")
    buffer = io.BytesIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(graph, (example,), buffer, dynamo=False, opset_version=min(opset, 17),
                              dynamic_axes={k: {0: "batch"} for k in ("image", "logits", "probs")}, **names)
    except Exception as e:  # noqa: BLE001
        errors.append(f"torchscript: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}")
        hint = ("onnx.input_size needs the dynamo exporter (onnx.exporter=auto, with onnxscript installed), or drop it"
                if graph.resize_to is not None else "export format=safetensors instead")
        raise TLError(f"the model could not be exported to ONNX ({'; '.join(errors)}): {hint}") from None
    return onnx.load_from_string(buffer.getvalue()), "torchscript"


def save_with_meta(proto, path: Path, meta: dict) -> None:
    """Write `proto` to `path` with the export's JSON in its metadata (`META_KEY`)."""
    import onnx

    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps(meta)
    proto.producer_name = "tl"
    onnx.save_model(proto, str(path))


def session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_session(sess, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    return np.concatenate([sess.run(["probs"], {"image": images[i:i + batch_size]})[0]
                           for i in range(0, len(images), batch_size)])


# -- parity ----------------------------------------------------------------------------------------------------
def reference_probs(graph: ExportGraph, pil_images: list[Image.Image], uint8_images: np.ndarray, preprocess: dict,
                    batch_size: int = 64) -> np.ndarray:
    """PyTorch's probabilities for the parity images: the members on the run's own evaluation transform (or, when the
    graph resizes its input itself, the PyTorch graph on the same uint8 batch)."""
    from tl.data.transforms import eval_transform
    from tl.inference import member_logits, probs_from_logits

    out = []
    with torch.inference_mode():
        if graph.resize_to is not None:
            for i in range(0, len(uint8_images), batch_size):
                out.append(graph(torch.from_numpy(uint8_images[i:i + batch_size]))[1])
        else:
            transform = eval_transform(preprocess)
            for i in range(0, len(pil_images), batch_size):
                x = torch.stack([transform(img) for img in pil_images[i:i + batch_size]])
                out.append(probs_from_logits(member_logits(list(graph.members), x), graph.temperatures).mean(0))
    return torch.cat(out).float().numpy()


def parity(reference: np.ndarray, got: np.ndarray) -> dict:
    return {"images": int(len(reference)),
            "max_abs_prob_diff": float(np.abs(reference - got).max()) if len(reference) else 0.0,
            "top1_agreement": float((reference.argmax(1) == got.argmax(1)).mean()) if len(reference) else 1.0}


def quantize(fp32: Path, out: Path, mode: str, images: np.ndarray, work: Path) -> None:
    """int8 weights (and, `static`, activations calibrated on `images`) for `fp32`, written to `out`.

    `static` (QDQ, per-channel weights, activations calibrated by min/max on the validation images) runs as integer
    convolutions in ONNX Runtime; `dynamic` quantises the linear layers' weights (MatMul/Gemm: transformer
    backbones) and computes activation ranges per batch: for a convolution network it changes little (README,
    "Deploying"). The softmax stays in float.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self, batch_size: int = 16):
            self.batches = iter([{"image": images[i:i + batch_size]} for i in range(0, len(images), batch_size)])

        def get_next(self):
            return next(self.batches, None)

    root = logging.getLogger()  # the quantiser logs its tips with logging.warning (the root logger)
    level = root.level
    try:
        root.setLevel(logging.ERROR)
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if mode == "dynamic":
                quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8, per_channel=True,
                                 op_types_to_quantize=["MatMul", "Gemm"])
                return
            prepared = work / "prepared.onnx"
            quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
            quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            op_types_to_quantize=QUANTIZED_OPS)
    finally:
        root.setLevel(level)


# -- the whole export ------------------------------------------------------------------------------------------
def build_onnx(models: Sequence[nn.Module], temperatures: Sequence[float], preprocess: dict, meta: dict,
               work: Path, images: list[Image.Image], images_from: str, tolerance: float = 1e-4,
               quantize_as: str | None = None, min_int8_agreement: float = 0.97,
               input_size: Sequence[int] | None = None, opset: int = 18,
               exporter: str = "auto") -> tuple[dict, list[tuple[Path, str]]]:
    """Export, check and (optionally) quantise in `work` (a scratch folder beside the destination).

    Returns the JSON section `onnx` and the files to move into place [(scratch file, final name)]. Nothing is moved
    here: on any failure the destination keeps what it had.
    """
    started = time.perf_counter()
    height, width = preprocess["input_size"][1:]
    models = [m.eval() for m in models]
    if input_size is not None:
        log.warning("onnx.input_size=%s: the graph resizes its input without the evaluation crop; its answers can "
                    "differ from the PyTorch path's (parity is checked against the same graph in PyTorch)",
                    list(input_size))
        input_size = [int(s) for s in input_size]
        if len(input_size) != 2 or min(input_size) < 1:
            raise TLError(f"input_size={list(input_size)!r} is not [H, W] in pixels: give e.g. input_size=[256,256] "
                          "or null")
        steps = [{"op": "resize", "size": input_size, "interpolation": "bilinear", "max_size": None}]
    else:
        steps = eval_steps(preprocess)
    graph = ExportGraph(models, preprocess, temperatures, resize_to=(height, width) if input_size else None).eval()
    in_h, in_w = input_size or (height, width)
    section = {
        "file": ONNX_FILE,
        "input": {"name": "image", "dtype": "uint8", "layout": "NHWC", "color": "RGB", "range": [0, 255],
                  "shape": ["batch", in_h, in_w, 3]},
        "outputs": {"logits": "(batch, classes): the model's logits (an ensemble: log of its mean probabilities)",
                    "probs": "(batch, classes): softmax(logits / calibration temperature); an ensemble: the mean of "
                             "its members' calibrated softmaxes"},
        "preprocess_steps": steps,
        "in_graph": (["resize to the model's input size (bilinear, antialiased)"] if input_size else []) + [
            "NHWC -> NCHW", "x / 255", f"(x - mean) / std, mean={preprocess['mean']}, std={preprocess['std']}",
            "softmax(logits / temperature)"],
        "temperatures": [float(t) for t in temperatures],
        "members": len(models),
        "opset": opset,
    }
    with torch.inference_mode(False), torch.no_grad():
        proto, section["exporter"] = trace_to_onnx(graph, in_h, in_w, opset, exporter)
    fp32 = work / ONNX_FILE
    full_meta = {**meta, "onnx": section}
    save_with_meta(proto, fp32, full_meta)

    uint8 = np.stack([apply_steps(img, steps) for img in images]) if images else \
        np.zeros((0, in_h, in_w, 3), np.uint8)
    reference = reference_probs(graph, images, uint8, preprocess)
    check = parity(reference, run_session(session(fp32), uint8))
    section["parity"] = {**check, "inputs": images_from, "tolerance": tolerance,
                         "against": "PyTorch on the run's evaluation transform" if not input_size
                         else "the same graph in PyTorch"}
    if not check["max_abs_prob_diff"] <= tolerance:  # (a top-1 flip within the tolerance is a tie, not an error)
        raise TLError(f"ONNX parity check failed on {check['images']} {images_from} images: max |p_onnx - p_torch| = "
                      f"{check['max_abs_prob_diff']:.2e} (tolerance {tolerance:g}), top-1 agreement "
                      f"{check['top1_agreement']:.2%}; no ONNX file was written: export format=safetensors, or report "
                      f"it with the model name ({meta.get('name')})")
    files = [(fp32, ONNX_FILE)]
    if quantize_as:
        q_started = time.perf_counter()
        int8 = work / INT8_FILE
        quantize(fp32, int8, quantize_as, uint8, work)
        q_check = parity(reference, run_session(session(int8), uint8))
        section["int8"] = {"file": INT8_FILE, "mode": quantize_as, "calibration_images": len(uint8)
                           if quantize_as == "static" else 0,
                           "parity": {**q_check, "inputs": images_from, "min_top1_agreement": min_int8_agreement},
                           "seconds": round(time.perf_counter() - q_started, 2)}
        if q_check["top1_agreement"] < min_int8_agreement:
            raise TLError(f"int8 quantisation ({quantize_as}) changed the top-1 answer on "
                          f"{1 - q_check['top1_agreement']:.1%} of {q_check['images']} {images_from} images (allowed "
                          f"{1 - min_int8_agreement:.1%}); no ONNX file was written: " + (
                              "export with onnx.quantize=static (calibrated), or without quantize"
                              if quantize_as == "dynamic" else
                              "export without quantize, or calibrate on more validation images (onnx.parity_images)"))
        import onnx

        save_with_meta(onnx.load(str(int8)), int8, {**full_meta, "onnx": {**section, "file": INT8_FILE}})
        files.append((int8, INT8_FILE))
    section["seconds"] = round(time.perf_counter() - started, 2)
    save_with_meta(proto, fp32, {**meta, "onnx": section})  # with its parity figures; the graph is unchanged
    return section, files


def parity_images_from(datamodule, n: int) -> tuple[list[Image.Image], str]:
    """Up to `n` real images, spread evenly over the validation split (else test, else train), as RGB PIL images."""
    for split in ("val", "test", "train"):
        try:
            dataset = datamodule.dataset(split, augmented=False)
        except Exception:  # noqa: BLE001 - a split this data does not have
            continue
        if len(dataset) == 0:
            continue
        picks = sorted(set(np.linspace(0, len(dataset) - 1, min(n, len(dataset))).round().astype(int).tolist()))
        images = []
        for i in picks:
            try:
                images.append(dataset.load_image(i))
            except Exception:  # noqa: BLE001 - a file unreadable since the scan: the others still check
                continue
        if images:
            return images, split
    return [], "no"


def synthetic_images(n: int, height: int, width: int, seed: int = 0) -> list[Image.Image]:
    """Stand-in parity images (smooth colour fields plus noise) for when the run's data cannot be reached."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    images = []
    for _ in range(n):
        a = rng.uniform(0, 6, size=(3, 2))
        field = 127.5 + 100 * np.sin(a[:, :1, None] * xx + a[:, 1:, None] * yy)
        noise = rng.normal(0, 20, size=(3, height, width))
        images.append(Image.fromarray(np.clip(field + noise, 0, 255).astype(np.uint8).transpose(1, 2, 0)))
    return images
