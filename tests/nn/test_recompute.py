"""batch_norm_act_linear and act_instance_norm_conv against the plain compositions they replace."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastseg3d.nn.recompute import act_instance_norm_conv, batch_norm_act_linear
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


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu", "silu"])
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_bf16_autocast_matches_plain_composition(activation, layout):
    """Under bf16 autocast (SegFormer3D's training): backward recomputes z with BatchNorm's own kernel and applies
    the activation's own backward kernel, so on channels-last input (the Mix-FFN's token volumes) the gradients are
    those of autograd on the plain composition, bit for bit."""
    torch.manual_seed(0)
    bn = nn.BatchNorm3d(16)
    bn_ref = copy.deepcopy(bn)
    x = torch.randn(2, 16, 5, 6, 7).bfloat16()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    w = torch.randn(8, 16)
    w1, w2 = w.clone().requires_grad_(), w.clone().requires_grad_()
    act = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = batch_norm_act_linear(x1, bn, activation, w1, None)
        y_ref = F.linear(act[activation](bn_ref(x2)).flatten(2).transpose(1, 2), w2)
    g = torch.randn_like(y_ref)
    y.backward(g)
    y_ref.backward(g)
    assert torch.equal(y, y_ref)
    pairs = (("dx", x1.grad, x2.grad), ("dw", w1.grad, w2.grad), ("dbn.weight", bn.weight.grad, bn_ref.weight.grad),
             ("dbn.bias", bn.bias.grad, bn_ref.bias.grad))
    for name, a, e in pairs:
        assert a.dtype == e.dtype, name
        if layout == "channels_last":
            assert torch.equal(a, e), name
        else:  # BatchNorm's backward reduces in another order on NCDHW
            assert_close(name, a, e, torch.bfloat16)
    assert x1.grad.is_contiguous(memory_format=_FORMATS[layout])


_FORMATS = {"channels_last": torch.channels_last_3d, "contiguous": torch.contiguous_format}


def test_saves_only_the_input_and_statistics():
    bn = nn.BatchNorm3d(8)
    w = torch.randn(4, 8, requires_grad=True)
    x = torch.randn(2, 8, 4, 4, 4, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        batch_norm_act_linear(x, bn, "gelu", w, None)
    big = [t for t in saved if t.numel() >= x.numel()]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr()


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_one_value_per_channel_in_training_raises_as_batch_norm_does(device):
    # Without the check the unbiased variance of one value (0 / 0) went into running_var as NaN, silently; on meta
    # it divided by zero in Python.
    bn = nn.BatchNorm3d(4, device=device)
    w = torch.randn(3, 4, device=device, requires_grad=True)
    x = torch.randn(1, 4, 1, 1, 1, device=device, requires_grad=True)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        nn.BatchNorm3d(4, device=device)(x)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        batch_norm_act_linear(x, bn, "gelu", w, None)
    if device == "cpu":
        assert torch.equal(bn.running_var, torch.ones(4)) and torch.equal(bn.running_mean, torch.zeros(4))
    bn.eval()  # running statistics: one value per channel is fine
    assert batch_norm_act_linear(x, bn, "gelu", w, None).shape == (1, 1, 3)


def _fake_world(monkeypatch, world_size: int, calls: list):
    """torch.distributed "initialized" with ``world_size`` processes; SyncBatchNorm.forward records its calls and
    runs BatchNorm's math (the real one would all-reduce, which needs processes and a GPU)."""
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: world_size)

    def forward(self, x):
        calls.append(self)
        return nn.modules.batchnorm._BatchNorm.forward(self, x)

    monkeypatch.setattr(nn.SyncBatchNorm, "forward", forward)


def test_sync_batch_norm_that_syncs_runs_through_its_own_forward(monkeypatch):
    calls = []
    _fake_world(monkeypatch, 2, calls)
    bn = nn.SyncBatchNorm(6).double().train()
    bn_ref = nn.BatchNorm3d(6).double()
    w = torch.randn(5, 6, dtype=torch.float64)
    x = torch.randn(2, 6, 3, 4, 5, dtype=torch.float64)
    y = batch_norm_act_linear(x, bn, "relu", w, None)
    assert calls == [bn]
    assert_close("y", y, F.linear(F.relu(bn_ref(x)).flatten(2).transpose(1, 2), w), torch.float64)
    assert_close("running_var", bn.running_var, bn_ref.running_var, torch.float64)
    calls.clear()
    with torch.no_grad():  # no sync: SyncBatchNorm.forward does not sync when not training either
        batch_norm_act_linear(x, bn.eval(), "relu", w, None)
    assert calls == [bn]


def test_single_process_sync_batch_norm_keeps_the_fused_path():
    # Not initialized (one process): SyncBatchNorm.forward would run plain BatchNorm, so the fused path is equal.
    bn = nn.SyncBatchNorm(6).double().train()
    bn_ref = nn.BatchNorm3d(6).double()
    w = torch.randn(5, 6, dtype=torch.float64)
    x = torch.randn(2, 6, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = batch_norm_act_linear(x, bn, "gelu", w, None)
    assert [t.data_ptr() for t in saved if t.numel() >= x.numel()] == [x.data_ptr()]
    y_ref = F.linear(F.gelu(bn_ref(x2)).flatten(2).transpose(1, 2), w)
    assert_close("y", y, y_ref, torch.float64)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert_close("dx", x.grad, x2.grad, torch.float64)
    assert_close("running_var", bn.running_var, bn_ref.running_var, torch.float64)


@pytest.mark.parametrize("activation", ["gelu", "relu"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_act_instance_norm_conv_matches_plain_composition(activation, with_bias):
    torch.manual_seed(0)
    norm = nn.InstanceNorm3d(6)
    conv = nn.Conv3d(6, 4, 1, bias=with_bias).double()
    x = torch.randn(2, 6, 3, 4, 5, dtype=torch.float64) * 2 + 0.5
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    params = [[p.detach().clone().requires_grad_() for p in conv.parameters()] for _ in range(2)]
    act = F.gelu if activation == "gelu" else F.relu
    y = act_instance_norm_conv(x1, activation, norm, *params[0], *([] if with_bias else [None]))
    y_ref = F.conv3d(norm(act(x2)), *params[1])
    assert_close("y", y, y_ref, torch.float64)
    g = torch.randn_like(y_ref)
    y.backward(g)
    y_ref.backward(g)
    assert_close("dx", x1.grad, x2.grad, torch.float64)
    for name, a, e in zip(("dw", "db"), params[0], params[1]):
        assert_close(name, a.grad, e.grad, torch.float64)


def test_act_instance_norm_conv_bf16_autocast_matches_plain_composition():
    """Under bf16 autocast (MobileUtr's training) the conv runs in bf16 as the plain one does: the same output, and
    gradients in the plain composition's dtypes, within bf16 rounding (backward recomputes the normalised tensor
    with the norm's inference form, which may round it differently by an ulp)."""
    torch.manual_seed(0)
    norm = nn.InstanceNorm3d(16)
    x = torch.randn(2, 16, 5, 6, 7).bfloat16()
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    conv = nn.Conv3d(16, 8, 1)
    params = [[p.detach().clone().requires_grad_() for p in conv.parameters()] for _ in range(2)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = act_instance_norm_conv(x1, "gelu", norm, *params[0])
        y_ref = F.conv3d(norm(F.gelu(x2)), *params[1])
    assert y.dtype == y_ref.dtype == torch.bfloat16 and torch.equal(y, y_ref)
    g = torch.randn_like(y_ref)
    y.backward(g)
    y_ref.backward(g)
    for name, a, e in (("dx", x1.grad, x2.grad), ("dw", params[0][0].grad, params[1][0].grad),
                       ("db", params[0][1].grad, params[1][1].grad)):
        assert a.dtype == e.dtype, name
        assert_close(name, a, e, torch.bfloat16)


def test_act_instance_norm_conv_saves_only_the_input_and_statistics():
    norm, conv = nn.InstanceNorm3d(8), nn.Conv3d(8, 4, 1)
    x = torch.randn(2, 8, 4, 4, 4, requires_grad=True)

    def saved_big(fn):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            fn()
        return [t for t in saved if t.numel() >= x.numel()]

    big = saved_big(lambda: act_instance_norm_conv(x, "gelu", norm, conv.weight, conv.bias))
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr()
    assert len(saved_big(lambda: conv(norm(F.gelu(x))))) == 3  # the plain composition: three


def test_act_instance_norm_conv_runs_the_plain_composition_elsewhere():
    """An affine or tracking InstanceNorm, a conv that is not 1x1x1 and no-grad mode take the plain composition; a
    single voxel in training raises as nn.InstanceNorm3d does."""
    x = torch.randn(2, 8, 3, 4, 5, requires_grad=True)
    conv = nn.Conv3d(8, 4, 1)
    for norm, weight in ((nn.InstanceNorm3d(8, affine=True), conv.weight),
                         (nn.InstanceNorm3d(8, track_running_stats=True), conv.weight),
                         (nn.InstanceNorm3d(8), torch.randn(4, 8, 3, 3, 3))):
        y = act_instance_norm_conv(x, "gelu", norm, weight, conv.bias)
        assert y.grad_fn.name() == "ConvolutionBackward0"
        assert_close("y", y, F.conv3d(norm(F.gelu(x)), weight, conv.bias), torch.float32)
    with torch.no_grad():
        assert act_instance_norm_conv(x, "gelu", nn.InstanceNorm3d(8), conv.weight, conv.bias).grad_fn is None
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        act_instance_norm_conv(torch.randn(2, 8, 1, 1, 1), "gelu", nn.InstanceNorm3d(8), conv.weight, conv.bias)
