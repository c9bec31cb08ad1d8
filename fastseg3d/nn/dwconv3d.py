"""``DepthwiseConv3d``: an ``nn.Conv3d`` that runs the fused depthwise kernel when its configuration allows."""

from __future__ import annotations

import torch
from torch import nn

from fastseg3d import backends
from fastseg3d.ops.dwconv3d import dwconv3d

__all__ = ["DepthwiseConv3d"]


class DepthwiseConv3d(nn.Conv3d):
    """Drop-in ``nn.Conv3d``: same constructor, parameters, ``state_dict`` and ``repr`` arguments.

    The forward runs :func:`fastseg3d.ops.dwconv3d` when the layer is depthwise (``groups == in_channels ==
    out_channels``) with stride 1 and zero padding; any other configuration runs ``nn.Conv3d.forward``, under the
    backend policy as the op's own fallbacks (logged once under ``auto``, ``NotImplementedError`` under
    ``triton``). Unbatched (C, D, H, W) input is taken, as ``nn.Conv3d`` takes it. Wrong input raises
    ``ValueError``/``TypeError`` naming it (``nn.Conv3d`` raises ``RuntimeError``). The fused path has backward
    formulas only: a double backward through it raises, and ``torch.func`` transforms run the reference.

    Example:
        >>> import torch
        >>> from fastseg3d.nn import DepthwiseConv3d
        >>> conv = DepthwiseConv3d(16, 16, kernel_size=3, padding=1, groups=16)
        >>> conv(torch.randn(1, 16, 8, 8, 8)).shape
        torch.Size([1, 16, 8, 8, 8])
    """

    def unfusable_reasons(self) -> list[str]:
        """Why the configuration cannot take the fused op (empty when it can)."""
        reasons = []
        if not self.groups == self.in_channels == self.out_channels:
            reasons.append(f"groups={self.groups} with {self.in_channels} -> {self.out_channels} channels "
                           "(fused: depthwise, groups == in == out channels)")
        if tuple(self.stride) != (1, 1, 1):
            reasons.append(f"stride {tuple(self.stride)} (fused: 1)")
        if self.padding_mode != "zeros":
            reasons.append(f"padding_mode={self.padding_mode!r} (fused: 'zeros')")
        return reasons

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        reasons = self.unfusable_reasons()
        if reasons:
            # raises under the triton backend; under auto an INFO line once (convert_model leaves such layers alone)
            backends.select("dwconv3d", reasons)
            return super().forward(input)
        if isinstance(input, torch.Tensor):
            if input.dim() not in (4, 5):
                raise ValueError(f"input must be 5-D (B, C, D, H, W) or unbatched 4-D (C, D, H, W), got shape "
                                 f"{tuple(input.shape)}")
            # the op would take a weight with a multiple of x's channels as a channel multiplier
            if input.shape[-4] != self.in_channels:
                raise ValueError(f"input has {input.shape[-4]} channels but this layer has "
                                 f"in_channels={self.in_channels} (input shape {tuple(input.shape)})")
            if input.dim() == 4:
                return self.forward(input.unsqueeze(0)).squeeze(0)
        padding = self.padding if isinstance(self.padding, str) else tuple(self.padding)
        return dwconv3d(input, self.weight, self.bias, padding=padding, dilation=tuple(self.dilation))
