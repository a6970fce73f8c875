#!/usr/bin/env bash
# One prepared accelerator check (not part of CI), in phases that each fit one short device call:
#   wide     a synthetic Llama checkpoint of 7B width (hidden 4096, intermediate 11008, 4 layers, random weights) on
#            CUDA in bfloat16: wall time and peak memory of wanda, sparsegpt and statprune, and statprune streamed from
#            the checkpoint with offloaded activations, whose pruned weights must equal the in-memory run's.
#   smollm2  SmolLM2-135M on CUDA in bfloat16: wanda, sparsegpt and statprune in memory, statprune and sparsegpt with activations
#            offloaded (pinned memory, copy stream) and streamed; the weights of each variant compared with the
#            in-memory run's; statprune at 2:4 (the sketched update, LSA, the residual permutation on CUDA).
#   owl      SmolLM2-135M in float32: the OWL layer profile at 70% against uniform, per calibration seed (OWL_SEEDS,
#            default 0,1,2) and method (OWL_METHODS, default all five), with each method's M and lambda or over a grid
#            (OWL_GRID, e.g. "m=3;lam=0.04 m=5;lam=0.08"); each cell evaluated on the WikiText-2 validation and test
#            splits, one `statprune sweep` process per seed (about 8 s a cell on an H200: 30 cells by default).
# Run from the repository root on a machine with a GPU and the project's dependencies:
#   PYTHONUNBUFFERED=1 bash scripts/gpu_check.sh wide smollm2 owl 2>&1 | tee gpu_check.log
# Needs models/smollm2-135m-hf (python scripts/demo_model.py models/smollm2-135m --hf models/smollm2-135m-hf) and
# ../shared/data (DATA=... elsewhere). DEVICE, TOKENIZER, DTYPE, NSAMPLES, SEQLEN, WIDE (hidden,intermediate,layers) and
# OWL_* override the defaults, e.g. for a dry run on CPU with a tiny model.
set -euo pipefail
PY=${PYTHON:-python3}
export PYTHONPATH=${PYTHONPATH:-}:$PWD
DATA=${DATA:-../shared/data}
OUT=${OUT_DIR:-gpu-check-out}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bfloat16}
NSAMPLES=${NSAMPLES:-128}
SEQLEN=${SEQLEN:-2048}
SMOL=${SMOL:-models/smollm2-135m-hf}
TOKENIZER=${TOKENIZER:-$SMOL}  # the synthetic checkpoint's tokenizer
export HF_HUB_OFFLINE=1
IFS=, read -r WH WI WL <<< "${WIDE:-4096,11008,4}"
OWL_METHODS=${OWL_METHODS:-magnitude,wanda,sparsegpt,ria,statprune}
OWL_SEEDS=${OWL_SEEDS:-0,1,2}
OWL_GRID=${OWL_GRID:-}
WIDE_MODEL=models/synthetic-llama-h$WH-l$WL
mkdir -p "$OUT"
CONFIG=configs/smollm2-135m-statprune-50.yaml
C4="calibration.data_files=$DATA/c4/c4-train.00000-of-01024.first1000.jsonl"
EVAL_TEST="eval.datasets=[{dataset: wikitext2, data_files: '$DATA/wikitext-2-raw', split: test}]"

run() {  # name model method extra-overrides...: prune, keep the report as $OUT/name.json, print one line
  local name=$1 model=$2 method=$3; shift 3
  local start=$SECONDS
  $PY -m statprune_cli prune $CONFIG --overwrite -o "$OUT/$name" --json --quiet \
    --set model.name_or_path="$model" --set model.gguf_file=null --set model.dtype="$DTYPE" --set runtime.device="$DEVICE" \
    --set pruning.method="$method" --set calibration.nsamples="$NSAMPLES" --set calibration.seqlen="$SEQLEN" \
    --set "$C4" --set eval.seqlen="$SEQLEN" \
    --set "$EVAL_TEST" "$@" > "$OUT/$name.json"
  $PY -c "import json,sys; r=json.load(open(sys.argv[1])); p=r['perplexity'][0]['perplexity'] if r['perplexity'] else None; \
m=r['memory']; print(f\"{sys.argv[2]:<30} prune {r['timings']['prune']:8.1f}s  process {int(sys.argv[3]):4d}s  cuda max \
{m.get('cuda_max_allocated_mib') or 0:9.0f} MiB  RSS {m['peak_rss_mib']:7.0f} MiB  ppl {p}\")" "$OUT/$name.json" "$name" \
    $((SECONDS - start))
}

same() {  # reference other: the pruned weights of two runs, tensor by tensor
  $PY - "$OUT/$1" "$OUT/$2" <<'PY'
import sys
from pathlib import Path
from safetensors import safe_open

def tensors(folder):
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out

a, b = tensors(sys.argv[1]), tensors(sys.argv[2])
pair = f"{Path(sys.argv[2]).name} vs {Path(sys.argv[1]).name}"
if a.keys() != b.keys():
    sys.exit(f"  {pair}: the checkpoints hold different tensors")
diff = {k: (x - b[k]).abs().max().item() for k, x in a.items()}
worst = max(diff, key=diff.get)
moved = sum(int(((x == 0) != (b[k] == 0)).sum()) for k, x in a.items())
print(f"  {pair}: max |diff| {diff[worst]:.3g}" + (f" ({worst})" if diff[worst] else "") + f", zeros placed differently: {moved}")
PY
}

phase_wide() {
  $PY -c "import sys; sys.path.insert(0, 'scripts'); from pathlib import Path; from _runs import synthetic_llama; \
synthetic_llama(Path('$WIDE_MODEL'), $WH, $WI, $WL, Path('$TOKENIZER'))"
  local none=(--set "eval.datasets=[]")
  for m in wanda sparsegpt statprune; do run "wide-$m" "$WIDE_MODEL" $m "${none[@]}"; done
  run wide-statprune-stream "$WIDE_MODEL" statprune "${none[@]}" --set runtime.streaming=true --set runtime.offload_activations=cpu
  same wide-statprune wide-statprune-stream
  run wide-statprune-2of4 "$WIDE_MODEL" statprune "${none[@]}" --set pruning.pattern=2:4
}

phase_smollm2() {
  for m in wanda sparsegpt statprune; do run "smollm2-$m" "$SMOL" $m; done
  for m in sparsegpt statprune; do
    run "smollm2-$m-offload" "$SMOL" $m --set runtime.offload_activations=cpu
    same "smollm2-$m" "smollm2-$m-offload"
    run "smollm2-$m-stream" "$SMOL" $m --set runtime.streaming=true --set runtime.offload_activations=cpu
    same "smollm2-$m" "smollm2-$m-stream"
  done
  run smollm2-statprune-2of4 "$SMOL" statprune --set pruning.pattern=2:4
  run smollm2-sparsegpt-2of4 "$SMOL" sparsegpt --set pruning.pattern=2:4
}

phase_owl() {  # float32, the benchmark's protocol (64 x 512 windows, 65536 tokens of each split)
  local methods=""
  for m in ${OWL_METHODS//,/ }; do
    methods+="$m,"
    if [ -z "$OWL_GRID" ]; then methods+="$m+owl,"; fi
    for g in $OWL_GRID; do methods+="$m+owl($g),"; done
  done
  for seed in ${OWL_SEEDS//,/ }; do
    echo "-- calibration seed $seed"
    $PY -m statprune_cli sweep $CONFIG --methods "${methods%,}" --sparsities 0.7 -o "$OUT/owl-sweep-seed$seed" --overwrite \
      --quiet --set model.name_or_path="$SMOL" --set model.gguf_file=null --set model.dtype=float32 \
      --set runtime.device="$DEVICE" --set calibration.seed="$seed" --set calibration.nsamples=64 \
      --set calibration.seqlen=512 --set eval.seqlen=512 --set eval.max_tokens=65536 --set "$C4" \
      --set "eval.datasets=[{dataset: wikitext2, data_files: '$DATA/wikitext-2-raw', split: validation}, \
{dataset: wikitext2, data_files: '$DATA/wikitext-2-raw', split: test}]"
    $PY - "$OUT/owl-sweep-seed$seed/sweep.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"{'cell':<32}" + "".join(f"{d:>24}" for d in r["datasets"]) + "    prune s")
print(f"{'dense':<32}" + "".join(f"{p:24.2f}" for p in r["dense"]))
for c in r["cells"]:
    ppl = "".join(f"{p:24.2f}" for p in c["perplexity"]) if c.get("perplexity") else f"  {c.get('error')}"
    print(f"{c['method']:<32}{ppl}    {c.get('prune_seconds')}")
PY
  done
}

phases=("$@")
[ ${#phases[@]} -gt 0 ] || phases=(wide smollm2 owl)
for phase in "${phases[@]}"; do
  echo "== $phase"
  "phase_$phase"
done
