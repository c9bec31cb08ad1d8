"""fastseg3d.ops.upsample_sum (a sum of trilinear resizes): CPU tier, interpreter tier and GPU tier."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

import fastseg3d
from fastseg3d.ops.upsample_sum import upsample_sum, upsample_sum_unsupported_reasons
from fastseg3d.reference.upsample_sum import upsample_sum_ref
from tests.utils import assert_close

_LAYOUTS = {"ncdhw": torch.contiguous_format, "cl": torch.channels_last_3d}


def _inputs(b, c, sizes, dtype=torch.float32, layout="ncdhw", device="cpu"):
    return [torch.randn(b, c, *s, device=device).to(dtype).contiguous(memory_format=_LAYOUTS[layout])
            .requires_grad_() for s in sizes]


def _check(inputs, size, dtype, scale=1.0, tol=None):
    """The public function (whatever backend is active) against the plain composition in float64, forward and
    every input's gradient; ``dtype`` is the output's, ``tol`` the tolerances' (default: ``dtype``'s)."""
    tol = tol or dtype
    y = upsample_sum(inputs, size)
    out_size = tuple(size) if size is not None else tuple(y.shape[2:])
    assert y.dtype == dtype and y.is_contiguous(memory_format=fastseg3d.ops.utils.layout_of(inputs[0]))
    ref_inputs = [x.detach().double().requires_grad_() for x in inputs]
    expected = upsample_sum_ref(ref_inputs, out_size)
    assert_close("y", y, expected, tol, scale)
    dy = torch.randn_like(expected)
    y.backward(dy.to(y.dtype).contiguous(memory_format=fastseg3d.ops.utils.layout_of(inputs[0])))
    expected.backward(dy)
    for i, (x, xr) in enumerate(zip(inputs, ref_inputs)):
        assert x.grad.dtype == x.dtype
        assert_close(f"d inputs[{i}]", x.grad, xr.grad, tol, scale)


# ------------------------------------------------------------------------------------------------------
# CPU tier


def test_reference_is_the_plain_composition():
    """SegFormer3D's decoder: the maps at 1/4 .. 1/32 brought to the first one's size and summed, in that order."""
    p4, p3, p2, p1 = (torch.randn(2, 8, s, s, s) for s in (2, 4, 8, 16))
    expected = sum((F.interpolate(p, size=(16, 16, 16), mode="trilinear", align_corners=False)
                    for p in (p3, p2)), F.interpolate(p4, size=(16, 16, 16), mode="trilinear", align_corners=False))
    assert torch.equal(upsample_sum_ref([p4, p3, p2, p1], (16, 16, 16)), expected + p1)


@pytest.mark.parametrize("layout", ["ncdhw", "cl"])
def test_cpu_matches_the_plain_composition(layout):
    _check(_inputs(2, 5, [(3, 4, 5), (6, 8, 10), (1, 2, 1)], torch.float64, layout), (6, 8, 10), torch.float64)


def test_default_size_is_the_largest_input():
    inputs = [torch.randn(1, 3, 2, 3, 4), torch.randn(1, 3, 4, 6, 8)]
    assert upsample_sum(inputs).shape == (1, 3, 4, 6, 8)


def test_output_dtype_follows_the_plain_composition():
    """Promoted without autocast; under CPU autocast the resize keeps bf16, as CPU autocast leaves it."""
    a, b = torch.randn(1, 2, 2, 2, 2).bfloat16(), torch.randn(1, 2, 4, 4, 4)
    assert upsample_sum([a, b]).dtype == torch.float32
    assert upsample_sum([a, b.bfloat16()]).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert upsample_sum([a, b.bfloat16()]).dtype == upsample_sum_ref([a, b.bfloat16()], (4, 4, 4)).dtype


def test_meta_follows_cuda_autocast_as_profile_emulates_it():
    """On meta tensors under fastseg3d.profile's CUDA autocast emulation the resize is fp32, as on a GPU."""
    from fastseg3d.profile import _autocast_on_meta

    parts = [torch.empty(2, 4, s, s, s, device="meta", dtype=torch.bfloat16) for s in (2, 4, 8)]
    with _autocast_on_meta(torch.bfloat16):
        y = upsample_sum(parts)
        ref = upsample_sum_ref(parts, (8, 8, 8))
    assert y.dtype == ref.dtype == torch.float32 and y.device.type == "meta"


@pytest.mark.parametrize(
    "inputs, size, error, match",
    [
        ([], None, ValueError, "at least one tensor"),
        (torch.randn(1, 2, 2, 2, 2), None, TypeError, "list or tuple of tensors"),
        ([torch.randn(1, 2, 2, 2)], None, ValueError, r"inputs\[0\] must be 5-D"),
        ([torch.randn(1, 2, 2, 2, 2), torch.randn(1, 3, 2, 2, 2)], None, ValueError, r"inputs\[1\] has batch"),
        ([torch.randn(1, 2, 2, 2, 2), torch.ones(1, 2, 2, 2, 2, dtype=torch.int64)], None, TypeError,
         r"inputs\[1\] must be a floating-point"),
        ([torch.randn(1, 2, 2, 2, 2), torch.randn(1, 2, 2, 2, 2, device="meta")], None, TypeError,
         r"inputs\[1\] is on meta"),
        ([torch.randn(1, 2, 2, 2, 2), "x"], None, TypeError, r"inputs\[1\] must be a torch.Tensor"),
        ([torch.randn(1, 2, 2, 2, 2)], (4, 4), ValueError, "size must be three positive ints"),
        ([torch.randn(1, 2, 2, 2, 2)], (4, 0, 4), ValueError, "size must be three positive ints"),
        ([torch.randn(1, 2, 2, 2, 2)], (4, 4.0, 4), ValueError, "size must be three positive ints"),
        ([torch.randn(1, 2, 4, 4, 4), torch.randn(1, 2, 0, 2, 2)], None, ValueError,
         r"inputs\[1\] has an empty spatial axis"),
    ],
)
def test_bad_input(inputs, size, error, match):
    with pytest.raises(error, match=match):
        upsample_sum(inputs, size)


def test_unsupported_reasons():
    parts = [torch.empty(2, 4, s, s, s, device="meta") for s in (2, 4, 8)]
    assert upsample_sum_unsupported_reasons(parts, (8, 8, 8)) == []
    assert "5 inputs" in upsample_sum_unsupported_reasons(parts + parts[:2], (8, 8, 8))[0]
    assert "inputs[1] dtype=torch.float64" in upsample_sum_unsupported_reasons(
        [parts[0], parts[1].double()], (8, 8, 8))[0]
    assert "no elements" in upsample_sum_unsupported_reasons([torch.empty(2, 4, 0, 2, 2, device="meta")],
                                                             (2, 2, 2))[0]


def test_more_inputs_than_the_kernel_takes_run_the_reference():
    inputs = _inputs(1, 3, [(2, 2, 2)] * 5, torch.float64)
    _check(inputs, (3, 3, 3), torch.float64)


@pytest.mark.parametrize("layout", ["ncdhw", "cl"])
@pytest.mark.parametrize("count", [1, 3])
def test_opcheck(layout, count):
    xs = _inputs(2, 3, [(4, 5, 6), (2, 3, 3), (4, 5, 6)][:count], torch.float32, layout)
    args = (*xs, *[None] * (4 - count), [4, 5, 6], torch.float32)
    # test_aot_dispatch_dynamic included: backward's resizes go through fastseg3d::upsample_adjoint (ATen's
    # upsample backward takes no symbolic sizes)
    torch.library.opcheck(torch.ops.fastseg3d.upsample_sum.default, args)


@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph_forward_backward(dynamic):
    xs = _inputs(2, 4, [(2, 2, 2), (4, 4, 4), (8, 8, 8)], torch.float32, "cl")
    xs2 = [x.detach().clone().requires_grad_() for x in xs]

    def fn(*xs):
        return upsample_sum(list(xs), (8, 8, 8)).square().sum()

    fn(*xs).backward()
    torch.compile(fn, fullgraph=True, dynamic=dynamic)(*xs2).backward()
    for i, (a, b) in enumerate(zip(xs2, xs)):
        assert_close(f"d inputs[{i}]", a.grad, b.grad, torch.float32)


def test_op_compiles_with_dynamic_shapes_forward_backward():
    """The op itself (on CPU the public function takes the reference) traced with symbolic sizes, backward too."""
    xs = _inputs(2, 3, [(2, 3, 2), (4, 6, 5)], torch.float32, "ncdhw")
    xs2 = [x.detach().clone().requires_grad_() for x in xs]

    def fn(a, b):
        return torch.ops.fastseg3d.upsample_sum(a, b, None, None, [4, 6, 5], torch.float32).square().sum()

    fn(*xs).backward()
    torch._dynamo.reset()
    torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")(*xs2).backward()
    for i, (a, b) in enumerate(zip(xs2, xs)):
        assert_close(f"d inputs[{i}]", a.grad, b.grad, torch.float32)


@pytest.mark.parametrize("shape,size", [((2, 3, 3, 4, 5), (6, 8, 5)), ((1, 2, 7, 3, 9), (3, 8, 4)),
                                        ((1, 2, 4, 3), (8, 9)), ((1, 1, 5, 2), (2, 7))], ids=str)
def test_interpolation_adjoint_is_aten_upsample_backward(shape, size):
    """The adjoint a GPU takes under deterministic algorithms (interpolation matrices, no atomics) against ATen's
    backward, upsampling and downsampling, 2-D and 3-D."""
    from fastseg3d.ops.upsample_sum import interpolation_adjoint

    g = torch.randn(*shape[:2], *size, dtype=torch.float64)
    backward = (torch.ops.aten.upsample_trilinear3d_backward if g.dim() == 5
                else torch.ops.aten.upsample_bilinear2d_backward)
    expected = backward(g, list(size), list(shape), False)
    assert_close("adjoint", interpolation_adjoint(g, shape).double(), expected, torch.float32)
    assert interpolation_adjoint(g.float(), shape).dtype == torch.float32


def test_meta_device_forward_backward():
    parts = [torch.empty(2, 4, s, s, s, device="meta", dtype=torch.bfloat16).contiguous(
        memory_format=torch.channels_last_3d).requires_grad_() for s in (2, 4, 8)]
    y = upsample_sum(parts)
    assert y.shape == (2, 4, 8, 8, 8) and y.is_contiguous(memory_format=torch.channels_last_3d)
    assert y.grad_fn.name().startswith("upsample_sum")
    y.sum().backward()
    assert [p.grad.shape for p in parts] == [p.shape for p in parts]
    assert all(p.grad.dtype == torch.bfloat16 for p in parts)


def test_channels_past_the_grid_are_a_reason():
    c = 4 * 65535
    parts = [torch.empty(1, c + 1, 1, 1, 2, device="meta"), torch.empty(1, c + 1, 1, 1, 1, device="meta")]
    assert any("channels above" in r for r in upsample_sum_unsupported_reasons(parts, (1, 1, 2)))
    assert upsample_sum_unsupported_reasons([p[:, :c] for p in parts], (1, 1, 2)) == []


# ------------------------------------------------------------------------------------------------------
# Interpreter tier: the Triton kernel on CPU (TRITON_INTERPRET=1)

# (sizes, output size): integer factors per axis (SegFormer3D's), non-integer ratios, downsizing, a size-1 axis,
# an input already at the output size, one to four inputs
_CASES = [
    ([(2, 2, 2), (4, 4, 4), (8, 8, 8)], (8, 8, 8)),
    ([(3, 5, 2), (7, 3, 4)], (7, 9, 5)),
    ([(1, 4, 6), (5, 2, 3), (2, 2, 2), (5, 4, 6)], (5, 4, 6)),
    ([(6, 7, 9)], (3, 4, 5)),
    ([(1, 1, 1), (2, 3, 1)], (3, 3, 2)),
]


@pytest.mark.interpret
@pytest.mark.parametrize("sizes, size", _CASES, ids=[str(i) for i in range(len(_CASES))])
@pytest.mark.parametrize("layout", ["ncdhw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_matches_the_plain_composition(sizes, size, layout, dtype, poison):
    with fastseg3d.backend("triton"):
        _check(_inputs(2, 5, sizes, dtype, layout), size, dtype)


@pytest.mark.interpret
def test_kernel_takes_mixed_dtypes_and_many_channels(poison):
    """fp16 and fp32 inputs (promoted to fp32), 70 channels on channels-last: two channel blocks, a partial one."""
    a, b = _inputs(1, 70, [(2, 3, 2), (4, 5, 4)], torch.float16, "cl")
    b = b.detach().float().requires_grad_()
    with fastseg3d.backend("triton"):
        _check([a, b], (4, 5, 4), torch.float32, tol=torch.float16)  # a's gradient is rounded to fp16


@pytest.mark.interpret
def test_kernel_refuses_more_than_four_inputs_under_the_triton_policy():
    with fastseg3d.backend("triton"), pytest.raises(NotImplementedError, match="5 inputs"):
        upsample_sum(_inputs(1, 2, [(2, 2, 2)] * 5), (3, 3, 3))


@pytest.mark.interpret
@pytest.mark.parametrize("layout", ["ncdhw", "cl"])
def test_kernel_takes_a_one_voxel_view_first(layout, poison):
    """inputs[0] a one-voxel view (B, C, 1, 1, 1) of a larger map: once copied it is contiguous in both layouts (its
    strides say channels-last), and the kernel must read every input in the layout the others were copied to (it
    read NCDHW inputs as channels-last). With only one-voxel inputs the output still takes inputs[0]'s layout."""
    (big,) = _inputs(2, 5, [(3, 3, 3)], torch.float32, layout)
    x0 = big.detach()[:, :, 1:2, :1, 2:].requires_grad_()
    (x1,) = _inputs(2, 5, [(3, 4, 5)], torch.float32, layout)
    with fastseg3d.backend("triton"):
        _check([x0, x1], (3, 4, 5), torch.float32)
        x0.grad = None
        _check([x0], (3, 4, 5), torch.float32)


@pytest.mark.interpret
def test_kernel_64bit_indexing(monkeypatch, poison):
    k = importlib.import_module("fastseg3d.kernels.upsample_sum")
    monkeypatch.setattr(k, "_INT32_MAX", 16)  # every launch takes the int64 path
    with fastseg3d.backend("triton"):
        _check(_inputs(2, 3, [(2, 3, 2), (5, 6, 4)], torch.float32, "cl"), (5, 6, 4), torch.float32)
        _check(_inputs(2, 3, [(2, 3, 2), (5, 6, 4)], torch.float32, "ncdhw"), (5, 6, 4), torch.float32)


# ------------------------------------------------------------------------------------------------------
# GPU tier


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["ncdhw", "cl"])
def test_gpu_kernel_matches_the_plain_composition(layout, dtype, poison):
    """SegFormer3D's decoder at a 96^3 input (256 channels at 24^3 .. 3^3) and odd sizes."""
    with fastseg3d.backend("triton"):
        _check(_inputs(2, 256, [(3, 3, 3), (6, 6, 6), (12, 12, 12), (24, 24, 24)], dtype, layout, "cuda"),
               (24, 24, 24), dtype)
        _check(_inputs(1, 37, [(5, 7, 3), (9, 13, 11)], dtype, layout, "cuda"), (17, 13, 12), dtype)


@pytest.mark.gpu
def test_gpu_64bit_indexing_large_tensor(poison):
    """An output of 2.18e9 elements (> 2^31), bf16 NCDHW: its last channel lies past 2^31 elements, checked against
    the resizes of that channel alone (channels do not mix)."""
    free, _ = torch.cuda.mem_get_info()
    if free < 12 * 2**30:
        pytest.skip("needs 12 GiB of free GPU memory")
    parts = [torch.randn(1, 256, *s, device="cuda", dtype=torch.bfloat16) for s in ((65, 64, 64), (65, 128, 128))]
    size = (130, 256, 256)
    with fastseg3d.backend("triton"):
        y = upsample_sum(parts, size)
    assert y.numel() > 2**31
    for c in (0, 255):
        expected = upsample_sum_ref([p[:, c:c + 1].double() for p in parts], size)
        assert_close(f"y[:, {c}]", y[:, c:c + 1], expected, torch.bfloat16)

@pytest.mark.gpu
def test_gpu_backward_under_deterministic_algorithms_is_reproducible():
    """ATen's CUDA upsample backward accumulates with atomics (an alert under deterministic algorithms): the
    resizes' adjoint there is the interpolation matrices', bitwise reproducible and equal to the plain
    composition's. (warn_only: cuBLAS alerts too unless CUBLAS_WORKSPACE_CONFIG was set before its first use,
    as the trainer sets it; the alerts of upsampling are what must not appear.)"""
    import warnings

    parts = _inputs(2, 64, [(4, 4, 4), (8, 8, 8), (16, 16, 16)], torch.float32, "cl", "cuda")
    g = torch.randn(2, 64, 16, 16, 16, device="cuda")
    expected = torch.autograd.grad(upsample_sum_ref(parts, (16, 16, 16)), parts, g)
    torch.use_deterministic_algorithms(True, warn_only=True)  # conftest restores the setting
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runs = [torch.autograd.grad(upsample_sum(parts), parts, g) for _ in range(2)]
    assert not [w for w in caught if "upsample" in str(w.message)], [str(w.message) for w in caught]
    for i, (a, b, e) in enumerate(zip(*runs, expected)):
        assert torch.equal(a, b), f"inputs[{i}]"
        assert_close(f"d inputs[{i}]", a, e, torch.float32)


@pytest.mark.gpu
def test_gpu_under_cuda_autocast_writes_fp32_as_the_plain_composition():
    parts = _inputs(2, 64, [(4, 4, 4), (8, 8, 8), (16, 16, 16)], torch.bfloat16, "cl", "cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = upsample_sum(parts)
        ref = upsample_sum_ref([p.detach() for p in parts], (16, 16, 16))
    assert y.dtype == ref.dtype == torch.float32
    assert_close("y", y, ref, torch.float32)
