"""fastseg3d.ops.selfreg_inter / selfreg_inter_multi / selfreg_intra: CPU tier, interpreter tier and GPU tier."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fastseg3d
from fastseg3d.ops.selfreg import (
    random_channel_pairs,
    selfreg_inter,
    selfreg_inter_multi,
    selfreg_inter_unsupported_reasons,
    selfreg_intra,
    selfreg_intra_unsupported_reasons,
)
from fastseg3d.reference.selfreg import (
    selfreg_inter_fused_ref,
    selfreg_inter_ref,
    selfreg_intra_fused_ref,
    selfreg_intra_ref,
)
from tests.utils import assert_close


def _published_inter(f_s, f_t, idx_s, idx_t):
    """SelfReg's inter_fd re-derived in float64 (per axis): adaptive average pooling of the larger map to the
    smaller size, the selected channels, MSE with the teacher detached."""
    s, t = f_s.double(), f_t.double().detach()
    size = tuple(min(a, b) for a, b in zip(s.shape[2:], t.shape[2:]))
    s, t = F.adaptive_avg_pool3d(s, size), F.adaptive_avg_pool3d(t, size)
    return F.mse_loss(s[:, list(map(int, idx_s))], t[:, list(map(int, idx_t))])


def _published_intra(f):
    """SelfReg's intra_fd re-derived in float64: score = mean over (batch, space) of F.normalize(f, p=2, dim=space),
    channels sorted descending, MSE(top half, bottom half), no detach."""
    x = f.double()
    score = F.normalize(x, p=2, dim=(2, 3, 4)).mean(dim=(0, 2, 3, 4))
    order = torch.argsort(score, descending=True)
    x = x[:, order]
    half = x.shape[1] // 2
    return F.mse_loss(x[:, :half], x[:, half:])


def _feature(shape, dtype=torch.float32, device="cpu", spread=True):
    x = torch.randn(shape, device=device)
    if spread:  # well separated channel scores, so the ranking cannot flip by rounding
        x = x + 0.5 * torch.randperm(shape[1], device=device).view(1, -1, 1, 1, 1).float()
    return x.to(dtype).requires_grad_()


# (student shape, teacher shape, k): teacher larger (SelfReg), student larger, anisotropic, mixed axes, equal
_INTER = [
    ((2, 6, 4, 6, 8), (2, 5, 8, 12, 16), 4),
    ((2, 4, 2, 2, 2), (2, 8, 8, 8, 8), 4),
    ((1, 5, 8, 4, 6), (1, 3, 4, 4, 3), 3),
    ((1, 4, 3, 8, 5), (1, 6, 3, 2, 10), 4),
    ((2, 3, 3, 5, 7), (2, 3, 3, 5, 7), 3),
]


def _inter_id(c):
    return "s" + "x".join(map(str, c[0][2:])) + "-t" + "x".join(map(str, c[1][2:]))


def _pairs(cs, ct, k):
    return torch.randperm(cs)[:k], torch.randperm(ct)[:k]


# ------------------------------------------------------------------------------------------------------
# CPU tier


@pytest.mark.parametrize("case", _INTER, ids=_inter_id)
def test_inter_reference_matches_published(case):
    s, t = _feature(case[0], torch.float64), _feature(case[1], torch.float64)
    cs, ct = _pairs(case[0][1], case[1][1], case[2])
    loss = selfreg_inter_ref(s, t, cs, ct)
    expected = _published_inter(s, t, cs, ct)
    assert_close("loss", loss, expected, torch.float64)
    (g,) = torch.autograd.grad(loss, s)
    (e,) = torch.autograd.grad(expected, s)
    assert_close("dstudent", g, e, torch.float64)
    assert t.grad is None


@pytest.mark.parametrize("case", _INTER, ids=_inter_id)
@pytest.mark.parametrize("duplicates", [False, True])
def test_inter_explicit_gradient_matches_autograd(case, duplicates):
    s, t = _feature(case[0], torch.float64), _feature(case[1], torch.float64)
    cs, ct = _pairs(case[0][1], case[1][1], case[2])
    if duplicates:
        cs[1] = cs[0]
    loss, grad = selfreg_inter_fused_ref(s.detach(), t.detach(), cs, ct, True)
    expected = _published_inter(s, t, cs, ct)
    expected.backward()
    assert_close("loss", loss, expected, torch.float32)
    assert_close("dstudent", grad, s.grad, torch.float64)


@pytest.mark.parametrize("shape", [(2, 6, 3, 4, 5), (1, 8, 2, 7, 3), (3, 2, 1, 1, 5)], ids=str)
def test_intra_reference_matches_published(shape):
    f = _feature(shape, torch.float64)
    loss = selfreg_intra_ref(f)
    expected = _published_intra(f)
    assert_close("loss", loss, expected, torch.float64)
    (g,) = torch.autograd.grad(loss, f)
    (e,) = torch.autograd.grad(expected, f)
    assert_close("dfeature", g, e, torch.float64)
    loss2, grad = selfreg_intra_fused_ref(f.detach(), True)
    assert_close("loss (explicit)", loss2, expected, torch.float32)
    assert_close("dfeature (explicit)", grad, e, torch.float64)


def test_intra_properties():
    f = _feature((2, 8, 3, 4, 5), torch.float64)
    perm = torch.randperm(8)
    # the ranking makes the loss independent of the channel order of the input
    assert abs(selfreg_intra(f).item() - selfreg_intra(f[:, perm]).item()) < 1e-12
    # both halves get gradient, of opposite sign, summing to zero over channels
    selfreg_intra(f).backward()
    assert (f.grad.abs().flatten(2).sum(-1) > 0).all()
    assert f.grad.sum(1).abs().max().item() < 1e-12
    # scaling every map by a positive constant keeps the ranking: the loss scales quadratically
    assert abs(selfreg_intra(3 * f).item() - 9 * selfreg_intra(f).item()) < 1e-9


def test_inter_multi_equals_singles_and_random_pairs():
    t = _feature((2, 8, 8, 8, 8), torch.float64)
    students = [_feature((2, c, s, s, s), torch.float64) for c, s in ((4, 4), (6, 2), (8, 8))]
    pairs = [random_channel_pairs(s.shape[1], 8) for s in students]
    for (cs, ct), s in zip(pairs, students):
        assert cs.numel() == ct.numel() == min(s.shape[1], 8)
        assert len(set(cs.tolist())) == cs.numel() and 0 <= int(cs.min()) and int(cs.max()) < s.shape[1]
        assert len(set(ct.tolist())) == ct.numel() and int(ct.max()) < 8
    losses = selfreg_inter_multi(students, t, [p[0] for p in pairs], [p[1] for p in pairs])
    assert losses.shape == (3,)
    expected = torch.stack([_published_inter(s, t, cs, ct) for s, (cs, ct) in zip(students, pairs)])
    assert_close("losses", losses, expected, torch.float64)
    # index sets given as lists of ints work too
    loss = selfreg_inter(students[0], t, pairs[0][0].tolist(), pairs[0][1].tolist())
    assert_close("list indices", loss, expected[0], torch.float64)


@pytest.mark.parametrize("need", [[True, True], [False, True]])
def test_opcheck_inter(need):
    students = [_feature((2, 4, 2, 3, 4)), _feature((2, 3, 4, 3, 2))]
    for s, n in zip(students, need):
        s.requires_grad_(n)
    t = _feature((2, 5, 4, 6, 4)).detach()
    cs = [torch.tensor([0, 2, 3]), torch.tensor([2, 1])]
    ct = [torch.tensor([4, 0, 1]), torch.tensor([3, 3])]
    torch.library.opcheck(torch.ops.fastseg3d.selfreg_inter.default, (students, t, cs, ct, need))


@pytest.mark.parametrize("need", [True, False])
def test_opcheck_intra(need):
    f = _feature((2, 6, 3, 4, 5)).detach().requires_grad_(need)
    torch.library.opcheck(torch.ops.fastseg3d.selfreg_intra.default, (f, need))


def test_opcheck_fp16_channels_last():
    # fp16 with channels-last inputs; on meta tensors the ops give the real ones' dtypes and strides
    s = _feature((2, 4, 2, 3, 4), torch.float16).detach().contiguous(memory_format=torch.channels_last_3d)
    t = _feature((2, 5, 4, 6, 4), torch.float16).detach().contiguous(memory_format=torch.channels_last_3d)
    args = ([s.requires_grad_()], t, [torch.tensor([0, 2, 3])], [torch.tensor([4, 0, 1])], [True])
    torch.library.opcheck(torch.ops.fastseg3d.selfreg_inter.default, args)
    _, (real,) = torch.ops.fastseg3d.selfreg_inter(*args)
    _, (meta,) = torch.ops.fastseg3d.selfreg_inter([s.to("meta")], t.to("meta"), *args[2:])
    assert (real.dtype, real.stride()) == (meta.dtype, meta.stride()) and real.dtype == torch.float32
    f = _feature((2, 6, 3, 4, 5), torch.float16).detach().contiguous(memory_format=torch.channels_last_3d)
    torch.library.opcheck(torch.ops.fastseg3d.selfreg_intra.default, (f.requires_grad_(), True))
    _, real = torch.ops.fastseg3d.selfreg_intra(f, True)
    _, meta = torch.ops.fastseg3d.selfreg_intra(f.to("meta"), True)
    assert (real.dtype, real.stride()) == (meta.dtype, meta.stride()) and real.dtype == torch.float32


def test_compile_fullgraph_ops_forward_backward():
    torch._dynamo.reset()
    s, t, f = _feature((2, 4, 2, 3, 4)), _feature((2, 5, 4, 6, 8)).detach(), _feature((2, 6, 3, 4, 5))
    cs, ct = torch.tensor([1, 3, 0]), torch.tensor([4, 2, 0])

    def fn(s, t, f):
        losses, _ = torch.ops.fastseg3d.selfreg_inter([s], t, [cs], [ct], [True])
        loss_f, _ = torch.ops.fastseg3d.selfreg_intra(f, True)
        return 2.0 * losses[0] + loss_f

    eager = [s.detach().clone().requires_grad_(), f.detach().clone().requires_grad_()]
    comp = [s.detach().clone().requires_grad_(), f.detach().clone().requires_grad_()]
    y_e = fn(eager[0], t, eager[1])
    y_c = torch.compile(fn, fullgraph=True)(comp[0], t, comp[1])
    assert_close("loss", y_c, y_e, torch.float32)
    y_e.backward()
    y_c.backward()
    for name, a, e in zip(("dstudent", "dfeature"), comp, eager):
        assert_close(name, a.grad, e.grad, torch.float32)


def test_compile_fullgraph_public_functions():
    torch._dynamo.reset()
    s, t, f = _feature((1, 4, 2, 2, 2)), _feature((1, 6, 4, 4, 4)), _feature((1, 4, 2, 3, 2))
    cs, ct = torch.tensor([0, 1]), torch.tensor([5, 2])
    compiled = torch.compile(lambda s, t, f: selfreg_inter(s, t, cs, ct) + selfreg_intra(f), fullgraph=True)
    loss = compiled(s, t, f)
    assert_close("loss", loss, _published_inter(s, t, cs, ct) + _published_intra(f), torch.float32)
    loss.backward()
    assert s.grad is not None and f.grad is not None and t.grad is None


def test_meta_device_forward_backward():
    # SelfReg at 128^3: F_final (2, 32, 128^3) supervising blocks down to 8^3; nothing is allocated on meta
    final = torch.empty(2, 32, 128, 128, 128, device="meta", dtype=torch.bfloat16, requires_grad=True)
    blocks = [torch.empty(2, 32 * 2**i, 128 >> (i + 1), 128 >> (i + 1), 128 >> (i + 1), device="meta",
                          dtype=torch.bfloat16, requires_grad=True) for i in range(4)]
    cs = [torch.arange(32, device="meta") for _ in blocks]
    ct = [torch.arange(32, device="meta") for _ in blocks]
    losses = selfreg_inter_multi(blocks, final, cs, ct)
    loss = losses.mean() + selfreg_intra(blocks[0])
    assert loss.device.type == "meta" and losses.shape == (4,) and loss.dtype == torch.float32
    loss.backward()
    assert all(b.grad.shape == b.shape for b in blocks) and final.grad is None


_X = torch.randn(2, 4, 4, 4, 4)
_I = torch.tensor([0, 1])
_BAD = [
    (lambda: selfreg_inter(torch.randn(2, 4, 4, 4), _X, _I, _I), ValueError, "student must be a 5-D"),
    (lambda: selfreg_inter(_X, torch.randn(2, 4, 4, 4), _I, _I), ValueError, "teacher must be a 5-D"),
    (lambda: selfreg_inter(torch.randn(3, 4, 4, 4, 4), _X, _I, _I), ValueError, "batch sizes differ"),
    (lambda: selfreg_inter(torch.randn(2, 4, 3, 4, 4), _X, _I, _I), ValueError, "non-integer factor"),
    (lambda: selfreg_inter(_X, _X, _I, torch.tensor([0, 1, 2])), ValueError, "entries"),
    (lambda: selfreg_inter(_X, _X, torch.tensor([0, 4]), _I), ValueError, "outside"),
    (lambda: selfreg_inter(_X, _X, [0, -1], _I), ValueError, "outside"),
    (lambda: selfreg_inter(_X, _X, torch.tensor([0.0, 1.0]), _I), ValueError, "integer tensor"),
    (lambda: selfreg_inter(_X, _X, torch.tensor([], dtype=torch.long), _I), ValueError, "no channels"),
    (lambda: selfreg_inter(_X, _X.to("meta"), _I, _I), TypeError, "is on"),
    (lambda: selfreg_inter(_X, _X, _I.to("meta"), _I), TypeError, "student_channels is a meta tensor"),
    (lambda: selfreg_inter(_X.long(), _X.long(), _I, _I), TypeError, "floating"),
    (lambda: selfreg_inter_multi([], _X, [], []), ValueError, "non-empty"),
    (lambda: selfreg_inter_multi([_X, _X], _X, [_I], [_I, _I]), ValueError, "one index set per student"),
    (lambda: selfreg_intra(torch.randn(2, 5, 4, 4, 4)), ValueError, "even channel count"),
    (lambda: selfreg_intra(torch.randn(2, 4, 4, 4)), ValueError, "5-D"),
    (lambda: selfreg_intra("x"), TypeError, "torch.Tensor"),
    (lambda: random_channel_pairs(4, 8, k=5), ValueError, "k must be"),
]


@pytest.mark.parametrize("call,exc,match", _BAD, ids=[f"{i}-{m}" for i, (_, _, m) in enumerate(_BAD)])
def test_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_backend_policy(monkeypatch):
    s, t = torch.randn(1, 3, 2, 2, 2), torch.randn(1, 3, 4, 4, 4)
    calls = []
    module = sys.modules["fastseg3d.ops.selfreg"]
    monkeypatch.setattr(module, "selfreg_inter_ref", lambda *a, **k: calls.append(1) or selfreg_inter_ref(*a, **k))
    monkeypatch.setattr(module, "selfreg_intra_ref", lambda *a, **k: calls.append(2) or selfreg_intra_ref(*a, **k))
    with fastseg3d.backend("torch"):
        selfreg_inter(s, t, _I, _I)
        selfreg_intra(torch.randn(1, 2, 2, 2, 2))
    assert calls == [1, 2]
    with fastseg3d.backend("triton"), pytest.raises(NotImplementedError, match="device=cpu"):
        selfreg_inter(s, t, _I, _I)
    with fastseg3d.backend("triton"), pytest.raises(NotImplementedError, match="device=cpu"):
        selfreg_intra(torch.randn(1, 2, 2, 2, 2))
    reasons = selfreg_inter_unsupported_reasons(torch.empty(1, 3, 2, 2, 2, device="meta", dtype=torch.float64), [])
    assert any("float64" in r for r in reasons)


def check_mixed_dtypes(student_dtypes, teacher_dtype, backend):
    """Students of several dtypes against a teacher of another (under autocast a feature after a LayerNorm stays
    fp32): the losses as from float64 copies, each gradient in its student's dtype."""
    shapes = [(2, 4, 2, 2, 4), (2, 6, 4, 4, 8), (2, 3, 8, 8, 8)][: len(student_dtypes)]
    students = [_feature(sh, dt, spread=False) for sh, dt in zip(shapes, student_dtypes)]
    teacher = _feature((2, 5, 4, 4, 8), teacher_dtype, spread=False).detach()
    pairs = [_pairs(sh[1], 5, 3) for sh in shapes]
    ref_s = [x.detach().double().requires_grad_() for x in students]
    with fastseg3d.backend(backend):
        losses = selfreg_inter_multi(students, teacher, [p[0] for p in pairs], [p[1] for p in pairs])
    expected = torch.stack([_published_inter(x, teacher.double(), a, b) for x, (a, b) in zip(ref_s, pairs)])
    coarse = torch.bfloat16 if torch.bfloat16 in (*student_dtypes, teacher_dtype) else torch.float16
    assert losses.dtype == torch.float32
    assert_close("losses", losses, expected, coarse)
    w = torch.tensor([1.5, -0.5, 2.0][: len(students)])
    (losses * w).sum().backward()
    (expected * w.double()).sum().backward()
    for i, (a, e) in enumerate(zip(students, ref_s)):
        assert a.grad.dtype == a.dtype, (i, a.grad.dtype, a.dtype)
        assert_close(f"dstudent[{i}]", a.grad, e.grad, a.dtype)


@pytest.mark.parametrize("students,teacher", [
    ([torch.float32], torch.bfloat16),
    ([torch.bfloat16], torch.float32),
    ([torch.float32, torch.bfloat16, torch.float16], torch.bfloat16),
], ids=["f32-bf16", "bf16-f32", "multi-bf16"])
def test_inter_mixed_dtypes(students, teacher):
    check_mixed_dtypes(students, teacher, "auto")
    # the op's CPU branch (what the kernel computes) and its fake implementation, on the same mix
    s = [_feature((2, 4, 2, 2, 4), dt).detach().requires_grad_() for dt in students]
    t = _feature((2, 5, 4, 4, 8), teacher).detach()
    idx = [torch.tensor([0, 2, 3])] * len(s)
    args = (s, t, idx, [torch.tensor([4, 0, 1])] * len(s), [True] * len(s))
    torch.library.opcheck(torch.ops.fastseg3d.selfreg_inter.default, args)
    _, grads = torch.ops.fastseg3d.selfreg_inter(*args)
    assert [g.dtype for g in grads] == [torch.float32 if dt == torch.float16 else dt for dt in students]


def test_inter_dtype_outside_the_kernel_takes_the_reference():
    teacher = torch.empty(2, 8, 8, 8, 8, device="meta")
    assert not any("student dtype" in r for r in selfreg_inter_unsupported_reasons(teacher, [teacher.bfloat16()]))
    reasons = selfreg_inter_unsupported_reasons(teacher, [teacher.half(), teacher.double()])
    assert any("student dtype torch.float64" in r for r in reasons)
    s, t = _feature((1, 4, 2, 2, 2), torch.float64), _feature((1, 4, 4, 4, 4))
    loss = selfreg_inter(s, t, _I, _I)  # float64 student, fp32 teacher: the reference
    assert_close("loss", loss, _published_inter(s, t, _I, _I), torch.float32)


def test_grid_limits_of_the_pooling_and_statistics_kernels():
    """The teacher's pyramid and intra's channel statistics launch B * C programs along CUDA's grid y (at most
    65,535): beyond that the reference takes the case, although B and C alone are within the limit."""
    vit = torch.empty(128, 768, 1, 7, 7, device="meta")  # e.g. ViT-B tokens as a 7x7 map, batch 128
    assert any("batch x channels" in r for r in selfreg_intra_unsupported_reasons(vit))
    assert not any("batch x channels" in r for r in selfreg_intra_unsupported_reasons(vit[:64]))
    coarse = torch.empty(128, 64, 1, 7, 7, device="meta")
    fine = torch.empty(128, 768, 2, 14, 14, device="meta")
    assert any("batch x teacher channels" in r for r in selfreg_inter_unsupported_reasons(fine, [coarse]))
    # a teacher at the students' resolution is not pooled
    assert not any("batch x teacher" in r for r in selfreg_inter_unsupported_reasons(vit, [coarse]))
    assert not any("batch x teacher" in r for r in selfreg_inter_unsupported_reasons(fine[:64], [coarse[:64]]))


def test_compile_fullgraph_list_indices():
    """Index lists are range-checked as Python ints, so compiling with fullgraph=True does not stop at reading a
    tensor's values back."""
    torch._dynamo.reset()
    s, t = _feature((1, 4, 2, 2, 2)), _feature((1, 6, 4, 4, 4))
    compiled = torch.compile(lambda s, t: selfreg_inter(s, t, [0, 1], [5, 2]), fullgraph=True, backend="aot_eager")
    loss = compiled(s, t)
    assert_close("loss", loss, _published_inter(s, t, [0, 1], [5, 2]), torch.float32)
    loss.backward()
    assert s.grad is not None
    with pytest.raises(ValueError, match="outside"):
        selfreg_inter(s, t, [0, 4], [5, 2])
    with pytest.raises(ValueError, match="outside"):
        selfreg_inter(s, t, [0, 1], [6, 2])


def test_fp16_gradients_survive_a_loss_scale():
    """fp16 training scales the loss by GradScaler's 2^16 before backward. The gradients made in the forward are of
    order 1 / (B x voxels), below fp16's normal range at this size: they are kept in fp32, and the scale, which fp16
    cannot represent, is applied before the cast (kept in fp16 they came back as inf, or as a few bits)."""
    s, t = _feature((2, 16, 16, 16, 16), torch.float16), _feature((2, 8, 32, 32, 32), torch.float16)
    cs, ct = _pairs(16, 8, 8)
    ref_s = s.detach().double().requires_grad_()
    losses, grads = torch.ops.fastseg3d.selfreg_inter([s], t.detach(), [cs], [ct], [True])
    assert grads[0].dtype == torch.float32
    (2.0**16 * losses.sum()).backward()
    (2.0**16 * _published_inter(ref_s, t, cs, ct)).backward()
    assert_close("dstudent", s.grad, ref_s.grad, torch.float16)

    f = _feature((2, 8, 32, 32, 32), torch.float16)
    ref = f.detach().double().requires_grad_()
    loss, grad = torch.ops.fastseg3d.selfreg_intra(f, True)
    assert grad.dtype == torch.float32
    (2.0**16 * loss).backward()
    (2.0**16 * _published_intra(ref)).backward()
    assert_close("dfeature", f.grad, ref.grad, torch.float16)


# ------------------------------------------------------------------------------------------------------
# Interpreter tier


def check_inter(student_shapes, teacher_shape, ks, dtype, device, duplicates=False, grad_scale=(1.5, -0.5, 2.0),
                strided=False):
    students = [_feature(s, dtype, device, spread=False) for s in student_shapes]
    teacher = _feature(teacher_shape, dtype, device, spread=False)
    pairs = [_pairs(s[1], teacher_shape[1], k) for s, k in zip(student_shapes, ks)]
    if duplicates:
        pairs[0][0][1] = pairs[0][0][0]
    cs = [p[0].to(device) for p in pairs]
    ct = [p[1].to(device) for p in pairs]
    if strided:  # int64 views of every other element (the kernels read indices at unit stride)
        cs, ct = ([torch.stack([i, i.flip(0) + 99], 1)[:, 0] for i in idx] for idx in (cs, ct))
    ref_s = [s.detach().double().requires_grad_() for s in students]
    with fastseg3d.backend("triton"):
        if len(students) == 1:
            losses = selfreg_inter(students[0], teacher, cs[0], ct[0]).reshape(1)
        else:
            losses = selfreg_inter_multi(students, teacher, cs, ct)
    expected = torch.stack([_published_inter(s, teacher.detach(), a, b) for s, a, b in zip(ref_s, cs, ct)])
    assert losses.dtype == torch.float32
    assert_close("losses", losses, expected, torch.float32 if dtype == torch.float32 else dtype)
    w = torch.tensor(grad_scale[: len(students)], device=device)
    (losses * w).sum().backward()
    (expected * w.double()).sum().backward()
    assert teacher.grad is None
    for i, (a, e) in enumerate(zip(students, ref_s)):
        assert a.grad.dtype == dtype
        assert_close(f"dstudent[{i}]", a.grad, e.grad, dtype)


def check_intra(shape, dtype, device, grad_scale=1.7):
    f = _feature(shape, dtype, device)
    ref = f.detach().double().requires_grad_()
    with fastseg3d.backend("triton"):
        loss = selfreg_intra(f)
    expected = _published_intra(ref)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_close("loss", loss, expected, torch.float32 if dtype == torch.float32 else dtype)
    (grad_scale * loss).backward()
    (grad_scale * expected).backward()
    assert_close("dfeature", f.grad, ref.grad, dtype)


_F32, _F16 = torch.float32, torch.float16
_INTERPRET_INTER = [
    ((2, 6, 2, 3, 4), (2, 5, 4, 6, 8), 4, _F32, False),
    ((1, 4, 2, 2, 2), (1, 8, 8, 8, 8), 4, _F32, True),
    ((1, 5, 4, 4, 6), (1, 3, 2, 4, 3), 3, _F32, False),
    ((1, 4, 3, 4, 5), (1, 6, 3, 2, 10), 4, _F32, False),
    ((2, 3, 3, 5, 7), (2, 3, 3, 5, 7), 3, _F16, False),
    ((1, 6, 2, 3, 4), (1, 5, 4, 6, 8), 5, _F16, True),
]


@pytest.mark.interpret
@pytest.mark.parametrize("student,teacher,k,dtype,dup", _INTERPRET_INTER,
                         ids=[f"{_inter_id(c)}-{str(c[3])[6:]}-dup{int(c[4])}" for c in _INTERPRET_INTER])
def test_interpret_inter_matches_reference(poison, student, teacher, k, dtype, dup):
    check_inter([student], teacher, [k], dtype, "cpu", duplicates=dup)


@pytest.mark.interpret
def test_interpret_many_blocks_a_map(poison, monkeypatch):
    """Pooled maps of more voxels than a program's block (a GPU's 1024; here 16): each (b, c) map's partial sums
    come from several programs, in the inter term and the intra term's channel statistics."""
    import fastseg3d.kernels.selfreg as k

    monkeypatch.setattr(k, "_block", lambda n: 16)
    check_inter([(2, 4, 4, 6, 10)], (2, 6, 8, 12, 20), [3], _F32, "cpu")
    check_intra((2, 4, 4, 6, 10), _F32, "cpu")


@pytest.mark.interpret
def test_interpret_fp16_loss_scale(poison):
    # fp16 as GradScaler trains it: the kernels keep the forward-made gradients in fp32 and the 2^16 loss scale
    # (inf in fp16) is applied before the cast
    check_inter([(1, 4, 2, 2, 2), (1, 6, 4, 4, 4)], (1, 5, 4, 4, 4), [4, 5], _F16, "cpu",
                grad_scale=(2.0**16, -(2.0**15)))
    check_intra((1, 6, 2, 3, 4), _F16, "cpu", grad_scale=2.0**16)


@pytest.mark.interpret
def test_interpret_64bit_indexing_path(poison, monkeypatch):
    import fastseg3d.kernels.selfreg as k

    monkeypatch.setattr(k, "_INT32_MAX", 16)  # every tensor takes the int64 path
    check_inter([(1, 4, 2, 2, 2), (1, 3, 4, 8, 4)], (1, 5, 4, 8, 4), [4, 3], _F32, "cpu", grad_scale=(1.5, -0.5))
    check_intra((1, 6, 2, 3, 4), _F32, "cpu")


@pytest.mark.interpret
def test_interpret_strided_channel_indices(poison):
    check_inter([(1, 4, 2, 2, 2)], (1, 5, 4, 4, 4), [3], _F32, "cpu", strided=True)
    check_inter([(1, 4, 2, 2, 2), (1, 6, 4, 4, 4)], (1, 5, 4, 4, 4), [4, 5], _F32, "cpu", strided=True)


@pytest.mark.interpret
def test_interpret_inter_multi_pyramid(poison):
    # levels 4^3 (from the teacher), 2^3 (from 4^3), (4, 2, 8) (from the teacher) and the teacher itself
    check_inter([(1, 4, 4, 4, 4), (1, 6, 2, 2, 2), (1, 3, 4, 2, 8), (1, 2, 8, 8, 8)], (1, 5, 8, 8, 8), [4, 5, 3, 2],
                _F32, "cpu", grad_scale=(1.5, -0.5, 2.0, 1.0))


@pytest.mark.interpret
def test_interpret_inter_forward_without_grad(poison):
    s, t = _feature((1, 4, 2, 2, 2)), _feature((1, 4, 4, 4, 4))
    with fastseg3d.backend("triton"), torch.no_grad():
        loss = selfreg_inter(s, t, _I, _I)
    assert_close("loss", loss, _published_inter(s.detach(), t, _I, _I), torch.float32)


_INTERPRET_INTRA = [((2, 6, 3, 4, 5), _F32), ((1, 8, 2, 7, 3), _F32), ((3, 2, 1, 1, 5), _F32), ((2, 6, 3, 4, 5), _F16)]


@pytest.mark.interpret
@pytest.mark.parametrize("shape,dtype", _INTERPRET_INTRA,
                         ids=[f"{'x'.join(map(str, c[0]))}-{str(c[1])[6:]}" for c in _INTERPRET_INTRA])
def test_interpret_intra_matches_reference(poison, shape, dtype):
    check_intra(shape, dtype, "cpu")


@pytest.mark.interpret
def test_interpret_inter_mixed_dtypes(poison):
    # the student pooled on the fly in its own dtype, the teacher's pyramid built from a bf16 teacher
    check_mixed_dtypes([torch.float32, torch.bfloat16, torch.float16], torch.bfloat16, "triton")
    check_mixed_dtypes([torch.bfloat16], torch.float32, "triton")


@pytest.mark.interpret
def test_interpret_intra_unit_incoming_gradient(poison):
    check_intra((1, 4, 2, 3, 5), _F32, "cpu", grad_scale=1.0)


@pytest.mark.interpret
def test_interpret_intra_forward_without_grad(poison):
    f = _feature((1, 4, 2, 3, 4)).detach()
    with fastseg3d.backend("triton"):
        loss = selfreg_intra(f)
    assert_close("loss", loss, _published_intra(f), torch.float32)


@pytest.mark.interpret
def test_interpret_intra_ranks_by_every_voxel_block(poison, monkeypatch):
    """Blocks of 16 voxels (a GPU's 1024): the second block alone sets the channels' ranking (the first ranks them
    otherwise and would pair other channels), so every block's partial statistics must reach the scores."""
    monkeypatch.setattr(importlib.import_module("fastseg3d.kernels.selfreg"), "_block", lambda n: 16)
    x = 0.1 * torch.randn(2, 6, 32)
    x[:, :, :16] += 0.5 * torch.tensor([0.0, 1, 2, 3, 4, 5]).view(1, 6, 1)  # order 5 4 3 2 1 0
    x[:, :, 16:] += 2.0 * torch.tensor([0.0, 2, 4, 1, 3, 5]).view(1, 6, 1)  # order 5 2 4 1 3 0
    check_intra_against_published(x.view(2, 6, 2, 4, 4))


@pytest.mark.interpret
def test_interpret_intra_ranks_by_the_batch_mean(poison):
    """The two batch elements rank the channels differently (5 4 3 2 1 0, and with larger offsets 5 2 4 1 3 0); the
    score is the batch mean's ranking, 5 4 2 3 1 0, which pairs other channels than either alone."""
    x = 0.1 * torch.randn(2, 6, 64)
    x[0] += 0.3 * torch.tensor([0.0, 1, 2, 3, 4, 5]).view(6, 1)
    x[1] += 0.6 * torch.tensor([0.0, 2, 4, 1, 3, 5]).view(6, 1)
    check_intra_against_published(x.view(2, 6, 4, 4, 4))


def check_intra_against_published(x):
    f = x.clone().requires_grad_()
    ref = x.double().requires_grad_()
    with fastseg3d.backend("triton"):
        loss = selfreg_intra(f)
    expected = _published_intra(ref)
    assert_close("loss", loss, expected, torch.float32)
    loss.backward()
    expected.backward()
    assert_close("dfeature", f.grad, ref.grad, torch.float32)


@pytest.mark.interpret
def test_interpret_inter_multi_with_a_frozen_first_student(poison):
    """A frozen first block and a trainable second one: the second still gets its gradient, the first none."""
    s0 = _feature((1, 4, 2, 2, 2), spread=False).detach()
    s1 = _feature((1, 6, 4, 4, 4), spread=False)
    t = _feature((1, 5, 4, 4, 4), spread=False).detach()
    cs, ct = [torch.tensor([0, 2, 3]), torch.tensor([5, 1, 0])], [torch.tensor([4, 0, 1]), torch.tensor([2, 3, 4])]
    ref = s1.detach().double().requires_grad_()
    with fastseg3d.backend("triton"):
        losses = selfreg_inter_multi([s0, s1], t, cs, ct)
    expected = _published_inter(ref, t, cs[1], ct[1])
    assert_close("loss[1]", losses[1], expected, torch.float32)
    losses.sum().backward()
    expected.backward()
    assert s0.grad is None and s1.grad is not None
    assert_close("dstudent[1]", s1.grad, ref.grad, torch.float32)


# ------------------------------------------------------------------------------------------------------
# GPU tier: SelfReg at a 64^3 final feature (the benchmark runs 128^3)

_GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", _GPU_DTYPES, ids=lambda d: str(d)[6:])
def test_gpu_inter_multi_matches_reference(poison, dtype):
    shapes = [(2, 32 * 2**i, 64 >> (i + 1), 64 >> (i + 1), 64 >> (i + 1)) for i in range(4)]
    # fp16 as GradScaler runs it: gradients of 1 / (B x voxels) scale come back through a loss scale of 2^16
    scale = 2.0**16 if dtype == torch.float16 else 1.0
    check_inter(shapes, (2, 32, 64, 64, 64), [32] * 4, dtype, "cuda",
                grad_scale=tuple(scale * w for w in (1.0, 0.5, 2.0, -1.0)))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", _GPU_DTYPES, ids=lambda d: str(d)[6:])
def test_gpu_intra_matches_reference(poison, dtype):
    check_intra((2, 64, 32, 32, 32), dtype, "cuda", grad_scale=2.0**16 if dtype == torch.float16 else 1.7)


@pytest.mark.gpu
def test_gpu_bitwise_determinism_and_memory():
    final = torch.randn(2, 32, 128, 128, 128, device="cuda", dtype=torch.bfloat16)
    block = torch.randn(2, 64, 32, 32, 32, device="cuda", dtype=torch.bfloat16)
    cs, ct = random_channel_pairs(64, 32)
    runs = []
    for _ in range(2):
        x = block.detach().clone().requires_grad_()
        with fastseg3d.backend("triton"):
            loss = selfreg_inter(x, final, cs, ct) + selfreg_intra(x)
        loss.backward()
        runs.append((loss.detach(), x.grad))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])

    def peak(fn):
        x = block.detach().clone().requires_grad_()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(x).backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    with fastseg3d.backend("triton"):
        fused = peak(lambda x: selfreg_inter(x, final, cs, ct))
    eager = peak(lambda x: selfreg_inter_ref(x, final, cs.cuda(), ct.cuda()))
    assert fused < 0.5 * eager, (fused, eager)


@pytest.mark.gpu
def test_gpu_host_channels_do_not_wait_for_the_gpu():
    """SelfReg draws its channel subsets on the host every step; copying them to the GPU must not wait for the
    kernels queued before (a blocking copy would), and the copy must not see the host tensor change after it."""
    from fastseg3d.ops.utils import host_to_device

    final = torch.randn(2, 32, 32, 32, 32, device="cuda")
    block = torch.randn(2, 64, 8, 8, 8, device="cuda", requires_grad=True)
    cs, ct = random_channel_pairs(64, 32)
    expected = selfreg_inter_ref(block, final, cs.cuda(), ct.cuda())

    def timed():
        host = torch.arange(64)
        torch.cuda._sleep(2_000_000_000)  # about a second of queued GPU work
        copied = host_to_device(host, torch.device("cuda"))
        host.fill_(-1)
        with fastseg3d.backend("triton"):
            loss = selfreg_inter(block, final, cs, ct)
            lists = selfreg_inter(block, final, cs.tolist(), ct.tolist())
        return torch.cuda.current_stream().query(), copied, loss, lists

    timed()  # compiles the kernels and fills the pinned-memory cache with the blocks the timed run takes
    torch.cuda.synchronize()
    waited, copied, loss, lists = timed()
    assert not waited
    assert torch.equal(copied.cpu(), torch.arange(64))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lists, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_gpu_channels_outside_the_map_on_the_gpu_stop_the_run_fp32():
    """Indices already on the GPU are checked by a device-side assert, not read back: out of range, the kernel
    would read another channel's values. The assert spoils the CUDA context, hence a process of its own (fp32:
    the GPU tier's order runs it after the checks that only a GPU makes)."""
    code = (
        "import torch, fastseg3d\n"
        "from fastseg3d.ops import selfreg_inter\n"
        "s = torch.randn(2, 4, 4, 4, 4, device='cuda'); t = torch.randn(2, 6, 8, 8, 8, device='cuda')\n"
        "with fastseg3d.backend('triton'):\n"
        "    ok = selfreg_inter(s, t, torch.tensor([0, 1], device='cuda'), torch.tensor([5, 0], device='cuda'))\n"
        "    torch.cuda.synchronize(); print('in range', float(ok))\n"
        "    selfreg_inter(s, t, torch.tensor([0, 1], device='cuda'), torch.tensor([6, 0], device='cuda'))\n"
        "    torch.cuda.synchronize()\n"
        "print('not stopped')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "in range" in proc.stdout, proc.stderr
    assert proc.returncode != 0 and "not stopped" not in proc.stdout, proc.stdout
    assert "assert" in proc.stderr.lower(), proc.stderr


def test_host_to_device_off_the_gpu_is_a_plain_copy():
    from fastseg3d.ops.utils import host_to_device

    t = torch.tensor([3, 1, 2])
    assert host_to_device(t, torch.device("cpu")) is t
    assert host_to_device(t, torch.device("meta")).device.type == "meta"


def test_host_to_device_refuses_a_cuda_graph_capture(monkeypatch):
    """A copy of host data captured in a CUDA graph would replay the captured values (SelfReg's channels, drawn
    anew every step): refused, before any CUDA call."""
    from fastseg3d.ops.utils import host_to_device

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="during CUDA graph capture"):
        host_to_device(torch.tensor([3, 1, 2]), torch.device("cuda"))
    assert host_to_device(torch.tensor([3, 1, 2]), torch.device("cpu")).tolist() == [3, 1, 2]


def test_a_float64_teacher_makes_the_inter_loss_float64():
    torch.manual_seed(0)
    s, t = torch.randn(2, 4, 3, 4, 5), torch.randn(2, 6, 6, 8, 10, dtype=torch.float64)
    cs, ct = torch.tensor([0, 2]), torch.tensor([5, 1])
    loss = selfreg_inter(s, t, cs, ct)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, selfreg_inter(s.double(), t, cs, ct), rtol=1e-6, atol=0)
