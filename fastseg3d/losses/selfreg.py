"""SelfReg-UNet's training-only regularisers (intra-feature distillation and semantic consistency) as one loss."""

from __future__ import annotations

import torch
from torch import nn

from fastseg3d.losses._common import as_volume, check_like, check_weight, named_errors
from fastseg3d.losses.dice_ce import DiceCELoss
from fastseg3d.ops.selfreg import random_channel_pairs, selfreg_inter_multi, selfreg_intra

__all__ = ["SelfRegLoss"]


class SelfRegLoss(nn.Module):
    """SelfReg's loss (Zhu et al., MICCAI 2024, ``KDloss`` as coded) on :class:`fastseg3d.distill.SelfReg`'s output.

    ``KD = mean_{encoder} IFD(f) + mean_{decoder} IFD(f) + mean_{decoder, then encoder} SCR(f, F_final)`` and the
    loss is ``segmentation + weight * KD`` (the code's single ``lambda_x`` on both terms, default 0.015).

    * IFD, intra-feature distillation (:func:`fastseg3d.ops.selfreg_intra`): channels ranked by their mean
      L2-normalised map, MSE between the top and the bottom half, gradients to both; channel counts must be even.
    * SCR, semantic consistency (:func:`fastseg3d.ops.selfreg_inter_multi`, F_final pooled once into a pyramid):
      the larger map average-pooled to the smaller, ``k`` random distinct channels of the feature against ``k``
      independent random channels of F_final, MSE, F_final detached. ``k = min(C, C_final)`` as published, or
      capped by ``num_channels``. The channels are redrawn at every call from ``generator`` (a
      ``torch.Generator``, or an int seed for a new CPU one; ``None`` uses torch's global RNG), in the order
      decoder features then encoder features, student then F_final, so runs are reproducible.
    * segmentation: :class:`fastseg3d.losses.DiceCELoss` (MONAI's ``DiceCELoss(to_onehot_y=True, softmax=True)``,
      keeping only the logits and the label for backward) on the logits when
      ``include_segmentation`` (then ``target`` is required); with ``include_segmentation=False`` the loss is
      ``weight * KD`` alone, to be added to a segmentation loss of one's choice (e.g. SelfReg's 0.4 CE + 0.6 Dice).

    Features may be 2-D (B, C, H, W) or 3-D, and of mixed dtypes (under autocast a feature taken after a
    LayerNorm, such as UNETR's ``decoder5:input``, stays fp32 while the others are bf16): the regularisers compute
    in fp32 and return each gradient in its feature's dtype. :meth:`terms` returns the parts for logging.

    Under ``torch.compile(fullgraph=True)`` pass ``generator=None``: torch.compile cannot trace a
    ``torch.Generator`` object (an int seed makes one), whereas draws from torch's global generator are traced.
    Without ``fullgraph`` a generator only splits the graph at the channel draws.

    Example:
        >>> import torch
        >>> from fastseg3d.losses import SelfRegLoss
        >>> from fastseg3d.networks.unet import selfreg_unet
        >>> net = selfreg_unet(3, 1, 3, channels=(8, 16, 32))
        >>> loss_fn = SelfRegLoss(weight=0.015, generator=0)
        >>> label = torch.randint(0, 3, (2, 1, 16, 16, 16))
        >>> loss = loss_fn(net(torch.randn(2, 1, 16, 16, 16)), label)
        >>> loss.backward()
        >>> loss.shape
        torch.Size([])
    """

    def __init__(
        self,
        weight: float = 0.015,
        num_channels: int | None = None,
        generator: torch.Generator | int | None = None,
        include_segmentation: bool = True,
        include_background: bool = True,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
    ) -> None:
        super().__init__()
        self.weight = check_weight(weight, "weight")
        if num_channels is not None and (isinstance(num_channels, bool) or not isinstance(num_channels, int)
                                         or num_channels <= 0):
            raise ValueError(f"num_channels must be a positive int or None, got {num_channels!r}")
        if isinstance(generator, int) and not isinstance(generator, bool):
            generator = torch.Generator().manual_seed(generator)
        elif generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator, an int seed or None, got {generator!r}")
        if generator is not None and generator.device.type != "cpu":
            raise ValueError(f"generator must be a CPU generator (the channel draws are on the CPU), got "
                             f"{generator.device}")
        if not isinstance(include_segmentation, bool):
            raise ValueError(f"include_segmentation must be a bool, got {include_segmentation!r}")
        self.num_channels = num_channels
        self.generator = generator
        self.dice_ce = DiceCELoss(include_background, to_onehot_y=True, softmax=True, lambda_dice=lambda_dice,
                                  lambda_ce=lambda_ce) if include_segmentation else None

    def terms(self, outputs, target: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``{"intra": ..., "inter": ...}`` (unweighted) and ``"segmentation"`` when it is included."""
        if not isinstance(outputs, (tuple, list)) or len(outputs) != 4:
            raise ValueError("outputs must be SelfReg's training output (logits, encoder, decoder, final)")
        logits, encoder, decoder, final = outputs
        for name, feats in (("encoder", encoder), ("decoder", decoder)):
            if not isinstance(feats, (tuple, list)) or len(feats) == 0:
                raise ValueError(f"{name} must be a non-empty sequence of feature maps")
        enc = [as_volume(f, f"encoder[{i}]") for i, f in enumerate(encoder)]
        dec = [as_volume(f, f"decoder[{i}]") for i, f in enumerate(decoder)]
        final_volume = as_volume(final, "final")
        # ranks compared before the 2-D maps take a depth of one
        check_like([*((f"encoder[{i}]", f) for i, f in enumerate(encoder)),
                    *((f"decoder[{i}]", f) for i, f in enumerate(decoder))], "final", final)
        final = final_volume
        for name, feats in (("encoder", enc), ("decoder", dec)):
            for i, f in enumerate(feats):
                if f.shape[1] % 2:  # the intra term pairs the top and bottom halves of the ranked channels
                    raise ValueError(f"{name}[{i}] has {f.shape[1]} channels; SelfReg's intra term needs an even "
                                     "channel count")
        intra = (torch.stack([selfreg_intra(f) for f in enc]).mean()
                 + torch.stack([selfreg_intra(f) for f in dec]).mean())
        students = dec + enc
        cs, ct = [], []
        for f in students:
            k = min(f.shape[1], final.shape[1])
            if self.num_channels is not None:
                k = min(k, self.num_channels)
            a, b = random_channel_pairs(f.shape[1], final.shape[1], k, generator=self.generator)
            cs.append(a)
            ct.append(b)
        names = [*(f"decoder[{i}]" for i in range(len(dec))), *(f"encoder[{i}]" for i in range(len(enc)))]
        with named_errors(names, "final"):
            out = {"intra": intra, "inter": selfreg_inter_multi(students, final, cs, ct).mean()}
        if self.dice_ce is not None:
            if target is None:
                raise ValueError("target is required when include_segmentation=True")
            out["segmentation"] = self.dice_ce(logits, target)
        return out

    def forward(self, outputs, target: torch.Tensor | None = None) -> torch.Tensor:
        terms = self.terms(outputs, target)
        kd = self.weight * (terms["intra"] + terms["inter"])
        return terms["segmentation"] + kd if "segmentation" in terms else kd
