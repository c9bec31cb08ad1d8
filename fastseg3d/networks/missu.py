"""MISSU (Wang et al., 2022): the TransBTS-style network as released, with its defects fixed, on fused attention."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastseg3d.nn.autocast_weights import autocast_weights
from fastseg3d.nn.recompute import (
    add_layer_norm,
    has_hooks,
    layer_norm_for_linear,
    needs_own_call,
    norm_act,
    norm_act_conv,
)
from fastseg3d.ops.attention import attention

__all__ = ["LocalMultiScaleFusion3d", "MISSU"]


class _InitConv(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The release calls F.dropout3d with its default training=True, so it also drops at inference: fixed here.
        return F.dropout3d(self.conv(x), self.dropout, training=self.training)


class _EnBlock(nn.Module):
    """Pre-activation residual block of the CNN encoder: GN -> ReLU -> conv -> GN -> ReLU -> conv, + input."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bn1 = nn.GroupNorm(8, channels)
        self.conv1 = nn.Conv3d(channels, channels, kernel_size=3, padding=1)
        self.bn2 = nn.GroupNorm(8, channels)
        self.conv2 = nn.Conv3d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = norm_act_conv(x, self.bn1, "relu", self.conv1)
        return norm_act_conv(y, self.bn2, "relu", self.conv2) + x


class _EnDown(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size=3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class _Encoder(nn.Module):
    """TransBTS's CNN encoder (attribute ``Unet`` in the release), base width 16."""

    def __init__(self, in_channels: int, base: int, dropout: float) -> None:
        super().__init__()
        self.InitConv = _InitConv(in_channels, base, dropout)
        self.EnBlock1 = _EnBlock(base)
        self.EnDown1 = _EnDown(base, base * 2)
        self.EnBlock2_1 = _EnBlock(base * 2)
        self.EnBlock2_2 = _EnBlock(base * 2)
        self.EnDown2 = _EnDown(base * 2, base * 4)
        self.EnBlock3_1 = _EnBlock(base * 4)
        self.EnBlock3_2 = _EnBlock(base * 4)
        self.EnDown3 = _EnDown(base * 4, base * 8)
        self.EnBlock4_1 = _EnBlock(base * 8)
        self.EnBlock4_2 = _EnBlock(base * 8)
        self.EnBlock4_3 = _EnBlock(base * 8)
        self.EnBlock4_4 = _EnBlock(base * 8)

    def forward(self, x: torch.Tensor):
        x1 = self.EnBlock1(self.InitConv(x))
        x2 = self.EnBlock2_2(self.EnBlock2_1(self.EnDown1(x1)))
        x3 = self.EnBlock3_2(self.EnBlock3_1(self.EnDown2(x2)))
        x4 = self.EnDown3(x3)
        for block in (self.EnBlock4_1, self.EnBlock4_2, self.EnBlock4_3, self.EnBlock4_4):
            x4 = block(x4)
        return x1, x2, x3, x4


class _SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, attn_dropout: float, dropout: float) -> None:
        super().__init__()
        self.num_heads = heads
        self.attn_dropout = attn_dropout
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads)
        # strided views read in place by the fused op; unbind's backward stacks their gradients in one kernel
        q, k, v = qkv.unbind(2)
        out = attention(q, k, v, dropout_p=self.attn_dropout if self.training else 0.0)
        return self.proj_drop(self.proj(out.reshape(b, n, c)))


class _Residual(nn.Module):
    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x) + x


class _PreNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module, dropout: float | None = None) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn
        self.dropout = nn.Dropout(dropout) if dropout is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fn(self.norm(x)))


class _FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim),
                                 nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _Transformer(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, hidden: int, dropout: float, attn_dropout: float) -> None:
        super().__init__()
        layers = []
        for _ in range(depth):
            layers.append(_Residual(_PreNorm(dim, _SelfAttention(dim, heads, attn_dropout, dropout), dropout)))
            layers.append(_Residual(_PreNorm(dim, _FeedForward(dim, hidden, dropout))))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # ``self.net(x)``, with each residual add run in the kernel of the next layer's LayerNorm (add_layer_norm);
        # the norms' outputs go only to Linear layers, and are written in the dtype those read
        if needs_own_call(self.net, nn.Sequential):
            return self.net(x)
        pending = None  # the last layer's branch, not yet added
        for layer in self.net:
            pre = layer.fn
            # hooks, a replaced forward or a wrapper see the layer's own call
            if needs_own_call(layer, _Residual) or needs_own_call(pre, _PreNorm):
                if pending is not None:
                    x, pending = pending + x, None
                x = layer(x)
                continue
            if pending is None:
                h = layer_norm_for_linear(x, pre.norm)
            else:
                x, h = add_layer_norm(x, pending, pre.norm, for_linear=True)
            pending = pre.dropout(pre.fn(h))
        return x if pending is None else pending + x


class _PositionalEncoding(nn.Module):
    def __init__(self, tokens: int, dim: int) -> None:
        super().__init__()
        self.position_embeddings = nn.Parameter(torch.zeros(1, tokens, dim))


class _DecBlock(nn.Module):
    """conv -> BN -> ReLU -> conv -> BN -> ReLU (+ input when ``residual``); keys conv1, bn1, conv2, bn2."""

    def __init__(self, cin: int, cout: int, residual: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cout, kernel_size=3, padding=1)
        self.bn1 = nn.BatchNorm3d(cout)
        self.conv2 = nn.Conv3d(cout, cout, kernel_size=3, padding=1)
        self.bn2 = nn.BatchNorm3d(cout)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = norm_act(norm_act_conv(self.conv1(x), self.bn1, "relu", self.conv2), self.bn2, "relu")
        return y + x if self.residual else y


class _DeUpCat(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cout, kernel_size=1)
        self.conv2 = nn.ConvTranspose3d(cout, cout, kernel_size=2, stride=2)
        self.conv3 = nn.Conv3d(cout * 2, cout, kernel_size=1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv3(torch.cat((skip, self.conv2(self.conv1(x))), dim=1))


class LocalMultiScaleFusion3d(nn.Module):
    """The paper's local multi-scale fusion block, in 3D: dense dilated branches and multi-scale pooling.

    * Dense atrous branches (CE-Net's DAC): cascaded 3x3x3 convolutions with dilations 1, 3 and 5 on four paths
      of receptive field 3, 7, 9 and 19, the three longer ones closed by the shared 1x1x1 conv (the rate-1 path
      is not, as in CE-Net), summed with the input.
    * Residual multi-scale pooling (CE-Net's RMP): max pooling with windows 2, 3, 5 and 6, a 1x1x1 conv to one
      channel each, trilinear upsampling back, concatenated with the features and fused back to ``channels`` by a
      1x1x1 conv.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.dilate1 = nn.Conv3d(channels, channels, 3, padding=1, dilation=1)
        self.dilate2 = nn.Conv3d(channels, channels, 3, padding=3, dilation=3)
        self.dilate3 = nn.Conv3d(channels, channels, 3, padding=5, dilation=5)
        self.conv1x1 = nn.Conv3d(channels, channels, 1)
        self.pool_sizes = (2, 3, 5, 6)
        self.pool_conv = nn.Conv3d(channels, 1, 1)
        self.fuse = nn.Conv3d(channels + len(self.pool_sizes), channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d1 = self.dilate1(x)
        d2 = self.dilate2(x)
        d21 = self.dilate2(d1)
        out = x + F.relu(d1) + F.relu(self.conv1x1(d2)) + F.relu(self.conv1x1(d21))
        out = out + F.relu(self.conv1x1(self.dilate3(d21)))
        size = out.shape[2:]
        pooled = []
        for k in self.pool_sizes:
            p = self.pool_conv(F.max_pool3d(out, kernel_size=k, stride=k, ceil_mode=True))
            # one pooled voxel: trilinear upsampling is a broadcast (Inductor's CPU backward failed on its resize)
            pooled.append(p.expand(*p.shape[:2], *size) if p.shape[2:].numel() == 1 else
                          F.interpolate(p, size=size, mode="trilinear", align_corners=False))
        if has_hooks(self.fuse):
            return self.fuse(torch.cat([out, *pooled], dim=1))
        # fuse(cat([out, *pooled])) as two convs: the pooling already saves ``out``, and a concatenated copy of it
        # would be saved again for the 1x1x1 conv's backward
        channels = out.shape[1]
        return (F.conv3d(out, self.fuse.weight[:, :channels], self.fuse.bias)
                + F.conv3d(torch.cat(pooled, dim=1), self.fuse.weight[:, channels:]))


class MISSU(nn.Module):
    """MISSU: TransBTS-style CNN encoder, a 4-layer transformer bottleneck at 1/8 resolution and a CNN decoder,
    trained with self-distillation between decoder outputs and same-shape encoder skips.

    The module tree and ``state_dict`` keys are the released ones (``Unet.*``, ``bn``, ``conv_x``,
    ``position_encoding.position_embeddings``, ``transformer.net.{0..7}.*``, ``pre_head_ln``, ``linear_encoding``,
    ``Enblock8_1``, ``Enblock8_2``, ``DeUp{4,3,2}``, ``DeBlock{4,3,2}``, ``endconv``): 20,392,388 parameters with
    ``fusion=False``. Released checkpoints load with ``strict=True`` into ``MISSU(fusion=False)``; the default build
    adds the training-only ``fusion.*`` blocks (447,331 parameters), which no released checkpoint has (load those
    with ``strict=False``).

    Decisions where the release is broken or silent:
        * the release cannot be constructed (a factory function shadows the class in ``super()``); this class can;
        * InitConv's 3D dropout runs only in training (the release drops at inference too);
        * the network returns logits; the release applies a softmax inside the model, which belongs in the loss;
        * ``pre_head_ln`` and ``linear_encoding`` are kept for checkpoint compatibility but, as in the release, unused:
          the decoder reads the last transformer layer's output before the final LayerNorm; their parameters do not
          require gradients, so DistributedDataParallel needs no ``find_unused_parameters`` for them;
        * attention dropout defaults to 0 (the release: 0.1), which keeps the attention fused; the released rate,
          ``attn_dropout_rate=0.1``, runs the reference attention in training;
        * the learned position embedding is for a 16^3 token grid (128^3 inputs); other inputs divisible by 8 get it
          resampled trilinearly to their grid;
        * the paper's local multi-scale fusion block was never released; it is built here in 3D
          (:class:`LocalMultiScaleFusion3d`, submodule ``fusion``) and used on the decoder side of each distillation
          pair: the student is the fused decoder output, the teacher the encoder skip (returned as it is;
          :class:`~fastseg3d.losses.MISSUDistillLoss` detaches it). So the block refines the features the decoder
          must distil towards the skips, receives gradients, and leaves the inference path untouched: it is skipped
          in eval and ``fusion=False`` builds exactly the released module tree (for loading released checkpoints
          with ``strict=True``).

    What is fused: the transformer's softmax attention (:func:`fastseg3d.ops.attention`, q/k/v read in place from the
    qkv projection, O(N d) memory); attention dropout > 0 in training runs the reference. The encoder blocks'
    GroupNorm -> ReLU -> conv, the bottleneck's BatchNorm -> ReLU -> ``conv_x`` and the decoder blocks' middle
    BatchNorm -> ReLU -> conv save only the norm's input for backward (:func:`fastseg3d.nn.recompute.norm_act_conv`):
    at 128^3, batch 2, bf16 autocast the network saves 3.95 GiB instead of 6.13 (with the fusion blocks' 1x1x1
    conv split so that it saves no concatenated copy). On CUDA each of these norms and its ReLU is one fused kernel
    (:func:`fastseg3d.ops.group_norm_act`; BatchNorm's statistics over the batch), and so are the decoder blocks'
    closing BatchNorm -> ReLU (:func:`fastseg3d.nn.recompute.norm_act`). The transformer's LayerNorms write their
    Linear's input dtype directly under autocast, and each residual add runs in the kernel of the LayerNorm after it
    (:func:`fastseg3d.nn.recompute.add_layer_norm`).

    Training returns ``(logits, pairs)`` with ``pairs = [(y4, x3), (y3, x2), (y2, x1)]``: each decoder output (through
    the fusion block when there is one) with the encoder skip of its shape, the inputs of
    :class:`fastseg3d.losses.MISSUDistillLoss`. Eval returns the logits. Input sides must be positive multiples of
    8 (and in training at batch 1 not all 8: the bottleneck's BatchNorm would see one voxel).

    Args:
        spatial_dims: must be 3.
        in_channels: input modalities (4 for BraTS).
        out_channels: classes (4 for BraTS labels 0, 1, 2, 4).
        embedding_dim, num_heads, num_layers, hidden_dim: the transformer (512, 8, 4, 1,024 as released).
        dropout_rate: dropout in the transformer and after the position embedding (0.1 as released).
        attn_dropout_rate: dropout on the attention probabilities (0.1 in the release; 0 keeps attention fused).
        init_dropout: 3D dropout after the first conv in training (0.2 as released).
        fusion: build the training-only local multi-scale fusion blocks (not counted in the 20,392,388).

    Example:
        >>> import torch
        >>> from fastseg3d.networks import MISSU
        >>> net = MISSU().eval()
        >>> net(torch.randn(1, 4, 32, 32, 32)).shape
        torch.Size([1, 4, 32, 32, 32])
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 4,
        out_channels: int = 4,
        embedding_dim: int = 512,
        num_heads: int = 8,
        num_layers: int = 4,
        hidden_dim: int = 1024,
        dropout_rate: float = 0.1,
        attn_dropout_rate: float = 0.0,
        init_dropout: float = 0.2,
        fusion: bool = True,
    ) -> None:
        super().__init__()
        if spatial_dims != 3:
            raise ValueError(f"MISSU supports spatial_dims=3 only, got {spatial_dims} (its first argument, as in "
                             "MONAI's networks: MISSU(3, 4, 4) or MISSU(in_channels=4, out_channels=4))")
        if not isinstance(fusion, bool):
            raise ValueError(f"fusion must be a bool, got {fusion!r}")
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                            ("embedding_dim", embedding_dim), ("num_heads", num_heads), ("num_layers", num_layers),
                            ("hidden_dim", hidden_dim)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name, value in (("dropout_rate", dropout_rate), ("attn_dropout_rate", attn_dropout_rate),
                            ("init_dropout", init_dropout)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
        base = 16
        if embedding_dim != 32 * base:
            # The decoder halves the width at each level and concatenates the encoder skip of the same width.
            raise ValueError(
                f"embedding_dim must be {32 * base} so the decoder widths match the skips, got {embedding_dim}"
            )
        if embedding_dim % num_heads:
            raise ValueError(f"embedding_dim ({embedding_dim}) must be divisible by num_heads ({num_heads})")
        self.in_channels = in_channels
        self.embedding_dim = embedding_dim
        self.Unet = _Encoder(in_channels, base, init_dropout)
        self.bn = nn.BatchNorm3d(base * 8)
        self.conv_x = nn.Conv3d(base * 8, embedding_dim, kernel_size=3, padding=1)
        self.position_encoding = _PositionalEncoding(16**3, embedding_dim)
        self.pe_dropout = nn.Dropout(dropout_rate)
        self.transformer = _Transformer(embedding_dim, num_layers, num_heads, hidden_dim, dropout_rate,
                                        attn_dropout_rate)
        self.pre_head_ln = nn.LayerNorm(embedding_dim).requires_grad_(False)
        self.linear_encoding = nn.Linear(base * 8 * in_channels, embedding_dim).requires_grad_(False)
        self.Enblock8_1 = _DecBlock(embedding_dim, embedding_dim // 4, residual=False)
        self.Enblock8_2 = _DecBlock(embedding_dim // 4, embedding_dim // 4, residual=True)
        self.DeUp4 = _DeUpCat(embedding_dim // 4, embedding_dim // 8)
        self.DeBlock4 = _DecBlock(embedding_dim // 8, embedding_dim // 8, residual=True)
        self.DeUp3 = _DeUpCat(embedding_dim // 8, embedding_dim // 16)
        self.DeBlock3 = _DecBlock(embedding_dim // 16, embedding_dim // 16, residual=True)
        self.DeUp2 = _DeUpCat(embedding_dim // 16, embedding_dim // 32)
        self.DeBlock2 = _DecBlock(embedding_dim // 32, embedding_dim // 32, residual=True)
        self.endconv = nn.Conv3d(embedding_dim // 32, out_channels, kernel_size=1)
        if fusion:
            self.fusion = nn.ModuleList(LocalMultiScaleFusion3d(c) for c in (base * 4, base * 2, base))

    def _position_embeddings(self, grid: Sequence[int]) -> torch.Tensor:
        pos = self.position_encoding.position_embeddings
        if tuple(grid) == (16, 16, 16):
            return pos
        vol = pos.view(1, 16, 16, 16, -1).permute(0, 4, 1, 2, 3)
        vol = F.interpolate(vol, size=tuple(grid), mode="trilinear", align_corners=False)
        return vol.flatten(2).transpose(1, 2)

    def forward(self, x: torch.Tensor):
        if x.dim() != 5:
            raise ValueError(f"input must be 5-D (B, C, D, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"input has {x.shape[1]} channels, the network expects in_channels={self.in_channels}")
        for axis, size in enumerate(x.shape[2:]):
            if size % 8 or size == 0:
                raise ValueError(
                    f"input spatial dimension {axis} (size {size}) must be a positive multiple of the total stride 8"
                )
        if self.training and x.shape[0] == 1 and all(size == 8 for size in x.shape[2:]):
            # the bottleneck's BatchNorm would see one value per channel: ATen's error names neither size nor fix
            raise ValueError(f"input of spatial size {tuple(x.shape[2:])} leaves a one-voxel bottleneck (sides / 8), "
                             "which the bottleneck's BatchNorm cannot normalise in training at batch 1: make one side "
                             "16 or more, or train at batch 2 or more")
        # autocast's weight casts in one launch each way (a training step); linear_encoding never runs
        with autocast_weights(self, exclude=(self.linear_encoding,)):
            x1, x2, x3, x4 = self.Unet(x)
            y = norm_act_conv(x4, self.bn, "relu", self.conv_x)
            grid = y.shape[2:]
            tokens = y.flatten(2).transpose(1, 2)
            tokens = self.pe_dropout(tokens + self._position_embeddings(grid))
            tokens = self.transformer(tokens)
            y = tokens.transpose(1, 2).unflatten(2, grid)
            y = self.Enblock8_2(self.Enblock8_1(y))
            y4 = self.DeBlock4(self.DeUp4(y, x3))
            y3 = self.DeBlock3(self.DeUp3(y4, x2))
            y2 = self.DeBlock2(self.DeUp2(y3, x1))
            logits = self.endconv(y2)
            if not self.training:
                return logits
            students = [y4, y3, y2]
            if hasattr(self, "fusion"):
                students = [block(y) for block, y in zip(self.fusion, students)]
            return logits, list(zip(students, [x3, x2, x1]))
