"""Reference depthwise 3D convolution: ``act(conv3d(x, w, b, groups=C)) + residual``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "ACTIVATIONS", "activation_grad_ref", "activation_ref", "dwconv3d_backward_ref", "dwconv3d_ref",
    "dwconv3d_tokens_ref",
]

ACTIVATIONS = (None, "relu", "gelu", "gelu_tanh", "silu")


def _cpu_half(x: torch.Tensor) -> bool:
    """Whether ATen's CPU conv would run in bf16/fp16: its depthwise weight gradient there is wrong on small
    channels-last volumes (SegFormer3D's 2^3 stage 4 under CPU autocast: errors of 20 to 3,500 against fp32, and
    values that change between identical runs). The reference then computes in fp32, as the kernels accumulate."""
    return x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)


def _fp32(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None else t.float() for t in tensors]


def activation_ref(z: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation is None:
        return z
    if activation == "relu":
        return F.relu(z)
    if activation == "gelu":
        return F.gelu(z)
    if activation == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    if activation == "silu":
        return F.silu(z)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def activation_grad_ref(z: torch.Tensor, activation: str | None) -> torch.Tensor:
    """d activation(z) / dz, written out so that backward needs no autograd graph."""
    if activation is None:
        return torch.ones_like(z)
    if activation == "relu":
        return (z > 0).to(z.dtype)
    if activation == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(z * 0.7071067811865476))
        return cdf + z * 0.3989422804014327 * torch.exp(-0.5 * z * z)
    if activation == "gelu_tanh":
        t = torch.tanh(0.7978845608028654 * (z + 0.044715 * z * z * z))
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * z * z)
    if activation == "silu":
        s = torch.sigmoid(z)
        return s * (1.0 + z * (1.0 - s))
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def dwconv3d_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    padding: str | int | Sequence[int] = "same",
    dilation: int | Sequence[int] = 1,
    activation: str | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """Depthwise (``groups = C``) stride-1 Conv3d, then ``activation``, then ``+ residual``, in ATen ops (on CPU,
    bf16 and fp16 in fp32, cast back)."""
    if _cpu_half(x):
        with torch.autocast("cpu", enabled=False):  # which would cast the conv's operands back
            y = dwconv3d_ref(*_fp32(x, weight, bias), padding, dilation, activation, *_fp32(residual))
        # ATen's dtype: the conv's, promoted by a residual's (e.g. an fp32 stream)
        return y.to(x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype))
    y = F.conv3d(x, weight, bias, stride=1, padding=padding, dilation=dilation, groups=x.shape[1])
    y = activation_ref(y, activation)
    if residual is not None:
        y = y + residual
    return y


def dwconv3d_tokens_ref(
    x: torch.Tensor,
    spatial_shape: Sequence[int],
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`dwconv3d_ref` on tokens ``(B, N, C)``, ``N = D*H*W`` in C order, with "same" padding."""
    b, n, c = x.shape
    d, h, w = spatial_shape
    vol = x.transpose(1, 2).reshape(b, c, d, h, w)
    y = dwconv3d_ref(vol, weight, bias, padding="same", activation=activation)
    y = y.reshape(b, weight.shape[0], n).transpose(1, 2)
    if residual is not None:
        y = y + residual
    return y


def dwconv3d_backward_ref(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    padding: Sequence[int],
    dilation: Sequence[int],
    activation: str | None,
    output_mask: Sequence[bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients (dx, dw, db) of :func:`dwconv3d_ref` with integer padding, given dL/dy; None where not asked."""
    if _cpu_half(x):
        with torch.autocast("cpu", enabled=False):
            grads = dwconv3d_backward_ref(*_fp32(grad, x, weight, bias), padding, dilation, activation, output_mask)
        dtypes = (x.dtype, weight.dtype, weight.dtype if bias is None else bias.dtype)
        return tuple(None if g is None else g.to(dt) for g, dt in zip(grads, dtypes))
    groups = x.shape[1]
    dz = grad
    if activation is not None:
        z = F.conv3d(x, weight, bias, padding=tuple(padding), dilation=tuple(dilation), groups=groups)
        dz = grad * activation_grad_ref(z, activation)
    bias_sizes = [weight.shape[0]] if bias is not None else None
    mask = [bool(output_mask[0]), bool(output_mask[1]), bool(output_mask[2]) and bias is not None]
    dx, dw, db = torch.ops.aten.convolution_backward(
        dz, x, weight, bias_sizes, [1, 1, 1], list(padding), list(dilation), False, [0, 0, 0], groups, mask
    )
    return dx, dw, db
