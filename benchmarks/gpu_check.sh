#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): one run on a lent H100/H200, one JSON out.
# On the device machine the project's code and the carried .gpu/site (offline backbone
# weights) are put on PYTHONPATH; its own python3 holds PyTorch with CUDA.
#   bash benchmarks/gpu_check.sh --data .gpu/data --out "$OUT/gpu_check.json"
#   bash benchmarks/gpu_check.sh --dry-run      # any machine: tests collect, arguments parse
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
export PYTHONPATH="$PWD:$PWD/.gpu/site${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
exec "$PYTHON" benchmarks/gpu_check.py "$@"
