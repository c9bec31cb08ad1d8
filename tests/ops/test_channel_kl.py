"""fastseg3d.ops.channel_kl (MISSU's DistillKL): CPU tier, interpreter tier and GPU tier."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

import fastseg3d
from fastseg3d.ops.channel_kl import channel_kl, channel_kl_unsupported_reasons
from fastseg3d.reference.channel_kl import channel_kl_fused_ref, channel_kl_ref
from tests.utils import assert_close


def _released(student, teacher, reduction):
    """MISSU's DistillKL re-derived in float64 as released: F.kl_div(log_softmax(s), softmax(t).detach(), 'sum')
    divided by size0*size1*size3*size4 of the 5-D size (the code names it (D, B, C, H, W)); "mean" divides by
    B*D*H*W instead."""
    kl = F.kl_div(F.log_softmax(student.double(), dim=1), F.softmax(teacher.double(), dim=1).detach(), reduction="sum")
    s0, s1, s2, s3, s4 = student.shape
    return kl / (s0 * s1 * s3 * s4) if reduction == "faithful" else kl / (s0 * s2 * s3 * s4)


def _features(shape, dtype=torch.float32, device="cpu"):
    return (1.5 * torch.randn(shape, device=device)).to(dtype).requires_grad_()


_SHAPES = [(2, 5, 3, 4, 5), (1, 16, 7, 3, 2), (3, 2, 1, 5, 9)]


# ------------------------------------------------------------------------------------------------------
# CPU tier


@pytest.mark.parametrize("shape", _SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("reduction", ["mean", "faithful"])
def test_reference_matches_released_formula(shape, reduction):
    s, t = _features(shape, torch.float64), _features(shape, torch.float64)
    loss = channel_kl_ref(s, t, reduction)
    expected = _released(s, t, reduction)
    assert_close("loss", loss, expected, torch.float64)
    loss.backward()
    g_s = s.grad.clone()
    s.grad = None
    expected.backward()
    assert_close("dstudent", g_s, s.grad, torch.float64)
    assert t.grad is None  # the teacher is detached


@pytest.mark.parametrize("reduction", ["mean", "faithful"])
def test_explicit_gradient_matches_autograd(reduction):
    s, t = _features((2, 6, 3, 4, 5), torch.float64), _features((2, 6, 3, 4, 5), torch.float64)
    loss, grad = channel_kl_fused_ref(s.detach(), t.detach(), reduction, True)
    expected = _released(s, t, reduction)
    expected.backward()
    assert_close("loss", loss, expected, torch.float32)
    assert_close("dstudent", grad, s.grad, torch.float64)


@pytest.mark.parametrize("channels,depth,factor", [(64, 32, 0.5), (32, 64, 2.0), (16, 128, 8.0)])
def test_faithful_is_mean_times_depth_over_channels_at_missu_levels(channels, depth, factor):
    # seeds.md 4.3: the released normalisation = (mean per-voxel KL) * D / C: 0.5, 2 and 8 at MISSU's three levels
    s, t = torch.randn(1, channels, depth, 3, 2), torch.randn(1, channels, depth, 3, 2)
    ratio = channel_kl(s, t, "faithful") / channel_kl(s, t, "mean")
    assert abs(ratio.item() - factor) < 1e-5 * factor


def test_zero_for_identical_maps():
    x = torch.randn(2, 8, 3, 4, 5, dtype=torch.float64)
    assert channel_kl(x, x.clone()).abs().item() < 1e-12
    assert channel_kl(x + 3.0, x).abs().item() < 1e-12


def test_opcheck_fp16_channels_last():
    # fp16 with channels-last inputs; on meta tensors the op gives the real one's dtype and strides
    s = _features((2, 3, 4, 5, 6), torch.float16).detach().contiguous(memory_format=torch.channels_last_3d)
    t = _features((2, 3, 4, 5, 6), torch.float16).detach().contiguous(memory_format=torch.channels_last_3d)
    torch.library.opcheck(torch.ops.fastseg3d.channel_kl.default, (s.requires_grad_(), t, "mean", True))
    _, real = torch.ops.fastseg3d.channel_kl(s, t, "mean", True)
    _, meta = torch.ops.fastseg3d.channel_kl(s.to("meta"), t.to("meta"), "mean", True)
    assert (real.dtype, real.stride()) == (meta.dtype, meta.stride()) and real.dtype == torch.float32


@pytest.mark.parametrize("reduction,need", [("mean", True), ("faithful", True), ("faithful", False)])
def test_opcheck(reduction, need):
    s, t = _features((2, 3, 4, 5, 6)), _features((2, 3, 4, 5, 6)).detach()
    s.requires_grad_(need)
    torch.library.opcheck(torch.ops.fastseg3d.channel_kl.default, (s, t, reduction, need))


def test_compile_fullgraph_op_forward_backward():
    torch._dynamo.reset()
    s, t = _features((2, 4, 3, 4, 5)), _features((2, 4, 3, 4, 5)).detach()

    def fn(s, t):
        return torch.ops.fastseg3d.channel_kl(s, t, "faithful", True)[0]

    eager, comp = s.detach().clone().requires_grad_(), s.detach().clone().requires_grad_()
    y_e, y_c = fn(eager, t), torch.compile(fn, fullgraph=True)(comp, t)
    assert_close("loss", y_c, y_e, torch.float32)
    (2.0 * y_e).backward()
    (2.0 * y_c).backward()
    assert_close("dstudent", comp.grad, eager.grad, torch.float32)


def test_compile_fullgraph_public_function():
    torch._dynamo.reset()
    s, t = _features((1, 4, 2, 3, 4)), _features((1, 4, 2, 3, 4))
    compiled = torch.compile(lambda s, t: channel_kl(s, t) + channel_kl(s, t, "faithful"), fullgraph=True)
    loss = compiled(s, t)
    assert_close("loss", loss, _released(s, t, "mean") + _released(s, t, "faithful"), torch.float32)
    loss.backward()
    assert s.grad is not None and t.grad is None


def test_meta_device_forward_backward():
    s = torch.empty(2, 16, 128, 128, 128, device="meta", dtype=torch.bfloat16, requires_grad=True)
    t = torch.empty(2, 16, 128, 128, 128, device="meta", dtype=torch.bfloat16, requires_grad=True)
    loss = channel_kl(s, t, "faithful")
    assert loss.device.type == "meta" and loss.shape == () and loss.dtype == torch.float32
    loss.backward()
    assert s.grad.shape == s.shape and t.grad is None


_X = torch.randn(2, 3, 4, 4, 4)
_BAD = [
    (lambda: channel_kl(torch.randn(2, 3, 4, 4), _X), ValueError, "student must be a 5-D"),
    (lambda: channel_kl(_X, torch.randn(2, 3, 4, 4)), ValueError, "teacher must be a 5-D"),
    (lambda: channel_kl(torch.randn(1, 3, 4, 4, 4), _X), ValueError, "batch sizes differ"),
    (lambda: channel_kl(torch.randn(2, 4, 4, 4, 4), _X), ValueError, "channel counts differ"),
    (lambda: channel_kl(torch.randn(2, 3, 2, 4, 4), _X), ValueError, "one spatial shape"),
    (lambda: channel_kl(_X, _X, reduction="sum"), ValueError, "reduction"),
    (lambda: channel_kl(_X, _X.to("meta")), TypeError, "is on"),
    (lambda: channel_kl(_X.int(), _X.int()), TypeError, "floating"),
    (lambda: channel_kl(None, _X), TypeError, "torch.Tensor"),
]


@pytest.mark.parametrize("call,exc,match", _BAD, ids=[f"{i}-{m}" for i, (_, _, m) in enumerate(_BAD)])
def test_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_backend_policy(monkeypatch):
    s, t = torch.randn(1, 3, 2, 2, 2), torch.randn(1, 3, 2, 2, 2)
    calls = []
    module = sys.modules["fastseg3d.ops.channel_kl"]
    monkeypatch.setattr(module, "channel_kl_ref", lambda *a, **k: calls.append(1) or channel_kl_ref(*a, **k))
    with fastseg3d.backend("torch"):
        channel_kl(s, t)
    assert calls == [1]
    with fastseg3d.backend("triton"), pytest.raises(NotImplementedError, match="device=cpu"):
        channel_kl(s, t)
    reasons = channel_kl_unsupported_reasons(torch.empty(1, 512, 2, 2, 2, device="meta", dtype=torch.float64))
    assert any("float64" in r for r in reasons) and any("512 channels" in r for r in reasons)


@pytest.mark.parametrize("student,teacher", [(torch.bfloat16, torch.float32), (torch.float32, torch.float16)],
                         ids=["bf16-f32", "f32-f16"])
def test_mixed_dtypes(student, teacher):
    """A decoder feature and a skip of different dtypes (autocast leaves a feature taken after a normalisation
    layer in fp32): the loss as from float64 copies, the gradient in the student's dtype, the fused op's CPU
    branch and fake implementation likewise."""
    s, t = _features((2, 5, 3, 4, 5), student), _features((2, 5, 3, 4, 5), teacher)
    ref_s = s.detach().double().requires_grad_()
    loss = channel_kl(s, t, "faithful")
    expected = _released(ref_s, t.detach(), "faithful")
    coarse = torch.bfloat16 if torch.bfloat16 in (student, teacher) else torch.float16
    assert_close("loss", loss, expected, coarse)
    (1.3 * loss).backward()
    (1.3 * expected).backward()
    assert s.grad.dtype == student
    assert_close("dstudent", s.grad, ref_s.grad, student)
    args = (s.detach().requires_grad_(), t.detach(), "mean", True)
    torch.library.opcheck(torch.ops.fastseg3d.channel_kl.default, args)
    assert torch.ops.fastseg3d.channel_kl(*args)[1].dtype == student
    meta = torch.empty(1, 3, 2, 2, 2, device="meta")
    assert not any("dtype" in r for r in channel_kl_unsupported_reasons(meta, meta.bfloat16()))
    assert any("teacher dtype=torch.float64" in r for r in channel_kl_unsupported_reasons(meta, meta.double()))


def test_fp16_gradients_survive_a_loss_scale():
    """fp16 training scales the loss by GradScaler's 2^16 before backward. The gradients made in the forward are of
    order 1 / (B x voxels), below fp16's normal range at this size: they are kept in fp32, and the scale, which fp16
    cannot represent, is applied before the cast (kept in fp16 they came back as inf, or as a few bits)."""
    s, t = _features((2, 16, 32, 32, 32), torch.float16), _features((2, 16, 32, 32, 32), torch.float16)
    ref_s = s.detach().double().requires_grad_()
    loss, grad = torch.ops.fastseg3d.channel_kl(s, t.detach(), "mean", True)
    assert grad.dtype == torch.float32
    (2.0**16 * loss).backward()
    (2.0**16 * _released(ref_s, t.detach(), "mean")).backward()
    assert s.grad.dtype == torch.float16
    assert_close("dstudent", s.grad, ref_s.grad, torch.float16)


def test_batch_past_the_grid_is_a_reason():
    big = torch.empty(65536, 4, 1, 1, 2, device="meta")
    assert any("batch above" in r for r in channel_kl_unsupported_reasons(big, big))
    assert channel_kl_unsupported_reasons(big[:65535], big[:65535]) == []


# ------------------------------------------------------------------------------------------------------
# Interpreter tier


def check_against_reference(shape, reduction, dtype, device, grad_scale=1.3, teacher_dtype=None):
    s, t = _features(shape, dtype, device), _features(shape, teacher_dtype or dtype, device)
    ref_s = s.detach().double().requires_grad_()
    with fastseg3d.backend("triton"):
        loss = channel_kl(s, t, reduction)
    expected = _released(ref_s, t.detach(), reduction)
    assert loss.dtype == torch.float32 and loss.shape == ()
    coarse = next((d for d in (torch.bfloat16, torch.float16) if d in (dtype, t.dtype)), torch.float32)
    assert_close("loss", loss, expected, coarse)
    (grad_scale * loss).backward()
    (grad_scale * expected).backward()
    assert s.grad.dtype == dtype and t.grad is None
    assert_close("dstudent", s.grad, ref_s.grad, dtype)


_INTERPRET_CASES = [
    ((2, 5, 3, 4, 5), "mean", torch.float32),
    ((1, 16, 3, 5, 7), "faithful", torch.float32),
    ((1, 3, 2, 3, 33), "faithful", torch.float32),
    ((2, 64, 2, 3, 3), "mean", torch.float32),
    ((1, 80, 2, 2, 3), "mean", torch.float32),  # beyond 64 channels: Triton's own 2-D layout
    ((2, 5, 3, 4, 5), "faithful", torch.float16),
    ((1, 16, 3, 5, 7), "mean", torch.float16),
]


@pytest.mark.interpret
@pytest.mark.parametrize("shape,reduction,dtype", _INTERPRET_CASES,
                         ids=[f"{'x'.join(map(str, c[0]))}-{c[1]}-{str(c[2])[6:]}" for c in _INTERPRET_CASES])
def test_interpret_kernel_matches_reference(poison, shape, reduction, dtype):
    check_against_reference(shape, reduction, dtype, "cpu")


@pytest.mark.interpret
def test_interpret_fp16_loss_scale(poison):
    # fp16 as GradScaler trains it: the kernels keep the forward-made gradients in fp32 and the 2^16 loss scale
    # (inf in fp16) is applied before the cast
    check_against_reference((1, 6, 2, 3, 5), "mean", torch.float16, "cpu", grad_scale=2.0**16)


@pytest.mark.interpret
def test_interpret_unit_incoming_gradient(poison):
    # loss.backward() as training calls it: backward hands over the forward's gradient without scaling it
    check_against_reference((1, 6, 2, 3, 5), "mean", torch.float16, "cpu", grad_scale=1.0)


@pytest.mark.interpret
def test_interpret_mixed_dtypes(poison):
    check_against_reference((2, 5, 3, 4, 5), "faithful", torch.bfloat16, "cpu", teacher_dtype=torch.float32)
    check_against_reference((1, 16, 2, 3, 5), "mean", torch.float32, "cpu", teacher_dtype=torch.float16)


@pytest.mark.interpret
def test_interpret_forward_without_grad(poison):
    s, t = _features((1, 4, 2, 3, 4)), _features((1, 4, 2, 3, 4))
    with fastseg3d.backend("triton"), torch.no_grad():
        loss = channel_kl(s, t, "faithful")
    assert_close("loss", loss, _released(s.detach(), t.detach(), "faithful"), torch.float32)


# ------------------------------------------------------------------------------------------------------
# GPU tier: MISSU's three levels (at a 64^3 input here; the benchmark runs 128^3)

_GPU_CASES = [(dtype, level) for dtype in (torch.float32, torch.float16, torch.bfloat16)
              for level in ((2, 64, 16, 16, 16), (2, 32, 32, 32, 32), (2, 16, 64, 64, 64))]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,shape", _GPU_CASES, ids=[f"{str(d)[6:]}-{s[1]}c{s[2]}" for d, s in _GPU_CASES])
def test_gpu_kernel_matches_reference(poison, dtype, shape):
    # fp16 as GradScaler runs it: gradients of 1 / (B x voxels) scale come back through a loss scale of 2^16
    check_against_reference(shape, "faithful", dtype, "cuda", grad_scale=2.0**16 if dtype == torch.float16 else 1.3)


@pytest.mark.gpu
def test_gpu_bitwise_determinism_and_memory():
    s = torch.randn(2, 16, 128, 128, 128, device="cuda", dtype=torch.bfloat16)
    t = torch.randn(2, 16, 128, 128, 128, device="cuda", dtype=torch.bfloat16)
    runs, peaks = [], []
    for _ in range(2):
        x = s.detach().clone().requires_grad_()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with fastseg3d.backend("triton"):
            loss = channel_kl(x, t, "faithful")
        loss.backward()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
        runs.append((loss.detach(), x.grad))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    x = s.detach().clone().requires_grad_()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    channel_kl_ref(x, t, "faithful").backward()
    eager = torch.cuda.max_memory_allocated() - base
    assert max(peaks) < 0.25 * eager, (peaks, eager)


def test_a_float64_teacher_makes_the_loss_float64():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 3, 4, 5), torch.randn(2, 5, 3, 4, 5, dtype=torch.float64)
    loss = channel_kl(s, t)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, channel_kl(s.double(), t), rtol=1e-6, atol=0)
