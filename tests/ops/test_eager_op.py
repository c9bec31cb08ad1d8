"""fastseg3d.ops.utils.EagerOp: eager calls skip the dispatcher, traced ones go through ``torch.ops.fastseg3d``,
and both give the same values and gradients (CPU tier on the ops' reference bodies, interpreter tier on the
kernels)."""

from __future__ import annotations

import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fastseg3d
from fastseg3d.ops import utils
from tests.utils import assert_close

DW = sys.modules["fastseg3d.ops.dwconv3d"]
ATT = sys.modules["fastseg3d.ops.attention"]
KL = sys.modules["fastseg3d.ops.kl_distill"]
CKL = sys.modules["fastseg3d.ops.channel_kl"]
SR = sys.modules["fastseg3d.ops.selfreg"]
LOSSES = ["kl_distill", "selfreg_inter", "channel_kl", "selfreg_intra"]


def _dw_args(shape=(2, 5, 3, 4, 6), dtype=torch.float32, device="cpu"):
    x, r = (torch.randn(shape, device=device).to(dtype).requires_grad_() for _ in range(2))
    w = torch.randn(shape[1], 1, 3, 3, 3, device=device).to(dtype).requires_grad_()
    b = torch.randn(shape[1], device=device).to(dtype).requires_grad_()
    return (x, w, b, r, [1, 1, 1], [1, 1, 1], "gelu")


def _att_args(n=37, m=11, dtype=torch.float32, device="cpu"):
    q = torch.randn(2, n, 2, 16, device=device).to(dtype).requires_grad_()
    kv = torch.randn(2, m, 2 * 2 * 16, device=device).to(dtype).view(2, m, 2, 2, 16).detach().requires_grad_()
    return (q, kv[:, :, 0], kv[:, :, 1], 0.3), [q, kv]


def _randn(*shape, dtype=torch.float32, device="cpu", grad=True):
    return torch.randn(shape, device=device).to(dtype).requires_grad_(grad)


def _loss_args(case, dtype=torch.float32, device="cpu", scale=1):
    """(op, args, leaves) of a fused loss op: tensor-list arguments (the multi-student forms) among them, a
    student that needs no gradient, unequal weights, resolution ratios."""
    s = scale
    if case == "kl_distill":
        teacher = _randn(2, 3, 4 * s, 6 * s, 8 * s, dtype=dtype, device=device)
        students = [_randn(2, 3, 4 * s, 6 * s, 8 * s, dtype=dtype, device=device),
                    _randn(2, 3, 2 * s, 3 * s, 4 * s, dtype=dtype, device=device, grad=False),
                    _randn(2, 3, 4 * s, 3 * s, 8 * s, dtype=dtype, device=device)]
        args = (students, teacher, 2.0, [4 * s, 6 * s, 8 * s], [1.0, 0.5, 2.0], [True, False, True, True])
        return KL._kl_distill_op, args, [students[0], students[2], teacher]
    if case == "selfreg_inter":
        teacher = _randn(2, 6, 4 * s, 4 * s, 4 * s, dtype=dtype, device=device, grad=False)
        students = [_randn(2, 4, 2 * s, 2 * s, 2 * s, dtype=dtype, device=device),
                    _randn(2, 6, 4 * s, 4 * s, 4 * s, dtype=dtype, device=device)]
        index = [torch.tensor(i, device=device) for i in ([0, 2, 3], [1, 5, 0], [5, 1, 2], [0, 3, 4])]
        return SR._selfreg_inter_op, (students, teacher, index[:2], index[2:], [True, True]), students
    if case == "channel_kl":
        student = _randn(2, 5, 3 * s, 4 * s, 5 * s, dtype=dtype, device=device)
        teacher = _randn(2, 5, 3 * s, 4 * s, 5 * s, dtype=dtype, device=device, grad=False)
        return CKL._channel_kl_op, (student, teacher, "mean", True), [student]
    feature = _randn(2, 6, 3 * s, 4 * s, 5 * s, dtype=dtype, device=device)
    return SR._selfreg_intra_op, (feature, True), [feature]


class _NoDispatcher:
    """Stands in for an op's ``torch.ops`` entry point: the eager path must not call it."""

    def __init__(self, name):
        self.name = name

    def __call__(self, *args):
        raise AssertionError(f"{self.name} went through the dispatcher")


def _values_and_grads(fn, args, leaves):
    out = fn(*args)
    first = out[0] if isinstance(out, tuple) else out
    g = torch.randn(first.shape, generator=torch.Generator().manual_seed(1)).to(first.device, first.dtype)
    grads = torch.autograd.grad(first, leaves, g)
    return first.detach(), grads


@pytest.mark.parametrize("case", ["dwconv3d", "attention", *LOSSES])
def test_eager_call_skips_dispatcher_and_matches_it(case, monkeypatch):
    bwd = None  # the losses form their gradients in the forward pass: no backward op
    if case == "dwconv3d":
        fwd, bwd = DW._dwconv3d_op, DW._dwconv3d_backward_op
        args = _dw_args()
        leaves = [a for a in args if isinstance(a, torch.Tensor)]
    elif case == "attention":
        fwd, bwd = ATT._attention_op, ATT._attention_backward_op
        args, leaves = _att_args()
    else:
        fwd, args, leaves = _loss_args(case)
    with monkeypatch.context() as patch:  # the dispatcher, forward and backward
        patch.setattr(utils, "_eager_grad", lambda args, lists=(): None)
        expected = _values_and_grads(fwd, args, leaves)
    monkeypatch.setattr(fwd, "op", _NoDispatcher(fwd.name))
    if bwd is not None:
        monkeypatch.setattr(bwd, "op", _NoDispatcher(bwd.name))
    out, grads = _values_and_grads(fwd, args, leaves)
    assert torch.equal(out, expected[0])
    for g, e in zip(grads, expected[1]):
        assert torch.equal(g, e)


def test_eager_call_without_grad_runs_body(monkeypatch):
    monkeypatch.setattr(DW._dwconv3d_op, "op", _NoDispatcher("fastseg3d::dwconv3d"))
    x, w, b, r, *rest = _dw_args()
    with torch.no_grad():
        y = DW._dwconv3d_op(x, w, b, r, *rest)[0]
    assert y.grad_fn is None and not y.requires_grad
    y = DW._dwconv3d_op(*(t.detach() for t in (x, w, b, r)), *rest)[0]
    assert y.grad_fn is None


def test_eager_call_records_its_own_node():
    y = DW._dwconv3d_op(*_dw_args())[0]
    assert type(y.grad_fn).__name__.startswith("dwconv3d_eager")


@pytest.mark.parametrize("flag", ["thread-local", "context manager"])
@pytest.mark.parametrize("grad", [True, False])
def test_eager_body_launches_kernels_directly(grad, flag, monkeypatch):
    """Inside the body wrap_triton is off (each launch would otherwise go through a higher-order op), also in a
    backward that autograd runs on another thread; set through torch's thread-local flag, or through its context
    manager where a torch version lacks the flag."""
    from torch._library.triton import is_wrap_triton_enabled

    if flag == "context manager":
        monkeypatch.setattr(utils, "_WRAP_STATE", None)
    seen = []
    for op in (DW._dwconv3d_op, DW._dwconv3d_backward_op):
        body = op._fn
        monkeypatch.setattr(op, "_fn", lambda *a, body=body: seen.append(is_wrap_triton_enabled()) or body(*a))
    args = _dw_args()
    with torch.set_grad_enabled(grad):
        y = DW._dwconv3d_op(*args)[0]
    if grad:
        y.sum().backward()
    assert seen == [False, False] if grad else seen == [False]
    assert is_wrap_triton_enabled()


def test_profiler_records_the_op():
    args = _dw_args()
    with torch.profiler.profile() as prof:
        with torch.no_grad():
            DW._dwconv3d_op(*args)
        DW._dwconv3d_op(*args)[0].sum().backward()
    names = [e.name for e in prof.events()]
    assert names.count("fastseg3d::dwconv3d") == 2 and "fastseg3d::dwconv3d_backward" in names


def test_tensor_list_arguments_reach_autograd_flattened():
    """Tensors inside list arguments are the Function's inputs (flattened), each gets its own gradient, and a
    tensor-list output passes through."""
    def body(xs: list[torch.Tensor], y: torch.Tensor, zs: list[torch.Tensor], w: float
             ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        total = y.sum() * w
        for t in (*xs, *zs):
            total = total + (t * t).sum()
        return total, [t.detach() * 2 for t in (*xs, *zs)]

    def setup(ctx, inputs, output):
        ctx.n = len(inputs[0])
        ctx.save_for_backward(inputs[1], *output[1])
        ctx.w = inputs[3]

    def backward(ctx, grad, grad_list):
        y, *doubled = ctx.saved_tensors
        grads = [grad * d for d in doubled]
        return grads[:ctx.n], grad * ctx.w * torch.ones_like(y), grads[ctx.n:], None

    op = utils.EagerOp("fastseg3d::_eager_list_test", body)
    op.register_autograd(backward, setup_context=setup)
    op.op = _NoDispatcher(op.name)
    xs = [torch.randn(3, requires_grad=True) for _ in range(2)]
    y = torch.randn(4, requires_grad=True)
    zs = [torch.randn(2, 2), torch.randn(5, requires_grad=True)]
    total, doubled = op(xs, y, zs, 3.0)
    assert type(total.grad_fn).__name__ == "_eager_list_test_eagerBackward" and len(doubled) == 4
    total.backward()
    for t in (*xs, zs[1]):
        assert torch.equal(t.grad, 2 * t.detach())
    assert torch.equal(y.grad, torch.full((4,), 3.0)) and zs[0].grad is None
    assert utils._eager_grad(([torch.randn(2).as_subclass(_Subclass)],), (0,)) is None
    assert utils._eager_grad(([torch.randn(2)], torch.randn(2)), (0,)) is False
    assert utils._eager_grad(([torch.randn(2, requires_grad=True)], torch.randn(2)), (0,)) is True


def test_other_tensor_containers_are_refused():
    def body(xs: list[torch.Tensor | None]) -> torch.Tensor:
        return xs[0].clone()

    with pytest.raises(TypeError, match="optional tensors and lists of tensors"):
        utils.EagerOp("fastseg3d::_eager_optional_list_test", body)


def test_traced_calls_take_dispatcher():
    plain = torch.randn(2, 3)
    assert utils._eager_grad((plain, torch.nn.Parameter(plain), None, [1, 2], "gelu")) is True
    assert utils._eager_grad((plain, None, "gelu")) is False
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(plain)
        assert utils._eager_grad((fake,)) is None
    assert utils._eager_grad((plain.as_subclass(_Subclass),)) is None
    seen = []
    torch.vmap(lambda t: seen.append(utils._eager_grad((t,))) or t)(plain)
    assert seen == [None]

    @torch.compile(backend="eager", fullgraph=True)
    def traced(t):
        return t * 2, utils._eager_grad((t,)) is None

    assert traced(plain)[1] is True
    with torch.device("cpu"):  # a function mode
        assert utils._eager_grad((plain,)) is None
    jit_seen = []
    torch.jit.trace(lambda t: jit_seen.append(utils._eager_grad((t,))) or t * 2, plain, check_trace=False)
    assert jit_seen == [None]
    leaked = []  # a functorch wrapper that outlived its transform: the dispatcher path unwraps it
    torch.func.grad(lambda t: leaked.append(t) or t.sum())(plain)
    assert utils._eager_grad((leaked[0],)) is None


def test_leaked_functorch_wrapper_is_unwrapped():
    leaked = []
    x, w, b, r, *rest = _dw_args()
    torch.func.grad(lambda t: leaked.append(t) or t.sum())(x.detach())
    y = DW._dwconv3d_op(leaked[0], w, b, r, *rest)[0]
    y.sum().backward()
    assert w.grad is not None and torch.equal(y.detach(), DW._dwconv3d_op(x.detach(), w, b, r, *rest)[0].detach())


class _Subclass(torch.Tensor):
    pass


def test_dispatch_mode_sees_the_op():
    """Under a dispatch mode (a flop counter, a tracer) the op is dispatched, so the mode sees it by name."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    args = _dw_args()
    with Record():
        DW._dwconv3d_op(*args)
    assert any("fastseg3d.dwconv3d" in name for name in seen)


def test_compile_and_jit_trace_record_the_op():
    x, w, b, r, *rest = _dw_args()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm

    compiled = torch.compile(lambda *a: DW._dwconv3d_op(*a)[0], backend=backend, fullgraph=True)
    assert_close("y", compiled(x, w, b, r, *rest), DW._dwconv3d_op(x, w, b, r, *rest)[0], torch.float32)
    assert "fastseg3d.dwconv3d" in graphs[0]
    traced = torch.jit.trace(lambda *t: DW._dwconv3d_op(*t, *rest)[0], tuple(t.detach() for t in (x, w, b, r)))
    assert "fastseg3d::dwconv3d" in str(traced.graph)


def _compare_paths(case, monkeypatch, dtype=torch.float32, device="cpu"):
    """The kernels through the eager path and through ``torch.ops``: same values and gradients, bit for bit."""
    with fastseg3d.backend("triton"):
        if case == "dwconv3d":
            fwd = DW._dwconv3d_op
            shape = (1, 3, 3, 4, 5) if device == "cpu" else (2, 64, 16, 16, 16)
            args = _dw_args(shape, dtype, device)
            leaves = [a for a in args if isinstance(a, torch.Tensor)]
        elif case == "attention":
            fwd = ATT._attention_op
            args, leaves = _att_args(*((37, 11) if device == "cpu" else (4096, 512)), dtype, device)
        else:
            fwd, args, leaves = _loss_args(case, dtype, device, 1 if device == "cpu" else 8)
        eager = _values_and_grads(fwd, args, leaves)
        with monkeypatch.context() as patch:
            patch.setattr(utils, "_eager_grad", lambda args, lists=(): None)
            dispatched = _values_and_grads(fwd, args, leaves)
    assert not eager[0].isnan().any()
    assert torch.equal(eager[0], dispatched[0])
    for g, e in zip(eager[1], dispatched[1]):
        assert not g.isnan().any() and torch.equal(g, e)


@pytest.mark.interpret
@pytest.mark.parametrize("case", ["dwconv3d", "attention", *LOSSES])
def test_kernels_eager_matches_dispatcher(case, poison, monkeypatch):
    _compare_paths(case, monkeypatch)  # the kernel tests cover the dtypes


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ["dwconv3d", "attention", *LOSSES])
def test_gpu_kernels_eager_matches_dispatcher(case, dtype, poison, monkeypatch):
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)  # reductions in a fixed order, so the two paths can agree bitwise
    try:
        _compare_paths(case, monkeypatch, dtype, "cuda")
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def _aux_output_cases():
    x = torch.randn(2, 5, 8, requires_grad=True)
    v = torch.randn(2, 4, 3, 4, 5, requires_grad=True)
    w = torch.randn(4, 1, 3, 3, 3, requires_grad=True)
    return [
        ("layer_norm", (x, None, None, 1e-5, torch.float32), 1),
        ("add_layer_norm", (x, x * 2, None, None, 1e-5, torch.float32), 2),
        ("group_norm_act", (v, None, None, 2, 1e-5, "relu", 0.0, torch.float32, False, False), 1),
        ("dwconv3d", (v, w, None, None, [1, 1, 1], [1, 1, 1], "none"), 1),
    ]


@pytest.mark.parametrize("path", ["eager", "dispatcher"])
def test_auxiliary_outputs_carry_no_gradient(path):
    """Statistics and the conv's tap-major weight are outputs for backward's sake: marked non-differentiable, so
    that a gradient through them raises instead of silently coming out as zero."""
    for name, args, n_differentiable in _aux_output_cases():
        op = utils.EAGER_OPS[f"fastseg3d::{name}"]
        out = op(*args) if path == "eager" else getattr(torch.ops.fastseg3d, name)(*args)
        assert [o.requires_grad for o in out] == [True] * n_differentiable + [False] * (len(out) - n_differentiable)
