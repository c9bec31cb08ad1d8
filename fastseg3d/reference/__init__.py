"""Pure-PyTorch references of every fused op: the test oracle and the fallback off the fast path."""

from __future__ import annotations

from fastseg3d.reference.attention import (
    attention_backward_ref,
    attention_forward_ref,
    attention_ref,
    efficient_self_attention3d_ref,
)
from fastseg3d.reference.dwconv3d import (
    ACTIVATIONS,
    activation_grad_ref,
    activation_ref,
    dwconv3d_backward_ref,
    dwconv3d_ref,
    dwconv3d_tokens_ref,
)

__all__ = [
    "ACTIVATIONS",
    "activation_grad_ref",
    "activation_ref",
    "attention_backward_ref",
    "attention_forward_ref",
    "attention_ref",
    "dwconv3d_backward_ref",
    "dwconv3d_ref",
    "dwconv3d_tokens_ref",
    "efficient_self_attention3d_ref",
]
