"""fastseg3d.ops.group_norm_act (GroupNorm + activation): CPU tier, interpreter tier and GPU tier."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

import fastseg3d
from fastseg3d.ops.group_norm_act import group_norm_act, group_norm_act_unsupported_reasons
from fastseg3d.reference.dwconv3d import activation_ref
from fastseg3d.reference.group_norm_act import (
    group_norm_act_apply_ref,
    group_norm_act_backward_ref,
    group_norm_act_fused_ref,
    group_norm_act_ref,
)
from tests.utils import assert_close

ACTS = [None, "relu", "gelu", "gelu_tanh", "silu"]
_LAYOUTS = {"ncdhw": torch.contiguous_format, "cl": torch.channels_last_3d}


def _inputs(shape, dtype=torch.float32, layout="ncdhw", affine=True, offset=0.0, device="cpu"):
    x = (offset + 1.5 * torch.randn(shape, device=device)).to(dtype)
    x = x.contiguous(memory_format=_LAYOUTS[layout]).requires_grad_()
    c, pd = shape[1], torch.float64 if dtype == torch.float64 else torch.float32  # fp32 master weights
    w = (1.0 + 0.5 * torch.randn(c, device=device, dtype=pd)).requires_grad_() if affine else None
    b = (0.3 * torch.randn(c, device=device, dtype=pd)).requires_grad_() if affine else None
    return x, w, b


def _formula(x, groups, w, b, eps, activation):
    """GroupNorm written out in float64: per (batch, group) mean and biased variance over channels and voxels."""
    xd = x.double()
    g = xd.reshape(x.shape[0], groups, -1)
    z = ((g - g.mean(-1, keepdim=True)) / (g.var(-1, unbiased=False, keepdim=True) + eps).sqrt()).reshape(x.shape)
    if w is not None:
        z = z * w.double().view(1, -1, 1, 1, 1) + b.double().view(1, -1, 1, 1, 1)
    return activation_ref(z, activation)


def _check(x, w, b, groups, activation, dtype, scale=1.0):
    """The public function (whatever backend is active) against the float64 formula, forward and gradients."""
    y = group_norm_act(x, groups, w, b, 1e-5, activation)
    assert y.dtype == x.dtype and y.is_contiguous(memory_format=fastseg3d.ops.utils.layout_of(x))
    xd = x.detach().double().requires_grad_()
    wd = w.detach().double().requires_grad_() if w is not None else None
    bd = b.detach().double().requires_grad_() if b is not None else None
    expected = _formula(xd, groups, wd, bd, 1e-5, activation)
    assert_close("y", y, expected, dtype, scale)
    dy = torch.randn_like(expected)
    y.backward(dy.to(y.dtype))
    expected.backward(dy)
    # the input gradient takes the sum of three terms of similar size: a few roundings more than the output
    assert_close("dx", x.grad, xd.grad, dtype, 2 * scale)
    if w is not None:
        assert_close("dweight", w.grad, wd.grad, dtype, 2 * scale)
        assert_close("dbias", b.grad, bd.grad, dtype, 2 * scale)


# ------------------------------------------------------------------------------------------------------
# CPU tier


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("layout", ["ncdhw", "cl"])
def test_reference_matches_the_formula(activation, layout):
    x, w, b = _inputs((2, 6, 3, 4, 5), torch.float64, layout)
    _check(x, w, b, 3, activation, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_normalises_half_inputs_in_fp32(dtype):
    """fp16/bf16 in: the values of CUDA autocast's fp32 GroupNorm and activation, rounded once to x's dtype."""
    x, w, b = _inputs((2, 8, 3, 4, 5), dtype)
    y = group_norm_act_ref(x, 4, w, b, 1e-5, "silu")
    expected = F.silu(F.group_norm(x.float(), 4, w, b, 1e-5)).to(dtype)
    assert y.dtype == dtype and torch.equal(y, expected)


def test_fused_reference_pieces_agree():
    """The op bodies' references: the forward's statistics are GroupNorm's, the apply from them gives the output
    again, and the backward is autograd's gradient of the reference."""
    x, w, b = _inputs((2, 6, 3, 4, 5), torch.float64, "cl")
    y, mean, rstd = group_norm_act_fused_ref(x.detach(), w.detach(), b.detach(), 3, 1e-5, "gelu")
    g = x.detach().reshape(2, 3, -1)
    assert_close("mean", mean, g.mean(-1), torch.float64)
    assert_close("rstd", rstd, (g.var(-1, unbiased=False) + 1e-5).rsqrt(), torch.float64)
    assert_close("apply", group_norm_act_apply_ref(x.detach(), w.detach(), b.detach(), mean, rstd, "gelu"), y,
                 torch.float64)
    dy = torch.randn_like(y)
    dx, dw, db = group_norm_act_backward_ref(dy, x.detach(), w.detach(), b.detach(), 3, 1e-5, "gelu",
                                             [True, True, True])
    group_norm_act_ref(x, 3, w, b, 1e-5, "gelu").backward(dy)
    for name, got, want in (("dx", dx, x.grad), ("dw", dw, w.grad), ("db", db, b.grad)):
        assert_close(name, got, want, torch.float64)
    assert group_norm_act_backward_ref(dy, x.detach(), None, None, 3, 1e-5, None, [False, True, True]) == (
        None, None, None)


@pytest.mark.parametrize("layout", ["ncdhw", "cl"])
def test_cpu_runs_the_reference_in_the_input_layout(layout):
    x, w, b = _inputs((2, 8, 3, 4, 5), torch.float32, layout)
    _check(x, w, b, 4, "relu", torch.float32)


def test_matches_group_norm_module_without_affine():
    x, _, _ = _inputs((2, 8, 3, 4, 5), affine=False)
    norm = torch.nn.GroupNorm(2, 8, affine=False)
    assert_close("y", group_norm_act(x, 2), norm(x), torch.float32)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(x=torch.randn(2, 8, 4, 4)), ValueError, "x must be 5-D"),
        (dict(x=torch.ones(2, 8, 2, 2, 2, dtype=torch.int64)), TypeError, "x must be a floating-point"),
        (dict(num_groups=3), ValueError, "num_groups=3 does not divide"),
        (dict(num_groups=0), ValueError, "num_groups must be a positive int"),
        (dict(num_groups=2.0), ValueError, "num_groups must be a positive int"),
        (dict(weight=torch.ones(4)), ValueError, r"weight must have shape \(8,\)"),
        (dict(bias=torch.ones(8, dtype=torch.int32)), TypeError, "bias must be a floating-point"),
        (dict(weight=torch.ones(8, device="meta")), TypeError, "weight is on meta"),
        (dict(eps=-1.0), ValueError, "eps must be a finite number"),
        (dict(eps=float("nan")), ValueError, "eps must be a finite number"),
        (dict(activation="tanh"), ValueError, "activation must be one of"),
        (dict(x=[1.0]), TypeError, "x must be a torch.Tensor"),
    ],
)
def test_bad_input(kwargs, error, match):
    args = dict(x=torch.randn(2, 8, 2, 3, 4), num_groups=4, weight=None, bias=None, eps=1e-5, activation=None)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        group_norm_act(**args)


def test_unsupported_reasons():
    x = torch.randn(2, 8, 2, 3, 4, device="meta")
    assert group_norm_act_unsupported_reasons(x, torch.ones(8, device="meta")) == []
    assert "dtype=torch.float64" in group_norm_act_unsupported_reasons(x.double())[0]
    assert "weight dtype" in group_norm_act_unsupported_reasons(x, torch.ones(8, device="meta").double())[0]
    assert "no elements" in group_norm_act_unsupported_reasons(torch.empty(2, 8, 0, 3, 4, device="meta"))[0]


@pytest.mark.parametrize("layout", ["ncdhw", "cl"])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("activation", ["none", "relu", "gelu"])
def test_opcheck(layout, affine, activation):
    x, w, b = _inputs((2, 6, 3, 4, 5), torch.float32, layout, affine)
    torch.library.opcheck(torch.ops.fastseg3d.group_norm_act.default, (x, w, b, 3, 1e-5, activation))
    x, w, b = (t.detach() if t is not None else None for t in (x, w, b))  # these two have no autograd
    y, mean, rstd = torch.ops.fastseg3d.group_norm_act(x, w, b, 3, 1e-5, activation)
    torch.library.opcheck(torch.ops.fastseg3d.group_norm_act_apply.default, (x, w, b, mean, rstd, activation))
    torch.library.opcheck(torch.ops.fastseg3d.group_norm_act_backward.default,
                          (torch.randn_like(y), x, w, b, mean, rstd, 1e-5, activation, [True, affine, True]))


def test_compile_fullgraph_forward_backward():
    x, w, b = _inputs((2, 8, 3, 4, 5), torch.float32, "cl")

    def fn(x, w, b):
        return torch.ops.fastseg3d.group_norm_act(x, w, b, 4, 1e-5, "silu")[0].square().sum()

    x2, w2, b2 = (t.detach().clone().requires_grad_() for t in (x, w, b))
    fn(x, w, b).backward()
    torch.compile(fn, fullgraph=True)(x2, w2, b2).backward()
    for name, got, want in (("dx", x2.grad, x.grad), ("dw", w2.grad, w.grad), ("db", b2.grad, b.grad)):
        assert_close(name, got, want, torch.float32)


def test_meta_device_forward_backward():
    x, w, b = (t.detach().to("meta").requires_grad_() if t is not None else None
               for t in _inputs((2, 8, 3, 4, 5), torch.bfloat16, "cl"))
    y = group_norm_act(x, 4, w, b, activation="relu")
    assert y.device.type == "meta" and y.dtype == torch.bfloat16
    assert y.is_contiguous(memory_format=torch.channels_last_3d)
    assert y.grad_fn.name().startswith("group_norm_act")
    y.sum().backward()
    assert x.grad.shape == x.shape and w.grad.dtype == torch.float32


# ------------------------------------------------------------------------------------------------------
# Interpreter tier: the Triton kernels on CPU (TRITON_INTERPRET=1)

# (shape, groups): channel blocks that straddle groups, one channel per group, one group, one channel, a single
# voxel row, and voxel counts that leave partial tiles and splits
_SHAPES = [
    ((2, 6, 3, 5, 7), 3),
    ((1, 4, 1, 1, 9), 4),
    ((3, 8, 2, 3, 4), 1),
    ((2, 1, 5, 4, 3), 1),
    ((1, 20, 3, 3, 3), 5),
]


@pytest.mark.interpret
@pytest.mark.parametrize("shape, groups", _SHAPES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else
                         str(v))
@pytest.mark.parametrize("layout", ["ncdhw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernels_match_the_formula(shape, groups, layout, dtype, poison):
    x, w, b = _inputs(shape, dtype, layout)
    with fastseg3d.backend("triton"):
        _check(x, w, b, groups, "relu", dtype)


@pytest.mark.interpret
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("affine", [True, False])
def test_kernels_every_activation(activation, affine, poison):
    x, w, b = _inputs((2, 6, 3, 5, 7), torch.float32, "cl", affine)
    with fastseg3d.backend("triton"):
        _check(x, w, b, 2, activation, torch.float32)


@pytest.mark.interpret
def test_kernels_keep_the_variance_of_an_offset_feature(poison):
    """A mean 300 times the spread: a sum of squares in fp32 would cancel; the merged per-tile deviations do not."""
    x, w, b = _inputs((2, 4, 5, 6, 7), torch.float32, "ncdhw", offset=300.0)
    with fastseg3d.backend("triton"):
        _check(x, w, b, 2, None, torch.float32, scale=4.0)


@pytest.mark.interpret
def test_kernels_weight_gradients_are_deterministic():
    x, w, b = _inputs((2, 6, 4, 5, 7), torch.float32, "cl")
    grads = []
    with fastseg3d.backend("triton"):
        for _ in range(2):
            for t in (x, w, b):
                t.grad = None
            group_norm_act(x, 3, w, b, activation="silu").sum().backward()
            grads.append((x.grad.clone(), w.grad.clone(), b.grad.clone()))
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.interpret
def test_kernels_64bit_indexing(monkeypatch, poison):
    k = sys.modules["fastseg3d.kernels.group_norm_act"]
    monkeypatch.setattr(k, "_INT32_MAX", 16)  # every launch takes the int64 path
    x, w, b = _inputs((2, 6, 3, 4, 5), torch.float32, "ncdhw")
    with fastseg3d.backend("triton"):
        _check(x, w, b, 3, "gelu", torch.float32)


@pytest.mark.interpret
def test_kernel_statistics_are_group_norms(poison):
    x, w, b = _inputs((2, 6, 3, 5, 7), torch.float32, "cl")
    with fastseg3d.backend("triton"):
        _, mean, rstd = torch.ops.fastseg3d.group_norm_act(x.detach(), w, b, 3, 1e-5, "none")
    _, mean_ref, rstd_ref = torch.native_group_norm(x.detach().contiguous(), w, b, 2, 6, 105, 3, 1e-5)
    assert_close("mean", mean, mean_ref, torch.float32)
    assert_close("rstd", rstd, rstd_ref, torch.float32)


# ------------------------------------------------------------------------------------------------------
# GPU tier


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["ncdhw", "cl"])
@pytest.mark.parametrize("shape, groups", [((2, 32, 24, 20, 17), 8), ((1, 128, 9, 10, 11), 8), ((2, 6, 5, 7, 3), 3)])
def test_gpu_kernels_match_the_formula(shape, groups, layout, dtype):
    x, w, b = _inputs(shape, dtype, layout, device="cuda")
    with fastseg3d.backend("triton"):
        _check(x, w, b, groups, "relu", dtype)
