"""batch_norm_act_linear against the plain BatchNorm -> activation -> Linear composition."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastseg3d.nn.recompute import batch_norm_act_linear
from tests.utils import assert_close


@pytest.mark.parametrize("activation", ["gelu", "relu"])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_matches_plain_composition(activation, momentum, layout):
    bn = nn.BatchNorm3d(6, momentum=momentum).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    bn_ref = copy.deepcopy(bn)
    lin = nn.Linear(6, 5).double()
    x = torch.randn(2, 6, 3, 4, 5, dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    w1, w2 = lin.weight.detach().clone().requires_grad_(), lin.weight.detach().clone().requires_grad_()
    b1, b2 = lin.bias.detach().clone().requires_grad_(), lin.bias.detach().clone().requires_grad_()
    for _ in range(2):  # twice: the running statistics and num_batches_tracked must evolve identically
        y = batch_norm_act_linear(x1, bn, activation, w1, b1)
        act = F.gelu if activation == "gelu" else F.relu
        y_ref = F.linear(act(bn_ref(x2)).flatten(2).transpose(1, 2), w2, b2)
    assert_close("y", y, y_ref, torch.float64)
    g = torch.randn_like(y_ref)
    y.backward(g)
    y_ref.backward(g)
    for name, a, e in (("dx", x1, x2), ("dw", w1, w2), ("db", b1, b2)):
        assert_close(name, a.grad, e.grad, torch.float64)
    for name in ("weight", "bias"):
        assert_close(f"dbn.{name}", getattr(bn, name).grad, getattr(bn_ref, name).grad, torch.float64)
    for name in ("running_mean", "running_var"):
        assert_close(name, getattr(bn, name), getattr(bn_ref, name), torch.float64)
    assert bn.num_batches_tracked.item() == bn_ref.num_batches_tracked.item() == 2


def test_saves_only_the_input_and_statistics():
    bn = nn.BatchNorm3d(8)
    w = torch.randn(4, 8, requires_grad=True)
    x = torch.randn(2, 8, 4, 4, 4, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        batch_norm_act_linear(x, bn, "gelu", w, None)
    big = [t for t in saved if t.numel() >= x.numel()]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr()
