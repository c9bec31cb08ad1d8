"""SegFormer3D (Perera et al., 2024) on fastseg3d's fused layers, with the official ``state_dict`` keys."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastseg3d.nn.attention import EfficientSelfAttention3d
from fastseg3d.nn.autocast_weights import autocast_weights
from fastseg3d.nn.dwconv3d import DepthwiseConv3d
from fastseg3d.nn.recompute import (
    add_layer_norm,
    apply_layer_norm,
    batch_norm_act_linear,
    has_hooks,
    layer_norm_for_linear,
    needs_own_call,
)
from fastseg3d.ops.dwconv3d import dwconv3d_tokens
from fastseg3d.ops.upsample_sum import upsample_sum

__all__ = ["MixFFN3d", "SegFormer3D"]


def _per_axis(value, name: str, low: int) -> tuple[int, int, int]:
    """A stage's entry of ``name`` as 3 Python ints >= ``low``: an integer (NumPy's too) for every axis, or one each."""
    entries = (value,) * 3 if _is_int(value) else tuple(value) if isinstance(value, Sequence) else ()
    if len(entries) != 3 or not all(_is_int(v) and v >= low for v in entries):
        raise ValueError(f"{name} entries must be ints >= {low} or 3-tuples of them, got {value!r}")
    return tuple(int(v) for v in entries)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _mlp_ratio(value) -> int:
    """An expansion ratio as an int: integral reals such as 4.0 are accepted, the hidden width must be whole."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or value <= 0 or not float(value).is_integer():
        raise ValueError(f"mlp_ratio must be a positive integer (or one per stage), got {value!r}")
    return int(value)


class _DWConvBN(nn.Module):
    """Depthwise 3x3x3 conv + BatchNorm3d; keys ``dwconv.*`` and ``bn.*`` as in the official DWConv."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv3d(dim, dim, 3, 1, 1, bias=True, groups=dim)
        self.bn = nn.BatchNorm3d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``bn(dwconv(x))`` on a (B, C, D, H, W) volume: the plain composition (hooks on these layers see it)."""
        return self.bn(self.dwconv(x))

    def uses_batch_stats(self) -> bool:
        return self.bn.training or self.bn.running_mean is None

    def folded_gelu(self, x: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
        """``gelu(bn(dwconv(x)))`` on tokens with running statistics: BatchNorm folds into the conv, one kernel."""
        inv = self.bn.weight * torch.rsqrt(self.bn.running_var + self.bn.eps)
        weight = self.dwconv.weight * inv[:, None, None, None, None]
        bias = (self.dwconv.bias - self.bn.running_mean) * inv + self.bn.bias
        return dwconv3d_tokens(x, spatial_shape, weight, bias, activation="gelu")


class MixFFN3d(nn.Module):
    """SegFormer3D's Mix-FFN on tokens: fc1 -> depthwise conv -> BatchNorm -> GELU -> fc2, with no transposes.

    Keys: ``fc1``, ``dwconv.dwconv``, ``dwconv.bn``, ``fc2``. With running statistics (eval) the BatchNorm folds into
    the conv, and conv + bias + BatchNorm + GELU is one fused kernel. With batch statistics (training) the conv runs
    fused on the tokens, and BatchNorm -> GELU -> fc2 saves only the conv output and the batch statistics,
    recomputing the normalised and activated tensor in backward; on CUDA BatchNorm and GELU are one kernel that
    writes fc2's input once (:func:`fastseg3d.nn.recompute.batch_norm_act_linear`).
    """

    def __init__(self, dim: int, mlp_ratio: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        hidden = _mlp_ratio(mlp_ratio) * dim
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = _DWConvBN(hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
        h = self.fc1(x)
        if (needs_own_call(self.dwconv, _DWConvBN) or has_hooks(self.dwconv.dwconv, self.dwconv.bn, self.fc2)
                or type(self.dwconv.dwconv) not in (nn.Conv3d, DepthwiseConv3d) or type(self.fc2) is not nn.Linear):
            # hooked or replaced layers run as called (a fused path reads their weights and would skip them)
            vol = self.dwconv(h.unflatten(1, tuple(spatial_shape)).permute(0, 4, 1, 2, 3))
            return self.dropout(self.fc2(self.dropout(F.gelu(vol).permute(0, 2, 3, 4, 1).flatten(1, 3))))
        if not self.dwconv.uses_batch_stats():
            return self.dropout(self.fc2(self.dropout(self.dwconv.folded_gelu(h, spatial_shape))))
        y = dwconv3d_tokens(h, spatial_shape, self.dwconv.dwconv.weight, self.dwconv.dwconv.bias)
        vol = y.unflatten(1, tuple(spatial_shape)).permute(0, 4, 1, 2, 3)  # channels_last_3d view
        if self.training and self.dropout.p > 0:
            hidden = self.dropout(F.gelu(self.dwconv.bn(vol)).permute(0, 2, 3, 4, 1).flatten(1, 3))
            return self.dropout(self.fc2(hidden))
        return self.dropout(batch_norm_act_linear(vol, self.dwconv.bn, "gelu", self.fc2.weight, self.fc2.bias))


class _TransformerBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, sr_ratio: int, mlp_ratio: int, scale: float | None) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = EfficientSelfAttention3d(dim, num_heads, sr_ratio=sr_ratio, qkv_bias=True, scale=scale)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MixFFN3d(dim, mlp_ratio)

    def forward(self, x: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
        x, branch = self.branches(x, None, spatial_shape)
        return x + branch

    def branches(self, x: torch.Tensor, pending: torch.Tensor | None, spatial_shape: Sequence[int]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """The block on ``x + pending`` (None: on x), returning its residual stream before the last add and the
        Mix-FFN's output: each residual add joins the LayerNorm after it (:func:`add_layer_norm`), this block's
        and, for its last one, the next block's or the stage's."""
        # the block norms' outputs go only to Linear (and conv) layers: written in the dtype those read
        if pending is None:
            h = layer_norm_for_linear(x, self.norm1)
        else:
            x, h = add_layer_norm(x, pending, self.norm1, for_linear=True)
        x, h = add_layer_norm(x, self.attention(h, spatial_shape), self.norm2, for_linear=True)
        return x, self.mlp(h, spatial_shape)


class _PatchEmbedding(nn.Module):
    def __init__(self, in_channels: int, dim: int, kernel_size, stride, padding) -> None:
        super().__init__()
        self.patch_embeddings = nn.Conv3d(in_channels, dim, kernel_size=kernel_size, stride=stride, padding=padding)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        y = self.patch_embeddings(x)
        spatial = tuple(y.shape[2:])
        return apply_layer_norm(y.flatten(2).transpose(1, 2), self.norm), spatial


class _Encoder(nn.Module):
    """MixVisionTransformer: attribute names ``embed_{s}``, ``tf_block{s}``, ``norm{s}`` as in the official code."""

    def __init__(self, in_channels, embed_dims, depths, num_heads, sr_ratios, mlp_ratios, kernels, strides, paddings,
                 scales):
        super().__init__()
        prev = in_channels
        for s in range(4):
            setattr(self, f"embed_{s + 1}", _PatchEmbedding(prev, embed_dims[s], kernels[s], strides[s], paddings[s]))
            blocks = [_TransformerBlock(embed_dims[s], num_heads[s], sr_ratios[s], mlp_ratios[s], scales[s])
                      for _ in range(depths[s])]
            setattr(self, f"tf_block{s + 1}", nn.ModuleList(blocks))
            setattr(self, f"norm{s + 1}", nn.LayerNorm(embed_dims[s]))
            prev = embed_dims[s]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = []
        for s in range(1, 5):
            tokens, spatial = getattr(self, f"embed_{s}")(x)
            pending = None  # the last block's Mix-FFN output, added in the next norm's kernel
            for block in getattr(self, f"tf_block{s}"):
                # hooks, activation checkpointing (fastseg3d.train's too) or a wrapper see the block's own call
                if needs_own_call(block, _TransformerBlock):
                    if pending is not None:
                        tokens, pending = tokens + pending, None
                    tokens = block(tokens, spatial)
                else:
                    tokens, pending = block.branches(tokens, pending, spatial)
            # read only by the next stage's patch conv and the decoder's Linear: written in the dtype they read
            norm = getattr(self, f"norm{s}")
            if pending is None:
                tokens = layer_norm_for_linear(tokens, norm)
            else:
                tokens = add_layer_norm(tokens, pending, norm, for_linear=True)[1]
            # (B, N, C) -> (B, C, D, H, W) as a channels_last_3d view: no copy.
            x = tokens.unflatten(1, spatial).permute(0, 4, 1, 2, 3)
            maps.append(x)
        return maps


class _LinearEmbed(nn.Module):
    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)
        self.bn = nn.LayerNorm(out_dim)  # named ``bn`` in the official code, but a LayerNorm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, D, H, W) -> LayerNorm(proj(tokens)), (B, N, out_dim), the plain composition."""
        return self.bn(self.proj(x.flatten(2).transpose(1, 2)))

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` with the LayerNorm writing the dtype the next Linear reads."""
        return layer_norm_for_linear(self.proj(x.flatten(2).transpose(1, 2)), self.bn)


class _Decoder(nn.Module):
    def __init__(self, embed_dims, decoder_dim: int, num_classes: int, dropout: float, upsample) -> None:
        super().__init__()
        for i, dim in enumerate(embed_dims):
            setattr(self, f"linear_c{i + 1}", _LinearEmbed(dim, decoder_dim))
        self.linear_fuse = nn.Sequential(
            nn.Conv3d(4 * decoder_dim, decoder_dim, 1, bias=False),
            nn.BatchNorm3d(decoder_dim),
            nn.ReLU(),
        )
        self.dropout = nn.Dropout(dropout)
        self.linear_pred = nn.Conv3d(decoder_dim, num_classes, 1)
        self.upsample_volume = nn.Upsample(scale_factor=upsample, mode="trilinear", align_corners=False)

    def forward(self, c1, c2, c3, c4) -> torch.Tensor:
        # linear_fuse's 1x1x1 conv over the 1,024-channel concat of upsampled maps equals the sum of its four
        # 256-channel slices applied to each map *before* upsampling (both are linear): same result, and neither the
        # concat nor the three upsampled 256-channel inputs are materialised or saved for backward. The three
        # upsamplings and the sum are one kernel where it runs (fastseg3d.ops.upsample_sum), writing the sum once.
        size = c1.shape[2:]
        embeds = [getattr(self, f"linear_c{i}") for i in (4, 3, 2, 1)]
        if (needs_own_call(self.linear_pred, nn.Conv3d) or needs_own_call(self.linear_fuse, nn.Sequential)
                or type(self.linear_fuse[0]) is not nn.Conv3d
                or has_hooks(self.dropout, *self.linear_fuse, *(m for e in embeds for m in e.modules()))):
            # the published composition, each layer called (hooks see it, a replaced layer runs)
            maps = []
            for embed, c in zip(embeds, (c4, c3, c2, c1)):
                vol = embed(c).transpose(1, 2).unflatten(2, c.shape[2:])
                maps.append(F.interpolate(vol, size=size, mode="trilinear", align_corners=False))
            fused = self.linear_fuse(torch.cat(maps, dim=1))
            return self.upsample_volume(self.linear_pred(self.dropout(fused)).contiguous())
        fuse_weight = self.linear_fuse[0].weight.flatten(1)
        width = fuse_weight.shape[0]
        parts = []
        for j, (embed, c) in enumerate(zip(embeds, (c4, c3, c2, c1))):
            tokens = embed.tokens(c)
            part = F.linear(tokens, fuse_weight[:, j * width:(j + 1) * width])
            parts.append(part.unflatten(1, c.shape[2:]).permute(0, 4, 1, 2, 3))
        fused = upsample_sum(parts, size)
        if self.training and self.dropout.p > 0:
            logits = self.linear_pred(self.dropout(self.linear_fuse[2](self.linear_fuse[1](fused))))
        else:
            # BatchNorm -> ReLU -> 1x1x1 conv saving only ``fused`` (see fastseg3d.nn.recompute).
            pred = self.linear_pred
            tokens = batch_norm_act_linear(fused, self.linear_fuse[1], "relu", pred.weight.flatten(1), pred.bias)
            logits = tokens.unflatten(1, size).permute(0, 4, 1, 2, 3)
        # NCDHW logits, as the official model returns them: copying the small map keeps the upsampled one so
        return self.upsample_volume(logits.contiguous())


class SegFormer3D(nn.Module):
    """SegFormer3D: a 4-stage efficient-attention encoder and an all-MLP decoder for volumes.

    At the defaults this is exactly the published BraTS model: 4,525,251 parameters and the official ``state_dict``
    keys (``segformer_encoder.*``, ``segformer_decoder.*``), so an official checkpoint loads with ``strict=True``.
    Unlike the official code it takes any input whose sides are divisible by the total stride (e.g. 64x96x32),
    and per-axis (anisotropic) patch kernels, strides and paddings.

    What is fused: the attention core of every block (:class:`fastseg3d.nn.EfficientSelfAttention3d`: flash-style,
    O(N d) memory, spatial reduction on the tokens in place); the Mix-FFN's depthwise conv runs on the token layout
    with no transposes, and in eval its BatchNorm folds into the conv so conv + BatchNorm + GELU is one kernel. Stage
    outputs are channels-last views of the tokens (the official code makes a contiguous NCDHW copy per stage). The
    decoder projects each stage's map before upsampling (no 1,024-channel concat) and resizes and sums the four
    projections in one kernel (:func:`fastseg3d.ops.upsample_sum`). The LayerNorms read only by a Linear or conv
    (each block's two, the spatial reduction's, the decoder's, each stage's last) write that layer's input dtype
    directly under autocast (:func:`fastseg3d.nn.recompute.layer_norm_for_linear`; a stage map's two gradients, from
    the next patch embedding and the decoder, are then added in bf16, as autocast adds those of any bf16 tensor read
    twice, and the encoder returns bf16 maps under autocast), the patch embeddings' read the
    conv's output in its dtype (:func:`fastseg3d.nn.recompute.apply_layer_norm`), and each residual add runs in the
    kernel of the LayerNorm after it, forward and backward (:func:`fastseg3d.nn.recompute.add_layer_norm`).

    Args:
        spatial_dims: must be 3.
        in_channels: input channels (4 for BraTS).
        out_channels: classes (3 for BraTS TC/WT/ET); logits, no activation.
        embed_dims, depths, num_heads, sr_ratios: per stage.
        mlp_ratio: Mix-FFN expansion, a positive integer (an integral float such as 4.0 too) or one per stage.
        patch_kernel_size, patch_stride, patch_padding: per stage, each an int or a 3-tuple (anisotropic).
        decoder_dim: width of the all-MLP decoder.
        attention_scale: "head_dim" (1/sqrt(head_dim), the current official code) or "num_heads"
            (1/sqrt(num_heads), the 2024 release that produced the published weights).
        decoder_dropout: dropout before the prediction conv.

    Example:
        >>> import torch
        >>> from fastseg3d.networks import SegFormer3D
        >>> net = SegFormer3D().eval()
        >>> net(torch.randn(1, 4, 64, 96, 32)).shape
        torch.Size([1, 3, 64, 96, 32])
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 4,
        out_channels: int = 3,
        embed_dims: Sequence[int] = (32, 64, 160, 256),
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (1, 2, 5, 8),
        sr_ratios: Sequence[int] = (4, 2, 1, 1),
        mlp_ratio: float | Sequence[float] = 4,
        patch_kernel_size: Sequence = (7, 3, 3, 3),
        patch_stride: Sequence = (4, 2, 2, 2),
        patch_padding: Sequence = (3, 1, 1, 1),
        decoder_dim: int = 256,
        attention_scale: str = "head_dim",
        decoder_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if spatial_dims != 3:
            raise ValueError(f"SegFormer3D supports spatial_dims=3 only, got {spatial_dims}")
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                            ("decoder_dim", decoder_dim)):
            if not _is_int(value) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(decoder_dropout, bool) or not isinstance(decoder_dropout, numbers.Real) or not (
                0.0 <= decoder_dropout < 1.0):
            raise ValueError(f"decoder_dropout must be a number in [0, 1), got {decoder_dropout!r}")
        if isinstance(mlp_ratio, numbers.Real):
            mlp_ratios = (mlp_ratio,) * 4
        else:
            mlp_ratios = mlp_ratio
        for name, value in (("embed_dims", embed_dims), ("depths", depths), ("num_heads", num_heads),
                            ("sr_ratios", sr_ratios), ("mlp_ratio", mlp_ratios),
                            ("patch_kernel_size", patch_kernel_size), ("patch_stride", patch_stride),
                            ("patch_padding", patch_padding)):
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 4:
                raise ValueError(f"{name} must give 4 stages, got {value!r}")
        mlp_ratios = tuple(_mlp_ratio(r) for r in mlp_ratios)
        for name, value, low in (("embed_dims", embed_dims, 1), ("depths", depths, 0), ("num_heads", num_heads, 1),
                                 ("sr_ratios", sr_ratios, 1)):
            if not all(_is_int(v) and v >= low for v in value):
                raise ValueError(f"{name} must be 4 ints >= {low}, got {tuple(value)!r}")
        for dim, heads in zip(embed_dims, num_heads):
            if dim % heads:
                raise ValueError(f"embed_dims {tuple(embed_dims)} must be divisible by num_heads {tuple(num_heads)}")
        if attention_scale not in ("head_dim", "num_heads"):
            raise ValueError(f"attention_scale must be 'head_dim' or 'num_heads', got {attention_scale!r}")
        kernels = [_per_axis(k, "patch_kernel_size", 1) for k in patch_kernel_size]
        strides = [_per_axis(s, "patch_stride", 1) for s in patch_stride]
        paddings = [_per_axis(p, "patch_padding", 0) for p in patch_padding]
        for stage, (ks, ss, ps) in enumerate(zip(kernels, strides, paddings)):
            # a side divisible by the stride must come out divided by it: floor((2p - k) / s) = -1
            if not all(k - s <= 2 * p < k for k, s, p in zip(ks, ss, ps)):
                raise ValueError(f"patch_padding {ps} of stage {stage} does not divide the grid by its stride {ss} "
                                 f"with kernel {ks}: each axis needs kernel - stride <= 2 * padding < kernel")
        scales = [heads**-0.5 if attention_scale == "num_heads" else None for heads in num_heads]

        self.in_channels = in_channels
        self.sr_ratios = tuple(sr_ratios)
        self.depths = tuple(depths)
        self.strides = strides
        self._grid_stride = tuple(math.prod(stride[axis] for stride in strides) for axis in range(3))  # last stage
        self.segformer_encoder = _Encoder(in_channels, embed_dims, depths, num_heads, sr_ratios, mlp_ratios,
                                          kernels, strides, paddings, scales)
        self.segformer_decoder = _Decoder(embed_dims, decoder_dim, out_channels, decoder_dropout,
                                          upsample=tuple(float(s) for s in strides[0]))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # The official initialisation.
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, nn.BatchNorm3d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv3d):
            fan_out = math.prod(m.kernel_size) * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @property
    def total_stride(self) -> tuple[int, int, int]:
        """Per axis, the factor every input side must be divisible by: the patch strides and stage reductions."""
        out = []
        for axis in range(3):
            total = 1
            for stride in self.strides:
                total *= stride[axis]
            # Each stage's grid must also be divisible by its spatial-reduction ratio (a stage without blocks
            # has no attention to reduce for)
            grid_factor = 1
            for s, stride in enumerate(self.strides):
                grid_factor *= stride[axis]
                if self.depths[s]:
                    total = math.lcm(total, grid_factor * self.sr_ratios[s])
            out.append(total)
        return tuple(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5:
            raise ValueError(f"input must be 5-D (B, C, D, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"input has {x.shape[1]} channels, the network expects in_channels={self.in_channels}")
        for axis, (size, factor) in enumerate(zip(x.shape[2:], self.total_stride)):
            if size % factor or size == 0:
                raise ValueError(
                    f"input spatial dimension {axis} (size {size}) must be a positive multiple of the total stride "
                    f"{factor}"
                )
        # said here, in the words ATen's BatchNorm would use deep in the stack
        deepest = x.shape[0]
        for axis, size in enumerate(x.shape[2:]):
            deepest *= size // self._grid_stride[axis]
        last_stage = self.segformer_encoder.tf_block4.modules()
        if deepest == 1 and any(m.uses_batch_stats() for m in last_stage if isinstance(m, _DWConvBN)):
            raise ValueError(
                f"Expected more than 1 value per channel when training: a training SegFormer3D's last stage holds "
                f"one token at batch {x.shape[0]} and input {tuple(x.shape[2:])} for its BatchNorm (use a batch of "
                "2 or more, a larger input, or eval())"
            )
        # autocast's weight casts in one launch each way (a training step); a conv whose BatchNorm folds into its
        # weight (running statistics, e.g. frozen BatchNorms) is read in fp32 for the fold (the walk only where the
        # block can act: inference skips it)
        folded = ([m.dwconv for m in self.modules() if isinstance(m, _DWConvBN) and not m.uses_batch_stats()]
                  if self.training else [])
        with autocast_weights(self, exclude=folded):
            c1, c2, c3, c4 = self.segformer_encoder(x)
            return self.segformer_decoder(c1, c2, c3, c4)
