"""`python -m tl.export ckpt=PATH [output=DIR]`: a trained model as plain files, usable without tl's training code.

The directory holds `model.safetensors` (the timm model's state dict: tensors only, no pickle) and `model.json`
(timm model name, number of classes, class names, preprocessing, drop rates, and the calibration temperature T where
the run fitted one: probabilities are softmax(logits / T)). To rebuild it anywhere:

    model = timm.create_model(meta["name"], num_classes=meta["num_classes"])
    model.load_state_dict(safetensors.torch.load_file("model.safetensors"))

`python -m tl.predict ckpt=DIR` reads it directly (`tl.inference.load_export`).
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
from omegaconf import DictConfig
from torch import nn

from tl.checks import EXPORT_RULES, check_rules
from tl.cli import launch
from tl.errors import TLError
from tl.inference import EXPORT_CONFIG, EXPORT_WEIGHTS, load_module, run_dir_of
from tl.utils import atomic_path, atomic_write_text, check_required, ensure_writable, user_errors

FORMAT = "tl-export/1"


def export_model(module: nn.Module, out_dir: str | Path) -> Path:
    """Write `module`'s timm model (a `TransferModule`) to `out_dir` as model.safetensors + model.json; return it."""
    from safetensors.torch import save_file

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
    # everything is known before either file is written: the pair is never half old, half new for a bad model
    out_dir = ensure_writable(Path(out_dir))
    # safetensors wants contiguous tensors that share no memory: plain detached copies
    state = {k: v.detach().cpu().contiguous().clone() for k, v in module.model.state_dict().items()}
    with atomic_path(out_dir / EXPORT_WEIGHTS) as tmp:
        save_file(state, str(tmp), metadata={"format": FORMAT, "name": hp.name})
    atomic_write_text(out_dir / EXPORT_CONFIG, json.dumps(meta, indent=2) + "\n")
    return out_dir


def export(cfg: DictConfig) -> Path:
    """Export the checkpoint `cfg.ckpt` to `cfg.output` (default: RUN/export beside the training run)."""
    check_required(cfg)
    check_rules(cfg, EXPORT_RULES)
    if cfg.get("output") and Path(cfg.output).expanduser().is_file():
        raise TLError(f"output={cfg.output!r} is a file: give a folder for model.safetensors and model.json")
    ckpt = Path(cfg.ckpt).expanduser()
    module = load_module(ckpt)
    run_dir = run_dir_of(ckpt)
    output = cfg.get("output") or (run_dir / "export" if run_dir else Path(cfg.paths.output_dir) / "export")
    out_dir = export_model(module, output)
    print(f"tl.export: {ckpt} -> {out_dir} ({EXPORT_WEIGHTS}, {EXPORT_CONFIG})")
    return out_dir


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
@user_errors
def _hydra_main(cfg: DictConfig) -> None:
    export(cfg)


def main() -> None:
    launch(_hydra_main, "export")


if __name__ == "__main__":
    main()
