#!/usr/bin/env bash
# One prepared accelerator check (not part of CI): prune SmolLM2-135M and a synthetic 7B-width checkpoint on CUDA in
# bfloat16, in memory and streaming; print wall time, peak torch.cuda.max_memory_allocated and perplexity per run.
# Run from the repository root on a machine with a GPU and the project's dependencies:
#   PYTHONUNBUFFERED=1 bash scripts/gpu_check.sh 2>&1 | tee gpu_check.log
# Needs models/smollm2-135m-hf (python scripts/demo_model.py models/smollm2-135m --hf models/smollm2-135m-hf) and
# ../shared/data; the synthetic checkpoint (hidden 4096, 8 layers, random weights) is written on the first run.
set -euo pipefail
PY=${PYTHON:-python3}
export PYTHONPATH=${PYTHONPATH:-}:$PWD
DATA=${DATA:-../shared/data}
OUT=${OUT_DIR:-gpu-check-out}
mkdir -p "$OUT"
$PY - <<'PY'
import sys; sys.path.insert(0, "scripts")
from pathlib import Path
from _runs import synthetic_llama
synthetic_llama(Path("models/synthetic-llama-h4096-l8"), 4096, 11008, 8, Path("models/smollm2-135m-hf"))
PY
run() {  # name model method extra-overrides...
  local name=$1 model=$2 method=$3; shift 3
  $PY -m statprune_cli prune configs/smollm2-135m-statprune-50.yaml --overwrite -o "$OUT/$name" --json --quiet \
    --set model.name_or_path="$model" --set model.gguf_file=null --set model.dtype=bfloat16 --set runtime.device=cuda \
    --set pruning.method="$method" --set calibration.nsamples=128 --set calibration.seqlen=2048 --set eval.seqlen=2048 \
    --set "eval.datasets=[{dataset: wikitext2, data_files: '$DATA/wikitext-2-raw', split: test}]" "$@" > "$OUT/$name.json"
  $PY -c "import json,sys; r=json.load(open(sys.argv[1])); p=r['perplexity'][0]['perplexity'] if r['perplexity'] else None; \
print(f\"{sys.argv[2]:<28} prune {r['timings']['prune']:8.1f}s  cuda max {r['memory']['cuda_max_allocated_mib']:9.0f} MiB  \
RSS {r['memory']['peak_rss_mib']:7.0f} MiB  ppl {p}\")" "$OUT/$name.json" "$name"
}
for m in wanda sparsegpt statprune; do
  run "smollm2-$m" models/smollm2-135m-hf $m
  # activations in pinned host memory on the copy stream: the same perplexity as on the device
  run "smollm2-$m-offload" models/smollm2-135m-hf $m --set runtime.offload_activations=cpu
  run "smollm2-$m-stream" models/smollm2-135m-hf $m --set runtime.streaming=true --set runtime.offload_activations=true
done
for m in wanda sparsegpt statprune; do
  run "wide-$m-stream" models/synthetic-llama-h4096-l8 $m --set runtime.streaming=true --set runtime.offload_activations=true \
    --set "eval.datasets=[]"
done
