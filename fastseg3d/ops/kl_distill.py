"""Fused temperature-scaled KL distillation (DSD's self-distillation term) with on-the-fly trilinear upsampling.

The Triton kernels are in ``fastseg3d.kernels.kl_distill``, the reference in ``fastseg3d.reference.kl_distill``.
One ``torch.library`` op, ``fastseg3d::kl_distill``, computes the losses of up to any number of students against
one teacher together with the input gradients (Liger-Kernel style: backward only scales the saved gradients by
the incoming gradient), with a fake implementation and autograd, so it runs under ``torch.compile(fullgraph=True)``
and on ``meta`` tensors.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

from fastseg3d import backends
from fastseg3d.ops import utils
from fastseg3d.reference._grad_dtype import saved_grad_dtype
from fastseg3d.reference.kl_distill import common_size, kl_distill_fused_ref, kl_distill_multi_ref, kl_distill_ref

__all__ = ["check_temperature", "kl_distill", "kl_distill_multi", "kl_distill_unsupported_reasons"]

_MAX_CHANNELS = 256  # fastseg3d.kernels.kl_distill.MAX_CHANNELS (not imported: Triton may be absent)


def check_temperature(temperature, name: str = "temperature") -> float:
    """``temperature`` as a float: a real number (Python or NumPy, not a bool) or a 0-d real tensor, finite and > 0.

    Raises:
        TypeError: any other type, or a meta tensor (it holds no value).
        ValueError: zero, negative or not finite.
    """
    if isinstance(temperature, Tensor):
        if temperature.dim() != 0 or temperature.dtype == torch.bool or temperature.is_complex():
            raise TypeError(f"{name} must be a real number or a 0-d real tensor, got a {temperature.dtype} tensor of "
                            f"shape {tuple(temperature.shape)}")
        if temperature.is_meta:
            raise TypeError(f"{name} is a meta tensor, which holds no value: pass a Python number")
    elif isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"{name} must be a real number or a 0-d real tensor, got {type(temperature).__name__}")
    value = float(temperature)
    if not utils.finite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return value


def _validate(students, teacher, temperature, size, weights) -> tuple[float, tuple[int, int, int], list[float]]:
    """Raise ValueError/TypeError for wrong input; return (temperature, output size, weights)."""
    utils.check_tensor(teacher, "teacher")
    if not isinstance(students, (list, tuple)) or len(students) == 0:
        raise ValueError("students must be a non-empty list of tensors")
    for i, s in enumerate(students):
        utils.check_tensor(s, f"students[{i}]")
    names = ["teacher"] + [f"students[{i}]" if len(students) > 1 else "student" for i in range(len(students))]
    tensors = [teacher, *students]
    for name, t in zip(names, tensors):
        if t.dim() != 5:
            raise ValueError(f"{name} must be 5-D logits (B, K, D, H, W), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    for name, t in zip(names[1:], students):
        if t.device != teacher.device:
            raise TypeError(f"{name} is on {t.device} but teacher is on {teacher.device}; pass tensors on one device")
        if t.shape[0] != teacher.shape[0]:
            raise ValueError(f"batch sizes differ: {name} has {t.shape[0]}, teacher has {teacher.shape[0]}")
        if t.shape[1] != teacher.shape[1]:
            raise ValueError(f"class counts differ: {name} has {t.shape[1]} channels, teacher has {teacher.shape[1]}")
    if teacher.shape[1] == 0:
        raise ValueError(f"teacher has no classes (shape {tuple(teacher.shape)}): logits need K >= 1 channels")
    temperature = check_temperature(temperature)
    if size is None:
        size = common_size(*tensors)
    elif (
        not isinstance(size, (tuple, list, torch.Size))
        or len(size) != 3
        or not all(isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool) and v > 0 for v in size)
    ):
        raise ValueError(f"size must be 3 positive ints (D, H, W), got {size!r}")
    size = tuple(size)
    for name, t in zip(names, tensors):
        spatial = tuple(t.shape[2:])
        if any(n == 0 or o % n != 0 for o, n in zip(size, spatial)):
            raise ValueError(
                f"{name} has spatial shape {spatial}, which is not an integer factor per axis of the loss "
                f"resolution {size}: only integer upsampling ratios are supported"
            )
    if weights is None:
        weights = [1.0] * len(students)
    else:
        given = weights
        try:  # numbers, 0-d tensors or NumPy scalars, in a list, a tuple, a 1-D tensor or array
            values = list(given)
            if any(isinstance(w, bool) for w in values):
                raise TypeError
            weights = [float(w) for w in values]
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"weights must be {len(students)} real numbers, one per student, got {given!r}") from err
        if len(weights) != len(students):
            raise ValueError(f"weights must be {len(students)} numbers, one per student, got {len(weights)}")
        if not all(utils.finite(w) for w in weights):
            raise ValueError(f"weights must be finite, got {weights!r}")
    return temperature, size, weights


def kl_distill_unsupported_reasons(teacher: Tensor, students: Sequence[Tensor]) -> list[str]:
    """Why the fused kernel cannot take this (already validated) case; empty when it can."""
    reasons = utils.base_reasons(teacher)
    odd = sorted({str(s.dtype) for s in students if s.dtype not in utils.FUSED_DTYPES})
    if odd:
        reasons.append(f"student dtype {', '.join(odd)} (fused: float32, float16, bfloat16)")
    if teacher.shape[1] > _MAX_CHANNELS:
        reasons.append(f"{teacher.shape[1]} classes (fused: up to {_MAX_CHANNELS})")
    if teacher.shape[0] > utils.MAX_GRID_YZ:
        reasons.append(f"batch above {utils.MAX_GRID_YZ}")
    if any(t.numel() == 0 for t in (teacher, *students)):
        reasons.append("an input has no elements")
    return reasons


# ------------------------------------------------------------------------------------------------------
# torch.library op


def _nothing(x: Tensor) -> Tensor:
    return x.new_empty((0,))


@utils.eager_op("fastseg3d::kl_distill")
def _kl_distill_op(
    students: list[Tensor],
    teacher: Tensor,
    temperature: float,
    size: list[int],
    weights: list[float],
    need_grad: list[bool],
) -> tuple[Tensor, Tensor, list[Tensor], Tensor]:
    """(sum_i w_i loss_i, per-student losses (S,), dL/dstudent_i, dL/dteacher), losses in fp32.

    ``need_grad`` has one flag per student, then one for the teacher; a gradient not asked for is an empty
    (0,) tensor. The gradients are those of the weighted total.
    """
    need_s, need_t = list(need_grad[:-1]), bool(need_grad[-1])
    n_s = len(students)
    if teacher.device.type == "meta":
        grads = [s.new_empty(s.shape, dtype=saved_grad_dtype(s.dtype)) if n else _nothing(s)
                 for s, n in zip(students, need_s)]
        g_t = teacher.new_empty(teacher.shape, dtype=saved_grad_dtype(teacher.dtype)) if need_t else _nothing(teacher)
        return (teacher.new_empty((), dtype=torch.float32), teacher.new_empty((n_s,), dtype=torch.float32),
                grads, g_t)
    if not utils.launchable(teacher.device):
        per, grads, g_t = kl_distill_fused_ref(students, teacher, temperature, size, weights, need_s, need_t)
        return _kl_outputs(students, teacher, weights, per, grads, g_t)
    with utils.launch_device(teacher):
        return _kl_distill_launch(students, teacher, temperature, size, weights, need_grad)


@utils.launches("fastseg3d::kl_distill")
def _kl_distill_launch(students, teacher, temperature, size, weights, need_grad):
    from fastseg3d.kernels.kl_distill import MAX_STUDENTS, kl_distill_fwd

    need_s, need_t = list(need_grad[:-1]), bool(need_grad[-1])
    chunks, grads, g_t = [], [], None
    for start in range(0, len(students), MAX_STUDENTS):
        end = min(start + MAX_STUDENTS, len(students))
        per_c, grads_c, g_t_c = kl_distill_fwd(
            list(students[start:end]), teacher, tuple(size), temperature, list(weights[start:end]),
            need_s[start:end], need_t, empty=utils.empty,
        )
        chunks.append(per_c)
        grads += grads_c
        g_t = g_t_c if g_t is None else g_t + g_t_c
    per = torch.cat(chunks) if len(chunks) > 1 else chunks[0]
    return _kl_outputs(students, teacher, weights, per, grads, g_t)


def _kl_outputs(students, teacher, weights, per, grads, g_t):
    """The op's outputs from the per-student losses and the gradients (None: not asked for)."""
    if all(w == 1.0 for w in weights):
        total = per.sum()  # one launch where the weighted sum takes two a student
    else:
        total = per[0] * weights[0]
        for i in range(1, len(students)):
            total = total + per[i] * weights[i]
    grads = [g if g is not None else _nothing(s) for g, s in zip(grads, students)]
    return total, per, grads, (g_t if g_t is not None else _nothing(teacher))


def _setup_context(ctx, inputs, output):
    students, teacher = inputs[0], inputs[1]
    _, _, grads, g_t = output
    ctx.n_students = len(students)
    ctx.dtypes = [s.dtype for s in students] + [teacher.dtype]
    ctx.save_for_backward(*grads, g_t)
    utils.no_zero_grads(ctx)


def _backward(ctx, grad_total, grad_per, grad_grads, grad_gt):
    saved = ctx.saved_tensors
    out = utils.scaled_grads(ctx, grad_total, saved, ctx.dtypes)
    return out[: ctx.n_students], out[-1], None, None, None, None


_kl_distill_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------------
# Public functions


def _needs_grad(t: Tensor) -> bool:
    return torch.is_grad_enabled() and t.requires_grad


def kl_distill_multi(
    students: Sequence[Tensor],
    teacher: Tensor,
    temperature: float = 1.0,
    detach_teacher: bool = False,
    size: Sequence[int] | None = None,
    weights: Sequence[float] | None = None,
    return_per_student: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Weighted sum of :func:`kl_distill` of several students against one teacher, in one pass over the teacher.

    Every pair is computed at one resolution, ``size`` (default: the per-axis maximum of all inputs), so
    ``kl_distill_multi(students, t, size=size) == sum(kl_distill(s, t, size=size))``; every input's sides must
    divide it. The result is a 0-dim fp32 tensor (fp64 for fp64 inputs)
    ``sum_i weights[i] * loss_i`` (weights default to 1): a scalar, because the teacher's gradient couples all
    students and is formed in the forward pass. With ``return_per_student=True`` also the (S,) detached
    per-student losses (unweighted), e.g. for logging. Up to four students share one kernel launch; more are
    processed in groups of four.

    Example:
        >>> import torch, fastseg3d
        >>> teacher = torch.randn(2, 4, 16, 16, 16, requires_grad=True)        # e.g. DSD's enc4 head
        >>> students = [torch.randn(2, 4, 16 // f, 16 // f, 16 // f, requires_grad=True) for f in (1, 2, 4)]
        >>> loss = fastseg3d.ops.kl_distill_multi(students, teacher, temperature=3.0)
        >>> loss.backward()
        >>> loss.shape, students[2].grad.shape
        (torch.Size([]), torch.Size([2, 4, 4, 4, 4]))
    """
    return _kl_distill(
        students, teacher, temperature, detach_teacher, size, weights, return_per_student, "kl_distill_multi"
    )


def kl_distill(
    student: Tensor,
    teacher: Tensor,
    temperature: float = 1.0,
    detach_teacher: bool = False,
    size: Sequence[int] | None = None,
) -> Tensor:
    """Temperature-scaled KL distillation loss between class logits, as in Dual Self-Distillation (DSD).

    ``T^2 * mean over batch and voxels of sum_k softmax(t/T)_k (log softmax(t/T)_k - log softmax(s/T)_k)``
    with ``t`` and ``s`` the teacher and student logits (B, K, D, H, W). They may differ in resolution by integer
    factors per axis: each is upsampled trilinearly (``align_corners=False``, like ``F.interpolate``) to ``size``
    (default: the per-axis maximum of the two) on the fly, never materialised. Gradients flow to the student and,
    unless ``detach_teacher``, to the teacher (DSD's published loss does not detach). Each upsampled input's
    gradient passes through a buffer at ``size`` (bf16 for bf16 inputs, else fp32), freed before the forward
    returns: the softmaxes are computed once per voxel, not once per interpolation tap.

    fp32, fp16 and bf16 inputs are fused (fp32 math, fp32 0-dim result); the input gradients are computed in the
    forward pass when an input requires grad, and backward only scales them (for fp16 inputs they are kept in
    fp32 until then: at 1 / (B x voxels) they lie below fp16's normal range until a loss scale lifts them).
    The inputs may differ in dtype (e.g. a head left in fp32 against bf16 heads under autocast): the math is fp32
    either way and each gradient comes back in its input's own dtype. Other cases run the reference under the
    ``auto`` backend. ``temperature`` is a real number (Python or NumPy) or a 0-d tensor, read once as a float.

    Range: the loss is a second-order difference of first-order terms in (t - s) / T, so in fp32 its value's
    relative error grows about as T**2 * 1e-8 (1e-7 at T = 1 to 10, 1e-4 at T = 100; on both backends); the
    gradients stay accurate. Logits must be finite: an infinite one gives NaN (a teacher's, e.g. a masked class,
    where ``F.kl_div`` takes 0 * log 0 as 0, or a student's +inf) or inf (a student's -inf)
    (:func:`fastseg3d.check_finite` catches them).

    Example:
        >>> import torch, fastseg3d
        >>> teacher = torch.randn(2, 14, 32, 32, 32)                       # e.g. DSD's dec1 head
        >>> student = torch.randn(2, 14, 8, 8, 8, requires_grad=True)      # a head at 1/4 resolution
        >>> loss = fastseg3d.ops.kl_distill(student, teacher, temperature=3.0)
        >>> loss.backward()
        >>> loss.dtype, student.grad.shape
        (torch.float32, torch.Size([2, 14, 8, 8, 8]))
    """
    return _kl_distill([student], teacher, temperature, detach_teacher, size, None, False, "kl_distill")


def _kl_distill(students, teacher, temperature, detach_teacher, size, weights, return_per_student, name):
    temperature, size, weights = _validate(students, teacher, temperature, size, weights)
    students = list(students)
    if backends.select("kl_distill", kl_distill_unsupported_reasons(teacher, students), teacher.device):
        if detach_teacher:
            teacher = teacher.detach()
        need = [_needs_grad(s) for s in students] + [_needs_grad(teacher)]
        total, per, _, _ = _kl_distill_op(students, teacher, temperature, list(size), weights, need)
        per = per.detach()
    elif name == "kl_distill":
        total = kl_distill_ref(students[0], teacher, temperature, detach_teacher, size)
        per = total.detach().reshape(1)
    else:
        total, per = kl_distill_multi_ref(students, teacher, temperature, detach_teacher, size, weights)
    return (total, per) if return_per_student else total
