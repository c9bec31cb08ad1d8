"""fastseg3d.ops.kl_distill / kl_distill_multi: CPU tier, interpreter tier and GPU tier."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastseg3d
from fastseg3d.ops.kl_distill import kl_distill, kl_distill_multi, kl_distill_unsupported_reasons
from fastseg3d.reference.kl_distill import kl_distill_fused_ref, kl_distill_ref
from tests.utils import assert_close


def _published(student, teacher, temperature, detach_teacher=False, size=None):
    """DSD's loss re-derived in float64: F.interpolate to the common size, then torch's KLDivLoss(reduction='none')
    on (log_softmax(s/T), softmax(t/T)), summed over classes, mean over batch and voxels, times T^2."""
    size = size or tuple(max(a, b) for a, b in zip(student.shape[2:], teacher.shape[2:]))
    s = student.double()
    t = teacher.double()
    if tuple(s.shape[2:]) != tuple(size):
        s = F.interpolate(s, size=size, mode="trilinear", align_corners=False)
    if tuple(t.shape[2:]) != tuple(size):
        t = F.interpolate(t, size=size, mode="trilinear", align_corners=False)
    target = F.softmax(t / temperature, dim=1)
    if detach_teacher:
        target = target.detach()
    kl = F.kl_div(F.log_softmax(s / temperature, dim=1), target, reduction="none")
    return temperature**2 * kl.sum(1).mean()


def _logits(shape, dtype=torch.float32, device="cpu", scale=2.0):
    return (scale * torch.randn(shape, device=device)).to(dtype).requires_grad_()


# (student shape, teacher shape): same resolution, isotropic 2 and 4, anisotropic, teacher low-res, mixed axes
_PAIRS = [
    ((2, 5, 4, 5, 6), (2, 5, 4, 5, 6)),
    ((2, 4, 3, 4, 5), (2, 4, 6, 8, 10)),
    ((1, 3, 2, 3, 2), (1, 3, 8, 12, 8)),
    ((1, 3, 5, 3, 2), (1, 3, 5, 6, 8)),
    ((2, 3, 7, 10, 12), (2, 3, 7, 5, 3)),
    ((1, 4, 3, 10, 7), (1, 4, 6, 5, 7)),
]


def _pair_id(p):
    return "s" + "x".join(map(str, p[0][2:])) + "-t" + "x".join(map(str, p[1][2:]))


# ------------------------------------------------------------------------------------------------------
# CPU tier


@pytest.mark.parametrize("pair", _PAIRS, ids=_pair_id)
@pytest.mark.parametrize("temperature,detach", [(1.0, False), (3.0, False), (0.5, True)])
def test_reference_matches_published_formula(pair, temperature, detach):
    s = _logits(pair[0], torch.float64)
    t = _logits(pair[1], torch.float64)
    loss = kl_distill_ref(s, t, temperature, detach)
    expected = _published(s, t, temperature, detach)
    assert_close("loss", loss, expected, torch.float64)
    g_s, g_t = torch.autograd.grad(loss, (s, t), allow_unused=True)
    e_s, e_t = torch.autograd.grad(expected, (s, t), allow_unused=True)
    assert_close("dstudent", g_s, e_s, torch.float64)
    if detach:
        assert g_t is None and e_t is None
    else:
        assert_close("dteacher", g_t, e_t, torch.float64)


@pytest.mark.parametrize("pair", _PAIRS, ids=_pair_id)
def test_explicit_gradients_match_autograd(pair):
    """The fused reference's closed-form gradients (what the kernels compute) against autograd, with weights."""
    students = [_logits(pair[0], torch.float64), _logits(pair[0], torch.float64)]
    t = _logits(pair[1], torch.float64)
    size = tuple(max(a, b) for a, b in zip(pair[0][2:], pair[1][2:]))
    weights = [0.7, -1.3]
    per, grads, g_t = kl_distill_fused_ref(students, t, 2.0, size, weights, [True, True], True)
    total = sum(w * _published(s, t, 2.0, size=size) for w, s in zip(weights, students))
    expected = torch.autograd.grad(total, [*students, t])
    for i, s in enumerate(students):
        assert_close(f"loss[{i}]", per[i], _published(s, t, 2.0, size=size), torch.float32)
        assert_close(f"dstudent[{i}]", grads[i], expected[i], torch.float64)
    assert_close("dteacher", g_t, expected[-1], torch.float64)


def test_kl_is_zero_for_identical_logits_and_positive_otherwise():
    x = torch.randn(2, 6, 3, 4, 5, dtype=torch.float64)
    assert kl_distill(x, x.clone(), 3.0).abs().item() < 1e-12
    # shifting every class logit by the same amount leaves the softmax unchanged
    assert kl_distill(x + 5.0, x, 2.0).abs().item() < 1e-12
    assert kl_distill(torch.randn_like(x), x, 2.0).item() > 0


def test_multi_at_a_given_size_equals_sum_of_pairs_at_it():
    t = _logits((2, 4, 2, 4, 3), torch.float64)
    students = [_logits((2, 4, 4, 2, 6), torch.float64), _logits((2, 4, 1, 1, 3), torch.float64)]
    size = (8, 4, 6)  # finer than every input
    total, per = kl_distill_multi(students, t, 3.0, False, size, weights=[1.0, 0.5], return_per_student=True)
    expected = [_published(s, t, 3.0, size=size) for s in students]
    assert_close("total", total, expected[0] + 0.5 * expected[1], torch.float64)
    assert_close("per", per, torch.stack(expected), torch.float64)
    with pytest.raises(ValueError, match="students\\[0\\] has spatial shape \\(4, 2, 6\\)"):
        kl_distill_multi(students, t, 3.0, size=(8, 4, 9))


def test_multi_equals_sum_of_pairs_at_common_resolution():
    t = _logits((2, 4, 4, 4, 6), torch.float64)
    students = [_logits((2, 4, 8, 4, 6), torch.float64), _logits((2, 4, 2, 2, 3), torch.float64),
                _logits((2, 4, 4, 4, 6), torch.float64)]
    total, per = kl_distill_multi(students, t, 3.0, weights=[1.0, 0.5, 2.0], return_per_student=True)
    size = (8, 4, 6)
    expected = [_published(s, t, 3.0, size=size) for s in students]
    assert_close("total", total, expected[0] + 0.5 * expected[1] + 2.0 * expected[2], torch.float64)
    assert_close("per", per, torch.stack(expected), torch.float64)
    assert not per.requires_grad


_OPCHECK_CASES = [
    dict(students=[(2, 3, 4, 5, 6)], teacher=(2, 3, 4, 5, 6), need=[True, True]),
    dict(students=[(1, 4, 2, 5, 3)], teacher=(1, 4, 4, 5, 6), need=[True, False]),
    dict(students=[(1, 3, 4, 4, 4), (1, 3, 2, 2, 2), (1, 3, 4, 2, 1)], teacher=(1, 3, 2, 4, 4),
         need=[True, False, True, True]),
]


@pytest.mark.parametrize("case", _OPCHECK_CASES, ids=["same", "student-low", "multi-teacher-low"])
def test_opcheck(case):
    students = [_logits(s) for s in case["students"]]
    teacher = _logits(case["teacher"])
    for t, n in zip([*students, teacher], case["need"]):
        t.requires_grad_(n)
    size = [max(t.shape[2 + i] for t in [*students, teacher]) for i in range(3)]
    args = (students, teacher, 2.0, size, [1.0] * len(students), case["need"])
    torch.library.opcheck(torch.ops.fastseg3d.kl_distill.default, args)


def test_opcheck_fp16_channels_last():
    # fp16 with channels-last inputs; on meta tensors the op gives the real one's dtypes and strides
    students = [_logits((1, 3, 4, 4, 4), torch.float16).detach().contiguous(memory_format=torch.channels_last_3d),
                _logits((1, 3, 2, 2, 2), torch.float16)]
    teacher = _logits((1, 3, 4, 4, 4), torch.float16).detach().contiguous(memory_format=torch.channels_last_3d)
    for t in (*students, teacher):
        t.requires_grad_()
    args = (students, teacher, 2.0, [4, 4, 4], [1.0, 0.5], [True, True, True])
    torch.library.opcheck(torch.ops.fastseg3d.kl_distill.default, args)
    real = torch.ops.fastseg3d.kl_distill(*args)
    meta = torch.ops.fastseg3d.kl_distill([s.to("meta") for s in students], teacher.to("meta"), *args[2:])
    for a, m in zip([*real[2], real[3]], [*meta[2], meta[3]]):
        assert (a.dtype, a.shape, a.stride()) == (m.dtype, m.shape, m.stride()) and a.dtype == torch.float32


def test_op_cpu_branch_forward_backward_matches_published():
    s = _logits((2, 3, 2, 3, 4))
    t = _logits((2, 3, 4, 3, 8))
    total, per, _, _ = torch.ops.fastseg3d.kl_distill([s], t, 3.0, [4, 3, 8], [2.0], [True, True])
    (3.0 * total).backward()
    s2, t2 = s.detach().double().requires_grad_(), t.detach().double().requires_grad_()
    expected = _published(s2, t2, 3.0)
    (6.0 * expected).backward()
    assert total.dtype == torch.float32 and total.shape == ()
    assert_close("per", per[0], expected, torch.float32)
    assert_close("total", total, 2.0 * expected, torch.float32)
    assert_close("dstudent", s.grad, s2.grad, torch.float32)
    assert_close("dteacher", t.grad, t2.grad, torch.float32)


def check_compiled_matches_eager(fn, s, t, backend="auto"):
    """fn(s, t) compiled with fullgraph=True against eager: the loss, and both gradients of twice the loss."""
    torch._dynamo.reset()
    eager = [x.detach().clone().requires_grad_() for x in (s, t)]
    comp = [x.detach().clone().requires_grad_() for x in (s, t)]
    with fastseg3d.backend(backend):
        y_e = fn(*eager)
        y_c = torch.compile(fn, fullgraph=True)(*comp)
    assert_close("loss", y_c, y_e, torch.float32)
    (2.0 * y_e).backward()
    (2.0 * y_c).backward()
    for name, a, e in zip(("dstudent", "dteacher"), comp, eager):
        assert_close(name, a.grad, e.grad, torch.float32)


def test_compile_fullgraph_op_forward_backward():
    def fn(s, t):
        total, _, _, _ = torch.ops.fastseg3d.kl_distill([s], t, 3.0, [6, 4, 10], [1.0], [True, True])
        return total

    check_compiled_matches_eager(fn, _logits((2, 4, 3, 4, 5)), _logits((2, 4, 6, 4, 10)))


def test_compile_fullgraph_public_functions():
    torch._dynamo.reset()
    t = _logits((1, 3, 4, 4, 4))
    students = [_logits((1, 3, 2, 2, 2)), _logits((1, 3, 4, 4, 4))]

    def fn(students, t):
        return kl_distill(students[0], t, 3.0) + kl_distill_multi(students, t, 2.0, detach_teacher=True)

    compiled = torch.compile(fn, fullgraph=True)
    assert_close("loss", compiled(students, t), fn(students, t), torch.float32)
    compiled(students, t).backward()
    assert all(s.grad is not None for s in students) and t.grad is not None


def test_meta_device_forward_backward():
    # DSD at 128^3: nothing is allocated on meta, the fused op gives the shapes
    teacher = torch.empty(2, 14, 128, 128, 128, device="meta", dtype=torch.bfloat16, requires_grad=True)
    students = [torch.empty(2, 14, 128 // f, 128 // f, 128 // f, device="meta", dtype=torch.bfloat16,
                            requires_grad=True) for f in (2, 4, 8)]
    loss = kl_distill_multi(students, teacher, 3.0) + kl_distill(students[0], teacher, 3.0)
    assert loss.device.type == "meta" and loss.shape == () and loss.dtype == torch.float32
    loss.backward()
    assert teacher.grad.shape == teacher.shape and all(s.grad.shape == s.shape for s in students)


def test_the_fused_op_forms_only_the_gradients_autograd_needs(monkeypatch):
    """The kernel forms the input gradients in the forward pass: none under no_grad, not the teacher's when it is
    detached, not a student's that does not require grad (each costs a write of the input's size, and for an
    upsampled input an output-resolution buffer and its transpose)."""
    module = sys.modules["fastseg3d.ops.kl_distill"]
    needs, op = [], module._kl_distill_op
    monkeypatch.setattr(module.backends, "select", lambda *a, **k: True)  # the op's CPU branch: what the kernel does
    monkeypatch.setattr(module, "_kl_distill_op", lambda *a: needs.append(list(a[-1])) or op(*a))
    s = torch.randn(1, 3, 2, 3, 4, requires_grad=True)
    t = torch.randn(1, 3, 4, 3, 4, requires_grad=True)
    with torch.no_grad():
        kl_distill_multi([s, s], t, 2.0)
    kl_distill(s, t, 2.0, detach_teacher=True)
    kl_distill(s.detach(), t, 2.0)
    assert needs == [[False, False, False], [True, False], [False, True]]


@pytest.mark.parametrize("dtype,buffer", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
                                          (torch.float32, torch.float32)])
def test_upsampled_gradient_buffer_dtype(dtype, buffer):
    """An upsampled input's gradient passes through a buffer at the loss resolution, which holds terms not yet
    scaled by 1 / (B x voxels): bf16 for bf16 inputs, fp32 otherwise (fp16 could overflow there)."""
    pytest.importorskip("triton")
    from bench.sass import _captured
    from fastseg3d.kernels.kl_distill import kl_distill_fwd

    teacher = torch.empty(1, 5, 8, 8, 8, device="meta", dtype=dtype)
    student = torch.empty(1, 5, 4, 4, 4, device="meta", dtype=dtype)
    made = []

    def empty(shape, **kw):
        made.append((tuple(shape), kw["dtype"]))
        return torch.empty(shape, **kw)

    _captured(lambda: kl_distill_fwd([student], teacher, (8, 8, 8), 2.0, [1.0], [True], True, empty=empty))
    own = {(tuple(x.shape), x.dtype) for x in (teacher, student)} | {(tuple(x.shape), torch.float32)
                                                                     for x in (teacher, student)}
    buffers = [d for shape, d in made if (shape, d) not in own and math.prod(shape) >= teacher.numel()]
    assert buffers == [buffer], made


def test_no_grad_and_detached_inputs():
    s = _logits((1, 3, 2, 3, 4))
    t = _logits((1, 3, 4, 6, 4))
    with torch.no_grad():
        assert_close("loss", kl_distill(s, t, 2.0), _published(s, t, 2.0), torch.float32)
    loss = kl_distill(s, t, 2.0, detach_teacher=True)
    loss.backward()
    assert t.grad is None and s.grad is not None


_X = torch.randn(2, 3, 4, 4, 4)
_BAD = [
    (lambda: kl_distill(torch.randn(2, 3, 4, 4), _X), ValueError, "student must be 5-D"),
    (lambda: kl_distill(_X, torch.randn(2, 3, 4, 4, 4, 1)), ValueError, "teacher must be 5-D"),
    (lambda: kl_distill(torch.randn(3, 3, 4, 4, 4), _X), ValueError, "batch sizes differ"),
    (lambda: kl_distill(torch.randn(2, 4, 4, 4, 4), _X), ValueError, "class counts differ"),
    (lambda: kl_distill(torch.randn(2, 3, 3, 4, 4), _X), ValueError, "integer factor"),
    (lambda: kl_distill(torch.randn(2, 3, 8, 4, 6), _X), ValueError, "integer factor"),
    (lambda: kl_distill(_X, _X, temperature=0.0), ValueError, "temperature"),
    (lambda: kl_distill(_X, _X, temperature=-1.0), ValueError, "temperature"),
    (lambda: kl_distill(_X, _X, temperature=float("nan")), ValueError, "temperature"),
    (lambda: kl_distill(_X, _X, size=(4, 4)), ValueError, "size must be"),
    (lambda: kl_distill(_X, _X, size=(0, 4, 4)), ValueError, "size must be 3 positive ints"),
    (lambda: kl_distill(_X, _X, size=(4, -4, 4)), ValueError, "size must be 3 positive ints"),
    (lambda: kl_distill(_X, _X, size=(6, 4, 4)), ValueError, "integer factor"),
    (lambda: kl_distill(_X, _X.to("meta")), TypeError, "is on"),
    (lambda: kl_distill(_X, _X, temperature="3"), TypeError, "temperature must be a real number"),
    (lambda: kl_distill(_X, _X, temperature=None), TypeError, "temperature"),
    (lambda: kl_distill(_X, _X, temperature=True), TypeError, "temperature"),
    (lambda: kl_distill(_X, _X, temperature=torch.tensor([3.0])), TypeError, "temperature"),
    (lambda: kl_distill(_X, _X, temperature=torch.tensor(True)), TypeError, "temperature"),
    (lambda: kl_distill(_X, _X, temperature=torch.tensor(-1.0)), ValueError, "temperature"),
    (lambda: kl_distill(_X, _X, temperature=torch.tensor(3.0, device="meta")), TypeError, "temperature is a meta"),
    (lambda: kl_distill(_X.long(), _X.long()), TypeError, "floating"),
    (lambda: kl_distill([1.0], _X), TypeError, "torch.Tensor"),
    (lambda: kl_distill_multi([], _X), ValueError, "non-empty"),
    (lambda: kl_distill_multi([_X, _X], _X, weights=[1.0]), ValueError, "weights"),
    (lambda: kl_distill_multi([_X], _X, weights=2.0), TypeError, "weights must be 1 real numbers"),
    (lambda: kl_distill_multi([_X], _X, weights=["a"]), TypeError, "weights must be 1 real numbers"),
    (lambda: kl_distill_multi([_X], _X, weights=[None]), TypeError, "weights must be 1 real numbers"),
    (lambda: kl_distill_multi([_X], _X, weights=[True]), TypeError, "weights must be 1 real numbers"),
    (lambda: kl_distill_multi([_X], _X, weights=[float("inf")]), ValueError, "weights must be finite"),
    (lambda: kl_distill(torch.randn(2, 0, 2, 2, 2), torch.randn(2, 0, 4, 4, 4)), ValueError, "no classes"),
]


@pytest.mark.parametrize("call,exc,match", _BAD, ids=[f"{i}-{m}" for i, (_, _, m) in enumerate(_BAD)])
def test_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_weights_in_any_sequence_of_real_numbers():
    s, t = torch.randn(1, 3, 2, 2, 2), torch.randn(1, 3, 4, 4, 4)
    expected = kl_distill_multi([s, s], t, weights=[0.5, 2.0])
    for weights in (torch.tensor([0.5, 2.0]), np.array([0.5, 2.0]), (0.5, torch.tensor(2.0)), iter([0.5, 2.0])):
        torch.testing.assert_close(kl_distill_multi([s, s], t, weights=weights), expected)


@pytest.mark.parametrize("temperature", [np.float64(3.0), np.float32(3.0), np.int64(3), torch.tensor(3.0),
                                         torch.tensor(3, dtype=torch.int32), torch.tensor(3.0, dtype=torch.float64)],
                         ids=["np.float64", "np.float32", "np.int64", "tensor", "int-tensor", "f64-tensor"])
def test_temperature_of_numpy_scalars_and_0d_tensors(temperature):
    s, t = _logits((1, 3, 2, 2, 2)), _logits((1, 3, 4, 4, 4))
    expected = kl_distill(s, t, 3.0)
    assert kl_distill(s, t, temperature).item() == expected.item()
    assert kl_distill_multi([s], t, temperature).item() == expected.item()


def check_mixed_dtypes(student_dtypes, teacher_dtype, backend):
    """Students of several dtypes against a teacher of another: the loss as from float64 copies, each gradient in
    its own input's dtype."""
    shapes = [(1, 4, 2, 3, 4), (1, 4, 4, 6, 4), (1, 4, 1, 3, 2)][: len(student_dtypes)]
    students = [_logits(sh, dt) for sh, dt in zip(shapes, student_dtypes)]
    teacher = _logits((1, 4, 4, 3, 4), teacher_dtype)
    ref_s = [x.detach().double().requires_grad_() for x in students]
    ref_t = teacher.detach().double().requires_grad_()
    weights = [1.0, 0.5, -2.0][: len(students)]
    with fastseg3d.backend(backend):
        loss = kl_distill_multi(students, teacher, 2.0, weights=weights)
    size = (4, 6, 4) if len(students) > 1 else (4, 3, 4)
    expected = sum(w * _published(x, ref_t, 2.0, size=size) for w, x in zip(weights, ref_s))
    coarse = torch.bfloat16 if torch.bfloat16 in (*student_dtypes, teacher_dtype) else torch.float16
    assert loss.dtype == torch.float32
    assert_close("loss", loss, expected, coarse)
    (1.7 * loss).backward()
    (1.7 * expected).backward()
    for name, a, e in [*((f"dstudent[{i}]", a, e) for i, (a, e) in enumerate(zip(students, ref_s))),
                       ("dteacher", teacher, ref_t)]:
        assert a.grad.dtype == a.dtype, (name, a.grad.dtype, a.dtype)
        assert_close(name, a.grad, e.grad, a.dtype)


@pytest.mark.parametrize("students,teacher", [
    ([torch.float32], torch.bfloat16),
    ([torch.bfloat16], torch.float32),
    ([torch.float32, torch.bfloat16, torch.float16], torch.bfloat16),
], ids=["f32-bf16", "bf16-f32", "multi-bf16"])
def test_mixed_dtypes(students, teacher):
    check_mixed_dtypes(students, teacher, "auto")
    # the op's CPU branch (what the kernel computes) and its fake implementation, on the same mix
    s = [_logits((1, 3, 2, 2, 4), dt) for dt in students]
    t = _logits((1, 3, 4, 4, 4), teacher)
    args = (s, t, 2.0, [4, 4, 4], [1.0] * len(s), [True] * (len(s) + 1))
    torch.library.opcheck(torch.ops.fastseg3d.kl_distill.default, args)
    _, _, grads, g_t = torch.ops.fastseg3d.kl_distill(*args)
    assert [g.dtype for g in (*grads, g_t)] == [torch.float32 if dt == torch.float16 else dt
                                                 for dt in (*students, teacher)]


def test_dtype_outside_the_kernel_takes_the_reference():
    teacher = torch.empty(1, 3, 4, 4, 4, device="meta")
    assert not any("student dtype" in r for r in kl_distill_unsupported_reasons(teacher, [teacher.bfloat16()]))
    assert any("student dtype torch.float64" in r for r in kl_distill_unsupported_reasons(teacher, [teacher.double()]))
    s, t = _logits((1, 3, 2, 2, 2), torch.float64), _logits((1, 3, 4, 4, 4))
    assert_close("loss", kl_distill(s, t, 2.0), _published(s, t, 2.0), torch.float32)


def test_backend_policy(monkeypatch):
    s, t = torch.randn(1, 3, 2, 2, 2), torch.randn(1, 3, 4, 4, 4)
    calls = []
    module = sys.modules["fastseg3d.ops.kl_distill"]
    monkeypatch.setattr(module, "kl_distill_ref", lambda *a, **k: calls.append(1) or kl_distill_ref(*a, **k))
    with fastseg3d.backend("torch"):
        kl_distill(s, t)
    assert calls == [1]
    with fastseg3d.backend("triton"), pytest.raises(NotImplementedError, match="device=cpu"):
        kl_distill(s, t)
    reasons = kl_distill_unsupported_reasons(torch.empty(1, 300, 2, 2, 2, device="meta", dtype=torch.float64), [])
    assert any("float64" in r for r in reasons) and any("300 classes" in r for r in reasons)
    big = torch.empty(65536, 3, 1, 1, 1, device="meta")  # the grid's y axis
    assert any("batch above 65535" in r for r in kl_distill_unsupported_reasons(big, [big]))
    empty, full = torch.empty(0, 3, 2, 2, 2, device="meta"), torch.empty(1, 3, 2, 2, 2, device="meta")
    assert "an input has no elements" in kl_distill_unsupported_reasons(empty, [empty])
    assert "an input has no elements" in kl_distill_unsupported_reasons(full, [torch.empty(1, 3, 0, 2, 2)])
    assert kl_distill_unsupported_reasons(full, [full]) == []


def test_fp16_gradients_survive_a_loss_scale():
    """fp16 training scales the loss by GradScaler's 2^16 before backward. The gradients made in the forward are of
    order 1 / (B x voxels), below fp16's normal range at this size: they are kept in fp32, and the scale, which fp16
    cannot represent, is applied before the cast (kept in fp16 they came back as inf, or as a few bits)."""
    students = [_logits((2, 4, 32, 32, 32), torch.float16), _logits((2, 4, 16, 16, 16), torch.float16)]
    teacher = _logits((2, 4, 32, 32, 32), torch.float16)
    ref_s = [s.detach().double().requires_grad_() for s in students]
    ref_t = teacher.detach().double().requires_grad_()
    total, _, grads, g_t = torch.ops.fastseg3d.kl_distill(students, teacher, 3.0, [32, 32, 32], [1.0, 0.5],
                                                          [True, True, True])
    assert all(g.dtype == torch.float32 for g in (*grads, g_t))
    (2.0**16 * total).backward()
    (2.0**16 * (_published(ref_s[0], ref_t, 3.0) + 0.5 * _published(ref_s[1], ref_t, 3.0))).backward()
    for i, (a, e) in enumerate(zip(students, ref_s)):
        assert a.grad.dtype == torch.float16
        assert_close(f"dstudent[{i}]", a.grad, e.grad, torch.float16)
    assert_close("dteacher", teacher.grad, ref_t.grad, torch.float16)


# ------------------------------------------------------------------------------------------------------
# Interpreter tier: the Triton kernels on CPU tensors under TRITON_INTERPRET=1 (tiny shapes)


def check_against_reference(student_shapes, teacher_shape, temperature, detach, dtype, device, weights=None,
                            grad_scale=1.7, logit_scale=2.0, size=None):
    students = [_logits(s, dtype, device, logit_scale) for s in student_shapes]
    teacher = _logits(teacher_shape, dtype, device, logit_scale)
    ref_s = [s.detach().double().requires_grad_() for s in students]
    ref_t = teacher.detach().double().requires_grad_()
    with fastseg3d.backend("triton"):
        if len(students) == 1 and weights is None:
            loss = kl_distill(students[0], teacher, temperature, detach, size)
        else:
            loss = kl_distill_multi(students, teacher, temperature, detach, size, weights=weights)
    size = size or tuple(max(t.shape[2 + i] for t in [*students, teacher]) for i in range(3))
    weights = weights or [1.0] * len(students)
    expected = sum(w * _published(s, ref_t, temperature, detach, size) for w, s in zip(weights, ref_s))
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_close("loss", loss, expected, torch.float32 if dtype == torch.float32 else dtype)
    (grad_scale * loss).backward()
    (grad_scale * expected).backward()
    for i, (a, e) in enumerate(zip(students, ref_s)):
        assert a.grad is not None and a.grad.dtype == dtype
        assert_close(f"dstudent[{i}]", a.grad, e.grad, dtype)
    if detach:
        assert teacher.grad is None
    else:
        assert_close("dteacher", teacher.grad, ref_t.grad, dtype)


_F32, _F16, _BF16 = torch.float32, torch.float16, torch.bfloat16
_INTERPRET_PAIRS = [
    # student shape, teacher shape, temperature, detach, dtype
    ((2, 5, 3, 5, 7), (2, 5, 3, 5, 7), 1.0, False, _F32),
    ((1, 4, 2, 3, 3), (1, 4, 4, 6, 6), 3.0, False, _F32),
    ((1, 3, 3, 2, 2), (1, 3, 3, 4, 8), 3.0, True, _F32),
    ((1, 3, 3, 4, 8), (1, 3, 3, 2, 2), 0.5, False, _F32),
    ((1, 3, 3, 4, 3), (1, 3, 3, 2, 6), 2.0, False, _F32),
    ((1, 14, 2, 3, 5), (1, 14, 4, 3, 5), 3.0, False, _F32),
    ((2, 5, 3, 5, 7), (2, 5, 3, 5, 7), 3.0, True, _F16),
    ((1, 4, 2, 3, 3), (1, 4, 4, 6, 6), 3.0, False, _F16),
    ((1, 3, 2, 6, 4), (1, 3, 2, 2, 4), 2.0, False, _F16),  # fp16 teacher upsampled by an odd factor
    ((3, 2, 2, 3, 4), (3, 2, 6, 3, 2), 1.5, False, _F32),  # batch 3, depth upsampled by 3, width by 2
    ((2, 9, 2, 3, 4), (2, 9, 4, 3, 2), 2.0, False, _F16),  # 9 and 16 classes: the interleaved copies' two loads
    ((1, 16, 2, 2, 3), (1, 16, 2, 4, 3), 1.5, False, _F16),
    # bf16 upsampled inputs and gradient buffers are read as class pairs in int32 (no dot product: the interpreter
    # is exact here)
    ((1, 2, 1, 2, 2), (1, 2, 2, 4, 4), 2.0, False, _BF16),
    ((2, 9, 2, 3, 4), (2, 9, 4, 3, 2), 2.0, False, _BF16),
    ((1, 16, 2, 2, 3), (1, 16, 2, 4, 3), 1.5, False, _BF16),
    # D and H (or W) upsampled: the gradient's transpose in two passes through an fp32 interleaved transient;
    # 9 classes in fp32 are 64 bytes a voxel, four 16-byte loads and stores
    ((1, 9, 1, 2, 3), (1, 9, 2, 4, 3), 2.0, False, _F32),
    ((2, 16, 1, 2, 2), (2, 16, 2, 4, 4), 3.0, False, _BF16),
    ((1, 3, 2, 3, 1), (1, 3, 4, 3, 3), 1.0, False, _F16),
]


@pytest.mark.interpret
@pytest.mark.parametrize(
    "student,teacher,temperature,detach,dtype", _INTERPRET_PAIRS,
    ids=[f"{_pair_id(c[:2])}-T{c[2]}-det{int(c[3])}-{str(c[4])[6:]}" for c in _INTERPRET_PAIRS],
)
def test_interpret_kernel_matches_reference(poison, student, teacher, temperature, detach, dtype):
    check_against_reference([student], teacher, temperature, detach, dtype, "cpu")


_GPU_TILE_PAIRS = [
    # student shape, teacher shape, dtype: the tiles a GPU launch takes (the interpreter's own are larger), each
    # input over more than one program a batch element
    ((1, 20, 3, 7, 9), (1, 20, 3, 7, 9), _F32),  # 32 padded classes a thread, 128 voxels a program
    ((1, 40, 2, 3, 5), (1, 40, 2, 3, 5), _F32),  # 64 padded classes: two threads a voxel, 16 voxels a program
    ((2, 3, 5, 9, 13), (2, 3, 5, 9, 13), _F16),  # 4 padded classes: 4 voxels a thread, 512 a program
    ((1, 14, 2, 3, 4), (1, 14, 4, 6, 8), _F32),  # an upsampled student: one voxel a thread, 128 a program
    ((1, 70, 2, 3, 7), (1, 70, 2, 3, 7), _F32),  # more than 64 classes: Triton's own layout, 32 voxels a program
]


@pytest.mark.interpret
@pytest.mark.parametrize("student,teacher,dtype", _GPU_TILE_PAIRS,
                         ids=[f"K{c[0][1]}-{_pair_id(c[:2])}-{str(c[2])[6:]}" for c in _GPU_TILE_PAIRS])
def test_interpret_gpu_tiles(poison, monkeypatch, student, teacher, dtype):
    """Forward and gradients on the tiles a GPU launch takes: several programs a batch element, the last one
    masked."""
    import fastseg3d.kernels.kl_distill as k

    monkeypatch.setattr(k, "INTERPRET", False)
    grids = []
    wrap = k.wrap

    def recording(fn):
        launcher = wrap(fn)
        if fn is not k._kl_fwd_kernel:
            return launcher

        class Grid:
            def __getitem__(self, grid):
                grids.append(grid)
                return launcher[grid]
        return Grid()

    monkeypatch.setattr(k, "wrap", recording)
    check_against_reference([student], teacher, 2.0, False, dtype, "cpu")
    assert grids and all(g[0] > 1 for g in grids), grids


@pytest.mark.interpret
def test_interpret_sharp_distributions(poison):
    """Logits of +-100 at T = 0.05 (z / T near +-2000): the padded channels' finite "minus infinity" still cancels
    between teacher and student, and nothing overflows."""
    check_against_reference([(1, 5, 2, 3, 7)], (1, 5, 2, 3, 7), 0.05, False, _F32, "cpu", logit_scale=40.0)
    check_against_reference([(1, 3, 1, 2, 5)], (1, 3, 2, 4, 5), 0.05, False, _F32, "cpu", logit_scale=40.0)
    # T = 1e-9 scales logits by about 1.4e9: the padded class's "minus infinity" is set after scaling, so it stays
    # finite (set before, it overflowed to -inf and -inf - -inf made the loss NaN)
    check_against_reference([(1, 3, 1, 2, 5)], (1, 3, 2, 4, 5), 1e-9, False, _F32, "cpu")


@pytest.mark.interpret
def test_interpret_mixed_dtypes(poison):
    # each input read in its own dtype (bf16 upsampled inputs as int32 class pairs, fp16 and fp32 as they are), an
    # upsampled student's gradient buffer in bf16 or fp32 by its own dtype
    check_mixed_dtypes([torch.float32, torch.bfloat16, torch.float16], torch.bfloat16, "triton")
    check_mixed_dtypes([torch.bfloat16], torch.float32, "triton")


@pytest.mark.interpret
def test_interpret_fp16_loss_scale(poison):
    # fp16 as GradScaler trains it: the kernels keep the forward-made gradients in fp32 and the 2^16 loss scale
    # (inf in fp16) is applied before the cast
    check_against_reference([(1, 4, 2, 3, 4), (1, 4, 1, 3, 2)], (1, 4, 2, 3, 4), 2.0, False, _F16, "cpu",
                            grad_scale=2.0**16)


@pytest.mark.interpret
def test_interpret_multi_student_teacher_low_res(poison):
    # three students at different resolutions against a teacher that is itself upsampled on one axis; a unit
    # incoming gradient, where backward hands over the forward's gradients as they are
    check_against_reference([(1, 3, 2, 4, 4), (1, 3, 1, 2, 2), (1, 3, 2, 4, 1)], (1, 3, 2, 2, 4), 3.0, False, _F32,
                            "cpu", weights=[1.0, 0.5, -2.0], grad_scale=1.0)


@pytest.mark.interpret
def test_interpret_multi_student_at_a_finer_size(poison):
    # every pair over a grid finer than every input (DSD's interp heads against the label's resolution)
    check_against_reference([(1, 3, 1, 2, 2), (1, 3, 2, 1, 4)], (1, 3, 2, 2, 2), 2.0, False, _F32, "cpu",
                            weights=[1.0, 0.5], size=(2, 4, 4))


@pytest.mark.interpret
@pytest.mark.parametrize("classes", [1, 3, 20, 33, 70])
def test_interpret_many_programs(poison, monkeypatch, classes):
    """Tiles of 16 voxels (several programs per batch element, a padded last one) with batch 2, upsampled inputs
    on every path: up to 16 channels one thread per voxel, 20 channels threads sharing a voxel (VEC = 1, flat
    accesses), 70 channels Triton's own layout (VEC = 0); the teacher upsampled along H and W only (padded voxels
    past the last must not reach past the input)."""
    import fastseg3d.kernels.kl_distill as k

    monkeypatch.setattr(k, "_block_v", lambda k_pad, nvox, tile=4096: 16)
    check_against_reference([(2, classes, 3, 4, 3), (2, classes, 3, 2, 6)], (2, classes, 3, 2, 3), 2.0, False, _F32,
                            "cpu", weights=[1.0, 0.5])


@pytest.mark.interpret
def test_interpret_more_students_than_one_launch(poison):
    shapes = [(1, 3, 2, 3, 4)] * 3 + [(1, 3, 1, 3, 2)] * 3
    check_against_reference(shapes, (1, 3, 2, 3, 4), 2.0, False, _F32, "cpu", weights=[1, 2, 3, 4, 5, 6])


@pytest.mark.interpret
def test_interpret_forward_without_grad(poison):
    s, t = _logits((1, 3, 2, 3, 4)), _logits((1, 3, 4, 3, 4))
    with fastseg3d.backend("triton"), torch.no_grad():
        loss = kl_distill(s, t, 2.0)
    assert_close("loss", loss, _published(s.detach(), t.detach(), 2.0), torch.float32)


@pytest.mark.interpret
def test_interpret_64bit_indexing_path(poison, monkeypatch):
    import fastseg3d.kernels.kl_distill as k

    monkeypatch.setattr(k, "_INT32_MAX", 16)
    check_against_reference([(1, 3, 2, 2, 3)], (1, 3, 4, 2, 3), 3.0, False, _F32, "cpu")


# ------------------------------------------------------------------------------------------------------
# GPU tier: DSD-like sizes, bf16, determinism, memory


_GPU_CASES = [
    (dtype, f)
    for dtype in (torch.float32, torch.float16, torch.bfloat16)
    for f in ((1, 1, 1), (2, 2, 2), (4, 4, 4), (1, 2, 4))
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,factor", _GPU_CASES,
                         ids=[f"{str(d)[6:]}-f{''.join(map(str, f))}" for d, f in _GPU_CASES])
def test_gpu_kernel_matches_reference(poison, dtype, factor):
    # fp16 as GradScaler runs it: gradients of 1 / (B x voxels) scale come back through a loss scale of 2^16
    check_against_reference([(2, 14) + tuple(48 // f for f in factor)], (2, 14, 48, 48, 48), 3.0, False, dtype,
                            "cuda", grad_scale=2.0**16 if dtype == torch.float16 else 1.7)


@pytest.mark.gpu
def test_gpu_multi_dsd_heads(poison):
    check_against_reference([(2, 14, 32, 32, 32), (2, 14, 16, 16, 16), (2, 14, 8, 8, 8)], (2, 14, 32, 32, 32),
                            3.0, False, torch.bfloat16, "cuda")


@pytest.mark.gpu
def test_gpu_compile_fullgraph_with_upsampled_inputs():
    # the launcher's class-interleaved copies (movedim, pad) traced inside the triton_op, forward and backward
    s = torch.randn(2, 14, 8, 16, 16, device="cuda")
    t = torch.randn(2, 14, 16, 16, 8, device="cuda")
    check_compiled_matches_eager(lambda s, t: kl_distill(s, t, 3.0), s, t, backend="triton")


@pytest.mark.gpu
def test_gpu_bitwise_determinism():
    t = torch.randn(2, 14, 64, 64, 64, device="cuda", dtype=torch.bfloat16)
    students = [torch.randn(2, 14, 64 // f, 64 // f, 64 // f, device="cuda", dtype=torch.bfloat16) for f in (1, 2, 4)]
    runs = []
    for _ in range(3):
        ins = [x.detach().clone().requires_grad_() for x in (*students, t)]
        with fastseg3d.backend("triton"):
            loss = kl_distill_multi(ins[:-1], ins[-1], 3.0)
        loss.backward()
        runs.append([loss.detach()] + [x.grad for x in ins])
    for other in runs[1:]:
        for a, e in zip(runs[0], other):
            assert torch.equal(a, e)


@pytest.mark.gpu
def test_gpu_peak_memory_far_below_eager():
    t = torch.randn(2, 14, 128, 128, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    s = torch.randn(2, 14, 32, 32, 32, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def peak(fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn().backward()
        torch.cuda.synchronize()
        t.grad = s.grad = None
        return torch.cuda.max_memory_allocated() - base

    with fastseg3d.backend("triton"):
        fused = peak(lambda: kl_distill(s, t, 3.0))
    eager = peak(lambda: kl_distill_ref(s, t, 3.0))
    # fused: the gradients made in forward (input sizes), handed over as they are by backward on a unit incoming
    # gradient, and the upsampled student's gradient at the teacher's resolution (bf16, 16 interleaved classes for
    # 14) with the fp32 transient of its transpose's first pass (a sixteenth of its voxels), both freed in forward;
    # eager: about 14x the inputs in fp32 intermediates
    assert fused < 0.25 * eager, (fused, eager)
    per_teacher_element = 2 + 2 * 16 / 14 + 4 * 16 / 14 / 16  # about 4.6 bytes
    assert fused <= 1.05 * per_teacher_element * t.numel() + 8 * s.numel() + 2**22, (fused, t.numel())



@pytest.mark.gpu
def test_gpu_64bit_indexing_large_tensor():
    """Student and teacher of 2.18e9 elements (> 2^31), bf16: a block of 8 depth slices repeated 65 times, so the
    loss is the block's and each repeat's gradient the block's over 65; the last repeat lies past 2^31 elements."""
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip("needs 24 GiB of free GPU memory")
    block, repeats = (1, 16, 8, 512, 512), 65
    base = [(2.0 * torch.randn(block, device="cuda")).bfloat16() for _ in range(2)]
    s, t = (b.repeat(1, 1, repeats, 1, 1).requires_grad_() for b in base)
    with fastseg3d.backend("triton"):
        loss = kl_distill(s, t, 2.0)
    loss.backward()
    ref_s, ref_t = (b.double().requires_grad_() for b in base)
    expected = _published(ref_s, ref_t, 2.0)
    expected.backward()
    assert_close("loss", loss, expected, torch.bfloat16)
    for name, got, want in (("dstudent", s.grad, ref_s.grad), ("dteacher", t.grad, ref_t.grad)):
        for part in (slice(0, 8), slice(-8, None)):
            assert_close(f"{name}[{part}]", got[:, :, part].double() * repeats, want, torch.bfloat16)

@pytest.mark.parametrize("classes,limit", [(9, 500), (17, 1000)])
def test_64bit_indexing_covers_the_padded_gradient_buffer(monkeypatch, classes, limit):
    """An upsampled input's output-resolution gradient buffer is padded: class-interleaved up to 16 classes, to a
    power of two of them (9 -> 16: 528 elements against the teacher's 297), blocked beyond, to whole blocks of 32
    voxels (17 classes x 64 voxels against 17 x 33). 64-bit indexing is chosen on the padded size."""
    import fastseg3d.kernels.kl_distill as k
    from bench.sass import _captured

    monkeypatch.setattr(k, "_INT32_MAX", limit)
    teacher = torch.empty(1, classes, 33, 1, 1, device="meta")
    student = torch.empty(1, classes, 11, 1, 1, device="meta")
    launches = _captured(lambda: k.kl_distill_fwd([student], teacher, (33, 1, 1), 2.0, [1.0], [True], True))
    assert [fn.fn.__name__ for fn, _, _ in launches] == ["_kl_fwd_kernel", "_interp_transpose_kernel"]
    assert all(kw["INT64"] for _, _, kw in launches)


@pytest.mark.parametrize("classes,factor,il", [(14, 2, 16), (14, 1, 0), (17, 2, 0), (5, 2, 8), (1, 2, 1)])
def test_upsampled_inputs_are_read_class_interleaved(classes, factor, il):
    """Up to 16 classes, a launch with an upsampled input reads those inputs from class-interleaved copies (IL =
    the padded class count) and writes their gradients at the output resolution class-interleaved too, which the
    transposed interpolation reads; at the output resolution, or with more classes, the NCDHW inputs themselves
    (and blocked gradient buffers)."""
    import fastseg3d.kernels.kl_distill as k
    from bench.sass import _captured

    teacher = torch.empty(2, classes, 8, 8, 8, device="meta", dtype=torch.bfloat16)
    student = torch.empty(2, classes, 8 // factor, 8, 8, device="meta", dtype=torch.bfloat16)
    launches = _captured(lambda: k.kl_distill_fwd([student, teacher], teacher, (8, 8, 8), 2.0, [1.0, 1.0],
                                                   [True, True], True))
    fn, args, kw = launches[0]
    assert fn.fn.__name__ == "_kl_fwd_kernel" and kw["IL"] == il
    if il:  # the student's copy, (B, D, H, W, IL); the other student and the teacher as they are
        assert args[2].shape == (2, 8 // factor, 8, 8, il) and args[2].is_contiguous()
        assert args[0].shape == args[4].shape == teacher.shape
        assert args[3].shape == (2, 8, 8, 8, il)  # the student's gradient buffer, at the output resolution
    elif factor > 1:
        assert args[3].shape == (2, 512 // 32, classes, 32)
    if factor > 1:
        assert launches[1][0].fn.__name__ == "_interp_transpose_kernel" and launches[1][2]["IL"] == il
        assert launches[1][1][0] is args[3]
    from fastseg3d.kernels.channel_kl import channel_kl_fwd

    launches = _captured(lambda: channel_kl_fwd(teacher, teacher, 1.0, True))
    assert launches[0][2]["IL"] == 0


def test_a_channels_last_input_is_read_in_place_only_from_an_aligned_start():
    """With 16 classes a channels-last input is already its interleaved copy; bf16 class pairs are read as int32,
    so a view starting at an odd element is copied first."""
    import fastseg3d.kernels.kl_distill as k
    from bench.sass import _captured

    teacher = torch.empty(1, 16, 4, 4, 4, device="meta", dtype=torch.bfloat16)
    for offset in (0, 1):
        flat = torch.empty(offset + 16 * 2 * 4 * 4, device="meta", dtype=torch.bfloat16)[offset:]
        student = flat.view(1, 2, 4, 4, 16).permute(0, 4, 1, 2, 3)  # channels-last, (1, 16, 2, 4, 4)
        launches = _captured(lambda: k.kl_distill_fwd([student], teacher, (4, 4, 4), 2.0, [1.0], [True], True))
        read = launches[0][1][2]
        in_place = read.untyped_storage()._cdata == student.untyped_storage()._cdata
        assert read.storage_offset() % 2 == 0 and in_place == (offset == 0), (offset, in_place)


def test_scaled_grads_hand_over_the_forward_gradients_on_a_unit_incoming_gradient(monkeypatch):
    from types import SimpleNamespace

    from fastseg3d.ops import utils

    def scaled(*args):  # a node's first backward
        return utils.scaled_grads(SimpleNamespace(), *args)

    g = torch.randn(2, 3, 4, dtype=torch.float16)
    reads = []
    monkeypatch.setattr(utils, "unit_grad", lambda t, read=utils.unit_grad: reads.append(t) or read(t))
    with torch.no_grad():  # as the autograd engine runs a backward without create_graph
        one = torch.tensor(1.0)
        assert scaled(one, [g], [torch.float16])[0] is g
        torch.testing.assert_close(scaled(torch.tensor(-2.5), [g], [torch.float16])[0], -2.5 * g)
        assert scaled(one, [g], [torch.float32])[0].dtype == torch.float32  # a cast is a new tensor
        assert scaled(one, [g.new_empty((0,))], [torch.float16]) == [None]
        assert scaled(None, [g, g], [torch.float16] * 2) == [None, None]
        traced = scaled(torch.tensor(1.0, device="meta"), [g.to("meta")], [torch.float16])[0]
        assert traced.device.type == "meta" and traced is not g  # no read-back on meta
        # several inputs: one read-back a call; an incoming gradient per input scales each by its own
        reads.clear()
        h = torch.randn(3, dtype=torch.float16)
        out = scaled(one, [g, g.new_empty((0,)), h], [torch.float16] * 3)
        assert out[0] is g and out[1] is None and out[2] is h and len(reads) == 1
        out = scaled(torch.tensor([1.0, 2.0]), [g, h], [torch.float16] * 2)
        torch.testing.assert_close(out[0], g)
        torch.testing.assert_close(out[1], 2 * h)
        assert scaled(torch.tensor([1.0, 1.0]), [g, h], [torch.float16] * 2)[1] is h
        # a node's later backwards (a retained graph) get copies of what its first one handed over
        ctx = SimpleNamespace()
        assert utils.scaled_grads(ctx, one, [g], [torch.float16])[0] is g
        again = utils.scaled_grads(ctx, one, [g], [torch.float16])[0]
        assert again is not g and torch.equal(again, g)
    with pytest.raises(NotImplementedError, match="double backward"):  # create_graph: grad mode on in backward
        scaled(torch.tensor(1.0, requires_grad=True), [g], [torch.float16])


def test_a_float64_input_makes_the_whole_loss_float64():
    torch.manual_seed(0)
    s, t = torch.randn(1, 3, 4, 4, 4), torch.randn(1, 3, 2, 2, 2, dtype=torch.float64)
    for loss in (kl_distill(s, t, temperature=2.0), kl_distill(s.double(), t.float(), temperature=2.0)):
        assert loss.dtype == torch.float64
        torch.testing.assert_close(loss, kl_distill(s.double(), t, temperature=2.0), rtol=1e-6, atol=0)
    assert kl_distill_multi([s, s], t).dtype == torch.float64
