"""Launcher arithmetic in plain Python.

``triton.cdiv`` and ``triton.next_power_of_2`` are constexpr functions: each call from Python goes through Triton's
JIT wrapper (about 2 us on a CI core), and a launcher makes up to 15 of them per launch, where the GPU spends about
10 us on SegFormer3D's stage-1 depthwise conv at 128^3. These take well under a microsecond.
"""

from __future__ import annotations

__all__ = ["cdiv", "next_power_of_2"]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (0 for n = 0, as Triton's)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0
