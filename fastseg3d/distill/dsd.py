"""Dual Self-Distillation (DSD, Banerjee et al., ISBI 2024): class heads on a U-shaped network's features."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from fastseg3d.distill._hooks import FeatureTap, NoDataParallel, check_wrapper_args, param_dtype_device
from fastseg3d.nn.autocast_weights import autocast_weights

__all__ = ["DSD", "DSDOutput", "DeepUp", "HEAD_MODES"]

HEAD_MODES = ("deconv", "interp")


class DSDOutput(NamedTuple):
    """What :class:`DSD` returns in training (the input of :class:`fastseg3d.losses.DSDLoss`).

    ``main``: the backbone's logits. ``decoder``: the decoder head logits ordered coarse to fine, the teacher (the
    head nearest the output, DSD's "dec1") last. ``encoder``: the encoder head logits ordered shallow to deep, the
    teacher (the deepest head, DSD's "enc4") last. Heads are at the output resolution with ``head_mode="deconv"``
    and at their feature's resolution with ``"interp"``.
    """

    main: torch.Tensor
    decoder: tuple[torch.Tensor, ...]
    encoder: tuple[torch.Tensor, ...]


def _power_of_two(scale: tuple[int, ...]) -> int | None:
    s = scale[0]
    if any(v != s for v in scale) or s < 1 or s & (s - 1):
        return None
    return s


class DeepUp(nn.Module):
    """DSD's head: a 1x1(x1) conv to the classes, then (``scale`` > 1) one x2 transposed conv applied log2(scale)
    times with the same weights, as published; ``scale == 1`` keeps a 1x1(x1) transposed conv, as published.

    ``scale=None`` builds the conv only: the head stays at its feature's resolution (``head_mode="interp"``).

    Example:
        >>> import torch
        >>> from fastseg3d.distill import DeepUp
        >>> head = DeepUp(3, in_channels=32, num_classes=4, scale=8)
        >>> head(torch.randn(1, 32, 2, 2, 2)).shape
        torch.Size([1, 4, 16, 16, 16])
    """

    def __init__(self, spatial_dims: int, in_channels: int, num_classes: int, scale: int | None) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        if scale is not None and (scale < 1 or scale & (scale - 1)):
            raise ValueError(f"scale must be a power of two, got {scale!r}")
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        self.conv = conv(in_channels, num_classes, 1)
        self.repeats = 0 if scale is None else max(int(math.log2(scale)), 1)
        if scale is not None:
            deconv = nn.ConvTranspose3d if spatial_dims == 3 else nn.ConvTranspose2d
            k = min(scale, 2)
            self.up = deconv(num_classes, num_classes, k, stride=k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        for _ in range(self.repeats):
            x = self.up(x)
        return x


class DSD(NoDataParallel, nn.Module):
    """Wrap any U-shaped network for Dual Self-Distillation: class heads on named encoder and decoder features.

    Forward hooks on ``encoder_layers`` (ordered shallow to deep, the teacher, DSD's "enc4", last) and
    ``decoder_layers`` (ordered coarse to fine, the teacher, DSD's "dec1", last) feed one :class:`DeepUp` head each.
    In training the forward returns a :class:`DSDOutput` (main logits, decoder heads, encoder heads) for
    :class:`fastseg3d.losses.DSDLoss`; in ``eval()`` it returns the backbone's logits only, the heads are skipped
    and no feature is kept, so ``sliding_window_inference`` and checkpoints of the backbone work unchanged.

    Heads are built in ``__init__``, so the optimizer and ``state_dict`` see them from the start. Each needs its
    feature's channels and its scale (the output resolution over the feature's, per axis); both are read from a dry
    run of the backbone on the ``meta`` device (shapes only: free at any size, the backbone's tensors untouched).
    Any valid input size gives the same heads for a U-Net, so ``input_shape`` is optional: without it the input
    channels come from the backbone's ``in_channels`` or its first convolution, and the size from its ``img_size``
    (or UNETR's ``feat_size`` x ``patch_size``), else from the product of its convolution and pooling strides
    (doubled until a size runs); a ``ValueError`` asks for ``input_shape`` when none does.

    ``head_mode="deconv"``: DSD as published, each head upsampled to the output by its repeated x2 transposed conv
    (scales must be isotropic powers of two). ``"interp"``: heads stay at their feature's resolution (1x1 conv only);
    no deconv activations are stored, and the fused KL of :class:`fastseg3d.losses.DSDLoss` computes every pair over
    the label's voxels, as with full-resolution heads, upsampling the heads on the fly without materialising them
    (its DiceCE still upsamples the decoder heads to the label's resolution): the mode saves the heads' memory,
    while the KL's arithmetic stays that of full-resolution heads.
    Any integer scale per axis works.

    ``share_heads=True``: an encoder and a decoder feature at the same scale share one head, as DSD's nnU-Net
    (DynUNet) and SwinUNETR variants do (their features at one scale have the same channels; a mismatch is a
    ``ValueError``). The shared head appears under both ``encoder_heads.i`` and ``decoder_heads.j`` in the
    ``state_dict``, and once in ``parameters()``.

    Layer names follow ``named_modules()``; ``"name:input"`` taps a module's first input (see
    :mod:`fastseg3d.distill.presets` for fastseg3d's UNet, MONAI's UNETR, DynUNet, SwinUNETR and VNet). Each layer
    must run once in a forward, in eval as in training (the heads are sized by an eval-mode run), and its output
    must not be changed in place after it (an inplace activation after a norm: tap the activation); a
    ``RuntimeError`` names the layers otherwise. The backbone must return one logits tensor.

    Args:
        backbone: the segmentation network, kept as ``self.backbone``.
        encoder_layers: encoder feature layers, shallow to deep (teacher last); at least one.
        decoder_layers: decoder feature layers, coarse to fine (teacher last); at least one.
        num_classes: the backbone's output channels.
        head_mode: "deconv" or "interp".
        share_heads: one head for an encoder and a decoder feature at the same scale.
        input_shape: (keyword, optional) the full shape (B, C, *spatial) of an example input, for the dry run;
            derived from the backbone when omitted.

    Example:
        >>> import torch
        >>> from fastseg3d.distill import DSD
        >>> from fastseg3d.networks.unet import UNet
        >>> net = UNet(3, 1, 2, channels=(8, 16, 32))
        >>> dsd = DSD(net, ["encoder.0", "encoder.1"], ["encoder.2", "decoder.0"], num_classes=2)
        >>> out = dsd(torch.randn(1, 1, 16, 16, 16))
        >>> out.main.shape, len(out.decoder), len(out.encoder)
        (torch.Size([1, 2, 16, 16, 16]), 2, 2)
        >>> dsd.eval()(torch.randn(1, 1, 16, 16, 16)).shape
        torch.Size([1, 2, 16, 16, 16])
    """

    def __init__(
        self,
        backbone: nn.Module,
        encoder_layers: Sequence[str],
        decoder_layers: Sequence[str],
        num_classes: int,
        head_mode: str = "deconv",
        share_heads: bool = False,
        *,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        layers = check_wrapper_args(backbone, encoder_layers, decoder_layers)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes <= 0:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if head_mode not in HEAD_MODES:
            raise ValueError(f"head_mode must be one of {HEAD_MODES}, got {head_mode!r}")

        self.backbone = backbone
        self.encoder_layers = tuple(encoder_layers)
        self.decoder_layers = tuple(decoder_layers)
        self.num_classes = num_classes
        self.head_mode = head_mode
        self._tap = FeatureTap(backbone, layers)

        out, feats = self._tap.dry_run(backbone, input_shape)
        if out.shape[1] != num_classes:
            raise ValueError(f"the backbone returns {out.shape[1]} channels, but num_classes={num_classes}")
        spatial_dims = out.dim() - 2
        if spatial_dims not in (2, 3):
            raise ValueError(f"the backbone's output must be 4-D or 5-D logits, got shape {tuple(out.shape)}")
        chans, scale_list = [], []
        for layer, f in zip(layers, feats):
            if f.dim() != out.dim():
                raise ValueError(f"layer {layer!r} gives a {f.dim()}-D feature {tuple(f.shape)}, the output is "
                                 f"{out.dim()}-D: tap a volume, not tokens (e.g. 'module:input')")
            ratio = []
            for o, s in zip(out.shape[2:], f.shape[2:]):
                if s == 0 or o % s:
                    raise ValueError(f"layer {layer!r} has spatial shape {tuple(f.shape[2:])}, not an integer "
                                     f"fraction of the output {tuple(out.shape[2:])}")
                ratio.append(o // s)
            chans.append(f.shape[1])
            scale_list.append(tuple(ratio))

        heads, by_scale = [], {}
        n_enc = len(self.encoder_layers)
        for i, (layer, c, s) in enumerate(zip(layers, chans, scale_list)):
            if share_heads and i >= n_enc and s in by_scale:
                enc_layer, head = by_scale[s]
                if head.conv.in_channels != c:
                    raise ValueError(f"share_heads: {enc_layer!r} and {layer!r} are both at scale {s} but have "
                                     f"{head.conv.in_channels} and {c} channels")
                heads.append(head)
                continue
            scale = None
            if head_mode == "deconv":
                scale = _power_of_two(s)
                if scale is None:
                    raise ValueError(f"layer {layer!r} is at scale {s} of the output: head_mode='deconv' needs one "
                                     "power of two on every axis (use head_mode='interp')")
            heads.append(DeepUp(spatial_dims, c, num_classes, scale))
            if share_heads and i < n_enc:
                if s in by_scale:
                    raise ValueError(f"share_heads: encoder layers {by_scale[s][0]!r} and {layer!r} are both at "
                                     f"scale {s}")
                by_scale[s] = (layer, heads[-1])
        self.spatial_dims = spatial_dims
        self.share_heads = share_heads
        self.scales = dict(zip(layers, scale_list))
        dtype, device = param_dtype_device(backbone)  # the heads live with the backbone's parameters
        self.encoder_heads = nn.ModuleList(heads[:n_enc]).to(device=device, dtype=dtype)
        self.decoder_heads = nn.ModuleList(heads[n_enc:]).to(device=device, dtype=dtype)
        self._tap.attach(backbone)  # last: a constructor that raised has left the backbone as it was

    def unwrap(self) -> nn.Module:
        """The backbone with the wrapper's hooks taken off, for deployment or export (``torch.export``, or
        ``torch.jit.trace`` under ``torch.no_grad()``; ``torch.jit.script`` refuses Python hooks, and fastseg3d's
        own networks are not scriptable); the wrapper does not train after this (it raises, saying so)."""
        self._tap.remove(self.backbone)
        return self.backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor | DSDOutput:
        if not self.training:
            return self.backbone(x)
        main, feats = self._tap.run(self.backbone, x)
        if main.dim() != self.spatial_dims + 2 or main.shape[1] != self.num_classes:
            raise ValueError(f"the backbone returned shape {tuple(main.shape)} in training, not "
                             f"(B, {self.num_classes}, *spatial) logits (turn off the backbone's own deep supervision)")
        n_enc = len(self.encoder_layers)
        with autocast_weights(self.encoder_heads, self.decoder_heads):  # the heads' casts in one launch each way
            enc = tuple(head(f) for head, f in zip(self.encoder_heads, feats[:n_enc]))
            dec = tuple(head(f) for head, f in zip(self.decoder_heads, feats[n_enc:]))
        if self.head_mode == "deconv":
            for layer, h in zip(self.encoder_layers + self.decoder_layers, enc + dec):
                if h.shape[2:] != main.shape[2:]:
                    raise ValueError(f"the head on {layer!r} gives {tuple(h.shape[2:])}, the output is "
                                     f"{tuple(main.shape[2:])}: the layer's scale differs from the one the heads "
                                     "were built for")
        return DSDOutput(main, dec, enc)
