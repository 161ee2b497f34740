#!/usr/bin/env bash
# GPU checks in one call: training throughput against timm's own loop and benchmark.py (bf16, fp32, channels_last),
# tl's end-to-end path on a GPU (the default run, auto on a real folder, predict/evaluate on cuda, the DDP strategy on
# CUDA/NCCL, a run from LitData shards), and the shard loader against what the GPU consumes.
#
#   bash scripts/gpu_checks.sh [SECTION ...]       # sections: env throughput e2e ddp shards (default: all)
#
# Environment: OUT (where logs and JSON go; default logs/gpu), DATA (a folder holding the image folders of
# scripts/make_datasets.py; default: built with it, which needs the Debian font packages), TIMM_BENCHMARK
# (benchmark.py of a pytorch-image-models checkout: a third throughput reference), STEPS (timed steps per throughput
# figure; default 40), BATCH (their batch size; default 128), EXTRA (overrides added to every tl.train, split at
# spaces). Each section runs under a time limit, so a hang costs one section, not the whole call.
# Without a CUDA GPU it still runs (the throughput figures then only show that the scripts work).
set -u
OUT=$(realpath -m "${OUT:-$(dirname "$0")/../logs/gpu}")  # relative to where it is called from
cd "$(dirname "$0")/.."
RUNS=${RUNS:-/tmp/tl_gpu_runs}
STEPS=${STEPS:-40}
BATCH=${BATCH:-128}
read -r -a EXTRA <<<"${EXTRA:-}"  # overrides appended to every tl.train (a quick smoke test: trainer.max_epochs=1 ...)
mkdir -p "$OUT" "$RUNS"
export PYTHONUNBUFFERED=1 HYDRA_FULL_ERROR=0
PY=${PYTHON:-python3}
LOG="$OUT/gpu_checks.log"
: >"$LOG"; : >"$OUT/timings.txt"  # this call's figures only
SECTIONS=${*:-env throughput e2e ddp shards}
CUDA=$($PY -c "import torch; print(int(torch.cuda.is_available()))")
GPU_TRAINER=$([ "$CUDA" = 1 ] && echo "trainer=gpu" || echo "trainer=cpu")

say() { echo "== $* ($(date +%T))" | tee -a "$LOG"; }
timed() {  # timed LIMIT NAME CMD...: run under a time limit, log it, record its wall time and exit code
  local limit=$1 name=$2; shift 2
  local t0; t0=$(date +%s%N)
  timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  local ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  printf '%-28s rc=%-3s %5d.%d s\n' "$name" "$rc" $((ms / 1000)) $((ms % 1000 / 100)) | tee -a "$LOG" "$OUT/timings.txt"
  return $rc
}

if [ -z "${DATA:-}" ]; then
  DATA=$RUNS/datasets
  [ -d "$DATA/fonts" ] || $PY scripts/make_datasets.py --out "$DATA" >>"$LOG" 2>&1
fi

for section in $SECTIONS; do
  case $section in
  env)
    say env
    (nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv || true) 2>&1 \
      | tee -a "$LOG"
    $PY -c "import torch, timm, pytorch_lightning as pl, hydra, litdata, sys; print('python', sys.version.split()[0],
'torch', torch.__version__, 'cuda', torch.version.cuda, 'timm', timm.__version__, 'lightning', pl.__version__,
'hydra', hydra.__version__, 'litdata', litdata.__version__, 'cores', __import__('os').cpu_count())" 2>&1 | tee -a "$LOG"
    ;;
  throughput)
    say "throughput: tl (Lightning) vs timm's train loop vs timm's benchmark.py, batch $BATCH, 224 px"
    bench=()
    [ -n "${TIMM_BENCHMARK:-}" ] && bench=(--timm-benchmark "$TIMM_BENCHMARK")
    common=(--models efficientnet_lite0 resnet50 --batch-size "$BATCH" --steps "$STEPS" --warmup 10)
    timed 180 throughput_bf16_cl $PY scripts/bench_throughput.py "${common[@]}" "${bench[@]}" \
      --precision bf16-mixed --out "$OUT/throughput_bf16_cl.json"
    timed 120 throughput_bf16 $PY scripts/bench_throughput.py "${common[@]}" --precision bf16-mixed \
      --no-channels-last --out "$OUT/throughput_bf16.json"
    timed 120 throughput_fp32_cl $PY scripts/bench_throughput.py "${common[@]}" --precision 32-true \
      --out "$OUT/throughput_fp32_cl.json"
    grep -E "images/s|tl / timm" "$LOG" | tail -n 40
    ;;
  e2e)
    say "end to end on $GPU_TRAINER"
    timed 180 train_digits_default $PY -m tl.train $GPU_TRAINER hydra.run.dir="$RUNS/digits" overwrite=true \
      callbacks.progress=null trainer.enable_progress_bar=false "${EXTRA[@]}"
    timed 180 train_fonts_auto $PY -m tl.train $GPU_TRAINER data=imagefolder data.root="$DATA/fonts" \
      hydra.run.dir="$RUNS/fonts" overwrite=true callbacks.progress=null trainer.enable_progress_bar=false "${EXTRA[@]}"
    timed 60 predict_cuda $PY -m tl.predict ckpt="$RUNS/fonts" inputs="$DATA/fonts/test" \
      device="$([ "$CUDA" = 1 ] && echo cuda || echo cpu)" output="$RUNS/fonts_predict.csv" \
      hydra.run.dir="$RUNS/fonts_predict"
    timed 60 evaluate_cuda $PY -m tl.evaluate ckpt="$RUNS/fonts" \
      device="$([ "$CUDA" = 1 ] && echo cuda || echo cpu)" hydra.run.dir="$RUNS/fonts_evaluate"
    ;;
  ddp)
    say "DDP strategy on $([ "$CUDA" = 1 ] && echo "CUDA (NCCL), every visible GPU" || echo "CPU (gloo), 2 processes")"
    ddp=(trainer=ddp)
    [ "$CUDA" = 1 ] && ddp+=(trainer.precision=bf16-mixed) || ddp+=(trainer.accelerator=cpu trainer.devices=2)
    timed 150 train_digits_ddp $PY -m tl.train "${ddp[@]}" scenario=large_different hydra.run.dir="$RUNS/ddp" \
      overwrite=true callbacks.progress=null trainer.enable_progress_bar=false "${EXTRA[@]}"
    ;;
  shards)
    say "shards: convert, train from them, loader vs folder vs the model on this machine's accelerator"
    timed 60 shard_fonts $PY -m tl.shard data=imagefolder data.root="$DATA/fonts" output="$RUNS/fonts_shards" \
      hydra.run.dir="$RUNS/fonts_shard_run"
    timed 150 train_fonts_shards $PY -m tl.train $GPU_TRAINER data=shards data.root="$RUNS/fonts_shards" \
      scenario=small_different hydra.run.dir="$RUNS/fonts_from_shards" overwrite=true callbacks.progress=null \
      trainer.enable_progress_bar=false "${EXTRA[@]}"
    timed 150 bench_shards $PY scripts/bench_shards.py --work "$RUNS/bench_shards" --sizes 10000 --repeats 2 \
      --model-device auto --json "$OUT/shards.json"
    ;;
  *) echo "unknown section $section (env throughput e2e ddp shards)"; exit 2 ;;
  esac
done

say summary
$PY - "$RUNS" "$OUT" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys
from pathlib import Path
runs, out = Path(sys.argv[1]), Path(sys.argv[2])
keep = ("scenario", "accelerator", "precision", "devices", "n_train", "image_size", "epochs_run", "test/acc",
        "val/acc", "test/ece", "fit_seconds", "total_seconds", "delivered")
summary = {}
for name in ("digits", "fonts", "ddp", "fonts_from_shards"):
    f = runs / name / "results.json"
    if f.is_file():
        r = json.loads(f.read_text())
        summary[name] = {k: r[k] for k in r if k in keep or k.startswith("timing") or k.startswith("time")}
        print(name, json.dumps(summary[name]))
for name in ("fonts_predict.csv",):
    f = runs / name
    if f.is_file():
        rows = f.read_text().splitlines()
        print(name, len(rows) - 1, "rows")
(out / "e2e.json").write_text(json.dumps(summary, indent=1))
EOF
[ -s "$OUT/timings.txt" ] && cat "$OUT/timings.txt"
