"""fastseg3d.kernels.utils: the launchers' plain-Python arithmetic agrees with Triton's constexpr functions."""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")


def test_cdiv_and_next_power_of_2_match_triton():
    from fastseg3d.kernels.utils import cdiv, next_power_of_2

    assert all(next_power_of_2(n) == triton.next_power_of_2(n) for n in range(0, 5000))
    assert all(next_power_of_2(n) == triton.next_power_of_2(n) for n in (2**31 - 1, 2**31, 2**31 + 1, 3 * 2**40))
    assert all(cdiv(a, b) == triton.cdiv(a, b) for a in range(0, 600) for b in range(1, 40))
    assert cdiv(2**40 + 1, 2**20) == triton.cdiv(2**40 + 1, 2**20)
