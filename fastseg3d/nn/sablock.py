"""``SABlock``: MONAI's self-attention block (ViT, UNETR) on the fused flash-style attention. Needs MONAI."""

from __future__ import annotations

import torch
from monai.networks.blocks.selfattention import SABlock as _MonaiSABlock

from fastseg3d import backends
from fastseg3d.ops.attention import FUSED_HEAD_DIMS, attention

__all__ = ["SABlock"]


class SABlock(_MonaiSABlock):
    """Drop-in ``monai.networks.blocks.SABlock``: same constructor, submodules and ``state_dict`` keys.

    The forward projects q, k and v with the block's own Linear layers, takes them as (B, N, heads, dim_head)
    views of the projections (no rearranging copies) and runs :func:`fastseg3d.ops.attention`: flash-style, so
    the N x N attention matrix is never formed, forward or backward. What the fused kernel has no place for runs
    MONAI's forward (logged once under the ``auto`` backend, ``NotImplementedError`` under ``triton``):
    ``causal=True``, ``rel_pos_embedding``, ``save_attn=True`` (the matrix it saves is never formed),
    ``attention_dtype``, a head size other than 16, 32, 64 or 128, and an ``attn_mask``. Attention dropout in
    training runs the op's reference (the kernel has no dropout); in eval there is none, also for
    ``use_flash_attention=True``, whose MONAI forward passes its dropout rate to ``scaled_dot_product_attention``
    in eval too.

    :func:`fastseg3d.convert_model` turns the SABlocks of an existing network (UNETR, ViT) into this class, those
    with none of the settings above.

    Example:
        >>> import torch
        >>> from fastseg3d.nn.sablock import SABlock
        >>> block = SABlock(hidden_size=64, num_heads=2, qkv_bias=True)
        >>> block(torch.randn(2, 27, 64)).shape
        torch.Size([2, 27, 64])
    """

    def static_reasons(self) -> list[str]:
        """Why this block's configuration can never take the fused op (empty when it can):
        :func:`fastseg3d.convert_model` leaves such blocks MONAI's."""
        reasons = []
        if self.causal:
            reasons.append("causal=True (fused: non-causal)")
        if self.rel_positional_embedding is not None:
            reasons.append("rel_pos_embedding (fused: none)")
        if self.save_attn:
            reasons.append("save_attn=True (the fused kernel never forms the attention matrix)")
        if self.attention_dtype is not None:
            reasons.append(f"attention_dtype={self.attention_dtype} (fused: the input's dtype)")
        if self.dim_head not in FUSED_HEAD_DIMS:
            reasons.append(f"dim_head={self.dim_head} (fused: {', '.join(map(str, FUSED_HEAD_DIMS))})")
        return reasons

    def unfusable_reasons(self, attn_mask: torch.Tensor | None = None) -> list[str]:
        """Why this call (the block, its mode and ``attn_mask``) cannot take the fused op (empty when it can)."""
        reasons = self.static_reasons()
        if self.training and self.dropout_rate >= 1.0:
            reasons.append("dropout_rate=1.0 in training (every attention weight dropped)")
        if attn_mask is not None:
            reasons.append("an attn_mask (fused: none)")
        return reasons

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        reasons = self.unfusable_reasons(attn_mask)
        if reasons:
            backends.select("attention", reasons)
            return super().forward(x, attn_mask)
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.hidden_input_size:
            raise ValueError(f"x must be (B, N, {self.hidden_input_size}) tokens, got shape {tuple(x.shape)}")
        b, n = x.shape[:2]
        h, d = self.num_heads, self.dim_head
        if self.use_combined_linear:
            q, k, v = self.qkv(x).view(b, n, 3, h, d).unbind(2)  # MONAI's "(qkv heads d)" order
        else:
            q, k, v = (proj(x).view(b, n, h, d) for proj in (self.to_q, self.to_k, self.to_v))
        out = attention(q, k, v, self.scale, dropout_p=self.dropout_rate if self.training else 0.0)
        out = out.reshape(b, n, h * d)
        if self.include_fc:
            out = self.out_proj(out)
        return self.drop_output(out)
