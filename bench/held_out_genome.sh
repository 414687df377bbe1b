#!/usr/bin/env bash
# A genome the model never saw: Plant LM (default memory) trained for STEPS equal steps with every bundled species and
# with SPECIES left out (weight 0: out of training and out of the index), the two together on one GPU, then both
# scored by `plant_lm_infer.py eval` on SPECIES' validation chunks, which neither trained on nor indexed.
#   bash bench/held_out_genome.sh [WORK=/tmp/held_out] [SPECIES=arabidopsis] [STEPS=800]
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/held_out}
SPECIES=${2:-arabidopsis}
STEPS=${3:-800}
PY=${PYTHON:-python}
COMMON="--batch_size=1024 --accumulation_steps=1 --learning_rate=1e-3 --warmup_steps=100 --eval_every=250
        --log_every=50 --checkpoint_every=0 --max_steps=$STEPS --n_epochs=1000 --resume=none"
mkdir -p "$WORK"
$PY bench/validation_fasta.py "$SPECIES" "$WORK/$SPECIES.val.fa" --checkpoint_dir "$WORK/scan"
WANDB_MODE=disabled $PY bench/train_variant.py --model=plant $COMMON --checkpoint_dir="$WORK/with" \
    --log_dir="$WORK/with/logs" >"$WORK/with.out" 2>&1 &
with=$!
WANDB_MODE=disabled $PY bench/train_variant.py --model=plant --species_distribution="$SPECIES:0" $COMMON \
    --checkpoint_dir="$WORK/without" --log_dir="$WORK/without/logs" >"$WORK/without.out" 2>&1 &
without=$!
wait $with; wait $without
$PY plant_lm_infer.py eval --checkpoint "$WORK/with/model_latest.pt" --species "$SPECIES" \
    --json "$WORK/eval_with.json" "$WORK/$SPECIES.val.fa"
$PY plant_lm_infer.py eval --checkpoint "$WORK/without/model_latest.pt" --species average \
    --json "$WORK/eval_without.json" "$WORK/$SPECIES.val.fa"
