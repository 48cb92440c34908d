#!/usr/bin/env bash
# Train the default model shipped in src/bwarea/default_model/, with bwarea's own commands, and the Llama
# baseline and evaluations that give its model card's numbers.
#
#   bash scripts/train_default_model.sh                  # a GPU machine: about 4 minutes on one H200
#   STEPS=20 BC_STEPS=20 BATCH=4 BLOCK=64 INSTALL=0 bash scripts/train_default_model.sh  # a CPU smoke run
#
# Data: ../shared/corpora (shakespeare.txt, kjv.txt; public domain). The last HOLDOUT_PERCENT of each file's
# lines is held out: never trained on (tokenizer included), used for validation and the card's numbers.
# Everything lands in $WORK; the final model (bf16 safetensors + tokenizer) is copied into the package unless
# INSTALL=0. accelerate picks the device (cuda if present) and bf16 autocast where supported.
set -euo pipefail
cd "$(dirname "$0")/.."

CORPORA=${CORPORA:-../shared/corpora}
WORK=${WORK:-runs/default-model}
PY=${PYTHON:-python3}
BWAREA=${BWAREA:-$PY -m bwarea.cli}
STEPS=${STEPS:-1200}                    # stage 1 and the baseline (about 6.5 epochs of the ~3M training tokens)
BC_STEPS=${BC_STEPS:-600}               # stage 2, inverse-dynamics targets (longer overfits: see docs/training.md)
POSTERIOR_STEPS=${POSTERIOR_STEPS:-0}   # >0: stage 2 continued on the world model's posterior (off: it overfit)
BATCH=${BATCH:-64}
BLOCK=${BLOCK:-256}
VOCAB=${VOCAB:-2048}
HOLDOUT_PERCENT=${HOLDOUT_PERCENT:-3}
INSTALL=${INSTALL:-1}
SHAPE="--hidden-size 256 --layers 4 --heads 4 --kv-heads 2 --intermediate-size 512 --max-positions 1024"
COMMON="--block-size $BLOCK --batch-size $BATCH --save-every 500 --log-every 50 --eval-every 500 --eval-blocks 256 --seed 0"
export TOKENIZERS_PARALLELISM=false
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"   # runs from a checkout without installing
mkdir -p "$WORK/data/train" "$WORK/data/heldout"
start=$(date +%s)

# 1. Split each corpus file by lines: the first (100 - HOLDOUT_PERCENT)% to train, the rest held out.
"$PY" - "$CORPORA" "$WORK/data" "$HOLDOUT_PERCENT" <<'EOF'
import sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
from bench_training_quality import split_lines  # the same split as the benchmark's --holdout-percent
corpora, out, percent = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
split_lines([corpora / "shakespeare.txt", corpora / "kjv.txt"], percent, out)
EOF
TRAIN="$WORK/data/train"
HELDOUT="$WORK/data/heldout"
DATA="--data $TRAIN --val-data $HELDOUT --cache-dir $WORK/cache"

# 2. A byte-level BPE on the training text.
$BWAREA tokenizer train --data "$TRAIN" --vocab-size "$VOCAB" --out "$WORK/tokenizer"

# 3. Stage 1 (world model, inverse dynamics, codebook) and the Llama baseline of the world model's shape.
$BWAREA pretrain $DATA --tokenizer "$WORK/tokenizer" --out "$WORK/s1" $SHAPE $COMMON \
    --max-steps "$STEPS" --lr 2e-3 --warmup-steps 100 --overwrite
$BWAREA pretrain --baseline llama $DATA --tokenizer "$WORK/tokenizer" --out "$WORK/llama" $SHAPE $COMMON \
    --max-steps "$STEPS" --lr 2e-3 --warmup-steps 100 --overwrite

# 4. Stage 2: behaviour cloning of the policy, started from the world model's weights. With POSTERIOR_STEPS > 0,
#    continued on the world model's posterior over actions (the exact LM likelihood on the training text).
FINAL="$WORK/bc"
BC_DTYPE=bfloat16
if [ "$POSTERIOR_STEPS" -gt 0 ]; then BC_DTYPE=float32; fi   # the posterior run reads it
$BWAREA bc $DATA --model "$WORK/s1" --out "$WORK/bc" $COMMON --max-steps "$BC_STEPS" --lr 2e-3 \
    --warmup-steps 100 --policy-init world --targets inverse --save-dtype "$BC_DTYPE" --overwrite
if [ "$POSTERIOR_STEPS" -gt 0 ]; then
    FINAL="$WORK/bc-posterior"
    $BWAREA bc $DATA --model "$WORK/bc" --out "$FINAL" $COMMON --max-steps "$POSTERIOR_STEPS" \
        --lr 5e-4 --warmup-steps 20 --policy-init keep --targets posterior --save-dtype bfloat16 --overwrite
fi

# 5. Held-out numbers for the model card, and the side-by-side quality table (benchmarks/).
$BWAREA eval "$FINAL" --data "$HELDOUT" --cache-dir "$WORK/cache" --json | tee "$WORK/eval_bwarea.json"
"$PY" benchmarks/bench_training_quality.py --runs "$WORK" --final "$(basename "$FINAL")" --data "$HELDOUT" \
    --out "$WORK/quality" \
    || echo "some quality targets were missed: see $WORK/quality.md"

end=$(date +%s)
echo "{\"seconds\": $((end - start)), \"steps\": $STEPS, \"bc_steps\": $BC_STEPS, \"posterior_steps\": $POSTERIOR_STEPS, \"batch\": $BATCH, \"block\": $BLOCK}" \
    | tee "$WORK/timing.json"

# 6. Ship it: bf16 weights, config and tokenizer into the package.
if [ "$INSTALL" = "1" ]; then
    for f in model.safetensors config.json tokenizer.json tokenizer_config.json training.json; do
        cp "$FINAL/$f" src/bwarea/default_model/
    done
    cp "$WORK/eval_bwarea.json" src/bwarea/default_model/eval.json
    ls -l src/bwarea/default_model/
fi
