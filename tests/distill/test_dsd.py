"""The DSD wrapper: DeepUp heads, training/eval outputs on fastseg3d's UNet, MONAI's UNETR and DynUNet, the
published UNETR head parameter count (seeds.md §5.3), meta device, compile, bad input."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
import torch.nn.functional as F

from fastseg3d.distill import DSD, DeepUp, DSDOutput, presets
from fastseg3d.losses import DSDLoss
from fastseg3d.networks.unet import UNet, dsd_unet

nets = pytest.importorskip("monai.networks.nets")
inferers = pytest.importorskip("monai.inferers")


@pytest.fixture
def unetr_cls():
    pytest.importorskip("einops")  # MONAI's UNETR needs it (the monai extra installs it)
    return nets.UNETR


def _small_unetr(unetr_cls, in_channels=1, out_channels=3):
    return unetr_cls(in_channels, out_channels, img_size=32, feature_size=16, hidden_size=96, mlp_dim=192,
                     num_heads=4, proj_type="conv")


def test_deepup_is_the_published_head():
    head = DeepUp(3, 8, 4, scale=8)
    x = torch.randn(1, 8, 2, 2, 2)
    y = head.conv(x)
    for _ in range(3):  # one x2 deconv, the same weights at every step
        y = head.up(y)
    torch.testing.assert_close(head(x), y)
    assert head.up.kernel_size == (2, 2, 2) and head(x).shape == (1, 4, 16, 16, 16)
    one = DeepUp(3, 8, 4, scale=1)  # scale 1 keeps a 1x1x1 deconv, as published
    assert one.up.kernel_size == (1, 1, 1) and one(x).shape == (1, 4, 2, 2, 2)
    flat = DeepUp(2, 8, 4, scale=None)
    assert not hasattr(flat, "up") and flat(torch.randn(1, 8, 3, 3)).shape == (1, 4, 3, 3)
    with pytest.raises(ValueError):
        DeepUp(3, 8, 4, scale=6)


def test_unetr_head_parameters_match_published(unetr_cls):
    # seeds.md §5.3: UNETR (4 -> 4 classes, 128^3, f16) 102,468,164 -> 102,474,068 with 8 separate heads
    with torch.device("meta"):
        net = unetr_cls(4, 4, img_size=128, feature_size=16, proj_type="conv", norm_name="instance", res_block=True)
    assert sum(p.numel() for p in net.parameters()) == 102_468_164
    dsd = DSD(net, num_classes=4, input_shape=(1, 4, 128, 128, 128), **presets.unetr_layers("dsd"))
    assert sum(p.numel() for p in dsd.parameters()) == 102_474_068
    assert [dsd.scales[n][0] for n in dsd.decoder_layers] == [16, 8, 4, 2]
    assert [dsd.scales[n][0] for n in dsd.encoder_layers] == [1, 2, 4, 8]
    out = dsd(torch.empty(1, 4, 128, 128, 128, device="meta"))  # the whole training forward on meta
    assert all(t.shape == (1, 4, 128, 128, 128) for t in (out.main, *out.decoder, *out.encoder))


@pytest.mark.parametrize("mode", ["deconv", "interp"])
def test_unet_training_and_eval(mode):
    net = dsd_unet(3, 1, 2, channels=(4, 8, 8, 8), head_mode=mode)
    x = torch.randn(2, 1, 16, 16, 16)
    out = net(x)
    assert isinstance(out, DSDOutput) and len(out.decoder) == 3 and len(out.encoder) == 3
    if mode == "deconv":
        assert all(t.shape == (2, 2, 16, 16, 16) for t in (*out.decoder, *out.encoder))
    else:
        assert [t.shape[-1] for t in out.decoder] == [2, 4, 8]  # coarse to fine, teacher last
        assert [t.shape[-1] for t in out.encoder] == [16, 8, 4]  # shallow to deep, teacher last
        assert not any(".up." in n for n, _ in net.named_parameters() if "heads" in n)
    net.eval()
    with torch.no_grad():
        y = net(x)
        torch.testing.assert_close(y, net.backbone(x))
        assert not net._tap.store  # nothing kept in eval
        sw = inferers.sliding_window_inference(torch.randn(1, 1, 24, 16, 16), (16, 16, 16), 1, net)
    assert isinstance(y, torch.Tensor) and sw.shape == (1, 2, 24, 16, 16)


def test_heads_match_their_features():
    net = UNet(3, 1, 2, channels=(4, 8, 8))
    dsd = DSD(net, ["encoder.0", "encoder.1"], ["encoder.2", "decoder.0"], 2, input_shape=(1, 1, 8, 8, 8))
    feats = {}
    handles = [net.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: feats.__setitem__(n, o))
               for n in ("encoder.1", "decoder.0")]
    out = dsd(torch.randn(1, 1, 8, 8, 8))
    for h in handles:
        h.remove()
    torch.testing.assert_close(out.encoder[1], dsd.encoder_heads[1](feats["encoder.1"]))
    torch.testing.assert_close(out.decoder[1], dsd.decoder_heads[1](feats["decoder.0"]))
    clone = copy.deepcopy(dsd)  # hooks are plain objects: the copy captures its own backbone's features
    assert len(clone(torch.randn(1, 1, 8, 8, 8)).encoder) == 2


def test_unetr_training_and_eval(unetr_cls):
    net = _small_unetr(unetr_cls)
    dsd = DSD(net, num_classes=3, input_shape=(1, 1, 32, 32, 32), **presets.unetr_layers("dsd"))
    out = dsd(torch.randn(1, 1, 32, 32, 32))
    assert len(out) == 3 and all(t.shape == (1, 3, 32, 32, 32) for t in (out.main, *out.decoder, *out.encoder))
    DSDLoss(num_classes=3)(out, torch.randint(0, 3, (1, 1, 32, 32, 32))).backward()
    assert all(p.grad is not None for p in dsd.encoder_heads.parameters())
    dsd.eval()
    with torch.no_grad():
        sw = inferers.sliding_window_inference(torch.randn(1, 1, 40, 32, 32), (32, 32, 32), 1, dsd)
    assert sw.shape == (1, 3, 40, 32, 32)


def test_dynunet():
    net = nets.DynUNet(3, 1, 2, kernel_size=[3, 3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2],
                       filters=[4, 8, 16])
    dsd = DSD(net, num_classes=2, input_shape=(1, 1, 16, 16, 16), **presets.dynunet_layers(net, "dsd"))
    assert dsd.encoder_layers == ("input_block", "downsamples.0") and dsd.decoder_layers == ("bottleneck",
                                                                                              "upsamples.0")
    out = dsd(torch.randn(2, 1, 16, 16, 16))
    assert all(t.shape == (2, 2, 16, 16, 16) for t in (*out.decoder, *out.encoder))
    # the published variant shares one head per scale: downsamples.0 and upsamples.0 are both at 1/2
    assert dsd.decoder_heads[1] is dsd.encoder_heads[1] and dsd.decoder_heads[0] is not dsd.encoder_heads[0]
    # anisotropic strides: scale (2, 2, 1) has no single x2 deconv; the interp heads take it
    aniso = nets.DynUNet(3, 1, 2, kernel_size=[3, 3, 3], strides=[1, (2, 2, 1), (2, 2, 1)],
                         upsample_kernel_size=[(2, 2, 1), (2, 2, 1)], filters=[4, 8, 8])
    layers = {"encoder_layers": ["input_block"], "decoder_layers": ["bottleneck"]}
    with pytest.raises(ValueError, match="power of two"):
        DSD(aniso, num_classes=2, input_shape=(1, 1, 8, 8, 8), **layers)
    interp = DSD(aniso, num_classes=2, head_mode="interp", input_shape=(1, 1, 8, 8, 8), **layers)
    assert interp(torch.randn(2, 1, 8, 8, 8)).decoder[0].shape == (2, 2, 2, 2, 8)


@pytest.mark.parametrize("feature_size,in_channels,classes,base,grown", [
    (12, 4, 4, 4_079_386, 4_080_722),  # seeds.md §5.3: SwinUNETR f12 on BraTS
    (36, 1, 8, 35_072_774, 35_079_574),  # SwinUNETR f36 on MMWHS
])
def test_swinunetr_heads_match_published(feature_size, in_channels, classes, base, grown):
    """DSD's SwinUNETR: the decoder reuses the encoder heads at 1/8, 1/4 and 1/2; the 1/16 head is the
    decoder's alone."""
    net = nets.SwinUNETR(in_channels=in_channels, out_channels=classes, feature_size=feature_size)
    assert sum(p.numel() for p in net.parameters()) == base
    dsd = DSD(net, num_classes=classes, input_shape=(1, in_channels, 64, 64, 64), **presets.swinunetr_layers("dsd"))
    assert sum(p.numel() for p in dsd.parameters()) == grown
    assert [dsd.scales[n][0] for n in dsd.decoder_layers] == [16, 8, 4, 2]
    assert all(dsd.decoder_heads[j] is dsd.encoder_heads[i] for j, i in ((1, 3), (2, 2), (3, 1)))
    assert not any(dsd.decoder_heads[0] is head for head in dsd.encoder_heads)


def test_vnet_heads_match_published():
    """DSD's VNet, 4 -> 4 classes: 45,611,916 -> 45,616,820 as released, whose ninth head (on up_tr32, 152
    parameters) its forward never calls; the preset builds the eight it uses."""
    net = nets.VNet(in_channels=4, out_channels=4)
    assert sum(p.numel() for p in net.parameters()) == 45_611_916
    dsd = DSD(net, num_classes=4, input_shape=(1, 4, 64, 64, 64), **presets.vnet_layers("dsd"))
    assert sum(p.numel() for p in dsd.parameters()) == 45_616_820 - 152
    assert [dsd.scales[n][0] for n in dsd.encoder_layers] == [1, 2, 4, 8]
    assert [dsd.scales[n][0] for n in dsd.decoder_layers] == [16, 8, 4, 2]


@pytest.mark.parametrize("name", ["SwinUNETR", "VNet"])
def test_swinunetr_and_vnet_training_and_eval(name):
    torch.manual_seed(0)
    if name == "SwinUNETR":
        net, layers = nets.SwinUNETR(in_channels=1, out_channels=3, feature_size=12), presets.swinunetr_layers("dsd")
    else:
        net, layers = nets.VNet(in_channels=1, out_channels=3, dropout_prob_down=None,
                                dropout_prob_up=(None, 0.0)), presets.vnet_layers("dsd")
    dsd = DSD(net, num_classes=3, **layers)  # the input size derived from the backbone's strides
    side = 64 if name == "SwinUNETR" else 32  # SwinUNETR's instance norm needs its 1/32 bottleneck above 1 voxel
    out = dsd(torch.randn(1, 1, side, side, side))
    assert all(t.shape == (1, 3, side, side, side) for t in (out.main, *out.decoder, *out.encoder))
    DSDLoss(num_classes=3)(out, torch.randint(0, 3, (1, 1, side, side, side))).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in dsd.encoder_heads.parameters())
    dsd.eval()
    with torch.no_grad():
        x = torch.randn(1, 1, side, side, side)
        torch.testing.assert_close(dsd(x), net(x))


def _hooks(module):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def test_wrapping_again_replaces_the_hooks_and_unwrap_takes_them_off():
    net = nets.DynUNet(3, 1, 2, kernel_size=[3, 3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2],
                       filters=[4, 8, 16])
    layers = presets.dynunet_layers(net, "dsd")
    first = DSD(net, num_classes=2, input_shape=(1, 1, 16, 16, 16), **layers)
    once = _hooks(net)
    assert once == 4
    second = DSD(net, num_classes=2, input_shape=(1, 1, 16, 16, 16), **layers)
    assert _hooks(net) == once
    x = torch.randn(2, 1, 16, 16, 16)
    assert len(second(x).decoder) == 2
    with pytest.raises(RuntimeError, match="no longer on the backbone: unwrap"):  # its hooks were replaced
        first(x)
    twin = copy.deepcopy(second)
    assert twin.unwrap() is twin.backbone and _hooks(twin.backbone) == 0 and _hooks(net) == once
    backbone = second.unwrap()
    assert backbone is net and _hooks(net) == 0
    with pytest.raises(RuntimeError, match="no longer on the backbone: unwrap"):
        second(x)
    torch.jit.script(backbone.eval())  # scripting refuses Python hooks


def test_a_failed_wrapper_leaves_the_backbone_as_it_was():
    from fastseg3d.distill import SelfReg

    net = UNet(3, 1, 2, channels=(4, 8, 8))
    good = SelfReg(net, ["encoder.1"], ["decoder.0"], "final")
    hooks = _hooks(net)
    for bad in ({"encoder_layers": ["encoder.0", "encoder.9"]}, {"num_classes": 3}):
        with pytest.raises(ValueError):
            DSD(net, **{"encoder_layers": ["encoder.0"], "decoder_layers": ["decoder.0"], "num_classes": 2,
                        "input_shape": (1, 1, 8, 8, 8), **bad})
        assert _hooks(net) == hooks
    assert len(good(torch.randn(1, 1, 8, 8, 8)).encoder) == 1  # the earlier wrapper still trains


def test_a_failed_step_keeps_no_features_and_data_parallel_is_refused():
    net = dsd_unet(3, 1, 2, channels=(4, 8, 8, 8))

    def fail(module, args, output):
        raise RuntimeError("out of memory")

    handle = net.backbone.decoder[1].register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="out of memory"):
        net(torch.randn(1, 1, 16, 16, 16))
    assert net._tap.store == {}
    handle.remove()
    with pytest.raises(RuntimeError, match="DistributedDataParallel"):
        net._replicate_for_data_parallel()  # what nn.DataParallel's replicate calls on every module


def test_heads_follow_the_backbone_dtype():
    net = UNet(3, 1, 2, channels=(4, 8, 8)).double()
    dsd = DSD(net, ["encoder.0"], ["decoder.0"], num_classes=2)
    assert {p.dtype for p in dsd.parameters()} == {torch.float64}
    assert dsd(torch.randn(1, 1, 8, 8, 8, dtype=torch.float64)).decoder[0].dtype == torch.float64


def test_dynunet_shared_heads_published_size():
    """seeds.md: DynUNet (filters 32..320, 8 classes) grows by 8,592 parameters under DSD, heads shared per scale."""
    net = nets.DynUNet(3, 1, 8, kernel_size=[3] * 5, strides=[1, 2, 2, 2, 2], upsample_kernel_size=[2] * 4,
                       filters=[32, 64, 128, 256, 320])
    base = sum(p.numel() for p in net.parameters())
    with torch.device("meta"):
        dsd = DSD(net.to("meta"), num_classes=8, input_shape=(1, 1, 32, 32, 32), **presets.dynunet_layers(net, "dsd"))
    assert sum(p.numel() for p in dsd.parameters()) - base == 8592
    separate = DSD(net, num_classes=8, input_shape=(1, 1, 32, 32, 32),
                   **{**presets.dynunet_layers(net, "dsd"), "share_heads": False})
    # three more 1x1 convs (64, 128, 256 -> 8 channels) and three more x2 deconvs (8 -> 8)
    assert sum(p.numel() for p in separate.parameters()) - base == 8592 + (520 + 1032 + 2056) + 3 * 520


def test_shared_heads_train_from_both_sides_and_round_trip():
    net = nets.DynUNet(3, 1, 2, kernel_size=[3, 3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2],
                       filters=[4, 8, 16])
    dsd = DSD(net, num_classes=2, input_shape=(1, 1, 16, 16, 16), **presets.dynunet_layers(net, "dsd"))
    shared = dsd.encoder_heads[1]
    out = dsd(torch.randn(1, 1, 16, 16, 16))
    out.encoder[1].sum().backward()
    g_enc = shared.conv.weight.grad.clone()
    shared.zero_grad()
    out = dsd(torch.randn(1, 1, 16, 16, 16))
    out.decoder[1].sum().backward()
    assert g_enc.abs().sum() > 0 and shared.conv.weight.grad.abs().sum() > 0
    state = dsd.state_dict()
    assert "encoder_heads.1.conv.weight" in state and "decoder_heads.1.conv.weight" in state
    other = DSD(nets.DynUNet(3, 1, 2, kernel_size=[3, 3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2],
                             filters=[4, 8, 16]),
                num_classes=2, input_shape=(1, 1, 16, 16, 16), **presets.dynunet_layers(net, "dsd"))
    other.load_state_dict(state)
    assert other.decoder_heads[1] is other.encoder_heads[1]
    torch.testing.assert_close(other.decoder_heads[1].conv.weight, shared.conv.weight)


def test_shared_heads_need_equal_channels():
    net = UNet(3, 1, 2, channels=(4, 8, 16))
    # encoder.1.0, the max-pooled level-0 feature (4 channels at 1/2), against decoder.0 (8 channels at 1/2)
    with pytest.raises(ValueError, match="share_heads"):
        DSD(net, ["encoder.0", "encoder.1.0"], ["encoder.2", "decoder.0"], num_classes=2, share_heads=True,
            input_shape=(1, 1, 16, 16, 16))


def test_compile_fullgraph():
    net = dsd_unet(3, 1, 2, channels=(4, 8, 8), head_mode="interp")
    x = torch.randn(1, 1, 8, 8, 8)
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")  # the wrapper's graph; codegen is torch's
    out, ref = compiled(x), net(x)
    assert isinstance(out, DSDOutput)
    for a, e in zip((out.main, *out.decoder, *out.encoder), (ref.main, *ref.decoder, *ref.encoder)):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)
    sum(t.sum() for t in (out.main, *out.decoder, *out.encoder)).backward()
    assert all(p.grad is not None for p in net.parameters())


def _head_shapes(dsd):
    return {k: tuple(v.shape) for k, v in dsd.state_dict().items() if "heads" in k}


@pytest.mark.parametrize("mode", ["deconv", "interp"])
def test_input_shape_is_optional(unetr_cls, mode):
    """Without input_shape the dry run's input comes from the backbone, and the heads are those built with one:
    fastseg3d's UNet (2-D and 3-D: in_channels, pooling strides), MONAI's DynUNet (strided convs, residual blocks
    whose shortcut convs are strided too; anisotropic strides) and UNETR (built for one size: feat_size x
    patch_size; with the perceptron patch embedding the first conv is encoder1's)."""
    dyn = {"kernel_size": [3, 3, 3, 3], "upsample_kernel_size": [2, 2, 2], "filters": [4, 8, 16, 16]}
    cases = [
        (UNet(3, 2, 3, channels=(4, 8, 8, 8, 8)), (1, 2, 32, 32, 32)),
        (UNet(2, 1, 3, channels=(4, 8, 8)), (1, 1, 16, 16)),
        (nets.DynUNet(3, 2, 3, strides=[1, 2, 2, 2], res_block=True, **dyn), (1, 2, 16, 16, 16)),
        (_small_unetr(unetr_cls, in_channels=2), (1, 2, 32, 32, 32)),
        (unetr_cls(1, 3, img_size=(32, 32, 16), feature_size=8, hidden_size=48, mlp_dim=96, num_heads=4,
                   proj_type="perceptron"), (1, 1, 32, 32, 16)),
    ]
    if mode == "interp":  # scale (2, 2, 1) has no single x2 deconv
        ups = {"upsample_kernel_size": [2, (2, 2, 1), 2]}
        aniso = nets.DynUNet(3, 1, 3, strides=[1, 2, (2, 2, 1), 2], **{**dyn, **ups})
        cases.append((aniso, (1, 1, 16, 16, 8)))
    for net, shape in cases:
        name = type(net).__name__
        layers = (presets.unetr_layers("dsd") if name == "UNETR" else presets.dynunet_layers(net, "dsd")
                  if name == "DynUNet" else presets.unet_layers(net, "dsd"))
        given = DSD(net, num_classes=3, head_mode=mode, input_shape=shape, **layers)
        derived = DSD(net, num_classes=3, head_mode=mode, **layers)
        assert derived.scales == given.scales, name
        assert _head_shapes(derived) == _head_shapes(given), name
        out = derived(torch.randn(shape))
        assert all(h.shape[1] == 3 for h in (*out.decoder, *out.encoder))


def test_construction_runs_no_user_hook_and_needs_a_copyable_backbone():
    """The shape-only run is on a hook-free meta copy: the backbone's own hooks (a logger, a NaN guard that reads
    values) neither run nor fail it, and keep working afterwards; a backbone that cannot be copied (old-style
    weight_norm's computed weight) gets a TypeError saying so, not a request for input_shape."""
    net = UNet(3, 1, 3, channels=(4, 8, 16))
    seen = []
    net.encoder[1].register_forward_hook(lambda m, a, o: seen.append(o.device.type))

    def nan_guard(module, args, output):
        if not torch.isfinite(output).all():
            raise FloatingPointError("NaN")

    net.encoder[0].register_forward_hook(nan_guard)

    class Recorder:  # a hook bound to an object that cannot be copied (a lock, a file, a SummaryWriter)
        def __init__(self):
            self.lock, self.calls = threading.Lock(), 0

        def hook(self, module, args, output):
            self.calls += 1

    recorder = Recorder()
    net.decoder[0].register_forward_hook(recorder.hook)
    wrapped = DSD(net, num_classes=3, **presets.unet_layers(net, "dsd"))
    assert seen == [] and recorder.calls == 0
    wrapped(torch.randn(1, 1, 16, 16, 16))
    assert seen == ["cpu"] and recorder.calls == 1

    class WeightNormed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.utils.weight_norm(torch.nn.Conv3d(1, 4, 3, padding=1))
            self.b = torch.nn.Conv3d(4, 2, 1)

        def forward(self, x):
            return self.b(self.a(x))

    with pytest.raises(TypeError, match="cannot be copied.*parametrizations.weight_norm"):
        DSD(WeightNormed(), ["a"], ["b:input"], num_classes=2)


def test_input_shape_that_cannot_be_derived():
    net = UNet(3, 1, 2, channels=(4, 8, 8))
    net.in_channels = 5  # a wrong record: every candidate input fails in the first conv
    with pytest.raises(ValueError, match="pass input_shape"):
        DSD(net, ["encoder.0"], ["decoder.0"], num_classes=2)

    class Tokens(torch.nn.Module):  # nothing tells the input's channels or dimensions
        def __init__(self):
            super().__init__()
            self.mix = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.mix(x)

    with pytest.raises(ValueError, match="pass input_shape"):
        DSD(Tokens(), ["mix"], ["mix:input"], num_classes=4)


def test_bad_arguments(unetr_cls):
    net = UNet(3, 1, 2, channels=(4, 8, 8))
    shape = (1, 1, 8, 8, 8)
    good = {"encoder_layers": ["encoder.0"], "decoder_layers": ["decoder.0"], "num_classes": 2, "input_shape": shape}
    for change, error in (({"encoder_layers": []}, ValueError), ({"decoder_layers": "decoder.0"}, ValueError),
                          ({"encoder_layers": ["encoder.9"]}, ValueError), ({"num_classes": 0}, ValueError),
                          ({"num_classes": 3}, ValueError), ({"head_mode": "trilinear"}, ValueError),
                          ({"decoder_layers": ["encoder.0"]}, ValueError), ({"input_shape": (8, 8)}, ValueError),
                          ({"input_shape": (1, 1, 8, 8, 6)}, ValueError)):
        with pytest.raises(error):
            DSD(net, **{**good, **change})
    with pytest.raises(TypeError):
        DSD(lambda x: x, **good)
    with pytest.raises(ValueError, match="deep supervision"):
        ds = nets.DynUNet(3, 1, 2, kernel_size=[3, 3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2],
                          filters=[4, 8, 8], deep_supervision=True)
        DSD(ds, ["input_block"], ["bottleneck"], 2, input_shape=(1, 1, 8, 8, 8))(torch.randn(1, 1, 8, 8, 8))
    from fastseg3d.distill import presets

    with pytest.raises(ValueError, match="deep_supervision=False"):  # the preset says so before any forward
        presets.dynunet_layers(ds, "dsd")
    with pytest.raises(TypeError, match="expected fastseg3d's UNet, got"):
        presets.unet_layers(ds, "dsd")
    with pytest.raises(ValueError, match="tokens"):  # UNETR's ViT returns tokens: tap "decoder5:input" instead
        DSD(_small_unetr(unetr_cls), ["encoder1"], ["vit"], 3, input_shape=(1, 1, 32, 32, 32))


def test_unwrapped_preset_exports_and_traces():
    """What unwrap()'s docstring promises for fastseg3d's own UNet: torch.export, and torch.jit.trace under
    no_grad, give the eager outputs."""
    backbone = dsd_unet(3, 1, 3, channels=(4, 8, 16)).unwrap().eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        expected = backbone(x)
        traced = torch.jit.trace(backbone, x)
        torch.testing.assert_close(traced(x), expected)
    exported = torch.export.export(backbone, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), expected)


def test_deepup_scale_1_applies_its_transposed_conv():
    """As published, a head at the output's resolution is conv 1x1x1 -> transposed conv 1x1x1 (stride 1)."""
    torch.manual_seed(0)
    head = DeepUp(3, 8, 4, scale=1).double()
    x = torch.randn(2, 8, 3, 4, 5, dtype=torch.float64)
    expected = F.conv_transpose3d(F.conv3d(x, head.conv.weight, head.conv.bias), head.up.weight, head.up.bias)
    with torch.no_grad():
        torch.testing.assert_close(head(x), expected)


def test_dry_run_is_in_eval_mode():
    """The heads' shapes come from a run in eval mode: a BatchNorm U-Net whose bottleneck holds one voxel at the
    given input (batch 1, 4^3 with three levels) builds, and the backbone stays in training mode, untouched."""
    torch.manual_seed(0)
    net = UNet(3, 1, 2, channels=(4, 8, 8), norm="batch").train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    dsd = DSD(net, ["encoder.0", "encoder.1"], ["encoder.2", "decoder.0"], num_classes=2,
              input_shape=(1, 1, 4, 4, 4))
    assert net.training and all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert [dsd.scales[n][0] for n in ("encoder.0", "encoder.1", "encoder.2", "decoder.0")] == [1, 2, 4, 2]
    out = dsd(torch.randn(2, 1, 8, 8, 8))
    assert all(t.shape == (2, 2, 8, 8, 8) for t in (*out.decoder, *out.encoder))
