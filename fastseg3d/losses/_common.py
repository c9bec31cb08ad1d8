"""Helpers shared by the distillation losses."""

from __future__ import annotations

import math
import numbers

import torch

__all__ = ["as_volume", "check_weight", "full_precision"]


def as_volume(t: torch.Tensor, name: str) -> torch.Tensor:
    """A 5-D view of a 4-D (B, C, H, W) or 5-D map: the fused ops take volumes, and a depth of one is a 2-D map."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() == 4:
        return t.unsqueeze(2)
    if t.dim() != 5:
        raise ValueError(f"{name} must be 4-D (B, C, H, W) or 5-D (B, C, D, H, W), got shape {tuple(t.shape)}")
    return t


def full_precision(t: torch.Tensor) -> torch.Tensor:
    """``t`` in fp32 when it is fp16 or bf16, else as it is: MONAI's losses compute in their input's dtype, so the
    logits they read under autocast are cast (fp64 stays fp64)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def check_weight(value, name: str) -> float:
    """``value`` as a float: a real number (Python or NumPy, not a bool), finite and >= 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)

