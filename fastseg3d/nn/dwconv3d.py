"""``DepthwiseConv3d``: an ``nn.Conv3d`` that runs the fused depthwise kernel when its configuration allows."""

from __future__ import annotations

import torch
from torch import nn

from fastseg3d.ops.dwconv3d import dwconv3d

__all__ = ["DepthwiseConv3d"]


class DepthwiseConv3d(nn.Conv3d):
    """Drop-in ``nn.Conv3d``: same constructor, parameters, ``state_dict`` and ``repr``.

    The forward runs :func:`fastseg3d.ops.dwconv3d` when the layer is depthwise (``groups == in_channels ==
    out_channels``) with stride 1 and zero padding; any other configuration runs ``nn.Conv3d.forward``.

    Example:
        >>> import torch
        >>> from fastseg3d.nn import DepthwiseConv3d
        >>> conv = DepthwiseConv3d(16, 16, kernel_size=3, padding=1, groups=16)
        >>> conv(torch.randn(1, 16, 8, 8, 8)).shape
        torch.Size([1, 16, 8, 8, 8])
    """

    def fusable(self) -> bool:
        return (
            self.groups == self.in_channels == self.out_channels
            and tuple(self.stride) == (1, 1, 1)
            and self.padding_mode == "zeros"
        )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.fusable():
            return super().forward(input)
        padding = self.padding if isinstance(self.padding, str) else tuple(self.padding)
        return dwconv3d(input, self.weight, self.bias, padding=padding, dilation=tuple(self.dilation))
