"""Norm/activation chains into a linear map that save only their input and the statistics.

BatchNorm -> activation -> Linear: in a training step the plain composition saves three full-size tensors
(BatchNorm's input, the activation's input and the Linear's input). Here only BatchNorm's input and two per-channel
vectors are saved; the normalised and activated tensor is recomputed in backward with the kernels autograd itself
runs (BatchNorm's inference form, the activation and its backward: on channels-last input the gradients are the
plain composition's, bit for bit), three elementwise passes next to the Linear's two products. Used by
SegFormer3D's Mix-FFN (BatchNorm -> GELU -> fc2) and decoder (BatchNorm -> ReLU -> 1x1x1 conv).

activation -> InstanceNorm -> 1x1x1 conv (MobileUtr's ConvUtr MLP, on its 4x expanded channels): likewise only the
activation's input and the per-instance statistics are saved, where the plain composition saves the activation's
input, the norm's input and the conv's input.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fastseg3d.reference.dwconv3d import ACTIVATIONS, activation_ref

__all__ = ["act_instance_norm_conv", "batch_norm_act_linear"]


def _tokens(vol: torch.Tensor) -> torch.Tensor:
    """(B, C, D, H, W) -> (B, N, C); a view when ``vol`` is channels-last."""
    return vol.flatten(2).transpose(1, 2)


class _BatchNormActLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bn_weight, bn_bias, running_mean, running_var, momentum, eps, activation, weight, bias):
        z, mean, rstd = torch.native_batch_norm(x, bn_weight, bn_bias, running_mean, running_var, True, momentum, eps)
        h = _tokens(activation_ref(z, activation))
        w = weight.to(h.dtype)
        out = F.linear(h, w, bias.to(h.dtype) if bias is not None else None)
        ctx.save_for_backward(x, bn_weight, bn_bias, running_mean, running_var, mean, rstd, weight)
        ctx.eps, ctx.activation, ctx.has_bias = eps, activation, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        x, bn_weight, bn_bias, running_mean, running_var, mean, rstd, weight = ctx.saved_tensors
        # z = bn(x) with the batch statistics in one pass: BatchNorm's inference form, given the batch mean and the
        # variance whose eps-shifted inverse square root is rstd (the statistics are per channel, so this is free)
        z = F.batch_norm(x, mean, rstd.pow(-2) - ctx.eps, bn_weight, bn_bias, False, 0.0, ctx.eps)
        h = _tokens(activation_ref(z, ctx.activation))
        g = grad.to(h.dtype)
        dweight = torch.einsum("bno,bnc->oc", g, h).to(weight.dtype)
        dbias = g.sum((0, 1)).to(weight.dtype) if ctx.has_bias else None
        # the (B, N, C) token gradient is the volume in channels-last memory: a view, no transposing copy
        dh = (g @ weight.to(g.dtype)).unflatten(1, x.shape[2:]).movedim(-1, 1)
        dz = _activation_backward(dh, z, ctx.activation).contiguous(memory_format=_format(x))
        dx, dbn_w, dbn_b = torch.ops.aten.native_batch_norm_backward(
            dz, x, bn_weight, running_mean, running_var, mean, rstd, True, ctx.eps,
            [True, bn_weight is not None, bn_bias is not None],
        )
        return dx, dbn_w, dbn_b, None, None, None, None, None, dweight, dbias


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

    Equal to the plain composition (same outputs, gradients and running-statistics updates as ``nn.BatchNorm3d``).
    When it trains with batch statistics and gradients are on, it saves only ``x`` and the batch statistics. An
    ``nn.SyncBatchNorm`` that would synchronise its statistics across processes runs through its own ``forward``.

    Raises:
        ValueError: training with one value per channel (``x``'s batch size times its spatial size is 1), as
            ``nn.BatchNorm3d`` does.
    """
    if not (bn.training and torch.is_grad_enabled()) or _syncs(bn):
        return F.linear(_tokens(activation_ref(bn(x), activation)), weight, bias)
    # native_batch_norm does not check this itself: the unbiased variance of one value would go into running_var
    # as NaN (and divide by zero on meta tensors).
    if x.shape[0] * math.prod(x.shape[2:]) == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.size()}")
    momentum = bn.momentum
    if bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if momentum is None:  # cumulative moving average, as nn.BatchNorm does
            momentum = 1.0 / float(bn.num_batches_tracked)
    momentum = 0.0 if momentum is None else momentum
    return _BatchNormActLinear.apply(
        x, bn.weight, bn.bias, bn.running_mean, bn.running_var, momentum, bn.eps, activation, weight, bias
    )


class _ActInstanceNormConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, activation, eps, weight, bias):
        a = activation_ref(x, activation)
        # InstanceNorm as nn.InstanceNorm3d computes it: BatchNorm over the (1, B * C, ...) view
        z, mean, rstd = torch.native_batch_norm(a.reshape(1, -1, *a.shape[2:]), None, None, None, None, True, 0.0,
                                                eps)
        out = F.conv3d(z.view_as(a), weight, bias)  # under autocast in the dtype the plain conv would take
        ctx.save_for_backward(x, mean, rstd, weight)
        ctx.activation, ctx.eps, ctx.has_bias = activation, eps, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        x, mean, rstd, weight = ctx.saved_tensors
        a = activation_ref(x, ctx.activation)
        av = a.reshape(1, -1, *a.shape[2:])
        z = F.batch_norm(av, mean, rstd.pow(-2) - ctx.eps, None, None, False, 0.0, ctx.eps)
        # the conv's own backward, in the dtype its forward ran in (grad's: bf16 under autocast)
        dz, dweight, dbias = torch.ops.aten.convolution_backward(
            grad, z.view_as(a).to(grad.dtype), weight.to(grad.dtype), [weight.shape[0]] if ctx.has_bias else None,
            [1, 1, 1], [0, 0, 0], [1, 1, 1], False, [0, 0, 0], 1, [True, True, ctx.has_bias],
        )
        da, _, _ = torch.ops.aten.native_batch_norm_backward(
            dz.to(a.dtype).reshape(av.shape), av, None, None, None, mean, rstd, True, ctx.eps, [True, False, False],
        )
        dx = _activation_backward(da.view_as(a), x, ctx.activation)
        return dx, None, None, dweight.to(weight.dtype), dbias.to(weight.dtype) if ctx.has_bias else None


def act_instance_norm_conv(
    x: torch.Tensor, activation: str, norm: nn.InstanceNorm3d, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``F.conv3d(norm(activation(x)), weight, bias)`` for x (B, C, D, H, W), a 1x1x1 conv ``weight`` (O, C, 1, 1, 1)
    and an ``nn.InstanceNorm3d`` without affine parameters or running statistics (MobileUtr's).

    Equal to the plain composition; with gradients on it saves only ``x`` and the per-instance statistics. Other
    norms and convs, and a single voxel (which ``nn.InstanceNorm3d`` refuses in training), run the plain
    composition.

    Example:
        >>> from torch import nn
        >>> from fastseg3d.nn.recompute import act_instance_norm_conv
        >>> norm, conv = nn.InstanceNorm3d(32), nn.Conv3d(32, 8, 1)
        >>> x = torch.randn(2, 32, 4, 4, 4, requires_grad=True)
        >>> act_instance_norm_conv(x, "gelu", norm, conv.weight, conv.bias).shape
        torch.Size([2, 8, 4, 4, 4])
    """
    if (not torch.is_grad_enabled() or type(norm) is not nn.InstanceNorm3d or norm.affine
            or norm.track_running_stats or tuple(weight.shape[2:]) != (1, 1, 1) or math.prod(x.shape[2:]) == 1):
        return F.conv3d(norm(activation_ref(x, activation)), weight, bias)
    return _ActInstanceNormConv.apply(x, activation, norm.eps, weight, bias)
