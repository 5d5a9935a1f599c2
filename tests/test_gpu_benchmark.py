"""benchmarks/gpu.sh is run on a GPU only now and then: its CPU smoke mode keeps it working meanwhile."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_cpu_smoke():
    env = dict(os.environ, PYTHON=sys.executable)
    r = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh"), "--cpu-smoke"], capture_output=True, text=True,
                       timeout=400, env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    table = [line for line in r.stdout.splitlines() if line.startswith("| ")]
    kinds = [line.split("|")[1].strip() for line in table[1:]]
    assert kinds == ["---", "model bf16 eager", "decode on cpu", "bf16 vs fp32"], r.stdout
    decode_row = table[3]
    assert "3/3 on the device" in decode_row and "vs CPU exact" in decode_row and "OVER" not in decode_row
