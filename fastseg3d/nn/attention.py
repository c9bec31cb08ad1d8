"""``EfficientSelfAttention3d``: SegFormer3D's spatial-reduction self-attention on the fused attention op."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from torch import nn

from fastseg3d.nn.recompute import layer_norm_for_linear
from fastseg3d.ops.attention import attention, check_dropout, check_scale
from fastseg3d.ops.utils import check_spatial_shape, check_tensor

__all__ = ["EfficientSelfAttention3d"]

class EfficientSelfAttention3d(nn.Module):
    """PVT/SegFormer spatial-reduction attention on 3D token grids, with SegFormer3D's submodule names.

    Queries come from all N = D*H*W tokens; keys and values from the volume reduced by a strided Conv3d
    (kernel = stride = ``sr_ratio``) and a LayerNorm, so M = N / sr_ratio**3. The ``state_dict`` keys match the
    official model: ``query``, ``key_value`` (its 2C outputs viewed as [2][heads][head_dim]), ``proj`` and, when
    ``sr_ratio > 1``, ``sr`` and ``sr_norm``.

    What runs fused: the attention core (:func:`fastseg3d.ops.attention`, flash-style, O(N d) memory), reading
    q, k and v as strided views of the Linear outputs. The spatial reduction reads the tokens in place as a
    ``channels_last_3d`` volume (no NCDHW copy) and runs the strided conv as an implicit GEMM (cuDNN). The
    projections, LayerNorm and residual stay as cuBLAS/ATen calls, by this count: training must keep the attention
    output (the core's backward and ``proj``'s weight gradient read it) and the normalised tokens (``query``'s
    weight gradient), so a fused prologue or epilogue would spare only the ``query`` and ``proj`` outputs' round
    trips, 4 x B*N*C elements. At SegFormer3D's largest stage (128^3 input, B = 2, N = 32^3, C = 32, bf16) that is
    17 MB, about 6 us at 3 TB/s per layer, against a training step of tens of milliseconds; the benchmark case
    ``attention_block`` measures the whole sub-block against the published composition. Attention dropout in
    training runs the reference.

    Args:
        dim: channels C of the tokens.
        num_heads: heads; ``dim`` must be divisible by it.
        sr_ratio: spatial-reduction ratio (1: keys and values from all tokens).
        qkv_bias: bias in ``query`` and ``key_value``.
        attn_drop: dropout on the attention probabilities (training only; runs the reference when > 0).
        proj_drop: dropout after ``proj``.
        scale: logit scale; default ``head_dim ** -0.5`` (SegFormer3D's 2024 release used ``num_heads ** -0.5``).

    Example:
        >>> import torch
        >>> from fastseg3d.nn import EfficientSelfAttention3d
        >>> attn = EfficientSelfAttention3d(dim=32, num_heads=1, sr_ratio=4)
        >>> x = torch.randn(2, 8 * 12 * 4, 32)
        >>> attn(x, (8, 12, 4)).shape
        torch.Size([2, 384, 32])
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        sr_ratio: int = 1,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        scale: float | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("num_heads", num_heads), ("sr_ratio", sr_ratio)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name} must be an int, got {value!r}")
        dim, num_heads, sr_ratio = int(dim), int(num_heads), int(sr_ratio)  # NumPy ints as nn.Linear takes them
        if dim <= 0 or num_heads <= 0 or dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be a positive multiple of num_heads ({num_heads})")
        if sr_ratio < 1:
            raise ValueError(f"sr_ratio must be an int >= 1, got {sr_ratio!r}")
        check_dropout("attn_drop", attn_drop)
        check_dropout("proj_drop", proj_drop)
        check_scale(scale)
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.sr_ratio = sr_ratio
        self.scale = float(scale) if scale is not None else self.head_dim**-0.5
        self.attn_drop = float(attn_drop)
        self.query = nn.Linear(dim, dim, bias=qkv_bias)
        self.key_value = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_dropout = nn.Dropout(proj_drop)
        if sr_ratio > 1:
            self.sr = nn.Conv3d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.sr_norm = nn.LayerNorm(dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, sr_ratio={self.sr_ratio}, scale={self.scale:.4g}"

    def forward(self, x: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
        check_tensor(x, "x")
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be tokens (B, N, {self.dim}), got shape {tuple(x.shape)}")
        b, n, c = x.shape
        d, h, w = check_spatial_shape(spatial_shape, n)
        sr = self.sr_ratio
        if d % sr or h % sr or w % sr:
            raise ValueError(f"spatial_shape {(d, h, w)} must be divisible by sr_ratio={sr} on every axis")

        q = self.query(x).unflatten(-1, (self.num_heads, self.head_dim))
        if sr > 1:
            # Tokens are already NDHWC: read them as a channels_last_3d volume, no copy.
            vol = x.unflatten(1, (d, h, w)).permute(0, 4, 1, 2, 3)
            reduced = self.sr(vol).flatten(2).transpose(1, 2)
            reduced = layer_norm_for_linear(reduced, self.sr_norm)  # read only by key_value
        else:
            reduced = x
        kv = self.key_value(reduced).unflatten(-1, (2, self.num_heads, self.head_dim))
        # strided views read in place; unbind's backward stacks dk and dv into kv's gradient in one kernel (two
        # selects would zero-fill two kv-sized buffers, copy into each and add them: five kernels)
        k, v = kv.unbind(2)
        out = attention(q, k, v, self.scale, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_dropout(self.proj(out.reshape(b, n, c)))
