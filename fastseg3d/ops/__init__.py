"""Functional API of the fused ops (``torch.nn.functional`` style), registered in the ``fastseg3d::`` namespace."""

from __future__ import annotations

from fastseg3d.ops.attention import attention
from fastseg3d.ops.channel_kl import channel_kl
from fastseg3d.ops.dwconv3d import dwconv3d, dwconv3d_tokens
from fastseg3d.ops.group_norm_act import group_norm_act
from fastseg3d.ops.kl_distill import kl_distill, kl_distill_multi
from fastseg3d.ops.layer_norm import add_layer_norm, layer_norm
from fastseg3d.ops.selfreg import random_channel_pairs, selfreg_inter, selfreg_inter_multi, selfreg_intra
from fastseg3d.ops.upsample_sum import upsample_sum

__all__ = [
    "add_layer_norm",
    "attention",
    "channel_kl",
    "dwconv3d",
    "dwconv3d_tokens",
    "group_norm_act",
    "kl_distill",
    "kl_distill_multi",
    "layer_norm",
    "random_channel_pairs",
    "selfreg_inter",
    "selfreg_inter_multi",
    "selfreg_intra",
    "upsample_sum",
]
