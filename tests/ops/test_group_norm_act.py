"""fastseg3d.ops.group_norm_act (GroupNorm + activation): CPU tier, interpreter tier and GPU tier."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

import fastseg3d
from fastseg3d.ops.group_norm_act import (
    group_norm_act,
    group_norm_act_fused,
    group_norm_act_recompute,
    group_norm_act_running_stats,
    group_norm_act_unsupported_reasons,
)
from fastseg3d.reference.dwconv3d import activation_ref
from fastseg3d.reference.group_norm_act import (
    group_norm_act_apply_ref,
    group_norm_act_backward_ref,
    group_norm_act_fused_ref,
    group_norm_act_ref,
    group_norm_act_running_stats_ref,
)
from tests.utils import assert_close

ACTS = [None, "relu", "leaky_relu", "gelu", "gelu_tanh", "silu"]
_LAYOUTS = {"ncdhw": torch.contiguous_format, "cl": torch.channels_last_3d}


def _inputs(shape, dtype=torch.float32, layout="ncdhw", affine=True, offset=0.0, device="cpu"):
    x = (offset + 1.5 * torch.randn(shape, device=device)).to(dtype)
    x = x.contiguous(memory_format=_LAYOUTS[layout]).requires_grad_()
    c, pd = shape[1], torch.float64 if dtype == torch.float64 else torch.float32  # fp32 master weights
    w = (1.0 + 0.5 * torch.randn(c, device=device, dtype=pd)).requires_grad_() if affine else None
    b = (0.3 * torch.randn(c, device=device, dtype=pd)).requires_grad_() if affine else None
    return x, w, b


def _act(z, activation, slope):
    return F.leaky_relu(z, slope) if activation == "leaky_relu" else activation_ref(z, activation)


def _formula(x, groups, w, b, eps, activation, slope=0.01, first=False):
    """GroupNorm written out in float64: per (batch, group) mean and biased variance over channels and voxels; the
    activation on its output, or on its input with ``first``."""
    xd = _act(x.double(), activation, slope) if first else x.double()
    g = xd.reshape(x.shape[0], groups, -1)
    z = ((g - g.mean(-1, keepdim=True)) / (g.var(-1, unbiased=False, keepdim=True) + eps).sqrt()).reshape(x.shape)
    if w is not None:
        z = z * w.double().view(1, -1, 1, 1, 1)
    if b is not None:
        z = z + b.double().view(1, -1, 1, 1, 1)
    return z if first else _act(z, activation, slope)


def _check(x, w, b, groups, activation, dtype, scale=1.0, slope=0.01, first=False, eps=1e-5):
    """The public function (whatever backend is active) against the float64 formula, forward and gradients."""
    y = group_norm_act(x, groups, w, b, eps, activation, slope, first)
    assert y.dtype == x.dtype and y.is_contiguous(memory_format=fastseg3d.ops.utils.layout_of(x))
    xd = x.detach().double().requires_grad_()
    wd = w.detach().double().requires_grad_() if w is not None else None
    bd = b.detach().double().requires_grad_() if b is not None else None
    expected = _formula(xd, groups, wd, bd, eps, activation, slope, first)
    assert_close("y", y, expected, dtype, scale)
    dy = torch.randn_like(expected).contiguous(memory_format=fastseg3d.ops.utils.layout_of(x))
    y.backward(dy.to(y.dtype))
    expected.backward(dy)
    # the input gradient takes the sum of three terms of similar size: a few roundings more than the output
    assert_close("dx", x.grad, xd.grad, dtype, 2 * scale)
    if w is not None:
        assert_close("dweight", w.grad, wd.grad, dtype, 2 * scale)
        assert_close("dbias", b.grad, bd.grad, dtype, 2 * scale)


def _batch_formula(x, w, b, eps, activation):
    """A training BatchNorm written out in float64 (per channel, over the batch and the voxels), then the
    activation."""
    xd = x.double()
    dims = (0, 2, 3, 4)
    z = (xd - xd.mean(dims, keepdim=True)) / (xd.var(dims, unbiased=False, keepdim=True) + eps).sqrt()
    if w is not None:
        z = z * w.double().view(1, -1, 1, 1, 1)
    if b is not None:
        z = z + b.double().view(1, -1, 1, 1, 1)
    return _act(z, activation, 0.01)


def _check_batch(x, w, b, activation, dtype, out_dtype=None):
    """The forward op with statistics over the batch (whatever backend is active) against the float64 BatchNorm
    formula: output, statistics (1, C), the apply op from them, and every gradient."""
    y, mean, rstd = group_norm_act_fused(x, w, b, x.shape[1], 1e-5, activation, out_dtype=out_dtype,
                                         batch_stats=True)
    assert y.dtype == (out_dtype or x.dtype) and mean.shape == rstd.shape == (1, x.shape[1])
    assert y.is_contiguous(memory_format=fastseg3d.ops.utils.layout_of(x))
    xd = x.detach().double().requires_grad_()
    wd = w.detach().double().requires_grad_() if w is not None else None
    bd = b.detach().double().requires_grad_() if b is not None else None
    expected = _batch_formula(xd, wd, bd, 1e-5, activation)
    assert_close("y", y, expected, y.dtype)
    dims = (0, 2, 3, 4)
    # the statistics are fp32 (as the ops return them for any input)
    assert_close("mean", mean.view(-1), xd.detach().mean(dims), torch.float32)
    assert_close("rstd", rstd.view(-1), (xd.detach().var(dims, unbiased=False) + 1e-5).rsqrt(), torch.float32)
    again = group_norm_act_recompute(x.detach(), w, b, mean, rstd, activation, out_dtype=y.dtype)
    assert_close("apply", again, y, torch.float32 if y.dtype == torch.float64 else y.dtype)  # fp32 statistics
    # the gradient as y's dtype holds it (bf16 for an fp32 input read in bf16)
    dy = torch.randn_like(expected).to(y.dtype).contiguous(memory_format=fastseg3d.ops.utils.layout_of(x))
    y.backward(dy)
    expected.backward(dy.double())
    assert_close("dx", x.grad, xd.grad, dtype, 2.0)
    if w is not None:
        assert_close("dweight", w.grad, wd.grad, dtype, 2.0)
        assert_close("dbias", b.grad, bd.grad, dtype, 2.0)


# ------------------------------------------------------------------------------------------------------
# CPU tier


@pytest.mark.parametrize("first", [False, True], ids=["after", "first"])
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("layout", ["ncdhw", "cl"])
def test_reference_matches_the_formula(activation, layout, first):
    x, w, b = _inputs((2, 6, 3, 4, 5), torch.float64, layout)
    _check(x, w, b, 3, activation, torch.float64, first=first)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_normalises_half_inputs_in_fp32(dtype):
    """fp16/bf16 in: the values of CUDA autocast's fp32 GroupNorm and activation, rounded once to x's dtype."""
    x, w, b = _inputs((2, 8, 3, 4, 5), dtype)
    y = group_norm_act_ref(x, 4, w, b, 1e-5, "silu")
    expected = F.silu(F.group_norm(x.float(), 4, w, b, 1e-5)).to(dtype)
    assert y.dtype == dtype and torch.equal(y, expected)


@pytest.mark.parametrize("first", [False, True], ids=["after", "first"])
def test_fused_reference_pieces_agree(first):
    """The op bodies' references: the forward's statistics are GroupNorm's (of the activated input with
    ``activation_first``), the apply from them gives the output again, and the backward is autograd's gradient of
    the reference."""
    x, w, b = _inputs((2, 6, 3, 4, 5), torch.float64, "cl")
    y, mean, rstd = group_norm_act_fused_ref(x.detach(), w.detach(), b.detach(), 3, 1e-5, "leaky_relu", 0.2,
                                             activation_first=first)
    g = (F.leaky_relu(x.detach(), 0.2) if first else x.detach()).reshape(2, 3, -1)
    assert_close("mean", mean, g.mean(-1), torch.float64)
    assert_close("rstd", rstd, (g.var(-1, unbiased=False) + 1e-5).rsqrt(), torch.float64)
    assert_close("apply", group_norm_act_apply_ref(x.detach(), w.detach(), b.detach(), mean, rstd, "leaky_relu", 0.2,
                                                   activation_first=first), y, torch.float64)
    dy = torch.randn_like(y)
    dx, dw, db = group_norm_act_backward_ref(dy, x.detach(), w.detach(), b.detach(), 3, 1e-5, "leaky_relu",
                                             [True, True, True], 0.2, first)
    group_norm_act_ref(x, 3, w, b, 1e-5, "leaky_relu", 0.2, first).backward(dy)
    for name, got, want in (("dx", dx, x.grad), ("dw", dw, w.grad), ("db", db, b.grad)):
        assert_close(name, got, want, torch.float64)
    assert group_norm_act_backward_ref(dy, x.detach(), None, None, 3, 1e-5, None, [False, True, True]) == (
        None, None, None)


@pytest.mark.parametrize("activation", ["relu", "gelu", None])
@pytest.mark.parametrize("layout", ["ncdhw", "cl"])
def test_batch_statistics_reference_is_batch_norm(activation, layout):
    """With statistics over the batch (one group per channel), the ops' references are a training BatchNorm and
    its gradients, in either layout."""
    x, w, b = _inputs((3, 5, 2, 3, 4), torch.float64, layout)
    _check_batch(x, w, b, activation, torch.float64)
    x, _, _ = _inputs((3, 5, 2, 3, 4), torch.float64, layout, affine=False)
    _check_batch(x, None, None, activation, torch.float64)


@pytest.mark.parametrize("batch_stats", [False, True], ids=["groups", "batch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_reference_backward_keeps_the_gradients_of_an_offset_feature(dtype, batch_stats):
    """A mean 400 times the spread: the gradients as the fp64 formula gives them from the same (rounded) input,
    to fp32 accuracy (GroupNorm's backward, fed the input as it is, loses two digits of dweight and one of dx)."""
    torch.manual_seed(0)
    x, w, b = _inputs((2, 8, 7, 9, 11), dtype, offset=400.0)
    groups = 8 if batch_stats else 4
    dy = torch.randn(x.shape, dtype=torch.float64)
    got = group_norm_act_backward_ref(dy.to(dtype), x.detach(), w.detach(), b.detach(), groups, 1e-5, None,
                                      [True] * 3, batch_stats=batch_stats)
    xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, w, b))
    expected = (_batch_formula(xd, wd, bd, 1e-5, None) if batch_stats
                else _formula(xd, groups, wd, bd, 1e-5, None))
    expected.backward(dy.to(dtype).double())
    assert_close("dx", got[0], xd.grad, dtype, 4.0)
    assert_close("dweight", got[1], wd.grad, torch.float32)  # fp32 parameters
    assert_close("dbias", got[2], bd.grad, torch.float32, 4.0)


@pytest.mark.parametrize("layout", ["ncdhw", "cl"])
def test_cpu_runs_the_reference_in_the_input_layout(layout):
    x, w, b = _inputs((2, 8, 3, 4, 5), torch.float32, layout)
    _check(x, w, b, 4, "relu", torch.float32)


def test_reference_backward_takes_leaky_relus_slope_at_zero():
    """A channel whose weight and bias are 0 normalises to exactly 0, where LeakyReLU's gradient is the slope
    (autograd's), in the backward reference too."""
    x = torch.randn(2, 4, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    w, b = 1.0 + 0.5 * torch.randn(4, dtype=torch.float64), 0.3 * torch.randn(4, dtype=torch.float64)
    w[0], b[0] = 0.0, 0.0
    w.requires_grad_(), b.requires_grad_()
    y = group_norm_act_ref(x, 2, w, b, 1e-5, "leaky_relu", 0.2)
    dy = torch.randn_like(y)
    expected = torch.autograd.grad(y, (x, w, b), dy)
    got = group_norm_act_backward_ref(dy, x.detach(), w.detach(), b.detach(), 2, 1e-5, "leaky_relu", [True] * 3, 0.2)
    for name, a, e in zip(("dx", "dweight", "dbias"), got, expected):
        assert_close(name, a, e, torch.float64)


@pytest.mark.parametrize("slope", [1.5, -0.5])
def test_reference_leaky_relu_of_any_slope(slope):
    x, w, b = _inputs((2, 4, 3, 4, 5))
    with fastseg3d.backend("torch"):
        _check(x, w, b, 2, "leaky_relu", torch.float32, slope=slope)


@pytest.mark.parametrize("which", ["weight", "bias"])
def test_reference_with_one_affine_parameter(which):
    """A weight without a bias and a bias without a weight (ATen's CPU backward fails on the latter by itself)."""
    x, w, b = _inputs((2, 6, 3, 4, 5), torch.float64)
    w, b = (w, None) if which == "weight" else (None, b)
    y = group_norm_act(x, 3, w, b, 1e-5, "relu")
    p = w if w is not None else b
    y.backward(torch.randn_like(y))
    dx, dw, db = group_norm_act_backward_ref(torch.ones_like(y), x.detach(), w, b, 3, 1e-5, "relu", [True] * 3)
    assert dx.shape == x.shape and (dw is None) == (w is None) and (db is None) == (b is None)
    assert p.grad is not None and x.grad is not None


def test_matches_group_norm_module_without_affine():
    x, _, _ = _inputs((2, 8, 3, 4, 5), affine=False)
    norm = torch.nn.GroupNorm(2, 8, affine=False)
    assert_close("y", group_norm_act(x, 2), norm(x), torch.float32)


def test_one_channel_per_group_is_an_affine_instance_norm():
    x, w, b = _inputs((2, 8, 3, 4, 5))
    norm = torch.nn.InstanceNorm3d(8, affine=True)
    with torch.no_grad():
        norm.weight.copy_(w)
        norm.bias.copy_(b)
    assert_close("y", group_norm_act(x, 8, w, b, 1e-5, "leaky_relu", 0.1), F.leaky_relu(norm(x), 0.1),
                 torch.float32)


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
        (dict(negative_slope=float("inf")), ValueError, "negative_slope must be a finite number"),
        (dict(negative_slope=None), ValueError, "negative_slope must be a finite number"),
        (dict(x=[1.0]), TypeError, "x must be a torch.Tensor"),
        (dict(activation_first=1), TypeError, "activation_first must be a bool"),
        (dict(x=torch.randn(1, 1, 1, 1, 1), num_groups=1), ValueError, "one value per group"),  # as F.group_norm
    ],
)
def test_bad_input(kwargs, error, match):
    args = dict(x=torch.randn(2, 8, 2, 3, 4), num_groups=4, weight=None, bias=None, eps=1e-5, activation=None,
                negative_slope=0.01, activation_first=False)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        group_norm_act(**args)


def test_unsupported_reasons():
    x = torch.randn(2, 8, 2, 3, 4, device="meta")
    assert group_norm_act_unsupported_reasons(x, torch.ones(8, device="meta")) == []
    assert "dtype=torch.float64" in group_norm_act_unsupported_reasons(x.double())[0]
    assert "weight dtype" in group_norm_act_unsupported_reasons(x, torch.ones(8, device="meta").double())[0]
    assert "no elements" in group_norm_act_unsupported_reasons(torch.empty(2, 8, 0, 3, 4, device="meta"))[0]
    wide = torch.empty(1, 4 * 65535 + 4, 1, 1, 1, device="meta")  # more channel tiles than a grid row takes
    assert "channels above 262140" in group_norm_act_unsupported_reasons(wide)[0]
    assert any("batch above 65535" in r
               for r in group_norm_act_unsupported_reasons(torch.empty(65536, 2, 1, 1, 2, device="meta")))


@pytest.mark.parametrize("layout", ["ncdhw", "cl"])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("activation, first", [("none", False), ("relu", False), ("leaky_relu", False),
                                               ("gelu", False), ("gelu", True)])
def test_opcheck(layout, affine, activation, first):
    x, w, b = _inputs((2, 6, 3, 4, 5), torch.float32, layout, affine)
    torch.library.opcheck(torch.ops.fastseg3d.group_norm_act.default,
                          (x, w, b, 3, 1e-5, activation, 0.2, torch.float32, first, False))
    x, w, b = (t.detach() if t is not None else None for t in (x, w, b))  # these two have no autograd
    y, mean, rstd = torch.ops.fastseg3d.group_norm_act(x, w, b, 3, 1e-5, activation, 0.2, torch.bfloat16, first,
                                                       False)
    assert y.dtype == torch.bfloat16
    torch.library.opcheck(torch.ops.fastseg3d.group_norm_act_apply.default,
                          (x, w, b, mean, rstd, activation, 0.2, torch.float16, first))
    torch.library.opcheck(torch.ops.fastseg3d.group_norm_act_backward.default,
                          (torch.randn_like(y), x, w, b, mean, rstd, 1e-5, activation, 0.2, [True, affine, True],
                           first))


@pytest.mark.parametrize("layout", ["ncdhw", "cl"])
def test_opcheck_batch_statistics(layout):
    x, w, b = _inputs((3, 5, 2, 3, 4), torch.float32, layout)
    torch.library.opcheck(torch.ops.fastseg3d.group_norm_act.default,
                          (x, w, b, 5, 1e-5, "gelu", 0.01, torch.float32, False, True))
    x, w, b = x.detach(), w.detach(), b.detach()
    y, mean, rstd = torch.ops.fastseg3d.group_norm_act(x, w, b, 5, 1e-5, "gelu", 0.01, torch.bfloat16, False, True)
    assert mean.shape == (1, 5)
    torch.library.opcheck(torch.ops.fastseg3d.group_norm_act_apply.default,
                          (x, w, b, mean, rstd, "gelu", 0.01, torch.float16, False))
    torch.library.opcheck(torch.ops.fastseg3d.group_norm_act_backward.default,
                          (torch.randn_like(y), x, w, b, mean, rstd, 1e-5, "gelu", 0.01, [True, True, True], False))


@pytest.mark.parametrize("momentum", [0.1, 0.75])
def test_running_stats_update_is_batch_norms(momentum):
    """From the fused statistics over the batch, the running statistics come out as native_batch_norm's own update
    makes them (unbiased variance, lerp by the momentum), on fp32 and bf16 buffers."""
    x = 2.0 * torch.randn(3, 5, 2, 3, 4) + 1.0
    _, mean, rstd = group_norm_act_fused_ref(x, None, None, 5, 1e-5, None, 0.01, torch.float32, False, True)
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):
        rm, rv = torch.randn(5).to(dtype), (torch.rand(5) + 0.5).to(dtype)
        rm_ref, rv_ref = rm.float(), rv.float()
        F.batch_norm(x, rm_ref, rv_ref, training=True, momentum=momentum, eps=1e-5)
        group_norm_act_running_stats(rm, rv, mean, rstd, 1e-5, momentum, 3 * 24)
        torch.testing.assert_close(rm.float(), rm_ref, rtol=tol, atol=tol)
        torch.testing.assert_close(rv.float(), rv_ref, rtol=tol, atol=tol)


def test_opcheck_running_stats():
    rm, rv, mean, rstd = torch.randn(5), torch.rand(5) + 0.5, torch.randn(5), torch.rand(5) + 0.5
    torch.library.opcheck(torch.ops.fastseg3d.group_norm_act_running_stats.default,
                          (rm, rv, mean, rstd, 1e-5, 0.1, 24))


def test_compile_fullgraph_forward_backward():
    x, w, b = _inputs((2, 8, 3, 4, 5), torch.float32, "cl")

    def fn(x, w, b):
        return torch.ops.fastseg3d.group_norm_act(x, w, b, 4, 1e-5, "silu", 0.01, x.dtype, True,
                                                  False)[0].square().sum()

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
@pytest.mark.parametrize("activation", ["gelu", "leaky_relu", "silu"])
@pytest.mark.parametrize("layout", ["ncdhw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernels_activation_first(activation, layout, dtype, poison):
    """The activation on the norm's input (MobileUtr's GELU -> InstanceNorm): statistics, output and every
    gradient of the activated input, groups of several channels and one channel per group."""
    x, w, b = _inputs((2, 6, 3, 5, 7), dtype, layout)
    with fastseg3d.backend("triton"):
        _check(x, w, b, 3, activation, dtype, slope=0.2, first=True)
    x, _, _ = _inputs((2, 6, 3, 5, 7), dtype, layout, affine=False)
    with fastseg3d.backend("triton"):
        _check(x, None, None, 6, activation, dtype, slope=0.2, first=True)


@pytest.mark.interpret
@pytest.mark.parametrize("layout", ["ncdhw", "cl"])
def test_kernels_instance_norm_and_leaky_relu(layout, poison):
    """One channel per group (an affine InstanceNorm) with a LeakyReLU of slope 0.2, as the U-Nets' blocks."""
    x, w, b = _inputs((2, 5, 3, 4, 6), torch.float16, layout)
    with fastseg3d.backend("triton"):
        _check(x, w, b, 5, "leaky_relu", torch.float16, slope=0.2)


@pytest.mark.interpret
@pytest.mark.parametrize("slope", [1.5, -0.5])
def test_kernels_leaky_relu_of_any_slope(slope, poison):
    """y = slope z below 0 and z above for any finite slope (the op takes any): max(z, slope z) would swap the
    branches for a slope above 1."""
    x, w, b = _inputs((2, 4, 3, 4, 5))
    with fastseg3d.backend("triton"):
        _check(x, w, b, 2, "leaky_relu", torch.float32, slope=slope)


@pytest.mark.interpret
@pytest.mark.parametrize("view", ["depth_step", "channel_slice_cl"])
def test_kernels_take_views_contiguous_in_neither_layout(view, poison):
    """Every other depth slice of an NCDHW tensor, a channel slice of a channels-last one: normalised as their
    values, not as the storage under them (the kernels take strides from the shape); the gradient reaches the
    base tensor in place."""
    if view == "depth_step":
        base, cut = torch.randn(2, 4, 6, 5, 3), (lambda t: t[:, :, ::2])
    else:
        base = torch.randn(2, 8, 3, 5, 3).contiguous(memory_format=torch.channels_last_3d)
        cut = (lambda t: t[:, :4])
    base.requires_grad_()
    _, w, b = _inputs((2, 4, 3, 5, 3))
    with fastseg3d.backend("triton"):
        y = group_norm_act(cut(base), 2, w, b, 1e-5, "relu")
    ref = [t.detach().double().requires_grad_() for t in (base, w, b)]
    expected = _formula(cut(ref[0]), 2, ref[1], ref[2], 1e-5, "relu")
    assert_close("y", y, expected, torch.float32)
    dy = torch.randn_like(expected)
    y.backward(dy.float())
    expected.backward(dy)
    for name, a, e in zip(("dx", "dweight", "dbias"), (base, w, b), ref):
        assert_close(name, a.grad, e.grad, torch.float32, 2)


@pytest.mark.interpret
@pytest.mark.parametrize("which", ["weight", "bias", "strided"])
def test_kernels_with_one_or_strided_affine_parameters(which, poison):
    x, w, b = _inputs((2, 6, 3, 5, 7), torch.float32, "cl")
    if which == "strided":  # every other element of a longer vector: the kernels read unit-stride copies
        w = torch.randn(12).mul(0.5).add(1.0)[::2].requires_grad_()
        b = torch.randn(12)[1::2].requires_grad_()
    else:
        w, b = (w, None) if which == "weight" else (None, b)
    xd = x.detach().double().requires_grad_()
    with fastseg3d.backend("triton"):
        y = group_norm_act(x, 3, w, b, 1e-5, "gelu")
    expected = _formula(xd, 3, w, b, 1e-5, "gelu")
    assert_close("y", y, expected, torch.float32)
    dy = torch.randn_like(expected)
    with fastseg3d.backend("triton"):
        y.backward(dy.float())
    expected.backward(dy)
    assert_close("dx", x.grad, xd.grad, torch.float32, 2.0)
    assert (w is None or w.grad is not None) and (b is None or b.grad is not None)


@pytest.mark.interpret
def test_kernels_write_the_requested_output_dtype(poison):
    """The forward and apply ops write fp32 input's output in bf16 directly (the conv's dtype under autocast)."""
    x, w, b = _inputs((2, 6, 3, 5, 7), torch.float32, "ncdhw")
    with fastseg3d.backend("triton"):
        y, mean, rstd = torch.ops.fastseg3d.group_norm_act(x.detach(), w.detach(), b.detach(), 3, 1e-5, "relu",
                                                           0.01, torch.bfloat16, False, False)
        again = torch.ops.fastseg3d.group_norm_act_apply(x.detach(), w.detach(), b.detach(), mean, rstd, "relu",
                                                         0.01, torch.bfloat16, False)
    expected = F.relu(F.group_norm(x.detach().double(), 3, w.detach().double(), b.detach().double(), 1e-5))
    assert y.dtype == again.dtype == torch.bfloat16 and torch.equal(y, again)
    assert_close("y", y, expected, torch.bfloat16)


@pytest.mark.interpret
@pytest.mark.parametrize("frozen", ["weight", "bias"])
def test_kernels_one_parameter_frozen(frozen, poison):
    """The weight (or the bias) alone frozen: it gets no gradient, the other one and the input theirs."""
    x, w, b = _inputs((2, 8, 3, 4, 5))
    {"weight": w, "bias": b}[frozen].requires_grad_(False)
    with fastseg3d.backend("triton"):
        y = group_norm_act(x, 4, w, b, 1e-5, "relu")
    xd, wd, bd = (t.detach().double().requires_grad_(t.requires_grad) for t in (x, w, b))
    expected = _formula(xd, 4, wd, bd, 1e-5, "relu")
    dy = torch.randn_like(expected)
    y.backward(dy.float())
    expected.backward(dy)
    assert_close("dx", x.grad, xd.grad, torch.float32, 2.0)
    for name, p, pd in (("weight", w, wd), ("bias", b, bd)):
        assert (p.grad is None) == (name == frozen), name
        if p.grad is not None:
            assert_close(f"d{name}", p.grad, pd.grad, torch.float32, 2.0)


@pytest.mark.interpret
def test_kernels_add_eps_to_the_variance(poison):
    """A near-constant feature (variance 1e-4) with eps = 1e-2: 1 / sqrt(var + eps), not 1 / (sqrt(var) + eps)."""
    x, w, b = _inputs((2, 4, 3, 4, 5))
    with torch.no_grad():
        x.mul_(1e-2 / 1.5).add_(1.0)
    with fastseg3d.backend("triton"):
        _check(x, w, b, 2, "gelu", torch.float32, eps=1e-2)


@pytest.mark.interpret
@pytest.mark.parametrize("layout", ["ncdhw", "cl"])
def test_kernels_leaky_relu_takes_the_slope_at_zero(layout, poison):
    """A channel whose weight and bias are 0 normalises to exactly 0, where LeakyReLU's gradient is the slope (as
    PyTorch's): the bias gradient tells."""
    x, w, b = _inputs((1, 4, 2, 3, 4), layout=layout)
    with torch.no_grad():
        w[0], b[0] = 0.0, 0.0
    with fastseg3d.backend("triton"):
        _check(x, w, b, 2, "leaky_relu", torch.float32, slope=0.2)


@pytest.mark.interpret
@pytest.mark.parametrize("layout", ["ncdhw", "cl"])
def test_kernels_merge_the_many_splits_of_a_gpu(monkeypatch, layout, poison):
    """An H100's split count (132 SMs) on small tiles: more than 64 partial rows a group for the finalize kernel
    to merge (the interpreter's own plan makes a dozen), per group and over the batch."""
    import fastseg3d.kernels.group_norm_act as k

    monkeypatch.setattr(k.utils, "sm_count", lambda device: 132)
    monkeypatch.setattr(k, "_tile", lambda x: (8, 2))
    with fastseg3d.backend("triton"):
        _check(*_inputs((1, 2, 4, 8, 17), torch.float32, layout), 1, "gelu", torch.float32)
        _check_batch(*_inputs((2, 2, 4, 8, 17), torch.float32, layout), "relu", torch.float32)


@pytest.mark.interpret
@pytest.mark.parametrize("layout", ["ncdhw", "cl"])
def test_kernels_keep_the_variance_of_an_offset_feature(layout, poison):
    """A mean 300 times the spread, whose first voxels sit at 0: a sum of squares in fp32 would cancel, and so would
    sums shifted by the first values; Welford's update does not."""
    x, w, b = _inputs((2, 4, 5, 6, 7), torch.float32, layout, offset=300.0)
    with torch.no_grad():
        x[:, :, 0] = 0.0
    with fastseg3d.backend("triton"):
        _check(x, w, b, 2, None, torch.float32, scale=4.0)


@pytest.mark.interpret
@pytest.mark.parametrize("plan", ["interpreter", "gpu"])
@pytest.mark.parametrize("layout", ["ncdhw", "cl"])
def test_kernels_normalise_a_constant_group_to_exactly_zero(monkeypatch, plan, layout, poison):
    """Groups of one large value each (InstanceNorm and two channels a group): their variance is 0, so rstd =
    1/sqrt(eps) multiplies any error of the mean into the output. The lanes' and splits' means merge in delta form,
    exact for a constant group, as Welford's in ATen (count-weighted sums / counts were a few ulps off: outputs of
    0.25 instead of 0 at 1000, an input gradient 11% off). A GPU's split plan too; a numpy integer group count."""
    import numpy as np

    import fastseg3d.kernels.group_norm_act as k

    if plan == "gpu":
        monkeypatch.setattr(k.utils, "sm_count", lambda device: 132)
        monkeypatch.setattr(k, "_tile", lambda x: (8, 2))
    value = torch.tensor([1000.3, 1000.3, 3.3, 3.3]).view(1, 4, 1, 1, 1)
    for groups in (4, 2):
        x = value.expand(2, 4, 5, 7, 9).contiguous(memory_format=_LAYOUTS[layout]).requires_grad_()
        with fastseg3d.backend("triton"):
            assert torch.equal(group_norm_act(x.detach(), np.int64(groups)), torch.zeros_like(x))
            _check(x, None, None, groups, "gelu", torch.float32)


@pytest.mark.interpret
@pytest.mark.parametrize("shape, activation", [((3, 5, 3, 4, 5), "gelu"), ((2, 20, 3, 3, 3), "relu"),
                                               ((4, 3, 1, 1, 2), None), ((1, 5, 3, 4, 5), "silu")])
@pytest.mark.parametrize("layout", ["ncdhw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernels_batch_statistics(shape, activation, layout, dtype, poison):
    """Statistics over the batch (a training BatchNorm, one group per channel): partials of every batch element
    and split merged per channel, and the apply and backward kernels reading one set for the batch; a channel
    block that straddles the channel count, two voxels a batch element, and a batch of one (where the (1, C)
    statistics are also the per-instance ones)."""
    x, w, b = _inputs(shape, dtype, layout)
    with fastseg3d.backend("triton"):
        _check_batch(x, w, b, activation, dtype)


@pytest.mark.interpret
def test_kernels_batch_statistics_write_the_requested_dtype(poison):
    """SegFormer3D's decoder: an fp32 BatchNorm input whose ReLU output the linear reads in bf16."""
    x, w, b = _inputs((2, 6, 3, 4, 5), torch.float32, "cl")
    with fastseg3d.backend("triton"):
        _check_batch(x, w, b, "relu", torch.float32, out_dtype=torch.bfloat16)


def _check_running_stats(c, momentum, dtype, device="cpu"):
    """The kernel's update against the reference's, on buffers that are the first C values of longer ones (nothing
    past C is written), with one channel whose variance rounds below zero (clamped to 0) and one whose statistics
    are NaN (kept NaN, as ATen's update keeps them: a GPU's plain max would turn the variance into 0)."""
    mean = torch.randn(c, device=device)
    rstd = torch.rand(c, device=device) + 0.2
    rstd[0] = 2.0 / math.sqrt(1e-5)  # var + eps = eps / 4
    if c > 1:
        rstd[1] = float("nan")
    stores = [torch.randn(c + 3, device=device).to(dtype), (torch.rand(c + 3, device=device) + 0.5).to(dtype)]
    stores[1][0] = 1e-4  # a negative variance (-0.75 eps) would move it by 8% or more
    rm, rv = stores[0][:c], stores[1][:c]
    expected = [rm.clone(), rv.clone()]
    rv0 = rv[0].item()
    group_norm_act_running_stats_ref(*expected, mean, rstd, 1e-5, momentum, 10)
    tails = [t[c:].clone() for t in stores]
    group_norm_act_running_stats(rm, rv, mean, rstd, 1e-5, momentum, 10)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    for got, want in zip((rm, rv), expected):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol, equal_nan=True)
    assert c == 1 or rv[1].isnan()
    assert all(torch.equal(t[c:], tail) for t, tail in zip(stores, tails))
    assert rv[0].item() == pytest.approx((1 - momentum) * rv0, rel=tol)  # the clamped variance: 0


@pytest.mark.interpret
@pytest.mark.parametrize("c", [1, 37, 1500])
@pytest.mark.parametrize("momentum", [0.1, 0.75])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_running_stats(c, momentum, dtype):
    with fastseg3d.backend("triton"):
        _check_running_stats(c, momentum, dtype)


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
    k = importlib.import_module("fastseg3d.kernels.group_norm_act")
    monkeypatch.setattr(k, "_INT32_MAX", 16)  # every launch takes the int64 path
    x, w, b = _inputs((2, 6, 3, 4, 5), torch.float32, "ncdhw")
    with fastseg3d.backend("triton"):
        _check(x, w, b, 3, "gelu", torch.float32)


@pytest.mark.interpret
def test_kernel_recompute_takes_strided_statistics(poison):
    """The apply and backward kernels read statistics rows at a stride of G: views of other strides are copied."""
    x, w, b = _inputs((3, 6, 2, 3, 4), torch.float32)
    mean, rstd = torch.randn(6, 3).t(), (torch.rand(6, 3) + 0.5).t()  # (B, G) views with strides (1, 3)
    expected = group_norm_act_apply_ref(x.detach(), w, b, mean, rstd, "gelu", 0.01, torch.float32, False)
    with fastseg3d.backend("triton"):
        y = group_norm_act_recompute(x.detach(), w, b, mean, rstd, "gelu")
    assert_close("y", y, expected, torch.float32)


@pytest.mark.interpret
def test_kernel_statistics_are_group_norms(poison):
    x, w, b = _inputs((2, 6, 3, 5, 7), torch.float32, "cl")
    with fastseg3d.backend("triton"):
        _, mean, rstd = torch.ops.fastseg3d.group_norm_act(x.detach(), w, b, 3, 1e-5, "none", 0.01, x.dtype, False,
                                                           False)
        _, mean_a, rstd_a = torch.ops.fastseg3d.group_norm_act(x.detach(), w, b, 3, 1e-5, "gelu", 0.01, x.dtype,
                                                               True, False)
    _, mean_ref, rstd_ref = torch.native_group_norm(x.detach().contiguous(), w, b, 2, 6, 105, 3, 1e-5)
    assert_close("mean", mean, mean_ref, torch.float32)
    assert_close("rstd", rstd, rstd_ref, torch.float32)
    _, mean_ref, rstd_ref = torch.native_group_norm(F.gelu(x.detach()).contiguous(), w, b, 2, 6, 105, 3, 1e-5)
    assert_close("mean of gelu(x)", mean_a, mean_ref, torch.float32)
    assert_close("rstd of gelu(x)", rstd_a, rstd_ref, torch.float32)


@pytest.mark.interpret
@pytest.mark.parametrize("c,groups,batch_stats", [(300, 300, False), (300, 300, True), (2048, 1, False)], ids=str)
@pytest.mark.parametrize("need_dx", [True, False])
def test_kernels_backward_finalize_on_wide_grids(c, groups, batch_stats, need_dx, poison):
    """The backward's one-launch sums on more than one program of each kind: 300 one-channel groups (several
    programs per statistics row; channel blocks past 64), one group of 2048 channels (past its 1024-channel tile),
    and the parameter gradients alone (x without a gradient)."""
    x, w, b = _inputs((2, c, 2, 2, 3))
    x.requires_grad_(need_dx)
    with fastseg3d.backend("triton"):
        if batch_stats:
            y = group_norm_act_fused(x, w, b, c, 1e-5, "relu", batch_stats=True)[0]
        else:
            y = group_norm_act(x, groups, w, b, 1e-5, "relu")
    xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, w, b))
    expected = _batch_formula(xd, wd, bd, 1e-5, "relu") if batch_stats else _formula(xd, groups, wd, bd, 1e-5, "relu")
    dy = torch.randn_like(expected)
    y.backward(dy.float())
    expected.backward(dy)
    for name, got, want in (("dx", x.grad, xd.grad), ("dweight", w.grad, wd.grad), ("dbias", b.grad, bd.grad)):
        if name == "dx" and not need_dx:
            assert got is None
            continue
        assert_close(name, got, want, torch.float32, 2)


# ------------------------------------------------------------------------------------------------------
# GPU tier


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["ncdhw", "cl"])
@pytest.mark.parametrize("shape, groups, activation", [
    ((2, 32, 24, 20, 17), 8, "relu"), ((1, 128, 9, 10, 11), 8, "silu"), ((2, 6, 5, 7, 3), 3, "gelu"),
    ((2, 32, 9, 8, 7), 32, "leaky_relu"), ((1, 64, 40, 40, 40), 1, None),
])
@pytest.mark.parametrize("first", [False, True], ids=["after", "first"])
def test_gpu_kernels_match_the_formula(shape, groups, activation, layout, dtype, first, poison):
    x, w, b = _inputs(shape, dtype, layout, device="cuda")
    with fastseg3d.backend("triton"):
        _check(x, w, b, groups, activation, dtype, first=first)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["ncdhw", "cl"])
@pytest.mark.parametrize("shape, activation", [((2, 128, 24, 20, 17), "gelu"), ((2, 256, 16, 16, 16), "relu"),
                                               ((3, 7, 5, 6, 7), None)])
def test_gpu_kernels_batch_statistics(shape, activation, layout, dtype, poison):
    x, w, b = _inputs(shape, dtype, layout, device="cuda")
    with fastseg3d.backend("triton"):
        _check_batch(x, w, b, activation, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("c", [256, 1500])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_kernel_running_stats(c, dtype):
    _check_running_stats(c, 0.1, dtype, device="cuda")


@pytest.mark.gpu
def test_gpu_64bit_channel_offsets():
    """x of 2.9e9 elements, NCDHW, 4 channels of 7.3e8 voxels: the last channel's offsets pass 2^31, so the 64-bit
    path must widen the channel index too (the interpreter tier's 64-bit test takes that path on tiny tensors,
    where nothing overflows). The last channel against float64."""
    free, _ = torch.cuda.mem_get_info()
    if free < 40 * 2**30:
        pytest.skip("needs 40 GiB of free GPU memory")
    x = torch.randn(1, 4, 896, 896, 912, device="cuda", dtype=torch.bfloat16)
    with fastseg3d.backend("triton"):
        y = group_norm_act(x, 4, activation="relu")
    last = x[0, 3].double()
    expected = torch.relu((last - last.mean()) / (last.var(unbiased=False) + 1e-5).sqrt())
    assert_close("y", y[0, 3], expected, torch.bfloat16)


@pytest.mark.gpu
def test_gpu_gradients_are_bitwise_deterministic():
    x, w, b = _inputs((2, 32, 40, 36, 33), torch.bfloat16, "cl", device="cuda")
    dy = torch.randn(x.shape, device="cuda", dtype=torch.bfloat16)
    grads = []
    for _ in range(3):
        for t in (x, w, b):
            t.grad = None
        group_norm_act(x, 8, w, b, activation="relu").backward(dy)
        grads.append((x.grad.clone(), w.grad.clone(), b.grad.clone()))
    assert all(torch.equal(a, c) for g in grads[1:] for a, c in zip(grads[0], g))


@pytest.mark.gpu
def test_gpu_compile_fullgraph_runs_the_kernels():
    x, w, b = _inputs((2, 16, 12, 10, 9), torch.bfloat16, "ncdhw", device="cuda")
    x2, w2, b2 = (t.detach().clone().requires_grad_() for t in (x, w, b))

    def fn(x, w, b):
        return group_norm_act(x, 8, w, b, activation="relu").float().square().sum()

    with fastseg3d.backend("triton"):  # never the reference, which would match as well
        fn(x, w, b).backward()
        torch.compile(fn, fullgraph=True)(x2, w2, b2).backward()
    for name, got, want in (("dx", x2.grad, x.grad), ("dw", w2.grad, w.grad), ("db", b2.grad, b.grad)):
        assert_close(name, got, want, torch.bfloat16)
