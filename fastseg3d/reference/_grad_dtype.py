"""The dtypes of the fused losses: the one they compute in, and the one in which they keep the input gradient they
compute in their forward pass."""

from __future__ import annotations

import torch

__all__ = ["compute_dtype", "saved_grad_dtype"]


def saved_grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp16 inputs, the input dtype otherwise.

    A loss averaged over B x voxels has input gradients of order 1 / (B x voxels): about 1e-7 at 128^3, far below
    fp16's smallest normal number (6e-5), where fp16 keeps only a few bits. Eager autograd meets them already
    multiplied by the loss scale (GradScaler's 2^16), which lifts them into range. A gradient made in the forward
    pass has not seen that scale yet, so in fp16 it is kept in fp32 and cast after the scale is applied. bf16 has
    fp32's range.
    """
    return torch.float32 if dtype == torch.float16 else dtype


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp64 where any input is fp64 (a float64 check stays float64), else fp32 (half inputs are computed in fp32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
