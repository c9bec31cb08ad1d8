"""A plain 2-D/3-D U-Net, the backbone for the self-distillation wrappers (DSD, SelfReg), and its presets."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from fastseg3d.nn.autocast_weights import autocast_weights
from fastseg3d.nn.recompute import norm_act, norm_act_conv

__all__ = ["UNet", "dsd_unet", "selfreg_unet"]

# the layers' names and the keyword arguments each takes, in MONAI's spelling (``Norm``/``Act`` names in any case,
# or a (name, kwargs) pair)
_NORMS = {"instance": ("affine", "eps"), "batch": ("eps", "momentum")}
_ACTS = {"relu": ("inplace",), "leakyrelu": ("negative_slope", "inplace"), "gelu": ()}
_UPSAMPLES = ("deconv", "nontrainable")


def _conv(spatial_dims: int) -> type[nn.Module]:
    return nn.Conv3d if spatial_dims == 3 else nn.Conv2d


def _layer(value, kinds: Mapping[str, tuple], what: str) -> tuple[str, dict]:
    """(name, kwargs) of a norm or activation given as a name (any case) or MONAI's ``(name, {kwargs})`` (a list
    in a YAML or JSON config)."""
    name, kwargs = value if isinstance(value, (tuple, list)) and len(value) == 2 else (value, {})
    if not isinstance(name, str) or name.lower() not in kinds or not isinstance(kwargs, Mapping):
        raise ValueError(f"{what} must be one of {tuple(kinds)} (any case) or MONAI's (name, {{kwargs}}), "
                         f"got {value!r}")
    name = name.lower()
    unknown = sorted(set(kwargs) - set(kinds[name]))
    if unknown:
        raise ValueError(f"{what}: {name} takes {', '.join(kinds[name]) or 'no arguments'} here, got {unknown}")
    return name, dict(kwargs)


def _norm(spec: tuple[str, dict], spatial_dims: int, channels: int) -> nn.Module:
    kind, kwargs = spec
    if kind == "instance":
        # affine by default, as nnU-Net: MONAI's default InstanceNorm has no parameters, which weakens a plain U-Net
        return (nn.InstanceNorm3d if spatial_dims == 3 else nn.InstanceNorm2d)(channels, **{"affine": True, **kwargs})
    return (nn.BatchNorm3d if spatial_dims == 3 else nn.BatchNorm2d)(channels, **kwargs)


def _act(spec: tuple[str, dict]) -> nn.Module:
    kind, kwargs = spec
    if kind == "relu":
        return nn.ReLU(**kwargs)
    if kind == "leakyrelu":
        return nn.LeakyReLU(**{"negative_slope": 0.01, **kwargs})
    return nn.GELU()


class _ConvBlock(nn.Sequential):
    """(3x3(x3) conv -> norm -> activation) twice, the first to ``mid_channels`` (default ``out_channels``); the
    convs have no bias since a norm follows."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, norm: tuple, act: tuple,
                 mid_channels: int | None = None) -> None:
        conv = _conv(spatial_dims)
        mid = mid_channels or out_channels
        super().__init__(
            conv(in_channels, mid, 3, padding=1, bias=False),
            _norm(norm, spatial_dims, mid),
            _act(act),
            conv(mid, out_channels, 3, padding=1, bias=False),
            _norm(norm, spatial_dims, out_channels),
            _act(act),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv1, norm1, act1, conv2, norm2, act2 = self
        if isinstance(conv2, nn.Conv3d):
            return norm_act(norm_act_conv(conv1(x), norm1, act1, conv2), norm2, act2)
        return super().forward(x)


class _UpStage(nn.Module):
    """x2 upsampling of the deeper map, concatenation with the skip, then a conv block.

    "deconv": a transposed conv to the skip's ``channels``, and a block from twice those to ``channels``.
    "nontrainable": (bi/tri)linear interpolation with ``align_corners=True``, and a block from the concatenation
    through half its channels to ``out_channels`` (SelfReg's ``UNet_hd`` with ``bilinear=True``)."""

    def __init__(self, spatial_dims: int, deep_channels: int, channels: int, norm: tuple, act: tuple,
                 upsample: str = "deconv", out_channels: int | None = None) -> None:
        super().__init__()
        if upsample == "deconv":
            deconv = nn.ConvTranspose3d if spatial_dims == 3 else nn.ConvTranspose2d
            self.up = deconv(deep_channels, channels, 2, stride=2)
            self.block = _ConvBlock(spatial_dims, 2 * channels, channels, norm, act)
            self.out_channels = channels
        else:
            self.up = nn.Upsample(scale_factor=2, mode="trilinear" if spatial_dims == 3 else "bilinear",
                                  align_corners=True)
            cat = channels + deep_channels
            self.block = _ConvBlock(spatial_dims, cat, out_channels, norm, act, mid_channels=cat // 2)
            self.out_channels = out_channels

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.block(torch.cat([skip, self.up(x)], dim=1))


class UNet(nn.Module):
    """A plain U-Net for 2-D or 3-D inputs with named stages for feature hooks.

    Level ``i`` of ``len(channels)`` levels works at 1/2**i of the input resolution with ``channels[i]`` channels.
    Submodules, in the order a forward pass calls them:

    * ``encoder.0``: conv block at full resolution; ``encoder.i`` (i >= 1): 2x max pooling then a conv block, so
      ``encoder.{levels-1}`` is the bottleneck;
    * ``decoder.j`` (j = 0 .. levels-2): x2 upsampling, concatenation with the skip ``encoder.{levels-2-j}``,
      conv block; ``decoder.j`` works at 1/2**(levels-2-j), the last one at full resolution. With
      ``upsample="deconv"`` the upsampling is a transposed conv to the skip's channels and the stage at level ``i``
      outputs ``channels[i]``; with ``"nontrainable"`` it is (bi/tri)linear interpolation (``align_corners=True``),
      the block goes from the concatenation through half its channels to ``channels[max(i - 1, 0)]``, so that
      ``UNet(2, 1, 9, (64, 128, 256, 512, 512), "batch", "relu", "nontrainable")`` is SelfReg's ``UNet_hd``
      (``bilinear=True``, 17,262,345 parameters; its own names differ);
    * ``final``: an identity on the last decoder output, named so that wrappers can hook "the feature before the
      output conv" (SelfReg's F_final) without knowing the depth;
    * ``out``: the 1x1(x1) output conv (with bias).

    A conv block is (3x3(x3) conv without bias -> norm -> activation) twice. ``forward`` returns logits only. In 3-D
    each block's middle norm -> activation -> conv saves only the norm's input for backward
    (:func:`fastseg3d.nn.recompute.norm_act_conv`) and its last norm -> LeakyReLU saves its output instead of the
    activation's input (:func:`fastseg3d.nn.recompute.norm_act`); hooked submodules run plainly.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: classes (logits, no activation).
        channels: channels per level, at least two levels; input sides must be divisible by 2**(levels-1), and
            not all equal to it (a one-voxel bottleneck) with instance norm, or with batch norm when training at
            batch 1.
        norm: "instance" (affine InstanceNorm, as nnU-Net) or "batch", in any case (MONAI's ``Norm`` names), or
            MONAI's ``(name, kwargs)`` form with the kwargs ``affine`` and ``eps`` (instance), ``eps`` and
            ``momentum`` (batch).
        act: "relu", "leakyrelu" (slope 0.01, as nnU-Net) or "gelu", in any case (MONAI's ``Act`` names), or
            ``(name, kwargs)`` with ``negative_slope`` (leakyrelu) and ``inplace`` (relu, leakyrelu).
        upsample: "deconv" (transposed convs) or "nontrainable" (interpolation, as SelfReg's ``UNet_hd``).

    Example:
        >>> import torch
        >>> from fastseg3d.networks import UNet
        >>> net = UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(8, 16, 32)).eval()
        >>> net(torch.randn(1, 1, 16, 16, 8)).shape
        torch.Size([1, 3, 16, 16, 8])
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 2,
        channels: Sequence[int] = (32, 64, 128, 256, 320),
        norm: str | tuple = "instance",
        act: str | tuple = "leakyrelu",
        upsample: str = "deconv",
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(channels, (str, bytes)) or not isinstance(channels, Sequence):
            raise ValueError(f"channels must be a sequence of positive ints, got {channels!r}")
        channels = tuple(channels)
        if len(channels) < 2 or not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in channels):
            raise ValueError(f"channels must give at least 2 levels of positive ints, got {channels!r}")
        norm, act = _layer(norm, _NORMS, "norm"), _layer(act, _ACTS, "act")
        if upsample not in _UPSAMPLES:
            raise ValueError(f"upsample must be one of {_UPSAMPLES}, got {upsample!r}")

        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.channels = channels
        self._norm_kind = norm[0]
        pool = nn.MaxPool3d if spatial_dims == 3 else nn.MaxPool2d
        stages = [_ConvBlock(spatial_dims, in_channels, channels[0], norm, act)]
        for i in range(1, len(channels)):
            stages.append(nn.Sequential(pool(2), _ConvBlock(spatial_dims, channels[i - 1], channels[i], norm, act)))
        self.encoder = nn.ModuleList(stages)
        decoder, deep = [], channels[-1]
        for i in reversed(range(len(channels) - 1)):
            decoder.append(_UpStage(spatial_dims, deep, channels[i], norm, act, upsample, channels[max(i - 1, 0)]))
            deep = decoder[-1].out_channels
        self.decoder = nn.ModuleList(decoder)
        self.final = nn.Identity()
        self.out = _conv(spatial_dims)(deep, out_channels, 1)

    @property
    def levels(self) -> int:
        """Number of resolution levels (``len(channels)``)."""
        return len(self.channels)

    @property
    def divisor(self) -> int:
        """Every input side must be divisible by this factor, 2**(levels-1)."""
        return 2 ** (self.levels - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.spatial_dims + 2:
            layout = "(B, C, D, H, W)" if self.spatial_dims == 3 else "(B, C, H, W)"
            raise ValueError(f"input must be {self.spatial_dims + 2}-D {layout}, got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"input has {x.shape[1]} channels, the network expects in_channels={self.in_channels}")
        for axis, size in enumerate(x.shape[2:]):
            if size % self.divisor or size == 0:
                raise ValueError(
                    f"input spatial dimension {axis} (size {size}) must be a positive multiple of {self.divisor} "
                    f"(2**(levels-1) for {self.levels} levels)"
                )
        if all(size == self.divisor for size in x.shape[2:]) and (
                self._norm_kind == "instance" or (self.training and x.shape[0] == 1)):
            # the bottleneck's norm would see one value per channel: ATen's error names neither the size nor the fix
            what = ("InstanceNorm cannot normalise" if self._norm_kind == "instance"
                    else "BatchNorm cannot normalise in training at batch 1")
            raise ValueError(f"input of spatial size {tuple(x.shape[2:])} leaves a one-voxel bottleneck (sides / "
                             f"{self.divisor}), which the bottleneck's {what}: make one side {2 * self.divisor} or "
                             "more" + ("" if self._norm_kind == "instance" else ", or train at batch 2 or more"))
        with autocast_weights(self):  # autocast's weight casts in one launch each way (a training step)
            skips = []
            for stage in self.encoder:
                x = stage(x)
                skips.append(x)
            x = skips.pop()
            for stage in self.decoder:
                x = stage(x, skips.pop())
            return self.out(self.final(x))


def dsd_unet(
    spatial_dims: int = 3,
    in_channels: int = 1,
    out_channels: int = 2,
    channels: Sequence[int] = (32, 64, 128, 256, 320),
    head_mode: str = "deconv",
    **unet_kwargs,
):
    """A :class:`UNet` wrapped in :class:`fastseg3d.distill.DSD` with the UNETR-like head placement.

    Decoder heads (coarse to fine, teacher last) on the bottleneck and every decoder stage but the last; encoder
    heads (shallow to deep, teacher last) on every encoder stage but the bottleneck (see
    :func:`fastseg3d.distill.presets.unet_layers`). With the default five levels that is DSD's 4 + 4 heads.
    ``unet_kwargs`` go to :class:`UNet` (``norm``, ``act``).

    Example:
        >>> import torch
        >>> from fastseg3d.networks import dsd_unet
        >>> net = dsd_unet(3, 1, 3, channels=(8, 16, 32, 64, 64))
        >>> out = net(torch.randn(1, 1, 32, 32, 32))
        >>> len(out.decoder), out.decoder[-1].shape
        (4, torch.Size([1, 3, 32, 32, 32]))
    """
    from fastseg3d.distill import DSD, presets

    net = UNet(spatial_dims, in_channels, out_channels, channels, **unet_kwargs)
    # twice the divisor: instance norm needs more than one voxel at the bottleneck
    example = (1, in_channels) + (2 * net.divisor,) * spatial_dims
    return DSD(net, num_classes=out_channels, head_mode=head_mode, input_shape=example,
               **presets.unet_layers(net, "dsd"))


def selfreg_unet(
    spatial_dims: int = 3,
    in_channels: int = 1,
    out_channels: int = 2,
    channels: Sequence[int] = (32, 64, 128, 256, 320),
    **unet_kwargs,
):
    """A :class:`UNet` wrapped in :class:`fastseg3d.distill.SelfReg` with SelfReg's UNet placement.

    Encoder features: every encoder stage but the full-resolution one; decoder features: every decoder stage but
    the last; F_final: the last decoder output (``final``), as in SelfReg's ``UNet_hd`` (see
    :func:`fastseg3d.distill.presets.unet_layers`). ``unet_kwargs`` go to :class:`UNet`: the published network is
    ``selfreg_unet(2, 1, 9, (64, 128, 256, 512, 512), norm="batch", act="relu", upsample="nontrainable")``.

    Example:
        >>> import torch
        >>> from fastseg3d.networks import selfreg_unet
        >>> net = selfreg_unet(2, 1, 3, channels=(8, 16, 32))
        >>> out = net(torch.randn(2, 1, 16, 16))
        >>> [f.shape[1] for f in out.encoder], out.final.shape
        ([16, 32], torch.Size([2, 8, 16, 16]))
    """
    from fastseg3d.distill import SelfReg, presets

    # SelfReg's intra-feature term compares the top and bottom halves of the channels of every encoder and decoder
    # feature it taps: all stages but the full-resolution ones (the last decoder stage is F_final, which it does not
    # split; with transposed convs channels[0] is only there, with interpolation also in the 1/2-resolution stage)
    net = UNet(spatial_dims, in_channels, out_channels, channels, **unet_kwargs)  # checks channels first
    tapped = [*net.channels[1:], *(stage.out_channels for stage in net.decoder[:-1])]
    if any(c % 2 for c in tapped):
        raise ValueError(f"selfreg_unet needs even channel counts in every feature it taps (SelfReg splits their "
                         f"channels in halves): channels={tuple(channels)} taps features of {tapped} channels")
    return SelfReg(net, **presets.unet_layers(net, "selfreg"))
