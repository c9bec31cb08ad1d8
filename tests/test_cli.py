"""The fastseg3d command line: info, and the subcommands' wiring (train/eval are tested in tests/train)."""

from __future__ import annotations

import subprocess
import sys

import torch

import fastseg3d


def test_info_command_lists_versions_and_op_choices():
    proc = subprocess.run([sys.executable, "-m", "fastseg3d", "info"], capture_output=True, text=True, check=True)
    out = proc.stdout
    for key in ("torch", "triton", "cuda", "monai", "device", "backend policy"):
        assert key in out
    assert torch.__version__ in out
    assert "dwconv3d" in out and "dwconv3d_tokens" in out


def test_op_choices_follow_policy():
    cpu = torch.device("cpu")
    assert fastseg3d.info.op_choices(cpu)[0][1] == "torch"
    assert "device=cpu" in fastseg3d.info.op_choices(cpu)[0][2]
    assert fastseg3d.info.op_choices(torch.device("meta"))[0][1] == "triton"
    with fastseg3d.backend("torch"):
        assert fastseg3d.info.op_choices(torch.device("meta"))[0] == ("dwconv3d", "torch", "FASTSEG3D_BACKEND=torch")


def test_help_lists_every_subcommand():
    proc = subprocess.run([sys.executable, "-m", "fastseg3d", "--help"], capture_output=True, text=True, check=True)
    for command in ("train", "eval", "bench", "convert", "info"):
        assert command in proc.stdout


def test_bench_forwards_to_the_suite(tmp_path):
    from fastseg3d.cli import main

    out = tmp_path / "rows.json"
    assert main(["bench", "ops", "--case", "selfreg", "--quick", "--json", str(out)]) == 0
    assert out.is_file() and out.stat().st_size > 0


def test_import_without_triton_falls_back_to_reference():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, fastseg3d\n"
        "assert not fastseg3d.backends.HAS_TRITON\n"
        "x, w = torch.randn(1, 2, 3, 4, 5), torch.randn(2, 1, 3, 3, 3)\n"
        "y = fastseg3d.ops.dwconv3d(x, w)\n"
        "print(fastseg3d.info.op_choices(torch.device('cpu'))[0][2])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "triton is not installed" in proc.stdout
