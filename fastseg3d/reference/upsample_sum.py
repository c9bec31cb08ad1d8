"""Reference sum of trilinear resizes in ATen ops: ``sum_i F.interpolate(x_i, size, mode="trilinear",
align_corners=False)``, an input already at ``size`` added as it is, in the given order.

This is the plain composition itself (SegFormer3D's decoder), so it follows autocast as that does: under CUDA
autocast the resizes run in fp32, and so does the sum (CPU autocast leaves the resize in the input's dtype).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["upsample_sum_ref"]


def upsample_sum_ref(inputs: Sequence[torch.Tensor], size: Sequence[int]) -> torch.Tensor:
    """``sum_i F.interpolate(inputs[i], size=size, mode="trilinear", align_corners=False)``, differentiable by
    autograd."""
    size = tuple(size)
    out = None
    for x in inputs:
        y = x if tuple(x.shape[2:]) == size else F.interpolate(x, size=size, mode="trilinear", align_corners=False)
        out = y if out is None else out + y
    return out
