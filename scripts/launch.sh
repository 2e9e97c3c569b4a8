#!/usr/bin/env bash
# Launch moe-erc training with torchrun on this node (single- or multi-node).
#
#   scripts/launch.sh CONFIG [key=value ...]            # all GPUs of this node (or 1 CPU process)
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 scripts/launch.sh configs/erc-3b.yaml   # on every node
#   scripts/launch.sh --dry-run CONFIG ...               # print the command, run nothing
#
# Environment: NNODES (1), NODE_RANK (0), NPROC_PER_NODE (GPUs on this node, else 1), MASTER_ADDR
# (127.0.0.1), MASTER_PORT (29500), MAX_RESTARTS (0: torchrun restarts every worker this many times after
# one fails; they resume from the last checkpoint, see docs/launching.md), PYTHON (python; the .venv one if
# present), MOE_ERC_EXTRA_ARGS (extra torchrun flags). Multi-node: the same command on every node with its
# NODE_RANK.
set -euo pipefail
dry_run=0
if [ "${1:-}" = "--dry-run" ]; then dry_run=1; shift; fi
if [ $# -lt 1 ]; then
  echo "usage: scripts/launch.sh [--dry-run] CONFIG [section.key=value ...]" >&2
  exit 2
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python; fi
fi
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
if [ -z "${NPROC_PER_NODE:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    NPROC_PER_NODE="$(nvidia-smi --list-gpus | wc -l)"
  else
    NPROC_PER_NODE=1
  fi
fi
cmd=("$PYTHON" -m torch.distributed.run
     --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC_PER_NODE"
     --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" --max-restarts "${MAX_RESTARTS:-0}")
# shellcheck disable=SC2206  # intentional word splitting of extra flags
[ -n "${MOE_ERC_EXTRA_ARGS:-}" ] && cmd+=(${MOE_ERC_EXTRA_ARGS})
cmd+=(-m moe_erc.train "$@")
if [ "$dry_run" = 1 ]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"  # megatron's TP/SP overlap wants it
exec "${cmd[@]}"
