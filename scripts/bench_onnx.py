"""ONNX export of a finished run: parity with PyTorch on its whole test split, and throughput side by side.

    python scripts/bench_onnx.py --run logs/train/runs/default [--out logs/bench_onnx] [--repeats 7]

1. exports the run's best checkpoint as model.onnx, model.int8.onnx (static, calibrated on validation images) and a
   dynamic-int8 variant, timing each (`tl.export.export_model`, as every training run does);
2. parity on the test split: PyTorch (the run's evaluation transform) vs ONNX Runtime fp32 / int8 (PIL steps + graph):
   largest probability difference, top-1 agreement, test accuracy of each;
3. throughput, batch 64, the same images for every engine, at the run's resolution and at 224 px (the same weights
   exported at 224): PyTorch eager (fp32, NCHW, `inference_mode`), tl.predict's PyTorch path (BatchNorm folded,
   channels-last), ONNX Runtime fp32, int8 static, int8 dynamic; engines interleaved per repeat, best and median of
   the repeats reported, threads = the machine's cores for everyone.
Figures go to stdout and OUT/bench_onnx.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def best_ckpt(run: Path) -> Path:
    results = json.loads((run / "results.json").read_text())
    return Path(results.get("best_ckpt") or run / "checkpoints" / "last.ckpt")


def split_images(datamodule, split: str) -> tuple[list, np.ndarray]:
    dataset = datamodule.dataset(split, augmented=False)
    images = [dataset.load_image(i) for i in range(len(dataset))]
    targets = np.array([int(dataset.set.targets[j]) for j in dataset.indices])
    return images, targets


def timed(fn, repeats_inner: int) -> float:
    started = time.perf_counter()
    for _ in range(repeats_inner):
        fn()
    return (time.perf_counter() - started) / repeats_inner


def throughput(engines: dict, batch: int, repeats: int, inner: int) -> dict:
    """images/s of each engine on one batch, interleaved: each repeat runs every engine once (after one warm-up)."""
    for fn in engines.values():
        fn()
        fn()
    times: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(repeats):
        for name, fn in engines.items():
            times[name].append(timed(fn, inner))
    return {name: {"best": round(batch / min(t), 1), "median": round(batch / statistics.median(t), 1)}
            for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("logs/bench_onnx"))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()

    from omegaconf import OmegaConf

    from tl.data.datamodule import build_datamodule
    from tl.data.transforms import eval_transform
    from tl.evaluate import data_config
    from tl.export import export_model
    from tl.inference import load_module, optimize_for_inference
    from tl.onnx_export import build_onnx, eval_steps, quantize, session
    from tl.onnx_runtime import apply_steps

    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    ckpt = best_ckpt(args.run)
    module = load_module(ckpt).eval()
    preprocess = dict(module.hparams.preprocess)
    data, seed = data_config(OmegaConf.create({}), ckpt)
    datamodule = build_datamodule(data, preprocess, augment=None, seed=seed)
    datamodule.setup("fit")
    datamodule.setup("test")
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"run": str(args.run), "ckpt": str(ckpt), "model": module.hparams.name, "cores": cores,
                    "torch": torch.__version__}
    import onnxruntime

    report["onnxruntime"] = onnxruntime.__version__

    # 1. export as a training run does (fp32 + static int8), and dynamic int8 beside it
    export_dir = args.out / "export"
    started = time.perf_counter()
    export_model(module, export_dir, "all", {"parity_images": 64}, parity_data=datamodule)
    report["export_seconds_fp32_all_formats"] = round(time.perf_counter() - started, 2)
    started = time.perf_counter()
    export_model(module, export_dir, "all", {"parity_images": 64, "quantize": "static"}, parity_data=datamodule)
    report["export_seconds_with_static_int8"] = round(time.perf_counter() - started, 2)
    meta = json.loads((export_dir / "model.json").read_text())
    report["export_parity_val"] = meta["onnx"]["parity"]
    dynamic = args.out / "model.int8-dynamic.onnx"
    quantize(export_dir / "model.onnx", dynamic, "dynamic", np.zeros((0,)), args.out)

    # 2. parity on the whole test split
    images, targets = split_images(datamodule, "test")
    steps = meta["onnx"]["preprocess_steps"]
    uint8 = np.stack([apply_steps(img, steps) for img in images])
    transform = eval_transform(preprocess)
    x = torch.stack([transform(img) for img in images])
    temperature = float(module.temperature)
    with torch.inference_mode():
        reference = torch.cat([(module.model(x[i:i + 256]) / temperature).softmax(-1)
                               for i in range(0, len(x), 256)]).numpy()
    sessions = {"onnx_fp32": session(export_dir / "model.onnx", cores),
                "onnx_int8_static": session(export_dir / "model.int8.onnx", cores),
                "onnx_int8_dynamic": session(dynamic, cores)}
    parity = {"n_test": len(targets), "pytorch_test_acc": float((reference.argmax(1) == targets).mean())}
    for name, sess in sessions.items():
        got = np.concatenate([sess.run(["probs"], {"image": uint8[i:i + 256]})[0] for i in range(0, len(uint8), 256)])
        parity[name] = {"max_abs_prob_diff": float(np.abs(got - reference).max()),
                        "top1_agreement": float((got.argmax(1) == reference.argmax(1)).mean()),
                        "test_acc": float((got.argmax(1) == targets).mean())}
    report["parity_test"] = parity

    # 3. throughput: the run's resolution, then the same weights at 224 px
    report["throughput"] = {}
    for side in sorted({preprocess["input_size"][1], 224}):
        if side == preprocess["input_size"][1]:
            pre, files = preprocess, {"fp32": export_dir / "model.onnx", "int8_static": export_dir / "model.int8.onnx",
                                      "int8_dynamic": dynamic}
        else:  # the same weights exported at side x side (timm's convolutional models take any input size)
            pre = {**preprocess, "input_size": [3, side, side]}
            work = Path(tempfile.mkdtemp(dir=args.out))
            val_images = [datamodule.dataset("val", augmented=False).load_image(i) for i in range(32)]
            _, written = build_onnx([module.model], [temperature], pre, {"class_names": module.hparams.class_names},
                                    work, val_images, "val split", tolerance=1e-4, quantize_as="static",
                                    min_int8_agreement=0.0)  # speed only: 224 px is not what this model learned at
            files = {"fp32": work / "model.onnx", "int8_static": work / "model.int8.onnx",
                     "int8_dynamic": work / "dynamic.onnx"}
            quantize(files["fp32"], files["int8_dynamic"], "dynamic", np.zeros((0,)), work)
        side_steps = eval_steps(pre)
        picks = [images[i % len(images)] for i in range(args.batch)]
        batch_u8 = np.stack([apply_steps(img, side_steps) for img in picks])
        batch_x = torch.stack([eval_transform(pre)(img) for img in picks])
        eager = module.model.eval()
        folded = optimize_for_inference(module.model, pre["input_size"])
        batch_cl = batch_x.contiguous(memory_format=torch.channels_last)
        sess = {k: session(v, cores) for k, v in files.items()}

        def run_torch(model, inputs):
            def fn():
                with torch.inference_mode():
                    (model(inputs) / temperature).softmax(-1)
            return fn

        def run_ort(s, inputs=batch_u8):
            return lambda: s.run(["probs"], {"image": inputs})

        engines = {"pytorch_eager": run_torch(eager, batch_x), "pytorch_tl_optimized": run_torch(folded, batch_cl),
                   "onnx_fp32": run_ort(sess["fp32"]), "onnx_int8_static": run_ort(sess["int8_static"]),
                   "onnx_int8_dynamic": run_ort(sess["int8_dynamic"])}
        inner = 4 if side <= 96 else 1
        figures = throughput(engines, args.batch, args.repeats, inner)
        base = figures["pytorch_eager"]["median"]
        for name in figures:
            figures[name]["x_eager_median"] = round(figures[name]["median"] / base, 2)
        report["throughput"][f"{side}px"] = figures

    (args.out / "bench_onnx.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "throughput"}, indent=2))
    for side, figures in report["throughput"].items():
        print(f"\nbatch {args.batch}, {side}, {cores} cores: images/s (median of {args.repeats}; best)")
        for name, f in figures.items():
            print(f"  {name:22s} {f['median']:8.1f}  ({f['best']:8.1f})  x{f['x_eager_median']:.2f} eager")


if __name__ == "__main__":
    main()
