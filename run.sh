#!/usr/bin/env bash
# Launch Plant LM training through torchrun: every GPU on this machine (up to WORLD_SIZE), or CPU processes.
#   DATA_DIR=./data WORLD_SIZE=2 WANDB_MODE=online bash run.sh [--field=value ...]
# Several nodes: run on each node with NNODES, NODE_RANK and MASTER_ADDR set (see README, "Multi-GPU and multi-node").
set -euo pipefail
# max_minutes counts from here (start-up included); a caller that set it first, a scheduler say, keeps its own start
export PLANT_LM_START=${PLANT_LM_START:-$(date +%s.%N)}
cd "$(dirname "$0")"

DATA_DIR=${DATA_DIR:-./data}
WORLD_SIZE=${WORLD_SIZE:-2}
export WANDB_MODE=${WANDB_MODE:-online}
MAX_RESTARTS=${MAX_RESTARTS:-}  # default: 0 on the CPU, 3 on GPUs (see below)
NNODES=${NNODES:-1}
PYTHON=${PYTHON:-.venv/bin/python}
# NVLink multicast (NVLS) can take a shared host's GPUs down; plain NVLink rings are as fast at this model size.
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0} TORCH_SYMM_MEM_DISABLE_MULTICAST=${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1}
export NVSHMEM_DISABLE_NVLS=${NVSHMEM_DISABLE_NVLS:-1}

if [[ "${1:-}" =~ ^(-h|--help|help)$ ]]; then
    sed -n '2,4p' "$0" | cut -c3-
    echo "Environment: DATA_DIR WORLD_SIZE WANDB_MODE MAX_RESTARTS RESUME NNODES NODE_RANK MASTER_ADDR PYTHON PLANT_LM_START"
    echo "Every --field=value is a Config field of plant_lm_train.py (see docs/configuration.md)."
    exit 0
fi
command -v "$PYTHON" >/dev/null || { echo "error: $PYTHON not found; run: bash setup_env.sh" >&2; exit 1; }
if ! [[ "$WORLD_SIZE" =~ ^[0-9]+$ ]] || [ "$WORLD_SIZE" -lt 1 ]; then
    echo "error: WORLD_SIZE=$WORLD_SIZE must be a whole number >= 1" >&2; exit 1
fi
if ! [[ "$MAX_RESTARTS" =~ ^[0-9]*$ ]]; then
    echo "error: MAX_RESTARTS=$MAX_RESTARTS must be a whole number >= 0" >&2; exit 1
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
    # After a failure (a killed rank, say), torchrun's restart of gloo ranks hangs in the process-group set-up (up to
    # its 30-minute timeout) or crashes there more often than not: the new ranks can pick up the dead ranks' addresses,
    # left in torchrun's store. So on the CPU a failure ends the run by default; rerunning run.sh resumes.
    if [ -z "$MAX_RESTARTS" ]; then
        MAX_RESTARTS=0
        restarts="A failed process ends the run (MAX_RESTARTS=0); rerunning resumes from the latest checkpoint."
    else
        restarts="MAX_RESTARTS=$MAX_RESTARTS: torchrun restarts the processes after a failure."
    fi
    echo "No GPU found: training on the CPU with $procs process(es) (gloo backend). $restarts"
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / procs > 0 ? $(nproc) / procs : 1 ))}
elif [ "$gpus" -lt "$WORLD_SIZE" ]; then
    procs=$gpus
    echo "WORLD_SIZE=$WORLD_SIZE but this machine has $gpus GPU(s): using $gpus."
else
    procs=$WORLD_SIZE
fi
MAX_RESTARTS=${MAX_RESTARTS:-3}  # GPUs: torchrun restarts the ranks after a failure, and they resume

if [ "$NNODES" -gt 1 ]; then
    rdzv=(--nnodes="$NNODES" --node_rank="${NODE_RANK:?set NODE_RANK for multi-node runs}"
          --rdzv_backend=c10d --rdzv_endpoint="${MASTER_ADDR:?set MASTER_ADDR}:${MASTER_PORT:-29500}"
          --rdzv_id="${RDZV_ID:-plant-lm}")
else
    rdzv=(--standalone)
fi

# torchrun runs as a child, not exec'd, so that a failed run ends with one line naming the checkpoint to resume
# from. It gets its own process group (set -m): a script's background child would otherwise ignore SIGINT until
# torchrun installs its handlers. So every signal reaches it through run.sh, once: INT (Ctrl-C, or kill -INT) as
# INT, and then the trainer names the checkpoint; TERM and HUP as TERM, which stops the ranks.
set -m
"$PYTHON" -m torch.distributed.run "${rdzv[@]}" --nproc_per_node="$procs" --max_restarts="$MAX_RESTARTS" \
    plant_lm_train.py --data_dir="$DATA_DIR" "$@" <&0 &
torchrun=$! signalled='' interrupted=''
set +m
trap 'signalled=1; kill -TERM "$torchrun" 2>/dev/null || true' TERM HUP
trap 'signalled=1 interrupted=1; kill -INT "$torchrun" 2>/dev/null || true' INT
status=0
wait "$torchrun" || status=$?
while [ -n "$signalled" ]; do  # a trapped signal ends the wait early: wait again, for torchrun's own exit status
    signalled='' again=0
    wait "$torchrun" 2>/dev/null || again=$?
    [ "$again" -eq 127 ] || status=$again  # 127: torchrun had already been waited for
done
if [ "$status" -ne 0 ] && [ -z "$interrupted" ]; then
    STATUS=$status "$PYTHON" - --data_dir="$DATA_DIR" "$@" <<'EOF' >&2 || true
import os
import sys
import plant_lm_train as plm
cfg = plm.config_from_args(sys.argv[1:])
latest = plm.find_latest_checkpoint(cfg.checkpoint_dir, warn=lambda message: None)
if not latest:
    where = "no checkpoint was written yet"
elif cfg.resume == "auto":
    where = f"the same command resumes from {latest} (once the cause above is fixed)"
else:
    where = f"the latest checkpoint is {latest} (this run has resume={cfg.resume}; --resume=auto resumes from it)"
print(f"\nerror: training stopped (torchrun exit status {os.environ['STATUS']}); {where}")
EOF
fi
exit "$status"
