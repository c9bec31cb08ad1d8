"""Fused LayerNorm over the last axis, written once in the dtype of the layer that reads it.

Under autocast ``F.layer_norm`` computes in fp32 and returns fp32, and the Linear after it (SegFormer3D's query and
Mix-FFN projections, its spatial reduction's key/value projection, its decoder's fuse projection) casts it to bf16:
6 bytes written an element where this writes 2, and in backward an fp32 copy of the bf16 gradient before
LayerNorm's backward, which this reads as it is.

The Triton kernels are in ``fastseg3d.kernels.layer_norm``, the reference in ``fastseg3d.reference.layer_norm``. Two
``torch.library`` ops carry them: ``fastseg3d::layer_norm`` (with autograd; returns the output and the per-row mean
and rstd) and ``fastseg3d::layer_norm_backward``.
"""

from __future__ import annotations


import torch
from torch import Tensor

from fastseg3d import backends
from fastseg3d.ops import utils
from fastseg3d.reference.layer_norm import layer_norm_backward_ref, layer_norm_fused_ref, layer_norm_ref

__all__ = ["fused_layer_norm", "layer_norm", "layer_norm_unsupported_reasons"]

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
        return (x.new_empty(x.shape) if need_dx else none, torch.empty_like(weight) if need_dw else none,
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


def fused_layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, out_dtype: torch.dtype
                     ) -> Tensor:
    """The fused forward on an already validated and selected case."""
    return _layer_norm_op(x, weight, bias, float(eps), out_dtype)[0]


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
