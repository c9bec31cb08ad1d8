"""convert_model / revert_model on a MONAI network and on plain modules."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastseg3d
from fastseg3d.nn import DepthwiseConv3d
from tests.utils import assert_close


def _mednext():
    nets = pytest.importorskip("monai.networks.nets")
    return nets.MedNeXt(spatial_dims=3, init_filters=8, in_channels=1, out_channels=2, kernel_size=3,
                        blocks_down=(1, 1, 1, 1), blocks_bottleneck=1, blocks_up=(1, 1, 1, 1))


def test_convert_monai_mednext_keeps_keys_parameters_and_outputs():
    net = _mednext()
    keys = list(net.state_dict())
    params = {name: p for name, p in net.named_parameters()}
    depthwise = [n for n, m in net.named_modules()
                 if type(m) is nn.Conv3d and m.groups == m.in_channels > 1 and m.stride == (1, 1, 1)]
    assert depthwise, "MedNeXt should contain depthwise convolutions"
    x = torch.randn(1, 1, 32, 32, 32)
    net.eval()
    expected = net(x)

    converted = fastseg3d.convert_model(net)
    assert converted is net
    modules = dict(net.named_modules())
    assert all(type(modules[n]) is DepthwiseConv3d for n in depthwise)
    # MedNeXt's down-sampling blocks' depthwise convs have stride 2: left alone
    assert all(m.stride == (2, 2, 2) for m in net.modules() if type(m) is nn.Conv3d and m.groups == m.in_channels > 1)
    assert list(net.state_dict()) == keys
    assert all(p is params[name] for name, p in net.named_parameters())  # shared, not copied
    assert_close("y", net(x), expected, torch.float32)

    fastseg3d.revert_model(net)
    assert not any(isinstance(m, DepthwiseConv3d) for m in net.modules())
    assert list(net.state_dict()) == keys
    assert_close("y", net(x), expected, torch.float32)


def test_convert_leaves_other_convs_and_handles_a_bare_module():
    model = nn.Sequential(nn.Conv3d(4, 8, 3), nn.Conv3d(8, 8, 3, groups=8), nn.Conv3d(8, 16, 3, groups=8),
                          nn.Conv3d(8, 8, 3, stride=2, groups=8), nn.Conv3d(8, 8, 3, padding_mode="reflect", groups=8),
                          nn.Conv3d(8, 8, (1, 2, 3), groups=8), nn.Conv3d(8, 8, 11, groups=8),
                          nn.Conv3d(8, 8, (1, 9, 9), groups=8))
    fastseg3d.convert_model(model)
    # the depthwise convs the kernel cannot take (stride, reflect padding, even or > 9 kernels) stay ATen's
    assert [type(m) for m in model] == [nn.Conv3d, DepthwiseConv3d, *[nn.Conv3d] * 5, DepthwiseConv3d]
    conv = nn.Conv3d(5, 5, 3, groups=5)
    bare = fastseg3d.convert_model(conv)
    assert bare is conv and type(bare) is DepthwiseConv3d  # the module itself changes class
    assert fastseg3d.revert_model(bare) is conv and type(conv) is nn.Conv3d
    for swap in (fastseg3d.convert_model, fastseg3d.revert_model):
        with pytest.raises(TypeError, match="model must be a torch.nn.Module, got NoneType"):
            swap(None)


@pytest.mark.parametrize("network", ["mednext", "unet"])
def test_convert_norms_of_monai_networks(network):
    """norm=True: MedNeXt's GroupNorms and MONAI UNet's InstanceNorm3ds become fastseg3d's, keys and outputs as
    they were; conv=False leaves the depthwise convs; revert_model undoes both."""
    from fastseg3d.nn import GroupNorm, InstanceNorm3d

    if network == "mednext":
        net = _mednext()
        torch_norm, norm = nn.GroupNorm, GroupNorm
    else:
        nets = pytest.importorskip("monai.networks.nets")
        net = nets.UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8, 16), strides=(2, 2),
                        norm="instance")
        torch_norm, norm = nn.InstanceNorm3d, InstanceNorm3d
    names = [n for n, m in net.named_modules() if type(m) is torch_norm]
    assert names
    keys, x = list(net.state_dict()), torch.randn(1, 1, 32, 32, 32)
    expected = net.eval()(x)
    fastseg3d.convert_model(net, conv=False, norm=True)
    modules = dict(net.named_modules())
    assert all(type(modules[n]) is norm for n in names)
    assert not any(type(m) is DepthwiseConv3d for m in net.modules())
    assert list(net.state_dict()) == keys
    assert_close("y", net(x), expected, torch.float32)
    fastseg3d.revert_model(net)
    assert all(type(modules[n]) is torch_norm for n in names)
    with pytest.raises(TypeError, match="norm must be a bool"):
        fastseg3d.convert_model(net, norm="yes")


def test_converted_modules_keep_their_hooks_and_compiled_call():
    """Hooks hold weak references to their module, and Module.compile() a call bound to it: both follow the
    module, which changes class in place (a new module object left them on the old one)."""
    import gc

    model = nn.Sequential(nn.Conv3d(4, 4, 3, padding=1, groups=4), nn.Conv3d(4, 4, 3, padding=1, groups=4))
    state = model.state_dict()
    loaded = []
    model[0].register_load_state_dict_pre_hook(lambda module, *args: loaded.append(type(module)))
    model[1].compile(backend="eager")
    x = torch.randn(1, 4, 5, 5, 5)
    expected = model(x)
    fastseg3d.convert_model(model)
    gc.collect()
    model.load_state_dict(state)
    assert loaded == [DepthwiseConv3d]
    calls = []
    model[1].register_forward_pre_hook(lambda module, args: calls.append(type(module)))
    with fastseg3d.backend("torch"):
        assert_close("y", model(x), expected, torch.float32)
    assert calls == [DepthwiseConv3d]


def test_convert_keeps_parametrizations():
    from torch.nn.utils import parametrizations, parametrize

    model = nn.Sequential(parametrizations.weight_norm(nn.Conv3d(4, 4, 3, padding=1, groups=4)))
    keys = list(model.state_dict())
    x = torch.randn(1, 4, 5, 5, 5)
    expected = model(x)
    fastseg3d.convert_model(model)
    assert isinstance(model[0], DepthwiseConv3d) and parametrize.is_parametrized(model[0], "weight")
    assert list(model.state_dict()) == keys
    assert_close("y", model(x), expected, torch.float32)
    model(x).sum().backward()
    assert model[0].parametrizations.weight.original1.grad is not None
    fastseg3d.revert_model(model)
    assert parametrize.type_before_parametrizations(model[0]) is nn.Conv3d
    assert_close("y", model(x), expected, torch.float32)


def test_convert_keeps_a_shared_module_one_module_and_numpy_int_settings_work():
    import numpy as np

    conv = nn.Conv3d(4, 4, 3, padding=np.int64(1), dilation=np.int64(1), groups=4)
    model = nn.Sequential(conv, nn.ReLU(), conv, nn.Sequential(conv))
    x = torch.randn(1, 4, 5, 6, 7)
    expected = model(x)
    fastseg3d.convert_model(model)
    assert type(model[0]) is DepthwiseConv3d and model[0] is model[2] is model[3][0]
    assert list(model.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias", "3.0.weight", "3.0.bias"]
    assert_close("y", model(x), expected, torch.float32)
    fastseg3d.revert_model(model)
    assert type(model[0]) is nn.Conv3d and model[0] is model[2] is model[3][0]


def test_converted_model_trains_like_the_original():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv3d(2, 4, 1), nn.Conv3d(4, 4, 3, padding=1, groups=4), nn.GELU(), nn.Conv3d(4, 1, 1))
    twin = nn.Sequential(*[type(m)(**_ctor(m)) if isinstance(m, nn.Conv3d) else m for m in base])
    twin.load_state_dict(base.state_dict())
    fastseg3d.convert_model(twin)
    x, target = torch.randn(2, 2, 6, 7, 8), torch.randn(2, 1, 6, 7, 8)
    losses = []
    for model in (base, twin):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):
            opt.zero_grad()
            loss = (model(x) - target).square().mean()
            loss.backward()
            opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


class _Block(nn.Module):
    """A MedNeXt-style block, the norm first: a bias just before a per-channel norm gets no gradient but rounding
    noise, which Adam scales up to full steps."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.dw = nn.Conv3d(c, c, 3, padding=1, groups=c)
        self.norm = nn.GroupNorm(c, c)
        self.expand = nn.Conv3d(c, 2 * c, 1)
        self.project = nn.Conv3d(2 * c, c, 1)

    def forward(self, x):
        return x + self.project(F.gelu(self.expand(self.dw(self.norm(x)))))


def _train_twins(device: str, dtype: torch.dtype, channels: int, blocks: int, shape: tuple, steps: int):
    """A small MedNeXt-style network and its converted twin (on the Triton kernels) trained side by side with
    Adam on one batch: each one's losses per step and their final parameters."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv3d(2, channels, 1), *[_Block(channels) for _ in range(blocks)],
                         nn.Conv3d(channels, 3, 1)).to(device)
    twin = copy.deepcopy(base)
    fastseg3d.convert_model(twin)
    assert sum(type(m) is DepthwiseConv3d for m in twin.modules()) == blocks
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 2, *shape, generator=g).to(device)
    label = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()  # something to learn
    curves = []
    for model, backend in ((base, "torch"), (twin, "triton")):
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        losses = []
        with fastseg3d.backend(backend), torch.autocast(device, dtype, enabled=dtype != torch.float32):
            for _ in range(steps):
                opt.zero_grad()
                loss = F.cross_entropy(model(x).float(), label)
                loss.backward()
                opt.step()
                losses.append(loss.item())
        curves.append(torch.tensor(losses))
    return curves, base, twin


@pytest.mark.interpret
def test_converted_model_trains_as_the_original_on_the_kernels():
    """The converged-training check below on the interpreted kernels (three steps: about 6 s each)."""
    (plain, fused), base, twin = _train_twins("cpu", torch.float32, 4, 1, (4, 4, 3), 3)
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(base.named_parameters(), twin.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-4, msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_converted_model_converges_as_the_original(dtype, no_tf32):
    """Thirty Adam steps of a small MedNeXt-style network with and without convert_model: the same loss at every
    step and the same weights at the end (Liger's convergence tolerances: fp32 loss rtol 1e-3, weights atol 5e-3;
    bf16 autocast loss atol 5e-2, rtol 0.4), and in fp32 both learn."""
    (plain, fused), base, twin = _train_twins("cuda", dtype, 16, 2, (24, 20, 16), 30)
    if dtype == torch.float32:
        assert plain[-1] < 0.6 * plain[0] and fused[-1] < 0.6 * fused[0]  # 1.03 -> 0.37 on a CPU
        torch.testing.assert_close(fused, plain, rtol=1e-3, atol=1e-5)
        for (name, p), q in zip(base.named_parameters(), twin.parameters()):
            torch.testing.assert_close(q, p, rtol=0, atol=5e-3, msg=name)
    else:
        torch.testing.assert_close(fused, plain, rtol=0.4, atol=5e-2)


def _ctor(m: nn.Conv3d) -> dict:
    return dict(in_channels=m.in_channels, out_channels=m.out_channels, kernel_size=m.kernel_size,
                padding=m.padding, groups=m.groups)


def test_a_traced_converted_conv_follows_each_inputs_layout():
    """As a traced nn.Conv3d does: the example input's layout is not baked into the trace."""
    conv = fastseg3d.convert_model(nn.Conv3d(3, 3, 3, padding=1, groups=3))
    contiguous = torch.randn(2, 3, 4, 5, 6)
    channels_last = contiguous.contiguous(memory_format=torch.channels_last_3d)
    for example, other in ((contiguous, channels_last), (channels_last, contiguous)):
        traced = torch.jit.trace(conv, example)
        for x in (example, other):
            y = traced(x)
            assert y.stride() == nn.Conv3d.forward(conv, x).stride()
            torch.testing.assert_close(y, conv(x), rtol=0, atol=0)
