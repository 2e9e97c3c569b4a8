#!/usr/bin/env bash
# Run on a machine WITH network: download the Python 3.12 (cp312, manylinux x86_64) wheels that a CUDA
# image without network lacks, for `scripts/test.sh --gpu` there. Never torch: the GPU machine keeps its
# own CUDA build. Copy the folder next to the repository on the GPU machine as .whl/.
#
#   scripts/fetch_gpu_wheels.sh [DIR] [--all]     DIR: default .whl; --all: also the usually preinstalled
#                                                 packages (yaml, numpy, tokenizers, rich, pytest, ...)
# The list and its pins: scripts/gpu_deps.py. PYTHON picks the interpreter running pip (any version).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
DIR=".whl"
WHAT="wheels"
for arg in "$@"; do
  case "$arg" in
    --all) WHAT="all" ;;
    -*) echo "fetch_gpu_wheels.sh: unknown option $arg (usage: fetch_gpu_wheels.sh [DIR] [--all])" >&2; exit 2 ;;
    *) DIR="$arg" ;;
  esac
done
mapfile -t specs < <("$PYTHON" scripts/gpu_deps.py "$WHAT")
mkdir -p "$DIR"
"$PYTHON" -m pip download --disable-pip-version-check -q --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d "$DIR" "${specs[@]}"
echo "fetch_gpu_wheels: ${#specs[@]} wheels in $DIR/ (${specs[*]})"
ls "$DIR"
