"""batch_norm_act_linear, act_instance_norm_conv, act_instance_norm, norm_act_conv and norm_act against the plain
compositions they replace."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastseg3d
from fastseg3d.nn import recompute
from fastseg3d.nn.recompute import (
    act_instance_norm,
    act_instance_norm_conv,
    add_layer_norm,
    batch_norm_act_linear,
    norm_act,
    norm_act_conv,
)
from fastseg3d.profile import _autocast_on_meta, activation_memory, write_traffic
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


def test_fp32_input_under_autocast_matches_plain_composition(monkeypatch):
    """SegFormer3D's decoder: an fp32 input (the upsampled sum) under bf16 autocast, BatchNorm and ReLU in fp32 and
    the linear in bf16. The ReLU writes the linear's bf16 input directly and backward runs the linear's gradients
    in bf16, as autograd on the plain composition does: the same output, gradients in its dtypes."""
    torch.manual_seed(0)
    bn = nn.BatchNorm3d(16)
    bn_ref = copy.deepcopy(bn)
    x = torch.randn(2, 16, 5, 6, 7).contiguous(memory_format=torch.channels_last_3d)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    w = torch.randn(8, 16)
    w1, w2 = w.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = batch_norm_act_linear(x1, bn, "relu", w1, None)
        y_ref = F.linear(F.relu(bn_ref(x2)).flatten(2).transpose(1, 2), w2)
    assert y.dtype == torch.bfloat16 and torch.equal(y, y_ref)
    g = torch.randn_like(y_ref)
    y.backward(g)
    y_ref.backward(g)
    for name, a, e in (("dx", x1.grad, x2.grad), ("dw", w1.grad, w2.grad), ("dbn.weight", bn.weight.grad,
                                                                             bn_ref.weight.grad)):
        assert a.dtype == e.dtype, name
        assert_close(name, a, e, torch.bfloat16)
    # counted under (emulated) CUDA autocast, where the fused norm kernels run: BatchNorm and ReLU write the
    # linear's bf16 input once, forward and in backward's recomputation, and backward the fp32 input gradient once
    n = x.numel()
    traffic = write_traffic(_DecoderHead(), (2, 16, 5, 6, 7), torch.bfloat16)
    forward, backward = traffic["forward"]["by_op"], traffic["backward"]["by_op"]
    assert forward["fastseg3d::group_norm_act"] == (1, 2 * n + 2 * 4 * 16)  # and the (1, C) fp32 statistics
    assert backward["fastseg3d::group_norm_act_apply (_BatchNormActLinearBackward)"] == (1, 2 * n)
    assert backward["fastseg3d::group_norm_act_backward (_BatchNormActLinearBackward)"] == (1, 4 * n + 2 * 4 * 16)
    assert not any(name.split()[0] in ("aten::native_batch_norm", "aten::maximum", "aten::relu",
                                       "aten::threshold_backward", "aten::native_batch_norm_backward")
                   for name in (*forward, *backward))
    # without them (no Triton): no fp32 activation, forward or in backward's recomputation
    monkeypatch.setattr(recompute, "group_norm_act_unsupported_reasons", lambda *args: ["triton is not installed"])
    traffic = write_traffic(_DecoderHead(), (2, 16, 5, 6, 7), torch.bfloat16)
    forward, backward = traffic["forward"]["by_op"], traffic["backward"]["by_op"]
    assert "aten::relu" not in forward and forward["aten::maximum"] == (1, 2 * n)
    assert backward["aten::maximum (_BatchNormActLinearBackward)"] == (1, 2 * n)
    assert not any(name.startswith("aten::relu") for name in backward)


class _DecoderHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn, self.w = nn.BatchNorm3d(16), nn.Parameter(torch.randn(8, 16))

    def forward(self, x):
        return batch_norm_act_linear(x, self.bn, "relu", self.w, None)


@pytest.mark.parametrize("compiler", ["graph", "aot_eager"])
def test_fused_batch_norm_chains_compile_fullgraph(compiler, monkeypatch):
    """The fused BatchNorm paths (forced on CPU, where the op runs its reference body) trace whole under
    ``torch.compile(fullgraph=True)`` (also through AOTAutograd, which functionalises the running statistics'
    updates) and match the plain composition: output, gradients, running statistics and batch counts over two
    steps, one norm with a cumulative average (``momentum=None``)."""
    monkeypatch.setattr(recompute, "group_norm_act_unsupported_reasons", lambda *args: [])
    monkeypatch.setattr(recompute.backends, "select", lambda *args, **kwargs: True)
    w = torch.randn(5, 6, requires_grad=True)
    norms = nn.BatchNorm3d(6), nn.BatchNorm3d(5, momentum=None)
    _randomise(*norms)
    refs = copy.deepcopy(norms)

    def step(x, bn1, bn2):
        tokens = batch_norm_act_linear(x, bn1, "gelu", w, None)
        return norm_act(tokens.unflatten(1, x.shape[2:]).permute(0, 4, 1, 2, 3), bn2, "relu")

    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm.print_readable(print_output=False))
        return gm.forward

    compiled = torch.compile(step, fullgraph=True, backend=record if compiler == "graph" else "aot_eager")
    for _ in range(2):
        x1, x2 = _input_pair(6, "channels_last")
        y = compiled(x1, *norms)
        with fastseg3d.backend("torch"):
            y_ref = step(x2, *refs)
        assert_close("y", y, y_ref, torch.float32)
        y.square().sum().backward()
        y_ref.square().sum().backward()
        assert_close("dx", x1.grad, x2.grad, torch.float32, 2.0)
    if compiler == "graph":
        assert "".join(graphs).count("fastseg3d.group_norm_act.default") == 2
    for a, e in zip(norms, refs):
        for name in ("running_mean", "running_var"):
            assert_close(name, getattr(a, name), getattr(e, name), torch.float32)
        assert a.num_batches_tracked.item() == e.num_batches_tracked.item() == 2


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


def test_bad_activation_and_mismatched_norm_raise(monkeypatch):
    """An activation the plain composition does not know, and an input whose channels are not the BatchNorm's
    (which the fused kernels would read past its parameters), raise whichever path would run."""
    bn = nn.BatchNorm3d(4)
    w = torch.randn(3, 4, requires_grad=True)
    with pytest.raises(ValueError, match="activation must be one of"):
        batch_norm_act_linear(torch.randn(2, 4, 2, 2, 2), bn, "leaky_relu", w, None)
    monkeypatch.setattr(recompute, "group_norm_act_unsupported_reasons", lambda *args: [])
    monkeypatch.setattr(recompute.backends, "select", lambda *args, **kwargs: True)
    calls = _count_fused(monkeypatch)
    with pytest.raises(RuntimeError, match="running_mean should contain 6 elements not 4"):
        batch_norm_act_linear(torch.randn(2, 6, 2, 2, 2, requires_grad=True), bn, "gelu", torch.randn(3, 6), None)
    with pytest.raises(ValueError, match="expected 5D input"):
        batch_norm_act_linear(torch.randn(2, 4, 2, 2, requires_grad=True), bn, "gelu", w, None)
    assert calls == []


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


@pytest.mark.parametrize("affine", [False, True])
def test_act_instance_norm_is_the_plain_composition_off_the_fused_kernels(affine):
    """On CPU (no fused kernel) and under the torch backend: the plain GELU -> InstanceNorm, gradients included."""
    norm = nn.InstanceNorm3d(6, affine=affine)
    _randomise(norm)
    x = torch.randn(2, 6, 3, 4, 5, requires_grad=True)
    for backend in ("auto", "torch"):
        with fastseg3d.backend(backend):
            y = act_instance_norm(x, "gelu", norm)
        assert y.grad_fn.name() == "ViewBackward0"  # nn.InstanceNorm3d's view of its batch-norm output
        assert torch.equal(y, norm(F.gelu(x)))


_NORMS = {
    "group": lambda: nn.GroupNorm(2, 6),
    "group_plain": lambda: nn.GroupNorm(3, 6, affine=False),
    "instance": lambda: nn.InstanceNorm3d(6, affine=True),
    "batch": lambda: nn.BatchNorm3d(6, momentum=None),
    "batch_momentum": lambda: nn.BatchNorm3d(6, momentum=0.3),
}
_ACTS = {"relu": F.relu, "leaky_relu": lambda t: F.leaky_relu(t, 0.01), None: lambda t: t}


def _randomise(*modules):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in (p for m in modules for p in m.parameters()):
            p.uniform_(-0.5, 1.5)


def _plain(x, norm, activation, conv):
    return conv(activation(norm(x)) if callable(activation) else _ACTS[activation](norm(x)))


# the three recomputed norms on 16 channels
_NORMS16 = {"group": lambda: nn.GroupNorm(4, 16), "instance": lambda: nn.InstanceNorm3d(16, affine=True),
            "batch": lambda: nn.BatchNorm3d(16)}


def _assert_bf16_grads_match(x1, x2, modules, modules_ref):
    """The input's and every parameter's gradient: the same dtype, equal within bf16 rounding."""
    params = [p for m in modules for p in m.parameters()]
    params_ref = [p for m in modules_ref for p in m.parameters()]
    for name, a, e in [("dx", x1.grad, x2.grad)] + [(f"d{i}", p.grad, q.grad)
                                                    for i, (p, q) in enumerate(zip(params, params_ref))]:
        assert a.dtype == e.dtype, name
        assert_close(name, a, e, torch.bfloat16)


@pytest.mark.parametrize("norm", list(_NORMS))
@pytest.mark.parametrize("activation", ["relu", "leaky_relu", None, "gelu_module", "leaky_module", "identity", "silu",
                                        "leaky_zero"])
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
@pytest.mark.parametrize("conv", ["3x3x3", "strided_dilated_grouped"])
def test_norm_act_conv_matches_plain_composition(norm, activation, layout, conv):
    # nn.Identity, nn.SiLU and a LeakyReLU with slope 0 are activation modules the recompute knows as well
    norm = _NORMS[norm]().double()
    activation = {"gelu_module": nn.GELU(approximate="tanh"), "leaky_module": nn.LeakyReLU(0.2),
                  "identity": nn.Identity(), "silu": nn.SiLU(), "leaky_zero": nn.LeakyReLU(0.0)}.get(activation,
                                                                                                       activation)
    conv = (nn.Conv3d(6, 4, 3, padding=1) if conv == "3x3x3"
            else nn.Conv3d(6, 4, (3, 1, 3), stride=(2, 1, 1), padding=(2, 0, 1), dilation=(2, 1, 1), groups=2,
                           bias=False)).double()
    _randomise(norm, conv)
    norm_ref, conv_ref = copy.deepcopy(norm), copy.deepcopy(conv)
    x = torch.randn(2, 6, 5, 4, 7, dtype=torch.float64) * 2 + 0.5
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    for _ in range(2):  # twice: BatchNorm's running statistics and num_batches_tracked must evolve identically
        y = norm_act_conv(x1, norm, activation, conv)
        y_ref = _plain(x2, norm_ref, activation, conv_ref)
    assert y.grad_fn.name() == "_NormActConvBackward"
    assert_close("y", y, y_ref, torch.float64)
    g = torch.randn_like(y_ref)
    y.backward(g)
    y_ref.backward(g)
    assert_close("dx", x1.grad, x2.grad, torch.float64)
    for module, module_ref in ((norm, norm_ref), (conv, conv_ref)):
        for (name, p), p_ref in zip(module.named_parameters(), module_ref.parameters()):
            assert_close(f"d{type(module).__name__}.{name}", p.grad, p_ref.grad, torch.float64)
        for (name, b), b_ref in zip(module.named_buffers(), module_ref.buffers()):
            assert torch.allclose(b, b_ref, rtol=1e-12, atol=0), name


@pytest.mark.parametrize("norm", ["group", "instance", "batch"])
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_norm_act_conv_bf16_autocast_matches_plain_composition(norm, layout):
    """Under CPU bf16 autocast (which leaves the norms in the input's dtype): the same output, and gradients in the
    plain composition's dtypes."""
    norm = _NORMS[norm]()
    conv = nn.Conv3d(6, 8, 3, padding=1)
    _randomise(norm, conv)
    norm_ref, conv_ref = copy.deepcopy(norm), copy.deepcopy(conv)
    x = torch.randn(2, 6, 5, 6, 7).bfloat16()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm_act_conv(x1, norm, nn.LeakyReLU(0.01), conv)
        y_ref = conv_ref(F.leaky_relu(norm_ref(x2), 0.01))
    assert y.grad_fn.name() == "_NormActConvBackward"
    assert y.dtype == y_ref.dtype == torch.bfloat16 and torch.equal(y, y_ref)
    g = torch.randn_like(y_ref)
    y.backward(g)
    y_ref.backward(g)
    _assert_bf16_grads_match(x1, x2, (norm, conv), (norm_ref, conv_ref))


def test_norm_act_conv_group_norm_in_fp32_as_cuda_autocast_runs_it(monkeypatch):
    """CUDA autocast runs GroupNorm in fp32 on an fp32 copy of its bf16 input: the recompute does the same (the
    policy is patched in on the CPU), bit for bit, saving the bf16 input instead of the copy."""
    monkeypatch.setattr(recompute, "_group_norm_dtype", lambda x: torch.float32)
    norm, conv = nn.GroupNorm(4, 16), nn.Conv3d(16, 8, 3, padding=1)
    _randomise(norm, conv)
    norm_ref, conv_ref = copy.deepcopy(norm), copy.deepcopy(conv)
    x = torch.randn(2, 16, 5, 6, 7).bfloat16()
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    saved = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = norm_act_conv(x1, norm, "relu", conv)
        y_ref = conv_ref(F.relu(norm_ref(x2.float())))
    assert [t.dtype for t in saved if t.numel() >= x.numel()] == [torch.bfloat16]
    assert y.dtype == torch.bfloat16 and torch.equal(y, y_ref)
    g = torch.randn_like(y_ref)
    y.backward(g)
    y_ref.backward(g)
    assert x1.grad.dtype == torch.bfloat16 and torch.equal(x1.grad, x2.grad)
    for p, q in zip([*norm.parameters(), *conv.parameters()], [*norm_ref.parameters(), *conv_ref.parameters()]):
        assert p.grad.dtype == q.grad.dtype and torch.equal(p.grad, q.grad)


def test_group_norm_dtype_follows_the_autocast_policies():
    x = torch.randn(1, 4, 2, 2, 2).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # CPU autocast leaves GroupNorm alone
        assert recompute._group_norm_dtype(x) == torch.bfloat16
        assert F.group_norm(x, 2).dtype == torch.bfloat16
    assert recompute._group_norm_dtype(x.to("meta")) == torch.bfloat16
    with _autocast_on_meta(torch.bfloat16):  # fastseg3d.profile's CUDA autocast emulation
        assert recompute._group_norm_dtype(x.to("meta")) == torch.float32
        assert recompute._group_norm_dtype(x.float().to("meta")) == torch.float32
        with torch.autocast("cuda", enabled=False):  # a model's own fp32 region
            assert recompute._group_norm_dtype(x.to("meta")) == torch.bfloat16


class _Chain(nn.Module):
    def __init__(self, norm: nn.Module, fused: bool) -> None:
        super().__init__()
        self.norm, self.conv, self.fused = norm, nn.Conv3d(16, 16, 3, padding=1), fused

    def forward(self, x):
        if self.fused:
            return norm_act_conv(x, self.norm, "relu", self.conv)
        return self.conv(F.relu(self.norm(x)))


@pytest.mark.parametrize("norm", ["group", "instance", "batch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_act_conv_saves_only_the_norm_input(norm, dtype):
    """Counted on the meta device under (emulated) CUDA autocast: the recompute saves the norm's input (in the dtype
    it arrives in) and per-group statistics; the plain composition also saves the activation (in fp32 after
    GroupNorm under autocast, which also saves an fp32 copy of its input)."""
    make = _NORMS16[norm]
    shape = (2, 16, 8, 8, 8)
    elems, size = math.prod(shape), torch.tensor([], dtype=dtype).element_size()
    stem = nn.Conv3d(16, 16, 1)  # so the chain's input is a tensor in the autocast dtype, as in a network
    fused = activation_memory(nn.Sequential(stem, _Chain(make(), True)), shape, dtype)
    plain = activation_memory(nn.Sequential(stem, _Chain(make(), False)), shape, dtype)
    stats = 2 * 2 * 16 * 4  # mean and rstd per instance (the most of the three norms), fp32 here
    assert elems * size * 2 <= fused["total"] <= elems * size * 2 + stats + 1024  # the stem's input and output
    # plain: the norm's input (an fp32 copy for GroupNorm under autocast, 4 bytes where the recompute saves 2), the
    # activation's output (fp32 there too) and the conv's input (the same tensor, or its bf16 cast under autocast)
    extra = (4 - 2) + 4 + 2 if norm == "group" and dtype == torch.bfloat16 else size
    weight = 16 * 16 * 27 * size if dtype == torch.bfloat16 else 0  # and the bf16 cast of the conv's weight
    low = fused["total"] + elems * extra + weight
    assert low - stats <= plain["total"] <= low + 2 * stats + 1024
    # the count's own (attribution) hooks on the norm and the conv leave the recompute on
    direct = activation_memory(_Chain(make(), True), shape, dtype)
    assert set(direct) == {"total", "(top)"} and direct["total"] <= elems * 4 + stats + 1024


def test_norm_act_conv_relu_writes_the_conv_input_in_its_dtype(monkeypatch):
    """Where the fused GroupNorm cannot run (no Triton), under (emulated) CUDA autocast GroupNorm runs in fp32: the
    ReLU writes the conv's bf16 input in its one pass (the plain chain writes an fp32 activation, then the conv's
    cast), forward and in backward's recomputation, and backward reads the conv's bf16 input gradient as it is (no
    fp32 copy)."""
    monkeypatch.setattr(recompute, "group_norm_act_unsupported_reasons", lambda *args: ["triton is not installed"])
    shape = (2, 16, 8, 8, 8)
    elems = math.prod(shape)
    stem = nn.Conv3d(16, 16, 1)
    fused = write_traffic(nn.Sequential(stem, _Chain(nn.GroupNorm(4, 16), True)), shape, torch.bfloat16)
    plain = write_traffic(nn.Sequential(stem, _Chain(nn.GroupNorm(4, 16), False)), shape, torch.bfloat16)
    assert "aten::relu" not in fused["forward"]["by_op"] and fused["forward"]["by_op"]["aten::maximum"][1] == 2 * elems
    assert 4 * elems - 64 <= plain["forward"]["bytes"] - fused["forward"]["bytes"] <= 4 * elems
    # backward recomputes the fp32 copy of the input, the fp32 norm output and the bf16 activation (10 bytes an
    # element), and spares the plain chain's fp32 copy of the activation's gradient (4)
    assert fused["backward"]["bytes"] - plain["backward"]["bytes"] <= 7 * elems


def test_norm_act_conv_fused_group_norm_writes_the_conv_input_once():
    """Where the fused kernels run (here: counted on the meta device under emulated CUDA autocast), GroupNorm and
    the ReLU are one op that reads the bf16 input and writes the conv's bf16 input and the statistics: 12 bytes an
    element fewer than the plain chain's fp32 copy, fp32 norm output and fp32 activation and cast. Backward's
    recompute writes the bf16 conv input again and the norm's backward the bf16 input gradient, with no fp32
    copies of the input, of the norm's output or of their gradients."""
    shape = (2, 16, 8, 8, 8)
    elems, stats = math.prod(shape), 2 * 2 * 4 * 4  # fp32 mean and rstd per (batch, group)
    stem = nn.Conv3d(16, 16, 1)
    fused = write_traffic(nn.Sequential(stem, _Chain(nn.GroupNorm(4, 16), True)), shape, torch.bfloat16)
    plain = write_traffic(nn.Sequential(stem, _Chain(nn.GroupNorm(4, 16), False)), shape, torch.bfloat16)
    assert fused["forward"]["by_op"]["fastseg3d::group_norm_act"] == (1, 2 * elems + stats)
    assert not any("group_norm" in op for op in fused["forward"]["by_op"] if op.startswith("aten::"))
    assert plain["forward"]["bytes"] - fused["forward"]["bytes"] == 12 * elems
    backward = fused["backward"]["by_op"]
    assert backward["fastseg3d::group_norm_act_apply (_NormActConvBackward)"] == (1, 2 * elems)
    assert backward["fastseg3d::group_norm_act_backward (_NormActConvBackward)"][1] == 2 * elems + 2 * 16 * 4
    assert plain["backward"]["bytes"] - fused["backward"]["bytes"] >= 9 * elems


def test_norm_act_conv_runs_the_plain_composition_elsewhere():
    """No-grad mode, the torch backend, a BatchNorm on running statistics, a tracking InstanceNorm, other padding
    modes, string padding, an unknown activation module and 2-D tensors run the plain composition."""
    x = torch.randn(2, 6, 3, 4, 5, requires_grad=True)
    conv = nn.Conv3d(6, 4, 3, padding=1)
    cases = [
        (nn.BatchNorm3d(6).eval(), "relu", conv),
        (nn.InstanceNorm3d(6, track_running_stats=True), "relu", conv),
        (nn.LayerNorm([6, 3, 4, 5]), "relu", conv),
        (nn.GroupNorm(2, 6), "relu", nn.Conv3d(6, 4, 3, padding=1, padding_mode="reflect")),
        (nn.GroupNorm(2, 6), "relu", nn.Conv3d(6, 4, 3, padding="same")),
        (nn.GroupNorm(2, 6), nn.PReLU(), conv),
    ]
    for norm, activation, c in cases:
        y = norm_act_conv(x, norm, activation, c)
        assert y.grad_fn.name() == "ConvolutionBackward0", (norm, activation, c)
        assert_close("y", y, _plain(x, norm, activation, c), torch.float32)
    norm = nn.GroupNorm(2, 6)
    with fastseg3d.backend("torch"):
        assert norm_act_conv(x, norm, "relu", conv).grad_fn.name() == "ConvolutionBackward0"
    with torch.no_grad():
        assert norm_act_conv(x, norm, "relu", conv).grad_fn is None
    x2 = torch.randn(2, 6, 4, 5, requires_grad=True)
    conv2 = nn.Conv2d(6, 4, 3, padding=1)
    assert_close("y2d", norm_act_conv(x2, norm, "relu", conv2), conv2(F.relu(norm(x2))), torch.float32)


@pytest.mark.parametrize("norm", ["group", "group_plain", "instance", "batch"])
@pytest.mark.parametrize("view", ["channel_slice", "strided_depth", "channels_last_slice"])
@pytest.mark.parametrize("grads", ["all", "no_input", "frozen_norm", "input_only"])
def test_norm_act_conv_views_and_frozen_parts(norm, view, grads):
    """Inputs that are views (a channel chunk, every other depth slice, a chunk of a channels-last tensor) and
    every combination of what needs a gradient: the plain composition's results."""
    norm = _NORMS[norm]().double()
    conv = nn.Conv3d(6, 4, 3, padding=1).double()
    _randomise(norm, conv)
    if grads in ("frozen_norm", "input_only"):
        norm.requires_grad_(False)
    if grads == "input_only":
        conv.requires_grad_(False)
    norm_ref, conv_ref = copy.deepcopy(norm), copy.deepcopy(conv)
    big = torch.randn(2, 9, 10, 4, 5, dtype=torch.float64)
    if view == "channels_last_slice":
        big = big.contiguous(memory_format=torch.channels_last_3d)
    make = {"channel_slice": lambda t: t[:, :6, :5], "strided_depth": lambda t: t[:, 3:, ::2],
            "channels_last_slice": lambda t: t[:, 2:8, 1:6]}[view]
    # the reference's input always needs its gradient: GroupNorm's CPU backward crashes on a channels-last input
    # that does not (a torch bug the recompute steers around)
    b1, b2 = big.clone().requires_grad_(grads != "no_input"), big.clone().requires_grad_()
    y = norm_act_conv(make(b1), norm, "relu", conv)
    y_ref = _plain(make(b2), norm_ref, "relu", conv_ref)
    assert y.grad_fn.name() == "_NormActConvBackward"
    assert_close("y", y, y_ref, torch.float64)
    g = torch.randn_like(y_ref)
    y.backward(g)
    y_ref.backward(g)
    if grads != "no_input":
        assert_close("dx", b1.grad, b2.grad, torch.float64)
    for module, module_ref in ((norm, norm_ref), (conv, conv_ref)):
        for (name, p), p_ref in zip(module.named_parameters(), module_ref.parameters()):
            assert (p.grad is None) == (p_ref.grad is None) == (not p.requires_grad), name
            if p.grad is not None:
                assert_close(name, p.grad, p_ref.grad, torch.float64)


@pytest.mark.parametrize("norm", ["group", "instance", "batch"])
@pytest.mark.parametrize("frozen", ["weight", "bias"])
@pytest.mark.parametrize("chain", ["norm_act_conv", "norm_act"])
def test_one_norm_parameter_frozen(norm, frozen, chain):
    """A norm whose weight (or bias) alone is frozen: it gets no gradient, the other one the plain composition's
    (the recomputes' backward keeps the two apart)."""
    norm = _NORMS[norm]().double()
    conv = nn.Conv3d(6, 4, 3, padding=1).double()
    _randomise(norm, conv)
    getattr(norm, frozen).requires_grad_(False)
    norm_ref, conv_ref = copy.deepcopy(norm), copy.deepcopy(conv)
    x1 = torch.randn(2, 6, 4, 5, 3, dtype=torch.float64, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    if chain == "norm_act_conv":
        y, y_ref = norm_act_conv(x1, norm, "relu", conv), conv_ref(F.relu(norm_ref(x2)))
    else:
        y, y_ref = norm_act(x1, norm, nn.LeakyReLU(0.1)), F.leaky_relu(norm_ref(x2), 0.1)
    assert y.grad_fn.name() in ("_NormActConvBackward", "_NormLeakyReLUBackward")
    g = torch.randn_like(y_ref)
    y.backward(g)
    y_ref.backward(g)
    assert_close("dx", x1.grad, x2.grad, torch.float64)
    for name in ("weight", "bias"):
        p, p_ref = getattr(norm, name), getattr(norm_ref, name)
        assert (p.grad is None) == (p_ref.grad is None) == (name == frozen), name
        if p_ref.grad is not None:
            assert_close(f"d{name}", p.grad, p_ref.grad, torch.float64)


@pytest.mark.parametrize("norm", ["group", "instance", "batch"])
def test_fp64_under_cpu_autocast_stays_fp64(norm):
    """Autocast casts no fp64 tensor: an fp64 model under CPU bf16 autocast gets the plain composition's fp64
    results (the recompute does not cast the conv's input to the autocast dtype)."""
    norm = _NORMS[norm]().double()
    conv = nn.Conv3d(6, 4, 1).double()
    _randomise(norm, conv)
    norm_ref, conv_ref = copy.deepcopy(norm), copy.deepcopy(conv)
    x1 = torch.randn(2, 6, 4, 5, 3, dtype=torch.float64, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm_act_conv(x1, norm, "relu", conv)
        y_ref = conv_ref(F.relu(norm_ref(x2)))
    assert y.dtype == y_ref.dtype == torch.float64
    assert_close("y", y, y_ref, torch.float64)

def test_norm_act_conv_bf16_model_under_fp32_group_norm(monkeypatch):
    """A model cast to bf16 as a whole, under an autocast that runs GroupNorm in fp32 (CUDA's, patched in): the
    parameters are cast too, as autocast casts every input, and their gradients come back in bf16."""
    monkeypatch.setattr(recompute, "_group_norm_dtype", lambda x: torch.float32)
    norm, conv = nn.GroupNorm(4, 16), nn.Conv3d(16, 8, 3, padding=1)
    _randomise(norm, conv)
    norm, conv = norm.bfloat16(), conv.bfloat16()
    norm_ref, conv_ref = copy.deepcopy(norm), copy.deepcopy(conv)
    x = torch.randn(2, 16, 5, 6, 7).bfloat16()
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm_act_conv(x1, norm, "relu", conv)
        y_ref = conv_ref(F.relu(F.group_norm(x2.float(), 4, norm_ref.weight.float(), norm_ref.bias.float())))
    assert torch.equal(y, y_ref)
    g = torch.randn_like(y_ref)
    y.backward(g)
    y_ref.backward(g)
    assert torch.equal(x1.grad, x2.grad)
    for p, q in zip([*norm.parameters(), *conv.parameters()], [*norm_ref.parameters(), *conv_ref.parameters()]):
        assert p.grad.dtype == q.grad.dtype == torch.bfloat16 and torch.equal(p.grad, q.grad)


@pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")
def test_norm_act_conv_runs_hooked_modules_plainly():
    """A hook on the norm, the activation or the conv (weight norm's pre-hook recomputes the weight) runs: the
    plain composition, not a recompute that reads the parameters directly."""
    x = torch.randn(2, 6, 3, 4, 5, requires_grad=True)
    conv = nn.utils.weight_norm(nn.Conv3d(6, 4, 3, padding=1))
    with torch.no_grad():
        conv.weight_g.mul_(2.0)
    norm = nn.GroupNorm(2, 6)
    y = norm_act_conv(x, norm, "relu", conv)
    assert y.grad_fn.name() == "ConvolutionBackward0"
    assert_close("y", y, conv(F.relu(norm(x))), torch.float32)
    calls = []
    act = nn.ReLU()
    handle = act.register_forward_hook(lambda m, a, o: calls.append(m))
    norm_act_conv(x, norm, act, nn.Conv3d(6, 4, 1))
    assert calls == [act]
    handle.remove()
    handle = nn.modules.module.register_module_forward_hook(lambda m, a, o: calls.append(m))
    try:
        assert norm_act_conv(x, norm, "relu", nn.Conv3d(6, 4, 1)).grad_fn.name() == "ConvolutionBackward0"
    finally:
        handle.remove()
    assert norm_act_conv(x, norm, "relu", nn.Conv3d(6, 4, 1)).grad_fn.name() == "_NormActConvBackward"


def test_older_recomputes_run_hooked_norms_plainly():
    x = torch.randn(2, 6, 3, 4, 5, requires_grad=True)
    calls = []
    bn, norm = nn.BatchNorm3d(6), nn.InstanceNorm3d(6)
    for module in (bn, norm):
        module.register_forward_hook(lambda m, a, o: calls.append(m))
    y = batch_norm_act_linear(x, bn, "gelu", torch.randn(4, 6), None)
    z = act_instance_norm_conv(x, "gelu", norm, torch.randn(4, 6, 1, 1, 1), None)
    assert calls == [bn, norm]
    assert "BatchNormActLinear" not in y.grad_fn.name() and z.grad_fn.name() == "ConvolutionBackward0"


def test_norm_act_conv_single_values_raise_as_the_norms_do():
    conv = nn.Conv3d(4, 2, 1)
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        norm_act_conv(torch.randn(2, 4, 1, 1, 1, requires_grad=True), nn.InstanceNorm3d(4), "relu", conv)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        norm_act_conv(torch.randn(1, 4, 1, 1, 1, requires_grad=True), nn.GroupNorm(4, 4), "relu", conv)


def test_empty_batches_run_as_the_plain_compositions():
    """A zero-size batch gives what the plain layers give (an empty output, empty gradients, a BatchNorm's step
    counted), where native_batch_norm refuses an empty input."""
    conv = nn.Conv3d(4, 3, 3, padding=1)
    w = torch.randn(3, 4)
    cases = [
        (lambda x, n: norm_act_conv(x, n, "relu", conv), lambda x, n: conv(F.relu(n(x))), nn.BatchNorm3d(4)),
        (lambda x, n: norm_act_conv(x, n, "relu", conv), lambda x, n: conv(F.relu(n(x))), nn.InstanceNorm3d(4)),
        (lambda x, n: norm_act(x, n, "leaky_relu"), lambda x, n: F.leaky_relu(n(x), 0.01), nn.BatchNorm3d(4)),
        (lambda x, n: batch_norm_act_linear(x, n, "gelu", w, None),
         lambda x, n: F.linear(F.gelu(n(x)).flatten(2).transpose(1, 2), w), nn.BatchNorm3d(4)),
        (lambda x, n: act_instance_norm_conv(x, "gelu", n, conv.weight[:, :, 1:2, 1:2, 1:2], None),
         lambda x, n: F.conv3d(n(F.gelu(x)), conv.weight[:, :, 1:2, 1:2, 1:2]), nn.InstanceNorm3d(4)),
    ]
    for ours, plain, norm in cases:
        x = torch.randn(0, 4, 3, 3, 3, requires_grad=True)
        mine, theirs = copy.deepcopy(norm), copy.deepcopy(norm)
        y, expected = ours(x, mine), plain(x, theirs)
        assert y.shape == expected.shape and y.numel() == 0
        (dx,) = torch.autograd.grad(y.sum(), x)
        assert dx.shape == x.shape
        assert mine.state_dict().keys() == theirs.state_dict().keys()
        for key, value in theirs.state_dict().items():
            assert torch.equal(mine.state_dict()[key], value), key


def test_norm_act_conv_double_backward_raises():
    """backward recomputes the normalised tensor with the statistics as constants, so it is not differentiable
    again: a second derivative raises rather than being silently wrong."""
    x = torch.randn(2, 6, 3, 4, 5, requires_grad=True)
    y = norm_act_conv(x, nn.InstanceNorm3d(6, affine=True), "gelu", nn.Conv3d(6, 4, 3, padding=1))
    (dx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        dx.sum().backward()


def test_norm_act_conv_bad_arguments():
    x = torch.randn(2, 6, 3, 4, 5, requires_grad=True)
    with pytest.raises(ValueError, match="activation must be one of"):
        norm_act_conv(x, nn.GroupNorm(2, 6), "tanh", nn.Conv3d(6, 4, 1))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        norm_act_conv(torch.randn(1, 6, 1, 1, 1), nn.BatchNorm3d(6), "relu", nn.Conv3d(6, 4, 1))
    with pytest.raises(RuntimeError):  # the norm's own error: its channels are not x's
        norm_act_conv(x, nn.GroupNorm(2, 8), "relu", nn.Conv3d(6, 4, 1))


@pytest.mark.parametrize("norm", list(_NORMS))
@pytest.mark.parametrize("activation", ["leaky_relu", "leaky_module"])
@pytest.mark.parametrize("layout", ["channels_last", "contiguous", "channel_slice"])
@pytest.mark.parametrize("grads", ["all", "no_input", "frozen_norm"])
def test_norm_act_matches_plain_composition(norm, activation, layout, grads):
    norm = _NORMS[norm]().double()
    activation = nn.LeakyReLU(0.2) if activation == "leaky_module" else activation
    _randomise(norm)
    if grads == "frozen_norm":
        norm.requires_grad_(False)
    norm_ref = copy.deepcopy(norm)
    big = torch.randn(2, 8, 5, 4, 7, dtype=torch.float64) * 2 + 0.5
    if layout == "channels_last":
        big = big.contiguous(memory_format=torch.channels_last_3d)
    make = (lambda t: t[:, 1:7]) if layout == "channel_slice" else (lambda t: t[:, :6])
    b1, b2 = big.clone().requires_grad_(grads != "no_input"), big.clone().requires_grad_()
    for _ in range(2):  # twice: BatchNorm's running statistics and num_batches_tracked must evolve identically
        y = norm_act(make(b1), norm, activation)
        y_ref = (activation if callable(activation) else _ACTS[activation])(norm_ref(make(b2)))
    if y.requires_grad:  # not with nothing to differentiate (no affine parameters, an input without gradient)
        assert y.grad_fn.name() == "_NormLeakyReLUBackward"
    assert_close("y", y, y_ref, torch.float64)
    if not y.requires_grad:
        return
    g = torch.randn_like(y_ref)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    if grads != "no_input":
        assert_close("dx", b1.grad, b2.grad, torch.float64)
    for (name, p), p_ref in zip(norm.named_parameters(), norm_ref.parameters()):
        assert (p.grad is None) == (not p.requires_grad), name
        if p.grad is not None:
            assert_close(name, p.grad, p_ref.grad, torch.float64)
    for (name, b), b_ref in zip(norm.named_buffers(), norm_ref.buffers()):
        assert torch.allclose(b, b_ref, rtol=1e-12, atol=0), name


@pytest.mark.parametrize("norm", ["group", "instance", "batch"])
def test_norm_act_bf16_autocast_and_what_it_saves(norm):
    norm = _NORMS[norm]()
    _randomise(norm)
    norm_ref = copy.deepcopy(norm)
    x = torch.randn(2, 6, 5, 6, 7).bfloat16()
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    saved = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = norm_act(x1, norm, nn.LeakyReLU(0.01))
        y_ref = F.leaky_relu(norm_ref(x2), 0.01)
    assert [t.data_ptr() for t in saved if t.numel() >= x.numel()] == [x1.data_ptr(), y.data_ptr()]
    assert y.dtype == y_ref.dtype and torch.equal(y, y_ref)
    g = torch.randn_like(y_ref)
    y.backward(g)
    y_ref.backward(g)
    assert x1.grad.dtype == x2.grad.dtype and torch.equal(x1.grad, x2.grad)
    for p, q in zip(norm.parameters(), norm_ref.parameters()):
        assert p.grad.dtype == q.grad.dtype and torch.equal(p.grad, q.grad)


def test_norm_act_runs_the_plain_composition_elsewhere():
    """ReLU (which saves its output already), GELU (whose derivative needs its input), a negative slope, hooks,
    no-grad mode and the torch backend run the plain composition."""
    x = torch.randn(2, 6, 3, 4, 5, requires_grad=True)
    norm = nn.GroupNorm(2, 6)
    for activation in ("relu", nn.GELU(), nn.LeakyReLU(-0.1), None):
        y = norm_act(x, norm, activation)
        assert y.grad_fn.name() != "_NormLeakyReLUBackward"
        ref = norm(x) if activation is None else (activation if callable(activation) else F.relu)(norm(x))
        assert_close("y", y, ref, torch.float32)
    act = nn.LeakyReLU()
    handle = act.register_forward_hook(lambda m, a, o: None)
    assert norm_act(x, norm, act).grad_fn.name() == "LeakyReluBackward0"
    handle.remove()
    assert norm_act(x, norm, act).grad_fn.name() == "_NormLeakyReLUBackward"
    with fastseg3d.backend("torch"):
        assert norm_act(x, norm, act).grad_fn.name() == "LeakyReluBackward0"
    with torch.no_grad():
        assert norm_act(x, norm, act).grad_fn is None


def test_a_norm_whose_forward_is_replaced_runs_that_forward():
    """A norm whose ``forward`` is replaced on the instance (as checkpointing wrappers and monkeypatches do) runs
    through it, not through a recompute that reads its parameters."""
    x = torch.randn(2, 6, 3, 4, 5, requires_grad=True)
    norm, conv = nn.GroupNorm(2, 6), nn.Conv3d(6, 4, 1)
    norm.forward = lambda t: nn.GroupNorm.forward(norm, t) * 2.0
    assert_close("y", norm_act_conv(x, norm, "relu", conv), conv(F.relu(norm(x))), torch.float32)
    inorm = nn.InstanceNorm3d(6)
    inorm.forward = lambda t: nn.InstanceNorm3d.forward(inorm, t) + 1.0
    assert_close("y", norm_act(x, inorm, nn.LeakyReLU(0.1)), F.leaky_relu(inorm(x), 0.1), torch.float32)


def check_add_layer_norm_broadcast_residual(rshape):
    norm = nn.LayerNorm(32)
    x = torch.randn(2, 10, 32, requires_grad=True)
    r = torch.randn(*rshape, requires_grad=True)
    s, y = add_layer_norm(x, r, norm)
    s_ref = x + r
    y_ref = norm(s_ref)
    assert_close("s", s, s_ref, torch.float32)
    assert_close("y", y, y_ref, torch.float32)
    g1, g2 = torch.randn_like(s_ref), torch.randn_like(y_ref)
    got = torch.autograd.grad((s, y), (x, r), (g1, g2))
    expected = torch.autograd.grad((s_ref, y_ref), (x, r), (g1, g2))
    for name, a, e in zip(("dx", "dresidual"), got, expected):
        assert_close(name, a, e, torch.float32)


@pytest.mark.parametrize("rshape", [(10, 32), (1, 10, 32)])
def test_add_layer_norm_with_a_broadcast_residual(rshape):
    """A residual that broadcasts (a (N, C) or (1, N, C) positional embedding) is x + residual and its norm."""
    check_add_layer_norm_broadcast_residual(rshape)


def test_norm_act_leaky_relu_with_slope_zero_saves_its_output():
    """A slope of 0 is non-negative: the output's sign still gives the derivative, so norm_act saves the output
    (not the activation's input), with the plain composition's gradients."""
    norm = nn.InstanceNorm3d(6, affine=True).double()
    _randomise(norm)
    norm_ref = copy.deepcopy(norm)
    x1 = torch.randn(2, 6, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    y = norm_act(x1, norm, nn.LeakyReLU(0.0))
    assert y.grad_fn.name() == "_NormLeakyReLUBackward"
    y_ref = F.leaky_relu(norm_ref(x2), 0.0)
    g = torch.randn_like(y_ref)
    y.backward(g)
    y_ref.backward(g)
    assert_close("dx", x1.grad, x2.grad, torch.float64)
    assert_close("dweight", norm.weight.grad, norm_ref.weight.grad, torch.float64)


def test_batch_norm_act_linear_without_affine_parameters():
    """A BatchNorm without weight and bias takes the recompute too: backward must not hand gradients to the
    parameters it does not have (autograd raises if it does)."""
    bn = nn.BatchNorm3d(4, affine=False).double()
    bn_ref = copy.deepcopy(bn)
    w = torch.randn(3, 4, dtype=torch.float64)
    w1, w2 = w.clone().requires_grad_(), w.clone().requires_grad_()
    x1 = torch.randn(2, 4, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    y = batch_norm_act_linear(x1, bn, "gelu", w1, None)
    assert y.grad_fn.name() == "_BatchNormActLinearBackward"
    y_ref = F.linear(F.gelu(bn_ref(x2)).flatten(2).transpose(1, 2), w2)
    g = torch.randn_like(y_ref)
    y.backward(g)
    y_ref.backward(g)
    assert_close("dx", x1.grad, x2.grad, torch.float64)
    assert_close("dw", w1.grad, w2.grad, torch.float64)


def test_sync_batch_norm_in_an_initialised_world_of_one_keeps_the_fused_path(monkeypatch):
    """SyncBatchNorm syncs only when the world has more than one process: with one it is plain BatchNorm, so the
    recompute (which never calls its forward) still runs."""
    calls = []
    _fake_world(monkeypatch, 1, calls)
    bn = nn.SyncBatchNorm(6).double().train()
    bn_ref = nn.BatchNorm3d(6).double()
    w = torch.randn(5, 6, dtype=torch.float64)
    x = torch.randn(2, 6, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    y = batch_norm_act_linear(x, bn, "relu", w, None)
    assert calls == [] and y.grad_fn.name() == "_BatchNormActLinearBackward"
    assert_close("y", y, F.linear(F.relu(bn_ref(x)).flatten(2).transpose(1, 2), w), torch.float64)
    assert_close("running_var", bn.running_var, bn_ref.running_var, torch.float64)


def test_a_compiled_norm_runs_its_compiled_call():
    """``module.compile()`` replaces the module's call (it acts as a hook): the recompute, which reads the
    parameters directly, would bypass it, so the plain composition runs."""
    x = torch.randn(2, 6, 3, 4, 5, requires_grad=True)
    norm, conv = nn.GroupNorm(2, 6), nn.Conv3d(6, 4, 1)
    norm.compile(backend="eager")
    try:
        assert recompute.has_hooks(norm)
        assert norm_act_conv(x, norm, "relu", conv).grad_fn.name() == "ConvolutionBackward0"
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("register", ["full_backward_hook", "full_backward_pre_hook"])
def test_global_backward_hooks_run_the_plain_composition(register):
    """A global module backward hook must see the norm's and conv's gradients: the recompute (one autograd node, no
    module calls) would skip it, so the plain composition runs and the hook fires."""
    calls = []
    handle = getattr(nn.modules.module, f"register_module_{register}")(lambda m, *grads: calls.append(type(m)))
    try:
        x = torch.randn(2, 6, 3, 4, 5, requires_grad=True)
        norm, conv = nn.GroupNorm(2, 6), nn.Conv3d(6, 4, 1)
        assert recompute.has_hooks(norm)
        y = norm_act_conv(x, norm, "relu", conv)
        assert y.grad_fn.name() != "_NormActConvBackward"
        y.sum().backward()
    finally:
        handle.remove()
    assert nn.Conv3d in calls and nn.GroupNorm in calls
    assert not recompute.has_hooks(norm)


@pytest.mark.parametrize("chain", ["norm_act", "norm_act_conv", "batch_norm_act_linear"])
def test_fused_batch_norm_without_running_statistics(chain, monkeypatch):
    """A training BatchNorm with ``track_running_stats=False`` on the fused kernels (forced on CPU, where the op
    runs its reference body) normalises with the batch statistics and has no running statistics to update."""
    monkeypatch.setattr(recompute, "group_norm_act_unsupported_reasons", lambda *args: [])
    monkeypatch.setattr(recompute.backends, "select", lambda *args, **kwargs: True)
    calls = _count_fused(monkeypatch)
    bn = nn.BatchNorm3d(6, track_running_stats=False)
    _randomise(bn)
    bn_ref, conv, w = copy.deepcopy(bn), nn.Conv3d(6, 4, 1), torch.randn(5, 6)
    x1, x2 = _input_pair(6, "channels_last")
    if chain == "norm_act":
        y, y_ref = norm_act(x1, bn, "relu"), F.relu(bn_ref(x2))
    elif chain == "norm_act_conv":
        y, y_ref = norm_act_conv(x1, bn, "relu", conv), conv(F.relu(bn_ref(x2)))
    else:
        y = batch_norm_act_linear(x1, bn, "relu", w, None)
        y_ref = F.linear(F.relu(bn_ref(x2)).flatten(2).transpose(1, 2), w)
    assert calls == [6]
    assert bn.running_mean is None and bn.num_batches_tracked is None
    assert_close("y", y, y_ref, torch.float32)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    assert_close("dx", x1.grad, x2.grad, torch.float32, 2.0)


def test_act_instance_norm_conv_fp32_input_under_autocast_matches_plain_composition():
    """An fp32 input under bf16 autocast: the norm runs in fp32 and the conv in bf16, so backward's recomputed fp32
    normalised tensor is cast to the conv's dtype before the conv's backward, as autograd does."""
    torch.manual_seed(0)
    norm, conv = nn.InstanceNorm3d(8), nn.Conv3d(8, 4, 1)
    x1 = torch.randn(2, 8, 3, 4, 5, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    params = [[p.detach().clone().requires_grad_() for p in conv.parameters()] for _ in range(2)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = act_instance_norm_conv(x1, "gelu", norm, *params[0])
        y_ref = F.conv3d(norm(F.gelu(x2)), *params[1])
    assert y.grad_fn.name() == "_ActInstanceNormConvBackward"
    assert y.dtype == y_ref.dtype == torch.bfloat16 and torch.equal(y, y_ref)
    g = torch.randn_like(y_ref)
    y.backward(g)
    y_ref.backward(g)
    for name, a, e in (("dx", x1.grad, x2.grad), ("dw", params[0][0].grad, params[1][0].grad)):
        assert a.dtype == e.dtype, name
        assert_close(name, a, e, torch.bfloat16)


def test_norm_act_fused_group_norm_returns_the_dtype_group_norm_returns():
    """On the meta device under emulated CUDA autocast (where the fused kernels run), GroupNorm computes in fp32:
    the fused norm_act writes fp32 from a bf16 input, the dtype the plain ``relu(group_norm(x))`` has."""
    norm = nn.GroupNorm(4, 16, device="meta")
    x = torch.empty(2, 16, 4, 4, 4, device="meta", dtype=torch.bfloat16)
    with _autocast_on_meta(torch.bfloat16):
        y, y_ref = norm_act(x, norm, "relu"), F.relu(norm(x))
        inorm = nn.InstanceNorm3d(16, device="meta")
        z, z_ref = norm_act(x, inorm, "relu"), F.relu(inorm(x))  # InstanceNorm: x's dtype, as the plain one
    assert y.dtype == y_ref.dtype == torch.float32 and z.dtype == z_ref.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------------
# Interpreter tier: the fused GroupNorm + activation inside norm_act_conv (TRITON_INTERPRET=1)


def _input_pair(channels: int, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Two equal leaf inputs (2, channels, 5, 4, 7) in ``layout``: one for the fused chain, one for the plain."""
    x = torch.randn(2, channels, 5, 4, 7) * 2 + 0.5
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    return x.clone().requires_grad_(), x.clone().requires_grad_()


def _backward_and_compare(y, y_ref, x1, x2, modules, refs, bias_removed: bool) -> None:
    """Backward through a fused chain (triton backend) and its plain composition with the same gradient; the input
    and every parameter gradient agree. ``bias_removed``: a per-channel norm follows the conv, whose bias gradient
    is then 0 up to rounding on both sides."""
    g = torch.randn_like(y_ref)
    with fastseg3d.backend("triton"):
        y.backward(g)
    y_ref.backward(g)
    assert_close("dx", x1.grad, x2.grad, torch.float32, 2.0)
    for module, module_ref in zip(modules, refs):
        for (name, p), p_ref in zip(module.named_parameters(), module_ref.parameters()):
            if bias_removed and isinstance(module, nn.Conv3d) and name == "bias":
                assert p.grad.abs().max() < 1e-4 and p_ref.grad.abs().max() < 1e-4
                continue
            assert_close(f"d{type(module).__name__}.{name}", p.grad, p_ref.grad, torch.float32, 2.0)


def _count_fused(monkeypatch) -> list:
    calls = []
    real = recompute.group_norm_act_fused
    monkeypatch.setattr(recompute, "group_norm_act_fused", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    return calls


@pytest.mark.interpret
@pytest.mark.parametrize("activation", ["relu", None, "gelu_module", "silu_module"])
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_interpret_norm_act_conv_fused_group_norm_matches_plain_composition(activation, layout, monkeypatch, poison):
    calls = _count_fused(monkeypatch)
    activation = {"gelu_module": nn.GELU(), "silu_module": nn.SiLU()}.get(activation, activation)
    norm, conv = nn.GroupNorm(3, 6), nn.Conv3d(6, 4, 3, padding=1)
    _randomise(norm, conv)
    norm_ref, conv_ref = copy.deepcopy(norm), copy.deepcopy(conv)
    x1, x2 = _input_pair(6, layout)
    with fastseg3d.backend("triton"):
        y = norm_act_conv(x1, norm, activation, conv)
    y_ref = _plain(x2, norm_ref, activation, conv_ref)
    assert y.grad_fn.name() == "_NormActConvBackward" and len(calls) == 1
    assert_close("y", y, y_ref, torch.float32)
    _backward_and_compare(y, y_ref, x1, x2, (norm, conv), (norm_ref, conv_ref), bias_removed=False)


@pytest.mark.interpret
@pytest.mark.parametrize("activation", ["gelu", "relu"])
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_interpret_batch_norm_act_linear_on_the_fused_kernels(activation, layout, monkeypatch, poison):
    """SegFormer3D's Mix-FFN (BatchNorm -> GELU -> fc2) and decoder (BatchNorm -> ReLU -> linear) with the norm and
    the activation in one kernel (statistics over the batch): output, every gradient, and the running statistics
    and batch count over two steps, as ``nn.BatchNorm3d`` updates them."""
    calls = _count_fused(monkeypatch)
    bn = nn.BatchNorm3d(6)
    _randomise(bn)
    bn_ref = copy.deepcopy(bn)
    x1, x2 = _input_pair(6, layout)
    w = torch.randn(5, 6)
    w1, w2 = w.clone().requires_grad_(), w.clone().requires_grad_()
    b1, b2 = torch.zeros(5, requires_grad=True), torch.zeros(5, requires_grad=True)
    act = F.gelu if activation == "gelu" else F.relu
    for _ in range(2):
        with fastseg3d.backend("triton"):
            y = batch_norm_act_linear(x1, bn, activation, w1, b1)
        y_ref = F.linear(act(bn_ref(x2)).flatten(2).transpose(1, 2), w2, b2)
    assert calls == [6, 6] and y.grad_fn.name() == "_BatchNormActLinearBackward"
    assert_close("y", y, y_ref, torch.float32)
    g = torch.randn_like(y_ref)
    with fastseg3d.backend("triton"):
        y.backward(g)
    y_ref.backward(g)
    for name, a, e in (("dx", x1, x2), ("dw", w1, w2), ("db", b1, b2), ("dbn.weight", bn.weight, bn_ref.weight),
                       ("dbn.bias", bn.bias, bn_ref.bias)):
        assert_close(name, a.grad, e.grad, torch.float32, 2.0)
    for name in ("running_mean", "running_var"):
        assert_close(name, getattr(bn, name), getattr(bn_ref, name), torch.float32)
    assert bn.num_batches_tracked.item() == bn_ref.num_batches_tracked.item() == 2


@pytest.mark.interpret
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_interpret_batch_norm_relu_chains_on_the_fused_kernels(layout, monkeypatch, poison):
    """MISSU's decoder block, conv -> BatchNorm -> ReLU -> conv -> BatchNorm -> ReLU: both norms on the fused kernels
    with statistics over the batch, matching the plain composition (output, gradients, running statistics)."""
    calls = _count_fused(monkeypatch)
    norm1, norm2, conv = nn.BatchNorm3d(6, momentum=None), nn.BatchNorm3d(6), nn.Conv3d(6, 6, 3, padding=1)
    _randomise(norm1, norm2, conv)
    refs = copy.deepcopy((norm1, norm2, conv))
    for _ in range(2):  # the second step's cumulative average weighs the first
        x1, x2 = _input_pair(6, layout)
        with fastseg3d.backend("triton"):
            y = norm_act(norm_act_conv(x1, norm1, "relu", conv), norm2, nn.ReLU())
        y_ref = F.relu(refs[1](refs[2](F.relu(refs[0](x2)))))
    assert calls == [6, 6] * 2 and y.grad_fn.name().startswith("group_norm_act")
    assert_close("y", y, y_ref, torch.float32)
    _backward_and_compare(y, y_ref, x1, x2, (norm1, norm2, conv), refs, bias_removed=True)
    for module, module_ref in zip((norm1, norm2, conv), refs):
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            if hasattr(module, name):
                assert_close(name, getattr(module, name).float(), getattr(module_ref, name).float(), torch.float32)


@pytest.mark.interpret
def test_interpret_norm_act_conv_fused_group_norm_under_fp32_group_norm_autocast(monkeypatch, poison):
    """bf16 input under autocast with CUDA's GroupNorm policy patched in: the fused kernel reads the bf16 input and
    writes the conv's bf16 input; output and gradients within bf16 rounding of the plain chain, in its dtypes."""
    calls = _count_fused(monkeypatch)
    monkeypatch.setattr(recompute, "_group_norm_dtype", lambda x: torch.float32)
    norm, conv = nn.GroupNorm(4, 16), nn.Conv3d(16, 8, 3, padding=1)
    _randomise(norm, conv)
    norm_ref, conv_ref = copy.deepcopy(norm), copy.deepcopy(conv)
    x = torch.randn(2, 16, 3, 4, 5).bfloat16().contiguous(memory_format=torch.channels_last_3d)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16), fastseg3d.backend("triton"):
        y = norm_act_conv(x1, norm, "relu", conv)
        y_ref = conv_ref(F.relu(norm_ref(x2.float())))
    assert len(calls) == 1 and y.dtype == y_ref.dtype == torch.bfloat16
    assert_close("y", y, y_ref, torch.bfloat16)
    g = torch.randn_like(y_ref)
    with fastseg3d.backend("triton"):
        y.backward(g)
    y_ref.backward(g)
    _assert_bf16_grads_match(x1, x2, (norm, conv), (norm_ref, conv_ref))


@pytest.mark.interpret
@pytest.mark.parametrize("norm", ["group", "instance"])
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_interpret_norm_leaky_relu_chains_on_the_fused_kernel(norm, layout, monkeypatch, poison):
    """The U-Nets' blocks: norm -> LeakyReLU -> conv and norm -> LeakyReLU (an affine InstanceNorm is GroupNorm with
    a channel per group) run on the fused kernel and match the plain composition, output and every gradient."""
    calls = _count_fused(monkeypatch)
    make = {"group": lambda: nn.GroupNorm(3, 6), "instance": lambda: nn.InstanceNorm3d(6, affine=True)}[norm]
    norm1, norm2, conv = make(), make(), nn.Conv3d(6, 6, 3, padding=1)
    _randomise(norm1, norm2, conv)
    refs = copy.deepcopy((norm1, norm2, conv))
    x1, x2 = _input_pair(6, layout)
    with fastseg3d.backend("triton"):
        y = norm_act(norm_act_conv(x1, norm1, nn.LeakyReLU(0.2), conv), norm2, "leaky_relu")
    y_ref = F.leaky_relu(refs[1](refs[2](F.leaky_relu(refs[0](x2), 0.2))), 0.01)
    assert y.grad_fn.name().startswith("group_norm_act") and calls == [6 if norm == "instance" else 3] * 2
    assert_close("y", y, y_ref, torch.float32)
    _backward_and_compare(y, y_ref, x1, x2, (norm1, norm2, conv), refs, bias_removed=norm == "instance")


@pytest.mark.interpret
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_interpret_norm_relu_and_no_activation_on_the_fused_kernel(layout, monkeypatch, poison):
    """norm -> ReLU and a bare norm (MobileUtr's InstanceNorm -> ReLU blocks) through ``norm_act``: one fused op
    that saves only its input, output and every gradient as the plain composition's."""
    calls = _count_fused(monkeypatch)
    norms = nn.InstanceNorm3d(6), nn.GroupNorm(3, 6)
    _randomise(*norms)
    refs = copy.deepcopy(norms)
    x1, x2 = _input_pair(6, layout)
    saved = []
    with fastseg3d.backend("triton"):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = norm_act(norm_act(x1, norms[0], nn.ReLU()), norms[1], None)
    y_ref = refs[1](F.relu(refs[0](x2)))
    assert calls == [6, 3] and len([t for t in saved if t.numel() >= x1.numel()]) == 2
    assert_close("y", y, y_ref, torch.float32)
    g = torch.randn_like(y_ref)
    with fastseg3d.backend("triton"):
        y.backward(g)
    y_ref.backward(g)
    assert_close("dx", x1.grad, x2.grad, torch.float32, 2.0)
    for (name, p), p_ref in zip(norms[1].named_parameters(), refs[1].parameters()):
        assert_close(f"dGroupNorm.{name}", p.grad, p_ref.grad, torch.float32, 2.0)


@pytest.mark.interpret
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_interpret_act_instance_norm_chains_on_the_fused_kernel(layout, monkeypatch, poison):
    """MobileUtr's ConvUtr MLP, GELU -> InstanceNorm -> 1x1 conv -> GELU -> InstanceNorm, on the fused kernel with
    the activation first: output and every gradient as the plain composition's, and each chain saves only its
    input (the plain one also saves the GELU's output)."""
    calls = _count_fused(monkeypatch)
    norm1, norm2, conv = nn.InstanceNorm3d(8), nn.InstanceNorm3d(4), nn.Conv3d(8, 4, 1)
    _randomise(conv)
    conv_ref = copy.deepcopy(conv)
    x1, x2 = _input_pair(8, layout)
    saved = []
    with fastseg3d.backend("triton"):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            h = act_instance_norm_conv(x1, "gelu", norm1, conv.weight, conv.bias)
            y = act_instance_norm(h, "gelu", norm2)
    y_ref = norm2(F.gelu(conv_ref(norm1(F.gelu(x2)))))
    assert calls == [8, 4] and h.grad_fn.name() == "_ActInstanceNormConvBackward"
    assert [t.data_ptr() for t in saved if t.numel() >= h.numel()] == [x1.data_ptr(), h.data_ptr()]
    assert_close("y", y, y_ref, torch.float32)
    g = torch.randn_like(y_ref)
    with fastseg3d.backend("triton"):
        y.backward(g)
    y_ref.backward(g)
    assert_close("dx", x1.grad, x2.grad, torch.float32, 2.0)
    for (name, p), p_ref in zip(conv.named_parameters(), conv_ref.parameters()):
        assert_close(f"dconv.{name}", p.grad, p_ref.grad, torch.float32, 2.0)


@pytest.mark.interpret
def test_interpret_act_instance_norm_conv_bf16_autocast(monkeypatch, poison):
    """bf16 input under autocast (MobileUtr's training): the fused forward writes the conv's bf16 input, and output
    and gradients match the plain composition within bf16 rounding, in its dtypes."""
    calls = _count_fused(monkeypatch)
    norm, conv = nn.InstanceNorm3d(16), nn.Conv3d(16, 8, 1)
    _randomise(conv)
    conv_ref = copy.deepcopy(conv)
    x = torch.randn(2, 16, 3, 4, 5).bfloat16().contiguous(memory_format=torch.channels_last_3d)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16), fastseg3d.backend("triton"):
        y = act_instance_norm_conv(x1, "gelu", norm, conv.weight, conv.bias)
        y_ref = conv_ref(norm(F.gelu(x2)))
    assert calls == [16] and y.dtype == y_ref.dtype == torch.bfloat16
    assert_close("y", y, y_ref, torch.bfloat16)
    g = torch.randn_like(y_ref)
    with fastseg3d.backend("triton"):
        y.backward(g)
    y_ref.backward(g)
    _assert_bf16_grads_match(x1, x2, (conv,), (conv_ref,))


@pytest.mark.interpret
def test_interpret_fp32_input_under_autocast_writes_the_conv_dtype(monkeypatch, poison):
    """An fp32 input under (CPU) bf16 autocast: the fused forward and its recompute write the conv's bf16 input
    directly, and output and gradients match the plain chain within bf16 rounding."""
    calls = _count_fused(monkeypatch)
    written = []
    real = recompute.group_norm_act_recompute
    monkeypatch.setattr(recompute, "group_norm_act_recompute",
                        lambda *a, **k: written.append(real(*a, **k)) or written[-1])
    norm, conv = nn.GroupNorm(4, 16), nn.Conv3d(16, 8, 3, padding=1)
    _randomise(norm, conv)
    norm_ref, conv_ref = copy.deepcopy(norm), copy.deepcopy(conv)
    x = torch.randn(2, 16, 3, 4, 5)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16), fastseg3d.backend("triton"):
        y = norm_act_conv(x1, norm, "relu", conv)
        y_ref = conv_ref(F.relu(norm_ref(x2)))
    assert len(calls) == 1 and y.dtype == y_ref.dtype == torch.bfloat16
    assert_close("y", y, y_ref, torch.bfloat16)
    g = torch.randn_like(y_ref)
    with fastseg3d.backend("triton"):
        y.backward(g)
    y_ref.backward(g)
    assert [t.dtype for t in written] == [torch.bfloat16]
    assert x1.grad.dtype == torch.float32
    assert_close("dx", x1.grad, x2.grad, torch.bfloat16)


@pytest.mark.interpret
def test_interpret_triton_policy_keeps_aten_norms_for_what_the_kernel_refuses(monkeypatch):
    """fp64 under the triton policy: the fused GroupNorm refuses it, and the chain runs ATen's norm (no raise)."""
    calls = _count_fused(monkeypatch)
    norm, conv = nn.GroupNorm(3, 6).double(), nn.Conv3d(6, 4, 3, padding=1).double()
    x = torch.randn(2, 6, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    with fastseg3d.backend("triton"):
        y = norm_act_conv(x, norm, "relu", conv)
    assert y.grad_fn.name() == "_NormActConvBackward" and calls == []
    assert_close("y", y, conv(F.relu(norm(x))), torch.float64)


@pytest.mark.interpret
@pytest.mark.parametrize("rshape", [(10, 32), (1, 10, 32)])
def test_interpret_add_layer_norm_with_a_broadcast_residual(rshape, poison):
    """The fused kernel takes x and the residual of one shape: a broadcast residual runs the separate ops."""
    check_add_layer_norm_broadcast_residual(rshape)


# ------------------------------------------------------------------------------------------------------
# GPU tier (not run here: no GPU in this environment)


@pytest.mark.gpu
@pytest.mark.parametrize("norm", ["group", "instance", "batch"])
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_gpu_norm_act_conv_under_cuda_autocast_matches_plain_composition(norm, layout):
    """CUDA's autocast policy (GroupNorm in fp32 on a copy of its input, the others in the input's dtype, mixed
    with fp32 parameters) is the one the recompute assumes: same output dtypes and values, gradients within bf16
    rounding, and only the bf16 input saved."""
    torch.manual_seed(0)
    norm = _NORMS16[norm]().cuda()
    conv = nn.Conv3d(16, 8, 3, padding=1).cuda()
    _randomise(norm, conv)
    norm_ref, conv_ref = copy.deepcopy(norm), copy.deepcopy(conv)
    x = torch.randn(2, 16, 9, 10, 11, device="cuda").bfloat16()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    saved = []
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert recompute._group_norm_dtype(x) == torch.float32
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = norm_act_conv(x1, norm, "relu", conv)
        y_ref = conv_ref(F.relu(norm_ref(x2)))
    assert y.grad_fn.name() == "_NormActConvBackward"
    assert [t.dtype for t in saved if t.numel() >= x.numel()] == [torch.bfloat16]
    assert y.dtype == y_ref.dtype == torch.bfloat16
    assert_close("y", y, y_ref, torch.bfloat16)
    g = torch.randn_like(y_ref)
    y.backward(g)
    y_ref.backward(g)
    _assert_bf16_grads_match(x1, x2, (norm, conv), (norm_ref, conv_ref))


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_gpu_norm_act_conv_group_norm_without_the_fused_kernel(layout, monkeypatch):
    """The ATen GroupNorm path (where the fused kernel cannot run) under CUDA autocast, as above."""
    monkeypatch.setattr(recompute, "group_norm_act_unsupported_reasons", lambda *args: ["triton is not installed"])
    test_gpu_norm_act_conv_under_cuda_autocast_matches_plain_composition("group", layout)


@pytest.mark.gpu
@pytest.mark.parametrize("norm", ["group", "instance", "batch"])
def test_gpu_norm_act_under_cuda_autocast_matches_plain_composition(norm):
    torch.manual_seed(0)
    norm = _NORMS16[norm]().cuda()
    _randomise(norm)
    norm_ref = copy.deepcopy(norm)
    x = torch.randn(2, 16, 9, 10, 11, device="cuda").bfloat16().contiguous(memory_format=torch.channels_last_3d)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = norm_act(x1, norm, nn.LeakyReLU(0.01))
        y_ref = F.leaky_relu(norm_ref(x2), 0.01)
    assert y.grad_fn.name().startswith("group_norm_act") and y.dtype == y_ref.dtype  # the fused kernels
    assert_close("y", y, y_ref, torch.bfloat16)
    g = torch.randn_like(y_ref)
    y.backward(g)
    y_ref.backward(g)
    _assert_bf16_grads_match(x1, x2, (norm,), (norm_ref,))
    for name in ("running_mean", "running_var"):
        if getattr(norm, name, None) is not None:
            assert_close(name, getattr(norm, name), getattr(norm_ref, name), torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "aten"])
def test_gpu_batch_norm_act_linear_fp32_input_under_cuda_autocast(fused, monkeypatch):
    """SegFormer3D's decoder on a GPU: the fused BatchNorm -> ReLU writing the linear's bf16 input and the bf16
    backward GEMMs give the plain composition's output, gradients and running statistics; so does the ATen path
    (without the fused kernels) with the ReLU's cast-in-one-pass (a CPU scalar operand, a bf16 out= buffer)."""
    torch.manual_seed(0)
    bn = nn.BatchNorm3d(16).cuda()
    bn_ref = copy.deepcopy(bn)
    if not fused:
        monkeypatch.setattr(recompute, "group_norm_act_unsupported_reasons", lambda *args: ["triton is not installed"])
    calls = _count_fused(monkeypatch)
    x = torch.randn(2, 16, 9, 10, 11, device="cuda").contiguous(memory_format=torch.channels_last_3d)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    w = torch.randn(8, 16, device="cuda")
    w1, w2 = w.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = batch_norm_act_linear(x1, bn, "relu", w1, None)
        y_ref = F.linear(F.relu(bn_ref(x2)).flatten(2).transpose(1, 2), w2)
    assert len(calls) == fused and y.dtype == y_ref.dtype == torch.bfloat16
    assert_close("y", y, y_ref, torch.bfloat16)
    g = torch.randn_like(y_ref)
    y.backward(g)
    y_ref.backward(g)
    for name, a, e in (("dx", x1.grad, x2.grad), ("dw", w1.grad, w2.grad), ("dbn.weight", bn.weight.grad,
                                                                             bn_ref.weight.grad)):
        assert a.dtype == e.dtype, name
        assert_close(name, a, e, torch.bfloat16)
    for name in ("running_mean", "running_var"):
        assert_close(name, getattr(bn, name), getattr(bn_ref, name), torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_gpu_act_instance_norm_chains_under_cuda_autocast(layout):
    """MobileUtr's GELU -> InstanceNorm -> 1x1 conv -> GELU -> InstanceNorm and InstanceNorm -> ReLU on the fused
    kernels under CUDA bf16 autocast: the plain composition's dtypes, only the chains' inputs saved, and against
    float64 an error at most twice the plain composition's own (flash-attention's rule). Norms in bf16 are badly
    conditioned in backward, so the two bf16 chains can be further from each other than either is from float64
    (the H200 run failed on a direct comparison)."""
    torch.manual_seed(0)
    norm1, norm2, norm3 = nn.InstanceNorm3d(64), nn.InstanceNorm3d(16), nn.InstanceNorm3d(16)
    conv = nn.Conv3d(64, 16, 1).cuda()
    conv_ref, conv64 = copy.deepcopy(conv), copy.deepcopy(conv).double()
    x = torch.randn(2, 64, 20, 18, 17, device="cuda").bfloat16()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    x1, x2, x64 = x.clone().requires_grad_(), x.clone().requires_grad_(), x.double().requires_grad_()
    saved = []
    with torch.autocast("cuda", dtype=torch.bfloat16):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            h = act_instance_norm_conv(x1, "gelu", norm1, conv.weight, conv.bias)
            y = norm_act(act_instance_norm(h, "gelu", norm2), norm3, nn.ReLU())
        y_ref = F.relu(norm3(norm2(F.gelu(conv_ref(norm1(F.gelu(x2)))))))
    y64 = F.relu(norm3(norm2(F.gelu(conv64(norm1(F.gelu(x64)))))))
    assert h.grad_fn.name() == "_ActInstanceNormConvBackward" and y.grad_fn.name().startswith("group_norm_act")
    assert len([t for t in saved if t.numel() >= h.numel()]) == 3  # x, h and the second norm's output
    assert y.dtype == y_ref.dtype == torch.bfloat16
    # no gradient where a ReLU input is near its kink, where rounding decides the mask
    g = torch.randn_like(y64) * ((y > 0.1) & (y_ref > 0.1) & (y64 > 0.1))
    for out in (y, y_ref, y64):
        out.backward(g.to(out.dtype))
    assert x1.grad.dtype == x2.grad.dtype and conv.weight.grad.dtype == conv_ref.weight.grad.dtype
    assert conv.bias.grad.dtype == conv_ref.bias.grad.dtype
    for name, got, plain, want in (("y", y, y_ref, y64), ("dx", x1.grad, x2.grad, x64.grad),
                                   ("dconv.weight", conv.weight.grad, conv_ref.weight.grad, conv64.weight.grad),
                                   ("dconv.bias", conv.bias.grad, conv_ref.bias.grad, conv64.bias.grad)):
        # GELU -> InstanceNorm after the conv nearly cancels its bias: every error is measured against the weight
        # gradient's scale there
        scale = max(want.norm().item(), conv64.weight.grad.norm().item() if name == "dconv.bias" else 0.0)
        err, plain_err = ((t.double() - want).norm().item() / scale for t in (got, plain))
        assert err <= 2 * plain_err + 1e-3, f"{name}: relative error {err:.3e}, the plain composition's {plain_err:.3e}"


@pytest.mark.parametrize("norm,dtype,autocast", [
    ("batch", torch.bfloat16, False), ("batch", torch.float16, False), ("instance", torch.bfloat16, False),
    ("instance", torch.float16, False),
    ("instance", torch.bfloat16, True),  # MobileUtr's InstanceNorm (no affine) on a conv's bf16 output
])
def test_constant_channel_through_relu_gets_the_plain_zero_gradient(norm, dtype, autocast):
    """A channel (an instance) that holds one value has z exactly 0 after a training norm of a bf16 or fp16 model,
    where ReLU's gradient is 0. The backward recomputed z with BatchNorm's inference form, about 1e-9 off zero, and
    let the gradient through ReLU on about half the values, scaled by rstd = 1/sqrt(eps): ~300x the gradients
    around. (Under autocast an affine fp32 BatchNorm's z is not exactly 0 in the plain composition either.)"""
    torch.manual_seed(0)
    make = {"batch": lambda: nn.BatchNorm3d(4), "instance": lambda: nn.InstanceNorm3d(4)}[norm]
    layer, conv = make(), nn.Conv3d(4, 4, 3, padding=1)
    if not autocast:
        layer, conv = layer.to(dtype), conv.to(dtype)
    plain_layer, plain_conv = copy.deepcopy(layer), copy.deepcopy(conv)
    x = torch.randn(2, 4, 4, 4, 4).to(dtype)
    constant = (slice(None), 1) if norm == "batch" else (1, 2)
    for value in (0.3, 1.7, -2.1, 0.05):
        x[constant] = value
        ours, plain = x.clone().requires_grad_(), x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = norm_act_conv(ours, layer, "relu", conv)
            expected = plain_conv(torch.relu(plain_layer(plain)))
            tokens = (batch_norm_act_linear(ours, layer, "relu", conv.weight[:, :, 1, 1, 1], None)
                      if norm == "batch" else None)
        g = torch.randn(expected.shape).to(expected.dtype)
        dx, = torch.autograd.grad(y, ours, g)
        dx_plain, = torch.autograd.grad(expected, plain, g)
        assert torch.equal(dx_plain[constant], torch.zeros_like(dx_plain[constant]))
        assert torch.equal(dx[constant], dx_plain[constant]), f"value {value}: max |dx| {dx[constant].abs().max()}"
        if tokens is not None:
            dx_tokens, = torch.autograd.grad(tokens, ours, torch.randn(tokens.shape).to(tokens.dtype))
            assert torch.equal(dx_tokens[constant], torch.zeros_like(dx_tokens[constant])), f"value {value}"
