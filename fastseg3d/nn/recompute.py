"""Norm/activation chains into a linear map that save only their input and the statistics.

BatchNorm -> activation -> Linear: in a training step the plain composition saves three full-size tensors
(BatchNorm's input, the activation's input and the Linear's input). Here only BatchNorm's input and two per-channel
vectors are saved; the normalised and activated tensor is recomputed in backward. Where the fused norm kernels run
(CUDA: ``fastseg3d.ops.group_norm_act`` with statistics over the batch), BatchNorm and activation are one kernel
that writes the Linear's input once, in the dtype it reads, forward and in backward's recompute, and backward
writes the input gradient once (no normalised tensor or activation gradient is written). Elsewhere the recompute
runs the kernels autograd itself runs (BatchNorm's inference form, the activation and its backward: the gradients
are the plain composition's up to the last bit of the recomputed normalisation, where an element on an activation's
kink may take the other side: in bf16 without fp32 statistics, one rounding step). Used by SegFormer3D's Mix-FFN
(BatchNorm -> GELU -> fc2) and decoder (BatchNorm -> ReLU -> 1x1x1 conv).

activation -> InstanceNorm -> 1x1x1 conv (MobileUtr's ConvUtr MLP, on its 4x expanded channels): likewise only the
activation's input and the per-instance statistics are saved, where the plain composition saves the activation's
input, the norm's input and the conv's input. Where the fused kernels run, the activation and the norm are one
kernel (``fastseg3d.ops.group_norm_act`` with the activation first), forward and in backward's recompute, and the
input gradient is written once: the activated tensor and its gradient are never written.

GroupNorm or BatchNorm -> activation -> any Conv3d (MISSU's pre-activation encoder blocks and decoder blocks): only
the norm's input and its statistics are saved. Under CUDA bf16/fp16 autocast GroupNorm runs in fp32, so the plain
composition saves an fp32 copy of its input, the fp32 activation output and the conv's low-precision input: 10 bytes
per element where this saves 2. Where the fused kernels run (CUDA), a GroupNorm, an InstanceNorm (GroupNorm with
one channel per group) or a training BatchNorm (one channel per group, statistics over the batch) and its
activation are one kernel (``fastseg3d.ops.group_norm_act``), forward and in
backward's recompute: it reads the bf16 input as it is and writes the conv's bf16 input once, and its backward
writes the bf16 input gradient directly (no fp32 copies of the input, the normalised tensor or their gradients
under autocast, and no normalised tensor or activation gradient in any dtype).

LayerNorm -> Linear (SegFormer3D's blocks, its spatial reduction and its decoder): under autocast LayerNorm returns
fp32 and the Linear casts it; where the fused kernel runs, the norm writes the Linear's dtype directly
(``fastseg3d.ops.layer_norm``) and its backward reads that gradient as it is. A residual add before the norm (a
pre-norm transformer's ``x + branch``) joins the norm's kernel (``add_layer_norm``).

A norm -> activation with no conv after it (the U-Nets' blocks end with one, MobileUtr's with InstanceNorm ->
ReLU, MISSU's decoder blocks with BatchNorm -> ReLU) is the fused kernel alone where it runs; elsewhere a norm ->
LeakyReLU saves its output instead of the activation's input: the layer after it saves that output anyway, and
with a non-negative slope the output's sign gives the derivative.

Under ``fastseg3d.backend("torch")`` each of these runs the plain composition (its reference).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.modules import module as _module_hooks

from fastseg3d import backends
from fastseg3d.ops.group_norm_act import (
    group_norm_act_backward,
    group_norm_act_fused,
    group_norm_act_recompute,
    group_norm_act_running_stats,
    group_norm_act_unsupported_reasons,
)
from fastseg3d.ops.layer_norm import (
    add_layer_norm_unsupported_reasons,
    fused_add_layer_norm,
    fused_layer_norm,
    layer_norm_unsupported_reasons,
)
from fastseg3d.ops.utils import autocast_dtype, layout_of
from fastseg3d.reference.dwconv3d import ACTIVATIONS, activation_ref
from fastseg3d.reference.group_norm_act import group_norm_act_running_stats_ref

__all__ = [
    "act_instance_norm",
    "add_layer_norm",
    "act_instance_norm_conv",
    "apply_layer_norm",
    "batch_norm_act_linear",
    "layer_norm_for_linear",
    "norm_act",
    "norm_act_conv",
]


def _tokens(vol: torch.Tensor) -> torch.Tensor:
    """(B, C, D, H, W) -> (B, N, C); a view when ``vol`` is channels-last."""
    return vol.flatten(2).transpose(1, 2)


class _BatchNormActLinear(torch.autograd.Function):
    """``fused``: whether the fused norm kernels (``fastseg3d.ops.group_norm_act`` with statistics over the batch)
    run the BatchNorm and the activation."""

    @staticmethod
    def forward(ctx, x, bn_weight, bn_bias, running_mean, running_var, momentum, eps, activation, weight, bias,
                fused):
        if fused:  # the norm and the activation in one kernel, written once in the dtype the linear reads
            x = x.contiguous(memory_format=layout_of(x))
            h, mean, rstd = group_norm_act_fused(x, bn_weight, bn_bias, x.shape[1], eps, activation, 0.0,
                                                 out_dtype=_conv_dtype_of(x.dtype, x.device.type), batch_stats=True)
            _update_running_stats(running_mean, running_var, mean, rstd, eps, momentum, x)
            h = _tokens(h)
        else:
            z, mean, rstd = torch.native_batch_norm(x, bn_weight, bn_bias, running_mean, running_var, True, momentum,
                                                    eps)
            h = _tokens(_act_as(z, (activation, 0.0), _conv_dtype(z)))
        w = weight.to(h.dtype)
        out = F.linear(h, w, bias.to(h.dtype) if bias is not None else None)
        ctx.save_for_backward(x, bn_weight, bn_bias, running_mean, running_var, mean, rstd, weight)
        ctx.eps, ctx.activation, ctx.has_bias, ctx.fused = eps, activation, bias is not None, fused
        return out

    @staticmethod
    @once_differentiable  # the recomputed z takes the statistics as constants: no second derivative through them
    def backward(ctx, grad):
        x, bn_weight, bn_bias, running_mean, running_var, mean, rstd, weight = ctx.saved_tensors
        # the linear's backward in the dtype its forward ran in (grad's: the low precision under autocast)
        g = grad
        if ctx.fused:
            h = _tokens(group_norm_act_recompute(x, bn_weight, bn_bias, mean, rstd, ctx.activation, 0.0,
                                                 out_dtype=g.dtype))
        else:
            # z = bn(x) as the forward made it: BatchNorm's training form again (a statistics pass more). Its
            # inference form with the saved statistics differs in the last bits, and where x equals the mean (a
            # constant channel, in bf16 or fp16) the forward's z is exactly 0 and the recomputed one is not: ReLU's
            # gradient passed there, scaled by rstd (~300x the gradients around it) where the forward's gives 0
            z = torch.native_batch_norm(x, bn_weight, bn_bias, None, None, True, 0.0, ctx.eps)[0]
            h = _tokens(_act_as(z, (ctx.activation, 0.0), g.dtype))
        dweight = torch.einsum("bno,bnc->oc", g, h).to(weight.dtype)
        dbias = g.sum((0, 1)).to(weight.dtype) if ctx.has_bias else None
        # the (B, N, C) token gradient is the volume in channels-last memory: a view, no transposing copy
        dh = (g @ weight.to(g.dtype)).unflatten(1, x.shape[2:]).movedim(-1, 1)
        mask = [True, bn_weight is not None, bn_bias is not None]
        if ctx.fused:  # the activation's gradient inside the norm's backward kernels: dx written once
            dx, dbn_w, dbn_b = group_norm_act_backward(dh, x, bn_weight, bn_bias, mean, rstd, ctx.eps,
                                                       ctx.activation, mask, 0.0)
        else:
            dz = _act_backward_as(dh, z, (ctx.activation, 0.0)).contiguous(memory_format=_format(x))
            dx, dbn_w, dbn_b = torch.ops.aten.native_batch_norm_backward(
                dz, x, bn_weight, running_mean, running_var, mean, rstd, True, ctx.eps, mask,
            )
        return dx, dbn_w, dbn_b, None, None, None, None, None, dweight, dbias, None


def _update_running_stats(running_mean, running_var, mean, rstd, eps: float, momentum: float, x: torch.Tensor):
    """A training BatchNorm's running-statistics update (``native_batch_norm``'s: the unbiased variance) from the
    fused kernels' batch statistics (1, C): one launch in eager mode, where it would otherwise be six small ops."""
    if running_mean is None or running_var is None:
        return
    count = x.shape[0] * math.prod(x.shape[2:])
    with torch.no_grad():
        if torch.compiler.is_compiling():  # traced momentum may be a data-dependent float; Inductor fuses these
            group_norm_act_running_stats_ref(running_mean, running_var, mean, rstd, eps, momentum, count)
        else:
            group_norm_act_running_stats(running_mean, running_var, mean, rstd, eps, momentum, count)


def _activation_backward(grad: torch.Tensor, z: torch.Tensor, activation: str | None) -> torch.Tensor:
    """``grad * activation'(z)`` in one ATen kernel, the one autograd runs for the activation."""
    if activation is None:
        return grad
    if activation == "relu":
        return torch.ops.aten.threshold_backward(grad, z, 0)
    if activation in ("gelu", "gelu_tanh"):
        return torch.ops.aten.gelu_backward(grad, z, approximate="tanh" if activation == "gelu_tanh" else "none")
    if activation == "silu":
        return torch.ops.aten.silu_backward(grad, z)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def _syncs(bn: nn.Module) -> bool:
    """Whether ``bn`` is a SyncBatchNorm whose forward would all-reduce its statistics (its own condition)."""
    if not (isinstance(bn, nn.SyncBatchNorm) and bn.training and dist.is_available() and dist.is_initialized()):
        return False
    return dist.get_world_size(bn.process_group or dist.group.WORLD) > 1


def _format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last_3d if x.is_contiguous(memory_format=torch.channels_last_3d) else torch.contiguous_format


def batch_norm_act_linear(
    x: torch.Tensor, bn: nn.BatchNorm3d, activation: str, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``F.linear(tokens(activation(bn(x))), weight, bias)`` for x (B, C, D, H, W); returns tokens (B, N, out).

    Equal to the plain composition (same outputs, gradients and running-statistics updates as ``nn.BatchNorm3d``;
    within rounding where the fused kernels run). When it trains with batch statistics and gradients are on, it
    saves only ``x`` and the batch statistics. Where the fused norm kernels run (CUDA), the BatchNorm and the
    activation are one kernel that writes the linear's input once in the dtype it reads (forward and in backward's
    recompute), and backward writes the input gradient once. An ``nn.SyncBatchNorm`` that would synchronise its
    statistics across processes, and a BatchNorm with hooks, run through their own ``forward``. The backward is not
    differentiable again.

    Raises:
        ValueError: an activation outside ``fastseg3d.reference.dwconv3d.ACTIVATIONS``; training with one value per
            channel (``x``'s batch size times its spatial size is 1), as ``nn.BatchNorm3d`` does; and what
            ``bn`` itself raises for an input of another rank or channel count.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if (not (bn.training and torch.is_grad_enabled()) or _syncs(bn) or _plain() or has_hooks(bn) or x.dim() != 5
            or x.shape[1] != bn.num_features or x.numel() == 0):
        return F.linear(_tokens(activation_ref(bn(x), activation)), weight, bias)
    return _BatchNormActLinear.apply(
        x, bn.weight, bn.bias, bn.running_mean, bn.running_var, _bn_momentum(bn, x), bn.eps, activation, weight, bias,
        _fused_groups(x, bn, ("batch", 0)) > 0,
    )


def _plain() -> bool:
    # under torch.func transforms too: the autograd.Functions here have no setup_context or jvp
    return backends.get_backend() == "torch" or bool(backends.transform_reasons())


def _bn_momentum(bn: nn.BatchNorm3d, x: torch.Tensor) -> float:
    """The momentum ``bn``'s training forward on ``x`` uses, after counting the batch as ``nn.BatchNorm3d`` does."""
    # native_batch_norm does not check this itself: the unbiased variance of one value would go into running_var
    # as NaN (and divide by zero on meta tensors).
    if x.shape[0] * math.prod(x.shape[2:]) == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.size()}")
    momentum = bn.momentum
    if bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if momentum is None:  # cumulative moving average, as nn.BatchNorm does
            momentum = 1.0 / float(bn.num_batches_tracked)
    return 0.0 if momentum is None else momentum


class _ActInstanceNormConv(torch.autograd.Function):
    """``fused``: whether the fused GroupNorm kernel (one channel per group, the activation first) runs the
    activation and the norm."""

    @staticmethod
    def forward(ctx, x, activation, eps, weight, bias, fused):
        if fused:  # written once, in the dtype the conv reads
            x = x.contiguous(memory_format=layout_of(x))
            z, mean, rstd = group_norm_act_fused(x, None, None, x.shape[1], eps, activation,
                                                 out_dtype=_conv_dtype_of(x.dtype, x.device.type),
                                                 activation_first=True)
        else:
            a = activation_ref(x, activation)
            # InstanceNorm as nn.InstanceNorm3d computes it: BatchNorm over the (1, B * C, ...) view
            z, mean, rstd = torch.native_batch_norm(a.reshape(1, -1, *a.shape[2:]), None, None, None, None, True,
                                                    0.0, eps)
            z = z.view_as(a)
        out = F.conv3d(z, weight, bias)  # under autocast in the dtype the plain conv would take
        ctx.save_for_backward(x, mean, rstd, weight)
        ctx.activation, ctx.eps, ctx.has_bias, ctx.fused = activation, eps, bias is not None, fused
        return out

    @staticmethod
    @once_differentiable  # the recomputed z takes the statistics as constants: no second derivative through them
    def backward(ctx, grad):
        x, mean, rstd, weight = ctx.saved_tensors
        if ctx.fused:
            z = group_norm_act_recompute(x, None, None, mean, rstd, ctx.activation, out_dtype=grad.dtype,
                                         activation_first=True)
        else:
            a = activation_ref(x, ctx.activation)
            av = a.reshape(1, -1, *a.shape[2:])
            z = F.batch_norm(av, mean, rstd.pow(-2) - ctx.eps, None, None, False, 0.0, ctx.eps).view_as(a)
        # the conv's own backward, in the dtype its forward ran in (grad's: bf16 under autocast)
        dz, dweight, dbias = torch.ops.aten.convolution_backward(
            grad, z.to(grad.dtype), weight.to(grad.dtype), [weight.shape[0]] if ctx.has_bias else None,
            [1, 1, 1], [0, 0, 0], [1, 1, 1], False, [0, 0, 0], 1, [True, True, ctx.has_bias],
        )
        if ctx.fused:
            dx = group_norm_act_backward(dz, x, None, None, mean, rstd, ctx.eps, ctx.activation, [True, False, False],
                                         activation_first=True)[0]
        else:
            da, _, _ = torch.ops.aten.native_batch_norm_backward(
                dz.to(a.dtype).reshape(av.shape), av, None, None, None, mean, rstd, True, ctx.eps,
                [True, False, False],
            )
            dx = _activation_backward(da.view_as(a), x, ctx.activation)
        return dx, None, None, dweight.to(weight.dtype), dbias.to(weight.dtype) if ctx.has_bias else None, None


def act_instance_norm_conv(
    x: torch.Tensor, activation: str, norm: nn.InstanceNorm3d, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``F.conv3d(norm(activation(x)), weight, bias)`` for x (B, C, D, H, W), a 1x1x1 conv ``weight`` (O, C, 1, 1, 1)
    and an ``nn.InstanceNorm3d`` without affine parameters or running statistics (MobileUtr's).

    Equal to the plain composition (within rounding where the fused kernels run: they keep the activation in fp32,
    where the plain composition rounds it to x's dtype before the norm); with gradients on it saves only ``x`` and
    the per-instance statistics (the backward is not differentiable again). Other norms and convs, a norm with
    hooks, and a single voxel (which ``nn.InstanceNorm3d`` refuses in training), run the plain composition.

    Example:
        >>> from torch import nn
        >>> from fastseg3d.nn.recompute import act_instance_norm_conv
        >>> norm, conv = nn.InstanceNorm3d(32), nn.Conv3d(32, 8, 1)
        >>> x = torch.randn(2, 32, 4, 4, 4, requires_grad=True)
        >>> act_instance_norm_conv(x, "gelu", norm, conv.weight, conv.bias).shape
        torch.Size([2, 8, 4, 4, 4])
    """
    if (not torch.is_grad_enabled() or not _takes_act_norm(x, norm) or tuple(weight.shape[2:]) != (1, 1, 1)
            or norm.affine):
        return F.conv3d(norm(activation_ref(x, activation)), weight, bias)
    return _ActInstanceNormConv.apply(x, activation, norm.eps, weight, bias,
                                      _fused_groups(x, norm, ("instance", 0)) > 0)


def _takes_act_norm(x: torch.Tensor, norm: nn.Module) -> bool:
    """Whether ``norm`` is an InstanceNorm the activation-first recomputes take on ``x``."""
    return not (_plain() or has_hooks(norm) or type(norm) is not nn.InstanceNorm3d or norm.track_running_stats
                or x.dim() != 5 or x.shape[1] != norm.num_features or math.prod(x.shape[2:]) == 1 or x.numel() == 0)


def act_instance_norm(x: torch.Tensor, activation: str, norm: nn.InstanceNorm3d) -> torch.Tensor:
    """``norm(activation(x))`` for x (B, C, D, H, W), an activation name (``fastseg3d.ops.group_norm_act``'s) and an
    ``nn.InstanceNorm3d`` without running statistics (MobileUtr's GELU -> InstanceNorm).

    Where the fused kernels run (CUDA), one kernel: the activated tensor is neither written nor saved (the plain
    composition writes it and saves it and x), and backward writes the input gradient once. Elsewhere (other
    devices, the torch backend, a norm with hooks or running statistics, a single voxel) the plain composition.

    Example:
        >>> from torch import nn
        >>> from fastseg3d.nn.recompute import act_instance_norm
        >>> act_instance_norm(torch.randn(2, 8, 4, 4, 4), "gelu", nn.InstanceNorm3d(8)).shape
        torch.Size([2, 8, 4, 4, 4])
    """
    if _takes_act_norm(x, norm) and _fused_groups(x, norm, ("instance", 0)):
        x = x.contiguous(memory_format=layout_of(x))
        return group_norm_act_fused(x, norm.weight, norm.bias, x.shape[1], norm.eps, activation,
                                    activation_first=True)[0]
    return norm(activation_ref(x, activation))


class _NormActConv(torch.autograd.Function):
    """kind: "group" (``groups`` groups), "instance" (BatchNorm's kernels on the (1, B * C, ...) view, as
    ``F.instance_norm`` runs) or "batch"; ``act``: ``(name, negative_slope)``; ``fused``: the groups the fused
    norm kernels normalise over (statistics over the batch for "batch"), 0 where ATen's norm runs."""

    @staticmethod
    def forward(ctx, x, kind, groups, norm_dtype, eps, momentum, norm_weight, norm_bias, running_mean, running_var,
                act, weight, bias, stride, padding, dilation, conv_groups, fused):
        ctx.kind, ctx.groups, ctx.norm_dtype, ctx.eps, ctx.act = kind, groups, norm_dtype, eps, act
        ctx.conv, ctx.fused = (stride, padding, dilation, conv_groups), fused
        if fused:  # the norm and the activation in one kernel, written once in the dtype the conv reads
            x = x.contiguous(memory_format=layout_of(x))
            h, mean, rstd = group_norm_act_fused(x, norm_weight, norm_bias, fused, eps, *act,
                                                 out_dtype=_conv_dtype_of(norm_dtype, x.device.type),
                                                 batch_stats=kind == "batch")
            if kind == "batch":
                _update_running_stats(running_mean, running_var, mean, rstd, eps, momentum, x)
        else:
            z, mean, rstd = _norm_forward(ctx, x, norm_weight, norm_bias, running_mean, running_var, momentum)
            h = _act_as(z.view(x.shape), act, _conv_dtype(z))
        out = F.conv3d(h, weight, bias, stride, padding, dilation, conv_groups)
        ctx.save_for_backward(x, norm_weight, norm_bias, running_mean, running_var, mean, rstd, weight)
        return out

    @staticmethod
    @once_differentiable  # the recomputed z takes the statistics as constants: no second derivative through them
    def backward(ctx, grad):
        x, norm_weight, norm_bias, running_mean, running_var, mean, rstd, weight = ctx.saved_tensors
        if ctx.fused:
            h = group_norm_act_recompute(x, norm_weight, norm_bias, mean, rstd, *ctx.act, out_dtype=grad.dtype)
        else:
            xn = _norm_input(ctx, x)
            w, b = _norm_affine(ctx, x, norm_weight, norm_bias)
            if ctx.kind == "group":  # GroupNorm's own forward again: its statistics pass is cheap next to the conv
                z = _group_norm(ctx, xn, w, b, x.shape)[0]
            else:  # BatchNorm's training form again, as the forward ran it (see _BatchNormActLinear)
                z = torch.native_batch_norm(xn, w, b, None, None, True, 0.0, ctx.eps)[0]
            h = _act_as(z.view(x.shape), ctx.act, grad.dtype)
        stride, padding, dilation, conv_groups = ctx.conv
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[6], ctx.needs_input_grad[7]]
        # the conv's own backward, in the dtype its forward ran in (grad's: the low precision under autocast)
        dh, dweight, dbias = torch.ops.aten.convolution_backward(
            grad, h, weight.to(grad.dtype), [weight.shape[0]] if ctx.needs_input_grad[12] else None,
            stride, padding, dilation, False, [0, 0, 0], conv_groups,
            [any(mask), ctx.needs_input_grad[11], ctx.needs_input_grad[12]],
        )
        dx = dnw = dnb = None
        if any(mask) and ctx.fused:
            dx, dnw, dnb = group_norm_act_backward(dh, x, norm_weight, norm_bias, mean, rstd, ctx.eps, ctx.act[0],
                                                   mask, ctx.act[1])
        elif any(mask):
            dz = _act_backward_as(dh, z.view(x.shape), ctx.act)
            dx, dnw, dnb = _norm_backward(ctx, dz, x, xn, norm_weight, norm_bias, running_mean, running_var, mean,
                                          rstd, mask)
        return (dx, None, None, None, None, None, dnw, dnb, None, None, None,
                dweight.to(weight.dtype) if dweight is not None else None,
                dbias.to(weight.dtype) if dbias is not None else None, None, None, None, None, None)


class _NormLeakyReLU(torch.autograd.Function):
    """LeakyReLU(norm(x)) saving the output instead of the activation's input (see :func:`norm_act`)."""

    @staticmethod
    def forward(ctx, x, kind, groups, norm_dtype, eps, momentum, norm_weight, norm_bias, running_mean, running_var,
                slope):
        ctx.kind, ctx.groups, ctx.norm_dtype, ctx.eps, ctx.slope = kind, groups, norm_dtype, eps, slope
        z, mean, rstd = _norm_forward(ctx, x, norm_weight, norm_bias, running_mean, running_var, momentum)
        out = F.leaky_relu(z.view(x.shape), slope)
        ctx.save_for_backward(x, norm_weight, norm_bias, running_mean, running_var, mean, rstd, out)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, norm_weight, norm_bias, running_mean, running_var, mean, rstd, out = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[6], ctx.needs_input_grad[7]]
        if not any(mask):
            return (None,) * 11
        # a non-negative slope keeps the sign: the output tells where the input was positive
        dz = torch.ops.aten.leaky_relu_backward(grad, out, ctx.slope, True)
        dx, dnw, dnb = _norm_backward(ctx, dz, x, _norm_input(ctx, x), norm_weight, norm_bias, running_mean,
                                      running_var, mean, rstd, mask)
        return dx, None, None, None, None, None, dnw, dnb, None, None, None


def _norm_forward(ctx, x, norm_weight, norm_bias, running_mean, running_var, momentum):
    """The norm's training forward: ``(z, mean, rstd)``, z in the shape its kernel gives (see :func:`_norm_input`)."""
    xn = _norm_input(ctx, x)
    w, b = _norm_affine(ctx, x, norm_weight, norm_bias)
    if ctx.kind == "group":
        return _group_norm(ctx, xn, w, b, x.shape)
    return torch.native_batch_norm(xn, w, b, running_mean, running_var, True, momentum, ctx.eps)


def _group_norm(ctx, xn, w, b, shape):
    """GroupNorm's own training forward on (B, C, *spatial) ``shape``: ``(z, mean, rstd)``."""
    return torch.native_group_norm(xn, w, b, shape[0], shape[1], math.prod(shape[2:]), ctx.groups, ctx.eps)


def _norm_backward(ctx, dz, x, xn, norm_weight, norm_bias, running_mean, running_var, mean, rstd, mask):
    """The norm's own backward kernel: ``(dx, dweight, dbias)`` in the dtypes of ``x`` and the parameters."""
    # the norms' CPU backward kernels read the output gradient in their input's memory format
    dz = dz.reshape(xn.shape).contiguous(memory_format=_format(xn))
    w, _ = _norm_affine(ctx, x, norm_weight, norm_bias)
    if ctx.kind == "group":
        # dx always: GroupNorm's CPU backward crashes on channels-last input without it
        dx, dnw, dnb = torch.ops.aten.native_group_norm_backward(
            dz, xn, mean, rstd, w, x.shape[0], x.shape[1], math.prod(x.shape[2:]), ctx.groups,
            [True, mask[1], mask[2]],
        )
    else:
        dx, dnw, dnb = torch.ops.aten.native_batch_norm_backward(
            dz, xn, w, running_mean, running_var, mean, rstd, True, ctx.eps, mask,
        )
    if ctx.kind == "instance":  # the affine parameters were repeated over the batch
        dnw = dnw.view(x.shape[0], -1).sum(0) if dnw is not None else None
        dnb = dnb.view(x.shape[0], -1).sum(0) if dnb is not None else None
    return (dx.view(x.shape).to(x.dtype) if mask[0] else None, dnw.to(norm_weight.dtype) if dnw is not None else None,
            dnb.to(norm_bias.dtype) if dnb is not None else None)


def _norm_input(ctx, x: torch.Tensor) -> torch.Tensor:
    """The tensor the norm's kernel reads, made as ``F.group_norm`` and ``F.instance_norm`` make it."""
    xn = x.to(ctx.norm_dtype)
    if ctx.kind == "instance":
        return xn.contiguous().view(1, x.shape[0] * x.shape[1], *x.shape[2:])
    if ctx.kind == "group":
        return xn.contiguous(memory_format=layout_of(xn)) if x.device.type == "cpu" else xn.contiguous()
    return xn


def _norm_affine(ctx, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None):
    """The norm's affine parameters as its kernel takes them: in fp32 where CUDA autocast runs GroupNorm in fp32
    (it casts every input), repeated over the batch for InstanceNorm."""
    if ctx.kind == "group" and ctx.norm_dtype != x.dtype:
        return tuple(p.to(ctx.norm_dtype) if p is not None else None for p in (weight, bias))
    if ctx.kind == "instance":
        return tuple(p.repeat(x.shape[0]) if p is not None else None for p in (weight, bias))
    return weight, bias


def has_hooks(*modules: nn.Module) -> bool:
    """Whether calling one of ``modules`` would run hooks (its own or global ones), or a ``forward`` replaced on the
    instance or a compiled call (``module.compile()``), which act as hooks too: a recompute that reads their
    parameters directly would skip them, so it runs the plain composition instead. Hooks marked with a true
    ``fastseg3d_passive`` attribute (``fastseg3d.profile``'s attribution, which loses nothing when they do not run)
    do not count."""
    def active(*hook_dicts) -> bool:
        return any(not getattr(h, "fastseg3d_passive", False) for d in hook_dicts for h in d.values())

    g = _module_hooks
    if active(g._global_forward_hooks, g._global_forward_pre_hooks, g._global_backward_hooks,
              g._global_backward_pre_hooks):
        return True
    return any(isinstance(mod, nn.Module) and (
        active(mod._forward_hooks, mod._forward_pre_hooks, mod._backward_hooks, mod._backward_pre_hooks)
        or "forward" in vars(mod) or getattr(mod, "_compiled_call_impl", None) is not None) for mod in modules)


def needs_own_call(module: nn.Module, expected: type) -> bool:
    """Whether ``module`` must run through its own call rather than a fused path that reads its submodules: hooks
    that see its input and output, a replaced ``forward`` (activation checkpointing), a compiled call, or a class
    other than ``expected`` (a wrapper or subclass)."""
    return type(module) is not expected or has_hooks(module)


def _act(z: torch.Tensor, act: tuple[str | None, float]) -> torch.Tensor:
    name, slope = act
    return F.leaky_relu(z, slope) if name == "leaky_relu" else activation_ref(z, name)


def _act_backward(grad: torch.Tensor, z: torch.Tensor, act: tuple[str | None, float]) -> torch.Tensor:
    name, slope = act
    if name == "leaky_relu":
        return torch.ops.aten.leaky_relu_backward(grad, z, slope, False)
    return _activation_backward(grad, z, name)


_AUTOCAST_FLOATS = (torch.float32, torch.float16, torch.bfloat16)  # the dtypes autocast casts


def _conv_dtype(z: torch.Tensor) -> torch.dtype:
    """The dtype a conv or linear reads ``z`` in: the autocast dtype where autocast casts it, else its own."""
    return _conv_dtype_of(z.dtype, z.device.type)


def _conv_dtype_of(dtype: torch.dtype, device_type: str) -> torch.dtype:
    cast = autocast_dtype(device_type)
    return cast if cast is not None and dtype in _AUTOCAST_FLOATS else dtype


def _act_as(z: torch.Tensor, act: tuple[str | None, float], dtype: torch.dtype) -> torch.Tensor:
    """``act(z)`` in ``dtype`` (the same values as ``act(z).to(dtype)``). A ReLU writes the cast output in its one
    pass: where the norm runs in fp32 under autocast (GroupNorm under CUDA autocast, an fp32 input such as
    SegFormer3D's upsampled decoder sum), that spares the fp32 activation (4 bytes an element) that the plain chain
    writes before the conv's or linear's cast."""
    if act[0] == "relu" and dtype != z.dtype:
        return torch.maximum(z, torch.zeros((), dtype=z.dtype), out=torch.empty_like(z, dtype=dtype))
    return _act(z, act).to(dtype)


def _act_backward_as(grad: torch.Tensor, z: torch.Tensor, act: tuple[str | None, float]) -> torch.Tensor:
    """``grad * act'(z)`` in ``z``'s dtype; a ReLU reads a lower-precision ``grad`` as it is (no cast copy)."""
    if act[0] == "relu":
        return torch.ops.aten.threshold_backward.grad_input(grad, z, 0, grad_input=torch.empty_like(z))
    return _act_backward(grad.to(z.dtype), z, act)


def _act_spec(activation) -> tuple[str | None, float] | None:
    """``(name, negative_slope)`` for an activation name or module; None for one this module does not know."""
    if activation is None or isinstance(activation, str):
        if activation not in ACTIVATIONS + ("leaky_relu",):
            raise ValueError(f"activation must be one of {ACTIVATIONS + ('leaky_relu',)}, got {activation!r}")
        return activation, 0.01
    kind = type(activation)
    if kind is nn.ReLU:
        return "relu", 0.0
    if kind is nn.LeakyReLU:
        return "leaky_relu", activation.negative_slope
    if kind is nn.GELU:
        return ("gelu_tanh" if activation.approximate == "tanh" else "gelu"), 0.0
    if kind is nn.SiLU:
        return "silu", 0.0
    if kind is nn.Identity:
        return None, 0.0
    return None


def _group_norm_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype ``F.group_norm`` computes ``x`` in: fp32 under CUDA autocast (and its emulation on ``meta``
    tensors by :mod:`fastseg3d.profile`), ``x``'s own elsewhere (CPU autocast leaves GroupNorm alone)."""
    if x.dtype in (torch.float16, torch.bfloat16):
        if x.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
            return torch.float32
        if x.device.type == "meta" and autocast_dtype("meta") is not None:
            return torch.float32
    return x.dtype


def _norm_kind(norm: nn.Module, x: torch.Tensor) -> tuple[str, int] | None:
    """``(kind, groups)`` for a norm this module recomputes on ``x``; None for the plain composition (also where
    the norm's own forward raises: one value to normalise, and on other ranks and devices)."""
    if x.dim() != 5 or x.device.type not in ("cuda", "cpu", "meta") or x.numel() == 0:
        return None
    spatial = math.prod(x.shape[2:])
    if type(norm) is nn.GroupNorm and x.shape[1] == norm.num_channels:
        return ("group", norm.num_groups) if x.shape[0] * x.shape[1] // norm.num_groups * spatial > 1 else None
    if (type(norm) is nn.InstanceNorm3d and not norm.track_running_stats and x.shape[1] == norm.num_features
            and spatial > 1):
        return "instance", 0
    if type(norm) is nn.BatchNorm3d and norm.training and not _syncs(norm) and x.shape[1] == norm.num_features:
        return "batch", 0
    return None


def norm_act_conv(x: torch.Tensor, norm: nn.Module, activation, conv: nn.Conv3d) -> torch.Tensor:
    """``conv(activation(norm(x)))`` for x (B, C, D, H, W), a norm module (``nn.GroupNorm``, ``nn.InstanceNorm3d``
    without running statistics, or a training ``nn.BatchNorm3d``), an activation (a name in
    ``("relu", "leaky_relu", "gelu", "gelu_tanh", "silu", None)``, "leaky_relu" with slope 0.01, or an ``nn.ReLU``,
    ``nn.LeakyReLU``, ``nn.GELU``, ``nn.SiLU`` or ``nn.Identity`` module) and any ``nn.Conv3d`` with zero padding.

    Equal to the plain composition (same outputs, gradients, dtypes under autocast and running-statistics updates;
    where the fused norm kernels run, within rounding: they round the normalised, activated tensor once, where
    the plain chain may round the norm's output and then the activation's);
    with gradients on it saves only ``x`` and the norm's statistics, and backward recomputes the normalised,
    activated tensor (one elementwise pass; GroupNorm's statistics once more) before the conv's backward; that
    backward is not differentiable again (double backward raises). Other norms and activations, a BatchNorm using
    its running statistics or synchronising across processes, other padding modes, modules with hooks (weight norm's
    among them), devices other than CUDA and the CPU, a norm over a single value and no-grad mode run the plain
    composition.

    Raises:
        ValueError: an activation name it does not know; one value per channel for a training BatchNorm, as
            ``nn.BatchNorm3d`` does.

    Example:
        >>> from torch import nn
        >>> from fastseg3d.nn.recompute import norm_act_conv
        >>> norm, conv = nn.GroupNorm(4, 16), nn.Conv3d(16, 16, 3, padding=1)
        >>> x = torch.randn(2, 16, 6, 6, 6, requires_grad=True)
        >>> norm_act_conv(x, norm, "relu", conv).shape
        torch.Size([2, 16, 6, 6, 6])
    """
    act = _act_spec(activation)
    kind = _norm_kind(norm, x)
    if (act is None or kind is None or not torch.is_grad_enabled() or _plain() or type(conv) is not nn.Conv3d
            or conv.padding_mode != "zeros" or isinstance(conv.padding, str) or has_hooks(norm, activation, conv)):
        z = norm(x)
        return conv(activation(z) if callable(activation) else _act(z, act))
    return _NormActConv.apply(x, *_norm_args(x, norm, kind), act, conv.weight, conv.bias, conv.stride, conv.padding,
                              conv.dilation, conv.groups, _fused_groups(x, norm, kind))


def _fused_groups(x: torch.Tensor, norm: nn.Module, kind: tuple[str, int]) -> int:
    """The groups ``fastseg3d.ops.group_norm_act`` normalises ``norm`` over where its kernels run (an InstanceNorm is
    a GroupNorm with one channel per group, a training BatchNorm one with statistics over the batch), 0 for ATen's
    norm."""
    reasons = group_norm_act_unsupported_reasons(x, norm.weight, norm.bias)
    if reasons and backends.get_backend() == "triton":
        return 0  # ATen's norm, as for the norms the kernel does not take (the triton policy would raise)
    if not backends.select("group_norm_act", reasons, x.device):
        return 0
    return kind[1] if kind[0] == "group" else x.shape[1]  # one channel per group for "instance" and "batch"


def _norm_args(x: torch.Tensor, norm: nn.Module, kind: tuple[str, int]) -> tuple:
    """The norm's arguments of the autograd functions, counting the batch for a BatchNorm."""
    kind, groups = kind
    norm_dtype = _group_norm_dtype(x) if kind == "group" else x.dtype
    momentum = _bn_momentum(norm, x) if kind == "batch" else 0.0
    running = (norm.running_mean, norm.running_var) if kind == "batch" else (None, None)
    return kind, groups, norm_dtype, norm.eps, momentum, norm.weight, norm.bias, *running


def norm_act(x: torch.Tensor, norm: nn.Module, activation) -> torch.Tensor:
    """``activation(norm(x))`` for x (B, C, D, H, W) and the norms and activations of :func:`norm_act_conv`.

    Where the fused norm kernels run (a GroupNorm, an InstanceNorm or a training BatchNorm on CUDA), norm and
    activation are one kernel (``fastseg3d.ops.group_norm_act``, in the norm's output dtype), which saves only x and
    the statistics and writes the output and, in backward, the input gradient once (a BatchNorm's running
    statistics updated as its own forward updates them). Elsewhere a LeakyReLU with a non-negative slope
    (``"leaky_relu"`` or an ``nn.LeakyReLU``) saves the output instead of the activation's input: its plain
    composition saves the norm's input, the activation's input and, through whatever reads it next, the output,
    which the next layer usually saves anyway, so one input-sized tensor less is kept (as with ``inplace=True``,
    the output must then not be changed in place before backward: autograd raises if it is). Other activations
    (ReLU already saves its output) and the cases :func:`norm_act_conv` leaves to the plain composition run the
    plain composition.

    Example:
        >>> from torch import nn
        >>> from fastseg3d.nn.recompute import norm_act
        >>> x = torch.randn(2, 8, 4, 4, 4, requires_grad=True)
        >>> norm_act(x, nn.InstanceNorm3d(8, affine=True), nn.LeakyReLU(0.01)).shape
        torch.Size([2, 8, 4, 4, 4])
    """
    act = _act_spec(activation)
    kind = _norm_kind(norm, x)
    if act is not None and kind is not None and not _plain() and not has_hooks(norm, activation):
        fused = _fused_groups(x, norm, kind)
        if fused:
            x = x.contiguous(memory_format=layout_of(x))
            out_dtype = _group_norm_dtype(x) if kind[0] == "group" else x.dtype
            batch = kind[0] == "batch"
            momentum = _bn_momentum(norm, x) if batch else 0.0
            y, mean, rstd = group_norm_act_fused(x, norm.weight, norm.bias, fused, norm.eps, *act,
                                                 out_dtype=out_dtype, batch_stats=batch)
            if batch:
                _update_running_stats(norm.running_mean, norm.running_var, mean, rstd, norm.eps, momentum, x)
            return y
        if act[0] == "leaky_relu" and act[1] >= 0 and torch.is_grad_enabled():
            return _NormLeakyReLU.apply(x, *_norm_args(x, norm, kind), act[1])
    z = norm(x)
    return activation(z) if callable(activation) else _act(z, act)


def layer_norm_for_linear(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """``norm(x)`` for an ``nn.LayerNorm`` over x's last axis whose output only a Linear, conv or matmul reads.

    Where the fused kernel runs (CUDA), the output is written in the dtype that layer reads: the autocast dtype
    under autocast, where ``nn.LayerNorm`` returns fp32 for the layer to cast (the same values, written once), x's
    otherwise. Elsewhere, and for a norm with hooks, other normalised shapes or cases the kernel does not take,
    ``norm(x)`` itself.

    Example:
        >>> from torch import nn
        >>> from fastseg3d.nn.recompute import layer_norm_for_linear
        >>> layer_norm_for_linear(torch.randn(2, 10, 32), nn.LayerNorm(32)).shape
        torch.Size([2, 10, 32])
    """
    return _layer_norm_in(x, norm, _conv_dtype_of(x.dtype, x.device.type))


def apply_layer_norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """``norm(x)`` for an ``nn.LayerNorm`` over x's last axis, in the dtype ``norm(x)`` has.

    Where the fused kernel runs (CUDA), a low-precision x is read as it is: under CUDA autocast LayerNorm runs in
    fp32, so the plain norm first writes an fp32 copy of x, and in backward casts x's gradient from fp32 in a
    kernel of its own; here the norm writes fp32 from the bf16 input and its backward writes the bf16 gradient.
    Elsewhere, and for a norm with hooks, other normalised shapes or cases the kernel does not take, ``norm(x)``
    itself.

    Example:
        >>> from torch import nn
        >>> from fastseg3d.nn.recompute import apply_layer_norm
        >>> x, norm = torch.randn(2, 10, 32), nn.LayerNorm(32)
        >>> torch.equal(apply_layer_norm(x, norm), norm(x))
        True
    """
    return _layer_norm_in(x, norm, _norm_dtype_of(x.dtype, x.device.type))


def _norm_dtype_of(dtype: torch.dtype, device_type: str) -> torch.dtype:
    """The dtype ``nn.LayerNorm`` returns for an input of ``dtype``: CUDA's autocast runs it in fp32, CPU's in the
    input's dtype."""
    fp32 = autocast_dtype(device_type) is not None and device_type != "cpu" and dtype in _AUTOCAST_FLOATS
    return torch.float32 if fp32 else dtype


def _layer_norm_in(x: torch.Tensor, norm: nn.Module, out_dtype: torch.dtype) -> torch.Tensor:
    """``norm(x)`` in ``out_dtype`` through the fused kernel where it takes the case, else ``norm(x)``."""
    if (type(norm) is not nn.LayerNorm or len(norm.normalized_shape) != 1 or x.dim() < 1
            or x.shape[-1] != norm.normalized_shape[0] or _plain() or has_hooks(norm)):
        return norm(x)
    reasons = layer_norm_unsupported_reasons(x, norm.weight, norm.bias, out_dtype)
    if reasons and backends.get_backend() == "triton":
        return norm(x)  # ATen's norm, as for the norms the fused GroupNorm does not take
    if not backends.select("layer_norm", reasons, x.device):
        return norm(x)
    return fused_layer_norm(x, norm.weight, norm.bias, norm.eps, out_dtype)


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, norm: nn.Module, for_linear: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, norm(s))`` for ``s = x + residual`` and an ``nn.LayerNorm`` over the last axis: a pre-norm
    transformer's residual step, the sum continuing the residual stream and its norm feeding the next branch.

    Where the fused kernel runs (CUDA), one kernel adds, writes s and writes the norm
    (:func:`fastseg3d.ops.add_layer_norm`), and its backward adds the gradient s receives from later layers and
    writes the total in x's and the residual's dtypes: under autocast (fp32 stream, bf16 branch) the add, the
    accumulation of the two gradients and the branch gradient's cast are gone. ``for_linear``: only Linear, conv
    or matmul layers read ``norm(s)``, which is then written in the dtype they read (as in
    :func:`layer_norm_for_linear`); otherwise in the dtype ``norm(s)`` has. Elsewhere, and for a norm with hooks,
    other normalised shapes or cases the kernel does not take, ``x + residual`` and the norm as separate ops.

    Example:
        >>> from torch import nn
        >>> from fastseg3d.nn.recompute import add_layer_norm
        >>> x, branch, norm = torch.randn(2, 10, 32), torch.randn(2, 10, 32), nn.LayerNorm(32)
        >>> s, y = add_layer_norm(x, branch, norm)
        >>> torch.equal(s, x + branch) and torch.equal(y, norm(x + branch))
        True
    """
    def separate() -> tuple[torch.Tensor, torch.Tensor]:
        total = x + residual
        return total, (layer_norm_for_linear(total, norm) if for_linear else norm(total))

    if (type(norm) is not nn.LayerNorm or len(norm.normalized_shape) != 1 or x.dim() < 1
            or not isinstance(residual, torch.Tensor) or residual.shape != x.shape or residual.device != x.device
            or x.shape[-1] != norm.normalized_shape[0] or _plain() or has_hooks(norm)):
        return separate()
    sum_dtype = torch.promote_types(x.dtype, residual.dtype)
    out_dtype = (_conv_dtype_of if for_linear else _norm_dtype_of)(sum_dtype, x.device.type)
    reasons = add_layer_norm_unsupported_reasons(x, residual, norm.weight, norm.bias, out_dtype)
    if reasons and backends.get_backend() == "triton":
        return separate()  # the add and ATen's norm, as layer_norm_for_linear does
    if not backends.select("add_layer_norm", reasons, x.device):
        return separate()
    return fused_add_layer_norm(x, residual, norm.weight, norm.bias, norm.eps, out_dtype)
