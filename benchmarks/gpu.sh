#!/usr/bin/env bash
# GPU throughput of full-size RAM++ in bf16 (batch 32/64/128, eager and torch.compile).
# Usage: bash benchmarks/gpu.sh [extra args for benchmarks/gpu.py]; under 5 minutes on one H100/H200.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
exec timeout 300 "$PY" benchmarks/gpu.py "$@"
