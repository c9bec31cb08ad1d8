"""Fused LayerNorm over the last axis, written once in the dtype of the layer that reads it.

Under autocast ``F.layer_norm`` computes in fp32 and returns fp32, and the Linear after it (SegFormer3D's query and
Mix-FFN projections, its spatial reduction's key/value projection, its decoder's fuse projection) casts it to bf16:
6 bytes written an element where this writes 2, and in backward an fp32 copy of the bf16 gradient before
LayerNorm's backward, which this reads as it is.

``add_layer_norm`` is a pre-norm transformer's residual step, ``s = x + branch`` and ``norm(s)``, in one kernel that
writes both: the plain add writes s and LayerNorm reads it back, and in backward autograd adds the norm's input
gradient to the one s receives from later layers in a kernel of its own and casts the total to the branch's dtype in
another. Here the norm's backward adds that gradient and writes the total in both inputs' dtypes.

The Triton kernels are in ``fastseg3d.kernels.layer_norm``, the reference in ``fastseg3d.reference.layer_norm``. Four
``torch.library`` ops carry them: ``fastseg3d::layer_norm`` (with autograd; returns the output and the per-row mean
and rstd) and ``fastseg3d::layer_norm_backward``; ``fastseg3d::add_layer_norm`` (returns the sum as well) and
``fastseg3d::add_layer_norm_backward``.
"""

from __future__ import annotations


import torch
from torch import Tensor

from fastseg3d import backends
from fastseg3d.ops import utils
from fastseg3d.reference.layer_norm import (
    add_layer_norm_backward_ref,
    add_layer_norm_fused_ref,
    add_layer_norm_ref,
    layer_norm_backward_ref,
    layer_norm_fused_ref,
    layer_norm_ref,
)

__all__ = ["add_layer_norm", "add_layer_norm_unsupported_reasons", "fused_add_layer_norm", "fused_layer_norm",
           "layer_norm", "layer_norm_unsupported_reasons"]

_MAX_C = 4096  # fastseg3d.kernels.layer_norm.MAX_C (that module needs Triton)


def _validate(x, weight, bias, eps, out_dtype) -> None:
    utils.check_tensor(x, "x")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last axis to normalise, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    utils.check_norm_args(x, weight, bias, eps, x.shape[-1], "x's last axis")
    if out_dtype is not None and (not isinstance(out_dtype, torch.dtype) or not out_dtype.is_floating_point):
        raise TypeError(f"out_dtype must be a floating torch.dtype or None, got {out_dtype!r}")


def _validate_residual(x, residual) -> None:
    utils.check_tensor(residual, "residual")
    if tuple(residual.shape) != tuple(x.shape):
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    if not residual.is_floating_point():
        raise TypeError(f"residual must be a floating-point tensor, got {residual.dtype}")
    if residual.device != x.device:
        raise TypeError(f"residual is on {residual.device} but x is on {x.device}; pass tensors on one device")


def layer_norm_unsupported_reasons(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None,
                                   out_dtype: torch.dtype | None = None) -> list[str]:
    """Why the fused kernels cannot take this (already validated) case; empty when it can."""
    reasons = utils.base_reasons(x)
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and p.dtype not in utils.FUSED_DTYPES:
            reasons.append(f"{name} dtype={p.dtype} (fused: float32, float16, bfloat16)")
    if out_dtype is not None and out_dtype not in utils.FUSED_DTYPES:
        reasons.append(f"out_dtype={out_dtype} (fused: float32, float16, bfloat16)")
    if x.shape[-1] > _MAX_C:
        reasons.append(f"last axis of {x.shape[-1]} (fused: up to {_MAX_C})")
    if x.numel() == 0:
        reasons.append("x has no elements")
    return reasons


def _rows(x: Tensor) -> Tensor:
    """x as (M, C) with a unit stride along C: a view where the rows are evenly spaced, else a copy."""
    c = x.shape[-1]
    if x.stride(-1) != 1:
        x = x.contiguous()
    try:
        return x.view(-1, c)
    except RuntimeError:
        return x.reshape(-1, c)


def add_layer_norm_unsupported_reasons(x: Tensor, residual: Tensor, weight: Tensor | None = None,
                                       bias: Tensor | None = None, out_dtype: torch.dtype | None = None) -> list[str]:
    """Why the fused kernels cannot take this (already validated) residual case; empty when it can."""
    reasons = layer_norm_unsupported_reasons(x, weight, bias, out_dtype)
    if residual.dtype not in utils.FUSED_DTYPES:
        reasons.append(f"residual dtype={residual.dtype} (fused: float32, float16, bfloat16)")
    return reasons


# ------------------------------------------------------------------------------------------------------
# torch.library ops


@utils.eager_op("fastseg3d::layer_norm")
def _layer_norm_op(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, out_dtype: torch.dtype
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """(y in ``out_dtype``, contiguous, x's shape; mean, rstd fp32 (M,) over the flattened leading axes)."""
    m = x.numel() // x.shape[-1]
    if x.device.type == "meta":
        return (x.new_empty(x.shape, dtype=out_dtype), x.new_empty((m,), dtype=torch.float32),
                x.new_empty((m,), dtype=torch.float32))
    if not utils.launchable(x.device):
        y, mean, rstd = layer_norm_fused_ref(x, weight, bias, eps, out_dtype)
        return y.contiguous(), mean.float(), rstd.float()
    with utils.launch_device(x):
        return _layer_norm_launch(x, weight, bias, eps, out_dtype)


@utils.launches("fastseg3d::layer_norm")
def _layer_norm_launch(x, weight, bias, eps, out_dtype):
    from fastseg3d.kernels.layer_norm import layer_norm_fwd

    x2d = _rows(x)
    m = x2d.shape[0]
    y = utils.empty(x.shape, dtype=out_dtype, device=x.device)
    mean = utils.empty((m,), dtype=torch.float32, device=x.device)
    rstd = utils.empty((m,), dtype=torch.float32, device=x.device)
    layer_norm_fwd(x2d, *_params(weight, bias), eps, y, mean, rstd)
    return y, mean, rstd


def _params(weight: Tensor | None, bias: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    return tuple(p.contiguous() if p is not None else None for p in (weight, bias))


@utils.eager_op("fastseg3d::layer_norm_backward")
def _layer_norm_backward_op(grad: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor,
                            rstd: Tensor, eps: float, output_mask: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    """(dx contiguous in x's dtype, dweight, dbias in the parameters' dtypes); an output not asked for (or of an
    absent parameter) is an empty (0,) tensor."""
    need_dx = output_mask[0]
    need_dw, need_db = output_mask[1] and weight is not None, output_mask[2] and bias is not None
    none = x.new_empty((0,))
    if x.device.type == "meta":
        return (x.new_empty(x.shape) if need_dx else none, torch.empty_like(weight) if need_dw else x.new_empty((0,)),
                torch.empty_like(bias) if need_db else x.new_empty((0,)))
    if not utils.launchable(x.device):
        dx, dw, db = layer_norm_backward_ref(grad, x, weight, bias, eps, [need_dx, need_dw, need_db])
        return (dx.contiguous() if need_dx else none, dw if need_dw else x.new_empty((0,)),
                db if need_db else x.new_empty((0,)))
    with utils.launch_device(x):
        return _layer_norm_backward_launch(grad, x, weight, bias, mean, rstd, eps, output_mask)


@utils.launches("fastseg3d::layer_norm_backward")
def _layer_norm_backward_launch(grad, x, weight, bias, mean, rstd, eps, output_mask):
    from fastseg3d.kernels.layer_norm import layer_norm_bwd

    need_dx = output_mask[0]
    need_dw, need_db = output_mask[1] and weight is not None, output_mask[2] and bias is not None
    x2d = _rows(x)
    dx = utils.empty(x.shape, dtype=x.dtype, device=x.device) if need_dx else None
    dw, db = layer_norm_bwd(grad.contiguous().view(-1, x.shape[-1]), x2d, _params(weight, bias)[0], mean, rstd,
                            dx.view(-1, x.shape[-1]) if need_dx else None, empty=utils.empty)
    return (dx if need_dx else x.new_empty((0,)), dw.to(weight.dtype) if need_dw else x.new_empty((0,)),
            db.to(bias.dtype) if need_db else x.new_empty((0,)))


def _setup_context(ctx, inputs, output):
    x, weight, bias, eps, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)
    ctx.eps = eps
    utils.no_zero_grads(ctx)


def _backward(ctx, grad, grad_mean, grad_rstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    mask = list(ctx.needs_input_grad[:3])
    if grad is None or not any(mask):
        return None, None, None, None, None
    dx, dw, db = _layer_norm_backward_op(grad, x, weight, bias, mean, rstd, ctx.eps, mask)
    return (dx if mask[0] else None, dw if mask[1] and weight is not None else None,
            db if mask[2] and bias is not None else None, None, None)


_layer_norm_op.register_autograd(_backward, setup_context=_setup_context)


@utils.eager_op("fastseg3d::add_layer_norm")
def _add_layer_norm_op(x: Tensor, residual: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
                       out_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(s = x + residual in their promoted dtype, y = LayerNorm(s) in ``out_dtype``, both contiguous in x's shape;
    mean, rstd fp32 (M,) over the flattened leading axes)."""
    m = x.numel() // x.shape[-1]
    sum_dtype = torch.promote_types(x.dtype, residual.dtype)
    if x.device.type == "meta":
        return (x.new_empty(x.shape, dtype=sum_dtype), x.new_empty(x.shape, dtype=out_dtype),
                x.new_empty((m,), dtype=torch.float32), x.new_empty((m,), dtype=torch.float32))
    if not utils.launchable(x.device):
        total, y, mean, rstd = add_layer_norm_fused_ref(x, residual, weight, bias, eps, out_dtype)
        return total.contiguous(), y.contiguous(), mean.float(), rstd.float()
    with utils.launch_device(x):
        return _add_layer_norm_launch(x, residual, weight, bias, eps, out_dtype)


@utils.launches("fastseg3d::add_layer_norm")
def _add_layer_norm_launch(x, residual, weight, bias, eps, out_dtype):
    from fastseg3d.kernels.layer_norm import layer_norm_fwd

    x2d = _rows(x)
    m = x2d.shape[0]
    total = utils.empty(x.shape, dtype=torch.promote_types(x.dtype, residual.dtype), device=x.device)
    y = utils.empty(x.shape, dtype=out_dtype, device=x.device)
    mean = utils.empty((m,), dtype=torch.float32, device=x.device)
    rstd = utils.empty((m,), dtype=torch.float32, device=x.device)
    layer_norm_fwd(x2d, *_params(weight, bias), eps, y, mean, rstd, residual2d=_rows(residual), s=total)
    return total, y, mean, rstd


@utils.eager_op("fastseg3d::add_layer_norm_backward")
def _add_layer_norm_backward_op(grad: Tensor, grad_sum: Tensor | None, total: Tensor, weight: Tensor | None,
                                bias: Tensor | None, mean: Tensor, rstd: Tensor, eps: float, x_dtype: torch.dtype,
                                residual_dtype: torch.dtype, output_mask: list[bool]
                                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx in ``x_dtype``, dresidual in ``residual_dtype``, both contiguous and both the gradient of the sum
    ``total``: LayerNorm's input gradient plus ``grad_sum``, what the sum receives from elsewhere; dweight, dbias in
    the parameters' dtypes). An output not asked for (or of an absent parameter) is an empty (0,) tensor."""
    need_dx, need_dr = output_mask[0], output_mask[1]
    need_dw, need_db = output_mask[2] and weight is not None, output_mask[3] and bias is not None
    none = total.new_empty((0,))
    if total.device.type == "meta":
        return (total.new_empty(total.shape, dtype=x_dtype) if need_dx else none,
                total.new_empty(total.shape, dtype=residual_dtype) if need_dr else total.new_empty((0,)),
                torch.empty_like(weight) if need_dw else total.new_empty((0,)),
                torch.empty_like(bias) if need_db else total.new_empty((0,)))
    if not utils.launchable(total.device):
        dx, dr, dw, db = add_layer_norm_backward_ref(grad, grad_sum, total, weight, bias, eps, x_dtype,
                                                     residual_dtype, [need_dx, need_dr, need_dw, need_db])
        if dr is not None and dr is dx:  # op outputs may not alias each other
            dr = dr.clone()
        return tuple(t.contiguous() if t is not None else total.new_empty((0,)) for t in (dx, dr, dw, db))
    with utils.launch_device(total):
        return _add_layer_norm_backward_launch(grad, grad_sum, total, weight, bias, mean, rstd, eps, x_dtype,
                                               residual_dtype, output_mask)


@utils.launches("fastseg3d::add_layer_norm_backward")
def _add_layer_norm_backward_launch(grad, grad_sum, total, weight, bias, mean, rstd, eps, x_dtype, residual_dtype,
                                    output_mask):
    from fastseg3d.kernels.layer_norm import layer_norm_bwd

    need_dx, need_dr = output_mask[0], output_mask[1]
    need_dw, need_db = output_mask[2] and weight is not None, output_mask[3] and bias is not None
    c = total.shape[-1]
    dx = utils.empty(total.shape, dtype=x_dtype, device=total.device) if need_dx else None
    dr = utils.empty(total.shape, dtype=residual_dtype, device=total.device) if need_dr else None
    dw, db = layer_norm_bwd(grad.contiguous().view(-1, c), _rows(total), _params(weight, bias)[0], mean, rstd,
                            dx.view(-1, c) if need_dx else None, empty=utils.empty,
                            ds=grad_sum.contiguous().view(-1, c) if grad_sum is not None else None,
                            dr=dr.view(-1, c) if need_dr else None)
    return (dx if need_dx else total.new_empty((0,)), dr if need_dr else total.new_empty((0,)),
            dw.to(weight.dtype) if need_dw else total.new_empty((0,)),
            db.to(bias.dtype) if need_db else total.new_empty((0,)))


def _add_setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps, _ = inputs
    total, _, mean, rstd = output
    ctx.save_for_backward(total, weight, bias, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)
    ctx.eps = eps
    ctx.dtypes = (x.dtype, residual.dtype)
    utils.no_zero_grads(ctx)


def _add_backward(ctx, grad_sum, grad, grad_mean, grad_rstd):
    total, weight, bias, mean, rstd = ctx.saved_tensors
    mask = list(ctx.needs_input_grad[:4])
    if not any(mask) or (grad is None and grad_sum is None):
        return None, None, None, None, None, None
    if grad is None:  # only the sum is used: its gradient passes to both inputs, as through an add
        return (grad_sum.to(ctx.dtypes[0]) if mask[0] else None, grad_sum.to(ctx.dtypes[1]) if mask[1] else None,
                None, None, None, None)
    shared = ctx.dtypes[0] == ctx.dtypes[1]  # then one gradient serves both inputs, as an add passes it on
    op_mask = [mask[0] or mask[1], False, *mask[2:]] if shared else mask
    dx, dr, dw, db = _add_layer_norm_backward_op(grad, grad_sum, total, weight, bias, mean, rstd, ctx.eps,
                                                 *ctx.dtypes, op_mask)
    if shared:
        dr = dx
    return (dx if mask[0] else None, dr if mask[1] else None, dw if mask[2] and weight is not None else None,
            db if mask[3] and bias is not None else None, None, None)


_add_layer_norm_op.register_autograd(_add_backward, setup_context=_add_setup_context)


def fused_layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, out_dtype: torch.dtype
                     ) -> Tensor:
    """The fused forward on an already validated and selected case."""
    return _layer_norm_op(x, weight, bias, float(eps), out_dtype)[0]


def fused_add_layer_norm(x: Tensor, residual: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
                         out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The fused residual step on an already validated and selected case: (sum, normalised sum)."""
    return _add_layer_norm_op(x, residual, weight, bias, float(eps), out_dtype)[:2]


# ------------------------------------------------------------------------------------------------------
# Public function


def layer_norm(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5,
               out_dtype: torch.dtype | None = None) -> Tensor:
    """LayerNorm over the last axis, ``F.layer_norm(x, x.shape[-1:], weight, bias, eps)``, written in ``out_dtype``.

    Args:
        x: (..., C), any strides (rows are read in place where the last axis has unit stride).
        weight, bias: (C,) or None, in any floating dtype (fp32 master weights with a bf16 x).
        eps: added to the variance.
        out_dtype: the output's dtype; default x's. Pass the autocast dtype where a Linear reads the output
            under autocast: the values are then those of autocast's fp32 LayerNorm cast by the Linear, written once.

    Statistics and normalisation in fp32; the input gradient in x's dtype, the parameters' in theirs. fp32, fp16
    and bf16 with C up to 4096 are fused on CUDA (forward and backward, deterministic: per-program partial sums of
    the parameter gradients reduced in a fixed order); other cases run the reference under the ``auto`` backend.
    The output is contiguous.

    Example:
        >>> import torch, fastseg3d
        >>> x = torch.randn(2, 10, 32)
        >>> norm = torch.nn.LayerNorm(32)
        >>> y = fastseg3d.ops.layer_norm(x, norm.weight, norm.bias)
        >>> torch.allclose(y, norm(x), atol=1e-6)
        True
    """
    _validate(x, weight, bias, eps, out_dtype)
    out_dtype = out_dtype or x.dtype
    if backends.select("layer_norm", layer_norm_unsupported_reasons(x, weight, bias, out_dtype), x.device):
        return fused_layer_norm(x, weight, bias, eps, out_dtype)
    return layer_norm_ref(x, weight, bias, eps, out_dtype).contiguous()


def add_layer_norm(x: Tensor, residual: Tensor, weight: Tensor | None = None, bias: Tensor | None = None,
                   eps: float = 1e-5, out_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """A pre-norm residual step: ``s = x + residual`` and ``F.layer_norm(s, s.shape[-1:], weight, bias, eps)``
    written in ``out_dtype``, in one pass. Returns ``(s, y)``.

    Args:
        x: (..., C), the residual stream (fp32 under autocast), any strides (rows read in place where the last axis
            has unit stride).
        residual: x's shape, the branch to add (a Linear's bf16 output under autocast), any floating dtype.
        weight, bias: (C,) or None, in any floating dtype.
        eps: added to the variance.
        out_dtype: y's dtype; default s's. Pass the autocast dtype where a Linear reads y under autocast.

    s takes the dtype ``x + residual`` has (their promoted dtype) and is normalised as rounded to it. In backward
    the gradient s receives from later layers and LayerNorm's input gradient are summed in fp32 and written once in
    x's dtype and once in the residual's (the plain composition writes the sum and then casts it for the branch).
    Fused on CUDA where :func:`layer_norm` is; other cases run the reference under the ``auto`` backend. Both
    outputs are contiguous.

    Example:
        >>> import torch, fastseg3d
        >>> x, branch = torch.randn(2, 10, 32), torch.randn(2, 10, 32)
        >>> norm = torch.nn.LayerNorm(32)
        >>> s, y = fastseg3d.ops.add_layer_norm(x, branch, norm.weight, norm.bias)
        >>> torch.equal(s, x + branch) and torch.allclose(y, norm(x + branch), atol=1e-6)
        True
    """
    _validate(x, weight, bias, eps, out_dtype)
    _validate_residual(x, residual)
    out_dtype = out_dtype or torch.promote_types(x.dtype, residual.dtype)
    reasons = add_layer_norm_unsupported_reasons(x, residual, weight, bias, out_dtype)
    if backends.select("add_layer_norm", reasons, x.device):
        return fused_add_layer_norm(x, residual, weight, bias, eps, out_dtype)
    total, y = add_layer_norm_ref(x, residual, weight, bias, eps, out_dtype)
    return total.contiguous(), y.contiguous()
