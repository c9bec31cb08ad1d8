"""torch.compile(fullgraph=True) of the ops' argument checks with symbolic floats: a float argument becomes a
SymFloat under dynamic=True, or once its value changes between calls (a temperature annealed, a scale set per
layer), and math.isfinite on one stops the graph; and the launchers' planning on symbolic sizes, as Inductor runs it
on a GPU once a shape varies."""

from __future__ import annotations

import pytest
import torch

from fastseg3d import ops
from fastseg3d.backends import interpreter_active

pytestmark = pytest.mark.skipif(interpreter_active(), reason="compile tests cannot run under TRITON_INTERPRET=1")


def _compiled(fn, dynamic):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend="eager", dynamic=dynamic)


_S, _T = torch.randn(1, 3, 2, 2, 2), torch.randn(1, 3, 4, 4, 4)
_Q, _K = torch.randn(1, 6, 1, 16), torch.randn(1, 3, 1, 16)
_X = torch.randn(1, 4, 3, 3, 3)
_CASES = {
    "kl_distill temperature": (lambda v: ops.kl_distill(_S, _T, v), (1.0, 1.5)),
    "kl_distill_multi weights": (lambda v: ops.kl_distill_multi([_S, _S], _T, 2.0, weights=[v, 1.0]), (0.5, 0.7)),
    "attention scale": (lambda v: ops.attention(_Q, _K, _K, scale=v), (0.25, 0.3)),
    "layer_norm eps": (lambda v: ops.layer_norm(_Q, eps=v), (1e-5, 1e-6)),
    "group_norm_act eps": (lambda v: ops.group_norm_act(_X, 2, eps=v), (1e-5, 1e-6)),
    "group_norm_act negative_slope": (lambda v: ops.group_norm_act(_X, 2, activation="leaky_relu",
                                                                   negative_slope=v), (0.01, 0.2)),
}


@pytest.mark.parametrize("name", sorted(_CASES))
@pytest.mark.parametrize("dynamic", [None, True])
def test_float_arguments_that_vary_compile_fullgraph(name, dynamic):
    call, values = _CASES[name]
    f = _compiled(call, dynamic)
    for v in values:
        torch.testing.assert_close(f(v), call(v))


def test_upsample_sum_of_the_largest_input_compiles_fullgraph():
    parts = [torch.randn(1, 2, 4, 4, 4), torch.randn(1, 2, 2, 2, 2)]
    f = _compiled(lambda a, b: ops.upsample_sum([a, b]), None)
    torch.testing.assert_close(f(*parts), ops.upsample_sum(parts))


def test_upsample_sum_of_one_input_at_the_output_size_is_a_new_tensor():
    x = torch.randn(1, 2, 4, 4, 4, requires_grad=True)
    y = ops.upsample_sum([x])
    assert y is not x and not y.is_leaf and y.data_ptr() != x.data_ptr()
    torch.testing.assert_close(y, x)


def _symbolic_cases(fake):
    return {
        "dwconv3d": lambda: ops.dwconv3d(fake(2, 8, 6, 7, 9), fake(8, 1, 3, 3, 3, dims=()), fake(8, dims=()),
                                         activation="gelu"),
        "dwconv3d channels-last": lambda: ops.dwconv3d(fake(2, 8, 6, 7, 9, channels_last=True),
                                                       fake(8, 1, 3, 3, 3, dims=())),
        "attention": lambda: ops.attention(*(fake(2, n, 2, 32, dims=(0, 1)) for n in (40, 10, 10))),
        "layer_norm": lambda: ops.layer_norm(fake(2, 40, 32, dims=(0, 1)), fake(32, dims=()), fake(32, dims=())),
        "group_norm_act": lambda: ops.group_norm_act(fake(2, 8, 6, 7, 9, dims=(0, 2, 3, 4)), 4, fake(8, dims=()),
                                                     fake(8, dims=()), activation="relu"),
        "kl_distill": lambda: ops.kl_distill(fake(2, 3, 4, 4, 4, dims=(0, 2, 3, 4)),
                                             fake(2, 3, 8, 8, 8, dims=(0, 2, 3, 4))),
        "channel_kl": lambda: ops.channel_kl(*(fake(2, 8, 4, 4, 4, dims=(0, 2, 3, 4)) for _ in range(2))),
        "selfreg_intra": lambda: ops.selfreg_intra(fake(2, 8, 4, 4, 4, dims=(0, 2, 3, 4))),
        "upsample_sum": lambda: ops.upsample_sum([fake(2, 4, 8, 8, 8, dims=(0,)), fake(2, 4, 4, 4, 4, dims=(0,))]),
    }


@pytest.mark.parametrize("name", sorted(_symbolic_cases(None)))
def test_the_launchers_plan_on_symbolic_shapes(name, monkeypatch):
    """What ``torch.compile`` of a fused op does on a GPU once a shape varies between calls (a sliding window's last
    batch, say): Inductor runs the op's body, launch planning included, on fake tensors whose sizes are symbols.
    Here on fake tensors with symbolic sizes, planned as for an H100, forward and backward, every launch recorded
    instead of run: the planning must accept symbols (it may specialise on them: a tile shape follows the sizes),
    and every compile-time constant it gives a kernel must come out a plain value (a symbolic one is a compile
    error)."""
    pytest.importorskip("triton")
    from unittest import mock

    from torch._library.triton import set_wrap_triton_enabled
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    import fastseg3d
    from fastseg3d.kernels import utils as kernel_utils
    from fastseg3d.ops import utils as op_utils

    monkeypatch.setattr(kernel_utils, "sm_count", lambda device: 132)
    monkeypatch.setattr(op_utils, "launchable", lambda device: True)
    monkeypatch.setattr(fastseg3d.backends, "interpreter_active", lambda: True)
    mode = FakeTensorMode(shape_env=ShapeEnv())

    def fake(*shape, dims=None, channels_last=False):
        t = torch.randn(shape)
        if channels_last:
            t = t.contiguous(memory_format=torch.channels_last_3d)
        sizes = [DimDynamic.DYNAMIC if dims is None or i in dims else DimDynamic.STATIC for i in range(t.dim())]
        return mode.from_tensor(t, symbolic_context=StatelessSymbolicContext(dynamic_sizes=sizes)).requires_grad_()

    symbolic = (torch.SymInt, torch.SymFloat, torch.SymBool)
    launches, constants = [], []

    def capture(kernel):
        class Launch:
            def __getitem__(self, grid):
                def run(*args, **kwargs):
                    launches.append(kernel)
                    constants.extend((k, v) for k, v in kwargs.items() if isinstance(v, symbolic))
                return run
        return Launch()

    call = _symbolic_cases(fake)[name]
    with (mode, fastseg3d.backend("triton"), set_wrap_triton_enabled(True),
          mock.patch.object(torch.library, "wrap_triton", capture)):
        out = call()
        assert launches  # the kernel path, not the reference
        out.float().sum().backward()  # the losses launch nothing more: their gradients come with the forward
    assert not constants, constants
