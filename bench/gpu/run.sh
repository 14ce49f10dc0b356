#!/usr/bin/env bash
# Run THERE, on the GPU machine, through the device tool (carry [".gpu"], after
# bench/gpu/fetch_wheels.sh here). One part per call, each well inside the 10-minute limit:
#   bash bench/gpu/run.sh check     # imports, bitsandbytes on the GPU, and one short speed row (a minute)
#   bash bench/gpu/run.sh speed     # train_speed.py: batch 1/4/8 x fp16/bf16, AdamW8bit and fused AdamW, --sync-debug
#   bash bench/gpu/run.sh options   # channels_last, torch.compile, gradient checkpointing (batch 1 and 8, bf16),
#                                   # and the fused LoRA forms of bench/lora_layer.py
#   bash bench/gpu/run.sh e2e       # the tutorial's job end to end, LR probe timing, sample-image cost
#   bash bench/gpu/run.sh webui     # the WebUI backbone (ldm U-Net, in place) against the diffusers one
# Tables and JSON go to $OUT (they come back); copy the figures into docs/BENCHMARKS.md.
set -uo pipefail
part=${1:?part: check, speed, options, e2e or webui}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl \
    || exit 1
cp -r .gpu/site/. /tmp/site/
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
log() { echo "### $*" | tee -a "$OUT/$part.txt"; }
run() { log "$*"; "$@" 2>&1 | tee -a "$OUT/$part.txt"; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; date -u; \
  python3 -c 'import torch, diffusers, transformers; print(torch.__version__, diffusers.__version__, transformers.__version__)'; } \
    2>&1 | tee "$OUT/$part.txt"
case "$part" in
  check)
    run python3 -c 'import lib_lora.training.run, lib_lora.training.sample, dadaptation, prodigyopt, ldm.modules.diffusionmodules.openaimodel
from lib_lora.training.optim import bnb_adamw8bit_works
print("AdamW8bit on cuda:", bnb_adamw8bit_works("cuda") if __import__("torch").cuda.is_available() else "no GPU")'
    if python3 -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
      run python3 bench/train_speed.py --batches 1 --precisions bf16 --steps 5 --warmup 3
    fi ;;
  speed)
    run python3 bench/train_speed.py --sync-debug --json "$OUT/speed_adamw8bit.json"
    run python3 bench/train_speed.py --optimizer adamw --sync-debug --json "$OUT/speed_adamw.json" ;;
  options)
    run python3 bench/train_speed.py --optimizer adamw --batches 1 8 --precisions bf16 --channels-last --json "$OUT/cl.json"
    run python3 bench/train_speed.py --optimizer adamw --batches 1 8 --precisions bf16 --gradient-checkpointing --json "$OUT/gc.json"
    run python3 bench/train_speed.py --optimizer adamw --batches 1 8 --precisions bf16 --compile --warmup 10 --json "$OUT/compile.json"
    run python3 bench/lora_layer.py --device cuda --dtype bf16 --json "$OUT/lora_layer.json" ;;
  e2e)
    run python3 bench/e2e.py --base-model sd15-random --json "$OUT/e2e.json"
    run python3 bench/lr_probe.py --model sd15-random --device cuda --resolution 512 --mixed-precision fp16
    run python3 bench/sample_time.py --full --device cuda --dtype fp16 --resolution 512 ;;
  webui)
    run python3 bench/webui_backbone.py --size full --device cuda --dtype fp16 --resolution 512 --steps 300 ;;
  *) echo "unknown part $part"; exit 2 ;;
esac
