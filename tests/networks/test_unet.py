"""fastseg3d's plain UNet: shapes in 2-D and 3-D, named stages, meta device, presets, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastseg3d
from fastseg3d.distill import DSD, SelfReg
from fastseg3d.losses import DSDLoss, SelfRegLoss
from fastseg3d.networks.unet import UNet, dsd_unet, selfreg_unet
from fastseg3d.profile import activation_memory
from tests.utils import assert_backends_agree, assert_close


@pytest.mark.parametrize("spatial_dims,shape", [(2, (2, 1, 16, 24)), (3, (1, 2, 8, 16, 8))])
@pytest.mark.parametrize("norm,act", [("instance", "leakyrelu"), ("batch", "gelu")])
def test_shapes_and_stage_names(spatial_dims, shape, norm, act):
    net = UNet(spatial_dims, shape[1], 3, channels=(4, 8, 16), norm=norm, act=act)
    out = net(torch.randn(shape))
    assert out.shape == (shape[0], 3, *shape[2:])
    names = dict(net.named_modules())
    for name in ("encoder.0", "encoder.1", "encoder.2", "decoder.0", "decoder.1", "final", "out"):
        assert name in names
    # the output conv reads the "final" feature, and the decoder climbs back to full resolution
    feats = {}
    hooks = [names[n].register_forward_hook(lambda m, a, o, n=n: feats.__setitem__(n, o))
             for n in ("encoder.2", "decoder.0", "decoder.1", "final")]
    x = torch.randn(shape)
    logits = net(x)
    for h in hooks:
        h.remove()
    assert feats["encoder.2"].shape[2:] == tuple(s // 4 for s in shape[2:])
    assert feats["decoder.0"].shape[1:] == (8, *(s // 2 for s in shape[2:]))
    assert feats["final"] is feats["decoder.1"]
    torch.testing.assert_close(net.out(feats["final"]), logits)


def test_parameter_count():
    net = UNet(3, 1, 2, channels=(4, 8), norm="batch")
    conv = lambda i, o, k: i * o * k**3  # noqa: E731
    block = lambda i, o: conv(i, o, 3) + conv(o, o, 3) + 4 * o  # noqa: E731  (2 norms, weight + bias)
    expected = block(1, 4) + block(4, 8) + (conv(8, 4, 2) + 4) + block(8, 4) + (4 * 2 + 2)
    assert sum(p.numel() for p in net.parameters()) == expected


def test_meta_device():
    with torch.device("meta"):
        net = UNet(3, 4, 3)
    out = net(torch.empty(2, 4, 128, 128, 96, device="meta"))
    assert out.shape == (2, 3, 128, 128, 96) and out.device.type == "meta"


@pytest.mark.parametrize("spatial_dims,shape", [(3, (2, 4, 32, 32, 16)), (2, (2, 4, 32, 16))])
def test_meta_device_training_step(spatial_dims, shape):
    """Forward and backward on the meta device: a gradient for the input and every parameter, nothing allocated."""
    with torch.device("meta"):
        net = UNet(spatial_dims, 4, 3)
    x = torch.empty(shape, device="meta", requires_grad=True)
    net(x).square().mean().backward()
    assert x.grad.shape == shape and x.grad.device.type == "meta"
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in net.parameters())


def test_presets_train_on_the_meta_device():
    """dsd_unet with DSDLoss and selfreg_unet with SelfRegLoss: a whole training step on the meta device."""
    with torch.device("meta"):
        nets = {"dsd": dsd_unet(3, 1, 3, channels=(4, 8, 8, 8)), "selfreg": selfreg_unet(3, 1, 3, channels=(4, 8, 8))}
    losses = {"dsd": DSDLoss(3), "selfreg": SelfRegLoss(generator=0)}
    label = torch.zeros(1, 1, 16, 16, 16, dtype=torch.long, device="meta")
    for name, net in nets.items():
        loss = losses[name](net(torch.empty(1, 1, 16, 16, 16, device="meta")), label)
        assert loss.device.type == "meta" and loss.shape == ()
        loss.backward()
        assert all(p.grad is not None and p.grad.device.type == "meta" for p in net.parameters()), name


@pytest.mark.interpret
@pytest.mark.parametrize("norm,act,upsample", [("instance", "leakyrelu", "deconv"), ("batch", "relu", "deconv"),
                                               ("batch", "relu", "nontrainable"),
                                               (("INSTANCE", {"affine": False, "eps": 1e-3}),
                                                ("LeakyReLU", {"negative_slope": 0.2, "inplace": True}), "deconv")])
def test_interpret_fused_network_matches_reference(norm, act, upsample, poison):
    """A training step of a small 3-D UNet with its norm -> activation chains on the fused kernels (the
    interpreter) against the reference backend: logits, input gradient and every parameter gradient (with
    interpolating stages, blocks whose middle channels differ from their output's)."""
    torch.manual_seed(0)
    net = UNet(3, 2, 3, channels=(4, 8, 8), norm=norm, act=act, upsample=upsample).train()
    assert_backends_agree(net, torch.randn(2, 2, 8, 8, 8), "triton", floor=1e-3)


def test_presets():
    d = dsd_unet(3, 1, 2, channels=(4, 8, 8, 8))
    assert isinstance(d, DSD) and isinstance(d.backbone, UNet)
    assert d.decoder_layers == ("encoder.3", "decoder.0", "decoder.1")
    assert d.encoder_layers == ("encoder.0", "encoder.1", "encoder.2")
    s = selfreg_unet(2, 1, 2, channels=(4, 8, 8), norm="batch")
    assert isinstance(s, SelfReg) and isinstance(s.backbone.encoder[0][1], nn.BatchNorm2d)
    assert (s.encoder_layers, s.decoder_layers, s.final_layer) == (("encoder.1", "encoder.2"), ("decoder.0",), "final")


def test_bad_arguments():
    for kwargs in ({"spatial_dims": 1}, {"in_channels": 0}, {"out_channels": 1.5}, {"channels": (8,)},
                   {"channels": 8}, {"channels": (8, 0)}, {"norm": "group"}, {"act": "swish"}):
        with pytest.raises(ValueError):
            UNet(**kwargs)
    net = UNet(3, 2, 2, channels=(4, 8, 8))
    with pytest.raises(ValueError, match="5-D"):
        net(torch.randn(1, 2, 8, 8))
    with pytest.raises(ValueError, match="in_channels=2"):
        net(torch.randn(1, 1, 8, 8, 8))
    with pytest.raises(ValueError, match="dimension 2 \\(size 6\\) must be a positive multiple of 4"):
        net(torch.randn(1, 2, 8, 8, 6))
    with pytest.raises(ValueError, match="dimension 0 \\(size 0\\) must be a positive multiple of 4"):
        net(torch.randn(1, 2, 0, 8, 8))
    # a one-voxel bottleneck: ATen's norm error ("when training", even in eval) named neither the size nor the fix
    with pytest.raises(ValueError, match=r"\(4, 4, 4\) leaves a one-voxel bottleneck .* InstanceNorm.* side 8"):
        net.eval()(torch.randn(1, 2, 4, 4, 4))
    assert net(torch.randn(1, 2, 4, 4, 8)).shape == (1, 2, 4, 4, 8)
    batch = UNet(2, 2, 2, channels=(4, 8), norm="batch")
    with pytest.raises(ValueError, match=r"\(2, 2\) leaves a one-voxel bottleneck .* batch 1: .* batch 2 or more"):
        batch.train()(torch.randn(1, 2, 2, 2))
    assert batch(torch.randn(2, 2, 2, 2)).shape == (2, 2, 2, 2)  # training at batch 2, and eval at batch 1
    assert batch.eval()(torch.randn(1, 2, 2, 2)).shape == (1, 2, 2, 2)
    with pytest.raises(ValueError, match="even channel counts"):  # SelfReg halves each tapped feature's channels
        selfreg_unet(3, 1, 2, channels=(4, 7, 16))
    odd_first = selfreg_unet(3, 1, 2, channels=(3, 8, 16))  # channels[0] feeds only F_final, which is not halved
    out = odd_first(torch.randn(1, 1, 8, 8, 8))
    assert out.final.shape[1] == 3 and torch.isfinite(SelfRegLoss()(out, torch.randint(0, 2, (1, 1, 8, 8, 8))))


@pytest.mark.parametrize("target", ["fastseg3d.networks.UNet", "fastseg3d.networks.dsd_unet",
                                    "fastseg3d.networks.selfreg_unet"])
def test_bundle_instantiation_and_compile(target):
    bundle = pytest.importorskip("monai.bundle")
    parser = bundle.ConfigParser({"net": {"_target_": target, "spatial_dims": 3, "in_channels": 2,
                                          "out_channels": 3, "channels": [4, 8, 8]}})
    net = parser.get_parsed_content("net")
    x = torch.randn(2, 2, 8, 8, 8)
    assert net.eval()(x).shape == (2, 3, 8, 8, 8)  # eval: one tensor, what sliding_window_inference wants
    grads = []
    for run in (net.train(), torch.compile(net.train(), fullgraph=True, backend="aot_eager")):
        torch._dynamo.reset()
        net.zero_grad(set_to_none=True)
        out = run(x)
        logits = out if isinstance(out, torch.Tensor) else out[0]
        logits.square().mean().backward()
        grads.append([torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in net.parameters()])
    assert any(g.abs().sum() > 0 for g in grads[1])
    for eager, compiled in zip(*grads):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("norm,act", [("instance", "leakyrelu"), ("batch", "relu"), ("instance", "gelu")])
def test_blocks_recompute_their_middle_norm_and_activation(norm, act):
    """In 3-D each conv block's norm -> activation -> conv saves only the norm's input, and its last norm ->
    activation only the norm's input too where the fused kernel takes the norm (a GroupNorm or InstanceNorm, on CUDA
    and on meta tensors; a LeakyReLU after another norm saves its output instead of its input: fastseg3d.nn.recompute):
    the same training step as the plain composition (fastseg3d.backend("torch")), saving, per block, the
    activation's output (and, for LeakyReLU and GELU, its input) less, plus the repeated InstanceNorm weight (both
    keep the conv's bf16 weight under autocast: fastseg3d.nn.autocast_weights' copy, autocast's cast). Counted exactly
    on the meta device."""
    torch.manual_seed(0)
    channels, shape = (4, 8, 16), (2, 1, 16, 16, 16)
    net = UNet(3, 1, 2, channels=channels, norm=norm, act=act).double()
    plain = copy.deepcopy(net)
    x = torch.randn(shape, dtype=torch.float64)
    y = net(x)
    with fastseg3d.backend("torch"):
        y_ref = plain(x)
    assert_close("logits", y, y_ref, torch.float64)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    for (name, p), p_ref in zip(net.named_parameters(), plain.parameters()):
        assert_close(name, p.grad, p_ref.grad, torch.float64)
    for (name, b), b_ref in zip(net.named_buffers(), plain.buffers()):
        assert torch.allclose(b.double(), b_ref.double(), rtol=1e-12, atol=0), name
    side = shape[2]
    for dtype, size in ((torch.float32, 4), (torch.bfloat16, 2)):
        fused = activation_memory(net.float(), shape, dtype)
        with fastseg3d.backend("torch"):
            reference = activation_memory(net, shape, dtype)

        def saving(levels):
            # the middle chain: the activation's output (and LeakyReLU's and GELU's input); the last InstanceNorm ->
            # activation (fused): the activation's input (the next layer saves the output anyway); the last
            # BatchNorm -> ReLU is plain
            tensors = {"relu": 1, "gelu": 3, "leakyrelu": 3}[act]
            repeats = 2  # InstanceNorm's weight repeated over the batch, saved plainly
            return sum(tensors * size * shape[0] * c * (side >> level) ** 3
                       + (repeats * shape[0] * c * 4 if norm == "instance" else 0) for level, c in levels)

        # (the total only: a block output saved by both a norm -> LeakyReLU and the next module is counted for the
        # first module that saves it, so per-module counts shift between stages)
        assert reference["total"] - fused["total"] == saving(enumerate(channels)) + saving(enumerate(channels[:-1]))


def _conv_block_ref(block, x, norm, act):
    conv = F.conv3d if x.dim() == 5 else F.conv2d
    for c, n in ((block[0], block[1]), (block[3], block[4])):
        assert c.bias is None
        x = conv(x, c.weight, padding=1)
        if norm == "instance":
            assert n.affine  # nnU-Net's affine InstanceNorm
            x = F.instance_norm(x, weight=n.weight, bias=n.bias, eps=1e-5)
        else:  # training: the batch's statistics
            x = F.batch_norm(x, None, None, n.weight, n.bias, True, 0.0, 1e-5)
        x = {"leakyrelu": lambda t: F.leaky_relu(t, 0.01), "relu": F.relu, "gelu": F.gelu}[act](x)
    return x


def test_norm_and_act_take_monai_spellings():
    """MONAI's Norm/Act names (upper case) and its (name, kwargs) form, a list in a YAML config; a keyword the layer
    does not take here is a ValueError naming it."""
    from monai.networks.layers import Act, Norm

    net = UNet(3, 1, 2, (4, 8), norm=Norm.INSTANCE, act=Act.LEAKYRELU)
    ref = UNet(3, 1, 2, (4, 8))
    assert str(net) == str(ref)
    net = UNet(2, 1, 2, (4, 8), norm=["batch", {"eps": 1e-3, "momentum": 0.05}],
               act=("leakyrelu", {"negative_slope": 0.2, "inplace": True}))
    bn, act = net.encoder[0][1], net.encoder[0][2]
    assert isinstance(bn, nn.BatchNorm2d) and (bn.eps, bn.momentum) == (1e-3, 0.05)
    assert isinstance(act, nn.LeakyReLU) and act.negative_slope == 0.2 and act.inplace
    plain = UNet(3, 1, 2, (4, 8), norm=("instance", {"affine": False}), act="GELU")
    assert not plain.encoder[0][1].affine and isinstance(plain.encoder[0][2], nn.GELU)
    assert sum(p.numel() for p in plain.parameters()) < sum(p.numel() for p in ref.parameters())
    with pytest.raises(ValueError, match=r"norm: batch takes eps, momentum here, got \['affine'\]"):
        UNet(norm=("batch", {"affine": False}))
    with pytest.raises(ValueError, match=r"act: gelu takes no arguments here, got \['approximate'\]"):
        UNet(act=("gelu", {"approximate": "tanh"}))
    for bad in ("group", ("instance", "affine"), ("instance", {}, {}), None):
        with pytest.raises(ValueError, match="norm must be one of"):
            UNet(norm=bad)


def test_nontrainable_upsampling_is_selfreg_unet_hd():
    """upsample="nontrainable": SelfReg's UNet_hd (bilinear=True): 17,262,345 parameters at its published size,
    and, re-derived by hand, Up = x2 interpolation with align_corners=True, concatenation [skip, up], then a block
    from the concatenation through half its channels; the output conv reads the last stage's channels[0]."""
    with torch.device("meta"):
        hd = UNet(2, 1, 9, (64, 128, 256, 512, 512), "batch", "relu", "nontrainable")
        published = selfreg_unet(2, 1, 9, (64, 128, 256, 512, 512), norm="batch", act="relu", upsample="nontrainable")
    assert sum(p.numel() for p in hd.parameters()) == 17_262_345
    assert sum(p.numel() for p in published.parameters()) == 17_262_345
    feats = published(torch.empty(2, 1, 224, 224, device="meta"))
    assert [f.shape[1:] for f in feats.encoder] == [(128, 112, 112), (256, 56, 56), (512, 28, 28), (512, 14, 14)]
    assert [f.shape[1:] for f in feats.decoder] == [(256, 28, 28), (128, 56, 56), (64, 112, 112)]
    assert feats.final.shape[1:] == (64, 224, 224)
    for spatial_dims in (2, 3):
        torch.manual_seed(0)
        net = UNet(spatial_dims, 2, 3, (4, 6, 8, 8), "batch", "relu", "nontrainable").double().train()
        x = torch.randn(2, 2, *(8,) * spatial_dims, dtype=torch.float64)
        mode = "trilinear" if spatial_dims == 3 else "bilinear"
        pool = F.max_pool3d if spatial_dims == 3 else F.max_pool2d
        with torch.no_grad():
            skips = [_conv_block_ref(net.encoder[0], x, "batch", "relu")]
            for stage in net.encoder[1:]:
                skips.append(_conv_block_ref(stage[1], pool(skips[-1], 2), "batch", "relu"))
            y = skips.pop()
            for stage, out_channels in zip(net.decoder, (6, 4, 4)):
                cat = torch.cat([skips.pop(), F.interpolate(y, scale_factor=2, mode=mode, align_corners=True)], 1)
                assert stage.block[0].weight.shape[:2] == (cat.shape[1] // 2, cat.shape[1])
                y = _conv_block_ref(stage.block, cat, "batch", "relu")
                assert y.shape[1] == out_channels
            conv = F.conv3d if spatial_dims == 3 else F.conv2d
            torch.testing.assert_close(net(x), conv(y, net.out.weight, net.out.bias))
    with pytest.raises(ValueError, match="upsample must be one of"):
        UNet(upsample="pixelshuffle")
    with pytest.raises(ValueError, match=r"taps features of \[8, 8, 3\] channels"):  # the decoder outputs channels[0]
        selfreg_unet(3, 1, 2, channels=(3, 8, 8), upsample="nontrainable")


@pytest.mark.parametrize("spatial_dims", [3, 2])
@pytest.mark.parametrize("norm,act", [("instance", "leakyrelu"), ("batch", "relu"), ("instance", "gelu")])
def test_blocks_and_stages_match_hand_written(spatial_dims, norm, act):
    torch.manual_seed(0)
    net = UNet(spatial_dims, 2, 3, channels=(4, 8), norm=norm, act=act).double().train()
    with torch.no_grad():  # distinct norms: the first and second of a block cannot stand in for each other
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._NormBase) and m.weight is not None:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 2, *(8,) * spatial_dims, dtype=torch.float64)
    pool = F.max_pool3d if spatial_dims == 3 else F.max_pool2d
    with torch.no_grad():
        e0 = net.encoder[0](x)
        torch.testing.assert_close(e0, _conv_block_ref(net.encoder[0], x, norm, act))
        # encoder.1: 2x max pooling, then the conv block
        torch.testing.assert_close(net.encoder[1](e0), _conv_block_ref(net.encoder[1][1], pool(e0, 2), norm, act))


def test_defaults_are_the_documented_five_levels():
    """UNet() as documented: 1 -> 2 channels over five levels of 32 .. 320 channels with transposed-conv upsampling
    (the norm and activation defaults are pinned by test_norm_and_act_take_monai_spellings)."""
    with torch.device("meta"):
        net = UNet()
    assert (net.in_channels, net.out_channels, net.channels) == (1, 2, (32, 64, 128, 256, 320))
    assert isinstance(net.decoder[0].up, nn.ConvTranspose3d) and net.divisor == 16


def test_monai_kwargs_reach_their_layers():
    """Every keyword the (name, kwargs) form documents reaches its layer: InstanceNorm's eps (affine kept by default)
    and ReLU's inplace; the network runs with them."""
    net = UNet(3, 1, 2, (4, 8), norm=("instance", {"eps": 1e-3}), act=("RELU", {"inplace": True}))
    norm, act = net.encoder[0][1], net.encoder[0][2]
    assert isinstance(norm, nn.InstanceNorm3d) and norm.eps == 1e-3 and norm.affine
    assert isinstance(act, nn.ReLU) and act.inplace
    assert net(torch.randn(1, 1, 8, 8, 8)).shape == (1, 2, 8, 8, 8)


def test_dsd_unet_heads_default_to_the_published_deconv():
    """dsd_unet's heads are DSD's published transposed-conv heads by default: every head at the output resolution."""
    net = dsd_unet(3, 1, 2, channels=(4, 8, 8, 8))
    assert net.head_mode == "deconv"
    out = net(torch.randn(1, 1, 16, 16, 16))
    assert all(t.shape == (1, 2, 16, 16, 16) for t in (*out.decoder, *out.encoder))
