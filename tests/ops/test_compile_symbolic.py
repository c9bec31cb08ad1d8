"""torch.compile(fullgraph=True) of the ops' argument checks with symbolic floats: a float argument becomes a
SymFloat under dynamic=True, or once its value changes between calls (a temperature annealed, a scale set per
layer), and math.isfinite on one stops the graph."""

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
