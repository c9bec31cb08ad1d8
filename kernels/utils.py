"""Helpers shared by the kernel files: the launchers' grid arithmetic in plain Python, and bf16 channel pairs.

``triton.cdiv`` and ``triton.next_power_of_2`` are constexpr functions: each call from Python goes through Triton's
JIT wrapper (about 2 us on a CI core), and a launcher makes up to 15 of them per launch, where the GPU spends about
10 us on SegFormer3D's stage-1 depthwise conv at 128^3. ``cdiv`` and ``next_power_of_2`` here take well under a
microsecond.
"""

from __future__ import annotations

import triton
import triton.language as tl

import torch

from fastseg3d.backends import interpreter_active

__all__ = ["bf16_pair_to_fp32", "cdiv", "next_power_of_2", "sm_count"]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def sm_count(device: torch.device) -> int | None:
    """Streaming multiprocessors of ``device``'s GPU, which launchers split work to fill; None under the interpreter
    and off CUDA (``bench.sass`` stands in an H100's count to configure launches on ``meta`` tensors)."""
    if interpreter_active() or device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (0 for n = 0, as Triton's)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


@triton.jit
def bf16_pair_to_fp32(v):
    """(even, odd): the fp32 values of the two bf16 halves of int32 ``v`` (low half first, as in memory). The low
    half's fp32 is a shift and the high half's a mask, where splitting a vector of bf16 costs a byte permute and a
    shift for every odd element."""
    return (v << 16).to(tl.float32, bitcast=True), (v & -65536).to(tl.float32, bitcast=True)
