"""Reference GroupNorm with a fused activation in ATen ops: ``activation(F.group_norm(x, ...))``, or
``F.group_norm(activation(x), ...)`` with ``activation_first``, the activation one of
``fastseg3d.reference.dwconv3d.ACTIVATIONS`` or "leaky_relu" (with ``negative_slope``).

fp16 and bf16 inputs are normalised in fp32, as CUDA autocast runs GroupNorm, and the result is returned in the
input's dtype (what the conv after the norm reads under autocast). Math in fp64 for fp64 inputs.

The fused forward and backward also take statistics over the whole batch (``batch_stats``: BatchNorm's, with one
group per channel): GroupNorm of the (1, C, B * S) tensor that puts the batch elements side by side.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastseg3d.reference._grad_dtype import compute_dtype
from fastseg3d.reference.dwconv3d import activation_grad_ref, activation_ref

__all__ = [
    "group_norm_act_apply_ref",
    "group_norm_act_backward_ref",
    "group_norm_act_fused_ref",
    "group_norm_act_ref",
    "group_norm_act_running_stats_ref",
]


def _activate(z, activation, negative_slope: float):
    return F.leaky_relu(z, negative_slope) if activation == "leaky_relu" else activation_ref(z, activation)


def _activate_grad(z, activation, negative_slope: float):
    if activation == "leaky_relu":
        return torch.where(z > 0, 1.0, torch.full_like(z, negative_slope))
    return activation_grad_ref(z, activation)


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return t.to(dtype) if t is not None else None


def _weight(weight, bias, channels: int, dtype: torch.dtype):
    """``weight`` in ``dtype``; ones where only a bias is given (ATen's CPU GroupNorm backward fails on a bias
    without a weight)."""
    if weight is None and bias is not None:
        return torch.ones(channels, dtype=dtype, device=bias.device)
    return _cast(weight, dtype)


def _merge_batch(t: torch.Tensor) -> torch.Tensor:
    """(B, C, *spatial) -> (1, C, B * S): the batch elements side by side, one instance."""
    return t.transpose(0, 1).reshape(1, t.shape[1], -1).contiguous()


def _split_batch(t: torch.Tensor, shape) -> torch.Tensor:
    """The inverse of :func:`_merge_batch` for a tensor of ``shape``."""
    return t.view(shape[1], shape[0], *shape[2:]).transpose(0, 1)


def _pre_post(activation, activation_first: bool):
    """(the activation applied to the norm's input, the one applied to its output)."""
    return (activation, None) if activation_first else (None, activation)


def group_norm_act_ref(x, num_groups: int, weight=None, bias=None, eps: float = 1e-5, activation=None,
                       negative_slope: float = 0.01, activation_first: bool = False):
    """``activation(F.group_norm(x, num_groups, weight, bias, eps))`` (``F.group_norm(activation(x), ...)`` with
    ``activation_first``) in x's dtype, differentiable by autograd."""
    cd = compute_dtype(x)
    pre, post = _pre_post(activation, activation_first)
    a = _activate(x.to(cd), pre, negative_slope)
    z = F.group_norm(a, num_groups, _weight(weight, bias, x.shape[1], cd), _cast(bias, cd), eps)
    return _activate(z, post, negative_slope).to(x.dtype)


def group_norm_act_fused_ref(x, weight, bias, groups: int, eps: float, activation, negative_slope: float = 0.01,
                             out_dtype: torch.dtype | None = None, activation_first: bool = False,
                             batch_stats: bool = False):
    """What the fused forward returns, without autograd: (y in ``out_dtype``, default x's, mean, rstd), the
    statistics (B, G) in fp32 (fp64 for fp64 inputs), or (1, G) over the whole batch with ``batch_stats``."""
    cd = compute_dtype(x)
    pre, post = _pre_post(activation, activation_first)
    a = _activate(x.to(cd), pre, negative_slope)
    a = _merge_batch(a) if batch_stats else a.contiguous()
    z, mean, rstd = torch.native_group_norm(a, _cast(weight, cd), _cast(bias, cd), a.shape[0], a.shape[1],
                                            math.prod(a.shape[2:]), groups, eps)
    z = _split_batch(z, x.shape) if batch_stats else z
    return _activate(z, post, negative_slope).to(out_dtype or x.dtype), mean, rstd


def group_norm_act_apply_ref(x, weight, bias, mean, rstd, activation, negative_slope: float = 0.01,
                             out_dtype: torch.dtype | None = None, activation_first: bool = False):
    """``activation((x - mean) * rstd * weight + bias)`` (``(activation(x) - mean) * rstd * weight + bias`` with
    ``activation_first``) with given per-group statistics ((B, G), or (1, G) for the whole batch), in ``out_dtype``
    (default x's)."""
    pre, post = _pre_post(activation, activation_first)
    per_group = x.shape[1] // mean.shape[1]
    shape = (mean.shape[0], x.shape[1], 1, 1, 1)
    scale = rstd.repeat_interleave(per_group, dim=1).view(shape)
    if weight is not None:
        scale = scale * weight.to(scale.dtype).view(1, -1, 1, 1, 1)
    shift = -mean.repeat_interleave(per_group, dim=1).view(shape) * scale
    if bias is not None:
        shift = shift + bias.to(scale.dtype).view(1, -1, 1, 1, 1)
    z = _activate(x.to(scale.dtype), pre, negative_slope) * scale + shift
    return _activate(z, post, negative_slope).to(out_dtype or x.dtype)


def group_norm_act_running_stats_ref(running_mean, running_var, mean, rstd, eps: float, momentum: float,
                                     count: int) -> None:
    """``native_batch_norm``'s running-statistics update, in place, from batch statistics over ``count`` values a
    channel given as the mean and rstd = 1 / sqrt(var + eps) of :func:`group_norm_act_fused_ref` with
    ``batch_stats``: the unbiased variance comes back from rstd, exact to the rounding of var + eps (a variance far
    below eps keeps fewer digits, which eps outweighs wherever the running variance is used)."""
    var = rstd.reshape(-1).pow(-2).sub_(eps).clamp_(min=0.0).mul_(count / (count - 1))
    running_mean.lerp_(mean.reshape(-1).to(running_mean.dtype), momentum)
    running_var.lerp_(var.to(running_var.dtype), momentum)


def group_norm_act_backward_ref(grad, x, weight, bias, groups: int, eps: float, activation, output_mask,
                                negative_slope: float = 0.01, activation_first: bool = False,
                                batch_stats: bool = False):
    """(dx, dweight, dbias) of :func:`group_norm_act_ref` (of :func:`group_norm_act_fused_ref`'s output with
    ``batch_stats``) in the dtypes of x and the parameters, from GroupNorm's own forward and backward kernels (no
    autograd: op bodies run below it); None where ``output_mask`` is False (and for an absent parameter)."""
    cd = compute_dtype(x)
    pre, post = _pre_post(activation, activation_first)
    xc, wc = x.to(cd), _weight(weight, bias, x.shape[1], cd)
    xc, grad = (_merge_batch(xc), _merge_batch(grad)) if batch_stats else (xc.contiguous(), grad)
    a = _activate(xc, pre, negative_slope)
    n, c, s = a.shape[0], a.shape[1], math.prod(a.shape[2:])
    z, mean, rstd = torch.native_group_norm(a, wc, _cast(bias, cd), n, c, s, groups, eps)
    dz = grad.to(cd)
    if post is not None:
        dz = dz * _activate_grad(z, post, negative_slope)
    need_dw, need_db = output_mask[1] and weight is not None, output_mask[2] and bias is not None
    # GroupNorm's backward expands sum(dz * (a - mean)) as sum(dz * a) - mean * sum(dz), which cancels where |mean|
    # >> std (fp32 dweight 20x off at mean = 400 std): it gets the input centred, with a zero mean. The second pass
    # takes out the rounding of the mean (fp32 for half inputs), which rstd would scale into every term.
    centred = a.view(n, groups, -1) - mean.unsqueeze(-1)
    centred = (centred - centred.mean(-1, keepdim=True)).view(a.shape)
    # dx always: GroupNorm's CPU backward kernel does not take a mask without it on every layout
    dx, dw, db = torch.ops.aten.native_group_norm_backward(dz.contiguous(), centred, torch.zeros_like(mean), rstd,
                                                           wc, n, c, s, groups, [True, need_dw, need_db])
    if pre is not None:
        dx = dx * _activate_grad(xc, pre, negative_slope)
    if batch_stats:
        dx = _split_batch(dx, x.shape)
    return (dx.to(x.dtype) if output_mask[0] else None, dw.to(weight.dtype) if need_dw else None,
            db.to(bias.dtype) if need_db else None)
