"""Drop-in ``nn.Module``s with the ``state_dict`` keys of the layers they replace: ``DepthwiseConv3d``,
``GroupNorm`` and ``InstanceNorm3d`` have their torch layers' constructors too, ``SABlock`` MONAI's (imported on
first use: it needs MONAI); ``EfficientSelfAttention3d`` has the keys of SegFormer3D's attention, but a forward
that takes the volume's ``spatial_shape``."""

from __future__ import annotations

from fastseg3d.nn.attention import EfficientSelfAttention3d
from fastseg3d.nn.autocast_weights import autocast_weights
from fastseg3d.nn.dwconv3d import DepthwiseConv3d
from fastseg3d.nn.norm import GroupNorm, InstanceNorm3d

__all__ = ["DepthwiseConv3d", "EfficientSelfAttention3d", "GroupNorm", "InstanceNorm3d", "SABlock", "autocast_weights"]


def __getattr__(name: str):
    if name == "SABlock":  # subclasses MONAI's block: importing fastseg3d.nn must not need MONAI
        from fastseg3d.nn.sablock import SABlock

        return SABlock
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
