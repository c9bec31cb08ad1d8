"""Fused depthwise 3D convolution: ``act(conv3d(x, w, b, groups=C)) + residual`` in one kernel.

The Triton kernels are in ``fastseg3d.kernels.dwconv3d``, the reference in ``fastseg3d.reference.dwconv3d``.
Two ``torch.library`` ops carry them, ``fastseg3d::dwconv3d`` and ``fastseg3d::dwconv3d_backward``, each with a
fake implementation and autograd, so they run under ``torch.compile(fullgraph=True)`` and on ``meta`` tensors;
eager calls skip the dispatcher (:class:`fastseg3d.ops.utils.EagerOp`). The forward op also returns the weight as
the kernels read it (tap-major fp32), which backward reads again: one copy of the weight per call, not two.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
from torch import Tensor

from fastseg3d import backends
from fastseg3d.ops import utils
from fastseg3d.reference.dwconv3d import ACTIVATIONS, dwconv3d_backward_ref, dwconv3d_ref

__all__ = ["dwconv3d", "dwconv3d_tokens", "dwconv3d_unsupported_reasons", "fusable_kernel"]

_ACT_NAMES = {None: "none", "relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_tanh", "silu": "silu"}


def _index(v) -> int | None:
    """``v`` as an int where conv3d takes it as one (NumPy integers too), else None."""
    # what has no __index__ (sequences, floats, None) is answered without operator.index's TypeError: Dynamo
    # (torch 2.11) turns that error, raised in traced code, into an InternalTorchDynamoError instead of the except
    # clause below (kept for objects whose __index__ raises, such as float tensors)
    if isinstance(v, bool) or not hasattr(type(v), "__index__"):
        return None
    try:
        return operator.index(v)
    except TypeError:
        return None


def _triple(value, name: str, allow_zero: bool) -> tuple[int, int, int]:
    single = _index(value)
    values = (single,) * 3 if single is not None else value
    if not isinstance(values, (tuple, list)) or len(values) != 3 or any(_index(v) is None for v in values):
        raise ValueError(f"{name} must be an int or a sequence of 3 ints, got {value!r}")
    value = tuple(_index(v) for v in values)
    low = 0 if allow_zero else 1
    if any(v < low for v in value):
        raise ValueError(f"{name} must be >= {low} on every axis, got {tuple(value)}")
    return tuple(value)


def _padding(padding, kernel: Sequence[int], dilation: Sequence[int]) -> tuple[int, int, int] | str:
    """Integer padding per axis, or "same" left as is where the kernel is even (asymmetric padding)."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0)
        if padding != "same":
            raise ValueError(f"padding must be 'same', 'valid', an int or 3 ints, got {padding!r}")
        if any(k % 2 == 0 for k in kernel):
            return "same"
        # int(): torch.jit.trace hands the weight's shape over as 0-d tensors, which the op's int[] refuses
        return tuple(int(d * (k - 1) // 2) for k, d in zip(kernel, dilation))
    return _triple(padding, "padding", allow_zero=True)


def _validate(x, weight, bias, residual, padding, dilation, activation):
    """Raise ValueError/TypeError for wrong input; return (integer-or-"same" padding, dilation, output shape)."""
    utils.check_tensor(x, "x")
    utils.check_tensor(weight, "weight")
    if x.dim() != 5:
        raise ValueError(f"x must be 5-D (B, C, D, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if weight.dim() != 5 or weight.shape[1] != 1:
        raise ValueError(
            f"weight must have shape (C_out, 1, kD, kH, kW) for a depthwise conv, got {tuple(weight.shape)}"
        )
    c = x.shape[1]
    if c == 0 or weight.shape[0] % c != 0:
        raise ValueError(
            f"weight has {weight.shape[0]} output channels but x has {c} channels; a depthwise conv needs a "
            "multiple of C"
        )
    tensors = {"weight": weight}
    if bias is not None:
        utils.check_tensor(bias, "bias")
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        tensors["bias"] = bias
    if residual is not None:
        utils.check_tensor(residual, "residual")
        tensors["residual"] = residual
    for name, t in tensors.items():
        if t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}; pass tensors of one dtype")
        if t.device != x.device:
            raise TypeError(f"{name} is on {t.device} but x is on {x.device}; pass tensors on one device")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    dil = _triple(dilation, "dilation", allow_zero=False)
    kernel = tuple(weight.shape[2:])
    if 0 in kernel:
        raise ValueError(f"weight has an empty kernel {kernel}")
    pad = _padding(padding, kernel, dil)
    if pad == "same":
        out_spatial = tuple(x.shape[2:])
    else:
        out_spatial = tuple(s + 2 * p - d * (k - 1) for s, p, d, k in zip(x.shape[2:], pad, dil, kernel))
    if any(s <= 0 for s in out_spatial):
        raise ValueError(
            f"the kernel {kernel} with dilation {dil} does not fit x of spatial shape {tuple(x.shape[2:])} "
            f"padded by {pad}: output spatial shape {out_spatial}"
        )
    out_shape = (x.shape[0], weight.shape[0], *out_spatial)
    if residual is not None and tuple(residual.shape) != out_shape:
        raise ValueError(f"residual must have the output's shape {out_shape}, got {tuple(residual.shape)}")
    return pad, dil, out_shape


def fusable_kernel(kernel: Sequence[int]) -> bool:
    """Whether the fused kernel takes these kernel sizes: odd, 1 to 9, per axis."""
    return all(k % 2 == 1 and k <= 9 for k in kernel)


def dwconv3d_unsupported_reasons(x: Tensor, weight: Tensor, out_shape: Sequence[int],
                                 dilation: Sequence[int] = (1, 1, 1)) -> list[str]:
    """Why the fused kernel cannot take this (already validated) case; empty when it can."""
    reasons = utils.base_reasons(x)
    if weight.shape[0] != x.shape[1]:
        reasons.append(f"channel multiplier {weight.shape[0] // x.shape[1]} > 1")
    kernel = tuple(weight.shape[2:])
    if not fusable_kernel(kernel):
        reasons.append(f"kernel size {kernel} (fused: odd sizes 1 to 9 per axis)")
    if x.numel() == 0:
        reasons.append("x has no elements")
    # a grid row per depth, rounded up to whole depth-dilation residues; the input-gradient pass walks x's depth
    dil_d = dilation[0]
    if out_shape[0] > utils.MAX_GRID_YZ or -(-max(x.shape[2], out_shape[2]) // dil_d) * dil_d > utils.MAX_GRID_YZ:
        reasons.append(f"batch or depth above {utils.MAX_GRID_YZ}")
    return reasons


# ------------------------------------------------------------------------------------------------------
# torch.library ops


# the channel padding of the kernels' tap-major weight (fastseg3d.kernels.dwconv3d.taps_major; that module needs
# Triton): its tap loads read whole channel blocks, unmasked
TAPS_CHANNEL_MULTIPLE = 64


def _taps_channels(c: int) -> int:
    return -(-c // TAPS_CHANNEL_MULTIPLE) * TAPS_CHANNEL_MULTIPLE


def _new_output(x: Tensor, shape: Sequence[int]) -> Tensor:
    return utils.empty(shape, dtype=x.dtype, device=x.device, memory_format=utils.layout_of(x))


def _out_shape(x: Tensor, weight: Tensor, padding: Sequence[int], dilation: Sequence[int]) -> list[int]:
    return [x.shape[0], x.shape[1]] + [
        s + 2 * p - d * (k - 1) for s, p, d, k in zip(x.shape[2:], padding, dilation, weight.shape[2:])
    ]


@utils.eager_op("fastseg3d::dwconv3d")
def _dwconv3d_op(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    residual: Tensor | None,
    padding: list[int],
    dilation: list[int],
    activation: str,
) -> tuple[Tensor, Tensor]:
    """(y in x's layout, the weight as the kernels read it: kept for backward, which reads it too; an empty (0,)
    tensor where no kernel ran)."""
    if x.device.type == "meta":
        taps = x.new_empty((*weight.shape[2:], _taps_channels(weight.shape[0])), dtype=torch.float32)
        return _new_output(x, _out_shape(x, weight, padding, dilation)), taps
    if not utils.launchable(x.device):
        act = None if activation == "none" else activation
        y = dwconv3d_ref(x, weight, bias, tuple(padding), tuple(dilation), act, residual)
        return y.contiguous(memory_format=utils.layout_of(x)), x.new_empty((0,), dtype=torch.float32)
    with utils.launch_device(x):
        return _dwconv3d_launch(x, weight, bias, residual, padding, dilation, activation)


@utils.launches("fastseg3d::dwconv3d")
def _dwconv3d_launch(x, weight, bias, residual, padding, dilation, activation):
    from fastseg3d.kernels.dwconv3d import ACT_IDS, dwconv3d_fwd, taps_major

    act_id = ACT_IDS[None if activation == "none" else activation]
    out = _new_output(x, _out_shape(x, weight, padding, dilation))
    taps = taps_major(weight)
    return dwconv3d_fwd(x, taps, bias, residual, out, tuple(padding), tuple(dilation), act_id), taps


@utils.eager_op("fastseg3d::dwconv3d_backward")
def _dwconv3d_backward_op(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    weight_taps: Tensor,
    bias: Tensor | None,
    padding: list[int],
    dilation: list[int],
    activation: str,
    output_mask: list[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dw, db); an output not asked for in ``output_mask`` is an empty (0,) tensor. ``weight_taps``: the
    forward's (its second output; empty: made here)."""
    need_dx, need_dw, need_db = output_mask
    need_db = need_db and bias is not None
    if x.device.type == "meta":
        return (
            _new_output(x, x.shape) if need_dx else x.new_empty((0,)),
            torch.empty_like(weight) if need_dw else x.new_empty((0,)),
            torch.empty_like(bias) if need_db else x.new_empty((0,)),
        )
    if not utils.launchable(x.device):
        act = None if activation == "none" else activation
        dx, dw, db = dwconv3d_backward_ref(grad, x, weight, bias, padding, dilation, act, [need_dx, need_dw, need_db])
        return (
            dx.contiguous(memory_format=utils.layout_of(x)) if need_dx else x.new_empty((0,)),
            dw if need_dw else x.new_empty((0,)),
            db if need_db else x.new_empty((0,)),
        )
    with utils.launch_device(x):
        return _dwconv3d_backward_launch(grad, x, weight, weight_taps, bias, padding, dilation, activation,
                                         output_mask)


@utils.launches("fastseg3d::dwconv3d_backward")
def _dwconv3d_backward_launch(grad, x, weight, weight_taps, bias, padding, dilation, activation, output_mask):
    from fastseg3d.kernels.dwconv3d import ACT_IDS, dwconv3d_bwd_weight, dwconv3d_fwd, taps_major

    need_dx, need_dw, need_db = output_mask
    need_db = need_db and bias is not None
    if weight_taps.numel() and (weight_taps.dtype != torch.float32 or weight_taps.shape[:3] != weight.shape[2:]
                                or weight_taps.shape[3] != _taps_channels(weight.shape[0])
                                or not weight_taps.is_contiguous()):
        raise ValueError(f"weight_taps must be the forward's tap-major fp32 weight (kD, kH, kW, C rounded up to "
                         f"{TAPS_CHANNEL_MULTIPLE}) or empty, got "
                         f"{tuple(weight_taps.shape)} {weight_taps.dtype}")
    weight_t = weight_taps if weight_taps.numel() else taps_major(weight)
    act_id = ACT_IDS[None if activation == "none" else activation]
    pad, dil = tuple(padding), tuple(dilation)
    kd, kh, kw = weight.shape[2:]
    dz = grad
    if act_id != 0:
        # dz = grad * act'(z), with z recomputed by the forward kernel; the dw and dx passes read it.
        dz = _new_output(x, grad.shape)
        dwconv3d_fwd(x, weight_t, bias, None, dz, pad, dil, act_id, grad=grad)
    dw_out, db_out = x.new_empty((0,)), x.new_empty((0,))  # distinct: an op's outputs may not alias
    if need_dw or need_db:
        dw, db = dwconv3d_bwd_weight(x, dz, (kd, kh, kw), pad, dil, bias is not None, empty=utils.empty,
                                     dtypes=(weight.dtype, bias.dtype if bias is not None else weight.dtype))
        if need_dw:
            dw_out = dw.view(weight.shape)
        if need_db:
            db_out = db
    dx = x.new_empty((0,))
    if need_dx:
        dx = _new_output(x, x.shape)
        # dx is the correlation of dz with the flipped taps; mirrored padding keeps the input's size.
        mirrored = tuple(d * (k - 1) - p for k, d, p in zip((kd, kh, kw), dil, pad))
        dwconv3d_fwd(dz, weight_t, None, None, dx, mirrored, dil, 0, flip=True)
    return dx, dw_out, db_out


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, padding, dilation, activation = inputs
    ctx.save_for_backward(x, weight, output[1], bias)
    ctx.mark_non_differentiable(output[1])
    ctx.padding, ctx.dilation, ctx.activation = padding, dilation, activation
    utils.no_zero_grads(ctx)


def _backward(ctx, grad, grad_taps):
    x, weight, taps, bias = ctx.saved_tensors
    need_dx, need_dw, need_db, need_dr = ctx.needs_input_grad[:4]
    need_db = need_db and bias is not None
    dx = dw = db = None
    if grad is None:
        return None, None, None, None, None, None, None
    if need_dx or need_dw or need_db:
        dx, dw, db = _dwconv3d_backward_op(
            grad, x, weight, taps, bias, ctx.padding, ctx.dilation, ctx.activation, [need_dx, need_dw, need_db]
        )
    return (
        dx if need_dx else None,
        dw if need_dw else None,
        db if need_db else None,
        grad if need_dr else None,
        None,
        None,
        None,
    )


_dwconv3d_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------------
# Public functions


def dwconv3d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    padding: str | int | Sequence[int] = "same",
    dilation: int | Sequence[int] = 1,
    activation: str | None = None,
    residual: Tensor | None = None,
) -> Tensor:
    """Depthwise stride-1 3D convolution with fused bias, activation and residual.

    Computes ``activation(F.conv3d(x, weight, bias, padding=padding, dilation=dilation, groups=C)) + residual``.

    Args:
        x: (B, C, D, H, W), NCDHW-contiguous or ``channels_last_3d`` (the output keeps the layout).
        weight: (C, 1, kD, kH, kW); odd sizes 1 to 9 per axis are fused, e.g. (1, 3, 3) for a 2D conv per slice.
        bias: (C,) or None.
        padding: "same", "valid", an int or 3 ints (zero padding).
        dilation: an int or 3 ints.
        activation: None, "relu", "gelu" (erf), "gelu_tanh" or "silu", applied before the residual.
        residual: a tensor of the output's shape added last, or None; in x's dtype (under autocast, one of
            another floating dtype is added in the promoted dtype, as the plain composition adds it).

    fp32, fp16 and bf16 inputs are fused with fp32 accumulation; other cases (channel multiplier > 1, even
    kernels, other dtypes or devices) run the reference under the ``auto`` backend.

    Example:
        >>> import torch, fastseg3d
        >>> x = torch.randn(1, 8, 6, 7, 9)
        >>> w = torch.randn(8, 1, 3, 3, 3)
        >>> fastseg3d.ops.dwconv3d(x, w, activation="gelu").shape
        torch.Size([1, 8, 6, 7, 9])
    """
    late_residual = None
    if isinstance(x, Tensor) and isinstance(weight, Tensor):
        for name, t in (("bias", bias), ("residual", residual)):
            if t is not None:
                utils.check_tensor(t, name)
        cast = utils.autocast_dtype(x.device.type)
        if residual is not None and cast is not None and residual.dtype != cast and residual.dtype.is_floating_point:
            # autocast casts the conv's operands only: as in the plain composition, a residual in another dtype is
            # added to the conv's output in the promoted dtype (the residual stream stays fp32)
            late_residual, residual = residual, None
        x, weight, bias, residual = utils.autocast_inputs(x.device.type, x, weight, bias, residual)
        if late_residual is not None and late_residual.device != x.device:
            raise TypeError(f"residual is on {late_residual.device} but x is on {x.device}; pass tensors on one "
                            "device")
    pad, dil, out_shape = _validate(x, weight, bias, residual, padding, dilation, activation)
    if late_residual is not None:
        if tuple(late_residual.shape) != out_shape:
            raise ValueError(f"residual must have the output's shape {out_shape}, got {tuple(late_residual.shape)}")
        return dwconv3d(x, weight, bias, padding, dilation, activation) + late_residual
    reasons = dwconv3d_unsupported_reasons(x, weight, out_shape, dil)
    if backends.select("dwconv3d", reasons, x.device):
        return _dwconv3d_op(x, weight, bias, residual, list(pad), list(dil), _ACT_NAMES[activation])[0]
    # ATen's conv may return another layout (fp64 on CPU and CUDA goes contiguous); a trace would record the
    # layout of its example input as a constant, where the conv alone follows each input's, as nn.Conv3d does
    y = dwconv3d_ref(x, weight, bias, pad, dil, activation, residual)
    return y if torch.jit.is_tracing() else y.contiguous(memory_format=utils.layout_of(x))


def dwconv3d_tokens(
    x: Tensor,
    spatial_shape: Sequence[int],
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = None,
    residual: Tensor | None = None,
) -> Tensor:
    """:func:`dwconv3d` ("same" padding) on tokens (B, N, C) with N = D*H*W in C order.

    Works on the layout that transformer blocks hold (e.g. SegFormer3D's Mix-FFN) with no transposes or copies:
    any strides are read in place (a unit channel stride, as Linear outputs have, keeps the loads coalesced), and
    the output is (B, N, C) contiguous.

    Example:
        >>> import torch, fastseg3d
        >>> tokens = torch.randn(2, 4 * 5 * 6, 16)
        >>> w = torch.randn(16, 1, 3, 3, 3)
        >>> fastseg3d.ops.dwconv3d_tokens(tokens, (4, 5, 6), w).shape
        torch.Size([2, 120, 16])
    """
    utils.check_tensor(x, "x")
    if x.dim() != 3:
        raise ValueError(f"x must be 3-D tokens (B, N, C), got shape {tuple(x.shape)}")
    b, n, c = x.shape
    d, h, w = utils.check_spatial_shape(spatial_shape, n)
    vol = x.unflatten(1, (d, h, w)).permute(0, 4, 1, 2, 3)
    res = None
    if residual is not None:
        utils.check_tensor(residual, "residual")
        utils.check_tensor(weight, "weight")
        # a weight that does not fit x is left to dwconv3d's checks, which name it before the residual
        if weight.dim() == 5 and weight.shape[1] == 1 and c > 0 and weight.shape[0] % c == 0:
            expected = (b, n, weight.shape[0])
            if tuple(residual.shape) != expected:
                raise ValueError(
                    f"residual must have the output's token shape {expected}, got {tuple(residual.shape)}")
            res = residual.unflatten(1, (d, h, w)).permute(0, 4, 1, 2, 3)
    y = dwconv3d(vol, weight, bias, "same", 1, activation, res)
    # A view on the fused path (its output is channels-last); the reference path may need the copy.
    return y.permute(0, 2, 3, 4, 1).reshape(b, n, y.shape[1]).contiguous()
