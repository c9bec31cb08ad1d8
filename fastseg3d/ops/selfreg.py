"""Fused SelfReg-UNet regularisers: semantic consistency (``selfreg_inter``) and intra-feature distillation
(``selfreg_intra``).

The Triton kernels are in ``fastseg3d.kernels.selfreg``, the references in ``fastseg3d.reference.selfreg``. Two
``torch.library`` ops, ``fastseg3d::selfreg_inter`` (any number of students against one teacher, pooled once into
a pyramid) and ``fastseg3d::selfreg_intra``, return the losses together with the input gradients computed in the
same pass (backward only scales them), with fake implementations and autograd.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fastseg3d import backends
from fastseg3d.ops import utils
from fastseg3d.reference._grad_dtype import saved_grad_dtype
from fastseg3d.reference.selfreg import (
    pooled_size,
    selfreg_inter_fused_ref,
    selfreg_inter_multi_ref,
    selfreg_inter_ref,
    selfreg_intra_fused_ref,
    selfreg_intra_ref,
)

__all__ = [
    "random_channel_pairs",
    "selfreg_inter",
    "selfreg_inter_multi",
    "selfreg_inter_unsupported_reasons",
    "selfreg_intra",
    "selfreg_intra_unsupported_reasons",
]



def _check_feature(t, name: str) -> None:
    utils.check_tensor(t, name)
    if t.dim() != 5:
        raise ValueError(f"{name} must be a 5-D feature map (B, C, D, H, W), got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _channels(idx, name: str, n_channels: int, device: torch.device) -> Tensor:
    """A 1-D int64 index tensor on ``device``, range-checked: on the host with a ``ValueError``; on an
    accelerator by a device-side assert (reading the values back would wait for the GPU), as the reference's
    indexing would raise, since the kernels would read another channel's or batch element's values."""
    if isinstance(idx, Tensor):
        if idx.dim() != 1 or idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
            raise ValueError(
                f"{name} must be a 1-D integer tensor or a sequence of ints, got {idx.dtype} {tuple(idx.shape)}"
            )
        if idx.numel() == 0:
            raise ValueError(f"{name} selects no channels")
        if idx.is_meta and device.type != "meta":
            raise TypeError(f"{name} is a meta tensor, which holds no indices, for a map on {device}")
        outside = f"{name} has indices outside [0, {n_channels}) for a map with {n_channels} channels"
        if not torch.compiler.is_compiling() and idx.device.type == "cpu":
            if int(idx.min()) < 0 or int(idx.max()) >= n_channels:
                raise ValueError(outside)
        elif not torch.compiler.is_compiling() and not idx.is_meta:
            torch._assert_async(((idx >= 0) & (idx < n_channels)).all(), outside)
        # SelfReg draws its channels on the host every step: a blocking copy would stall the step there
        return utils.host_to_device(idx.to(dtype=torch.int64).contiguous(), device)
    if not isinstance(idx, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in idx):
        raise ValueError(f"{name} must be a 1-D integer tensor or a sequence of ints, got {idx!r}")
    if len(idx) == 0:
        raise ValueError(f"{name} selects no channels")
    # checked as Python ints: reading the values back from a tensor breaks a torch.compile(fullgraph=True) graph
    if min(idx) < 0 or max(idx) >= n_channels:
        raise ValueError(f"{name} has indices outside [0, {n_channels}) for a map with {n_channels} channels")
    return utils.host_to_device(torch.tensor(list(idx), dtype=torch.int64), device)


def _validate_inter(students, teacher, student_channels, teacher_channels):
    """Raise ValueError/TypeError for wrong input; return the index tensors (int64, on the teacher's device)."""
    _check_feature(teacher, "teacher")
    names = [f"students[{i}]" if len(students) > 1 else "student" for i in range(len(students))]
    cs_out, ct_out = [], []
    for name, s, cs, ct in zip(names, students, student_channels, teacher_channels):
        _check_feature(s, name)
        if s.device != teacher.device:
            raise TypeError(f"{name} is on {s.device} but teacher is on {teacher.device}; pass tensors on one device")
        if s.shape[0] != teacher.shape[0]:
            raise ValueError(f"batch sizes differ: {name} has {s.shape[0]}, teacher has {teacher.shape[0]}")
        for a, b in zip(s.shape[2:], teacher.shape[2:]):
            if min(a, b) == 0 or max(a, b) % min(a, b) != 0:
                raise ValueError(
                    f"{name} {tuple(s.shape[2:])} and teacher {tuple(teacher.shape[2:])} differ by a non-integer "
                    "factor on an axis: only integer pooling ratios are supported"
                )
        cs = _channels(cs, "student_channels", s.shape[1], s.device)
        ct = _channels(ct, "teacher_channels", teacher.shape[1], teacher.device)
        if cs.numel() != ct.numel():
            raise ValueError(f"student_channels has {cs.numel()} entries but teacher_channels has {ct.numel()}")
        cs_out.append(cs)
        ct_out.append(ct)
    return cs_out, ct_out


def selfreg_inter_unsupported_reasons(teacher: Tensor, students: Sequence[Tensor]) -> list[str]:
    """Why the fused kernel cannot take this (already validated) case; empty when it can."""
    reasons = utils.base_reasons(teacher)
    # the dtypes may differ (under autocast a feature after a LayerNorm stays fp32): each must be fused
    odd = sorted({str(s.dtype) for s in students if s.dtype not in utils.FUSED_DTYPES})
    if odd:
        reasons.append(f"student dtype {', '.join(odd)} (fused: float32, float16, bfloat16)")
    if teacher.shape[0] > utils.MAX_GRID_YZ or any(s.shape[1] > utils.MAX_GRID_YZ for s in students):
        reasons.append(f"batch or student channels above {utils.MAX_GRID_YZ}")
    # the teacher's pyramid levels are pooled on a (voxel blocks, B * C) grid
    full = tuple(teacher.shape[2:])
    if (teacher.shape[0] * teacher.shape[1] > utils.MAX_GRID_YZ
            and any(pooled_size(s, teacher) != full for s in students)):
        reasons.append(f"batch x teacher channels above {utils.MAX_GRID_YZ} (the teacher must be pooled)")
    if any(t.numel() == 0 for t in (teacher, *students)):
        reasons.append("an input has no elements")
    return reasons


def selfreg_intra_unsupported_reasons(feature: Tensor) -> list[str]:
    """Why the fused kernel cannot take this (already validated) case; empty when it can."""
    reasons = utils.base_reasons(feature)
    if feature.shape[0] > utils.MAX_GRID_YZ or feature.shape[1] // 2 > utils.MAX_GRID_YZ:
        reasons.append(f"batch or half the channels above {utils.MAX_GRID_YZ}")
    # the channel statistics run on a (voxel blocks, B * C) grid
    if feature.shape[0] * feature.shape[1] > utils.MAX_GRID_YZ:
        reasons.append(f"batch x channels above {utils.MAX_GRID_YZ}")
    if feature.numel() == 0:
        reasons.append("feature has no elements")
    return reasons


# ------------------------------------------------------------------------------------------------------
# torch.library ops


def _pyramid(teacher: Tensor, sizes: list[tuple[int, int, int]]) -> dict[tuple[int, int, int], Tensor]:
    """The teacher average-pooled (fp32) to every size in ``sizes``, each level pooled from the coarsest level
    already built that it divides (the full teacher is read once for the finest level)."""
    from fastseg3d.kernels.selfreg import avg_pool

    full = tuple(teacher.shape[2:])
    levels: dict[tuple[int, int, int], Tensor] = {full: teacher}
    for size in sorted(set(sizes), key=lambda s: -(s[0] * s[1] * s[2])):
        if size in levels:
            continue
        sources = [lv for lv in levels if all(a % b == 0 for a, b in zip(lv, size))]
        source = min(sources, key=lambda s: s[0] * s[1] * s[2])
        levels[size] = avg_pool(levels[source], size, empty=utils.empty)
    return levels


@utils.eager_op("fastseg3d::selfreg_inter")
def _selfreg_inter_op(
    students: list[Tensor],
    teacher: Tensor,
    student_channels: list[Tensor],
    teacher_channels: list[Tensor],
    need_grad: list[bool],
) -> tuple[Tensor, list[Tensor]]:
    """(per-student losses (S,) fp32, dL/dstudent_i); a gradient not asked for is an empty (0,) tensor."""
    if teacher.device.type == "meta":
        grads = [s.new_empty(s.shape, dtype=saved_grad_dtype(s.dtype)) if n else s.new_empty((0,))
                 for s, n in zip(students, need_grad)]
        return teacher.new_empty((len(students),), dtype=torch.float32), grads
    if not utils.launchable(teacher.device):
        losses, grads = [], []
        for s, cs, ct, need in zip(students, student_channels, teacher_channels, need_grad):
            loss, grad = selfreg_inter_fused_ref(s, teacher, cs, ct, need)
            losses.append(loss)
            grads.append(grad)
        return _inter_outputs(students, losses, grads)
    with utils.launch_device(teacher):
        return _selfreg_inter_launch(students, teacher, student_channels, teacher_channels, need_grad)


@utils.launches("fastseg3d::selfreg_inter")
def _selfreg_inter_launch(students, teacher, student_channels, teacher_channels, need_grad):
    from fastseg3d.kernels.selfreg import selfreg_inter_fwd

    sizes = [pooled_size(s, teacher) for s in students]
    pyramid = _pyramid(teacher, sizes)
    losses, grads = [], []
    for s, size, cs, ct, need in zip(students, sizes, student_channels, teacher_channels, need_grad):
        # the student is pooled on the fly by the kernel, the teacher level comes from the pyramid
        loss, grad = selfreg_inter_fwd(s, pyramid[size], cs, ct, need, empty=utils.empty)
        losses.append(loss)
        grads.append(grad)
    return _inter_outputs(students, losses, grads)


def _inter_outputs(students, losses, grads):
    return torch.stack(losses), [g if g is not None else s.new_empty((0,)) for g, s in zip(grads, students)]


def _inter_setup_context(ctx, inputs, output):
    ctx.dtypes = [s.dtype for s in inputs[0]]
    ctx.save_for_backward(*output[1])
    utils.no_zero_grads(ctx)


def _inter_backward(ctx, grad_losses, grad_grads):
    grads = utils.scaled_grads(ctx, grad_losses, ctx.saved_tensors, ctx.dtypes)
    nones = [None] * len(grads)
    return grads, None, nones, nones, None


_selfreg_inter_op.register_autograd(_inter_backward, setup_context=_inter_setup_context)


@utils.eager_op("fastseg3d::selfreg_intra")
def _selfreg_intra_op(feature: Tensor, need_grad: bool) -> tuple[Tensor, Tensor]:
    """(fp32 loss, dL/dfeature); the gradient is an empty (0,) tensor unless ``need_grad``."""
    if feature.device.type == "meta":
        grad = feature.new_empty((0,))
        if need_grad:
            grad = feature.new_empty(feature.shape, dtype=saved_grad_dtype(feature.dtype))
        return feature.new_empty((), dtype=torch.float32), grad
    if not utils.launchable(feature.device):
        loss, grad = selfreg_intra_fused_ref(feature, need_grad)
        return loss, (grad if grad is not None else feature.new_empty((0,)))
    with utils.launch_device(feature):
        return _selfreg_intra_launch(feature, need_grad)


@utils.launches("fastseg3d::selfreg_intra")
def _selfreg_intra_launch(feature, need_grad):
    from fastseg3d.kernels.selfreg import selfreg_intra_fwd

    loss, grad = selfreg_intra_fwd(feature, need_grad, empty=utils.empty)
    return loss, (grad if grad is not None else feature.new_empty((0,)))


def _intra_setup_context(ctx, inputs, output):
    ctx.dtype = inputs[0].dtype
    ctx.save_for_backward(output[1])
    utils.no_zero_grads(ctx)


def _intra_backward(ctx, grad_loss, grad_grad):
    (saved,) = ctx.saved_tensors
    return utils.scaled_grads(ctx, grad_loss, [saved], [ctx.dtype])[0], None


_selfreg_intra_op.register_autograd(_intra_backward, setup_context=_intra_setup_context)


# ------------------------------------------------------------------------------------------------------
# Public functions


def _needs_grad(t: Tensor) -> bool:
    return torch.is_grad_enabled() and t.requires_grad


def random_channel_pairs(
    student_channels: int, teacher_channels: int, k: int | None = None, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """SelfReg's random channel selection: ``k`` (default ``min`` of the counts) distinct random student channels
    and, independently, ``k`` distinct random teacher channels, as CPU int64 tensors. SelfReg redraws them at
    every call (every iteration).

    Example:
        >>> import torch, fastseg3d
        >>> cs, ct = fastseg3d.ops.random_channel_pairs(64, 96, generator=torch.Generator().manual_seed(0))
        >>> cs.shape, ct.shape
        (torch.Size([64]), torch.Size([64]))
    """
    k = min(student_channels, teacher_channels) if k is None else k
    if not 0 < k <= min(student_channels, teacher_channels):
        raise ValueError(f"k must be in [1, {min(student_channels, teacher_channels)}], got {k}")
    cs = torch.randperm(student_channels, generator=generator)[:k]
    ct = torch.randperm(teacher_channels, generator=generator)[:k]
    return cs, ct


def selfreg_inter_multi(
    students: Sequence[Tensor],
    teacher: Tensor,
    student_channels: Sequence,
    teacher_channels: Sequence,
) -> Tensor:
    """:func:`selfreg_inter` of several students against one teacher: an (S,) tensor of per-student losses (fp32;
    fp64 for fp64 inputs).

    The teacher (e.g. SelfReg's final decoder feature F_final) is average-pooled once into the pyramid of
    resolutions the students need, each level from the next finer one, instead of once per student.
    ``student_channels[i]`` and ``teacher_channels[i]`` are student i's index sets. SelfReg's KD term averages
    them: ``selfreg_inter_multi(...).mean()``. The students' dtypes may differ from each other and from the
    teacher's; each gradient comes back in its student's dtype.

    Example:
        >>> import torch, fastseg3d
        >>> final = torch.randn(2, 8, 16, 16, 16)
        >>> blocks = [torch.randn(2, 4 * 2**i, 16 >> i, 16 >> i, 16 >> i, requires_grad=True) for i in (1, 2, 3)]
        >>> pairs = [fastseg3d.ops.random_channel_pairs(b.shape[1], 8) for b in blocks]
        >>> losses = fastseg3d.ops.selfreg_inter_multi(blocks, final, [p[0] for p in pairs], [p[1] for p in pairs])
        >>> losses.mean().backward()
        >>> losses.shape
        torch.Size([3])
    """
    if not isinstance(students, (list, tuple)) or len(students) == 0:
        raise ValueError("students must be a non-empty list of tensors")
    if not isinstance(student_channels, (list, tuple)) or not isinstance(teacher_channels, (list, tuple)) or not (
        len(student_channels) == len(teacher_channels) == len(students)
    ):
        raise ValueError("student_channels and teacher_channels must be lists with one index set per student")
    return _selfreg_inter(list(students), teacher, list(student_channels), list(teacher_channels))


def selfreg_inter(student: Tensor, teacher: Tensor, student_channels, teacher_channels) -> Tensor:
    """SelfReg's semantic-consistency regulariser (SCR, ``inter_fd``) for one student block.

    The larger map is average-pooled to the smaller one by integer factors (per axis: both are pooled to the
    per-axis minimum), the channels ``student_channels[j]`` of the student and ``teacher_channels[j]`` of the
    teacher are paired, and the loss is their mean squared difference; the teacher is detached. Index sets are
    1-D integer tensors or sequences of equal length (see :func:`random_channel_pairs`); repeated student indices
    accumulate gradient. An index outside its map's channels raises a ``ValueError``, but for a tensor already on
    the GPU, which a device-side assert checks (reading it back would wait for the GPU): the run stops there, as
    indexing out of range does. Returns a 0-dim fp32 tensor (fp64 for fp64 inputs).

    fp32, fp16 and bf16 inputs are fused (one read of each input, fp32 math, the student gradient written in the
    forward pass when the student requires grad, in fp32 for fp16 so a loss scale reaches it before rounding);
    other cases run the reference under the ``auto`` backend. The student and the teacher may differ in dtype
    (under autocast a feature read after a LayerNorm stays fp32 while F_final is bf16): the math is fp32 either way
    and the gradient comes back in the student's own dtype.

    Example:
        >>> import torch, fastseg3d
        >>> final = torch.randn(2, 16, 32, 32, 32)                       # F_final, the teacher
        >>> block = torch.randn(2, 32, 8, 8, 8, requires_grad=True)       # an encoder block
        >>> cs, ct = fastseg3d.ops.random_channel_pairs(32, 16)
        >>> loss = fastseg3d.ops.selfreg_inter(block, final, cs, ct)
        >>> loss.backward()
        >>> loss.shape, block.grad.shape
        (torch.Size([]), torch.Size([2, 32, 8, 8, 8]))
    """
    return _selfreg_inter([student], teacher, [student_channels], [teacher_channels])[0]


def _selfreg_inter(students, teacher, student_channels, teacher_channels) -> Tensor:
    cs, ct = _validate_inter(students, teacher, student_channels, teacher_channels)
    if backends.select("selfreg_inter", selfreg_inter_unsupported_reasons(teacher, students), teacher.device):
        need = [_needs_grad(s) for s in students]
        losses, _ = _selfreg_inter_op(students, teacher.detach(), cs, ct, need)
        return losses
    if len(students) == 1:
        return selfreg_inter_ref(students[0], teacher, cs[0], ct[0]).reshape(1)
    return selfreg_inter_multi_ref(students, teacher, cs, ct)


def selfreg_intra(feature: Tensor) -> Tensor:
    """SelfReg's intra-feature distillation regulariser (IFD, ``intra_fd``).

    Channels are ranked by the mean over batch and voxels of their per-(b, c) L2-normalised maps
    (``F.normalize(f, p=2, dim=voxels)``), and the loss is the mean squared difference between the top half and
    the bottom half (channel ``order[j]`` against ``order[C/2 + j]``), with gradients to both halves and none
    through the ranking, as coded. C must be even. Returns a 0-dim fp32 tensor (fp64 for fp64 input).

    The fused path reads the map twice (per-channel statistics, then the loss and both halves' gradients in one
    pass); the pairing depends on a global statistic, so one pass is not possible. Channels whose scores tie in
    exact arithmetic (constant maps, multiples of one map) are ordered by the rounding of their sums, which differs
    between the kernel and the reference (they sum in other orders), so the two may pair such channels apart.

    Example:
        >>> import torch, fastseg3d
        >>> f = torch.randn(2, 32, 8, 8, 8, requires_grad=True)
        >>> loss = fastseg3d.ops.selfreg_intra(f)
        >>> loss.backward()
        >>> loss.shape, f.grad.shape
        (torch.Size([]), torch.Size([2, 32, 8, 8, 8]))
    """
    _check_feature(feature, "feature")
    if feature.shape[1] % 2:
        raise ValueError(f"selfreg_intra needs an even channel count, got C={feature.shape[1]}")
    if backends.select("selfreg_intra", selfreg_intra_unsupported_reasons(feature), feature.device):
        loss, _ = _selfreg_intra_op(feature, _needs_grad(feature))
        return loss
    return selfreg_intra_ref(feature)
