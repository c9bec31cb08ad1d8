"""Reference Dice + cross-entropy on softmax logits, as MONAI's ``DiceCELoss(to_onehot_y=True, softmax=True)``
computes it, in plain autograd ops.

``loss = lambda_dice * R_{k in S} (1 - (2 I_k + smooth_nr) / (G_k + P_k + smooth_dr))
+ lambda_ce * R_{b, voxel} (-log p_{b, label, voxel})``, with ``p = softmax(logits)`` over the classes,
``I = sum p * onehot``, ``P = sum p`` (``sum p^2`` with ``squared_pred``), ``G = sum onehot`` over the voxels of each
(batch, class) pair (with ``batch``, over the batch's voxels of each class), ``S`` every class, or every class
but 0 without the background, and ``R`` the mean (``reduction="mean"``) or the sum. Logits below the label's
resolution are first upsampled ((bi/tri)linear, ``align_corners=False``). Math in fp32 (fp64 for fp64 logits).

Autograd saves what the plain composition saves: the softmax and the one-hot label for the Dice term and the
log-softmax (inside ``cross_entropy``) for the cross-entropy, each the size of the upsampled logits in the compute
dtype; a term of weight 0 is left out, with what it would save.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["dice_ce_ref", "upsampled_logits"]


def upsampled_logits(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``logits`` in the compute dtype (fp32; fp64 stays fp64), upsampled to ``size`` when smaller."""
    z = logits if logits.dtype == torch.float64 else logits.float()
    if tuple(z.shape[2:]) == tuple(size):
        return z
    return F.interpolate(z, size=tuple(size), mode="trilinear" if z.dim() == 5 else "bilinear", align_corners=False)


def dice_ce_ref(
    logits: torch.Tensor,
    target: torch.Tensor,
    include_background: bool = True,
    lambda_dice: float = 1.0,
    lambda_ce: float = 1.0,
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    *,
    squared_pred: bool = False,
    batch: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    """Dice + cross-entropy of ``logits`` (B, K, *spatial) against the class map ``target`` (B, 1, *spatial_t), as a
    0-d tensor in the compute dtype. ``spatial_t`` is ``spatial`` or a multiple of it per axis."""
    size = tuple(target.shape[2:])
    z = upsampled_logits(logits, size)
    labels = target.long()
    if lambda_dice == 0 and lambda_ce == 0:
        return z.sum() * 0.0
    loss = z.new_zeros(())
    if lambda_dice != 0:  # a term of weight 0 is left out, with what it would save
        p = torch.softmax(z, 1)
        onehot = torch.zeros_like(p).scatter_(1, labels, 1.0)
        dims = (0, *range(2, z.dim())) if batch else tuple(range(2, z.dim()))
        intersection = (p * onehot).sum(dims)
        denominator = onehot.sum(dims) + (p * p if squared_pred else p).sum(dims)
        dice = 1.0 - (2.0 * intersection + smooth_nr) / (denominator + smooth_dr)
        if not include_background:
            dice = dice[..., 1:]
        loss = loss + lambda_dice * (dice.sum() if reduction == "sum" else dice.mean())
    if lambda_ce != 0:
        loss = loss + lambda_ce * F.cross_entropy(z, labels[:, 0], reduction=reduction)
    return loss
