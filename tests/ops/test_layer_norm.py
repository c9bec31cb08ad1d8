"""fastseg3d.ops.layer_norm (LayerNorm over the last axis, output in a requested dtype) and
fastseg3d.ops.add_layer_norm (the residual add before it in the same kernel): CPU, interpreter and GPU tiers."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

import fastseg3d
from fastseg3d.ops.layer_norm import (
    add_layer_norm,
    add_layer_norm_unsupported_reasons,
    layer_norm,
    layer_norm_unsupported_reasons,
)
from fastseg3d.reference.layer_norm import (
    add_layer_norm_backward_ref,
    layer_norm_backward_ref,
    layer_norm_fused_ref,
    layer_norm_ref,
)
from tests.utils import assert_close


def _inputs(shape, dtype=torch.float32, affine=True, offset=0.0, device="cpu"):
    x = (offset + 1.5 * torch.randn(shape, device=device)).to(dtype).requires_grad_()
    c, pd = shape[-1], torch.float64 if dtype == torch.float64 else torch.float32  # fp32 master weights
    w = (1.0 + 0.5 * torch.randn(c, device=device, dtype=pd)).requires_grad_() if affine else None
    b = (0.3 * torch.randn(c, device=device, dtype=pd)).requires_grad_() if affine else None
    return x, w, b


def _check(x, w, b, dtype, out_dtype=None, scale=1.0, eps=1e-5):
    """The public function (whatever backend is active) against F.layer_norm in float64, forward and gradients;
    ``dtype`` sets the tolerances."""
    y = layer_norm(x, w, b, eps, out_dtype)
    assert y.dtype == (out_dtype or x.dtype) and y.is_contiguous() and y.shape == x.shape
    xd = x.detach().double().requires_grad_()
    wd = w.detach().double().requires_grad_() if w is not None else None
    bd = b.detach().double().requires_grad_() if b is not None else None
    expected = F.layer_norm(xd, x.shape[-1:], wd, bd, eps)
    assert_close("y", y, expected, dtype, scale)
    dy = torch.randn_like(expected)
    y.backward(dy.to(y.dtype))
    expected.backward(dy.to(y.dtype).double())
    assert x.grad.dtype == x.dtype
    assert_close("dx", x.grad, xd.grad, dtype, 2 * scale)
    if w is not None:
        assert w.grad.dtype == w.dtype and b.grad.dtype == b.dtype
        assert_close("dweight", w.grad, wd.grad, dtype, 2 * scale)
        assert_close("dbias", b.grad, bd.grad, dtype, 2 * scale)


def _check_add(x, r, w, b, dtype, out_dtype=None, use_sum=True, scale=1.0):
    """The public residual step (whatever backend is active) against ``s = x + r`` (rounded to its dtype) and
    F.layer_norm(s) in float64, forward and the gradients of a loss that reads y and, with ``use_sum``, s (as the
    next residual add does); ``dtype`` sets the tolerances."""
    total, y = add_layer_norm(x, r, w, b, 1e-5, out_dtype)
    sum_dtype = torch.promote_types(x.dtype, r.dtype)
    assert total.dtype == sum_dtype and y.dtype == (out_dtype or sum_dtype)
    assert total.is_contiguous() and y.is_contiguous() and total.shape == y.shape == x.shape
    leaves = [t for t in (x, r, w, b) if t is not None and t.requires_grad]
    doubles = {id(t): t.detach().double().requires_grad_() for t in leaves}
    xd, rd = (doubles.get(id(t), t.detach().double()) for t in (x, r))
    wd, bd = (doubles.get(id(t), t.detach().double()) if t is not None else None for t in (w, b))
    sd = xd + rd
    sd = sd + (sd.detach().to(sum_dtype).double() - sd.detach())  # the sum as rounded to its dtype, same gradient
    yd = F.layer_norm(sd, x.shape[-1:], wd, bd, 1e-5)
    assert torch.equal(total, (x.detach().to(sum_dtype) + r.detach().to(sum_dtype)))
    assert_close("y", y, yd, dtype, scale)
    dy, ds = torch.randn_like(yd).to(y.dtype), torch.randn_like(sd).to(sum_dtype)
    loss = (y.double() * dy.double()).sum() + ((total.double() * ds.double()).sum() if use_sum else 0)
    loss_d = (yd * dy.double()).sum() + ((sd * ds.double()).sum() if use_sum else 0)
    grads = torch.autograd.grad(loss, leaves)
    expected = torch.autograd.grad(loss_d, [doubles[id(t)] for t in leaves])
    names = {id(x): "dx", id(r): "dresidual", id(w): "dweight", id(b): "dbias"}
    for t, got, want in zip(leaves, grads, expected):
        assert got.dtype == t.dtype, names[id(t)]
        assert_close(names[id(t)], got, want, dtype, 2 * scale)


# ------------------------------------------------------------------------------------------------------
# CPU tier


@pytest.mark.parametrize("affine", [True, False])
def test_reference_matches_layer_norm(affine):
    _check(*_inputs((2, 7, 12), torch.float64, affine), torch.float64)


def test_reference_writes_the_requested_dtype_once():
    """bf16 out of an fp32 (or bf16) input: the values of fp32 LayerNorm cast once, as a Linear under autocast
    reads them."""
    x, w, b = _inputs((3, 5, 16))
    y = layer_norm_ref(x, w, b, 1e-5, torch.bfloat16)
    assert y.dtype == torch.bfloat16 and torch.equal(y, F.layer_norm(x, (16,), w, b).bfloat16())
    xb = x.detach().bfloat16()
    assert torch.equal(layer_norm_ref(xb, w, b), F.layer_norm(xb.float(), (16,), w, b).bfloat16())


def test_fused_reference_pieces_agree():
    x, w, b = _inputs((2, 3, 10), torch.float64)
    y, mean, rstd = layer_norm_fused_ref(x.detach(), w.detach(), b.detach(), 1e-5, torch.float64)
    assert mean.shape == rstd.shape == (6,)
    assert_close("mean", mean, x.detach().reshape(6, 10).mean(-1), torch.float64)
    dy = torch.randn_like(y)
    dx, dw, db = layer_norm_backward_ref(dy, x.detach(), w.detach(), b.detach(), 1e-5, [True, True, True])
    layer_norm_ref(x, w, b).backward(dy)
    for name, got, want in (("dx", dx, x.grad), ("dw", dw, w.grad), ("db", db, b.grad)):
        assert_close(name, got, want, torch.float64)
    assert layer_norm_backward_ref(dy, x.detach(), None, None, 1e-5, [False, True, True]) == (None, None, None)


def test_cpu_runs_the_reference_on_strided_input():
    x, w, b = _inputs((4, 6, 24))
    _check(x.detach()[:, ::2].requires_grad_(), w, b, torch.float32)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(x=torch.randn(2, 0)), ValueError, "non-empty last axis"),
        (dict(x=torch.ones(2, 8, dtype=torch.int64)), TypeError, "x must be a floating-point"),
        (dict(weight=torch.ones(4)), ValueError, r"weight must have shape \(8,\)"),
        (dict(bias=torch.ones(8, dtype=torch.int32)), TypeError, "bias must be a floating-point"),
        (dict(weight=torch.ones(8, device="meta")), TypeError, "weight is on meta"),
        (dict(eps=-1.0), ValueError, "eps must be a finite number"),
        (dict(out_dtype=torch.int32), TypeError, "out_dtype must be a floating"),
        (dict(x=[1.0]), TypeError, "x must be a torch.Tensor"),
    ],
)
def test_bad_input(kwargs, error, match):
    args = dict(x=torch.randn(2, 3, 8), weight=None, bias=None, eps=1e-5, out_dtype=None)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        layer_norm(**args)


def test_unsupported_reasons():
    x = torch.empty(2, 5, 32, device="meta")
    assert layer_norm_unsupported_reasons(x, torch.ones(32, device="meta"), None, torch.bfloat16) == []
    assert "dtype=torch.float64" in layer_norm_unsupported_reasons(x.double())[0]
    assert "out_dtype=torch.float64" in layer_norm_unsupported_reasons(x, out_dtype=torch.float64)[0]
    assert "last axis of 5000" in layer_norm_unsupported_reasons(torch.empty(2, 5000, device="meta"))[0]


@pytest.mark.parametrize("use_sum", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_add_reference_matches_add_and_layer_norm(affine, use_sum):
    x, w, b = _inputs((2, 7, 12), torch.float64, affine)
    _check_add(x, torch.randn(2, 7, 12, dtype=torch.float64).requires_grad_(), w, b, torch.float64, use_sum=use_sum)


def test_add_reference_in_mixed_dtypes_matches_autograd():
    """An fp32 stream and a bf16 branch (SegFormer3D under autocast): the sum in fp32, its gradient cast to bf16 for
    the branch, as autograd forms them for ``x + r`` and the norm."""
    x, w, b = _inputs((3, 5, 16))
    r = torch.randn(3, 5, 16, dtype=torch.bfloat16, requires_grad=True)
    total, y = add_layer_norm(x, r, w, b, out_dtype=torch.bfloat16)
    plain = x + r
    assert total.dtype == torch.float32 and torch.equal(total, plain)
    assert torch.equal(y, F.layer_norm(plain, (16,), w, b).bfloat16())
    dy, ds = torch.randn(3, 5, 16, dtype=torch.bfloat16), torch.randn(3, 5, 16)
    dx, dr, dw, db = add_layer_norm_backward_ref(dy, ds, total.detach(), w.detach(), b.detach(), 1e-5,
                                                 torch.float32, torch.bfloat16, [True, True, True, True])
    torch.autograd.backward([F.layer_norm(plain, (16,), w, b).bfloat16(), plain], [dy, ds])
    for name, got, want in (("dx", dx, x.grad), ("dresidual", dr, r.grad), ("dw", dw, w.grad), ("db", db, b.grad)):
        assert got.dtype == want.dtype and torch.equal(got, want), name


@pytest.mark.parametrize(
    "residual, error, match",
    [
        (torch.randn(2, 3, 4), ValueError, r"residual must have x's shape \(2, 3, 8\)"),
        (torch.ones(2, 3, 8, dtype=torch.int64), TypeError, "residual must be a floating-point"),
        (torch.randn(2, 3, 8, device="meta"), TypeError, "residual is on meta"),
        ([1.0], TypeError, "residual must be a torch.Tensor"),
    ],
)
def test_add_bad_residual(residual, error, match):
    with pytest.raises(error, match=match):
        add_layer_norm(torch.randn(2, 3, 8), residual)


def test_add_unsupported_reasons():
    x = torch.empty(2, 5, 32, device="meta")
    assert add_layer_norm_unsupported_reasons(x, x.bfloat16(), out_dtype=torch.bfloat16) == []
    assert "residual dtype=torch.float64" in add_layer_norm_unsupported_reasons(x, x.double())[0]


@pytest.mark.parametrize("affine", [True, False])
def test_add_opcheck(affine):
    x, w, b = _inputs((2, 5, 12), torch.float32, affine)
    r = torch.randn(2, 5, 12, dtype=torch.bfloat16, requires_grad=True)
    torch.library.opcheck(torch.ops.fastseg3d.add_layer_norm.default, (x, r, w, b, 1e-5, torch.bfloat16))
    x, r, w, b = (t.detach() if t is not None else None for t in (x, r, w, b))
    total, y, mean, rstd = torch.ops.fastseg3d.add_layer_norm(x, r, w, b, 1e-5, torch.bfloat16)
    assert total.dtype == torch.float32 and y.dtype == torch.bfloat16 and mean.shape == (10,)
    backward = torch.ops.fastseg3d.add_layer_norm_backward.default
    for grad_sum in (torch.randn_like(total), None):
        torch.library.opcheck(backward, (torch.randn_like(y), grad_sum, total, w, b, mean, rstd, 1e-5, torch.float32,
                                         torch.bfloat16, [True, True, affine, True]))
    torch.library.opcheck(backward, (torch.randn_like(y), None, total, w, b, mean, rstd, 1e-5, torch.float32,
                                     torch.bfloat16, [False, True, False, False]))
    # one dtype: both input gradients asked for are distinct outputs
    torch.library.opcheck(backward, (torch.randn_like(y), None, total, w, b, mean, rstd, 1e-5, torch.float32,
                                     torch.float32, [True, True, affine, True]))


def test_add_launch_switches_to_64bit_offsets_for_any_operand():
    """The forward's 64-bit switch looks at every operand: a small stream with a residual whose rows lie 2^30
    elements apart, and 2^31 elements (meta tensors: nothing is allocated or run)."""
    pytest.importorskip("triton")
    from bench.sass import _captured
    from fastseg3d.ops.layer_norm import _add_layer_norm_launch

    def int64_flag(x, r):
        launches = _captured(lambda: _add_layer_norm_launch(x, r, None, None, 1e-5, torch.bfloat16))
        assert len(launches) == 1
        return launches[0][2]["INT64"]

    small = torch.empty(1, 4, 64, device="meta")
    assert not int64_flag(small, torch.empty(1, 4, 64, device="meta", dtype=torch.bfloat16))
    far = torch.empty(4 * 2**30, device="meta", dtype=torch.bfloat16).as_strided((1, 4, 64), (4 * 2**30, 2**30, 1))
    assert int64_flag(small, far)
    big = torch.empty(2, 2**24, 64, device="meta")
    assert int64_flag(big, big.bfloat16())


def test_add_compile_fullgraph_forward_backward():
    x, w, b = _inputs((2, 9, 16))
    r = torch.randn(2, 9, 16, requires_grad=True)
    copies = [t.detach().clone().requires_grad_() for t in (x, r, w, b)]

    def fn(x, r, w, b):
        total, y = torch.ops.fastseg3d.add_layer_norm(x, r, w, b, 1e-5, x.dtype)[:2]
        return y.square().sum() + total.sin().sum()

    fn(x, r, w, b).backward()
    torch.compile(fn, fullgraph=True)(*copies).backward()
    for name, got, want in zip(("dx", "dresidual", "dw", "db"), (t.grad for t in copies),
                               (t.grad for t in (x, r, w, b))):
        assert_close(name, got, want, torch.float32)


def test_add_meta_device_forward_backward():
    x, w, b = (t.detach().to("meta").requires_grad_() for t in _inputs((2, 7, 32)))
    r = torch.empty(2, 7, 32, device="meta", dtype=torch.bfloat16, requires_grad=True)
    total, y = add_layer_norm(x, r, w, b, out_dtype=torch.bfloat16)
    assert total.dtype == torch.float32 and y.dtype == torch.bfloat16 and y.grad_fn.name().startswith("add_layer_norm")
    (y.sum() + total.sum()).backward()
    assert x.grad.dtype == torch.float32 and r.grad.dtype == torch.bfloat16 and w.grad.shape == (32,)


@pytest.mark.parametrize("affine", [True, False])
def test_opcheck(affine):
    x, w, b = _inputs((2, 5, 12), torch.float32, affine)
    torch.library.opcheck(torch.ops.fastseg3d.layer_norm.default, (x, w, b, 1e-5, torch.float32))
    x, w, b = (t.detach() if t is not None else None for t in (x, w, b))
    y, mean, rstd = torch.ops.fastseg3d.layer_norm(x, w, b, 1e-5, torch.bfloat16)
    assert y.dtype == torch.bfloat16 and mean.shape == (10,)
    torch.library.opcheck(torch.ops.fastseg3d.layer_norm_backward.default,
                          (torch.randn_like(y), x, w, b, mean, rstd, 1e-5, [True, affine, True]))


def test_compile_fullgraph_forward_backward():
    x, w, b = _inputs((2, 9, 16))
    x2, w2, b2 = (t.detach().clone().requires_grad_() for t in (x, w, b))

    def fn(x, w, b):
        return torch.ops.fastseg3d.layer_norm(x, w, b, 1e-5, x.dtype)[0].square().sum()

    fn(x, w, b).backward()
    torch.compile(fn, fullgraph=True)(x2, w2, b2).backward()
    for name, got, want in (("dx", x2.grad, x.grad), ("dw", w2.grad, w.grad), ("db", b2.grad, b.grad)):
        assert_close(name, got, want, torch.float32)


def test_meta_device_forward_backward():
    x, w, b = (t.detach().to("meta").requires_grad_() for t in _inputs((2, 7, 32), torch.bfloat16))
    y = layer_norm(x, w, b, out_dtype=torch.bfloat16)
    assert y.device.type == "meta" and y.dtype == torch.bfloat16
    assert y.grad_fn.name().startswith("layer_norm")
    y.sum().backward()
    assert x.grad.shape == x.shape and x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32


# ------------------------------------------------------------------------------------------------------
# Interpreter tier: the Triton kernels on CPU (TRITON_INTERPRET=1)


@pytest.mark.interpret
@pytest.mark.parametrize("shape", [(2, 37, 32), (1, 5, 7), (3, 256), (1, 2, 3, 160)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("affine", [True, False])
def test_kernels_match_layer_norm(shape, dtype, affine, poison):
    with fastseg3d.backend("triton"):
        _check(*_inputs(shape, dtype, affine), dtype)


@pytest.mark.interpret
def test_kernels_write_the_requested_dtype(poison):
    """fp32 in, bf16 out (SegFormer3D's norms under autocast): the values of fp32 LayerNorm rounded once."""
    x, w, b = _inputs((2, 33, 64))
    with fastseg3d.backend("triton"):
        _check(x, w, b, torch.bfloat16, torch.bfloat16)


@pytest.mark.interpret
def test_kernels_on_strided_rows_and_an_offset_feature(poison):
    """Every other token of a (B, N, C) tensor (rows read in place) and a mean 300 times the spread."""
    x, w, b = _inputs((2, 40, 24), offset=300.0)
    xs = x.detach()[:, ::2].requires_grad_()
    with fastseg3d.backend("triton"):
        _check(xs, w, b, torch.float32, scale=4.0)


@pytest.mark.interpret
def test_kernels_add_eps_to_the_variance(poison):
    """Near-constant rows (variance 1e-4) with eps = 1e-2: 1 / sqrt(var + eps), not 1 / (sqrt(var) + eps)."""
    x, w, b = _inputs((5, 24))
    with torch.no_grad():
        x.mul_(1e-2 / 1.5).add_(1.0)
    with fastseg3d.backend("triton"):
        _check(x, w, b, torch.float32, eps=1e-2)


@pytest.mark.interpret
@pytest.mark.parametrize("c", [7, 32, 160, 257])
def test_kernels_normalise_a_constant_row_to_exactly_zero(c, poison):
    """Rows of one large value: their variance is 0, so rstd = 1/sqrt(eps) multiplies any error of the mean into
    the output. Taken about the row's first value the mean is exact, as ATen's (a sum / C was a few ulps off:
    outputs of 0.02-0.04 instead of 0 at 1000); their input gradient is dx = rstd (dy - mean(dy)), and a constant
    sum of x and a residual as well."""
    x = torch.tensor([0.7, 100.1, 1000.3]).view(3, 1).expand(3, c).contiguous().requires_grad_()
    with fastseg3d.backend("triton"):
        assert torch.equal(layer_norm(x.detach()), torch.zeros_like(x))
        assert torch.equal(add_layer_norm(x.detach() / 4, 3 * x.detach() / 4)[1], torch.zeros_like(x))
        _check(x, None, None, torch.float32)


@pytest.mark.interpret
def test_add_kernels_normalise_the_rounded_sum(poison):
    """bf16 branch values near 600 (bf16's spacing there is 4): the statistics are those of the sum as rounded to
    bf16 and written, as the unfused add then norm computes them, not of the exact sum."""
    x, w, b = _inputs((4, 32), torch.bfloat16)
    r = (600.0 + torch.randn(4, 32)).bfloat16().requires_grad_()
    with fastseg3d.backend("triton"):
        _check_add(x, r, w, b, torch.bfloat16)


@pytest.mark.interpret
def test_kernels_parameter_gradients_are_deterministic():
    x, w, b = _inputs((4, 50, 32))
    grads = []
    with fastseg3d.backend("triton"):
        for _ in range(2):
            for t in (x, w, b):
                t.grad = None
            layer_norm(x, w, b).square().sum().backward()
            grads.append((x.grad.clone(), w.grad.clone(), b.grad.clone()))
    assert all(torch.equal(a, c) for a, c in zip(*grads))


@pytest.mark.interpret
def test_kernels_64bit_indexing(monkeypatch, poison):
    k = importlib.import_module("fastseg3d.kernels.layer_norm")
    monkeypatch.setattr(k, "_INT32_MAX", 16)
    with fastseg3d.backend("triton"):
        _check(*_inputs((2, 9, 20)), torch.float32)


@pytest.mark.interpret
def test_layer_norm_for_linear_writes_the_autocast_dtype(monkeypatch, poison):
    """SegFormer3D's norms: under (CPU) bf16 autocast the fused norm writes the Linear's bf16 input, and the
    Linear's output and every gradient match the plain composition within bf16 rounding."""
    from torch import nn

    from fastseg3d.nn.recompute import layer_norm_for_linear

    norm, lin = nn.LayerNorm(32), nn.Linear(32, 16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 11, 32)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16), fastseg3d.backend("triton"):
        h = layer_norm_for_linear(x1, norm)
        y = lin(h)
    assert h.dtype == torch.bfloat16 and h.grad_fn.name().startswith("layer_norm")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref = lin(F.layer_norm(x2, (32,), norm.weight, norm.bias))
    assert_close("y", y, y_ref, torch.bfloat16)
    g = torch.randn_like(y_ref)
    grads = []
    for out, inp in ((y, x1), (y_ref, x2)):
        norm.zero_grad()
        with fastseg3d.backend("triton"):
            out.backward(g)
        grads.append((inp.grad, norm.weight.grad.clone(), norm.bias.grad.clone()))
    for name, a, e in zip(("dx", "dweight", "dbias"), *grads):
        assert a.dtype == e.dtype
        assert_close(name, a, e, torch.bfloat16)


def test_module_helpers_return_the_norms_dtype_under_cuda_autocast():
    """Under CUDA bf16 autocast (emulated on meta, as fastseg3d.profile runs a step) LayerNorm returns fp32 for a
    bf16 input: apply_layer_norm and add_layer_norm (not for a Linear) return that in the fused op, the helpers for
    a Linear bf16 (CPU autocast: test_module_helpers_under_cpu_autocast_return_the_norms_dtype)."""
    from torch import nn

    from fastseg3d.nn.recompute import add_layer_norm as add_norm
    from fastseg3d.nn.recompute import apply_layer_norm, layer_norm_for_linear
    from fastseg3d.profile import _autocast_on_meta

    norm = nn.LayerNorm(32).to("meta")
    x = torch.empty(2, 5, 32, device="meta", dtype=torch.bfloat16, requires_grad=True)
    r = torch.empty(2, 5, 32, device="meta", dtype=torch.bfloat16)
    with _autocast_on_meta(torch.bfloat16):
        assert norm(x).dtype == torch.float32
        y = apply_layer_norm(x.transpose(0, 1), norm)  # rows not evenly spaced: a copy, then the kernel
        total, y_add = add_norm(x, r, norm)
        h, (_, h_add) = layer_norm_for_linear(x, norm), add_norm(x, r, norm, for_linear=True)
    assert y.dtype == y_add.dtype == torch.float32 and total.dtype == torch.bfloat16
    assert h.dtype == h_add.dtype == torch.bfloat16
    # (the dispatcher's ops under the emulation's function mode)
    assert "fastseg3d_layer_norm" in y.grad_fn.name() and "fastseg3d_add_layer_norm" in y_add.grad_fn.name()
    assert y.shape == (5, 2, 32)


@pytest.mark.interpret
def test_apply_layer_norm_on_a_patch_embeddings_tokens(poison):
    """nn.recompute.apply_layer_norm on the transposed view of a conv's NCDHW fp16 output (SegFormer3D's patch
    embeddings), output and every gradient as the module's within fp16 rounding."""
    from torch import nn

    from fastseg3d.nn.recompute import apply_layer_norm

    norm = nn.LayerNorm(12).half()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    conv = torch.randn(2, 12, 3, 4, 5, dtype=torch.float16)
    results = []
    for backend in ("triton", "torch"):
        x = conv.clone().requires_grad_()
        norm.zero_grad()
        with fastseg3d.backend(backend):
            y = apply_layer_norm(x.flatten(2).transpose(1, 2), norm)
            if backend == "triton":
                assert y.grad_fn.name().startswith("layer_norm")
            y.float().sin().sum().backward()
        results.append((y, x.grad, norm.weight.grad.clone(), norm.bias.grad.clone()))
    for name, a, e in zip(("y", "dx", "dweight", "dbias"), *results):
        assert a.dtype == e.dtype and a.shape == e.shape
        assert_close(name, a, e, torch.float16)


@pytest.mark.interpret
def test_module_helpers_under_cpu_autocast_return_the_norms_dtype(poison):
    """CPU autocast runs LayerNorm in its input's dtype (CUDA's in fp32): the fused helpers return what the module
    does, through the kernels."""
    from torch import nn

    from fastseg3d.nn.recompute import add_layer_norm as add_norm
    from fastseg3d.nn.recompute import apply_layer_norm

    norm = nn.LayerNorm(16)
    x, r = torch.randn(2, 5, 16, dtype=torch.float16), torch.randn(2, 5, 16, dtype=torch.float16)
    with fastseg3d.backend("triton"), torch.autocast("cpu", dtype=torch.float16):
        expected = norm(x).dtype
        y, (_, y_add) = apply_layer_norm(x, norm), add_norm(x, r, norm)
    assert expected == torch.float16 and y.dtype == y_add.dtype == expected
    assert y.grad_fn.name().startswith("layer_norm") and y_add.grad_fn.name().startswith("add_layer_norm")


def test_module_helpers_run_a_replaced_forward():
    """A LayerNorm whose forward is replaced on the instance runs that forward, not the fused kernel (meta tensors,
    where the fused ops run their shape-only branch)."""
    from torch import nn

    from fastseg3d.nn.recompute import add_layer_norm as add_norm
    from fastseg3d.nn.recompute import apply_layer_norm, layer_norm_for_linear

    norm = nn.LayerNorm(16).to("meta")
    x = torch.empty(2, 5, 16, device="meta", requires_grad=True)
    assert apply_layer_norm(x, norm).grad_fn.name().startswith("layer_norm")  # the fused op, unreplaced
    norm.forward = lambda t: t * 2
    for y in (apply_layer_norm(x, norm), layer_norm_for_linear(x, norm), add_norm(x, x, norm)[1]):
        assert y.grad_fn.name() == "MulBackward0"


_ADD_DTYPES = [(torch.float32, torch.float32), (torch.float32, torch.float16), (torch.float16, torch.float16)]


@pytest.mark.interpret
@pytest.mark.parametrize("shape", [(2, 37, 32), (1, 5, 7), (3, 256)], ids=str)
@pytest.mark.parametrize("dtypes", _ADD_DTYPES, ids=lambda d: f"{str(d[0])[6:]}+{str(d[1])[6:]}")
@pytest.mark.parametrize("use_sum", [True, False])
def test_add_kernels_match_add_and_layer_norm(shape, dtypes, use_sum, poison):
    x, w, b = _inputs(shape, dtypes[0])
    r = (1.5 * torch.randn(shape)).to(dtypes[1]).requires_grad_()
    with fastseg3d.backend("triton"):
        _check_add(x, r, w, b, dtypes[1], use_sum=use_sum)


@pytest.mark.interpret
def test_add_kernels_write_the_requested_dtype_on_strided_rows(poison):
    """Every other token of the stream and a window of a wider branch's channels (rows read in place, with
    different row strides), a mean 300 times the spread, no affine parameters, and the norm written in fp16 for a
    Linear."""
    x, _, _ = _inputs((2, 40, 24), offset=300.0)
    r = torch.randn(2, 20, 32)
    xs, rs = x.detach()[:, ::2].requires_grad_(), r[..., 4:28].requires_grad_()
    with fastseg3d.backend("triton"):
        _check_add(xs, rs, None, None, torch.float16, torch.float16, scale=4.0)


@pytest.mark.interpret
@pytest.mark.parametrize("residual_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("needs", ["x", "residual", "parameters"])
def test_add_kernels_with_some_gradients(needs, residual_dtype, poison):
    x, w, b = _inputs((2, 9, 20))
    r = torch.randn(2, 9, 20).to(residual_dtype)
    x.requires_grad_(needs == "x")
    r.requires_grad_(needs == "residual")
    w.requires_grad_(needs == "parameters")
    b.requires_grad_(needs == "parameters")
    with fastseg3d.backend("triton"):
        _check_add(x, r, w, b, residual_dtype)


@pytest.mark.interpret
def test_add_kernels_when_only_the_sum_is_used(poison):
    """The norm's output unused: the sum's gradient passes to both inputs in their dtypes, as through an add."""
    x, w, b = _inputs((2, 9, 20))
    r = torch.randn(2, 9, 20, dtype=torch.float16, requires_grad=True)
    with fastseg3d.backend("triton"):
        total, _ = add_layer_norm(x, r, w, b)
    ds = torch.randn_like(total)
    total.backward(ds)
    assert torch.equal(x.grad, ds) and torch.equal(r.grad, ds.half()) and w.grad is None


@pytest.mark.interpret
def test_add_kernels_64bit_indexing(monkeypatch, poison):
    k = importlib.import_module("fastseg3d.kernels.layer_norm")
    monkeypatch.setattr(k, "_INT32_MAX", 16)
    x, w, b = _inputs((2, 9, 20))
    with fastseg3d.backend("triton"):
        _check_add(x, torch.randn(2, 9, 20, dtype=torch.float16).requires_grad_(), w, b, torch.float16)


@pytest.mark.interpret
def test_add_layer_norm_module_helper_matches_the_plain_residual_step(poison):
    """nn.recompute.add_layer_norm (SegFormer3D's residual adds) under (CPU) bf16 autocast: the fp32 stream plus
    a Linear's bf16 output, the norm written in bf16 for the next Linear; outputs and every gradient as the plain
    ``x + branch`` and LayerNorm within bf16 rounding, the sum itself exactly."""
    from torch import nn

    from fastseg3d.nn.recompute import add_layer_norm as add_norm

    norm, branch, lin = nn.LayerNorm(32), nn.Linear(32, 32), nn.Linear(32, 16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 11, 32)
    results = []
    for backend in ("triton", "torch"):
        xi = x.clone().requires_grad_()
        for m in (norm, branch, lin):
            m.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16), fastseg3d.backend(backend):
            total, h = add_norm(xi, branch(xi), norm, for_linear=True)
            out = lin(h)
        assert total.dtype == torch.float32
        if backend == "triton":  # the plain norm returns fp32 under autocast, for the Linear to cast
            assert h.dtype == torch.bfloat16 and h.grad_fn.name().startswith("add_layer_norm")
        with fastseg3d.backend(backend):
            (out.float().square().sum() + total.sin().sum()).backward()
        results.append((total, out, xi.grad, norm.weight.grad.clone(), norm.bias.grad.clone(),
                        branch.weight.grad.clone()))
    assert torch.equal(results[0][0], results[1][0])
    for name, a, e in zip(("out", "dx", "dweight", "dbias", "dbranch"), results[0][1:], results[1][1:]):
        assert a.dtype == e.dtype
        assert_close(name, a, e, torch.bfloat16)


@pytest.mark.interpret
def test_kernels_walk_several_row_tiles_a_program(poison):
    """More row tiles than programs (17 rows of 257 channels: 5 tiles over the interpreter's 3 programs), so each
    program's loop accumulates its parameter-gradient partials over two tiles."""
    with fastseg3d.backend("triton"):
        _check(*_inputs((17, 257)), torch.float32)
        x, w, b = _inputs((17, 257))
        _check_add(x, torch.randn(17, 257).requires_grad_(), w, b, torch.float32)


@pytest.mark.interpret
def test_kernels_take_a_batch_one_patch_embedding_view(poison):
    """SegFormer3D's tokens ``x.flatten(2).transpose(1, 2)`` at batch 1: (1, N, C) with strides (C N, 1, N), where
    ``view(-1, C)`` succeeds (the size-1 batch merges) and keeps the last axis's stride N, which the kernels (rows at
    unit stride) must not be given; the residual step's branch likewise."""
    conv = torch.randn(1, 12, 3, 4, 5)
    _, w, b = _inputs((1, 60, 12))
    x = conv.flatten(2).transpose(1, 2).requires_grad_()
    assert x.view(-1, 12).stride(-1) != 1
    with fastseg3d.backend("triton"):
        _check(x, w, b, torch.float32)
        _check_add(torch.randn(1, 60, 12).requires_grad_(), torch.randn(1, 12, 60).transpose(1, 2).requires_grad_(),
                   w, b, torch.float32)


# ------------------------------------------------------------------------------------------------------
# GPU tier


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 32768, 32), (2, 4096, 160), (3, 1000, 256), (7, 5, 100), (2, 9, 4096)],
                         ids=str)
def test_gpu_kernels_match_layer_norm(shape, dtype, poison):
    with fastseg3d.backend("triton"):
        _check(*_inputs(shape, dtype, device="cuda"), dtype)


@pytest.mark.gpu
def test_gpu_fp32_input_to_bf16_output_and_determinism():
    x, w, b = _inputs((2, 32768, 64), device="cuda")
    dy = torch.randn(x.shape, device="cuda", dtype=torch.bfloat16)
    grads = []
    for _ in range(2):
        for t in (x, w, b):
            t.grad = None
        y = layer_norm(x, w, b, out_dtype=torch.bfloat16)
        y.backward(dy)
        grads.append((x.grad.clone(), w.grad.clone(), b.grad.clone()))
    assert_close("y", y, F.layer_norm(x.detach(), (64,), w.detach(), b.detach()), torch.bfloat16)
    assert all(torch.equal(a, c) for a, c in zip(*grads))


@pytest.mark.gpu
@pytest.mark.parametrize("dtypes", [*_ADD_DTYPES, (torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16)],
                         ids=str)
@pytest.mark.parametrize("shape", [(2, 32768, 32), (2, 512, 256), (7, 5, 100)], ids=str)
def test_gpu_add_kernels_match_add_and_layer_norm(shape, dtypes, poison):
    x, w, b = _inputs(shape, dtypes[0], device="cuda")
    r = (1.5 * torch.randn(shape, device="cuda")).to(dtypes[1]).requires_grad_()
    with fastseg3d.backend("triton"):
        _check_add(x, r, w, b, dtypes[1], out_dtype=dtypes[1])
