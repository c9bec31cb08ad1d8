"""fastseg3d.ops.dwconv3d / dwconv3d_tokens: CPU tier, interpreter tier and GPU tier."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fastseg3d
from fastseg3d.ops import dwconv3d, dwconv3d_tokens
from fastseg3d.reference import ACTIVATIONS, dwconv3d_backward_ref, dwconv3d_ref, dwconv3d_tokens_ref
from tests.utils import assert_close

try:
    import triton
    import triton.language as tl

    from fastseg3d.kernels.dwconv3d import _act, _act_grad
except ImportError:
    triton = None
else:

    @triton.jit
    def _activation_probe(z_ptr, y_ptr, g_ptr, ACT: tl.constexpr, BLOCK: tl.constexpr):
        """The conv kernels' activation and its derivative, elementwise (test_interpret_activation_accuracy)."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        z = tl.load(z_ptr + offs)
        tl.store(y_ptr + offs, _act(z, ACT))
        tl.store(g_ptr + offs, _act_grad(z, ACT))


def _tensors(layout, shape, kernel, dtype, device, bias=True, residual=False, padding="same", dilation=1):
    """Inputs in the requested layout. ``tokens`` gives (B, N, C) strided tokens (a slice of a wider tensor)."""
    b, c, d, h, w = shape
    if layout == "tokens":
        x = torch.randn(b, d * h * w, 2 * c, device=device, dtype=dtype)[..., :c]
    else:
        x = torch.randn(shape, device=device, dtype=dtype)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last_3d)
    weight = (torch.randn(c, 1, *kernel, device=device) / kernel[0] / kernel[1] / kernel[2] ** 0.5).to(dtype)
    bias_t = torch.randn(c, device=device, dtype=dtype) if bias else None
    res = None
    if residual:
        if layout == "tokens":
            res = torch.randn(b, d * h * w, c, device=device, dtype=dtype)
        else:
            with torch.device("meta"):
                out_shape = F.conv3d(
                    torch.empty(shape), torch.empty(c, 1, *kernel), padding=padding, dilation=dilation, groups=c
                ).shape
            res = torch.randn(out_shape, device=device, dtype=dtype)
    return x, weight, bias_t, res


def _run(layout, x, weight, bias, residual, activation, padding, dilation, spatial):
    if layout == "tokens":
        return dwconv3d_tokens(x, spatial, weight, bias, activation=activation, residual=residual)
    return dwconv3d(x, weight, bias, padding=padding, dilation=dilation, activation=activation, residual=residual)


def _run_ref(layout, x, weight, bias, residual, activation, padding, dilation, spatial):
    if layout == "tokens":
        return dwconv3d_tokens_ref(x, spatial, weight, bias, activation=activation, residual=residual)
    return dwconv3d_ref(x, weight, bias, padding=padding, dilation=dilation, activation=activation, residual=residual)


def check_against_reference(
    layout, shape, kernel, activation, residual, dtype, device,
    bias=True, padding="same", dilation=1, grad="random", scale=1.0,
):
    """The fused op (Triton backend) against the float64 reference: output, layout and every gradient."""
    spatial = shape[2:]
    tensors = _tensors(layout, shape, kernel, dtype, device, bias, residual, padding, dilation)
    ours = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    ref = [t.detach().double().requires_grad_() if t is not None else None for t in tensors]
    with fastseg3d.backend("triton"):
        y = _run(layout, *ours, activation, padding, dilation, spatial)
    y_ref = _run_ref(layout, *ref, activation, padding, dilation, spatial)
    assert y.dtype == dtype
    assert_close("y", y, y_ref, dtype, scale)
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last_3d), y.stride()
    elif layout == "tokens":
        assert y.is_contiguous(), y.stride()
    else:
        assert y.is_contiguous(), y.stride()

    if grad == "sum":
        # The gradient of a sum arrives expanded (stride 0): kernels must not assume contiguity.
        y.float().sum().backward()
        y_ref.sum().backward()
    else:
        g = torch.randn_like(y_ref)
        y.backward(g.to(dtype))
        y_ref.backward(g.to(dtype).double())
    for name, a, e in zip(("dx", "dweight", "dbias", "dresidual"), ours, ref):
        if a is not None:
            assert a.grad is not None, f"{name} missing"
            assert_close(name, a.grad, e.grad, dtype, scale)


# ------------------------------------------------------------------------------------------------------
# CPU tier


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("padding,dilation", [((1, 1, 1), (1, 1, 1)), ((0, 2, 1), (1, 2, 1)), ((2, 0, 3), (2, 1, 3))])
def test_backward_reference_matches_autograd(activation, padding, dilation):
    x = torch.randn(2, 3, 6, 7, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 1, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    y = dwconv3d_ref(x, w, b, padding, dilation, activation)
    g = torch.randn_like(y)
    expected = torch.autograd.grad(y, (x, w, b), g)
    got = dwconv3d_backward_ref(g, x.detach(), w.detach(), b.detach(), padding, dilation, activation, [True] * 3)
    for name, a, e in zip(("dx", "dw", "db"), got, expected):
        assert_close(name, a, e, torch.float64)


def test_backward_reference_takes_relus_gradient_at_zero():
    """A channel whose weight and bias are 0 has z = 0 exactly, where ReLU's gradient is 0 (autograd's): that
    channel gets no weight or bias gradient."""
    x = torch.randn(1, 2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    w, b = torch.randn(2, 1, 3, 3, 3, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    w[0], b[0] = 0.0, 0.0
    w.requires_grad_(), b.requires_grad_()
    y = dwconv3d_ref(x, w, b, (1, 1, 1), (1, 1, 1), "relu")
    g = torch.randn_like(y)
    expected = torch.autograd.grad(y, (x, w, b), g)
    got = dwconv3d_backward_ref(g, x.detach(), w.detach(), b.detach(), (1, 1, 1), (1, 1, 1), "relu", [True] * 3)
    assert expected[2][0] == 0
    for name, a, e in zip(("dx", "dw", "db"), got, expected):
        assert_close(name, a, e, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("view", [False, True])
@pytest.mark.parametrize("channels,kernel", [(6, (3, 3, 3)), (64, (1, 3, 5)), (130, (3, 1, 1))])
def test_taps_major_layout_and_zero_padding(monkeypatch, channels, kernel, view, dtype):
    """The kernels' weight layout: (KD, KH, KW, C rounded up to 64) fp32 contiguous, the padding zero (the tap loads
    are unmasked), from NaN-filled allocations so that an unwritten element shows; also from a permuted view of a
    weight (whose layout a padding op may keep)."""
    pytest.importorskip("triton")
    from fastseg3d.kernels.dwconv3d import taps_major

    for name in ("new_empty", "new_zeros"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _real=real, **kw: _real(self, *a, **kw).fill_(
            float("nan")))
    if view:
        kd, kh, kw = kernel
        w = torch.randn(kd, kw, channels, kh, dtype=dtype).permute(2, 0, 3, 1).unsqueeze(1)
    else:
        w = torch.randn(channels, 1, *kernel, dtype=dtype)
    taps = taps_major(w)
    cp = -(-channels // 64) * 64
    assert taps.shape == (*kernel, cp) and taps.dtype == torch.float32 and taps.is_contiguous()
    assert torch.equal(taps[..., :channels], w[:, 0].permute(1, 2, 3, 0).float())
    assert torch.equal(taps[..., channels:], torch.zeros(*kernel, cp - channels))


def test_reference_is_depthwise_conv3d():
    x = torch.randn(2, 4, 5, 6, 7, dtype=torch.float64)
    w = torch.randn(4, 1, 1, 3, 5, dtype=torch.float64)
    b = torch.randn(4, dtype=torch.float64)
    r = torch.randn(2, 4, 5, 6, 7, dtype=torch.float64)
    conv = torch.nn.Conv3d(4, 4, (1, 3, 5), padding=(0, 1, 2), groups=4).double()
    conv.weight.data.copy_(w)
    conv.bias.data.copy_(b)
    assert_close("y", dwconv3d_ref(x, w, b, activation="silu", residual=r), F.silu(conv(x)) + r, torch.float64)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("activation", [None, "gelu"])
def test_op_cpu_branch_matches_reference_and_keeps_layout(layout, activation):
    x, w, b, r = _tensors(layout, (2, 5, 4, 6, 3), (3, 3, 3), torch.float32, "cpu", residual=True)
    y, taps = torch.ops.fastseg3d.dwconv3d(x, w, b, r, [1, 1, 1], [1, 1, 1], activation or "none")
    assert taps.shape == (0,)  # no kernel ran: backward makes its own
    assert_close("y", y, dwconv3d_ref(x, w, b, activation=activation, residual=r), torch.float32)
    fmt = torch.channels_last_3d if layout == "channels_last" else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("policy", ["auto", "torch"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_reference_path_keeps_layout(layout, dtype, policy):
    # fp64 is never fused, and ATen's conv returns it contiguous whatever the input's layout
    x, w, b, r = _tensors(layout, (2, 5, 4, 6, 3), (3, 3, 3), dtype, "cpu", residual=True)
    with fastseg3d.backend(policy):
        y = dwconv3d(x, w, b, activation="gelu", residual=r)
    assert_close("y", y, dwconv3d_ref(x, w, b, activation="gelu", residual=r), dtype)
    fmt = torch.channels_last_3d if layout == "channels_last" else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt), y.stride()


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels", [64, 512])
def test_cpu_half_reference_gradients_on_tiny_channels_last_volumes(channels, dtype, autocast):
    """ATen's CPU bf16 depthwise conv gets the weight gradient wrong on a 2^3 channels-last volume (SegFormer3D's
    stage 4 under CPU autocast trained into infinite gradients); the reference computes half dtypes in fp32 there,
    autocast or not."""
    torch.manual_seed(0)
    param_dtype = torch.float32 if autocast else dtype  # autocast: fp32 parameters, the op's operands cast
    x = torch.randn(4, 8, channels).to(dtype)  # tokens: the volume is a channels-last view
    w = torch.randn(channels, 1, 3, 3, 3).to(dtype).to(param_dtype).requires_grad_()
    b = torch.randn(channels).to(dtype).to(param_dtype).requires_grad_()
    g = torch.randn(4, 8, channels).to(dtype)
    with fastseg3d.backend("torch"):
        with torch.autocast("cpu", dtype=dtype, enabled=autocast):
            y = dwconv3d_tokens(x, (2, 2, 2), w, b, activation="gelu")
        y.backward(g)
        w32, b32 = (t.detach().float().requires_grad_() for t in (w, b))
        dwconv3d_tokens(x.float(), (2, 2, 2), w32, b32, activation="gelu").backward(g.float())
    assert y.dtype == dtype and w.grad.dtype == b.grad.dtype == param_dtype
    for name, got, want in (("dw", w.grad, w32.grad), ("db", b.grad, b32.grad)):
        assert (got.float() - want).abs().max() <= 1e-2 * want.abs().max(), name
    # ATen's dtypes: an fp32 residual promotes the half conv's output
    vol = x.transpose(1, 2).reshape(4, channels, 2, 2, 2)
    assert dwconv3d_ref(vol, w.detach().to(dtype), residual=vol.float()).dtype == torch.float32
    assert dwconv3d_ref(vol, w.detach().to(dtype), residual=vol).dtype == dtype


def test_tokens_reference_path_on_strided_tokens():
    x, w, b, r = _tensors("tokens", (2, 6, 3, 4, 5), (3, 3, 3), torch.float64, "cpu", residual=True)
    assert x.stride(1) == 12  # a view with a unit channel stride, not contiguous
    y = dwconv3d_tokens(x, (3, 4, 5), w, b, activation="gelu", residual=r)
    vol = x.transpose(1, 2).reshape(2, 6, 3, 4, 5)
    expected = F.gelu(F.conv3d(vol, w, b, padding=1, groups=6)).flatten(2).transpose(1, 2) + r
    assert_close("y", y, expected, torch.float64)
    assert y.shape == (2, 60, 6) and y.is_contiguous()


_OPCHECK_CASES = [
    dict(layout="contiguous", kernel=(3, 3, 3), activation="none", bias=True, residual=True, padding=[1, 1, 1]),
    dict(layout="channels_last", kernel=(1, 3, 3), activation="gelu", bias=False, residual=False, padding=[0, 1, 1]),
    dict(layout="contiguous", kernel=(3, 1, 5), activation="silu", bias=True, residual=False, padding=[0, 0, 2]),
]


@pytest.mark.parametrize("case", _OPCHECK_CASES, ids=lambda c: f"{c['layout']}-{c['activation']}")
def test_opcheck(case):
    x, w, b, r = _tensors(case["layout"], (2, 3, 4, 5, 6), case["kernel"], torch.float32, "cpu",
                          bias=case["bias"], residual=case["residual"], padding=case["padding"])
    for t in (x, w, b, r):
        if t is not None:
            t.requires_grad_()
    args = (x, w, b, r, case["padding"], [1, 1, 1], case["activation"])
    torch.library.opcheck(torch.ops.fastseg3d.dwconv3d.default, args)
    y, taps = torch.ops.fastseg3d.dwconv3d(*args)
    g = torch.randn_like(y)
    bwd_args = (g, x.detach(), w.detach(), taps.detach(), b.detach() if b is not None else None, case["padding"],
                [1, 1, 1], case["activation"], [True, True, b is not None])
    torch.library.opcheck(torch.ops.fastseg3d.dwconv3d_backward.default, bwd_args)


def test_compile_fullgraph_op_forward_backward():
    torch._dynamo.reset()
    x, w, b, r = _tensors("channels_last", (2, 4, 5, 6, 7), (3, 3, 3), torch.float32, "cpu", residual=True)

    def fn(x, w, b, r):
        return torch.ops.fastseg3d.dwconv3d(x, w, b, r, [1, 1, 1], [1, 1, 1], "gelu_tanh")[0]

    eager = [t.detach().clone().requires_grad_() for t in (x, w, b, r)]
    comp = [t.detach().clone().requires_grad_() for t in (x, w, b, r)]
    y_e = fn(*eager)
    y_c = torch.compile(fn, fullgraph=True)(*comp)
    assert_close("y", y_c, y_e, torch.float32)
    g = torch.randn_like(y_e)
    y_e.backward(g)
    y_c.backward(g)
    for name, a, e in zip(("dx", "dw", "db", "dr"), comp, eager):
        assert_close(name, a.grad, e.grad, torch.float32)


def test_compile_fullgraph_public_functions():
    torch._dynamo.reset()
    x = torch.randn(2, 30, 8, requires_grad=True)
    w = torch.randn(8, 1, 3, 3, 3, requires_grad=True)

    def fn(x, w):
        y = dwconv3d_tokens(x, (2, 3, 5), w, activation="gelu")
        vol = y.transpose(1, 2).reshape(2, 8, 2, 3, 5)
        return dwconv3d(vol, w, padding=1).sum()

    compiled = torch.compile(fn, fullgraph=True)
    assert_close("loss", compiled(x, w), fn(x, w), torch.float32)
    compiled(x, w).backward()
    assert x.grad is not None and w.grad is not None
    # on the meta device too (memory accounting of compiled code)
    meta = torch.compile(fn, fullgraph=True, backend="aot_eager")(x.detach().to("meta"), w.detach().to("meta"))
    assert meta.device.type == "meta"


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "tokens"])
def test_meta_device_forward_backward(layout):
    shape = (2, 32, 128, 128, 128)  # nothing is allocated: sizes for memory accounting are free on meta
    x, w, b, r = _tensors(layout, shape, (3, 3, 3), torch.bfloat16, "meta", residual=True)
    for t in (x, w, b):
        t.requires_grad_()
    y = _run(layout, x, w, b, r, "gelu", "same", 1, shape[2:])
    assert y.device.type == "meta" and y.dtype == torch.bfloat16
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last_3d)
    y.sum().backward()
    assert x.grad.shape == x.shape and w.grad.shape == w.shape and b.grad.shape == b.shape


@pytest.mark.parametrize("channels,kernel", [(5, (3, 3, 3)), (64, (1, 3, 5)), (130, (7, 7, 7))])
def test_meta_taps_have_the_kernels_shape(channels, kernel):
    """The forward's second output, the weight as the kernels read it (backward reads it again), has on meta the
    shape the launcher gives it, so that memory accounting and launch counts see what a GPU does."""
    pytest.importorskip("triton")
    from fastseg3d.kernels.dwconv3d import taps_major

    w = torch.randn(channels, 1, *kernel)
    x = torch.empty(1, channels, 4, 5, 6, device="meta")
    _, taps = torch.ops.fastseg3d.dwconv3d(x, w.to("meta"), None, None, [k // 2 for k in kernel], [1, 1, 1], "none")
    expected = taps_major(w)
    assert taps.shape == expected.shape and taps.dtype == expected.dtype


def test_autocast_casts_like_conv3d():
    x = torch.randn(1, 4, 3, 4, 5)
    w = torch.randn(4, 1, 3, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = dwconv3d(x, w, activation="relu")
        expected = F.relu(F.conv3d(x, w, padding=1, groups=4))
    assert y.dtype == expected.dtype == torch.bfloat16


def test_autocast_keeps_a_residual_of_another_dtype_out_of_the_cast():
    # as in the plain composition, where bf16 conv output + fp32 residual is fp32: the residual stream keeps its
    # precision
    torch.manual_seed(0)
    x, w, b = torch.randn(1, 4, 3, 4, 5), torch.randn(4, 1, 3, 3, 3), torch.randn(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = dwconv3d(x, w, b, activation="gelu", residual=x)
        plain = F.gelu(F.conv3d(x, w, b, padding=1, groups=4)) + x
        same = dwconv3d(x, w, b, residual=x.bfloat16())
        with pytest.raises(ValueError, match="residual must have"):
            dwconv3d(x, w, b, residual=x[:, :, :2])
    assert y.dtype == plain.dtype == torch.float32
    # the conv and its activation as the kernels compute them (on CPU the reference too): bf16 operands, fp32
    # math, one rounding to bf16; ATen's CPU bf16 conv rounds its output before the activation
    rounded = [t.bfloat16().float() for t in (x, w, b)]
    expected = F.gelu(F.conv3d(*rounded, padding=1, groups=4)).bfloat16().float() + x
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    torch.testing.assert_close(y, plain, rtol=0, atol=2**-5)  # a bf16 ulp at the outputs' magnitude
    assert same.dtype == torch.bfloat16


def test_autocast_still_names_a_bias_that_is_not_a_tensor():
    x, w = torch.randn(1, 4, 3, 4, 5), torch.randn(4, 1, 3, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(TypeError, match="bias must be a torch.Tensor"):
            dwconv3d(x, w, [0.0] * 4)
        with pytest.raises(TypeError, match="residual must be a torch.Tensor"):
            dwconv3d(x, w, residual=1.0)


def test_numpy_integers_as_padding_and_dilation():
    import numpy as np

    x, w = torch.randn(1, 4, 6, 7, 8), torch.randn(4, 1, 3, 3, 3)
    expected = F.conv3d(x, w, padding=2, dilation=2, groups=4)
    torch.testing.assert_close(dwconv3d(x, w, padding=np.int64(2), dilation=np.int32(2)), expected)
    torch.testing.assert_close(dwconv3d(x, w, padding=(np.int64(2),) * 3, dilation=[2, np.int8(2), 2]), expected)
    with pytest.raises(ValueError, match="padding"):
        dwconv3d(x, w, padding=1.0)
    with pytest.raises(ValueError, match="dilation"):
        dwconv3d(x, w, dilation=True)


_BAD = [
    (lambda: dwconv3d(torch.randn(2, 3, 4, 4), torch.randn(3, 1, 3, 3, 3)), ValueError, "x must be 5-D"),
    (lambda: dwconv3d(torch.randn(1, 3, 4, 4, 4), torch.randn(3, 3, 3, 3)), ValueError, "weight must have shape"),
    (lambda: dwconv3d(torch.randn(1, 3, 4, 4, 4), torch.randn(4, 1, 3, 3, 3)), ValueError, "output channels"),
    (lambda: dwconv3d(torch.randn(1, 3, 4, 4, 4), torch.randn(3, 1, 3, 3, 3), torch.randn(4)), ValueError, "bias"),
    (lambda: dwconv3d(torch.randn(1, 3, 4, 4, 4), torch.randn(3, 1, 3, 3, 3).double()), TypeError, "weight has dtype"),
    (lambda: dwconv3d(torch.randn(1, 3, 4, 4, 4), torch.randn(3, 1, 3, 3, 3), torch.randn(3).half()), TypeError,
     "bias has dtype"),
    (lambda: dwconv3d(torch.randn(1, 3, 4, 4, 4), torch.randn(3, 1, 3, 3, 3, device="meta")), TypeError,
     "weight is on"),
    (lambda: dwconv3d(torch.randn(1, 3, 4, 4, 4), torch.randn(3, 1, 3, 3, 3), activation="tanh"), ValueError,
     "activation"),
    (lambda: dwconv3d(torch.randn(1, 3, 4, 4, 4), torch.randn(3, 1, 0, 3, 3)), ValueError, "empty kernel"),
    (lambda: dwconv3d(torch.randn(1, 3, 4, 4, 4, device="meta"), torch.randn(3, 1, 3, 0, 3, device="meta")),
     ValueError, "empty kernel"),
    (lambda: dwconv3d(torch.randn(1, 3, 4, 4, 4), torch.randn(3, 1, 3, 3, 3), padding="full"), ValueError, "padding"),
    (lambda: dwconv3d(torch.randn(1, 3, 4, 4, 4), torch.randn(3, 1, 3, 3, 3), dilation=0), ValueError, "dilation"),
    (lambda: dwconv3d(torch.randn(1, 3, 4, 4, 4), torch.randn(3, 1, 3, 3, 3), residual=torch.randn(1, 3, 4, 4, 5)),
     ValueError, "residual must have"),
    (lambda: dwconv3d(torch.randn(1, 3, 4, 4, 4), torch.randn(3, 1, 3, 3, 3), residual=torch.randn(1, 3, 4, 4, 4)
                      .half()), TypeError, "residual has dtype"),
    (lambda: dwconv3d(torch.randn(1, 3, 4, 4, 4), torch.randn(3, 1, 3, 3, 3),
                      residual=torch.randn(1, 3, 4, 4, 4, device="meta")), TypeError, "residual is on"),
    (lambda: dwconv3d(torch.randn(1, 3, 2, 4, 4), torch.randn(3, 1, 5, 3, 3), padding=0), ValueError, "does not fit"),
    (lambda: dwconv3d(torch.randint(0, 3, (1, 3, 4, 4, 4)), torch.randn(3, 1, 3, 3, 3)), TypeError, "floating"),
    (lambda: dwconv3d([1.0], torch.randn(3, 1, 3, 3, 3)), TypeError, "x must be a torch.Tensor"),
    (lambda: dwconv3d_tokens(torch.randn(2, 24, 3), (2, 3, 5), torch.randn(3, 1, 3, 3, 3)), ValueError,
     "spatial_shape"),
    (lambda: dwconv3d_tokens(torch.randn(2, 3, 4, 3), (2, 3, 2), torch.randn(3, 1, 3, 3, 3)), ValueError, "3-D"),
    (lambda: dwconv3d_tokens(torch.randn(2, 12, 3), (2, 3), torch.randn(3, 1, 3, 3, 3)), ValueError,
     "spatial_shape"),
    (lambda: dwconv3d_tokens(torch.randn(2, 12, 3), (2.0, 3, 2), torch.randn(3, 1, 3, 3, 3)), ValueError,
     "positive ints"),
    (lambda: dwconv3d_tokens(torch.randn(2, 24, 3), (2, 3, 4), torch.randn(3, 1, 3, 3, 3),
                             residual=torch.randn(2, 25, 3)), ValueError, "token shape"),
    (lambda: dwconv3d_tokens(torch.randn(2, 24, 3), (2, 3, 4), torch.randn(3, 1, 3, 3, 3),
                             residual=torch.randn(2, 24, 4)), ValueError, r"token shape \(2, 24, 3\)"),
    # the channel mismatch is named, not the residual that follows from it
    (lambda: dwconv3d_tokens(torch.randn(2, 24, 3), (2, 3, 4), torch.randn(4, 1, 3, 3, 3),
                             residual=torch.randn(2, 24, 3)), ValueError, "weight has 4 output channels but x has 3"),
]


@pytest.mark.parametrize("call,exc,match", _BAD, ids=[m for _, _, m in _BAD])
def test_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_tokens_take_numpy_sizes():
    import numpy as np

    x, w = torch.randn(1, 24, 3), torch.randn(3, 1, 3, 3, 3)
    assert torch.equal(dwconv3d_tokens(x, np.array([2, 3, 4]), w), dwconv3d_tokens(x, (2, 3, 4), w))


def test_backend_policy(monkeypatch, caplog):
    x = torch.randn(1, 2, 3, 4, 5)
    w = torch.randn(2, 1, 3, 3, 3)
    calls = []
    op_module = sys.modules["fastseg3d.ops.dwconv3d"]  # the attribute fastseg3d.ops.dwconv3d is the function
    monkeypatch.setattr(op_module, "dwconv3d_ref", lambda *a, **k: calls.append(1) or dwconv3d_ref(*a, **k))
    with fastseg3d.backend("torch"):
        dwconv3d(x, w)
    assert calls == [1]
    with fastseg3d.backend(" Triton"), pytest.raises(NotImplementedError, match="device=cpu"):  # as the variable
        assert fastseg3d.get_backend() == "triton"
        dwconv3d(x, w)
    assert fastseg3d.get_backend() == "auto"
    with pytest.raises(ValueError, match="backend must be one of"):
        with fastseg3d.backend("cuda"):
            pass
    fastseg3d.backends._logged.clear()
    with caplog.at_level(logging.INFO, logger="fastseg3d"):
        dwconv3d(x, w)
        dwconv3d(x, w)
    fallbacks = [r for r in caplog.records if "falls back" in r.getMessage()]
    assert len(fallbacks) == 1 and "device=cpu" in fallbacks[0].getMessage()
    assert fallbacks[0].levelno == logging.INFO  # the expected path on CPU
    # on a CUDA tensor the user expected the kernel: a warning, which Python shows with no logging set up
    # (a reason met on CPU first is still shown on the GPU); with no device (a fallback by design): INFO
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fastseg3d"):
        for device in ("cpu", "cuda", "cuda", None):
            device = torch.device(device) if device else None
            assert not fastseg3d.backends.select("dwconv3d", ["dtype=torch.float64"], device)
    message = "fastseg3d.dwconv3d falls back to the PyTorch reference: dtype=torch.float64"
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [(logging.INFO, message),
                                                                      (logging.WARNING, message)]
    with pytest.raises(ValueError, match="backend must be one of"):
        with fastseg3d.backend("cuda"):
            pass


@pytest.mark.parametrize(
    "weight_shape,dtype,reason",
    [((6, 1, 3, 3, 3), torch.float32, "channel multiplier 2"), ((3, 1, 4, 4, 4), torch.float32, "kernel size"),
     ((3, 1, 11, 1, 1), torch.float32, "kernel size"), ((3, 1, 3, 3, 3), torch.float64, "dtype=torch.float64")],
)
def test_unsupported_cases_report_reasons_and_fall_back(weight_shape, dtype, reason):
    from fastseg3d.ops.dwconv3d import dwconv3d_unsupported_reasons

    x = torch.randn(1, 3, 12, 5, 6, dtype=dtype)
    w = torch.randn(weight_shape, dtype=dtype)
    out_shape = F.conv3d(x, w, padding="same", groups=3).shape
    assert any(reason in r for r in dwconv3d_unsupported_reasons(x.to("meta"), w.to("meta"), out_shape))
    assert_close("y", dwconv3d(x, w), F.conv3d(x, w, padding="same", groups=3), dtype)


def test_empty_inputs_are_a_reason():
    from fastseg3d.ops.dwconv3d import dwconv3d_unsupported_reasons

    w = torch.empty(3, 1, 3, 3, 3, device="meta")
    assert dwconv3d_unsupported_reasons(torch.empty(1, 3, 4, 4, 4, device="meta"), w, (1, 3, 4, 4, 4)) == []
    assert any("no elements" in r
               for r in dwconv3d_unsupported_reasons(torch.empty(0, 3, 4, 4, 4, device="meta"), w, (0, 3, 4, 4, 4)))


@pytest.mark.parametrize("depth,kernel,padding,dilation", [
    (65540, 9, "valid", 1),  # the output's depth fits a grid axis, the input gradient's pass walks x's
    (65535, 5, "same", 2),  # a grid row per depth rounded up to whole residues of the depth dilation
])
def test_depths_past_the_grid_limit_go_to_the_reference(depth, kernel, padding, dilation):
    from fastseg3d.ops.dwconv3d import _validate, dwconv3d_unsupported_reasons
    from fastseg3d.ops.utils import MAX_GRID_YZ

    x = torch.empty(1, 2, depth, 12, 12, device="meta")
    w = torch.empty(2, 1, kernel, kernel, kernel, device="meta")
    pad, dil, out_shape = _validate(x, w, None, None, padding, (dilation, 1, 1), None)
    assert out_shape[2] <= MAX_GRID_YZ
    assert f"batch or depth above {MAX_GRID_YZ}" in dwconv3d_unsupported_reasons(x, w, out_shape, dil)
    smaller = torch.empty(1, 2, depth - 2 * dilation * (kernel - 1), 12, 12, device="meta")
    _, _, out_shape = _validate(smaller, w, None, None, padding, (dilation, 1, 1), None)
    assert not dwconv3d_unsupported_reasons(smaller, w, out_shape, dil)


def _launch_args(shape, kernel, padding, dilation, layout, dtype):
    """Meta tensors for a launcher call: x in ``layout``, the tap-major weight, the output; padding and dilation
    as triples."""
    from fastseg3d.kernels.dwconv3d import taps_major

    x = torch.empty(shape, dtype=dtype, device="meta")
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    padding = (padding,) * 3 if isinstance(padding, int) else padding
    dilation = (dilation,) * 3 if isinstance(dilation, int) else dilation
    out_shape = [s + 2 * p - d * (k - 1) for s, p, d, k in zip(shape[2:], padding, dilation, kernel)]
    w = taps_major(torch.empty(shape[1], 1, *kernel, device="meta"))
    return x, w, x.new_empty(*shape[:2], *out_shape), padding, dilation


@pytest.mark.parametrize(
    "shape,kernel,padding,dilation,layout,dtype,lanes,rows",
    [((2, 4, 8, 64, 128), (3, 3, 3), 1, 1, "contiguous", torch.bfloat16, 8, 2),
     ((2, 4, 8, 64, 128), (1, 3, 3), (0, 1, 1), 1, "contiguous", torch.float32, 4, 4),
     ((2, 4, 8, 64, 128), (3, 3, 3), 1, (1, 2, 1), "contiguous", torch.bfloat16, 8, 1),  # dilated H taps
     ((2, 4, 8, 64, 128), (3, 3, 3), (2, 1, 1), (2, 1, 1), "contiguous", torch.bfloat16, 8, 2),  # dilated depth
     ((2, 4, 8, 32, 32), (3, 3, 3), 1, 1, "contiguous", torch.bfloat16, 8, 1),  # a plane too short for 2 rows
     ((2, 4, 8, 128, 16), (1, 3, 3), (0, 1, 1), 1, "contiguous", torch.bfloat16, 8, 2),  # narrow: 2 rows, not 4
     ((2, 4, 8, 16, 32), (3, 3, 3), 1, 1, "channels_last", torch.bfloat16, 2, 1),  # columns: 4 channels x 2
     ((2, 4, 8, 16, 32), (1, 3, 3), (0, 1, 1), 1, "channels_last", torch.float32, 4, 1),  # 4 channels x 4
     ((2, 4, 8, 16, 32), (1, 3, 3), (0, 1, 1), 1, "channels_last", torch.bfloat16, 2, 1),  # 8 channels x 2
     ((2, 4, 8, 16, 32), (3, 3, 3), 2, (1, 1, 2), "channels_last", torch.bfloat16, 0, 1),  # dilated W taps
     ((2, 4, 8, 16, 40), (3, 3, 3), 1, 1, "contiguous", torch.bfloat16, 8, 1),  # rows of 40: 8 lanes, UNIT 8
     ((2, 4, 8, 16, 20), (3, 3, 3), 1, 1, "contiguous", torch.bfloat16, 4, 1),  # rows of 20: 8-byte vectors
     ((2, 4, 8, 16, 20), (3, 3, 3), 1, 1, "contiguous", torch.float32, 4, 1),
     ((2, 4, 8, 16, 18), (3, 3, 3), 1, 1, "contiguous", torch.bfloat16, 0, 1),  # rows of 18: no vectors
     ((2, 4, 8, 16, 32), (3, 3, 3), (1, 1, 0), 1, "contiguous", torch.bfloat16, 0, 1),  # center tap unaligned
     ((2, 4, 8, 16, 32), (3, 3, 3), 2, (1, 1, 2), "contiguous", torch.bfloat16, 0, 1)],  # dilated W taps
)
def test_launchers_take_lanes_where_rows_are_aligned(shape, kernel, padding, dilation, layout, dtype, lanes, rows):
    """The W-lane path (one aligned vector load per input row, taps shifted in registers) is taken exactly where
    the JIT can prove each thread's vector aligned; the interpreter tier runs it on every NCDHW 3-wide case. A
    thread's adjacent rows share their input rows where the H taps are undilated and the plane fills 128 threads
    with them. Channel-major tiles take the column path for every undilated rolling walk."""
    from bench.sass import _captured
    from fastseg3d.kernels.dwconv3d import dwconv3d_bwd_weight, dwconv3d_fwd

    x, w, out, padding, dilation = _launch_args(shape, kernel, padding, dilation, layout, dtype)

    def full(kw):  # a W-lane tile holds one vector per thread and row for each of the 128 threads
        return kw["BLOCK_H"] // kw["ROWS"] * (kw["BLOCK_W"] // kw["LANES"]) == 128

    launches = _captured(lambda: dwconv3d_fwd(x, w, None, None, out, padding, dilation, 0))
    assert launches[0][2]["LANES"] == lanes
    assert launches[0][2]["ROWS"] == rows
    if lanes and layout == "contiguous":
        assert full(launches[0][2])
        # every activation keeps the rows in the forward, GELU and GELU-tanh in the dz pass too; relu's and silu's
        # dz passes (too many registers with 2-byte rows) and fp32 stay within 24 accumulators
        within_24 = min(rows, 1 << ((24 // (kernel[0] * lanes)).bit_length() - 1))
        for act, grad, expected in ((1, None, rows), (2, None, rows), (4, None, rows), (2, out, rows), (3, out, rows),
                                    (1, out, within_24), (4, out, within_24)):
            with_act = _captured(lambda: dwconv3d_fwd(x, w, None, None, out, padding, dilation, act, grad=grad))
            assert with_act[0][2]["ROWS"] == expected, (act, grad is not None)
    # W and the strides in units of the lanes where they are not multiples of 16 (the JIT's divisibility)
    assert launches[0][2]["UNIT"] == (lanes if layout == "contiguous" and lanes and shape[4] % 16 else 1)
    launches = _captured(lambda: dwconv3d_bwd_weight(x, out, kernel, padding, dilation, True))
    # the weight gradient: as the forward's plain conv on NCDHW (rows within a window of 48 dz values; with dilated
    # depth taps, which its rolling walk does not take, the general path's W-lane tiles), 2 columns on channels-last
    assert launches[0][2]["LANES"] == (lanes if layout == "contiguous" else 0 if not lanes or dilation[0] > 1 else 2)
    assert launches[0][2]["ROLL"] == (dilation[0] == 1)
    assert launches[0][2]["ROWS"] == rows
    if lanes and layout == "contiguous":
        assert full(launches[0][2])
        assert launches[0][2]["UNIT"] == (lanes if shape[4] % 16 else 1)


def test_bad_backend_env_is_reported():
    """import fastseg3d works (the CLI's --help too); the first op call raises, naming the variable."""
    code = ("import torch, fastseg3d\n"
            "fastseg3d.ops.dwconv3d(torch.randn(1, 2, 3, 3, 3), torch.randn(2, 1, 3, 3, 3))")
    proc = subprocess.run([sys.executable, "-c", code], env={"FASTSEG3D_BACKEND": "cudnn", "PATH": ""},
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "ValueError: FASTSEG3D_BACKEND must be one of" in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    "shape,kernel,padding,dilation,layout,dtype,lanes,rows,warps",
    [((2, 32, 32, 32, 32), (7, 7, 7), 3, 1, "contiguous", torch.bfloat16, 8, 2, 2),  # MobileUtr's ConvUtr at 128^3
     ((2, 64, 16, 16, 16), (9, 9, 9), 4, 1, "contiguous", torch.bfloat16, 8, 1, 1),  # its LGL blocks: 8 x 16 x 16
     ((2, 4, 8, 64, 128), (5, 5, 5), 2, 1, "contiguous", torch.float32, 4, 4, 4),
     ((2, 4, 8, 16, 16), (9, 9, 9), 4, 1, "contiguous", torch.float32, 4, 2, 1),  # 9-wide on 4 lanes
     ((2, 4, 8, 64, 128), (5, 3, 3), (2, 2, 1), (1, 2, 1), "contiguous", torch.bfloat16, 8, 1, 4),  # dilated H
     ((2, 4, 8, 64, 128), (5, 3, 3), (2, 1, 1), 1, "contiguous", torch.bfloat16, 8, 2, 4),  # 3 H taps, 2 rows
     ((2, 4, 8, 1, 16), (7, 7, 7), 3, 1, "contiguous", torch.bfloat16, 0, 1, 4),  # a plane short of a warp
     ((2, 4, 8, 16, 40), (7, 7, 7), 3, 1, "contiguous", torch.bfloat16, 8, 2, 2),  # rows of 40: multiples of 8
     ((2, 4, 8, 12, 12), (9, 9, 9), 4, 1, "contiguous", torch.bfloat16, 4, 2, 1),  # of 12: 8-byte vectors
     ((2, 4, 8, 16, 18), (7, 7, 7), 3, 1, "contiguous", torch.bfloat16, 0, 1, 4),  # of 18: no vectors
     ((2, 4, 8, 16, 32), (5, 5, 5), (2, 2, 1), 1, "contiguous", torch.bfloat16, 0, 1, 4),  # W taps not centred
     ((2, 4, 8, 16, 32), (5, 5, 5), 2, (1, 1, 2), "contiguous", torch.bfloat16, 0, 1, 4)],  # dilated W taps
)
def test_general_path_takes_wide_lanes(shape, kernel, padding, dilation, layout, dtype, lanes, rows, warps):
    """Kernels the rolling walk does not take (depth taps other than 1 and 3, more than 3x3 in-plane taps) run on
    W-lane tiles where the W taps are centred and undilated and the rows aligned: three vector loads per input row,
    the taps shifted in registers. A tile holds one vector per thread and row, with fewer warps on small planes;
    the weight gradient takes the same lanes."""
    from bench.sass import _captured
    from fastseg3d.kernels.dwconv3d import dwconv3d_bwd_weight, dwconv3d_fwd

    x, w, out, padding, dilation = _launch_args(shape, kernel, padding, dilation, layout, dtype)
    for act, grad in ((0, None), (2, None), (4, out)):  # the forward, with GELU, and SiLU's dz pass
        (_, _, kw), = _captured(lambda: dwconv3d_fwd(x, w, None, None, out, padding, dilation, act, grad=grad))
        unit = lanes if lanes and shape[4] % 16 else 1  # W and the strides in units of the lanes, where not 16s
        assert (kw["LANES"], kw["ROWS"], kw["num_warps"], kw["ROLL"], kw["UNIT"]) == (lanes, rows, warps, False, unit)
        if lanes:
            assert kw["BLOCK_H"] // rows * (kw["BLOCK_W"] // lanes) == 32 * warps
    # the weight gradient: the same lanes, with up to two rows of them a thread
    (_, _, kw), _ = _captured(lambda: dwconv3d_bwd_weight(x, out, kernel, padding, dilation, True))
    assert (kw["LANES"], kw["UNIT"], kw["ROLL"], kw["ROWS"]) == (lanes, unit, False, min(2, rows)), kw
    if lanes:
        assert kw["BLOCK_H"] // kw["ROWS"] * (kw["BLOCK_W"] // lanes) == 32 * kw["num_warps"]


@pytest.mark.parametrize(
    "shape,kernel,padding,dilation,dtype,channels,lanes,rows",
    [((2, 32, 24, 24, 24), (7, 7, 7), 3, 1, torch.bfloat16, 4, 4, 1),  # MobileUtr's ConvUtr, channels-last
     ((2, 64, 12, 12, 12), (9, 9, 9), 4, 1, torch.bfloat16, 8, 2, 1),  # its LGL blocks
     ((2, 32, 24, 24, 24), (7, 7, 7), 3, 1, torch.float32, 4, 4, 2),
     ((2, 64, 12, 12, 12), (9, 9, 9), 4, 1, torch.float32, 4, 2, 2),
     ((2, 32, 16, 16, 16), (5, 5, 5), 2, (1, 2, 1), torch.float32, 4, 4, 1),  # dilated H taps: one row
     ((2, 32, 16, 16, 16), (5, 5, 5), (2, 2, 0), 1, torch.bfloat16, 4, 4, 1),  # W taps not centred
     ((2, 32, 16, 16, 2), (1, 7, 7), (0, 3, 3), 1, torch.float16, 4, 2, 1),  # a row narrower than the lanes
     ((2, 32, 16, 16, 16), (5, 5, 5), 2, (1, 1, 2), torch.bfloat16, 0, 0, 1)],  # dilated W taps: a load per tap
)
def test_channel_major_large_kernels_take_columns(shape, kernel, padding, dilation, dtype, channels, lanes, rows):
    """Kernels the rolling walk does not take, on channels-last volumes and tokens (a unit channel stride), run on
    channel-major column tiles where the W taps are undilated: a thread holds `channels` channels at `rows` x
    `lanes` outputs, and each input column it loads serves the lanes (and rows) it feeds. The weight gradient
    takes 2 channels at 4 lanes a thread and splits a depth tap's rows of taps over programs beyond 49 taps (28
    for fp32 and 9-wide rows)."""
    from bench.sass import _captured
    from fastseg3d.kernels.dwconv3d import dwconv3d_bwd_weight, dwconv3d_fwd

    x, w, out, padding, dilation = _launch_args(shape, kernel, padding, dilation, "channels_last", dtype)
    out = out.contiguous(memory_format=torch.channels_last_3d)  # as the op allocates it
    for act, grad, flip in ((0, None, False), (2, None, False), (4, out, False), (0, None, True)):
        (_, _, kw), = _captured(lambda: dwconv3d_fwd(x, w, None, None, out, padding, dilation, act, grad=grad,
                                                     flip=flip))
        assert (kw["LANES"], kw["ROWS"], kw["ROLL"], kw["UNIT"]) == (lanes, rows, False, 1), kw
        if lanes:
            # 128 threads of `channels` x `rows` x `lanes` outputs
            tile = kw["BLOCK_C"] * kw["BLOCK_H"] * kw["BLOCK_W"]
            assert kw["BLOCK_C"] == min(shape[1], 64) and tile == 128 * channels * rows * lanes, kw
            assert kw["PAIRS"] == (dtype == torch.bfloat16), kw
    grids = []
    (_, _, kw), _ = _captured(lambda: dwconv3d_bwd_weight(x, out, kernel, padding, dilation, True), grids)
    taps = 49 if dtype != torch.float32 and kernel[2] <= 7 else 28
    kh_per = min(kernel[1], taps // kernel[2]) if lanes else kernel[1]
    assert (kw["LANES"], kw["KH_PER"], kw["ROLL"]) == (min(4, shape[4]) if lanes else 0, kh_per, False), kw
    assert grids[0][1] == kernel[0] * -(-kernel[1] // kh_per)  # a program per depth tap and row chunk
    if lanes:
        assert kw["BLOCK_C"] * kw["BLOCK_H"] * kw["BLOCK_W"] == 128 * 2 * min(4, shape[4]), kw
        assert kw["PAIRS"] == (dtype == torch.bfloat16), kw


def test_wide_lanes_keep_strides_whole_with_64bit_indexing(monkeypatch):
    """With 64-bit indexing the launchers pass W and the strides as they are (UNIT 1): the kernel's products of
    strides given in units of the lanes would overflow their 32-bit arguments."""
    from bench.sass import _captured
    import fastseg3d.kernels.dwconv3d as k

    x = torch.empty(2, 4, 8, 16, 40, dtype=torch.bfloat16, device="meta")
    w = k.taps_major(torch.empty(4, 1, 7, 7, 7, device="meta"))
    for int32_max, unit in ((2**31 - 1, 8), (16, 1)):
        monkeypatch.setattr(k, "_INT32_MAX", int32_max)
        (_, _, fwd), = _captured(lambda: k.dwconv3d_fwd(x, w, None, None, torch.empty_like(x), (3, 3, 3), (1, 1, 1), 0))
        (_, _, bwd), _ = _captured(lambda: k.dwconv3d_bwd_weight(x, x, (7, 7, 7), (3, 3, 3), (1, 1, 1), True))
        assert (fwd["UNIT"], fwd["INT64"], bwd["UNIT"], bwd["INT64"]) == (unit, unit == 1, unit, unit == 1)


def test_a_weight_gradient_workspace_past_2_31_takes_64bit_indexing(monkeypatch):
    """The weight gradient's per-program partials (rows, taps, C) can pass 2^31 elements where x does not
    (channels-last tiles of one row by 16 columns, 9x9x9 taps): its offsets need 64-bit indexing too."""
    from bench.sass import _captured
    import fastseg3d.kernels.dwconv3d as k
    from fastseg3d.kernels import utils as kernel_utils

    monkeypatch.setattr(kernel_utils, "sm_count", lambda device: 132)  # an H100's depth chunks
    x = torch.empty(1, 64, 32, 864, 864, dtype=torch.bfloat16, device="meta")
    x = x.contiguous(memory_format=torch.channels_last_3d)
    (_, args, kw), _ = _captured(lambda: k.dwconv3d_bwd_weight(x, x, (9, 9, 9), (4, 4, 4), (1, 1, 1), True))
    workspace = args[2]
    assert x.numel() < 2**31 - 1 <= workspace.numel()
    assert kw["INT64"]


# ------------------------------------------------------------------------------------------------------
# Interpreter tier: the Triton kernels on CPU tensors under TRITON_INTERPRET=1 (tiny shapes; fp32 and fp16)

_F32, _F16 = torch.float32, torch.float16
_INTERPRET_CASES = [
    # layout, shape (B, C, D, H, W), kernel, activation, residual, dtype: every activation with and without residual
    ("contiguous", (1, 3, 5, 7, 9), (3, 3, 3), None, False, _F32),
    ("channels_last", (1, 3, 5, 7, 9), (3, 3, 3), "gelu", True, _F32),
    ("tokens", (2, 4, 3, 5, 6), (3, 3, 3), "gelu", True, _F32),
    ("contiguous", (1, 2, 4, 5, 6), (5, 5, 5), "relu", True, _F32),
    ("channels_last", (1, 3, 3, 4, 5), (7, 7, 7), "silu", False, _F32),
    ("contiguous", (2, 3, 3, 5, 7), (1, 3, 3), "gelu_tanh", True, _F32),
    ("tokens", (1, 3, 3, 4, 5), (5, 5, 5), "gelu_tanh", False, _F32),
    ("channels_last", (1, 3, 5, 7, 9), (1, 3, 3), "relu", False, _F16),
    ("contiguous", (1, 3, 5, 7, 9), (3, 3, 3), "gelu", False, _F16),
    ("tokens", (1, 4, 3, 4, 5), (3, 3, 3), "silu", True, _F16),
    ("channels_last", (1, 2, 3, 4, 5), (7, 7, 7), None, True, _F16),
]


@pytest.mark.interpret
@pytest.mark.parametrize(
    "layout,shape,kernel,activation,residual,dtype", _INTERPRET_CASES,
    ids=[f"{c[0]}-{'x'.join(map(str, c[1]))}-k{''.join(map(str, c[2]))}-{c[3]}-res{int(c[4])}-{str(c[5])[6:]}"
         for c in _INTERPRET_CASES],
)
def test_interpret_kernel_matches_reference(poison, layout, shape, kernel, activation, residual, dtype):
    check_against_reference(layout, shape, kernel, activation, residual, dtype, "cpu")


@pytest.mark.interpret
@pytest.mark.parametrize(
    "layout,padding,dilation,activation,bias",
    [("contiguous", (0, 2, 1), (1, 2, 1), "relu", True), ("channels_last", (2, 1, 0), (2, 2, 1), "gelu", False),
     ("contiguous", "same", (2, 1, 2), "silu", False), ("contiguous", (1, 1, 0), (1, 1, 1), "gelu", True)],
)
def test_interpret_padding_dilation_and_no_bias(poison, layout, padding, dilation, activation, bias):
    check_against_reference(layout, (1, 3, 5, 6, 7), (3, 3, 3), activation, True, _F32, "cpu",
                            bias=bias, padding=padding, dilation=dilation)


@pytest.mark.interpret
@pytest.mark.parametrize("layout", ["contiguous", "tokens"])
def test_interpret_strided_bias(poison, layout):
    """A bias that is a strided view (every other element of a buffer): the kernel reads it at unit stride, so it
    must get the view's values, not the buffer's first C (a fuzzing find), in the output and every gradient."""
    torch.manual_seed(0)
    c = 3
    x = torch.randn(1, c, 3, 4, 5)
    if layout == "tokens":
        x = x.flatten(2).transpose(1, 2)  # (B, N, C) with a channel stride of 1
    w = torch.randn(c, 1, 3, 3, 3) / 9
    buffer = torch.randn(2 * c, requires_grad=True)
    grad = None
    for backend in ("triton", "torch"):
        xs, ws = (t.detach().clone().requires_grad_() for t in (x, w))
        bias = buffer[::2]
        assert bias.stride() == (2,)
        with fastseg3d.backend(backend):
            y = (fastseg3d.ops.dwconv3d_tokens(xs, (3, 4, 5), ws, bias, activation="gelu") if layout == "tokens"
                 else fastseg3d.ops.dwconv3d(xs, ws, bias, activation="gelu"))
        grad = torch.randn_like(y) if grad is None else grad
        y.backward(grad)
        got = [y.detach(), xs.grad, ws.grad, buffer.grad.clone()]
        buffer.grad = None
        if backend == "triton":
            fused = got
    for name, a, e in zip(("y", "dx", "dweight", "dbias"), fused, got):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5, msg=name)
    assert fused[3][1::2].eq(0).all()  # the buffer's other elements get no gradient


@pytest.mark.interpret
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_interpret_expanded_grad_output(poison, layout):
    check_against_reference(layout, (1, 3, 4, 5, 6), (3, 3, 3), "gelu", False, _F32, "cpu", grad="sum")


@pytest.mark.interpret
@pytest.mark.parametrize("layout,channels,kernel", [("contiguous", 3, (3, 3, 3)), ("channels_last", 3, (3, 3, 3)),
                                                    ("contiguous", 1, (5, 5, 5)), ("channels_last", 3, (5, 5, 5))])
def test_interpret_64bit_indexing_path(poison, monkeypatch, layout, channels, kernel):
    import fastseg3d.kernels.dwconv3d as k

    monkeypatch.setattr(k, "_INT32_MAX", 16)  # every tensor takes the int64 path
    check_against_reference(layout, (1, channels, 3, 4, 5), kernel, "silu", True, _F32, "cpu")


@pytest.mark.interpret
def test_interpret_gpu_wide_weight_grad_with_dilated_depth(poison, monkeypatch):
    """3x3x3 with dilated depth taps on the tiles a GPU picks: the forward's rolling W-lane walk, and a weight
    gradient on the general path's W-lane tiles with all three depth taps in one program (two rows a thread)."""
    import fastseg3d.kernels.dwconv3d as k

    monkeypatch.setattr(k, "INTERPRET", False)
    check_against_reference("contiguous", (1, 2, 5, 17, 16), (3, 3, 3), "gelu", True, _F16, "cpu",
                            padding=(2, 1, 1), dilation=(2, 1, 1))


@pytest.mark.interpret
@pytest.mark.parametrize("kernel,padding,dilation", [((5, 3, 3), (4, 2, 1), (2, 2, 1)),
                                                     ((5, 3, 5), (1, 0, 2), (1, 1, 1))])
def test_interpret_wide_lanes_padding_dilation(poison, kernel, padding, dilation):
    """The general path's W-lane tiles with dilated depth and H taps (one row a thread) and uncentred depth and H
    padding (the W taps centred, as the path needs)."""
    check_against_reference("contiguous", (1, 2, 5, 9, 8), kernel, "relu", True, _F32, "cpu",
                            padding=padding, dilation=dilation)


_GPU_TILE_CASES = [
    # shape (B, C, D, H, W), kernel, activation, dtype: rows per thread 1, 1, 2, 4, 1 on a GPU
    ((1, 2, 3, 1, 16), (3, 3, 3), None, _F16),
    ((1, 2, 3, 5, 32), (1, 3, 3), "gelu", _F32),
    ((1, 2, 3, 33, 32), (3, 3, 3), None, _F32),
    ((1, 1, 3, 129, 16), (1, 3, 3), None, _F16),
    ((1, 2, 4, 17, 16), (3, 3, 3), "relu", _F16),  # exact in fp16 (silu's fp16 dz, as eager keeps it, costs db 3e-3)
    # the general path's W-lane tiles (one warp each): 2 rows of 8 lanes across the H border, 2 rows of 4 lanes,
    # 9-wide taps reaching a whole 4-lane vector to each side
    ((1, 1, 3, 17, 16), (5, 5, 5), "gelu", _F16),
    ((1, 1, 2, 5, 32), (7, 7, 7), None, _F32),
    ((1, 1, 1, 9, 16), (9, 9, 9), "silu", _F32),
    # rows that are multiples of 8 and 4 elements, not 16: W and the strides go to the kernel in units of the lanes
    ((1, 1, 2, 5, 24), (7, 7, 7), None, _F16),
    ((1, 2, 3, 6, 12), (3, 3, 3), "gelu", _F16),
]


@pytest.mark.interpret
@pytest.mark.parametrize("shape,kernel,activation,dtype", _GPU_TILE_CASES,
                         ids=[f"{'x'.join(map(str, c[0]))}-k{''.join(map(str, c[1]))}-{c[2]}" for c in _GPU_TILE_CASES])
def test_interpret_gpu_lane_tiles(poison, monkeypatch, shape, kernel, activation, dtype):
    """The W-lane tiles a GPU launch picks (under the interpreter the launchers take one large tile instead): planes
    from one row to several tiles, a thread's rows at the H border, tiles holding fewer rows than threads, W and
    the strides in units of the lanes."""
    import fastseg3d.kernels.dwconv3d as k

    monkeypatch.setattr(k, "INTERPRET", False)
    check_against_reference("contiguous", shape, kernel, activation, True, dtype, "cpu")


_GPU_COLUMN_CASES = [
    # layout, shape (B, C, D, H, W), kernel, activation, dtype, padding, dilation: the channel-major column tiles of
    # kernels larger than the rolling walk takes, as a GPU launch picks them: rows at the H border, W not a multiple
    # of the lanes, C not a multiple of the tile's channels, uncentred and dilated taps
    ("channels_last", (1, 8, 2, 9, 13), (7, 7, 7), "gelu", _F16, "same", 1),
    ("channels_last", (1, 6, 2, 7, 10), (5, 5, 5), None, _F32, "same", 1),
    ("tokens", (2, 4, 2, 3, 5), (3, 5, 5), "silu", _F32, "same", 1),
    ("channels_last", (1, 8, 1, 4, 12), (1, 9, 9), None, _F16, "same", 1),
    ("channels_last", (1, 3, 4, 9, 7), (3, 5, 5), "relu", _F32, (1, 4, 1), (1, 2, 1)),
    ("channels_last", (1, 4, 3, 6, 9), (5, 5, 5), None, _F32, (2, 1, 3), 1),
    ("channels_last", (1, 4, 2, 8, 9), (3, 7, 7), "gelu", _F32, "same", 1),  # weight gradient: 4 + 3 rows of taps
    ("channels_last", (1, 4, 2, 5, 3), (5, 5, 5), None, _F16, "same", 1),  # a row narrower than a thread's lanes
    ("tokens", (1, 4, 3, 6, 1), (5, 5, 5), "gelu", _F32, "same", 1),  # one column: one lane
]


@pytest.mark.interpret
@pytest.mark.parametrize("layout,shape,kernel,activation,dtype,padding,dilation", _GPU_COLUMN_CASES,
                         ids=[f"{c[0]}-{'x'.join(map(str, c[1]))}-k{''.join(map(str, c[2]))}"
                              for c in _GPU_COLUMN_CASES])
def test_interpret_gpu_large_kernel_columns(poison, monkeypatch, layout, shape, kernel, activation, dtype, padding,
                                            dilation):
    """Kernels larger than the rolling walk takes on the channel-major column tiles a GPU launch picks (under the
    interpreter the launchers take one large tile instead), forward and every gradient (the dx pass runs the
    forward kernel on flipped taps, the dz pass with the activation's derivative)."""
    import fastseg3d.kernels.dwconv3d as k

    monkeypatch.setattr(k, "INTERPRET", False)
    check_against_reference(layout, shape, kernel, activation, True, dtype, "cpu", padding=padding,
                            dilation=dilation)


_PAIR_CASES = [
    # layout, shape, kernel, activation, residual: bf16 channel-major tiles read as channel pairs in int32 (C a
    # multiple of the tile's channels), and C = 6, which is not (bf16 vectors split in registers)
    ("channels_last", (1, 8, 3, 4, 5), (3, 3, 3), "gelu", True),
    ("tokens", (2, 16, 2, 3, 5), (1, 3, 3), None, False),
    ("channels_last", (1, 6, 3, 4, 5), (3, 3, 3), "silu", True),
    ("channels_last", (1, 8, 3, 4, 5), (5, 5, 5), "gelu", True),  # larger kernels' column tiles
]


@pytest.mark.interpret
@pytest.mark.parametrize("layout,shape,kernel,activation,residual", _PAIR_CASES,
                         ids=[f"{c[0]}-C{c[1][1]}-k{''.join(map(str, c[2]))}" for c in _PAIR_CASES])
def test_interpret_bf16_channel_pairs(poison, layout, shape, kernel, activation, residual):
    """bf16 on channel-major tiles, forward and every gradient (no dot product: the interpreter is exact here);
    the launches read channel pairs exactly where C is a multiple of the tile's channels."""
    import fastseg3d.kernels.dwconv3d as k
    from bench.sass import _captured

    check_against_reference(layout, shape, kernel, activation, residual, torch.bfloat16, "cpu")
    b, c, d, h, w_ = shape
    # tokens (B, N, C) as the op views them, (B, C, D, H, W) with a unit channel stride; or a channels-last volume
    tokens = torch.empty(b, d * h * w_, c, dtype=torch.bfloat16, device="meta")
    x = (tokens.view(b, d, h, w_, c).permute(0, 4, 1, 2, 3) if layout == "tokens"
         else torch.empty(shape, dtype=torch.bfloat16, device="meta").to(memory_format=torch.channels_last_3d))
    w = torch.empty((c, 1, *kernel), dtype=torch.bfloat16, device="meta")
    pad = tuple(s // 2 for s in kernel)
    launches = _captured(lambda: (k.dwconv3d_fwd(x, k.taps_major(w), None, None, torch.empty_like(x), pad,
                                                 (1, 1, 1), 0),
                                  k.dwconv3d_bwd_weight(x, torch.empty_like(x), kernel, pad, (1, 1, 1), True)))
    assert [kw["PAIRS"] for _, _, kw in launches if "PAIRS" in kw] == [shape[1] % 8 == 0] * 2



@pytest.mark.interpret
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_interpret_rolling_walks_without_lanes(poison, layout):
    """A dilated W rules out W lanes and column tiles: the forward's and the weight gradient's rolling walks on
    plain tiles (channel-major ones on channels-last), each depth residue in several runs."""
    check_against_reference(layout, (1, 3, 5, 6, 7), (3, 3, 3), "gelu", True, _F32, "cpu",
                            padding=(1, 1, 2), dilation=(1, 1, 2))


@pytest.mark.interpret
def test_interpret_general_path_with_dilated_h_and_w(poison):
    """More H and W taps than the rolling walk takes, with H and W dilated: the general path's tap addressing in
    the forward, the dz pass and the dx pass (flipped taps)."""
    check_against_reference("contiguous", (1, 2, 4, 7, 8), (3, 5, 5), "silu", True, _F32, "cpu",
                            padding=(1, 4, 4), dilation=(1, 2, 2))


@pytest.mark.interpret
@pytest.mark.parametrize("layout,shape,kernel,activation", [
    ("contiguous", (1, 2, 17, 5, 16), (3, 3, 3), "gelu"),  # W-lane tiles, depth in two runs
    ("channels_last", (1, 4, 4, 5, 9), (5, 5, 5), None),  # column tiles
    ("contiguous", (1, 3, 11, 6, 7), (3, 3, 3), "relu"),  # plain tiles
])
def test_interpret_gpu_tiles_in_several_runs_and_depth_chunks(poison, monkeypatch, layout, shape, kernel, activation):
    """The tiles a GPU launch picks, on a GPU of one SM: the rolling forward's depth residues cut into several runs
    and the weight gradient's depth into several chunks (with an H100's 132 SMs the tests' shapes take one of
    each)."""
    from bench.sass import _captured
    import fastseg3d.kernels.dwconv3d as k
    from fastseg3d.kernels import utils as kernel_utils

    monkeypatch.setattr(k, "INTERPRET", False)
    monkeypatch.setattr(kernel_utils, "sm_count", lambda device: 1)
    x, w, out, pad, dil = _launch_args(shape, kernel, tuple(s // 2 for s in kernel), 1, layout, torch.float32)
    launches = _captured(lambda: (k.dwconv3d_fwd(x, w, None, None, out, pad, dil, 0),
                                  k.dwconv3d_bwd_weight(x, out, kernel, pad, dil, True)))
    fwd, bwd = (dict(zip([n for n in fn.arg_names if n not in kw], args)) | kw for fn, args, kw in launches[:2])
    assert fwd["N_CHUNKS"] > 1 and bwd["D_CHUNK"] < shape[2], (fwd, bwd)
    check_against_reference(layout, shape, kernel, activation, True, _F32, "cpu")


@pytest.mark.interpret
def test_interpret_64bit_offsets_of_a_sparse_view(poison):
    """A small channel-major view whose last depth slices lie past 2^31 elements of its storage (4 GiB reserved,
    a few pages touched): the 64-bit offsets are needed for real, forward and every gradient; the residual is such
    a view too (its offsets are the epilogue's, as a channels-last output or gradient of 2^31 elements has)."""
    from bench.sass import _captured
    import fastseg3d.kernels.dwconv3d as k

    shape, depth_stride = (1, 8, 3, 4, 5), 2**30
    strides = (3 * depth_stride, 1, depth_stride, 5 * 8, 8)
    size = 2 * depth_stride + 4 * 5 * 8
    meta = torch.empty(size, dtype=torch.float16, device="meta").as_strided(shape, strides)
    (_, _, kw), = _captured(lambda: k.dwconv3d_fwd(meta, k.taps_major(torch.empty(8, 1, 3, 3, 3, device="meta")),
                                                   None, None, torch.empty(shape, device="meta", dtype=meta.dtype),
                                                   (1, 1, 1), (1, 1, 1), 0))
    assert kw["INT64"]

    x, residual = (torch.empty(size, dtype=torch.float16).as_strided(shape, strides) for _ in range(2))
    for t in (x, residual):
        t.copy_(torch.randn(shape, dtype=torch.float16))
        t.requires_grad_()
    weight = (torch.randn(8, 1, 3, 3, 3) / 9).half().requires_grad_()
    bias = torch.randn(8).half().requires_grad_()
    with fastseg3d.backend("triton"):
        y = dwconv3d(x, weight, bias, padding=1, activation="gelu", residual=residual)
    ref = [t.detach().double().requires_grad_() for t in (x, weight, bias, residual)]
    y_ref = dwconv3d_ref(*ref[:3], padding=1, activation="gelu") + ref[3]
    assert_close("y", y, y_ref, torch.float16)
    g = torch.randn_like(y_ref).half()
    y.backward(g)
    y_ref.backward(g.double())
    for name, a, e in zip(("dx", "dweight", "dbias", "dresidual"), (x, weight, bias, residual), ref):
        assert_close(name, a.grad, e.grad, torch.float16)


def check_activation_accuracy(activation, device):
    """The kernels' activations and their derivatives against float64 over [-100, 100] (dense on [-12, 12]), near 0
    and at +-3e38. GELU's erf is a rational approximation (absolute error below 5e-7 with the GPU's approximate
    reciprocal, so GELU's below 3e-7 |z|); the others differ from the reference by fp32 rounding (and on a GPU by
    approximate division and exp2, a few ulp)."""
    from fastseg3d.kernels.dwconv3d import ACT_IDS
    from fastseg3d.reference.dwconv3d import activation_grad_ref, activation_ref

    z = torch.cat([torch.linspace(-12, 12, 1 << 16), torch.logspace(-30, 0, 1024), -torch.logspace(-30, 0, 1024),
                   torch.linspace(-100, 100, 1001),
                   torch.tensor([0.0, 6.0, -6.0, 6.5, -6.5, 1e4, -1e4, 1e13, -1e13, 3e38, -3e38])])
    z = torch.cat([z, z.new_zeros(-z.numel() % 1024)]).to(device)
    y, g = torch.full_like(z, float("nan")), torch.full_like(z, float("nan"))
    _activation_probe[(z.numel() // 1024,)](z, y, g, ACT=ACT_IDS[activation], BLOCK=1024)
    z64 = z.cpu().double()
    y, g = y.cpu(), g.cpu()
    y_ref, g_ref = activation_ref(z64, activation), activation_grad_ref(z64, activation)
    err_y, err_g = (y.double() - y_ref).abs(), (g.double() - g_ref).abs()
    if activation == "gelu":
        # erf error e: GELU off by |z| e / 2, its derivative by e / 2 + the exponential's rounding
        assert (err_y <= 3e-7 * z64.abs() + 1e-12).all(), err_y.max()
        assert err_g.max() < 5e-7, err_g.max()
        positive = z64 > 0
        assert (err_y[positive] / y_ref[positive]).max() < 3e-7
        assert (y[z64 <= -6.0] == 0).all()  # erf exactly -1 there, not -1 give or take its error times |z|
    else:
        assert (err_y <= 1e-6 * z64.abs().clamp_min(1.0)).all(), err_y.max()
        if activation == "gelu_tanh":
            # 1 - tanh^2 cancels (up to 2e-6 near z = 5); z^2 overflows past 1.8e19: NaN, as PyTorch's own
            # backward gives there
            bound, err_g = 3e-6, err_g[z64.abs() < 1.8e19]
        else:
            bound = 1e-6
        assert (err_g <= bound).all(), err_g.max()
    # NaN propagates through every activation, as in PyTorch (relu's max.f32 would return 0)
    nan = torch.full((1024,), float("nan"), device=device)
    y = torch.zeros_like(nan)
    _activation_probe[(1,)](nan, y, torch.zeros_like(nan), ACT=ACT_IDS[activation], BLOCK=1024)
    assert y.isnan().all()


@pytest.mark.interpret
# exp2 of large z is inf, as intended; gelu_tanh's derivative is 0 * inf where z^2 overflows
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh", "silu"])
def test_interpret_activation_accuracy(activation):
    check_activation_accuracy(activation, "cpu")


@pytest.mark.interpret
def test_interpret_backward_refuses_foreign_taps():
    x, w, b, _ = _tensors("contiguous", (1, 2, 3, 4, 5), (3, 3, 3), _F32, "cpu")
    g = torch.randn(1, 2, 3, 4, 5)
    with fastseg3d.backend("triton"):
        # C unpadded: the kernels' tap loads read whole 64-channel blocks
        for taps in (torch.zeros(3, 3, 5, 64), torch.zeros(3, 3, 3, 64, dtype=torch.float16), torch.zeros(3, 3, 3, 2)):
            with pytest.raises(ValueError, match="weight_taps must be the forward's tap-major fp32 weight"):
                torch.ops.fastseg3d.dwconv3d_backward(g, x, w, taps, b, [1, 1, 1], [1, 1, 1], "none",
                                                      [True, True, True])


@pytest.mark.interpret
@pytest.mark.parametrize("with_bias,mask", [(True, [True, False, False]), (False, [True, False, True]),
                                            (True, [False, False, True])])
def test_interpret_backward_outputs_not_asked_for(with_bias, mask):
    """Through the dispatcher (which rejects outputs that alias each other), the gradients not asked for are
    distinct empty tensors and the others match the reference (frozen weights: only dx)."""
    x, w, b, _ = _tensors("contiguous", (1, 2, 3, 4, 5), (3, 3, 3), _F32, "cpu", bias=with_bias)
    g = torch.randn(1, 2, 3, 4, 5)
    with fastseg3d.backend("triton"):
        dx, dw, db = torch.ops.fastseg3d.dwconv3d_backward(g, x, w, x.new_empty((0,)), b, [1, 1, 1], [1, 1, 1],
                                                           "gelu", mask)
    ref = dwconv3d_backward_ref(g, x, w, b, [1, 1, 1], [1, 1, 1], "gelu", [mask[0], mask[1], mask[2] and with_bias])
    for name, got, expected, asked in zip(("dx", "dw", "db"), (dx, dw, db), ref, mask):
        if asked and expected is not None:
            assert_close(name, got, expected, _F32)
        else:
            assert got.shape == (0,), name
    assert len({dx.data_ptr(), dw.data_ptr(), db.data_ptr()} - {0}) == sum(t.numel() > 0 for t in (dx, dw, db))
    assert dw is not db and dx is not dw


# ------------------------------------------------------------------------------------------------------
# GPU tier: real sizes, bf16, determinism, compile on CUDA

_GPU_CASES = [
    (layout, shape, kernel, act, dtype)
    for dtype in (torch.float32, torch.float16, torch.bfloat16)
    for layout, shape, kernel, act in [
        ("contiguous", (2, 32, 33, 40, 47), (3, 3, 3), "gelu"),
        # W and every stride multiples of 16: the W-lane forward and weight-gradient paths (the benchmark's NCDHW)
        ("contiguous", (2, 32, 9, 24, 32), (3, 3, 3), "gelu"),
        ("contiguous", (1, 24, 5, 16, 48), (1, 3, 3), None),
        ("channels_last", (2, 64, 17, 24, 31), (3, 3, 3), None),
        ("channels_last", (1, 24, 5, 16, 49), (1, 3, 3), "gelu"),  # channel-major columns, 1x3x3, odd W tail
        ("tokens", (2, 128, 16, 16, 16), (3, 3, 3), "gelu"),
        ("channels_last", (1, 48, 9, 20, 21), (5, 5, 5), "silu"),
        ("contiguous", (1, 16, 7, 33, 35), (1, 7, 7), "gelu_tanh"),
        ("tokens", (1, 160, 4, 6, 5), (3, 3, 3), "relu"),
        # the general path's W-lane tiles: MobileUtr's 7x7x7 and 9x9x9 on rows of 24 and 12 (W and the strides in
        # units of the lanes) and of 32, the H border inside a thread's two rows
        ("contiguous", (2, 8, 11, 23, 24), (7, 7, 7), "gelu"),
        ("contiguous", (2, 4, 12, 12, 12), (9, 9, 9), None),
        ("contiguous", (1, 4, 6, 17, 32), (5, 5, 5), "silu"),
        # the same on channel-major column tiles (bf16 as channel pairs; the weight gradient's 9x9 rows of taps
        # split over three programs)
        ("channels_last", (2, 32, 11, 23, 24), (7, 7, 7), "gelu"),
        ("tokens", (2, 64, 12, 12, 12), (9, 9, 9), None),
    ]
]


@pytest.mark.gpu
@pytest.mark.parametrize("layout,shape,kernel,activation,dtype", _GPU_CASES,
                         ids=[f"{c[0]}-{c[1][1]}c-k{c[2][0]}{c[2][1]}-{c[3]}-{str(c[4])[6:]}" for c in _GPU_CASES])
def test_gpu_kernel_matches_reference(poison, layout, shape, kernel, activation, dtype):
    check_against_reference(layout, shape, kernel, activation, True, dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("layout,shape,kernel,activation,dtype", [
    ("contiguous", (2, 8, 13, 17, 40), (3, 3, 3), "gelu", torch.bfloat16),
    ("channels_last", (2, 32, 13, 17, 24), (3, 3, 3), None, torch.bfloat16),
    ("tokens", (2, 32, 9, 10, 11), (1, 3, 3), "silu", torch.float32),
    ("contiguous", (1, 4, 11, 9, 16), (3, 3, 3), None, torch.float16),
])
def test_gpu_pipelined_walk_matches_reference(poison, monkeypatch, layout, shape, kernel, activation, dtype):
    """The forward walk with its slice loads staged through shared memory (WALK_STAGES = 3, a bench.tune candidate;
    the forward, and the input gradient's pass of the same kernel), on every walk: W-lane, channel-major columns,
    tokens."""
    from fastseg3d.kernels import dwconv3d as kern

    monkeypatch.setattr(kern, "WALK_STAGES", 3)
    check_against_reference(layout, shape, kernel, activation, True, dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh", "silu"])
def test_gpu_activation_accuracy(activation):
    """The interpreter tier's bounds with what only the GPU runs: approximate division and ex2.approx.ftz."""
    check_activation_accuracy(activation, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gpu_bitwise_determinism(layout):
    x, w, b, r = _tensors(layout, (2, 32, 32, 32, 32), (3, 3, 3), torch.bfloat16, "cuda", residual=True)
    runs = []
    for _ in range(3):
        ins = [t.detach().clone().requires_grad_() for t in (x, w, b, r)]
        with fastseg3d.backend("triton"):
            y = dwconv3d(*ins[:3], activation="gelu", residual=ins[3])
        y.backward(torch.ones_like(y))
        runs.append([y.detach()] + [t.grad for t in ins])
    for other in runs[1:]:
        for a, e in zip(runs[0], other):
            assert torch.equal(a, e)


@pytest.mark.gpu
def test_gpu_compile_fullgraph():
    torch._dynamo.reset()
    x, w, b, r = _tensors("channels_last", (2, 32, 16, 20, 24), (3, 3, 3), torch.bfloat16, "cuda", residual=True)

    def fn(x, w, b, r):
        return dwconv3d(x, w, b, activation="gelu", residual=r)

    eager = [t.detach().clone().requires_grad_() for t in (x, w, b, r)]
    comp = [t.detach().clone().requires_grad_() for t in (x, w, b, r)]
    with fastseg3d.backend("triton"):
        y_e = fn(*eager)
        y_c = torch.compile(fn, fullgraph=True)(*comp)
    assert_close("y", y_c, y_e, torch.bfloat16)
    g = torch.randn_like(y_e)
    y_e.backward(g)
    y_c.backward(g)
    for name, a, e in zip(("dx", "dw", "db", "dr"), comp, eager):
        assert_close(name, a.grad, e.grad, torch.bfloat16)


@pytest.mark.gpu
def test_gpu_64bit_indexing_large_tensor():
    free, _ = torch.cuda.mem_get_info()
    if free < 16 * 2**30:
        pytest.skip("needs 16 GiB of free GPU memory")
    x = torch.randn(1, 16, 512, 512, 520, device="cuda", dtype=torch.bfloat16)  # 2.18e9 elements > 2**31
    w = torch.randn(16, 1, 3, 3, 3, device="cuda", dtype=torch.bfloat16)
    with fastseg3d.backend("triton"):
        y = dwconv3d(x, w)
    # the first two and the last three output slices, at the zero depth padding; the last channel's last slices
    # lie past 2**31 elements
    head = F.pad(x[:, :, :3].double(), (0, 0, 0, 0, 1, 0))
    assert_close("y head", y[:, :, :2], F.conv3d(head, w.double(), padding=(0, 1, 1), groups=16), torch.bfloat16)
    tail = F.pad(x[:, :, -4:].double(), (0, 0, 0, 0, 0, 1))
    assert_close("y tail", y[:, :, -3:], F.conv3d(tail, w.double(), padding=(0, 1, 1), groups=16), torch.bfloat16)


@pytest.mark.interpret
def test_interpret_jit_trace_of_same_padding(poison):
    """Under torch.jit.trace the weight's shape is 0-d tensors: the padding 'same' derives from it reached the op's
    int[] argument as tensors (an internal assert in the tracer)."""
    torch.manual_seed(0)
    x, w = torch.randn(1, 3, 4, 5, 3), torch.randn(3, 1, 3, 3, 3)
    tokens = x.flatten(2).transpose(1, 2)
    with torch.no_grad(), fastseg3d.backend("triton"):
        traced = torch.jit.trace(lambda t, k: dwconv3d_tokens(t, (4, 5, 3), k), (tokens, w))
        assert "fastseg3d::dwconv3d" in str(traced.graph)
        torch.testing.assert_close(traced(tokens, w), dwconv3d_tokens_ref(tokens, (4, 5, 3), w), rtol=1e-5, atol=1e-5)
