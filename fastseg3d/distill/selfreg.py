"""SelfReg-UNet (Zhu et al., MICCAI 2024): expose a U-Net's block features to its training-only regularisers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from fastseg3d.distill._hooks import FeatureTap, NoDataParallel, check_wrapper_args

__all__ = ["SelfReg", "SelfRegOutput"]


class SelfRegOutput(NamedTuple):
    """What :class:`SelfReg` returns in training (the input of :class:`fastseg3d.losses.SelfRegLoss`).

    ``logits``: the backbone's output; ``encoder`` and ``decoder``: the hooked block features in the order the
    layers were given; ``final``: F_final, the feature before the output conv (the teacher of the SCR term).
    """

    logits: torch.Tensor
    encoder: tuple[torch.Tensor, ...]
    decoder: tuple[torch.Tensor, ...]
    final: torch.Tensor


class SelfReg(NoDataParallel, nn.Module):
    """Wrap any U-shaped network for SelfReg: forward hooks expose encoder, decoder and final features.

    SelfReg adds no parameters and no inference cost: in training the forward returns a :class:`SelfRegOutput`,
    in ``eval()`` the backbone's logits only (no feature is kept). Layer names follow ``named_modules()``, with
    ``"name:input"`` for a module's first input; :mod:`fastseg3d.distill.presets` has the names for fastseg3d's
    UNet and MONAI's UNETR, DynUNet, SwinUNETR and VNet. Each layer must run once in a training forward, and its
    output must not be changed in place after it (an inplace activation after a norm: tap the activation); a
    ``RuntimeError`` names the layers otherwise. The backbone must return one logits tensor.

    Args:
        backbone: the segmentation network, kept as ``self.backbone``.
        encoder_layers: encoder block layers (at least one).
        decoder_layers: decoder block layers (at least one).
        final_layer: the layer giving F_final, the feature the output conv reads.

    Example:
        >>> import torch
        >>> from fastseg3d.distill import SelfReg
        >>> from fastseg3d.networks.unet import UNet
        >>> net = SelfReg(UNet(3, 1, 2, channels=(8, 16, 32)), ["encoder.1", "encoder.2"], ["decoder.0"], "final")
        >>> out = net(torch.randn(1, 1, 16, 16, 16))
        >>> [f.shape[1] for f in out.encoder], out.final.shape
        ([16, 32], torch.Size([1, 8, 16, 16, 16]))
        >>> net.eval()(torch.randn(1, 1, 16, 16, 16)).shape
        torch.Size([1, 2, 16, 16, 16])
    """

    def __init__(
        self, backbone: nn.Module, encoder_layers: Sequence[str], decoder_layers: Sequence[str], final_layer: str
    ) -> None:
        super().__init__()
        if not isinstance(final_layer, str):
            raise ValueError(f"final_layer must be a layer name, got {final_layer!r}")
        layers = check_wrapper_args(backbone, encoder_layers, decoder_layers, final_layer)
        self.backbone = backbone
        self.encoder_layers = tuple(encoder_layers)
        self.decoder_layers = tuple(decoder_layers)
        self.final_layer = final_layer
        self._tap = FeatureTap(backbone, layers)
        self._tap.attach(backbone)

    def unwrap(self) -> nn.Module:
        """The backbone with the wrapper's hooks taken off, for deployment or export (``torch.export``, or
        ``torch.jit.trace`` under ``torch.no_grad()``; ``torch.jit.script`` refuses Python hooks, and fastseg3d's
        own networks are not scriptable); the wrapper does not train after this (it raises, saying so)."""
        self._tap.remove(self.backbone)
        return self.backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor | SelfRegOutput:
        if not self.training:
            return self.backbone(x)
        logits, feats = self._tap.run(self.backbone, x)
        if logits.dim() != feats[-1].dim():
            raise ValueError(f"the backbone returned shape {tuple(logits.shape)} in training, not logits shaped like "
                             f"the final feature {tuple(feats[-1].shape)} (turn off the backbone's deep supervision)")
        n_enc, n_dec = len(self.encoder_layers), len(self.decoder_layers)
        return SelfRegOutput(logits, tuple(feats[:n_enc]), tuple(feats[n_enc:n_enc + n_dec]), feats[-1])
