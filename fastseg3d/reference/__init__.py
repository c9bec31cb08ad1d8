"""Pure-PyTorch references of every fused op: the test oracle and the fallback off the fast path."""

from __future__ import annotations

from fastseg3d.reference.attention import (
    attention_backward_ref,
    attention_forward_ref,
    attention_ref,
    efficient_self_attention3d_ref,
)
from fastseg3d.reference.channel_kl import REDUCTIONS, channel_kl_fused_ref, channel_kl_normaliser, channel_kl_ref
from fastseg3d.reference.dice_ce import dice_ce_ref, upsampled_logits
from fastseg3d.reference.dwconv3d import (
    ACTIVATIONS,
    activation_grad_ref,
    activation_ref,
    dwconv3d_backward_ref,
    dwconv3d_ref,
    dwconv3d_tokens_ref,
)
from fastseg3d.reference.group_norm_act import (
    group_norm_act_apply_ref,
    group_norm_act_backward_ref,
    group_norm_act_fused_ref,
    group_norm_act_ref,
)
from fastseg3d.reference.kl_distill import common_size, kl_distill_fused_ref, kl_distill_multi_ref, kl_distill_ref
from fastseg3d.reference.layer_norm import layer_norm_backward_ref, layer_norm_fused_ref, layer_norm_ref
from fastseg3d.reference.selfreg import (
    intra_order,
    pooled_size,
    selfreg_inter_fused_ref,
    selfreg_inter_multi_ref,
    selfreg_inter_ref,
    selfreg_intra_fused_ref,
    selfreg_intra_ref,
)
from fastseg3d.reference.upsample_sum import upsample_sum_ref

__all__ = [
    "activation_grad_ref",
    "activation_ref",
    "ACTIVATIONS",
    "attention_backward_ref",
    "attention_forward_ref",
    "attention_ref",
    "channel_kl_fused_ref",
    "channel_kl_normaliser",
    "channel_kl_ref",
    "common_size",
    "dice_ce_ref",
    "dwconv3d_backward_ref",
    "dwconv3d_ref",
    "dwconv3d_tokens_ref",
    "efficient_self_attention3d_ref",
    "group_norm_act_apply_ref",
    "group_norm_act_backward_ref",
    "group_norm_act_fused_ref",
    "group_norm_act_ref",
    "intra_order",
    "kl_distill_fused_ref",
    "kl_distill_multi_ref",
    "kl_distill_ref",
    "layer_norm_backward_ref",
    "layer_norm_fused_ref",
    "layer_norm_ref",
    "pooled_size",
    "REDUCTIONS",
    "selfreg_inter_fused_ref",
    "selfreg_inter_multi_ref",
    "selfreg_inter_ref",
    "selfreg_intra_fused_ref",
    "selfreg_intra_ref",
    "upsample_sum_ref",
    "upsampled_logits",
]
