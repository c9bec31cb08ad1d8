"""Fused GroupNorm and activation: ``act(group_norm(x))`` in fp32 math, written once in the input's dtype.

Under CUDA autocast ``F.group_norm`` copies a bf16 input to fp32, normalises into another fp32 tensor, the
activation writes a third, and the next conv casts it back to bf16: 14 bytes written an element where this writes
2, and backward likewise (MISSU's encoder blocks run GroupNorm -> ReLU -> conv at every level). With one channel
per group it is an affine InstanceNorm (the U-Nets' blocks: InstanceNorm -> LeakyReLU). With the activation first
(MobileUtr's ConvUtr: GELU -> InstanceNorm) the activated input is recomputed wherever it is read, never written.

The Triton kernels are in ``fastseg3d.kernels.group_norm_act``, the reference in
``fastseg3d.reference.group_norm_act``. Four ``torch.library`` ops carry them (``triton_op``s, so ``torch.compile``
and fake tensors trace their bodies; ``meta`` tensors take a shapes-only branch): ``fastseg3d::group_norm_act``
(with autograd; returns the output and the per-group mean and rstd), ``fastseg3d::group_norm_act_apply`` (the
output again from given statistics: the recompute of ``fastseg3d.nn.recompute.norm_act_conv``),
``fastseg3d::group_norm_act_backward`` and ``fastseg3d::group_norm_act_running_stats`` (a training BatchNorm's
running statistics, updated in place from the forward's statistics over the batch). The forward and apply ops
write the output in a given dtype (the conv's under autocast).

The forward op also takes statistics over the whole batch (``batch_stats``, with one group per channel: a training
BatchNorm's, which ``fastseg3d.nn.recompute`` fuses with its activation); its statistics are then (1, G), and the
apply and backward ops read such statistics as spanning the batch; the caller updates the running statistics
with them (``group_norm_act_running_stats``).
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from fastseg3d import backends
from fastseg3d.ops import utils
from fastseg3d.reference.dwconv3d import ACTIVATIONS
from fastseg3d.reference.group_norm_act import (
    group_norm_act_apply_ref,
    group_norm_act_backward_ref,
    group_norm_act_fused_ref,
    group_norm_act_ref,
    group_norm_act_running_stats_ref,
)

__all__ = ["group_norm_act", "group_norm_act_unsupported_reasons"]

ACTIVATIONS_FUSED = (*ACTIVATIONS, "leaky_relu")
_ACT_NAMES = {a: "none" if a is None else a for a in ACTIVATIONS_FUSED}


def _act(name: str) -> str | None:
    return None if name == "none" else name


def _validate(x, num_groups, weight, bias, eps, activation, negative_slope, activation_first) -> None:
    utils.check_tensor(x, "x")
    if x.dim() != 5:
        raise ValueError(f"x must be 5-D (B, C, D, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if isinstance(num_groups, bool) or not isinstance(num_groups, numbers.Integral) or num_groups <= 0:
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
    if x.shape[1] % num_groups:
        raise ValueError(f"x has {x.shape[1]} channels, which num_groups={num_groups} does not divide")
    if x.shape[0] * x.shape[1] // num_groups * x.shape[2] * x.shape[3] * x.shape[4] == 1:
        # F.group_norm's refusal (its statistics would be of one value), so that every backend raises alike
        raise ValueError(f"x of shape {tuple(x.shape)} has one value per group: GroupNorm needs more than one")
    utils.check_norm_args(x, weight, bias, eps, x.shape[1], f"x's {x.shape[1]} channels")
    if activation not in ACTIVATIONS_FUSED:
        raise ValueError(f"activation must be one of {ACTIVATIONS_FUSED}, got {activation!r}")
    if (isinstance(negative_slope, bool) or not isinstance(negative_slope, numbers.Real)
            or not utils.finite(negative_slope)):
        raise ValueError(f"negative_slope must be a finite number, got {negative_slope!r}")
    if not isinstance(activation_first, bool):
        raise TypeError(f"activation_first must be a bool, got {activation_first!r}")


def group_norm_act_unsupported_reasons(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None
                                       ) -> list[str]:
    """Why the fused kernels cannot take this (already validated) case; empty when they can."""
    reasons = utils.base_reasons(x)
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and p.dtype not in utils.FUSED_DTYPES:
            reasons.append(f"{name} dtype={p.dtype} (fused: float32, float16, bfloat16)")
    if x.shape[0] > utils.MAX_GRID_YZ:
        reasons.append(f"batch above {utils.MAX_GRID_YZ}")
    if x.dim() > 1 and x.shape[1] > 4 * utils.MAX_GRID_YZ:  # NCDHW tiles take 4 channels, one grid row each
        reasons.append(f"channels above {4 * utils.MAX_GRID_YZ}")
    if x.numel() == 0:
        reasons.append("x has no elements")
    return reasons


def _new_output(x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    return utils.empty(x.shape, dtype=dtype or x.dtype, device=x.device, memory_format=utils.layout_of(x))


def _params(weight: Tensor | None, bias: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """The affine parameters as the kernels read them: unit stride (C values each)."""
    return tuple(p.contiguous() if p is not None else None for p in (weight, bias))


def _stat_rows(mean: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    """The statistics as the kernels read them: rows of G values at a stride of G."""
    return mean.contiguous(), rstd.contiguous()


def _needs(output_mask, weight, bias) -> tuple[bool, bool, bool]:
    return output_mask[0], output_mask[1] and weight is not None, output_mask[2] and bias is not None


def _stats(x: Tensor, groups: int, batch_stats: bool) -> tuple[Tensor, Tensor]:
    return tuple(x.new_empty((1 if batch_stats else x.shape[0], groups), dtype=torch.float32) for _ in range(2))


def _spans_batch(x: Tensor, mean: Tensor) -> bool:
    """Whether statistics (1, G) were taken over x's whole batch (the same thing for a batch of one)."""
    return mean.shape[0] != x.shape[0]


# ------------------------------------------------------------------------------------------------------
# torch.library ops


@utils.eager_op("fastseg3d::group_norm_act")
def _group_norm_act_op(x: Tensor, weight: Tensor | None, bias: Tensor | None, groups: int, eps: float,
                       activation: str, negative_slope: float, out_dtype: torch.dtype, activation_first: bool,
                       batch_stats: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(y in ``out_dtype`` and x's layout, mean, rstd): the statistics fp32 (B, groups), (1, groups) with
    ``batch_stats``."""
    if x.device.type == "meta":
        return (_new_output(x, out_dtype), *_stats(x, groups, batch_stats))
    if not utils.launchable(x.device):
        y, mean, rstd = group_norm_act_fused_ref(x, weight, bias, groups, eps, _act(activation), negative_slope,
                                                 out_dtype, activation_first, batch_stats)
        return y.contiguous(memory_format=utils.layout_of(x)), mean.float(), rstd.float()
    with utils.launch_device(x):
        return _group_norm_act_launch(x, weight, bias, groups, eps, activation, negative_slope, out_dtype,
                                      activation_first, batch_stats)


@utils.launches("fastseg3d::group_norm_act")
def _group_norm_act_launch(x, weight, bias, groups, eps, activation, negative_slope, out_dtype, activation_first,
                           batch_stats):
    from fastseg3d.kernels.group_norm_act import ACT_IDS, group_norm_act_apply, group_norm_act_stats

    act_id = ACT_IDS[_act(activation)]
    mean, rstd = group_norm_act_stats(x, groups, eps, act_id, negative_slope, activation_first, batch_stats,
                                      empty=utils.empty)
    y = group_norm_act_apply(x, *_params(weight, bias), mean, rstd, act_id, negative_slope,
                             _new_output(x, out_dtype), activation_first)
    return y, mean, rstd


@utils.eager_op("fastseg3d::group_norm_act_apply")
def _group_norm_act_apply_op(x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, rstd: Tensor,
                             activation: str, negative_slope: float, out_dtype: torch.dtype, activation_first: bool
                             ) -> Tensor:
    """The forward's output again from given statistics, in ``out_dtype`` and x's layout (no autograd)."""
    if x.device.type == "meta":
        return _new_output(x, out_dtype)
    if not utils.launchable(x.device):
        y = group_norm_act_apply_ref(x, weight, bias, mean, rstd, _act(activation), negative_slope, out_dtype,
                                     activation_first)
        return y.contiguous(memory_format=utils.layout_of(x))
    with utils.launch_device(x):
        return _group_norm_act_apply_launch(x, weight, bias, mean, rstd, activation, negative_slope, out_dtype,
                                            activation_first)


@utils.launches("fastseg3d::group_norm_act_apply")
def _group_norm_act_apply_launch(x, weight, bias, mean, rstd, activation, negative_slope, out_dtype,
                                 activation_first):
    from fastseg3d.kernels.group_norm_act import ACT_IDS, group_norm_act_apply

    return group_norm_act_apply(x, *_params(weight, bias), *_stat_rows(mean, rstd), ACT_IDS[_act(activation)],
                                negative_slope, _new_output(x, out_dtype), activation_first)


@utils.eager_op("fastseg3d::group_norm_act_backward")
def _group_norm_act_backward_op(grad: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor,
                                rstd: Tensor, eps: float, activation: str, negative_slope: float,
                                output_mask: list[bool], activation_first: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias) in the dtypes of x and the parameters; an output not asked for in ``output_mask`` (or
    of an absent parameter) is an empty (0,) tensor. ``grad`` has x's shape and layout."""
    need_dx, need_dw, need_db = _needs(output_mask, weight, bias)
    none = x.new_empty((0,))
    if x.device.type == "meta":
        return (_new_output(x) if need_dx else none, torch.empty_like(weight) if need_dw else x.new_empty((0,)),
                torch.empty_like(bias) if need_db else x.new_empty((0,)))
    if not utils.launchable(x.device):
        dx, dw, db = group_norm_act_backward_ref(grad, x, weight, bias, mean.shape[1], eps, _act(activation),
                                                 [need_dx, need_dw, need_db], negative_slope, activation_first,
                                                 _spans_batch(x, mean))
        return (dx.contiguous(memory_format=utils.layout_of(x)) if need_dx else none,
                dw if need_dw else x.new_empty((0,)), db if need_db else x.new_empty((0,)))
    with utils.launch_device(x):
        return _group_norm_act_backward_launch(grad, x, weight, bias, mean, rstd, eps, activation, negative_slope,
                                               output_mask, activation_first)


@utils.launches("fastseg3d::group_norm_act_backward")
def _group_norm_act_backward_launch(grad, x, weight, bias, mean, rstd, eps, activation, negative_slope,
                                    output_mask, activation_first):
    from fastseg3d.kernels.group_norm_act import ACT_IDS, group_norm_act_bwd

    need_dx, need_dw, need_db = _needs(output_mask, weight, bias)
    dx, dw, db = group_norm_act_bwd(grad.contiguous(memory_format=utils.layout_of(x)), x, *_params(weight, bias),
                                    *_stat_rows(mean, rstd), ACT_IDS[_act(activation)], negative_slope, need_dx,
                                    activation_first, empty=utils.empty)
    return (dx if need_dx else x.new_empty((0,)), dw.to(weight.dtype) if need_dw else x.new_empty((0,)),
            db.to(bias.dtype) if need_db else x.new_empty((0,)))


@utils.eager_op("fastseg3d::group_norm_act_running_stats", mutates_args=("running_mean", "running_var"))
def _running_stats_op(running_mean: Tensor, running_var: Tensor, mean: Tensor, rstd: Tensor, eps: float,
                      momentum: float, count: int) -> None:
    """A training BatchNorm's running statistics (C,) updated in place from batch statistics (C,) (no autograd)."""
    if running_mean.device.type == "meta":
        return
    if not (utils.launchable(running_mean.device) and running_mean.is_contiguous() and running_var.is_contiguous()
            and running_mean.dtype in utils.FUSED_DTYPES and running_var.dtype in utils.FUSED_DTYPES):
        group_norm_act_running_stats_ref(running_mean, running_var, mean, rstd, eps, momentum, count)
        return
    with utils.launch_device(running_mean):
        _running_stats_launch(running_mean, running_var, mean, rstd, eps, momentum, count)


@utils.launches("fastseg3d::group_norm_act_running_stats")
def _running_stats_launch(running_mean, running_var, mean, rstd, eps, momentum, count):
    from fastseg3d.kernels.group_norm_act import group_norm_act_running_stats

    group_norm_act_running_stats(running_mean, running_var, mean.contiguous(), rstd.contiguous(), eps, momentum,
                                 count)


def _setup_context(ctx, inputs, output):
    x, weight, bias, groups, eps, activation, negative_slope, out_dtype, activation_first, _batch_stats = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)
    ctx.eps, ctx.activation, ctx.negative_slope, ctx.activation_first = eps, activation, negative_slope, \
        activation_first
    utils.no_zero_grads(ctx)


def _backward(ctx, grad, grad_mean, grad_rstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    mask = list(ctx.needs_input_grad[:3])
    if grad is None or not any(mask):
        return (None,) * 10
    dx, dw, db = _group_norm_act_backward_op(grad, x, weight, bias, mean, rstd, ctx.eps, ctx.activation,
                                             ctx.negative_slope, mask, ctx.activation_first)
    return (dx if mask[0] else None, dw if mask[1] and weight is not None else None,
            db if mask[2] and bias is not None else None, None, None, None, None, None, None, None)


_group_norm_act_op.register_autograd(_backward, setup_context=_setup_context)


def group_norm_act_fused(x: Tensor, weight: Tensor | None, bias: Tensor | None, groups: int, eps: float,
                         activation: str | None, negative_slope: float = 0.01, out_dtype: torch.dtype | None = None,
                         activation_first: bool = False, batch_stats: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """The fused forward on an already validated and selected case, ``x`` contiguous in its layout: (y in
    ``out_dtype``, default x's, mean, rstd); with ``batch_stats`` the statistics span the batch (BatchNorm's in
    training, with ``groups`` equal to C)."""
    return _group_norm_act_op(x, weight, bias, int(groups), float(eps), _ACT_NAMES[activation],
                              float(negative_slope), out_dtype or x.dtype, bool(activation_first), bool(batch_stats))


def group_norm_act_recompute(x, weight, bias, mean, rstd, activation: str | None, negative_slope: float = 0.01,
                             out_dtype: torch.dtype | None = None, activation_first: bool = False) -> Tensor:
    """:func:`group_norm_act_fused`'s output again from its statistics ((B, G), or (1, G) over the batch)."""
    return _group_norm_act_apply_op(x, weight, bias, mean, rstd, _ACT_NAMES[activation], float(negative_slope),
                                    out_dtype or x.dtype, bool(activation_first))


def group_norm_act_backward(grad, x, weight, bias, mean, rstd, eps: float, activation: str | None, output_mask,
                            negative_slope: float = 0.01, activation_first: bool = False):
    """(dx, dweight, dbias) of :func:`group_norm_act_fused` (None where not asked for or absent)."""
    dx, dw, db = _group_norm_act_backward_op(grad, x, weight, bias, mean, rstd, float(eps), _ACT_NAMES[activation],
                                             float(negative_slope), list(output_mask), bool(activation_first))
    return (dx if output_mask[0] else None, dw if output_mask[1] and weight is not None else None,
            db if output_mask[2] and bias is not None else None)


def group_norm_act_running_stats(running_mean: Tensor, running_var: Tensor, mean: Tensor, rstd: Tensor, eps: float,
                                 momentum: float, count: int) -> None:
    """A training BatchNorm's running statistics updated in place as ``native_batch_norm`` updates them (the
    unbiased variance), from :func:`group_norm_act_fused`'s statistics over the batch (``batch_stats``, (1, C)),
    taken over ``count`` values a channel: one launch where the fused kernels run."""
    _running_stats_op(running_mean, running_var, mean.reshape(-1), rstd.reshape(-1), float(eps), float(momentum),
                      int(count))


# ------------------------------------------------------------------------------------------------------
# Public function


def group_norm_act(
    x: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    activation: str | None = None,
    negative_slope: float = 0.01,
    activation_first: bool = False,
) -> Tensor:
    """GroupNorm followed by an activation, ``activation(F.group_norm(x, num_groups, weight, bias, eps))``, or
    preceded by it, ``F.group_norm(activation(x), ...)`` with ``activation_first``.

    Args:
        x: (B, C, D, H, W), NCDHW-contiguous or ``channels_last_3d`` (the output keeps the layout).
        num_groups: groups, dividing C.
        weight, bias: (C,) affine parameters or None, in any floating dtype (fp32 master weights with a bf16 x).
        eps: added to the variance.
        activation: None, "relu", "leaky_relu" (with ``negative_slope``), "gelu" (erf), "gelu_tanh" or "silu".
        negative_slope: LeakyReLU's slope for negative inputs.
        activation_first: apply the activation to the norm's input instead of its output (MobileUtr's GELU ->
            InstanceNorm); the activated input is recomputed where it is read, never written.

    With ``num_groups`` equal to C this is an affine InstanceNorm (``nn.InstanceNorm3d(C, affine=True)``) followed by
    the activation.

    The statistics and the normalisation are computed in fp32 and the output is written once, in x's dtype: for
    fp16 and bf16 inputs these are the values CUDA autocast's fp32 GroupNorm gives, rounded to x's dtype (the
    dtype the conv after the norm reads under autocast), without autocast's fp32 copies. fp32, fp16 and bf16 are
    fused on CUDA (forward and backward, deterministic: per-program partial sums reduced in a fixed order); other
    cases run the reference under the ``auto`` backend.

    Example:
        >>> import torch, fastseg3d
        >>> x = torch.randn(2, 16, 4, 6, 5)
        >>> norm = torch.nn.GroupNorm(8, 16)
        >>> y = fastseg3d.ops.group_norm_act(x, 8, norm.weight, norm.bias, activation="relu")
        >>> torch.allclose(y, torch.relu(norm(x)), atol=1e-6)
        True
    """
    _validate(x, num_groups, weight, bias, eps, activation, negative_slope, activation_first)
    if backends.select("group_norm_act", group_norm_act_unsupported_reasons(x, weight, bias), x.device):
        x = x.contiguous(memory_format=utils.layout_of(x))
        return group_norm_act_fused(x, weight, bias, num_groups, eps, activation, negative_slope,
                                    activation_first=activation_first)[0]
    y = group_norm_act_ref(x, num_groups, weight, bias, eps, activation, negative_slope, activation_first)
    return y.contiguous(memory_format=utils.layout_of(x))
