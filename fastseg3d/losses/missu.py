"""MISSU's self-distillation loss (``DistillKL``): decoder features against the same-shape encoder skips."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fastseg3d.losses._common import as_volume, check_like, check_weight, named_errors
from fastseg3d.ops.channel_kl import channel_kl
from fastseg3d.reference.channel_kl import REDUCTIONS

__all__ = ["MISSUDistillLoss"]


class MISSUDistillLoss(nn.Module):
    """MISSU's distillation term (Wang et al., 2022): ``weight * sum_i KL(softmax_c(skip_i) || softmax_c(dec_i))``.

    Each decoder feature (student) is paired with the encoder skip feature of the same shape (teacher, detached);
    the softmax runs over channels at every voxel (:func:`fastseg3d.ops.channel_kl`, no temperature). MISSU pairs
    (y4, x3_1), (y3, x2_1), (y2, x1_1) and sums them (``y_kall``). ``reduction="mean"`` averages the channel-summed
    KL over batch and voxels; ``"faithful"`` divides the sum by B*C*H*W as the released code does (i.e. mean
    * D / C per pair). The published weight was not released; ``weight`` defaults to 1. Maps may be 2-D or 3-D.
    MISSU's training output ``(logits, pairs)`` goes in as ``loss(pairs)``.

    Args:
        weight: factor on the sum (>= 0).
        reduction: "mean" or "faithful".

    Example:
        >>> import torch
        >>> from fastseg3d.losses import MISSUDistillLoss
        >>> decoder = [torch.randn(1, 16 // 2**i, 4 * 2**i, 4 * 2**i, 4 * 2**i, requires_grad=True) for i in range(3)]
        >>> skips = [torch.randn_like(d) for d in decoder]
        >>> loss = MISSUDistillLoss(weight=0.1, reduction="faithful")(decoder, skips)
        >>> loss.backward()
        >>> loss.shape
        torch.Size([])
    """

    def __init__(self, weight: float = 1.0, reduction: str = "mean") -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.weight = check_weight(weight, "weight")
        self.reduction = reduction

    def forward(self, decoder_features: Sequence, skip_features: Sequence[torch.Tensor] | None = None
                ) -> torch.Tensor:
        """``(decoder_features, skip_features)``, or MISSU's training ``pairs`` (``[(decoder, skip), ...]``) alone."""
        if skip_features is None:
            pairs = decoder_features
            if (not isinstance(pairs, (tuple, list)) or not pairs
                    or not all(isinstance(p, (tuple, list)) and len(p) == 2 for p in pairs)):
                raise ValueError("pass decoder_features and skip_features, or MISSU's pairs [(decoder, skip), ...]")
            decoder_features, skip_features = [p[0] for p in pairs], [p[1] for p in pairs]
        for name, feats in (("decoder_features", decoder_features), ("skip_features", skip_features)):
            if isinstance(feats, torch.Tensor) or not isinstance(feats, (tuple, list)) or len(feats) == 0:
                raise ValueError(f"{name} must be a non-empty sequence of feature maps")
        if len(decoder_features) != len(skip_features):
            raise ValueError(f"{len(decoder_features)} decoder features but {len(skip_features)} skip features: "
                             "pass one skip per decoder feature")
        total = None
        for i, (d, s) in enumerate(zip(decoder_features, skip_features)):
            dv, sv = as_volume(d, f"decoder_features[{i}]"), as_volume(s, f"skip_features[{i}]")
            check_like([(f"decoder_features[{i}]", d)], f"skip_features[{i}]", s)
            with named_errors([f"decoder_features[{i}]"], f"skip_features[{i}]"):
                loss = channel_kl(dv, sv, self.reduction)
            total = loss if total is None else total + loss
        return self.weight * total
