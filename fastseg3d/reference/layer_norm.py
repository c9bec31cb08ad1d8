"""Reference LayerNorm over the last axis in ATen ops, its output in a requested dtype, and the residual step
``s = x + residual; y = LayerNorm(s)`` of a pre-norm transformer.

fp16 and bf16 inputs are normalised in fp32 (as autocast runs ``F.layer_norm``), and the result is cast once to the
output dtype (the Linear's input dtype under autocast). Math in fp64 for fp64 inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastseg3d.reference._grad_dtype import compute_dtype

__all__ = ["add_layer_norm_backward_ref", "add_layer_norm_fused_ref", "add_layer_norm_ref", "layer_norm_backward_ref",
           "layer_norm_fused_ref", "layer_norm_ref"]


def _cast(t, dtype):
    return t.to(dtype) if t is not None else None


def layer_norm_ref(x, weight=None, bias=None, eps: float = 1e-5, out_dtype: torch.dtype | None = None):
    """``F.layer_norm(x, (C,), weight, bias, eps)`` computed in fp32 (fp64 for fp64), returned in ``out_dtype``
    (default x's), differentiable by autograd."""
    cd = compute_dtype(x)
    y = F.layer_norm(x.to(cd), x.shape[-1:], _cast(weight, cd), _cast(bias, cd), eps)
    return y.to(out_dtype or x.dtype)


def layer_norm_fused_ref(x, weight, bias, eps: float, out_dtype: torch.dtype):
    """What the fused forward returns, without autograd: (y in ``out_dtype``, mean, rstd), the statistics
    (M,) over the flattened leading axes, fp32 (fp64 for fp64 inputs)."""
    cd = compute_dtype(x)
    y, mean, rstd = torch.native_layer_norm(x.to(cd), x.shape[-1:], _cast(weight, cd), _cast(bias, cd), eps)
    return y.to(out_dtype), mean.reshape(-1), rstd.reshape(-1)


def layer_norm_backward_ref(grad, x, weight, bias, eps: float, output_mask):
    """(dx, dweight, dbias) in the dtypes of x and the parameters, from LayerNorm's own kernels; None where
    ``output_mask`` is False (and for an absent parameter)."""
    cd = compute_dtype(x)
    xc = x.to(cd)
    wc, bc = _cast(weight, cd), _cast(bias, cd)
    _, mean, rstd = torch.native_layer_norm(xc, x.shape[-1:], wc, bc, eps)
    need_dw, need_db = output_mask[1] and weight is not None, output_mask[2] and bias is not None
    dx, dw, db = torch.ops.aten.native_layer_norm_backward(grad.to(cd), xc, x.shape[-1:], mean, rstd, wc, bc,
                                                           [output_mask[0], need_dw, need_db])
    return (dx.to(x.dtype) if output_mask[0] else None, dw.to(weight.dtype) if need_dw else None,
            db.to(bias.dtype) if need_db else None)


def add_layer_norm_ref(x, residual, weight=None, bias=None, eps: float = 1e-5, out_dtype: torch.dtype | None = None):
    """``(s, layer_norm_ref(s, ...))`` for ``s = x + residual``, differentiable by autograd."""
    total = x + residual
    return total, layer_norm_ref(total, weight, bias, eps, out_dtype)


def add_layer_norm_fused_ref(x, residual, weight, bias, eps: float, out_dtype: torch.dtype):
    """What the fused residual forward returns, without autograd: (s, y, mean, rstd)."""
    total = x + residual
    return (total, *layer_norm_fused_ref(total, weight, bias, eps, out_dtype))


def add_layer_norm_backward_ref(grad, grad_sum, total, weight, bias, eps: float, x_dtype: torch.dtype,
                                residual_dtype: torch.dtype, output_mask):
    """(dx, dresidual, dweight, dbias) as autograd forms them for the plain add and norm: LayerNorm's input gradient
    in s's dtype, plus ``grad_sum`` (what s receives from elsewhere; None for nothing), cast to each input's dtype;
    None where ``output_mask`` is False (and for an absent parameter)."""
    need_input = output_mask[0] or output_mask[1]
    ds, dw, db = layer_norm_backward_ref(grad, total, weight, bias, eps, [need_input, *output_mask[2:]])
    if need_input and grad_sum is not None:
        ds = ds + grad_sum
    return (ds.to(x_dtype) if output_mask[0] else None, ds.to(residual_dtype) if output_mask[1] else None, dw, db)
