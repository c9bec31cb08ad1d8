"""The benchmark harness on a CPU: rows with every key, a table and a plot (timings here mean nothing)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench.utils import ROW_KEYS, read_rows

ROOT = Path(__file__).resolve().parents[1]


def test_bench_quick_writes_rows_table_and_plot(tmp_path):
    cmd = [sys.executable, "-m", "bench.run", "--case", "dwconv3d", "--quick", "--dtype", "fp32", "--modes",
           "fwd,fwd+bwd", "--providers", "fastseg3d,torch (", "--out", str(tmp_path), "--plot"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rows = read_rows(tmp_path / "ops.jsonl")
    assert {r["provider"] for r in rows} == {"fastseg3d", "torch (aten-native)", "torch (cudnn-channels-last)"}
    assert {r["mode"] for r in rows} == {"fwd", "fwd+bwd"}
    assert all(tuple(r) == ROW_KEYS and r["median_ms"] > 0 for r in rows)
    assert "fastseg3d x" in proc.stdout
    assert (tmp_path / "dwconv3d.png").stat().st_size > 0
