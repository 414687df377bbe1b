#!/usr/bin/env bash
# The variant-effect benchmark end to end on one GPU: train Plant LM with each global_memory and the HF GPT-2
# baseline for STEPS equal optimizer steps, all five at once sharing the GPU (equal steps, not equal time), while
# the CPU counts the Markov model; then score the same held-out SNVs with every model (bench/variant_effects.py).
#   bash bench/variant_effects_gpu.sh [WORK=/tmp/variant_effects] [STEPS=1000] [PER_CLASS=3000]
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/variant_effects}
STEPS=${2:-1000}
PER_CLASS=${3:-3000}
PY=${PYTHON:-python}
COMMON="--batch_size=1024 --accumulation_steps=1 --learning_rate=1e-3 --warmup_steps=100 --eval_every=250
        --log_every=50 --checkpoint_every=0 --max_steps=$STEPS --n_epochs=1000 --resume=none"
mkdir -p "$WORK"
pids=()
for variant in retrieval:plant neighbours:plant buckets:plant none:plant gpt2:gpt2; do
    label=${variant%%:*}
    memory=$([[ $label == gpt2 ]] && echo none || echo "$label")
    layout=$([[ $label == neighbours ]] && echo suffix_array || echo tables)  # neighbours reads positions
    WANDB_MODE=disabled $PY bench/train_variant.py --model="${variant##*:}" --global_memory="$memory" \
        --index_layout="$layout" $COMMON \
        --checkpoint_dir="$WORK/$label" --log_dir="$WORK/$label/logs" >"$WORK/$label.out" 2>&1 &
    pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
latest() { ls -t "$WORK/$1"/model_*.pt | head -n1; }
$PY bench/variant_effects.py --per-class "$PER_CLASS" --markov --workdir "$WORK" \
    --checkpoint "retrieval=$(latest retrieval)" --checkpoint "neighbours=$(latest neighbours)" \
    --checkpoint "buckets=$(latest buckets)" \
    --checkpoint "none=$(latest none)" --gpt2 "$(latest gpt2)" --out "$WORK/variant_effects.json"
