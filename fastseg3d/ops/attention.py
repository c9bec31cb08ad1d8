"""Flash-style attention for spatial-reduction attention: queries (B, N, H, d), keys/values (B, M, H, d), N != M.

The Triton kernels are in ``fastseg3d.kernels.attention``, the references in ``fastseg3d.reference.attention``.
``fastseg3d::attention`` returns the output and the per-row log-sum-exp; ``fastseg3d::attention_backward``
recomputes the probabilities; eager calls skip the dispatcher (:class:`fastseg3d.ops.utils.EagerOp`). Memory is
O(N d): no N x M tensor is allocated on the fused path.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from fastseg3d import backends
from fastseg3d.ops import utils
from fastseg3d.reference.attention import attention_backward_ref, attention_forward_ref, attention_ref

__all__ = ["attention", "attention_unsupported_reasons"]  # the checks and head dims serve fastseg3d.nn

FUSED_HEAD_DIMS = (16, 32, 64, 128)


def _validate(q, k, v, scale) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, tokens, heads, head_dim), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if q.shape[-1] == 0:
        raise ValueError(f"q, k and v need a head_dim >= 1, got shape {tuple(q.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch, heads and head_dim (B, *, H, d)"
        )
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; pass tensors of one dtype")
        if t.device != q.device:
            raise TypeError(f"{name} is on {t.device} but q is on {q.device}; pass tensors on one device")
    check_scale(scale)


def check_scale(scale) -> None:
    """``TypeError``/``ValueError`` unless ``scale`` is None or a positive finite real number (the forward kernel
    takes each row's maximum of the scaled logits from the unscaled ones)."""
    if scale is not None and (not isinstance(scale, numbers.Real) or isinstance(scale, bool)):
        raise TypeError(f"scale must be a Python or NumPy real number or None, got {type(scale).__name__}")
    if scale is not None and (not utils.finite(scale) or scale <= 0):
        raise ValueError(f"scale must be a positive finite number or None, got {scale!r}")


def check_dropout(name: str, rate) -> None:
    """``TypeError``/``ValueError`` naming ``name`` unless ``rate`` is a real number in [0, 1)."""
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real):
        raise TypeError(f"{name} must be a Python or NumPy real number, got {type(rate).__name__}")
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {rate!r}")


def attention_unsupported_reasons(q: Tensor, k: Tensor, v: Tensor) -> list[str]:
    """Why the fused kernel cannot take this (already validated) case; empty when it can."""
    reasons = utils.base_reasons(q)
    if q.shape[-1] not in FUSED_HEAD_DIMS:
        reasons.append(f"head_dim={q.shape[-1]} (fused: {', '.join(map(str, FUSED_HEAD_DIMS))})")
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        reasons.append("head_dim is not the unit-stride axis of q, k and v")
    if 0 in (q.shape[0], q.shape[1], q.shape[2], k.shape[1]):
        reasons.append("no tokens or no heads")
    if q.shape[0] * q.shape[2] > utils.MAX_GRID_YZ:
        reasons.append(f"batch x heads above {utils.MAX_GRID_YZ}")
    return reasons


@utils.eager_op("fastseg3d::attention")
def _attention_op(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    b, n, h, d = q.shape
    if q.device.type == "meta":
        return (utils.empty((b, n, h, d), dtype=q.dtype, device=q.device),
                utils.empty((b, h, n), dtype=torch.float32, device=q.device))
    if not utils.launchable(q.device):
        return attention_forward_ref(q, k, v, scale)
    with utils.launch_device(q):
        return _attention_launch(q, k, v, scale)


@utils.launches("fastseg3d::attention")
def _attention_launch(q, k, v, scale):
    from fastseg3d.kernels.attention import attention_fwd

    b, n, h, d = q.shape
    out = utils.empty((b, n, h, d), dtype=q.dtype, device=q.device)
    lse = utils.empty((b, h, n), dtype=torch.float32, device=q.device)
    attention_fwd(q, k, v, scale, out, lse)
    return out, lse


@utils.eager_op("fastseg3d::attention_backward")
def _attention_backward_op(
    grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    if q.device.type == "meta":
        return tuple(utils.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    if not utils.launchable(q.device):
        return attention_backward_ref(grad, q, k, v, out, lse, scale)
    with utils.launch_device(q):
        return _attention_backward_launch(grad, q, k, v, out, lse, scale)


@utils.launches("fastseg3d::attention_backward")
def _attention_backward_launch(grad, q, k, v, out, lse, scale):
    from fastseg3d.kernels.attention import attention_bwd

    dq, dk, dv = (utils.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    if grad.stride(-1) != 1:  # e.g. the stride-0 gradient of a sum
        grad = grad.contiguous()
    attention_bwd(grad, q, k, v, out, lse, scale, dq, dk, dv, empty=utils.empty)
    return dq, dk, dv


def _setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale
    utils.no_zero_grads(ctx)


def _backward(ctx, grad_out, grad_lse):
    if grad_out is None:
        return None, None, None, None
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _attention_backward_op(grad_out, q, k, v, out, lse, ctx.scale)
    return dq, dk, dv, None


_attention_op.register_autograd(_backward, setup_context=_setup_context)


def attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None, dropout_p: float = 0.0) -> Tensor:
    """Non-causal softmax attention ``softmax(q k^T * scale) v`` with N queries and M keys (N != M allowed).

    Args:
        q: (B, N, H, d) queries, e.g. ``query(x).view(B, N, H, d)``; any strides with a unit stride on d.
        k: (B, M, H, d) keys, e.g. ``k, v = kv.unbind(2)`` of ``kv = key_value(x_).view(B, M, 2, H, d)`` (views,
            read in place; unbind's backward stacks dk and dv into kv's gradient in one kernel, where two selects
            zero-fill two kv-sized buffers).
        v: (B, M, H, d) values.
        scale: the logit scale; default ``d ** -0.5``.
        dropout_p: dropout on the probabilities, as in ``F.scaled_dot_product_attention`` (pass 0 in eval); the
            fused kernel has none, so a rate above 0 runs the reference (logged once under ``auto``, an error
            under the ``triton`` backend).

    Returns:
        (B, N, H, d), contiguous, so ``.reshape(B, N, H * d)`` is free.

    Head dims 16, 32, 64 and 128 in fp32 (TF32 only where PyTorch allows it for matmuls:
    ``torch.backends.cuda.matmul.fp32_precision``, or the legacy ``allow_tf32``),
    fp16 and bf16 are fused; other cases run the reference (``F.scaled_dot_product_attention``) under ``auto``.

    Any positive scale is taken, but the fused backward recomputes the probabilities from the fp32 log-sum-exp the
    forward saves, as flash-style kernels do, so the gradients' relative error grows with the largest logit's
    magnitude, about ``|logit| * 2**-24`` (1e-5 at logits of 200, where PyTorch's fp32 softmax stays near
    2**-24); logits above about 1e8 make them overflow. The forward is exact to fp32 rounding at any scale.

    Example:
        >>> import torch, fastseg3d
        >>> q = torch.randn(2, 37, 2, 32)
        >>> kv = torch.randn(2, 11, 2 * 2 * 32).view(2, 11, 2, 2, 32)
        >>> fastseg3d.ops.attention(q, *kv.unbind(2)).shape
        torch.Size([2, 37, 2, 32])
    """
    if all(isinstance(t, Tensor) for t in (q, k, v)):  # cast first: autocast takes mixed dtypes, as SDPA does
        q, k, v = utils.autocast_inputs(q.device.type, q, k, v)
    _validate(q, k, v, scale)
    check_dropout("dropout_p", dropout_p)
    scale = float(scale) if scale is not None else q.shape[-1] ** -0.5
    reasons = attention_unsupported_reasons(q, k, v)
    if dropout_p > 0:
        reasons.append(f"dropout_p={dropout_p} (the fused kernel has no dropout)")
    if backends.select("attention", reasons, q.device):
        return _attention_op(q, k, v, scale)[0]
    return attention_ref(q, k, v, scale, dropout_p=float(dropout_p))
