"""Drop-in ``nn.Module``s: same constructor, parameters and ``state_dict`` keys as the layers they replace."""

from __future__ import annotations

from fastseg3d.nn.attention import EfficientSelfAttention3d
from fastseg3d.nn.autocast_weights import autocast_weights
from fastseg3d.nn.dwconv3d import DepthwiseConv3d

__all__ = ["DepthwiseConv3d", "EfficientSelfAttention3d", "autocast_weights"]
