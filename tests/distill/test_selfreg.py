"""The SelfReg wrapper on fastseg3d's UNet, MONAI's UNETR and DynUNet: training features, eval output,
meta device, compile, bad input."""

from __future__ import annotations

import pytest
import torch

from fastseg3d.distill import SelfReg, SelfRegOutput, presets
from fastseg3d.losses import SelfRegLoss
from fastseg3d.networks.unet import UNet, selfreg_unet
from tests.distill.test_dsd import _small_unetr, unetr_cls  # noqa: F401  (fixture)

nets = pytest.importorskip("monai.networks.nets")
inferers = pytest.importorskip("monai.inferers")


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_unet_training_and_eval(spatial_dims):
    net = selfreg_unet(spatial_dims, 1, 3, channels=(4, 8, 16, 16))
    x = torch.randn(2, 1, *(16,) * spatial_dims)
    out = net(x)
    assert isinstance(out, SelfRegOutput)
    assert [f.shape[1:] for f in out.encoder] == [(8, *(8,) * spatial_dims), (16, *(4,) * spatial_dims),
                                                  (16, *(2,) * spatial_dims)]
    assert [f.shape[1:] for f in out.decoder] == [(16, *(4,) * spatial_dims), (8, *(8,) * spatial_dims)]
    torch.testing.assert_close(net.backbone.out(out.final), out.logits)  # F_final feeds the output conv
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x), net.backbone(x))
    assert not net._tap.store


def test_unwrap_takes_the_hooks_off():
    net = UNet(3, 1, 2, channels=(4, 8, 16))
    wrapped = SelfReg(net, **presets.unet_layers(net, "selfreg"))
    assert any(m._forward_hooks for m in net.modules())
    assert wrapped.unwrap() is net and not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())


def test_unetr(unetr_cls):  # noqa: F811
    net = SelfReg(_small_unetr(unetr_cls), **presets.unetr_layers("selfreg"))
    out = net(torch.randn(1, 1, 32, 32, 32))
    assert [tuple(f.shape[1:]) for f in out.encoder] == [(32, 16, 16, 16), (64, 8, 8, 8), (128, 4, 4, 4),
                                                         (96, 2, 2, 2)]
    assert [f.shape[1] for f in out.decoder] == [128, 64, 32]
    torch.testing.assert_close(net.backbone.out(out.final), out.logits)
    loss = SelfRegLoss(generator=0)(out, torch.randint(0, 3, (1, 1, 32, 32, 32)))
    loss.backward()
    assert torch.isfinite(loss)
    net.eval()
    with torch.no_grad():
        sw = inferers.sliding_window_inference(torch.randn(1, 1, 32, 40, 32), (32, 32, 32), 1, net)
    assert sw.shape == (1, 3, 32, 40, 32)


def test_unetr_under_autocast(unetr_cls):  # noqa: F811
    """UNETR under autocast: ``decoder5:input``, the ViT's LayerNorm output, stays fp32 while the other features
    and F_final are bf16; the loss takes the mix (the training step runs it after the autocast block, as the
    trainer does, and inside it)."""
    torch.manual_seed(0)
    net = SelfReg(_small_unetr(unetr_cls), **presets.unetr_layers("selfreg"))
    x, y = torch.randn(1, 1, 32, 32, 32), torch.randint(0, 3, (1, 1, 32, 32, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x)
        inside = SelfRegLoss(generator=0)(out, y)
    assert out.encoder[-1].dtype == torch.float32 and out.final.dtype == torch.bfloat16
    loss = SelfRegLoss(generator=0)(out, y)
    torch.testing.assert_close(loss, inside)
    loss.backward()
    assert torch.isfinite(loss)
    assert net.backbone.vit.norm.weight.grad is not None  # the fp32 feature's own path
    # (MONAI's ViT blocks hold cross-attention norms that UNETR never calls: they get no gradient)
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", ["SwinUNETR", "VNet"])
def test_swinunetr_and_vnet(name):
    torch.manual_seed(0)
    if name == "SwinUNETR":
        backbone, layers = nets.SwinUNETR(in_channels=1, out_channels=3, feature_size=12), \
            presets.swinunetr_layers("selfreg")
        side = 64  # its instance norm needs the 1/32 bottleneck above 1 voxel
        expected = [(12, 32, 32, 32), (24, 16, 16, 16), (48, 8, 8, 8), (192, 2, 2, 2)]
        head = backbone.out
    else:
        backbone, layers = nets.VNet(in_channels=1, out_channels=3), presets.vnet_layers("selfreg")
        side = 32
        expected = [(32, 16, 16, 16), (64, 8, 8, 8), (128, 4, 4, 4), (256, 2, 2, 2)]
        head = backbone.out_tr
    net = SelfReg(backbone, **layers)
    out = net(torch.randn(1, 1, side, side, side))
    assert [tuple(f.shape[1:]) for f in out.encoder] == expected
    torch.testing.assert_close(head(out.final), out.logits)
    loss = SelfRegLoss(generator=0)(out, torch.randint(0, 3, (1, 1, side, side, side)))
    loss.backward()
    assert torch.isfinite(loss)


def test_dynunet():
    backbone = nets.DynUNet(3, 1, 2, kernel_size=[3, 3, 3, 3], strides=[1, 2, 2, 2],
                            upsample_kernel_size=[2, 2, 2], filters=[4, 8, 16, 16])
    net = SelfReg(backbone, **presets.dynunet_layers(backbone, "selfreg"))
    assert net.final_layer == "upsamples.2" and len(net.encoder_layers) == 3 and len(net.decoder_layers) == 2
    out = net(torch.randn(2, 1, 16, 16, 16))
    torch.testing.assert_close(backbone.output_block(out.final), out.logits)
    assert SelfRegLoss(generator=0, include_segmentation=False)(out).isfinite()


def test_meta_device_and_compile():
    with torch.device("meta"):
        net = selfreg_unet(3, 4, 3)
    out = net(torch.empty(1, 4, 64, 64, 64, device="meta"))
    assert out.final.shape == (1, 32, 64, 64, 64) and out.encoder[-1].shape == (1, 320, 4, 4, 4)
    small = selfreg_unet(3, 1, 2, channels=(4, 8, 8))
    x = torch.randn(1, 1, 8, 8, 8)
    compiled = torch.compile(small, fullgraph=True, backend="aot_eager")
    got, ref = compiled(x), small(x)
    for a, e in zip((got.logits, *got.encoder, *got.decoder, got.final),
                    (ref.logits, *ref.encoder, *ref.decoder, ref.final)):
        torch.testing.assert_close(a, e)


def test_bad_arguments():
    net = UNet(3, 1, 2, channels=(4, 8, 8))
    with pytest.raises(ValueError):
        SelfReg(net, [], ["decoder.0"], "final")
    with pytest.raises(ValueError):
        SelfReg(net, "encoder.1", ["decoder.0"], "final")
    with pytest.raises(ValueError, match="no submodule"):
        SelfReg(net, ["encoder.7"], ["decoder.0"], "final")
    with pytest.raises(ValueError, match="twice"):
        SelfReg(net, ["encoder.1"], ["decoder.0"], "decoder.0")
    with pytest.raises(ValueError):
        SelfReg(net, ["encoder.1"], ["decoder.0"], None)
    with pytest.raises(TypeError):
        SelfReg("net", ["encoder.1"], ["decoder.0"], "final")
    with pytest.raises(TypeError):
        presets.dynunet_layers(net, "selfreg")
    monai_nets = pytest.importorskip("monai.networks.nets")
    with pytest.raises(TypeError, match="fastseg3d's UNet"):  # MONAI's UNet has other layer names
        presets.unet_layers(monai_nets.UNet(3, 1, 2, channels=(4, 8, 8), strides=(2, 2)), "dsd")
    with pytest.raises(ValueError):
        presets.unet_layers(net, "missu")
    with pytest.raises(ValueError, match="3 levels"):
        presets.unet_layers(UNet(3, 1, 2, channels=(4, 8)), "dsd")


class _InplaceAfterTap(torch.nn.Module):
    """``enc``'s output is changed in place by the ReLU after it; ``act`` runs twice; ``aux`` only in training."""

    def __init__(self, reuse: bool = False):
        super().__init__()
        self.enc, self.act = torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(inplace=True)
        self.down, self.up = torch.nn.Conv3d(4, 4, 3, stride=2, padding=1), torch.nn.ConvTranspose3d(4, 4, 2, 2)
        self.aux, self.out = torch.nn.Identity(), torch.nn.Conv3d(8, 2, 1)
        self.reuse = reuse

    def forward(self, x):
        a = self.act(self.enc(x))
        d = self.down(a)
        if self.reuse:
            d = self.act(d)
        if self.training:
            d = self.aux(d)
        return self.out(torch.cat([self.up(d), a], 1))


def test_a_feature_changed_in_place_or_taken_twice_is_refused():
    """A tapped output the forward then changes in place (an inplace activation after it), or a tapped module that
    runs twice, gave the wrappers the changed tensor or the last call's, silently."""
    from fastseg3d.distill import DSD

    x = torch.randn(1, 1, 8, 8, 8)
    with pytest.raises(RuntimeError, match=r"changes the output of the hooked layers \['enc'\] in place"):
        SelfReg(_InplaceAfterTap(), ["enc"], ["up"], "out")(x)
    with pytest.raises(RuntimeError, match=r"hooked layers \['act'\] run more than once"):
        SelfReg(_InplaceAfterTap(reuse=True), ["act"], ["up"], "out")(x)
    out = SelfReg(_InplaceAfterTap(), ["act"], ["up"], "out")(x)  # the inplace module itself: its final value
    assert out.encoder[0].shape == (1, 4, 8, 8, 8) and out.encoder[0].min() >= 0
    # DSD sizes its heads from an eval-mode dry run: the same problems surface when it is made, and a layer that
    # runs in training only is named as such rather than as a failure to guess an input size
    with pytest.raises(RuntimeError, match=r"run more than once .* eval-mode run of a meta copy"):
        DSD(_InplaceAfterTap(reuse=True), ["act"], ["up"], num_classes=2)
    with pytest.raises(RuntimeError, match=r"did not call the hooked layers \['aux'\] \(in the eval-mode run"):
        DSD(_InplaceAfterTap(), ["aux"], ["up"], num_classes=2)
