"""Fused channel-softmax KL distillation of MISSU (``DistillKL``): KL(softmax_c(teacher) || softmax_c(student)).

The kernel is the shared fused KL kernel (``fastseg3d.kernels.kl_distill``, launched from
``fastseg3d.kernels.channel_kl``); the reference is in ``fastseg3d.reference.channel_kl``. The ``torch.library`` op
``fastseg3d::channel_kl`` returns the loss and the student gradient computed in the same pass (backward only scales
it), with a fake implementation and autograd.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastseg3d import backends
from fastseg3d.ops import utils
from fastseg3d.reference._grad_dtype import saved_grad_dtype
from fastseg3d.reference.channel_kl import REDUCTIONS, channel_kl_fused_ref, channel_kl_normaliser, channel_kl_ref

__all__ = ["channel_kl", "channel_kl_unsupported_reasons"]

_MAX_CHANNELS = 256  # fastseg3d.kernels.kl_distill.MAX_CHANNELS (not imported: Triton may be absent)


def _validate(student, teacher, reduction) -> None:
    utils.check_tensor(student, "student")
    utils.check_tensor(teacher, "teacher")
    for name, t in (("student", student), ("teacher", teacher)):
        if t.dim() != 5:
            raise ValueError(f"{name} must be a 5-D feature map (B, C, D, H, W), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if teacher.device != student.device:
        raise TypeError(
            f"teacher is on {teacher.device} but student is on {student.device}; pass tensors on one device"
        )
    if teacher.shape[0] != student.shape[0]:
        raise ValueError(f"batch sizes differ: student has {student.shape[0]}, teacher has {teacher.shape[0]}")
    if teacher.shape[1] != student.shape[1]:
        raise ValueError(f"channel counts differ: student has {student.shape[1]}, teacher has {teacher.shape[1]}")
    if teacher.shape != student.shape:
        raise ValueError(
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must have one spatial shape "
            "(MISSU pairs maps of one resolution)"
        )
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def channel_kl_unsupported_reasons(student: Tensor, teacher: Tensor | None = None) -> list[str]:
    """Why the fused kernel cannot take this (already validated) case; empty when it can."""
    reasons = utils.base_reasons(student)
    if teacher is not None and teacher.dtype not in utils.FUSED_DTYPES:
        reasons.append(f"teacher dtype={teacher.dtype} (fused: float32, float16, bfloat16)")
    if student.shape[1] > _MAX_CHANNELS:
        reasons.append(f"{student.shape[1]} channels (fused: up to {_MAX_CHANNELS})")
    if student.shape[0] > utils.MAX_GRID_YZ:
        reasons.append(f"batch above {utils.MAX_GRID_YZ}")
    if student.numel() == 0:
        reasons.append("student has no elements")
    return reasons


# ------------------------------------------------------------------------------------------------------
# torch.library op


@utils.eager_op("fastseg3d::channel_kl")
def _channel_kl_op(student: Tensor, teacher: Tensor, reduction: str, need_grad: bool) -> tuple[Tensor, Tensor]:
    """(fp32 loss, dL/dstudent); the gradient is an empty (0,) tensor unless ``need_grad``. The teacher gets none."""
    if student.device.type == "meta":
        grad = student.new_empty((0,))
        if need_grad:
            grad = student.new_empty(student.shape, dtype=saved_grad_dtype(student.dtype))
        return student.new_empty((), dtype=torch.float32), grad
    if not utils.launchable(student.device):
        loss, grad = channel_kl_fused_ref(student, teacher, reduction, need_grad)
        return loss, (grad if grad is not None else student.new_empty((0,)))
    with utils.launch_device(student):
        return _channel_kl_launch(student, teacher, reduction, need_grad)


@utils.launches("fastseg3d::channel_kl")
def _channel_kl_launch(student, teacher, reduction, need_grad):
    from fastseg3d.kernels.channel_kl import channel_kl_fwd

    norm = channel_kl_normaliser(student.shape, reduction)
    loss, grad = channel_kl_fwd(student, teacher, float(norm), need_grad, empty=utils.empty)
    return loss, (grad if grad is not None else student.new_empty((0,)))


def _setup_context(ctx, inputs, output):
    ctx.dtype = inputs[0].dtype
    ctx.save_for_backward(output[1])
    utils.no_zero_grads(ctx)


def _backward(ctx, grad_loss, grad_grad):
    (saved,) = ctx.saved_tensors
    return utils.scaled_grads(ctx, grad_loss, [saved], [ctx.dtype])[0], None, None, None


_channel_kl_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------------
# Public function


def channel_kl(student: Tensor, teacher: Tensor, reduction: str = "mean") -> Tensor:
    """MISSU's self-distillation loss: per-voxel KL(softmax_c(teacher) || softmax_c(student)) of feature maps.

    The softmax runs over the channels of two feature maps of one shape (B, C, D, H, W), turning each voxel's
    features into a distribution over channels; the teacher is detached. ``reduction="mean"`` averages the
    channel-summed KL over batch and voxels; ``"faithful"`` divides the total by B*C*H*W as the released code
    does (its 5-D size is unpacked as (D, B, C, H, W)), i.e. ``mean * D / C``.

    fp32, fp16 and bf16 inputs are fused (fp32 math, fp32 0-dim result, the student gradient formed in the
    forward pass when the student requires grad, kept in fp32 for fp16 so a loss scale reaches it before
    rounding); up to 256 channels. The two maps may differ in dtype (under autocast a feature taken straight after
    a normalisation layer stays fp32): the math is fp32 either way and the gradient comes back in the student's
    dtype. Other cases run the reference under the ``auto`` backend.

    Example:
        >>> import torch, fastseg3d
        >>> decoder = torch.randn(2, 16, 8, 8, 8, requires_grad=True)    # MISSU's y2
        >>> skip = torch.randn(2, 16, 8, 8, 8)                           # the encoder feature x1_1
        >>> loss = fastseg3d.ops.channel_kl(decoder, skip, reduction="faithful")
        >>> loss.backward()
        >>> loss.shape, decoder.grad.shape
        (torch.Size([]), torch.Size([2, 16, 8, 8, 8]))
    """
    _validate(student, teacher, reduction)
    if backends.select("channel_kl", channel_kl_unsupported_reasons(student, teacher), student.device):
        need = torch.is_grad_enabled() and student.requires_grad
        loss, _ = _channel_kl_op(student, teacher.detach(), reduction, need)
        return loss
    return channel_kl_ref(student, teacher, reduction)
