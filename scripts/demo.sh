#!/usr/bin/env bash
# Set up (first run), then train configs/tiny.yaml on the embedded Shakespeare corpus on CPU.
# Extra arguments are config overrides, e.g. scripts/demo.sh training.train_iters=50 erc.enabled=true
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
. scripts/setup_env.sh
export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 WANDB_MODE="${WANDB_MODE:-offline}"
start=$(date +%s)
moe-erc train configs/tiny.yaml "$@"
echo "demo: finished in $(( $(date +%s) - start )) s. Run directory: runs/tiny (metrics.jsonl, tensorboard/, checkpoints/)"
