#!/usr/bin/env bash
# One GPU for the job: full-size RAM++ in bf16 (batch 32-256, eager and torch.compile), nvJPEG decode
# at 0.3/2/12 MP with its difference from the CPU decode, bf16 vs fp32 decisions (benchmarks/gpu.py).
# Usage: bash benchmarks/gpu.sh [extra args for benchmarks/gpu.py]; under 8 minutes on one H100/H200.
# Without a GPU: bash benchmarks/gpu.sh --cpu-smoke (tiny model, CPU; what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
exec timeout 480 "$PY" benchmarks/gpu.py "$@"
