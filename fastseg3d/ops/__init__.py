"""Functional API of the fused ops (``torch.nn.functional`` style), registered in the ``fastseg3d::`` namespace."""

from __future__ import annotations

from fastseg3d.ops.attention import attention
from fastseg3d.ops.dwconv3d import dwconv3d, dwconv3d_tokens

__all__ = ["attention", "dwconv3d", "dwconv3d_tokens"]
