"""The fused losses' autograd formulas. They form their gradients in the forward pass, so backward only scales
them (and allocates nothing the size of an input), and they have no double backward: it raises rather than
returning second derivatives of 0. The ops run their reference math on CPU tensors (no launch), with the same
autograd formula as on the GPU."""

from __future__ import annotations

import pytest
import torch
import fastseg3d  # noqa: F401  (registers the ops)
from tests.utils import ZERO_FILLS, AtenOps


def _kl(x):
    return torch.ops.fastseg3d.kl_distill([x], torch.randn_like(x), 2.0, [4, 4, 4], [1.0], [True, False])[0]


def _channel_kl(x):
    return torch.ops.fastseg3d.channel_kl(x, torch.randn_like(x), "mean", True)[0]


def _intra(x):
    return torch.ops.fastseg3d.selfreg_intra(x, True)[0]


def _inter(x):
    idx = torch.arange(4)
    return torch.ops.fastseg3d.selfreg_inter([x], torch.randn_like(x), [idx], [idx], [True])[0].sum()


@pytest.mark.parametrize("loss", [_kl, _channel_kl, _intra, _inter], ids=lambda f: f.__name__.strip("_"))
def test_backward_fills_no_zeros(loss):
    """The op's outputs that get no gradient (its saved input gradients) reach backward as None: autograd would
    otherwise fill an input-sized tensor of zeros for each."""
    x = torch.randn(1, 4, 4, 4, 4, requires_grad=True)
    out = loss(x)
    with AtenOps() as log:
        out.backward()
    assert not ZERO_FILLS & set(log.ops), log.ops
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("loss", [_kl, _channel_kl, _intra, _inter], ids=lambda f: f.__name__.strip("_"))
def test_double_backward_raises(loss):
    x = torch.randn(1, 4, 4, 4, 4, requires_grad=True)
    (first,) = torch.autograd.grad(loss(x), x)  # the first derivative works
    assert torch.isfinite(first).all() and first.abs().sum() > 0
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(loss(x), x, create_graph=True)


@pytest.mark.parametrize("loss", [_kl, _channel_kl, _intra, _inter], ids=lambda f: f.__name__.strip("_"))
def test_retained_graph_gets_copies_after_the_first_backward(loss):
    """The first backward hands the saved gradient over as it is; later ones through a retained graph get copies,
    so two gradients asked of one graph are two tensors. A second ``backward`` accumulates into the ``.grad`` the
    first one became, a change to a saved tensor that autograd then refuses, loudly, at a third."""
    x = torch.randn(1, 4, 4, 4, 4, requires_grad=True)
    out = loss(x)
    (g1,) = torch.autograd.grad(out, x, retain_graph=True)
    (g2,) = torch.autograd.grad(out, x, retain_graph=True)
    assert torch.equal(g1, g2) and g1.data_ptr() != g2.data_ptr()
    g1.zero_()  # the tensor handed over, saved by the node: the next backward notices
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(out, x, retain_graph=True)

    out = loss(x)
    out.backward(retain_graph=True)
    first = x.grad.clone()
    out.backward(retain_graph=True)
    assert torch.equal(x.grad, 2 * first)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()
