#!/usr/bin/env bash
# Every GPU check and benchmark of BENCHMARKS.md in one run, hf_lorsa and the authors' code side by side on one card:
#
#   bash scripts/gpu_checks.sh [--dry-run] [SHARED]
#
# SHARED (default ../shared) holds models/stories260K, data/stories260K-samples.jsonl and anchor-bench/ (the authors'
# Lorsa, its benchmark, the floor probe, and wheels for a machine without network access). In order, most telling
# first, each step under its own time limit:
#   1. the Lorsa step, configs a, b, c: the authors' Lorsa, then hf_lorsa with each decode (dense, gather) and
#      each Adam (torch.optim.Adam as the authors' benchmark uses, fused as the Trainer uses);
#   2. memory at K = n_ov (the start of K annealing) against K = 128, config c;
#   3. the pipeline on a random host of Llama-3.2-1B shape, default options, with a profile of four steps;
#   4. the stories260K recipe benchmark, 3M tokens (bench_train.py), with the default 1,024 tokens per step and
#      with 4,096 (at the default learning rate, and at four times it, which kept the quality on the CPU);
#   5. the numerical tests on the GPU, fp32 and bf16 (tests/test_cuda.py), and the model's CPU tests with the
#      machine's torch;
#   6. the floor probe (the irreducible pieces of a config-c step) and where a config-c step spends its time
#      (profile_step.py).
# Every result is a JSON line in $OUT/results.jsonl (default runs/gpu-checks), the whole output in $OUT/log.txt.
# ANCHOR_PYTHON names another interpreter for the authors' code (e.g. a virtualenv with transformer-lens).
# --dry-run runs the same steps on the CPU at toy sizes (config a, a tiny host, 64K tokens): a check of the script.
set -u
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
SHARED=$(cd "${1:-../shared}" && pwd)
OUT=${OUT:-runs/gpu-checks}
mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl"
LOG="$OUT/log.txt"
: > "$RESULTS"
: > "$LOG"
PY=${PYTHON:-python3}
ANCHOR_PY=${ANCHOR_PYTHON:-$PY}  # a separate interpreter for the authors' code, if it lives in its own environment
SITE=${SITE:-/tmp/hf-lorsa-site}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# What the machine lacks comes from the wheels beside the anchor (no index is reachable on a GPU machine).
if ! $PY -c "import datasets" 2>/dev/null || ! $ANCHOR_PY -c "import pydantic, transformer_lens" 2>/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$SHARED"/anchor-bench/whl/*.whl >> "$LOG" 2>&1 || echo "wheel install failed, see $LOG"
fi
export PYTHONPATH="$SITE:src${PYTHONPATH:+:$PYTHONPATH}"
ANCHOR_PATH="$SITE:$SHARED/anchor-bench/anchor"

step() {  # step NAME SECONDS COMMAND...: run, keep its JSON lines (tagged with the step), log everything
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*" | tee -a "$LOG"
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.out" 2>> "$LOG"
    local rc=$?
    cat "$OUT/$name.out" >> "$LOG"
    grep '^{' "$OUT/$name.out" | grep -Ev '^\{"(loss|train_runtime|eval_)' | sed "s/^{/{\"step\": \"$name\", /" | tee -a "$RESULTS"
    echo "   rc $rc, $((SECONDS - start)) s" | tee -a "$LOG"
}

$PY - <<'EOF' | tee -a "$RESULTS"
import json, torch, transformers
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
print(json.dumps({"step": "machine", "device": gpu, "torch": torch.__version__, "transformers": transformers.__version__}))
EOF

if [ $DRY = 1 ]; then
    DEV=cpu CONFIGS=a STEPS="--steps 2 --warmup 1" PIPE="--shape tiny" TOKENS="--max_tokens 65536"
    KMAX="--configs a --top_k 512" PROFILE="--config a --rows 8"
else
    DEV=cuda CONFIGS=a,b,c STEPS="" PIPE="" TOKENS="" KMAX="--configs c --top_k 32768" PROFILE="--config c --rows 25"
fi
step anchor-1 240 env PYTHONPATH="$ANCHOR_PATH" $ANCHOR_PY "$SHARED/anchor-bench/bench_anchor.py" --device $DEV --configs $CONFIGS $STEPS
step hf_lorsa 300 $PY scripts/bench.py --device $DEV --configs $CONFIGS --decode auto,gather --optimizer adam,fused $STEPS
step batchtopk 120 $PY scripts/bench.py --device $DEV --configs $CONFIGS --optimizer fused --act_fn topk,batchtopk $STEPS
step memory-k-n_ov 120 $PY scripts/bench.py --device $DEV $KMAX $STEPS
step pipeline 400 $PY scripts/bench_pipeline.py --shared "$SHARED" --profile $PIPE
step recipe-stories 300 $PY scripts/bench_train.py --shared "$SHARED" --output_dir "$OUT/stories" $TOKENS
step tests 240 $PY -m pytest -q -p no:cacheprovider -o addopts=-ra tests/test_cuda.py tests/test_modeling.py tests/test_causal_attention.py
if [ $DRY = 0 ]; then
    step recipe-stories-b16 300 $PY scripts/bench_train.py --shared "$SHARED" --output_dir "$OUT/stories16" --batch_size 16
    step recipe-stories-b16-lr4x 300 $PY scripts/bench_train.py --shared "$SHARED" --output_dir "$OUT/stories16lr" \
        --batch_size 16 --learning_rate 1.6e-2
    step floor 120 $PY "$SHARED/anchor-bench/floor_probe.py"
fi
step profile-step 120 env PYTHONPATH="scripts:$PYTHONPATH" $PY scripts/profile_step.py --device $DEV $PROFILE
echo "results: $RESULTS"
