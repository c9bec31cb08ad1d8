"""Fused sum of trilinear resizes: ``sum_i F.interpolate(x_i, size, mode="trilinear", align_corners=False)``.

SegFormer3D's all-MLP decoder brings its four 256-channel maps (at 1/4, 1/8, 1/16 and 1/32 of the input) to the
first one's size and sums them: plainly three resizes and three adds, each writing a full-resolution tensor (fp32
under CUDA autocast, which resizes in fp32: 384 MiB at a 128^3 input, batch 2). Here one kernel reads the small maps and
writes the sum once, in the dtype the plain composition gives.

The Triton kernel is in ``fastseg3d.kernels.upsample_sum``, the reference (the plain composition) in
``fastseg3d.reference.upsample_sum``. The ``torch.library`` op ``fastseg3d::upsample_sum`` takes up to four inputs
(``x0`` and three optional ones, so an eager call needs no list); its backward is each resize's own backward
(``upsample_adjoint``: as the plain composition's), which writes only input-sized gradients.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

from fastseg3d import backends
from fastseg3d.ops import utils
from fastseg3d.reference.upsample_sum import upsample_sum_ref

__all__ = ["upsample_adjoint", "upsample_sum", "upsample_sum_unsupported_reasons"]

_MAX_INPUTS = 4  # fastseg3d.kernels.upsample_sum.MAX_INPUTS (that module needs Triton)


def _validate(inputs, size) -> tuple[int, int, int]:
    """The output's (D, H, W)."""
    if isinstance(inputs, Tensor) or not isinstance(inputs, Sequence):
        raise TypeError(f"inputs must be a list or tuple of tensors, got {type(inputs).__name__}")
    if not inputs:
        raise ValueError("inputs must hold at least one tensor")
    for i, x in enumerate(inputs):
        utils.check_tensor(x, f"inputs[{i}]")
        if x.dim() != 5:
            raise ValueError(f"inputs[{i}] must be 5-D (B, C, D, H, W), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"inputs[{i}] must be a floating-point tensor, got {x.dtype}")
        if x.device != inputs[0].device:
            raise TypeError(f"inputs[{i}] is on {x.device} but inputs[0] is on {inputs[0].device}; pass tensors on "
                            "one device")
        if x.shape[:2] != inputs[0].shape[:2]:
            raise ValueError(f"inputs[{i}] has batch and channels {tuple(x.shape[:2])}, inputs[0] "
                             f"{tuple(inputs[0].shape[:2])}: they must match")
        if 0 in x.shape[2:]:
            raise ValueError(f"inputs[{i}] has an empty spatial axis, shape {tuple(x.shape)}: nothing to resize from")
    if size is None:  # the largest input's size (a loop: torch.compile refuses max(key=...))
        largest = inputs[0]
        for x in inputs[1:]:
            if x.shape[2] * x.shape[3] * x.shape[4] > largest.shape[2] * largest.shape[3] * largest.shape[4]:
                largest = x
        return tuple(largest.shape[2:])
    if isinstance(size, Sequence) and not isinstance(size, str):
        # torch.jit.trace hands a shape's entries over as 0-d integer tensors
        size = [int(s) if isinstance(s, Tensor) and s.dim() == 0 and not s.is_floating_point()
                and s.dtype != torch.bool else s for s in size]
    if (isinstance(size, (str, Tensor)) or not isinstance(size, Sequence) or len(size) != 3
            or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s > 0 for s in size)):
        raise ValueError(f"size must be three positive ints (D, H, W), got {size!r}")
    return tuple(int(s) for s in size)


def _out_dtype(inputs: Sequence[Tensor], size: tuple[int, int, int]) -> torch.dtype:
    """The plain composition's result dtype: CUDA autocast resizes in fp32 (fp64 stays; CPU autocast leaves the
    resize alone), the adds promote."""
    device_type = inputs[0].device.type
    cast = device_type in ("cuda", "meta") and utils.autocast_dtype(device_type) is not None
    return functools.reduce(torch.promote_types, (
        torch.float32 if cast and tuple(x.shape[2:]) != size and x.dtype != torch.float64 else x.dtype
        for x in inputs))


def upsample_sum_unsupported_reasons(inputs: Sequence[Tensor], size: Sequence[int]) -> list[str]:
    """Why the fused kernel cannot take this (already validated) case; empty when it can."""
    reasons = utils.base_reasons(inputs[0])
    for i, x in enumerate(inputs[1:], 1):
        if x.dtype not in utils.FUSED_DTYPES:
            reasons.append(f"inputs[{i}] dtype={x.dtype} (fused: float32, float16, bfloat16)")
    if len(inputs) > _MAX_INPUTS:
        reasons.append(f"{len(inputs)} inputs (fused: up to {_MAX_INPUTS})")
    if inputs[0].shape[0] > utils.MAX_GRID_YZ:
        reasons.append(f"batch above {utils.MAX_GRID_YZ}")
    if inputs[0].shape[1] > 4 * utils.MAX_GRID_YZ:  # NCDHW tiles take 4 channels, one grid row each
        reasons.append(f"channels above {4 * utils.MAX_GRID_YZ}")
    if any(x.numel() == 0 for x in inputs):
        reasons.append("an input has no elements")
    return reasons


def _layout(inputs: Sequence[Tensor]) -> torch.memory_format:
    """The layout of inputs made contiguous in one layout, read from the first with more than one voxel: a
    contiguous (B, C, 1, 1, 1) tensor is contiguous in both layouts, and its strides say channels-last."""
    for x in inputs:
        if x.shape[2] * x.shape[3] * x.shape[4] > 1:
            return utils.layout_of(x)
    return utils.layout_of(inputs[0])


def _new_output(inputs: Sequence[Tensor], size, dtype: torch.dtype) -> Tensor:
    x = inputs[0]
    return utils.empty((*x.shape[:2], *size), dtype=dtype, device=x.device, memory_format=_layout(inputs))


# ------------------------------------------------------------------------------------------------------
# torch.library op


@utils.eager_op("fastseg3d::upsample_sum")
def _upsample_sum_op(x0: Tensor, x1: Tensor | None, x2: Tensor | None, x3: Tensor | None, size: list[int],
                     out_dtype: torch.dtype) -> Tensor:
    """The sum of the given inputs resized to ``size``, in ``out_dtype`` and their layout (every input contiguous
    in one layout)."""
    inputs = [x for x in (x0, x1, x2, x3) if x is not None]
    if x0.device.type == "meta":
        return _new_output(inputs, size, out_dtype)
    if not utils.launchable(x0.device):
        y = upsample_sum_ref(inputs, size).to(out_dtype).contiguous(memory_format=_layout(inputs))
        return y.clone() if y is x0 else y  # an op's output may not alias its input
    with utils.launch_device(x0):
        return _upsample_sum_launch(x0, x1, x2, x3, size, out_dtype)


@utils.launches("fastseg3d::upsample_sum")
def _upsample_sum_launch(x0, x1, x2, x3, size, out_dtype):
    from fastseg3d.kernels.upsample_sum import upsample_sum as launch

    inputs = [x for x in (x0, x1, x2, x3) if x is not None]
    out = _new_output(inputs, size, out_dtype)
    return launch(inputs, out, _layout(inputs) == torch.channels_last_3d)


def _setup_context(ctx, inputs, output):
    *xs, _, _ = inputs
    ctx.inputs = [(x.shape, x.dtype) if x is not None else None for x in xs]


def _backward(ctx, grad):
    if grad is None:
        return (None,) * 6
    grads = []
    for i, spec in enumerate(ctx.inputs):
        if spec is None or not ctx.needs_input_grad[i]:
            grads.append(None)
            continue
        shape, dtype = spec
        if shape[2:] == grad.shape[2:]:
            grads.append(grad.to(dtype))
        else:
            # the resize's own backward, in the gradient's dtype (fp32 under autocast, which resized in fp32)
            grads.append(upsample_adjoint(grad, list(shape)).to(dtype))
    return (*grads, None, None)


_upsample_sum_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("fastseg3d::upsample_adjoint", mutates_args=())
def upsample_adjoint(grad: Tensor, input_size: list[int]) -> Tensor:
    """The adjoint of ``F.interpolate(x, size, mode="(bi/tri)linear", align_corners=False)`` (a size, no scale
    factors) for x of shape ``input_size``, in grad's dtype: the gradient of such a resize, as the plain
    composition's backward gives it. That is ATen's backward kernel, except on a GPU under
    ``torch.use_deterministic_algorithms``, where ATen's kernel accumulates with atomics (and F.interpolate runs a
    decomposition instead): there the adjoint is a product with each axis's interpolation matrix, summed in a fixed
    order. An op of its own, since ATen's upsample backwards take no symbolic sizes when traced (dynamic shapes
    under torch.compile)."""
    if not grad.is_cpu and torch.are_deterministic_algorithms_enabled():
        return interpolation_adjoint(grad, input_size)
    backward = (torch.ops.aten.upsample_trilinear3d_backward if grad.dim() == 5
                else torch.ops.aten.upsample_bilinear2d_backward)
    return backward(grad, list(grad.shape[2:]), input_size, False)


@upsample_adjoint.register_fake
def _(grad, input_size):
    return grad.new_empty(input_size)


def interpolation_adjoint(grad: Tensor, input_size: Sequence[int]) -> Tensor:
    """:func:`upsample_adjoint` as products with the (out x in) linear-interpolation matrix of each resized axis,
    in fp32: deterministic on every device (no scatter), and a few GEMMs with inner sizes of the output's sides."""
    g = grad.float()
    for axis in range(2, grad.dim()):
        n_out, n_in = grad.shape[axis], input_size[axis]
        if n_out != n_in:  # a resize to the same size is the identity
            g = (g.movedim(axis, -1) @ _interpolation_matrix(n_out, n_in, grad.device)).movedim(-1, axis)
    return g.to(grad.dtype)


def _interpolation_matrix(n_out: int, n_in: int, device: torch.device) -> Tensor:
    """(n_out, n_in) fp32 weights of linear interpolation with align_corners=False from n_in to n_out samples
    (ATen's source index: (o + 0.5) * n_in / n_out - 0.5, clamped at 0; the upper neighbour clamped to the edge)."""
    src = ((torch.arange(n_out, device=device, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp_(min=0)
    i0 = src.floor().clamp_(max=n_in - 1)
    i1 = (i0 + 1).clamp_(max=n_in - 1)
    w1 = src - i0
    cols = torch.arange(n_in, device=device, dtype=torch.float64)
    a = (1 - w1)[:, None] * (cols == i0[:, None]) + w1[:, None] * (cols == i1[:, None])
    return a.float()


# ------------------------------------------------------------------------------------------------------
# Public function


def upsample_sum(inputs: Sequence[Tensor], size: Sequence[int] | None = None) -> Tensor:
    """The sum of trilinear resizes, ``sum_i F.interpolate(inputs[i], size, mode="trilinear",
    align_corners=False)``, an input already at ``size`` added as it is, written once.

    Args:
        inputs: tensors (B, C, D_i, H_i, W_i) with one batch size and channel count, any sizes (the resize is
            F.interpolate's without a scale factor: upsampling or downsampling along each axis).
        size: the output's (D, H, W); by default the largest input's.

    Returns:
        (B, C, *size) in inputs[0]'s layout (NCDHW or ``channels_last_3d``) and in the dtype the plain composition
        gives: fp32 under CUDA autocast where an input is resized (it resizes in fp32), else the inputs' promoted
        dtype. Math in fp32.

    Up to four fp32, fp16 or bf16 inputs are fused on CUDA: one kernel reads them and writes the sum (the plain
    composition writes every resize and every partial sum). Backward is each resize's own backward
    (:func:`upsample_adjoint`: ATen's, as for the plain composition, which on CUDA accumulates with atomics; under
    ``torch.use_deterministic_algorithms`` products with interpolation matrices). Other cases run the reference
    under the ``auto`` backend.

    Example:
        >>> import torch, fastseg3d
        >>> parts = [torch.randn(2, 8, 8, 8, 8), torch.randn(2, 8, 4, 4, 4), torch.randn(2, 8, 2, 2, 2)]
        >>> fastseg3d.ops.upsample_sum(parts).shape
        torch.Size([2, 8, 8, 8, 8])
    """
    size = _validate(inputs, size)
    out_dtype = _out_dtype(inputs, size)
    if backends.select("upsample_sum", upsample_sum_unsupported_reasons(inputs, size), inputs[0].device):
        layout = utils.layout_of(inputs[0])
        xs = [x.contiguous(memory_format=layout) for x in inputs] + [None] * (_MAX_INPUTS - len(inputs))
        # a copy only where every input has one voxel (their layout cannot be told from their strides)
        return _upsample_sum_op(*xs, list(size), out_dtype).contiguous(memory_format=layout)
    y = upsample_sum_ref(inputs, size).to(out_dtype)
    y = y.contiguous(memory_format=utils.layout_of(inputs[0]))
    return y.clone() if y is inputs[0] else y  # one input at the output's size: a new tensor, never the input
