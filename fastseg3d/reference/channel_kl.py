"""Reference channel-softmax KL distillation of MISSU (``DistillKL``) in ATen ops.

Per voxel, KL(softmax_c(teacher) || softmax_c(student)) over the channels of two feature maps of one shape, the
teacher detached. ``reduction="mean"`` averages the channel-summed KL over batch and voxels; ``"faithful"``
divides the total by B*C*H*W as the released code does (it unpacks the 5-D size as (D, B, C, H, W) and divides
by size0*size1*size3*size4, so the depth is left out and the channel count put in). Math in fp32 (fp64 for fp64).
"""

from __future__ import annotations

import torch

from fastseg3d.reference._grad_dtype import compute_dtype, saved_grad_dtype

__all__ = ["REDUCTIONS", "channel_kl_fused_ref", "channel_kl_normaliser", "channel_kl_ref"]

REDUCTIONS = ("mean", "faithful")


def channel_kl_normaliser(shape, reduction: str) -> int:
    """What the channel-summed total KL is divided by: B*D*H*W ("mean") or B*C*H*W ("faithful")."""
    b, c, d, h, w = shape
    if reduction == "mean":
        return b * d * h * w
    if reduction == "faithful":
        return b * c * h * w
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def channel_kl_ref(student: torch.Tensor, teacher: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """MISSU's per-level distillation loss, differentiable (student only) by autograd; a 0-dim tensor."""
    norm = channel_kl_normaliser(student.shape, reduction)
    cd = compute_dtype(student, teacher)
    logq = torch.log_softmax(student.to(cd), dim=1)
    logp = torch.log_softmax(teacher.detach().to(cd), dim=1)
    return (logp.exp() * (logp - logq)).sum() / norm


def channel_kl_fused_ref(
    student: torch.Tensor, teacher: torch.Tensor, reduction: str, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What the fused kernel computes, without autograd: (fp32 loss, dL/dstudent or None), the gradient in
    :func:`saved_grad_dtype`."""
    norm = channel_kl_normaliser(student.shape, reduction)
    cd = compute_dtype(student, teacher)
    logq = torch.log_softmax(student.to(cd), dim=1)
    logp = torch.log_softmax(teacher.to(cd), dim=1)
    p = logp.exp()
    loss = ((p * (logp - logq)).sum() / norm).float()
    grad = ((logq.exp() - p) / norm).to(saved_grad_dtype(student.dtype)) if need_grad else None
    return loss, grad
