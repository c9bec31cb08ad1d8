"""Helpers shared by the distillation losses."""

from __future__ import annotations

import contextlib
import math
import numbers
import re

import torch

__all__ = ["as_volume", "check_like", "check_weight", "full_precision", "named_errors"]


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


def check_like(named: list[tuple[str, torch.Tensor]], ref_name: str, ref: torch.Tensor) -> None:
    """Each ``(name, tensor)`` has ``ref``'s rank and batch size, so an error names the argument the caller passed
    rather than the fused op's ``students[k]`` (a 2-D map beside 3-D ones would otherwise read as depth 1). The
    callers have checked that each is a tensor."""
    for name, t in named:
        if t.dim() != ref.dim():
            raise ValueError(f"{name} is {t.dim()}-D but {ref_name} is {ref.dim()}-D: the maps of one loss are all "
                             "2-D or all 3-D")
        if t.shape[0] != ref.shape[0]:
            raise ValueError(f"{name} has batch size {t.shape[0]} but {ref_name} has {ref.shape[0]}")


@contextlib.contextmanager
def named_errors(students: list[str], teacher: str):
    """Inside, a fused op's ``ValueError``/``TypeError`` about its ``students[k]`` (or ``student``) and ``teacher``
    is raised again with the loss's own argument names."""
    try:
        yield
    except (ValueError, TypeError) as e:
        msg = re.sub(r"\bstudents\[(\d+)\]", lambda m: students[int(m.group(1))], str(e))
        msg = re.sub(r"\bstudent\b", students[0], msg) if len(students) == 1 else msg
        raise type(e)(re.sub(r"\bteacher\b", teacher, msg)) from e
