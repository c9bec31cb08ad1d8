"""Reference temperature-scaled KL distillation (Dual Self-Distillation, DSD) in ATen ops.

``loss = T^2 * mean_{b, voxel} sum_k p_k (log p_k - log q_k)``, ``p = softmax(teacher / T)``,
``q = softmax(student / T)`` over the class channels, both logits upsampled trilinearly (``align_corners=False``) to
a common resolution. Math in fp32 (fp64 for fp64 inputs).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from fastseg3d.reference._grad_dtype import compute_dtype, saved_grad_dtype

__all__ = ["common_size", "kl_distill_fused_ref", "kl_distill_multi_ref", "kl_distill_ref"]


def common_size(*tensors: torch.Tensor) -> tuple[int, int, int]:
    """The per-axis maximum spatial size of 5-D tensors: the resolution the loss is computed at by default."""
    return tuple(max(t.shape[2 + i] for t in tensors) for i in range(3))


def _upsample(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    if tuple(x.shape[2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="trilinear", align_corners=False)


def kl_distill_ref(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float = 1.0,
    detach_teacher: bool = False,
    size: Sequence[int] | None = None,
) -> torch.Tensor:
    """DSD's KL term for one (student, teacher) pair, differentiable by autograd; a 0-dim fp32 (fp64) tensor."""
    size = tuple(size) if size is not None else common_size(student, teacher)
    cd = compute_dtype(student, teacher)
    s = _upsample(student.to(cd), size) / temperature
    t = _upsample(teacher.to(cd), size) / temperature
    if detach_teacher:
        t = t.detach()
    logq = torch.log_softmax(s, dim=1)
    logp = torch.log_softmax(t, dim=1)
    return temperature * temperature * (logp.exp() * (logp - logq)).sum(1).mean()


def kl_distill_multi_ref(
    students: Sequence[torch.Tensor],
    teacher: torch.Tensor,
    temperature: float = 1.0,
    detach_teacher: bool = False,
    size: Sequence[int] | None = None,
    weights: Sequence[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_i w_i loss_i, the per-student losses) with every pair at ``size`` (default: the common resolution of
    all inputs)."""
    size = tuple(size) if size is not None else common_size(teacher, *students)
    weights = [1.0] * len(students) if weights is None else list(weights)
    losses = [kl_distill_ref(s, teacher, temperature, detach_teacher, size) for s in students]
    total = sum(w * loss for w, loss in zip(weights, losses))
    return total, torch.stack([loss.detach() for loss in losses])


def kl_distill_fused_ref(
    students: Sequence[torch.Tensor],
    teacher: torch.Tensor,
    temperature: float,
    size: Sequence[int],
    weights: Sequence[float],
    need_students: Sequence[bool],
    need_teacher: bool,
) -> tuple[torch.Tensor, list[torch.Tensor | None], torch.Tensor | None]:
    """What the fused kernel computes, without autograd: the unweighted per-student losses (S,) and the weighted
    gradients of ``sum_i w_i loss_i`` w.r.t. each input (None where not needed), in the dtypes
    :func:`saved_grad_dtype` gives."""
    size = tuple(size)
    cd = compute_dtype(teacher, *students)
    bsz, nvox = teacher.shape[0], size[0] * size[1] * size[2]
    coef = temperature / (bsz * nvox)
    t = _upsample(teacher.to(cd), size) / temperature
    logp = torch.log_softmax(t, dim=1)
    p = logp.exp()
    losses, grads = [], []
    g_t = torch.zeros_like(p) if need_teacher else None
    for s_in, w, need in zip(students, weights, need_students):
        logq = torch.log_softmax(_upsample(s_in.to(cd), size) / temperature, dim=1)
        a = logp - logq
        kl = (p * a).sum(1, keepdim=True)
        losses.append(kl.sum() * (temperature * temperature / (bsz * nvox)))
        grads.append(_downsample_grad(w * coef * (logq.exp() - p), s_in) if need else None)
        if g_t is not None:
            g_t += w * coef * p * (a - kl)
    grad_t = _downsample_grad(g_t, teacher) if g_t is not None else None
    return torch.stack(losses).float(), grads, grad_t


def _interp_matrix(n_in: int, n_out: int, like: torch.Tensor) -> torch.Tensor:
    """(n_out, n_in) matrix of 1-D linear interpolation (align_corners=False) from n_in to n_out samples."""
    eye = torch.eye(n_in, dtype=like.dtype, device=like.device).unsqueeze(0)
    return F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[0].t()


def _downsample_grad(g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The transpose of the trilinear upsampling of ``like`` to ``g``'s resolution, applied to ``g``.

    Trilinear interpolation is separable, so its transpose is one small matrix product per upsampled axis.
    (``aten.upsample_trilinear3d_backward`` would do, but its meta function fails under dynamic shapes.)
    """
    for axis in range(3):
        n_in, n_out = like.shape[2 + axis], g.shape[2 + axis]
        if n_in != n_out:
            m = _interp_matrix(n_in, n_out, g)
            g = torch.movedim(torch.movedim(g, 2 + axis, -1) @ m, -1, 2 + axis)
    return g.to(saved_grad_dtype(like.dtype))
