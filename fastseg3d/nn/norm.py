"""``GroupNorm`` and ``InstanceNorm3d``: the torch norms, running the fused GroupNorm kernel on volumes."""

from __future__ import annotations

import torch
from torch import nn

from fastseg3d.ops.group_norm_act import group_norm_act

__all__ = ["GroupNorm", "InstanceNorm3d"]


def _check_channels(input: torch.Tensor, channels: int) -> None:
    if input.shape[1] != channels:
        raise ValueError(f"input has {input.shape[1]} channels but this layer normalises {channels} (input shape "
                         f"{tuple(input.shape)})")


class GroupNorm(nn.GroupNorm):
    """Drop-in ``nn.GroupNorm``: same constructor, parameters, ``state_dict`` and ``repr``.

    On a volume (B, C, D, H, W), NCDHW or ``channels_last_3d``, the forward runs
    :func:`fastseg3d.ops.group_norm_act` (one kernel each way on CUDA, statistics in fp32, under the backend
    policy: the reference elsewhere); other ranks run ``nn.GroupNorm.forward``. One difference under autocast:
    ``nn.GroupNorm`` computes in fp32 and returns fp32, this returns the same values rounded to the input's dtype
    (what the convolution after it reads), without the fp32 copies.

    Example:
        >>> import torch
        >>> from fastseg3d.nn import GroupNorm
        >>> norm = GroupNorm(4, 16)
        >>> torch.allclose(norm(x := torch.randn(2, 16, 4, 5, 6)), torch.nn.GroupNorm(4, 16)(x), atol=1e-6)
        True
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (isinstance(input, torch.Tensor) and input.dim() == 5):
            return super().forward(input)
        _check_channels(input, self.num_channels)
        return group_norm_act(input, self.num_groups, self.weight, self.bias, self.eps)


class InstanceNorm3d(nn.InstanceNorm3d):
    """Drop-in ``nn.InstanceNorm3d``: same constructor, parameters, buffers, ``state_dict`` and ``repr``.

    Without running statistics (``track_running_stats=False``, the default, and MONAI's "instance" norm) an
    InstanceNorm is a GroupNorm with one channel per group, and on batched volumes the forward runs
    :func:`fastseg3d.ops.group_norm_act` as :class:`GroupNorm` does (affine or not; under autocast both keep the
    input's dtype: instance norm is not among autocast's fp32 ops). With running statistics, and on unbatched
    input, it runs ``nn.InstanceNorm3d.forward``.

    Example:
        >>> import torch
        >>> from fastseg3d.nn import InstanceNorm3d
        >>> norm = InstanceNorm3d(8, affine=True)
        >>> torch.allclose(norm(x := torch.randn(2, 8, 4, 5, 6)), torch.nn.InstanceNorm3d(8, affine=True)(x),
        ...                atol=1e-6)
        True
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if (self.track_running_stats or not (isinstance(input, torch.Tensor) and input.dim() == 5)
                or input.shape[2] * input.shape[3] * input.shape[4] == 1):  # torch's refusal of one voxel
            return super().forward(input)
        if self.affine:
            _check_channels(input, self.num_features)
        return group_norm_act(input, input.shape[1], self.weight, self.bias, self.eps)
