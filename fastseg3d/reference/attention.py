"""Reference attention and the reference SegFormer3D efficient self-attention (the unfused composition)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["attention_backward_ref", "attention_forward_ref", "attention_ref", "efficient_self_attention3d_ref"]


def attention_ref(q, k, v, scale: float | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T * scale) v for q (B, N, H, d), k and v (B, M, H, d); returns (B, N, H, d), contiguous as the
    fused op's (SDPA's math backend returns the (B, H, N, d) order)."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p, scale=scale
    )
    return out.transpose(1, 2).contiguous()


def attention_forward_ref(q, k, v, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Output (B, N, H, d) and log-sum-exp (B, H, N) in fp32, materialising the scores (reference only)."""
    acc = torch.promote_types(q.dtype, torch.float32)
    s = torch.einsum("bnhd,bmhd->bhnm", q.to(acc), k.to(acc)) * scale
    lse = torch.logsumexp(s, dim=-1)
    out = torch.einsum("bhnm,bmhd->bnhd", torch.exp(s - lse[..., None]), v.to(acc))
    return out.to(q.dtype).contiguous(), lse.float()


def attention_backward_ref(grad, q, k, v, out, lse, scale: float):
    """(dq, dk, dv) from the saved output and log-sum-exp, with the flash-attention identities."""
    acc = torch.promote_types(q.dtype, torch.float32)
    g, qf, kf, vf = grad.to(acc), q.to(acc), k.to(acc), v.to(acc)
    p = torch.exp(torch.einsum("bnhd,bmhd->bhnm", qf, kf) * scale - lse.to(acc)[..., None])
    delta = (out.to(acc) * g).sum(-1).transpose(1, 2)  # (B, H, N)
    dv = torch.einsum("bhnm,bnhd->bmhd", p, g)
    dp = torch.einsum("bnhd,bmhd->bhnm", g, vf)
    ds = p * (dp - delta[..., None])
    dq = torch.einsum("bhnm,bmhd->bnhd", ds, kf) * scale
    dk = torch.einsum("bhnm,bnhd->bmhd", ds, qf) * scale
    return dq.to(q.dtype).contiguous(), dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous()


def efficient_self_attention3d_ref(module, x: torch.Tensor, spatial_shape: Sequence[int],
                                   sdpa: bool = False) -> torch.Tensor:
    """SegFormer3D's self-attention as the published code composes it, with ``module``'s parameters.

    NCDHW copy -> strided Conv3d -> tokens -> LayerNorm -> key_value; the 2024 release's explicit
    softmax(q k^T * scale) v, or with ``sdpa`` the current release's ``F.scaled_dot_product_attention``.
    """
    b, n, c = x.shape
    heads, d = module.num_heads, c // module.num_heads
    q = module.query(x).reshape(b, n, heads, d).permute(0, 2, 1, 3)
    if module.sr_ratio > 1:
        vol = x.permute(0, 2, 1).reshape(b, c, *spatial_shape).contiguous()
        x_ = module.sr(vol).reshape(b, c, -1).permute(0, 2, 1)
        x_ = module.sr_norm(x_)
    else:
        x_ = x
    kv = module.key_value(x_).reshape(b, -1, 2, heads, d).permute(2, 0, 3, 1, 4)
    k, v = kv[0], kv[1]
    if sdpa:
        out = F.scaled_dot_product_attention(q, k, v, scale=module.scale)
    else:
        out = ((q @ k.transpose(-2, -1)) * module.scale).softmax(dim=-1) @ v
    out = out.transpose(1, 2).reshape(b, n, c)
    return module.proj(out)
