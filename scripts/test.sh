#!/usr/bin/env bash
# Set up (first run), then run the whole test suite on CPU. Extra arguments go to pytest.
# scripts/test.sh --gpu [pytest args]: the GPU tier instead (tests/gpu), on a machine with a CUDA torch.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ "${1:-}" = "--gpu" ]; then
  # The GPU tier with this machine's own CUDA torch: never scripts/setup_env.sh (it installs a CPU
  # torch). PYTHON (default python3) must have that torch; what it lacks besides torch
  # (scripts/gpu_deps.py) goes into .gpu-site with --no-deps: from .whl/ when it exists (made by
  # scripts/fetch_gpu_wheels.sh on a machine with network), else from the index. moe-erc runs from this
  # tree through PYTHONPATH. MOE_ERC_GPU_TIER_DEVICE=cpu runs the tier on CPU (developing it without a GPU).
  shift
  PY="${PYTHON:-python3}"
  say() { echo "test.sh --gpu: $*" >&2; }
  if [ "${MOE_ERC_GPU_TIER_DEVICE:-cuda}" != cpu ]; then
    torch_line="$("$PY" -c 'import torch; print(f"torch {torch.__version__} (CUDA build: {torch.version.cuda}),"
                                               f" torch.cuda.is_available() is {torch.cuda.is_available()}")' \
                  2>/dev/null)" || torch_line="no importable torch"
    case "$torch_line" in
      *"is True") ;;
      *) say "$PY has $torch_line; needs a CUDA build of torch and a visible GPU (set PYTHON=...)"; exit 2 ;;
    esac
  fi
  export PYTHONPATH="$ROOT/.gpu-site:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  need="$("$PY" scripts/gpu_deps.py missing)"
  if [ -n "$need" ]; then
    if [ -d .whl ]; then from=(--no-index --find-links .whl); where=".whl/"; else from=(); where="the index"; fi
    say "installing into .gpu-site from $where (--no-deps, torch untouched):" $need
    mkdir -p .gpu-site
    # shellcheck disable=SC2086
    "$PY" -m pip install --disable-pip-version-check -q --no-deps --no-compile --upgrade \
        --ignore-requires-python --target .gpu-site "${from[@]}" $need > .gpu-site/install.log 2>&1 || {
      tail -n 5 .gpu-site/install.log >&2
      say "pip install failed (log: .gpu-site/install.log); without network, bring the wheels:" \
          "scripts/fetch_gpu_wheels.sh .whl [--all] on a machine with network, then copy .whl/ here"
      exit 2; }
    still="$("$PY" scripts/gpu_deps.py missing 2>&1 >/dev/null)"
    [ -z "$still" ] || { say "still missing after the install: $(echo $still)"; exit 2; }
  fi
  # moe-erc from the source tree: the CLI, and everything a training run imports.
  out="$("$PY" -m moe_erc --help 2>&1)" && out="$("$PY" -c 'import moe_erc.training.trainer' 2>&1)" || {
    echo "$out" | tail -n 3 >&2
    say "python -m moe_erc --help / import moe_erc.training.trainer fail with PYTHONPATH=$PYTHONPATH"; exit 2; }
  export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1
  exec "$PY" -m pytest tests/gpu -m gpu "$@"
fi
MOE_ERC_EXTRAS=eval . scripts/setup_env.sh  # the tests also run lm-evaluation-harness (moe-erc eval)
export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled TORCH_COMPILE_DISABLE=1
python -m pytest tests "$@"
