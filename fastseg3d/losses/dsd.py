"""The Dual Self-Distillation loss: deep-supervised DiceCE plus the two T^2-scaled KL self-distillation terms."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from fastseg3d.losses._common import as_volume, check_like, check_weight, named_errors
from fastseg3d.losses.dice_ce import DiceCELoss
from fastseg3d.ops.kl_distill import check_temperature, kl_distill_multi

__all__ = ["DSDLoss"]


class DSDLoss(nn.Module):
    """DSD's loss (Banerjee et al., ISBI 2024) on the training output of :class:`fastseg3d.distill.DSD`.

    ``L = sum over (main, every decoder head) of DiceCE(logits, target)
    + kl_weight * (sum_{decoder students} KL_T(dec teacher || s) + sum_{encoder students} KL_T(enc teacher || s))``,
    with MONAI's ``DiceCELoss(to_onehot_y=True, softmax=True)`` (computed by :class:`fastseg3d.losses.DiceCELoss`,
    which keeps only the logits and the label for backward) and ``KL_T = T^2 * mean over batch and voxels of
    the class-summed KL between softmax(logits / T)``; the teachers are the last decoder head (nearest the output)
    and the last encoder head (the deepest). With DSD's 4 + 4 heads that is the published five DiceCE terms and six
    KL terms, T = 3, both weights 1. Each teacher's KL terms are one fused pass
    (:func:`fastseg3d.ops.kl_distill_multi`); the published loss does not detach the teachers
    (``detach_teacher=False``).

    Heads below the output resolution (``head_mode="interp"``): every KL term is a mean over the label's voxels,
    as with the published full-resolution heads, its inputs upsampled trilinearly (``align_corners=False``) on the
    fly inside the fused op, never materialised; for DiceCE a decoder head is upsampled ((bi/tri)linear, as
    ``F.interpolate``) to the label's resolution inside the loss and kept at its own resolution for backward, so
    that it is supervised by the full-resolution label as in the published model, never by a resampled label. The
    main output must be at the label's resolution, and every head's sides must divide the label's. 2-D outputs
    (B, K, H, W) work too.

    Given a plain tensor (the wrapper's eval output) the loss is the DiceCE of it alone, for validation loops.
    :meth:`terms` returns the three parts for logging.

    Half-precision outputs (autocast) need no cast beforehand: every term computes in fp32 and returns each head's
    gradient in that head's dtype. For backward the DiceCE terms keep the logits (2 bytes per logit in bf16, each head
    at its own resolution) and the label, where MONAI's keep an fp32 softmax, log-softmax and one-hot label (12 bytes
    per upsampled logit): with five full-resolution heads at 2 x 2 x 128^3, 112 MiB (80 MiB of heads and the 32 MiB
    int64 label) instead of 512 MiB.

    Args:
        num_classes: the number of classes (checked against the logits).
        temperature: T > 0 (a real number or a 0-d tensor).
        kl_weight: weight of the KL sum (DSD's alpha_KL).
        detach_teacher: stop the KL gradients into the teacher heads. The encoder teacher's head has no DiceCE
            term, so then nothing trains it (its students learn from its initial projection, and DDP needs
            ``find_unused_parameters=True``, which ``fastseg3d train`` sets): use it with ``share_heads=True``,
            where that head is a decoder head's too, or not at all.
        include_background, lambda_dice, lambda_ce: as MONAI's ``DiceCELoss`` takes them.
        dice_ce_kwargs: MONAI's ``DiceCELoss`` settings for the DiceCE terms beyond those (``batch``,
            ``squared_pred``, ``reduction``, ``smooth_nr``, ``smooth_dr``).

    Example:
        >>> import torch
        >>> from fastseg3d.losses import DSDLoss
        >>> from fastseg3d.networks.unet import dsd_unet
        >>> net = dsd_unet(3, 1, 3, channels=(8, 16, 32, 64, 64))
        >>> loss_fn = DSDLoss(num_classes=3)
        >>> label = torch.randint(0, 3, (1, 1, 32, 32, 32))
        >>> loss = loss_fn(net(torch.randn(1, 1, 32, 32, 32)), label)
        >>> loss.backward()
        >>> sorted(loss_fn.terms(net(torch.randn(1, 1, 32, 32, 32)), label))
        ['dice_ce', 'kl_decoder', 'kl_encoder']
    """

    def __init__(
        self,
        num_classes: int,
        temperature: float = 3.0,
        kl_weight: float = 1.0,
        detach_teacher: bool = False,
        include_background: bool = True,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        dice_ce_kwargs: Mapping | None = None,
    ) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes <= 0:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        temperature = check_temperature(temperature)
        if not isinstance(detach_teacher, bool):
            raise ValueError(f"detach_teacher must be a bool, got {detach_teacher!r}")
        self.num_classes = num_classes
        self.temperature = temperature
        self.kl_weight = check_weight(kl_weight, "kl_weight")
        self.detach_teacher = detach_teacher
        self.dice_ce = DiceCELoss(include_background, to_onehot_y=True, softmax=True, lambda_dice=lambda_dice,
                                  lambda_ce=lambda_ce, **(dice_ce_kwargs or {}))
        if not self.dice_ce.fused:  # MONAI's composition would take no head below the label's resolution
            raise ValueError(f"dice_ce_kwargs={dict(dice_ce_kwargs)} is MONAI's composition, which takes no head "
                             "below the label's resolution; DSDLoss takes batch, squared_pred, reduction, smooth_nr "
                             "and smooth_dr")

    def _check_logits(self, t, name: str, dims: int) -> None:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != dims or t.shape[1] != self.num_classes:
            raise ValueError(f"{name} must be ({dims}-D) logits with num_classes={self.num_classes} channels, got "
                             f"shape {tuple(t.shape)}")

    def _kl(self, heads: Sequence[torch.Tensor], name: str, size: tuple[int, ...]) -> torch.Tensor:
        if len(heads) < 2:
            return heads[0].new_zeros((), dtype=torch.float32)
        vols = [as_volume(h, f"{name}[{i}]") for i, h in enumerate(heads)]
        size = size if len(size) == 3 else (1, *size)
        with named_errors([f"{name}[{i}]" for i in range(len(heads) - 1)], f"{name}[{len(heads) - 1}]"):
            return kl_distill_multi(vols[:-1], vols[-1], self.temperature, self.detach_teacher, size)

    def terms(self, outputs, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"dice_ce": sum of the DiceCE terms, "kl_decoder": ..., "kl_encoder": ...}`` (KL terms unweighted)."""
        if isinstance(outputs, torch.Tensor):
            self._check_logits(outputs, "outputs", outputs.dim())
            return {"dice_ce": self.dice_ce(outputs, target)}
        if not isinstance(outputs, (tuple, list)) or len(outputs) != 3:
            raise ValueError("outputs must be DSD's training output (main, decoder heads, encoder heads) or a tensor")
        main, decoder, encoder = outputs
        dims = main.dim() if isinstance(main, torch.Tensor) and main.dim() in (4, 5) else 5
        self._check_logits(main, "main", dims)
        for name, heads in (("decoder", decoder), ("encoder", encoder)):
            if not isinstance(heads, (tuple, list)) or len(heads) == 0:
                raise ValueError(f"{name} must be a non-empty sequence of head logits")
            for i, h in enumerate(heads):
                self._check_logits(h, f"{name}[{i}]", dims)
            check_like([(f"{name}[{i}]", h) for i, h in enumerate(heads)], "main", main)
        if not isinstance(target, torch.Tensor) or target.dim() != dims or target.shape[1] != 1:
            raise ValueError(f"target must be a ({dims}-D) label map (B, 1, *spatial), got "
                             f"{getattr(target, 'shape', type(target).__name__)}")
        size = tuple(target.shape[2:])
        if tuple(main.shape[2:]) != size:
            raise ValueError(f"main logits {tuple(main.shape[2:])} and target {size} must have one spatial shape")
        for name, heads in (("decoder", decoder), ("encoder", encoder)):
            for i, h in enumerate(heads):  # upsampled to the label's size in the DiceCE and KL terms
                if any(n < 1 or m % n for n, m in zip(h.shape[2:], size)):
                    raise ValueError(f"{name}[{i}] has spatial shape {tuple(h.shape[2:])}, which must divide the "
                                     f"target's {size} per axis")
        seg = sum(self.dice_ce(h, target) for h in [main, *decoder])
        return {"dice_ce": seg, "kl_decoder": self._kl(decoder, "decoder", size),
                "kl_encoder": self._kl(encoder, "encoder", size)}

    def forward(self, outputs, target: torch.Tensor) -> torch.Tensor:
        terms = self.terms(outputs, target)
        if len(terms) == 1:
            return terms["dice_ce"]
        return terms["dice_ce"] + self.kl_weight * (terms["kl_decoder"] + terms["kl_encoder"])
