#!/usr/bin/env bash
# Launch Plant LM training through torchrun: every GPU on this machine (up to WORLD_SIZE), or CPU processes.
#   DATA_DIR=./data WORLD_SIZE=2 WANDB_MODE=online bash run.sh [--field=value ...]
# Several nodes: run on each node with NNODES, NODE_RANK and MASTER_ADDR set (see README, "Multi-GPU and multi-node").
set -euo pipefail
cd "$(dirname "$0")"

DATA_DIR=${DATA_DIR:-./data}
WORLD_SIZE=${WORLD_SIZE:-2}
export WANDB_MODE=${WANDB_MODE:-online}
MAX_RESTARTS=${MAX_RESTARTS:-3}
NNODES=${NNODES:-1}
PYTHON=${PYTHON:-.venv/bin/python}
# NVLink multicast (NVLS) can take a shared host's GPUs down; plain NVLink rings are as fast at this model size.
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0} TORCH_SYMM_MEM_DISABLE_MULTICAST=${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1}
export NVSHMEM_DISABLE_NVLS=${NVSHMEM_DISABLE_NVLS:-1}

if [[ "${1:-}" =~ ^(-h|--help|help)$ ]]; then
    sed -n '2,4p' "$0" | cut -c3-
    echo "Environment: DATA_DIR WORLD_SIZE WANDB_MODE MAX_RESTARTS RESUME NNODES NODE_RANK MASTER_ADDR PYTHON"
    echo "Every --field=value is a Config field of plant_lm_train.py (see README.md, \"Configuration reference\")."
    exit 0
fi
command -v "$PYTHON" >/dev/null || { echo "error: $PYTHON not found; run: bash setup_env.sh" >&2; exit 1; }
if ! [[ "$WORLD_SIZE" =~ ^[0-9]+$ ]] || [ "$WORLD_SIZE" -lt 1 ]; then
    echo "error: WORLD_SIZE=$WORLD_SIZE must be a whole number >= 1" >&2; exit 1
fi

# A Config error (fp16 on a machine without CUDA included), a checkpoint that does not match the Config, or a
# missing or empty DATA_DIR is not transient: report it once here, not from every rank of every torchrun restart.
# (Only the directory layout is checked here; reading the genomes, and so the species list, is the ranks' work.)
"$PYTHON" - --data_dir="$DATA_DIR" "$@" <<'EOF' || exit 2
import sys
import torch
import plant_lm_train as plm
quiet = lambda message: None
try:
    cfg = plm.config_from_args(sys.argv[1:])
    plm.precision_settings(cfg, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    plm.discover_genomes(cfg, warn=quiet)
    path = plm.resume_path(cfg, warn=quiet)
    if path:
        plm.check_compatible(plm.load_checkpoint(path)["config"], cfg, None, None, path, warn=quiet)
except (plm.ConfigError, plm.DataError) as e:
    sys.exit(f"error: {e}")
EOF

gpus=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
if [ "$gpus" -eq 0 ]; then
    procs=$WORLD_SIZE
    echo "No GPU found: training on the CPU with $procs process(es) (gloo backend)."
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / procs > 0 ? $(nproc) / procs : 1 ))}
elif [ "$gpus" -lt "$WORLD_SIZE" ]; then
    procs=$gpus
    echo "WORLD_SIZE=$WORLD_SIZE but this machine has $gpus GPU(s): using $gpus."
else
    procs=$WORLD_SIZE
fi

if [ "$NNODES" -gt 1 ]; then
    rdzv=(--nnodes="$NNODES" --node_rank="${NODE_RANK:?set NODE_RANK for multi-node runs}"
          --rdzv_backend=c10d --rdzv_endpoint="${MASTER_ADDR:?set MASTER_ADDR}:${MASTER_PORT:-29500}"
          --rdzv_id="${RDZV_ID:-plant-lm}")
else
    rdzv=(--standalone)
fi

exec "$PYTHON" -m torch.distributed.run "${rdzv[@]}" --nproc_per_node="$procs" --max_restarts="$MAX_RESTARTS" \
    plant_lm_train.py --data_dir="$DATA_DIR" "$@"
