"""Training steps in float32 against bfloat16 autocast on this machine's CPU, side by side.

    python scripts/bench_precision.py                          # efficientnet_lite0 at 64 and 224 px
    python scripts/bench_precision.py --models efficientnet_lite0 resnet50 --rounds 12

For each model and side: two copies of the same timm model (channels_last, AdamW, full fine-tuning), one trained in
float32 and one under `torch.autocast("cpu", dtype=torch.bfloat16)` (what `trainer.precision=bf16-mixed` does on
the CPU), on the same random batch. Steps alternate between the two, one at a time, so that the machine's drift hits
both alike; the figure is the median step of each and their ratio (> 1: bfloat16 is faster). The report names
whether the CPU has AMX bf16 tiles (Xeon 4th generation and later), where oneDNN runs bf16 1x1 convolutions and
matrix products on them; depthwise convolutions have no such path. This decided `trainer.precision`'s default on the
CPU (README, "Precision on the CPU").
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import timm
import torch
from benchlib import machine, write_report


def amx_bf16() -> bool:
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(probe()) if probe is not None else "amx_bf16" in open("/proc/cpuinfo").read()
    except Exception:  # noqa: BLE001
        return False


def compare(name: str, side: int, batch: int, rounds: int) -> dict:
    torch.manual_seed(0)
    runners = {}
    for bf16 in (False, True):
        model = timm.create_model(name, num_classes=10).to(memory_format=torch.channels_last).train()
        runners[bf16] = (model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    x = torch.randn(batch, 3, side, side).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))

    def step(bf16: bool) -> float:
        model, opt = runners[bf16]
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return time.perf_counter() - started

    for bf16 in (False, True):  # warm-up: kernel selection, allocation
        step(bf16), step(bf16)
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(rounds):
        for bf16 in (False, True):
            times[bf16].append(step(bf16))
    fp32, bf16 = statistics.median(times[False]), statistics.median(times[True])
    return {"model": name, "side": side, "batch": batch, "fp32_img_s": round(batch / fp32, 1),
            "bf16_img_s": round(batch / bf16, 1), "bf16_vs_fp32": round(fp32 / bf16, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["efficientnet_lite0"])
    ap.add_argument("--sides", type=int, nargs="+", default=[64, 224])
    ap.add_argument("--rounds", type=int, default=8, help="timed steps per precision, alternated")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()
    if args.rounds < 1 or any(s < 16 for s in args.sides):
        ap.error("--rounds must be >= 1 and every side >= 16")
    report = {"machine": machine(), "amx_bf16": amx_bf16(), "threads": torch.get_num_threads(), "results": []}
    print(f"CPU AMX bf16 tiles: {report['amx_bf16']}; {report['threads']} torch threads")
    for name in args.models:
        for side in args.sides:
            r = compare(name, side, 64 if side <= 96 else 32, args.rounds)
            report["results"].append(r)
            print(f"{name} {side} px, batch {r['batch']}: float32 {r['fp32_img_s']} img/s, bf16 autocast "
                  f"{r['bf16_img_s']} img/s: {r['bf16_vs_fp32']}x", flush=True)
    write_report(args.out, report)


if __name__ == "__main__":
    main()
