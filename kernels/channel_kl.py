"""Triton launcher of MISSU's channel-softmax KL distillation (``DistillKL``).

    loss = sum_{b, voxel} sum_c p_c (log p_c - log q_c) / normaliser,
    p = softmax_c(teacher) (detached), q = softmax_c(student)

This is the T = 1, same-resolution, detached-teacher case of the fused KL kernel in
``fastseg3d.kernels.kl_distill`` (all C channels of a voxel in registers, loss partial sums per program reduced
in a fixed order, the student gradient ``(q - p) / normaliser`` written in the forward pass), with another
normaliser: B*D*H*W ("mean") or B*C*H*W (the released code's "faithful" normalisation). The kernel is shared,
only the scale differs, so it is launched from here rather than duplicated.
"""

from __future__ import annotations

import torch

from fastseg3d.kernels.kl_distill import MAX_CHANNELS, kl_distill_fwd

__all__ = ["MAX_CHANNELS", "channel_kl_fwd"]


def channel_kl_fwd(
    student: torch.Tensor,
    teacher: torch.Tensor,
    normaliser: float,
    need_grad: bool,
    empty=torch.empty,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(loss as a 0-dim fp32 tensor, dL/dstudent or None, fp32 for an fp16 student). ``normaliser`` divides the
    total channel-summed KL."""
    bsz = student.shape[0]
    nvox = student.shape[2] * student.shape[3] * student.shape[4]
    # The KL kernel normalises by B * voxels; rescale its loss and gradient to 1 / normaliser.
    scale = bsz * nvox / normaliser
    losses, grads, _ = kl_distill_fwd(
        [student], teacher, tuple(student.shape[2:]), 1.0, [scale], [need_grad], False, empty=empty
    )
    return losses[0] * scale, grads[0]
