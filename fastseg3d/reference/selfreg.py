"""Reference SelfReg-UNet feature regularisers (``KDloss.inter_fd`` and ``KDloss.intra_fd``) in ATen ops, for 3-D
feature maps (B, C, D, H, W). Math in fp32 (fp64 for fp64 inputs)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from fastseg3d.reference._grad_dtype import compute_dtype, saved_grad_dtype

__all__ = [
    "intra_order",
    "pooled_size",
    "selfreg_inter_fused_ref",
    "selfreg_inter_multi_ref",
    "selfreg_inter_ref",
    "selfreg_intra_fused_ref",
    "selfreg_intra_ref",
]


def pooled_size(student: torch.Tensor, teacher: torch.Tensor) -> tuple[int, int, int]:
    """The resolution both maps are pooled to: the per-axis minimum of their spatial sizes."""
    return tuple(min(a, b) for a, b in zip(student.shape[2:], teacher.shape[2:]))


def _pool(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    factors = tuple(n // o for n, o in zip(x.shape[2:], size))
    return x if factors == (1, 1, 1) else F.avg_pool3d(x, kernel_size=factors, stride=factors)


def selfreg_inter_ref(
    student: torch.Tensor,
    teacher: torch.Tensor,
    student_channels: torch.Tensor,
    teacher_channels: torch.Tensor,
) -> torch.Tensor:
    """SCR: ``mse(pool(student)[:, cs], pool(teacher).detach()[:, ct])`` with the larger map average-pooled to the
    smaller one (per axis) by integer factors; a 0-dim tensor, gradient to the student only."""
    size = pooled_size(student, teacher)
    cd = compute_dtype(student, teacher)
    s = _pool(student.to(cd), size).index_select(1, student_channels.to(student.device))
    t = _pool(teacher.detach().to(cd), size).index_select(1, teacher_channels.to(teacher.device))
    return F.mse_loss(s, t)


def selfreg_inter_multi_ref(students, teacher, student_channels, teacher_channels) -> torch.Tensor:
    """The (S,) losses of :func:`selfreg_inter_ref` for several students against one teacher."""
    return torch.stack([selfreg_inter_ref(s, teacher, cs, ct)
                        for s, cs, ct in zip(students, student_channels, teacher_channels)])


def intra_order(feature: torch.Tensor) -> torch.Tensor:
    """Channels sorted by descending score ``mean over (batch, voxels) of F.normalize(f, p=2, dim=voxels)``."""
    x = feature.detach().to(compute_dtype(feature)).flatten(2)
    score = F.normalize(x, p=2, dim=2).mean(dim=(0, 2))
    return torch.sort(score, descending=True, stable=True).indices


def selfreg_intra_ref(feature: torch.Tensor) -> torch.Tensor:
    """IFD: ``mse(f[:, top half], f[:, bottom half])`` with channels ranked by :func:`intra_order`; no detach, so
    both halves get gradients (none flows through the ranking). C must be even."""
    c = feature.shape[1]
    if c % 2:
        raise ValueError(f"selfreg_intra needs an even channel count, got C={c}")
    order = intra_order(feature)
    x = feature.to(compute_dtype(feature)).index_select(1, order)
    return F.mse_loss(x[:, : c // 2], x[:, c // 2:])


def _unpool(g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The transpose of ``_pool`` of ``like`` to ``g``'s size: each cell's value spread evenly over the cell."""
    b, c, od, oh, ow = g.shape
    fd, fh, fw = (n // o for n, o in zip(like.shape[2:], g.shape[2:]))
    if (fd, fh, fw) == (1, 1, 1):
        return g
    g = g[:, :, :, None, :, None, :, None].expand(b, c, od, fd, oh, fh, ow, fw)
    return g.reshape(like.shape) / (fd * fh * fw)


def selfreg_inter_fused_ref(
    student: torch.Tensor,
    teacher: torch.Tensor,
    student_channels: torch.Tensor,
    teacher_channels: torch.Tensor,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What the fused kernel computes, without autograd: (fp32 loss, dL/dstudent or None), the gradient in
    :func:`saved_grad_dtype`."""
    size = pooled_size(student, teacher)
    cd = compute_dtype(student, teacher)
    ps = _pool(student.to(cd), size)
    pt = _pool(teacher.to(cd), size).index_select(1, teacher_channels)
    diff = ps.index_select(1, student_channels) - pt
    loss = diff.pow(2).mean()
    grad = None
    if need_grad:
        g = torch.zeros_like(ps).index_add_(1, student_channels, diff * (2.0 / diff.numel()))
        grad = _unpool(g, student).to(saved_grad_dtype(student.dtype), memory_format=torch.contiguous_format)
    return loss.float(), grad


def selfreg_intra_fused_ref(feature: torch.Tensor, need_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What the fused kernel computes, without autograd: (fp32 loss, dL/dfeature or None), the gradient in
    :func:`saved_grad_dtype`."""
    c = feature.shape[1]
    order = intra_order(feature)
    x = feature.to(compute_dtype(feature))
    top, bottom = order[: c // 2], order[c // 2:]
    diff = x.index_select(1, top) - x.index_select(1, bottom)
    loss = diff.pow(2).mean()
    grad = None
    if need_grad:
        g = diff * (2.0 / diff.numel())
        grad = torch.zeros(x.shape, dtype=saved_grad_dtype(feature.dtype), device=x.device)
        grad.index_copy_(1, top, g.to(grad.dtype)).index_copy_(1, bottom, -g.to(grad.dtype))
    return loss.float(), grad
