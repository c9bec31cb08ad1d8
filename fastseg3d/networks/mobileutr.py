"""MobileUtr / MobileUtr-L (Tang et al., arXiv 2312.01740) as released in Mobile U-ViT, 2-D and 3-D, on fused ops.

The module tree mirrors the released code, so ``state_dict`` keys and parameter shapes are the released ones
(``patch_embeddings.*``, ``lklgl_bottleneck.*``, ``transformer_bottleneck.*``, ``expend_dims.conv.*``, ...,
``head.*``) and checkpoints move both ways with ``strict=True``. Only the forward passes differ: depthwise
convolutions run :func:`fastseg3d.ops.dwconv3d` (2-D ones as 3-D convs over a depth-1 volume) and the softmax
attention runs :func:`fastseg3d.ops.attention` on views of the qkv projection.
"""

from __future__ import annotations

import math

from collections.abc import Sequence

import torch
from torch import nn

from fastseg3d.ops.attention import attention
from fastseg3d.nn.autocast_weights import autocast_weights
from fastseg3d.nn.dwconv3d import DepthwiseConv3d
from fastseg3d.nn.recompute import (
    act_instance_norm,
    act_instance_norm_conv,
    has_hooks,
    layer_norm_for_linear,
    norm_act,
    norm_act_conv,
)
from fastseg3d.ops.dwconv3d import dwconv3d
from fastseg3d.reference.dwconv3d import activation_ref

__all__ = ["MobileUtr", "MobileUtrL"]

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_MAXPOOL = {2: nn.MaxPool2d, 3: nn.MaxPool3d}


def _relu() -> nn.Module:
    """The released blocks' ReLU after a norm, out of place: InstanceNorm3d returns a view of its batch-norm
    output, and an in-place op on a view makes backward rebuild the base's gradient (CopySlices, AsStrided: five
    input-sized writes per ReLU, about 1.2 GB a training step of the 96^3 benchmark). No parameters: same keys."""
    return nn.ReLU()


def _norm(spatial_dims: int, channels: int) -> nn.Module:
    """BatchNorm2d in 2-D, InstanceNorm3d (no affine, no running statistics: no keys) in 3-D, as released."""
    return nn.BatchNorm2d(channels) if spatial_dims == 2 else nn.InstanceNorm3d(channels)


def _depthwise(conv: nn.Module, x: torch.Tensor, activation: str | None = None,
               residual: torch.Tensor | None = None) -> torch.Tensor:
    """``activation(conv(x)) + residual`` for a depthwise stride-1 ``conv``, in one fused kernel.

    A 2-D conv runs as a 3-D conv over a depth-1 volume with a (1, k, k) kernel: the parameter keeps its released
    4-D shape and only a view of it reaches the op. A hooked or replaced ``conv`` is called (its hooks see it).
    """
    if has_hooks(conv) or type(conv) not in (nn.Conv2d, nn.Conv3d, DepthwiseConv3d):  # a subclass may compute
        y = conv(x)
        y = activation_ref(y, activation) if activation is not None else y
        return y if residual is None else y + residual
    if conv.weight.dim() == 4:
        y = dwconv3d(
            x.unsqueeze(2),
            conv.weight.unsqueeze(2),
            conv.bias,
            padding=(0, *conv.padding),
            activation=activation,
            residual=None if residual is None else residual.unsqueeze(2),
        )
        return y.squeeze(2)
    return dwconv3d(x, conv.weight, conv.bias, padding=tuple(conv.padding), activation=activation, residual=residual)


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, *spatial) -> (B, N, C), a view."""
    return x.flatten(2).transpose(1, 2)


class _DropPath(nn.Module):
    """Stochastic depth per sample (timm's ``DropPath`` semantics: kept samples are scaled by 1 / keep)."""

    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


def _drop_path(rate: float) -> nn.Module:
    return _DropPath(rate) if rate > 0.0 else nn.Identity()


class _Residual(nn.Module):
    """Holds the residual branch as ``fn`` (keys ``fn.*``); the owner runs it."""

    def __init__(self, fn: nn.Sequential) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x) + x


class _ConvUtr(nn.Module):
    """``depth`` x [DWConv k -> GELU -> Norm, residual; 1x1 expand x4 -> GELU -> Norm -> 1x1 -> GELU -> Norm,
    residual] at ``ch_in``, then ``up`` = Conv 3 ch_in -> ch_out -> Norm -> ReLU. The depthwise conv, its bias
    and the GELU are one fused kernel (the norm follows the GELU, so neither it nor the residual can join)."""

    def __init__(self, spatial_dims: int, ch_in: int, ch_out: int, depth: int, kernel: int) -> None:
        super().__init__()
        conv = _CONV[spatial_dims]
        self.block = nn.Sequential(*[
            nn.Sequential(
                _Residual(nn.Sequential(
                    conv(ch_in, ch_in, kernel, padding=kernel // 2, groups=ch_in),
                    nn.GELU(),
                    _norm(spatial_dims, ch_in),
                )),
                _Residual(nn.Sequential(
                    conv(ch_in, 4 * ch_in, 1),
                    nn.GELU(),
                    _norm(spatial_dims, 4 * ch_in),
                    conv(4 * ch_in, ch_in, 1),
                    nn.GELU(),
                    _norm(spatial_dims, ch_in),
                )),
            )
            for _ in range(depth)
        ])
        self.up = nn.Sequential(
            conv(ch_in, ch_out, 3, padding=1),
            _norm(spatial_dims, ch_out),
            _relu(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the fused path reads the layers' parameters past their containers: a hook (or replaced forward) anywhere
        # in a layer sends that layer through its modules
        layers = [self.block] if has_hooks(self.block) else self.block
        for layer in layers:
            if has_hooks(*layer.modules()):
                x = layer(x)
                continue
            local = layer[0].fn
            x = local[2](_depthwise(local[0], x, activation="gelu")) + x
            mlp = layer[1].fn
            if isinstance(mlp[2], nn.InstanceNorm3d):
                # GELU -> InstanceNorm -> 1x1 on the 4x expanded channels, saving only the GELU's input
                h = act_instance_norm_conv(mlp[0](x), "gelu", mlp[2], mlp[3].weight, mlp[3].bias)
                x = act_instance_norm(h, "gelu", mlp[5]) + x
            else:
                x = layer[1](x)
        if has_hooks(self.up):
            return self.up(x)
        return norm_act(self.up[0](x), self.up[1], self.up[2])


class _Embeddings(nn.Module):
    """Stem and three ConvUtr stages at H, H/2, H/4; returns the last map and the three skips."""

    def __init__(self, spatial_dims: int, in_channels: int, dims: Sequence[int], depths: Sequence[int],
                 kernels: Sequence[int]) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            _CONV[spatial_dims](in_channels, dims[0], 3, padding=1),
            _norm(spatial_dims, dims[0]),
            _relu(),
        )
        self.layer1 = _ConvUtr(spatial_dims, dims[0], dims[0], depths[0], kernels[0])
        self.layer2 = _ConvUtr(spatial_dims, dims[0], dims[1], depths[1], kernels[1])
        self.layer3 = _ConvUtr(spatial_dims, dims[1], dims[2], depths[2], kernels[2])
        self.down = _MAXPOOL[spatial_dims](2, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        x0 = self.layer1(norm_act(self.stem[0](x), self.stem[1], self.stem[2]))
        x1 = self.layer2(self.down(x0))
        x2 = self.layer3(self.down(x1))
        return x2, (x0, x1, x2)


class _CMlp(nn.Module):
    """Grouped 3x3 convs dim -> 4 dim -> dim (groups=dim): channel multiplier 4, so not depthwise; plain convs."""

    def __init__(self, spatial_dims: int, dim: int, hidden: int) -> None:
        super().__init__()
        conv = _CONV[spatial_dims]
        self.fc1 = conv(dim, hidden, 3, padding=1, groups=dim)
        self.act = nn.GELU()
        self.fc2 = conv(hidden, dim, 3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _LocalAgg(nn.Module):
    """Large-kernel local aggregation with three sigmoid-gated updates ``x <- x * (sigmoid(g) + 0.5)``
    (the released ``x + x * (sigmoid(g) - 0.5)``). The two 9x9 depthwise convs run fused with their bias."""

    def __init__(self, spatial_dims: int, dim: int, mlp_ratio: float, drop_path: float) -> None:
        super().__init__()
        conv = _CONV[spatial_dims]
        self.pos_embed = conv(dim, dim, 9, padding=4, groups=dim)
        self.norm1 = _norm(spatial_dims, dim)
        self.conv1 = conv(dim, dim, 1)
        self.conv2 = conv(dim, dim, 1)
        self.attn = conv(dim, dim, 9, padding=4, groups=dim)
        self.drop_path = _drop_path(drop_path)
        self.norm2 = _norm(spatial_dims, dim)
        self.mlp = _CMlp(spatial_dims, dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * (torch.sigmoid(_depthwise(self.pos_embed, x)) + 0.5)
        g = self.conv2(_depthwise(self.attn, self.conv1(self.norm1(x))))
        x = x * (torch.sigmoid(self.drop_path(g)) + 0.5)
        g = self.mlp(self.norm2(x))
        return x * (torch.sigmoid(self.drop_path(g)) + 0.5)


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _GlobalSparseAttn(nn.Module):
    """Multi-head self-attention over (already sub-sampled, normalised) tokens; with ``sr > 1`` the result is
    spread back to full resolution by ``LocalProp`` (a grouped transposed conv, kernel = stride = sr) and
    normalised. softmax(q k^T) v runs :func:`fastseg3d.ops.attention` on strided views of the qkv output."""

    def __init__(self, spatial_dims: int, dim: int, num_heads: int, sr_ratio: int, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.sr = sr_ratio
        if sr_ratio > 1:
            self.LocalProp = _CONV_T[spatial_dims](dim, dim, sr_ratio, stride=sr_ratio, groups=dim)
            self.norm = nn.LayerNorm(dim)
        else:
            self.norm = nn.Identity()

    def forward(self, t: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """``t``: (B, M, C) tokens of the (sub-sampled) ``grid``; returns (B, N, C) at full resolution."""
        b, m, c = t.shape
        qkv = self.qkv(t).view(b, m, 3, self.num_heads, c // self.num_heads)
        # unbind: strided views read in place, whose gradients backward stacks in one kernel
        o = attention(*qkv.unbind(2), self.scale).reshape(b, m, c)
        if self.sr > 1:
            # read only by proj: written in the dtype it reads
            o = layer_norm_for_linear(_tokens(self.LocalProp(o.transpose(1, 2).unflatten(2, tuple(grid)))),
                                      self.norm)
        return self.proj(o)


class _SelfAttn(nn.Module):
    """Conditional position encoding (depthwise 3x3 conv, fused with its bias and the residual), then a
    pre-norm transformer layer on the tokens (B, N, C) with ``N`` in C order over the spatial axes."""

    def __init__(self, spatial_dims: int, dim: int, num_heads: int, mlp_ratio: float, sr_ratio: int,
                 drop_path: float) -> None:
        super().__init__()
        self.pos_embed = _CONV[spatial_dims](dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _GlobalSparseAttn(spatial_dims, dim, num_heads, sr_ratio, qkv_bias=True)
        self.drop_path = _drop_path(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _depthwise(self.pos_embed, x, residual=x)
        b, c, *spatial = x.shape
        sr = self.attn.sr
        # Sub-sampling (the released AvgPool with kernel 1, stride sr) commutes with the per-token LayerNorm, so
        # only the kept tokens are normalised and projected.
        src = x[(slice(None), slice(None)) + (slice(None, None, sr),) * len(spatial)] if sr > 1 else x
        t = _tokens(x)
        # the norms' outputs go only to Linear layers (qkv, fc1): written in the dtype those read
        t = t + self.drop_path(self.attn(layer_norm_for_linear(_tokens(src), self.norm1), src.shape[2:]))
        t = t + self.drop_path(self.mlp(layer_norm_for_linear(t, self.norm2)))
        return t.transpose(1, 2).unflatten(2, spatial)


class _LGLBlock(nn.Module):
    """``LocalAgg`` (only when ``sr_ratio > 1``, else an identity) then ``SelfAttn``."""

    def __init__(self, spatial_dims: int, dim: int, num_heads: int, mlp_ratio: float, sr_ratio: int,
                 drop_path: float) -> None:
        super().__init__()
        self.LocalAgg = _LocalAgg(spatial_dims, dim, mlp_ratio, drop_path) if sr_ratio > 1 else nn.Identity()
        self.SelfAttn = _SelfAttn(spatial_dims, dim, num_heads, mlp_ratio, sr_ratio, drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.SelfAttn(self.LocalAgg(x))


class _ConvBlock(nn.Module):
    """Two (Conv 3 -> Norm -> ReLU); keys ``conv.{0,1,3,4}``."""

    def __init__(self, spatial_dims: int, ch_in: int, ch_out: int) -> None:
        super().__init__()
        conv = _CONV[spatial_dims]
        self.conv = nn.Sequential(
            conv(ch_in, ch_out, 3, padding=1),
            _norm(spatial_dims, ch_out),
            _relu(),
            conv(ch_out, ch_out, 3, padding=1),
            _norm(spatial_dims, ch_out),
            _relu(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        return norm_act(norm_act_conv(conv[0](x), conv[1], conv[2], conv[3]), conv[4], conv[5])


class _UpConv(nn.Module):
    """x2 upsampling (2-D: bilinear with align_corners=True; 3-D: trilinear, align_corners=False, as released)
    -> Conv 3 -> Norm -> ReLU; keys ``up.{1,2}``."""

    def __init__(self, spatial_dims: int, ch_in: int, ch_out: int) -> None:
        super().__init__()
        upsample = (nn.UpsamplingBilinear2d(scale_factor=2) if spatial_dims == 2
                    else nn.Upsample(scale_factor=2, mode="trilinear"))
        self.up = nn.Sequential(
            upsample,
            _CONV[spatial_dims](ch_in, ch_out, 3, padding=1),
            _norm(spatial_dims, ch_out),
            _relu(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = self.up
        return norm_act(up[1](up[0](x)), up[2], up[3])


def _check_positive_ints(name: str, value, length: int, allow_zero: bool = False) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{name} must be {length} ints, got {value!r}")
    value = tuple(value)
    low = 0 if allow_zero else 1
    if len(value) != length or not all(isinstance(v, int) and not isinstance(v, bool) and v >= low for v in value):
        raise ValueError(f"{name} must be {length} ints >= {low}, got {value!r}")
    return value


class MobileUtr(nn.Module):
    """MobileUtr (Tang et al., arXiv 2312.01740), built as the released Mobile U-ViT code builds it, 2-D or 3-D.

    A ConvUtr patch embedding (stem + three ConvUtr stages at H, H/2, H/4), a max-pool to H/8, ``depths[3]``
    large-kernel LGL blocks (9x9 gated local aggregation + attention over tokens sub-sampled by ``sr_ratio``)
    at width ``dims[2]``, a conv block to ``dims[3]``, ``depths[4]`` plain transformer blocks, and a U-shaped
    conv decoder with max-pooled skips. At the defaults this is the released ``mobileuvit``: 1,390,305 parameters
    in 2-D (in 3, out 1) and 2,758,270 in 3-D (in 1, out 14), with the released ``state_dict`` keys, so released
    or trained checkpoints load with ``strict=True`` in both directions. No official weights were published.

    Where the released code differs from the paper: the paper's figure has full-resolution skip connections and
    decoder blocks at H/4, H/2 and H; the released code (the only code) max-pools every skip by 2 before
    concatenating, runs the decoder at half resolution and upsamples x2 before the 1x1 head. That released
    behaviour is what is built here. Other released details kept: GELU *before* the norm inside ConvUtr; sigmoid
    gating and 9x9 / grouped 3x3 convs in LocalAgg; queries sub-sampled together with keys in the LGL attention;
    2-D uses BatchNorm and bilinear upsampling with ``align_corners=True``, 3-D uses InstanceNorm3d without affine
    parameters and trilinear upsampling with ``align_corners=False``; in 2-D a 1-channel input is repeated to 3
    channels when ``in_channels=3``.

    What is fused: every depthwise conv runs :func:`fastseg3d.ops.dwconv3d` (2-D ones as 3-D convs over a
    depth-1 volume, with the released 4-D parameters): ConvUtr's k x k conv with its bias and GELU in one kernel
    (the norm follows the GELU, so the norm and the residual stay separate), LocalAgg's two 9x9 convs with their
    bias, and the position-encoding 3x3 conv with its bias and the residual ``x + pos_embed(x)``. The softmax
    attention of every block runs :func:`fastseg3d.ops.attention` (flash-style, no N x N matrix) on strided views
    of the qkv projection, with no permute copies. LocalAgg's grouped 3x3 MLP (channel multiplier 4), the dense
    convs, the norms and LocalProp's transposed conv run PyTorch's ops. Off the GPU every op runs its reference.
    In 3-D the InstanceNorm chains run :mod:`fastseg3d.nn.recompute`: ConvUtr's GELU -> InstanceNorm -> 1x1 conv on
    the expanded channels saves only the GELU's input (``act_instance_norm_conv``: recomputed in backward), its
    second GELU -> InstanceNorm (``act_instance_norm``), and the stem's, conv blocks' and up-convs' InstanceNorm ->
    ReLU (``norm_act``; the conv blocks' middle norm -> ReLU -> conv through ``norm_act_conv``, which saves only the
    norm's input). On CUDA each norm and its activation is one kernel (:func:`fastseg3d.ops.group_norm_act`, with
    the activation first for ConvUtr's): the activated or normalised intermediate is never written, forward or
    backward. Elsewhere they run ATen's norms, and the ReLUs run out of place (no rebuild of a view's gradient in
    backward).

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels; ``None`` for the release's default (3 in 2-D, 1 in 3-D).
        out_channels: output channels (logits, no activation); ``None`` for the release's default (1 in 2-D,
            14 in 3-D).
        dims: widths (C1, C2, C3, C4): embedding stages 1-3 (C3 is the LGL width) and the transformer width C4.
        depths: (ConvUtr depth of stages 1, 2, 3, number of LGL blocks, number of transformer blocks).
        kernels: depthwise kernel of the three ConvUtr stages (odd, at most 9 for the fused op).
        num_heads: attention heads of every block (the release's ``embed_dim // 64``).
        mlp_ratio: MLP expansion of the LGL and transformer blocks.
        sr_ratio: token sub-sampling of the LGL attention (the transformer blocks use 1).
        drop_path_rate: stochastic depth of every LGL block (constant, as released; the transformer blocks use 0).

    Inputs must be (B, in_channels, *spatial) with every spatial side a positive multiple of :attr:`total_stride`
    (16 at the defaults: three max-pools by 2 and the LGL sub-sampling by 2), and in 3-D not all sides 8 (a
    one-voxel bottleneck, which its InstanceNorm cannot normalise). ``forward`` returns one logits
    tensor of shape (B, out_channels, *spatial) in both train and eval mode (no deep supervision).

    Example:
        >>> import torch
        >>> from fastseg3d.networks.mobileutr import MobileUtr
        >>> net = MobileUtr(spatial_dims=3, in_channels=1, out_channels=14).eval()
        >>> net(torch.randn(1, 1, 32, 48, 32)).shape
        torch.Size([1, 14, 32, 48, 32])
        >>> MobileUtr(spatial_dims=2)(torch.randn(2, 3, 64, 64)).shape
        torch.Size([2, 1, 64, 64])
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int | None = None,
        out_channels: int | None = None,
        dims: Sequence[int] = (16, 32, 64, 128),
        depths: Sequence[int] = (1, 1, 3, 3, 3),
        kernels: Sequence[int] = (3, 3, 7),
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        sr_ratio: int = 2,
        drop_path_rate: float = 0.1,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        if in_channels is None:
            in_channels = 3 if spatial_dims == 2 else 1
        if out_channels is None:
            out_channels = 1 if spatial_dims == 2 else 14
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("num_heads", num_heads),
                            ("sr_ratio", sr_ratio)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        dims = _check_positive_ints("dims", dims, 4)
        depths = _check_positive_ints("depths", depths, 5, allow_zero=True)
        kernels = _check_positive_ints("kernels", kernels, 3)
        if any(k % 2 == 0 for k in kernels):
            raise ValueError(f"kernels must be odd, got {kernels!r}")
        for dim in dims[2:]:
            if dim % num_heads:
                raise ValueError(f"dims[2] and dims[3] ({dims[2]}, {dims[3]}) must be divisible by num_heads "
                                 f"({num_heads})")
        if (not isinstance(mlp_ratio, (int, float)) or isinstance(mlp_ratio, bool) or not mlp_ratio > 0
                or not math.isfinite(mlp_ratio)):
            raise ValueError(f"mlp_ratio must be a positive number, got {mlp_ratio!r}")
        for dim, blocks in ((dims[2], depths[3]), (dims[3], depths[4])):
            if blocks and int(dim * mlp_ratio) < 1:
                raise ValueError(f"mlp_ratio={mlp_ratio!r} gives the width-{dim} blocks an empty MLP")
        if depths[3] and sr_ratio > 1 and int(dims[2] * mlp_ratio) % dims[2]:
            # the LGL blocks' local MLP is a grouped conv with groups=dims[2]
            raise ValueError(f"mlp_ratio={mlp_ratio!r} must make the LGL blocks' MLP width int(dims[2] * mlp_ratio) "
                             f"= {int(dims[2] * mlp_ratio)} a multiple of dims[2] = {dims[2]} (its convs are grouped "
                             "by dims[2])")
        if isinstance(drop_path_rate, bool) or not isinstance(drop_path_rate, (int, float)) or not (
                0.0 <= drop_path_rate < 1.0):
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate!r}")

        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.sr_ratio = sr_ratio
        self.num_lgl_blocks = depths[3]

        self.patch_embeddings = _Embeddings(spatial_dims, in_channels, dims, depths[:3], kernels)
        self.lklgl_bottleneck = nn.ModuleList(
            [_LGLBlock(spatial_dims, dims[2], num_heads, mlp_ratio, sr_ratio, drop_path_rate)
             for _ in range(depths[3])]
        )
        self.transformer_bottleneck = nn.ModuleList(
            [_LGLBlock(spatial_dims, dims[3], num_heads, mlp_ratio, 1, 0.0) for _ in range(depths[4])]
        )
        self.down = _MAXPOOL[spatial_dims](2, 2)
        self.expend_dims = _ConvBlock(spatial_dims, dims[2], dims[3])
        self.reduce_dims = _ConvBlock(spatial_dims, dims[3], dims[2])
        self.Up_conv4 = _ConvBlock(spatial_dims, 2 * dims[2], dims[2])
        self.Up3 = _UpConv(spatial_dims, dims[2], dims[1])
        self.Up_conv3 = _ConvBlock(spatial_dims, 2 * dims[1], dims[1])
        self.Up2 = _UpConv(spatial_dims, dims[1], dims[0])
        self.Up_conv2 = _ConvBlock(spatial_dims, 2 * dims[0], dims[0])
        self.Up1 = _UpConv(spatial_dims, dims[0], dims[0])
        self.head = _CONV[spatial_dims](dims[0], out_channels, 1)

    @property
    def total_stride(self) -> int:
        """The factor every input side must be divisible by: 8 (three max-pools) times the LGL sub-sampling."""
        return 8 * (self.sr_ratio if self.num_lgl_blocks > 0 else 1)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != self.spatial_dims + 2:
            layout = "(B, C, H, W)" if self.spatial_dims == 2 else "(B, C, D, H, W)"
            raise ValueError(f"input must be {self.spatial_dims + 2}-D {layout}, got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels and not (self.spatial_dims == 2 and self.in_channels == 3
                                                   and x.shape[1] == 1):
            raise ValueError(f"input has {x.shape[1]} channels, the network expects in_channels={self.in_channels}")
        factor = self.total_stride
        for axis, size in enumerate(x.shape[2:]):
            if size % factor or size == 0:
                raise ValueError(
                    f"input spatial dimension {axis} (size {size}) must be a positive multiple of the total stride "
                    f"{factor}"
                )
        if self.spatial_dims == 3 and all(size == 8 for size in x.shape[2:]):
            # the bottleneck (sides / 8) would be one voxel, which expend_dims' InstanceNorm cannot normalise
            raise ValueError(f"input of spatial size {tuple(x.shape[2:])} leaves a one-voxel bottleneck (sides / 8), "
                             "which the bottleneck's InstanceNorm cannot normalise: make one side 16 or more")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if x.shape[1] != self.in_channels:  # 2-D release: a grey image is repeated to 3 channels
            x = x.expand(-1, self.in_channels, *x.shape[2:])
        with autocast_weights(self):  # autocast's weight casts in one launch each way (a training step)
            x, (s0, s1, s2) = self.patch_embeddings(x)
            x = self.down(x)
            for block in self.lklgl_bottleneck:
                x = block(x)
            x = self.expend_dims(x)
            for block in self.transformer_bottleneck:
                x = block(x)
            x = self.reduce_dims(x)
            x = self.Up_conv4(torch.cat((x, self.down(s2)), dim=1))
            x = self.Up_conv3(torch.cat((self.Up3(x), self.down(s1)), dim=1))
            x = self.Up_conv2(torch.cat((self.Up2(x), self.down(s0)), dim=1))
            return self.head(self.Up1(x))


class MobileUtrL(MobileUtr):
    """MobileUtr-L: :class:`MobileUtr` with dims (32, 64, 128, 256), depths (1, 1, 3, 3, 4) and 8 heads (the
    released ``mobileuvit_l``): 6,209,217 parameters in 2-D (in 3, out 1), 11,060,206 in 3-D (in 1, out 14).

    Example:
        >>> import torch
        >>> from fastseg3d.networks.mobileutr import MobileUtrL
        >>> net = MobileUtrL(spatial_dims=2, in_channels=3, out_channels=1).eval()
        >>> net(torch.randn(1, 3, 64, 64)).shape
        torch.Size([1, 1, 64, 64])
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int | None = None,
        out_channels: int | None = None,
        dims: Sequence[int] = (32, 64, 128, 256),
        depths: Sequence[int] = (1, 1, 3, 3, 4),
        kernels: Sequence[int] = (3, 3, 7),
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        sr_ratio: int = 2,
        drop_path_rate: float = 0.1,
    ) -> None:
        super().__init__(spatial_dims, in_channels, out_channels, dims, depths, kernels, num_heads, mlp_ratio,
                         sr_ratio, drop_path_rate)
