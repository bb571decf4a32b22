#!/usr/bin/env bash
# Distributed training with PyTorch DDP through mmengine (torchrun).
#   bash tools/dist_train.sh CONFIG NUM_PROCS [train.py options...]
# Env: NNODES (1), NODE_RANK (0), PORT (29500), MASTER_ADDR (127.0.0.1).
# PYTHON: the interpreter (default: python), e.g. a virtual environment's
# bin/python when that environment is not on PATH.
# On CPU-only machines tools/train.py starts the process group with gloo
# (mmdyn.engine.launch.init_cpu_process_group; docs/compat.md).
set -euo pipefail
CONFIG=$1
NPROC=$2
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
PORT=${PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-"127.0.0.1"}
PYTHON=${PYTHON:-python}
ROOT=$(cd "$(dirname "$0")/.." && pwd)

PYTHONPATH="$ROOT:${PYTHONPATH:-}" \
"$PYTHON" -m torch.distributed.run \
    --nnodes="$NNODES" \
    --node_rank="$NODE_RANK" \
    --master_addr="$MASTER_ADDR" \
    --nproc_per_node="$NPROC" \
    --master_port="$PORT" \
    "$ROOT/tools/train.py" \
    "$CONFIG" \
    --launcher pytorch "${@:3}"
