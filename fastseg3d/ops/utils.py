"""Shared helpers of the op layer."""

from __future__ import annotations

import torch

from fastseg3d import backends

__all__ = [
    "FUSED_DTYPES",
    "MAX_GRID_YZ",
    "autocast_inputs",
    "base_reasons",
    "check_tensor",
    "empty",
    "launchable",
    "layout_of",
]

FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_GRID_YZ = 65535  # CUDA's limit on the second and third grid dimensions


def base_reasons(t: torch.Tensor) -> list[str]:
    """The reasons every fused op shares for not taking ``t``: its device and its dtype."""
    reasons = backends.device_reasons(t.device)
    if t.dtype not in FUSED_DTYPES:
        reasons.append(f"dtype={t.dtype} (fused: float32, float16, bfloat16)")
    return reasons


def empty(shape, *, dtype: torch.dtype, device: torch.device, memory_format=torch.contiguous_format) -> torch.Tensor:
    """Every buffer a fused op hands to a kernel is allocated here (tests swap in a NaN-filling version)."""
    return torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)


def layout_of(x: torch.Tensor) -> torch.memory_format:
    """The memory format an op's 5-D output takes from its input: channels-last when the channel stride is 1."""
    if x.dim() == 5 and x.shape[1] > 1 and x.stride(1) == 1:
        return torch.channels_last_3d
    return torch.contiguous_format


def autocast_inputs(device_type: str, *tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Cast floating inputs to the autocast dtype when autocast is on, as ATen's conv and attention ops do."""
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)
    return tensors


def launchable(device: torch.device) -> bool:
    """Whether a Triton kernel can run on ``device`` right now (CUDA, or CPU under the interpreter).

    Op bodies branch on this before any launch: ``meta`` tensors and other devices take the reference or fake path.
    """
    return device.type == "cuda" or (device.type == "cpu" and backends.HAS_TRITON and backends.interpreter_active())


def check_tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
